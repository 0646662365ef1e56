#!/usr/bin/env python3
"""Golden generator for cachet's diffusion-cache hooks (`cachet-diffusion`): decision parity.

Drives diffusers 0.42.1's cache hooks (PyramidAttentionBroadcast, FasterCache, FirstBlockCache,
TaylorSeerCache) and cache-dit 1.5.3 (DBCache with limits, steps computation masks, the TaylorSeer
calibrator and separate CFG) on the committed tiny checkpoints, with fixed per-step inputs, and
records, for every model call, which attention layers / blocks ran their original forward, the
cache-dit context statistics and the outputs. `tests/tests/diffusion_parity.rs` replays the same
calls through `cachet_diffusion::CacheHooks` and asserts the same decisions and close outputs.

Checkpoints (read, not written: they are the committed outputs of `flux.py` / `cogvideox.py`, which
are byte-reproducible, so the order in which `cargo xtask goldens` runs the scripts is irrelevant):

* `tests/fixtures/flux/`                   2 double + 2 single blocks (`flux`)
* `crates/cachet-diffusion/assets/tiny-flux/` 4 double + 8 single blocks, bf16 weights loaded as f32
                                           (`tiny-flux`, the crate's embedded demo model)
* `tests/fixtures/cogvideox/`              2 blocks, `[B, F=2, C=4, 8, 8]` latents (`cogvideox`)

Step schedule: `N = 10` steps of FlowMatchEuler with shift 1 (cachet's `FlowMatchEuler::new(10,
1.0, None)`): `sigma_i = 1 - 0.09 i`, the transformer's timestep input is `sigma_i` (Flux, which
multiplies it by 1000) or `sigma_i * 1000` (CogVideoX), and the hooks' current timestep
(`current_timestep_callback`, cachet's `begin_step(i, t)`) is `sigma_i * 1000`. Latents of step `i`
are `x0 + 0.3 a (x1 - x0) + 0.02 n_i` with `a = i / (N - 1)` and seeded Gaussian `x0, x1, n_i`, so the
first-block residuals drift smoothly with some jitter and both cached and computed steps occur.

Scenarios (`main()`): PAB on Flux (skip range 2 and 3, timesteps (100, 800); also with separate
cond/uncond calls) and CogVideoX; FasterCache on CogVideoX (`BFCHW`, uncond rows first, default
ranges); FirstBlockCache on Flux (separate `cond`/`uncond` contexts) and CogVideoX; TaylorSeerCache
on Flux (float32 and bfloat16 factors, order 2, per-context state, skip-predict modules and
`disable_cache_after_step`); DBCache on tiny-flux with the default Flux adapter (F2B1, F1B0, F5B3,
`max_cached_steps` / `max_continuous_cached_steps`, accumulated-diff limit, warm-up interval,
static and dynamic `steps_computation_mask`, TaylorSeer calibrator order 1 / 2 / hidden states,
`enable_separate_cfg` with separate or shared diffs, `cfg_compute_first`, CFG + calibrator), with
one unit per block list (also with per-unit `ParamsModifier`s), and on CogVideoX. Some run two
inferences in a row.

Per scenario `<name>`, in `tests/fixtures/diffusion-cache/`:

* `<name>.json`: `{"model", "method", "config" (cachet's `CacheConfig` JSON), "calls": [{"step",
  "inference" (0, or 1 for the second inference), "timestep" (hooks' 0-1000 value), "context", "inputs" (prefix of the tensors below), "ran"
  (sorted names of the attention layers whose original forward ran, e.g.
  `transformer_blocks.0.attn`: detected by a forward hook on the layer's `to_q`; for block-level
  methods a block ran iff its attention did), "batch" (batch the transformer body really ran on,
  seen by a pre-hook on the patch embedder: FasterCache's skipped unconditional branch halves it),
  "fbcache_diff" (FirstBlockCache's measured diff, when measured)}], "dbcache" (cache-dit context
  per unit: `cached_steps`, `residual_diffs` (step -> diff), `cfg_cached_steps`,
  `cfg_residual_diffs`)}`.
* `<name>.safetensors` (float32): `in.<k>.hidden_states`, `in.<k>.encoder_hidden_states`,
  `in.<k>.pooled_projections`, `in.<k>.timestep`, `in.<k>.img_ids`, `in.<k>.txt_ids` (Flux) or
  `in.<k>.hidden_states`, `in.<k>.encoder_hidden_states`, `in.<k>.timestep` (CogVideoX) for each
  distinct input set `k`, and `out.<c>` the output of model call `c`.

Step counting, learnt here: cache-dit counts transformer forward calls per context
(`mark_step_begin` after the Fn blocks) and derives the step from them (pairs of calls with
`enable_separate_cfg`); diffusers' FBCache/TaylorSeer keep state per `cache_context(name)` and count
calls per context, PAB/FasterCache count calls per attention layer and read the timestep from
`current_timestep_callback`.

Outputs are byte-reproducible (fixed seeds, deterministic algorithms, sorted JSON and safetensors).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS", "1")
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")

import torch  # noqa: E402
from goldens_lib.safetensors_writer import save_file  # noqa: E402

import diffusers  # noqa: E402
from diffusers import CogVideoXTransformer3DModel, FluxTransformer2DModel  # noqa: E402
from diffusers.hooks import (  # noqa: E402
    FasterCacheConfig,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks import first_block_cache as fbc_module  # noqa: E402

import cache_dit  # noqa: E402
from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, ParamsModifier, TaylorSeerCalibratorConfig  # noqa: E402

BASE_SEED = 20251125
STEPS = 10
DRIFT = 0.3
NOISE = 0.02
OUT = Path("tests/fixtures/diffusion-cache")

torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

assert diffusers.__version__ == "0.42.1", diffusers.__version__


def schedule() -> list[tuple[float, float]]:
    """(sigma, hooks' timestep) per step: FlowMatchEuler with shift 1."""
    n = STEPS
    out = []
    for i in range(n):
        s = 1.0 + (1.0 / n - 1.0) * i / (n - 1.0)
        out.append((s, s * 1000.0))
    return out


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float32)


def latents(shape, seed: int) -> list[torch.Tensor]:
    x0, x1 = randn(shape, seed), randn(shape, seed + 1)
    out = []
    for i in range(STEPS):
        a = i / (STEPS - 1)
        out.append(x0 + DRIFT * a * (x1 - x0) + NOISE * randn(shape, seed + 100 + i))
    return out


# ---------------------------------------------------------------------------------------------
# models and inputs


def load(model: str):
    if model == "flux":
        m = FluxTransformer2DModel.from_pretrained("tests/fixtures/flux", torch_dtype=torch.float32)
    elif model == "tiny-flux":
        m = FluxTransformer2DModel.from_pretrained(
            "crates/cachet-diffusion/assets/tiny-flux", torch_dtype=torch.float32
        )
    elif model == "cogvideox":
        m = CogVideoXTransformer3DModel.from_pretrained("tests/fixtures/cogvideox", torch_dtype=torch.float32)
    else:
        raise ValueError(model)
    return m.eval()


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


class Inputs:
    """Per-step inputs: `sets[k]` is a dict of tensors, `call_inputs(step, context)` its key."""

    def __init__(self, model_name: str, model, batch: int, seed: int, contexts: list[str]):
        self.model_name = model_name
        self.sets: dict[str, dict[str, torch.Tensor]] = {}
        cfg = model.config
        sched = schedule()
        if model_name in ("flux", "tiny-flux"):
            c_in, j, p = cfg.in_channels, cfg.joint_attention_dim, cfg.pooled_projection_dim
            lat = latents((batch, 16, c_in), seed)
            cond = {
                ctx: (randn((batch, 5, j), seed + 10 + 2 * n), randn((batch, p), seed + 11 + 2 * n))
                for n, ctx in enumerate(contexts)
            }
            for i in range(STEPS):
                for ctx in contexts:
                    enc, pooled = cond[ctx]
                    self.sets[f"{i}.{ctx}"] = {
                        "hidden_states": lat[i],
                        "encoder_hidden_states": enc,
                        "pooled_projections": pooled,
                        "timestep": torch.full((batch,), sched[i][0], dtype=torch.float32),
                        "img_ids": image_ids(4, 4),
                        "txt_ids": torch.zeros(5, 3),
                    }
        else:
            frames, c = 2, cfg.in_channels
            lat = latents((batch, frames, c, 8, 8), seed)
            enc = randn((batch, cfg.max_text_seq_length, cfg.text_embed_dim), seed + 10)
            for i in range(STEPS):
                for ctx in contexts:
                    self.sets[f"{i}.{ctx}"] = {
                        "hidden_states": lat[i],
                        "encoder_hidden_states": enc,
                        "timestep": torch.full((batch,), sched[i][1], dtype=torch.float32),
                    }

    def call(self, model, key: str) -> torch.Tensor:
        t = self.sets[key]
        with torch.no_grad():
            if self.model_name in ("flux", "tiny-flux"):
                return model(
                    hidden_states=t["hidden_states"],
                    encoder_hidden_states=t["encoder_hidden_states"],
                    pooled_projections=t["pooled_projections"],
                    timestep=t["timestep"],
                    img_ids=t["img_ids"],
                    txt_ids=t["txt_ids"],
                    return_dict=False,
                )[0]
            return model(
                hidden_states=t["hidden_states"],
                encoder_hidden_states=t["encoder_hidden_states"],
                timestep=t["timestep"],
                return_dict=False,
            )[0]


class Recorder:
    """Forward hooks on every attention layer's `to_q`: which layers ran their original forward."""

    def __init__(self, model):
        self.ran: list[str] = []
        self.batch: int | None = None
        for name, module in model.named_modules():
            if name.endswith((".attn", ".attn1")) and hasattr(module, "to_q"):
                module.to_q.register_forward_hook(self._hook(name))
        embedder = model.x_embedder if hasattr(model, "x_embedder") else model.patch_embed
        embedder.register_forward_pre_hook(self._batch)

    def _batch(self, _module, args):
        self.batch = int(args[0].shape[0])

    def _hook(self, name):
        def hook(_module, _args, _output):
            self.ran.append(name)

        return hook

    def take(self):
        ran, batch = sorted(self.ran), self.batch
        self.ran, self.batch = [], None
        return ran, batch


FBC_DIFFS: list[float] = []
_original_should_compute = fbc_module.FBCHeadBlockHook._should_compute_remaining_blocks


def _recording_should_compute(self, residual):
    state = self.state_manager.get_state()
    if state.head_block_residual is not None:
        prev = state.head_block_residual
        diff = ((residual - prev).abs().mean() / prev.abs().mean()).item()
        FBC_DIFFS.append(diff)
    return _original_should_compute(self, residual)


fbc_module.FBCHeadBlockHook._should_compute_remaining_blocks = _recording_should_compute


# ---------------------------------------------------------------------------------------------
# scenarios


class Clock:
    """What `current_timestep_callback` reads: the loop's current timestep (0-1000)."""

    t = 1000.0

    def __call__(self) -> float:
        return self.t


def run_scenario(name: str, model_name: str, method: str, config: dict, attach, contexts, batch=1, inferences=1, seed=0):
    model = load(model_name)
    clock = Clock()
    state = attach(model, clock)
    recorder = Recorder(model)
    inputs = Inputs(model_name, model, batch, BASE_SEED + seed, contexts)
    sched = schedule()
    calls, tensors = [], {}
    for key, t in inputs.sets.items():
        for k, v in t.items():
            tensors[f"in.{key}.{k}"] = v
    for inference in range(inferences):
        if inference > 0:
            reset_between_inferences(model, method)
        for i in range(STEPS):
            clock.t = sched[i][1]
            for ctx in contexts:
                key = f"{i}.{ctx}"
                FBC_DIFFS.clear()
                if method in ("fbcache", "taylorseer"):
                    with model.cache_context(ctx):
                        out = inputs.call(model, key)
                else:
                    out = inputs.call(model, key)
                ran, ran_batch = recorder.take()
                call = {
                    "inference": inference,
                    "step": i,
                    "timestep": sched[i][1],
                    "context": ctx,
                    "inputs": key,
                    "ran": ran,
                    "batch": ran_batch,
                }
                if FBC_DIFFS:
                    call["fbcache_diff"] = FBC_DIFFS[0]
                tensors[f"out.{len(calls)}"] = out.detach().clone()
                calls.append(call)
    record = {"model": model_name, "method": method, "config": config, "calls": calls}
    if method == "dbcache":
        record["dbcache"] = dbcache_stats(model)
    summary = " ".join(
        f"{c['step']}{c['context'][0]}:{len(c['ran'])}" + (f"/b{c['batch']}" if method == "fastercache" else "")
        for c in calls
    )
    print(f"{name}: {summary}")
    if method == "dbcache":
        for unit in record["dbcache"]:
            print(f"  cached {unit['cached_steps']} cfg {unit['cfg_cached_steps']}")
            print(f"  cfg diffs {unit['cfg_residual_diffs']}")
            print(f"  diffs {unit['residual_diffs']}")
    if method == "fbcache":
        print("  diffs", [round(c.get("fbcache_diff", -1), 4) for c in calls])
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUT / f"{name}.safetensors", {"generator": "xtask/goldens/diffusion_cache.py"})
    with open(OUT / f"{name}.json", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    del state


def reset_between_inferences(model, method: str) -> None:
    """What a pipeline does between two inferences (cachet: `CacheHooks::reset`).

    diffusers: `reset_stateful_hooks` (pipelines reach it through `maybe_free_model_hooks`).
    cache-dit on a bare transformer keeps one persistent context per unit; we recreate it with
    `cache_dit.refresh_context(transformer)`. Its automatic refresh (once `num_inference_steps`
    steps were counted) is checked in `set_context` *before* `mark_step_begin` counts the call, so
    it fires one call late: the first call of the next inference still runs as step N of the old
    context (it may even reuse the old cache), and the new inference's steps are shifted by one.
    """
    if method == "dbcache":
        cache_dit.refresh_context(model)
    else:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)


def dbcache_stats(model) -> list[dict]:
    manager = model._context_manager
    units = []
    for name in model._context_names:
        ctx = manager.get_context(name)
        units.append(
            {
                "cached_steps": list(ctx.get_cached_steps()),
                "residual_diffs": {k: float(v) for k, v in ctx.get_residual_diffs().items()},
                "cfg_cached_steps": list(ctx.get_cfg_cached_steps()),
                "cfg_residual_diffs": {k: float(v) for k, v in ctx.get_cfg_residual_diffs().items()},
            }
        )
    return units


def pab(skip: int, cogvideox: bool = False):
    config = {
        "method": "pab",
        "spatial_attention_block_skip_range": skip,
        "spatial_attention_timestep_skip_range": [100.0, 800.0],
    }

    def attach(model, clock):
        apply_pyramid_attention_broadcast(
            model,
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=skip,
                spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=clock,
            ),
        )

    return config, attach


def faster_cache():
    config = {
        "method": "fastercache",
        "spatial_attention_block_skip_range": 2,
        "spatial_attention_timestep_skip_range": [-1.0, 681.0],
        "unconditional_batch_skip_range": 5,
        "unconditional_batch_timestep_skip_range": [-1.0, 641.0],
        "low_frequency_weight_update_timestep_range": [99.0, 901.0],
        "high_frequency_weight_update_timestep_range": [-1.0, 301.0],
        "alpha_low_frequency": 1.1,
        "alpha_high_frequency": 1.1,
        "attention_weight": 0.5,
        "tensor_format": "BFCHW",
    }

    def attach(model, clock):
        apply_faster_cache(
            model,
            FasterCacheConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(-1, 681),
                unconditional_batch_skip_range=5,
                unconditional_batch_timestep_skip_range=(-1, 641),
                low_frequency_weight_update_timestep_range=(99, 901),
                high_frequency_weight_update_timestep_range=(-1, 301),
                alpha_low_frequency=1.1,
                alpha_high_frequency=1.1,
                attention_weight_callback=lambda _: 0.5,
                tensor_format="BFCHW",
                current_timestep_callback=clock,
            ),
        )

    return config, attach


def fbcache(threshold: float):
    config = {"method": "fbcache", "threshold": threshold}

    def attach(model, clock):
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))

    return config, attach


def taylorseer(interval: int, dtype: str, order: int = 1, skip: list[str] | None = None, after: int | None = None):
    config = {
        "method": "taylorseer",
        "cache_interval": interval,
        "disable_cache_before_step": 2,
        "max_order": order,
        "taylor_factors_dtype": dtype,
    }
    if skip is not None:
        config["skip_predict_identifiers"] = skip
    if after is not None:
        config["disable_cache_after_step"] = after

    def attach(model, clock):
        apply_taylorseer_cache(
            model,
            TaylorSeerCacheConfig(
                cache_interval=interval,
                disable_cache_before_step=2,
                disable_cache_after_step=after,
                max_order=order,
                taylor_factors_dtype=getattr(torch, dtype),
                skip_predict_identifiers=skip,
            ),
        )

    return config, attach


def dbcache(calibrator: dict | None = None, adapter: str = "flux", modifiers: list[dict] | None = None, **cache):
    """cache-dit DBCache. `adapter`: `flux` (cache-dit's default Flux adapter: both block lists
    concatenated into one unit, `CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS=1`), `flux_per_list` (one unit
    per block list, as with `CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS=0`) or `cogvideox` (Pattern_0)."""
    cache = {
        "Fn_compute_blocks": 2,
        "Bn_compute_blocks": 1,
        "max_warmup_steps": 2,
        "residual_diff_threshold": 0.1,
        "num_inference_steps": STEPS,
        **cache,
    }
    config = {"method": "dbcache", "cache_config": cache}
    if calibrator is not None:
        config["calibrator_config"] = calibrator
    if adapter == "flux_per_list":
        config["adapter"] = {"blocks": [["transformer_blocks"], ["single_transformer_blocks"]]}
        if modifiers is not None:
            config["adapter"]["params_modifiers"] = modifiers

    def attach(model, clock):
        if adapter == "flux":
            block_adapter = BlockAdapter(
                transformer=model,
                blocks=model.transformer_blocks + model.single_transformer_blocks,
                blocks_name="transformer_blocks",
                dummy_blocks_names=["single_transformer_blocks"],
                forward_pattern=ForwardPattern.Pattern_1,
                **_flux_patch(),
            )
        elif adapter == "flux_per_list":
            block_adapter = BlockAdapter(
                transformer=model,
                blocks=[model.transformer_blocks, model.single_transformer_blocks],
                forward_pattern=[ForwardPattern.Pattern_1, ForwardPattern.Pattern_1],
                check_forward_pattern=True,
                # `reset` empties the config first, so only the given fields override the base.
                params_modifiers=(
                    [ParamsModifier(cache_config=DBCacheConfig().reset(**m)) for m in modifiers]
                    if modifiers is not None
                    else None
                ),
            )
        else:
            block_adapter = BlockAdapter(
                transformer=model,
                blocks=model.transformer_blocks,
                forward_pattern=ForwardPattern.Pattern_0,
            )
        cache_dit.enable_cache(
            block_adapter,
            cache_config=DBCacheConfig(**cache),
            calibrator_config=(TaylorSeerCalibratorConfig(**calibrator) if calibrator is not None else None),
        )

    return config, attach


def _flux_patch() -> dict:
    from cache_dit.caching.patch_functors import FluxPatchFunctor

    return {"patch_functor": FluxPatchFunctor()}


def main() -> int:
    scenarios = {}
    scenarios["pab_flux_r2"] = ("flux", "pab", *pab(2), ["cond"], 1)
    scenarios["pab_flux_r3"] = ("flux", "pab", *pab(3), ["cond"], 1, 2)
    scenarios["pab_cogvideox"] = ("cogvideox", "pab", *pab(2), ["cond_uncond"], 2)
    scenarios["fastercache_cogvideox"] = ("cogvideox", "fastercache", *faster_cache(), ["cond_uncond"], 2)
    scenarios["fbcache_flux"] = ("flux", "fbcache", *fbcache(FBC_THRESHOLD), ["cond", "uncond"], 1, 2)
    scenarios["taylorseer_flux_f32"] = ("flux", "taylorseer", *taylorseer(2, "float32"), ["cond"], 1, 2)
    scenarios["taylorseer_flux_bf16"] = ("flux", "taylorseer", *taylorseer(3, "bfloat16"), ["cond"], 1)
    scenarios["taylorseer_flux_order2"] = ("flux", "taylorseer", *taylorseer(3, "float32", 2), ["cond"], 1)
    scenarios["dbcache_tiny_flux"] = ("tiny-flux", "dbcache", *dbcache(residual_diff_threshold=DB_THRESHOLD), ["cond"], 1, 2)
    scenarios["dbcache_f1b0"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=DB_THRESHOLD),
        ["cond"],
        1,
    )
    scenarios["dbcache_f5b3"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(Fn_compute_blocks=5, Bn_compute_blocks=3, residual_diff_threshold=DB_THRESHOLD),
        ["cond"],
        1,
    )
    scenarios["dbcache_limits"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(residual_diff_threshold=DB_HIGH, max_cached_steps=3, max_continuous_cached_steps=1),
        ["cond"],
        1,
    )
    mask = [1, 1, 1, 0, 0, 1, 0, 0, 0, 1]
    scenarios["dbcache_mask_static"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(residual_diff_threshold=DB_THRESHOLD, steps_computation_mask=mask, steps_computation_policy="static"),
        ["cond"],
        1,
    )
    scenarios["dbcache_mask_dynamic"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(residual_diff_threshold=DB_THRESHOLD, steps_computation_mask=mask, steps_computation_policy="dynamic"),
        ["cond"],
        1,
    )
    for order in (1, 2):
        scenarios[f"dbcache_taylorseer_o{order}"] = (
            "tiny-flux",
            "dbcache",
            *dbcache(
                {"enable_calibrator": True, "enable_encoder_calibrator": True, "taylorseer_order": order},
                residual_diff_threshold=DB_HIGH,
                max_continuous_cached_steps=2,
            ),
            ["cond"],
            1,
        )
    scenarios["dbcache_separate_cfg"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(residual_diff_threshold=DB_CFG_THRESHOLD, enable_separate_cfg=True),
        ["cond", "uncond"],
        1,
        2,
    )
    scenarios["dbcache_separate_cfg_shared_diff"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(
            residual_diff_threshold=DB_CFG_THRESHOLD,
            enable_separate_cfg=True,
            cfg_diff_compute_separate=False,
        ),
        ["cond", "uncond"],
        1,
    )
    scenarios["pab_flux_cond_uncond_calls"] = ("flux", "pab", *pab(2), ["cond", "uncond"], 1)
    scenarios["taylorseer_flux_cond_uncond"] = (
        "flux",
        "taylorseer",
        *taylorseer(2, "float32"),
        ["cond", "uncond"],
        1,
    )
    scenarios["taylorseer_flux_skip_predict"] = (
        "flux",
        "taylorseer",
        *taylorseer(3, "float32", skip=["single_transformer_blocks\\.1\\.attn"], after=8),
        ["cond"],
        1,
    )
    scenarios["fbcache_cogvideox"] = ("cogvideox", "fbcache", *fbcache(FBC_COG_THRESHOLD), ["cond_uncond"], 2)
    scenarios["dbcache_cogvideox"] = (
        "cogvideox",
        "dbcache",
        *dbcache(adapter="cogvideox", Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=DB_COG_THRESHOLD),
        ["cond_uncond"],
        2,
    )
    scenarios["dbcache_flux_per_list"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(adapter="flux_per_list", Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=DB_THRESHOLD),
        ["cond"],
        1,
        2,
    )
    scenarios["dbcache_params_modifiers"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(
            adapter="flux_per_list",
            modifiers=[
                {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0},
                {"Fn_compute_blocks": 2, "Bn_compute_blocks": 2, "residual_diff_threshold": DB_HIGH},
            ],
            Fn_compute_blocks=1,
            Bn_compute_blocks=1,
            residual_diff_threshold=DB_THRESHOLD,
        ),
        ["cond"],
        1,
    )
    scenarios["dbcache_accumulated_diff_limit"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(residual_diff_threshold=DB_HIGH, max_accumulated_residual_diff_threshold=3.0),
        ["cond"],
        1,
    )
    scenarios["dbcache_warmup_interval"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(residual_diff_threshold=DB_HIGH, max_warmup_steps=5, warmup_interval=2),
        ["cond"],
        1,
    )
    scenarios["dbcache_taylorseer_hidden_states"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(
            {
                "enable_calibrator": True,
                "enable_encoder_calibrator": True,
                "taylorseer_order": 1,
                "calibrator_cache_type": "hidden_states",
            },
            residual_diff_threshold=DB_HIGH,
            max_continuous_cached_steps=2,
        ),
        ["cond"],
        1,
    )
    scenarios["dbcache_separate_cfg_taylorseer"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(
            {"enable_calibrator": True, "enable_encoder_calibrator": False, "taylorseer_order": 2},
            residual_diff_threshold=DB_HIGH,
            enable_separate_cfg=True,
            max_continuous_cached_steps=2,
        ),
        ["cond", "uncond"],
        1,
    )
    scenarios["dbcache_cfg_compute_first"] = (
        "tiny-flux",
        "dbcache",
        *dbcache(
            residual_diff_threshold=DB_CFG_THRESHOLD,
            enable_separate_cfg=True,
            cfg_compute_first=True,
            cfg_diff_compute_separate=False,
        ),
        ["uncond", "cond"],
        1,
    )
    only = sys.argv[1:]
    for name, (model, method, config, attach, contexts, batch, *rest) in scenarios.items():
        if only and name not in only:
            continue
        inferences = rest[0] if rest else 1
        run_scenario(name, model, method, config, attach, contexts, batch=batch, inferences=inferences)
    return 0


FBC_THRESHOLD = 0.8
DB_THRESHOLD = 0.6
DB_HIGH = 0.9
DB_CFG_THRESHOLD = 0.72
FBC_COG_THRESHOLD = 0.1
DB_COG_THRESHOLD = 0.1

if __name__ == "__main__":
    sys.exit(main())
