#!/usr/bin/env python3
"""Golden generator for the newer diffusion-cache methods of `cachet-diffusion`: decision parity.

Drives diffusers 0.42.1's `MagCacheConfig` (with its calibration mode) and `TextKVCacheConfig`, and
cache-dit 1.5.3's FoCa and DMD calibrators (inside DBCache) and DBPrune (dynamic block pruning) on
Flux and CogVideoX checkpoints with fixed per-step inputs, and records, for every model call, which
blocks ran their original forward, the methods' state (MagCache's calibrated ratios, cache-dit's
context statistics) and the outputs. `tests/tests/diffusion_methods_parity.rs` replays the calls
through `cachet_diffusion::CacheHooks` and asserts the same decisions and close outputs.

Checkpoints are read, not written. `--model NAME=DIR` adds or replaces one; by default:

* `flux`       `tests/fixtures/flux/` (2 double + 2 single blocks, random weights)
* `tiny-flux`  `crates/cachet-diffusion/assets/tiny-flux/` (4 double + 8 single blocks, random)
* `cogvideox`  `tests/fixtures/cogvideox/` (2 blocks, `[B, F=2, C=4, 8, 8]` latents)
* `digits-flux` `crates/cachet-diffusion/assets/digits-flux/` (the trained demo model), only when
  that folder exists and loads; its scenarios then run too.

Inputs. Random-weight models (`drift` inputs): latents of step `i` are `x0 + 0.3 a (x1 - x0) +
0.02 n_i` with `a = i / (N - 1)` and seeded Gaussian `x0, x1, n_i`, with seeded text conditioning
(as `diffusion_cache.py`). Trained model (`trajectory` inputs): the `cond` context is digit
`LABEL`'s learned conditioning and `uncond` the null label's (the folder's `labels.safetensors`,
`digits.json`), and the latents are those of an uncached flow-matching Euler run of the model
itself with classifier-free guidance at the folder's guidance scale, from seeded noise, so
features evolve as in a real denoising loop; every call still gets fixed, recorded inputs. Step
schedule: FlowMatchEuler with shift 1 (`sigma_i = 1 + (1/N - 1) i / (N - 1)`); Flux takes
`sigma_i` as its timestep, CogVideoX `1000 sigma_i`; the hooks' timestep is `1000 sigma_i`.

Scenarios (`main()`):

* MagCache (diffusers): Flux's published ratios interpolated to the step count (nearest, as
  `nearest_interp`), thresholds that skip some steps, `max_skip_steps`, separate `cond`/`uncond`
  contexts over two inferences (the state wraps at `num_inference_steps`), CogVideoX (Pattern 0,
  batched CFG); calibration mode (ratios recorded per step), and a run with the ratios that the
  calibration run produced.
* TextKV (diffusers): `apply_text_kv_cache` hooks NucleusMoE-Image blocks only; on Flux it hooks no
  block. `textkv_flux.json` records that, and how much each double-stream block's text keys/values
  change from one step to the next (they depend on the timestep embedding), which is why caching
  them is not lossless on Flux.
* DBCache with the FoCa and DMD calibrators (cache-dit), residual and hidden-state streams,
  separate CFG, and enough computed steps that DMD's exponential fit engages (>= 4 uniformly
  spaced snapshots) as well as its Taylor fallback.
* DBPrune (cache-dit): fixed and dynamic thresholds, `non_prune_block_ids`, Fn/Bn, cached-step
  limits, separate CFG, one unit per block list, TaylorSeer and FoCa calibrators (the latter with
  `force_reduce_calibrator_vram`), CogVideoX.
* On the trained model, 28 steps with separate cond / uncond calls: MagCache with the ratios its
  calibration measures (and the calibration itself), DBCache + FoCa, DBCache + DMD and DBPrune at
  cache-dit's documented thresholds (0.12) and warm-up (8 steps), with `enable_separate_cfg`.

Per scenario `<name>`, in `tests/fixtures/diffusion-cache/`: `<name>.json` (`model`, `model_dir`,
`class`, `method`, `config` (cachet's `CacheConfig` JSON), `calls` as in `diffusion_cache.py`, and
per method: `magcache` (`mag_ratios` after interpolation, `calibration` per context: the ratios the
calibration recorded, in call order), `dbcache` / `dbprune` (cache-dit context statistics per
unit)) and `<name>.safetensors` (float32 `in.<key>.<tensor>` inputs and `out.<c>` outputs).
Outputs are byte-reproducible (fixed seeds, deterministic algorithms, sorted JSON and safetensors).
"""

from __future__ import annotations

import argparse
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
from diffusers.hooks import HookRegistry, MagCacheConfig, TextKVCacheConfig, apply_mag_cache, apply_text_kv_cache  # noqa: E402
from diffusers.hooks import mag_cache as mag_module  # noqa: E402
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS  # noqa: E402

import cache_dit  # noqa: E402
from cache_dit import (  # noqa: E402
    BlockAdapter,
    DBCacheConfig,
    DBPruneConfig,
    DMDCalibratorConfig,
    FoCaCalibratorConfig,
    ForwardPattern,
    TaylorSeerCalibratorConfig,
)

BASE_SEED = 20260214
DRIFT = 0.3
NOISE = 0.02
OUT = Path("tests/fixtures/diffusion-cache")
GENERATOR = "xtask/goldens/diffusion_methods.py"

torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert cache_dit.__version__ == "1.5.3", cache_dit.__version__

MODELS: dict[str, Path] = {
    "flux": Path("tests/fixtures/flux"),
    "tiny-flux": Path("crates/cachet-diffusion/assets/tiny-flux"),
    "cogvideox": Path("tests/fixtures/cogvideox"),
}
TRAINED = {"digits-flux": Path("crates/cachet-diffusion/assets/digits-flux")}


def schedule(steps: int) -> list[tuple[float, float]]:
    """(sigma, hooks' timestep) per step: FlowMatchEuler with shift 1 (cachet's
    `FlowMatchEuler::new(steps, 1.0, None)`)."""
    n = steps
    return [(s, s * 1000.0) for s in (1.0 + (1.0 / n - 1.0) * i / (n - 1.0) for i in range(n))]


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


# ---------------------------------------------------------------------------------------------
# models and inputs


def model_class(path: Path) -> str:
    with open(path / "config.json") as f:
        return json.load(f)["_class_name"]


def load(name: str):
    path = MODELS[name]
    cls = FluxTransformer2DModel if model_class(path) == "FluxTransformer2DModel" else CogVideoXTransformer3DModel
    return cls.from_pretrained(str(path), torch_dtype=torch.float32).eval()


def is_flux(model) -> bool:
    return isinstance(model, FluxTransformer2DModel)


class Inputs:
    """Per-call inputs: `sets[f"{step}.{context}"]` is a dict of tensors.

    `mode`: `drift` (seeded latents drifting from `x0` toward `x1`) or `trajectory` (an uncached
    Euler run of the model from seeded noise: realistic feature dynamics for a trained model)."""

    def __init__(self, model, steps: int, batch: int, seed: int, contexts: list[str], mode: str, model_dir: Path | None = None):
        self.flux = is_flux(model)
        self.sets: dict[str, dict[str, torch.Tensor]] = {}
        cfg = model.config
        sched = schedule(steps)
        if self.flux:
            c_in, j, p = cfg.in_channels, cfg.joint_attention_dim, cfg.pooled_projection_dim
            if mode == "drift":
                side = 4
                cond = {
                    ctx: (randn((batch, 5, j), seed + 10 + 2 * n), randn((batch, p), seed + 11 + 2 * n))
                    for n, ctx in enumerate(contexts)
                }
                x0, x1 = randn((batch, side * side, c_in), seed), randn((batch, side * side, c_in), seed + 1)
                lat = [
                    x0 + DRIFT * (i / (steps - 1)) * (x1 - x0) + NOISE * randn(x0.shape, seed + 100 + i)
                    for i in range(steps)
                ]
            else:
                side, cond, scale = label_conditioning(model_dir, batch)
                noise = randn((batch, side * side, c_in), seed)
                lat = self._trajectory(model, steps, noise, cond, side, scale)
            for i in range(steps):
                for ctx in contexts:
                    enc, pooled = cond[ctx]
                    self.sets[f"{i}.{ctx}"] = {
                        "hidden_states": lat[i],
                        "encoder_hidden_states": enc,
                        "pooled_projections": pooled,
                        "timestep": torch.full((batch,), sched[i][0], dtype=torch.float32),
                        "img_ids": image_ids(side, side),
                        "txt_ids": torch.zeros(enc.shape[1], 3),
                    }
        else:
            frames, c = 2, cfg.in_channels
            shape = (batch, frames, c, 8, 8)
            x0, x1 = randn(shape, seed), randn(shape, seed + 1)
            enc = randn((batch, cfg.max_text_seq_length, cfg.text_embed_dim), seed + 10)
            for i in range(steps):
                lat = x0 + DRIFT * (i / (steps - 1)) * (x1 - x0) + NOISE * randn(shape, seed + 100 + i)
                for ctx in contexts:
                    self.sets[f"{i}.{ctx}"] = {
                        "hidden_states": lat,
                        "encoder_hidden_states": enc,
                        "timestep": torch.full((batch,), sched[i][1], dtype=torch.float32),
                    }

    @staticmethod
    def _trajectory(model, steps, noise, cond, side, scale) -> list[torch.Tensor]:
        """Uncached Euler steps with classifier-free guidance `u + scale (c - u)`."""
        sched = schedule(steps)
        sigmas = [s for s, _ in sched] + [0.0]
        x, out = noise, []

        def velocity(ctx, sigma):
            enc, pooled = cond[ctx]
            with torch.no_grad():
                return model(
                    hidden_states=x,
                    encoder_hidden_states=enc,
                    pooled_projections=pooled,
                    timestep=torch.full((x.shape[0],), sigma),
                    img_ids=image_ids(side, side),
                    txt_ids=torch.zeros(enc.shape[1], 3),
                    return_dict=False,
                )[0]

        for i in range(steps):
            out.append(x.clone())
            c, u = velocity("cond", sigmas[i]), velocity("uncond", sigmas[i])
            x = x + (sigmas[i + 1] - sigmas[i]) * (u + scale * (c - u))
        return out

    def call(self, model, key: str) -> torch.Tensor:
        with torch.no_grad():
            return model(**self.sets[key], return_dict=False)[0]


class Recorder:
    """Forward hooks on every attention layer's `to_q`: a block ran iff its attention did."""

    def __init__(self, model):
        self.ran: list[str] = []
        for name, module in model.named_modules():
            if name.endswith((".attn", ".attn1")) and hasattr(module, "to_q"):
                module.to_q.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(_module, _args, _output):
            self.ran.append(name)

        return hook

    def take(self) -> list[str]:
        ran, self.ran = sorted(self.ran), []
        return ran


LABEL = 3


def label_conditioning(model_dir: Path, batch: int):
    """The trained model's conditioning: `cond` = digit `LABEL`, `uncond` = the null label; the
    packed latent side and the guidance scale, from the folder's `digits.json`."""
    from safetensors.torch import load_file

    with open(model_dir / "digits.json") as f:
        spec = json.load(f)
    labels = load_file(str(model_dir / "labels.safetensors"))
    text, pooled = labels["text_embeddings"].float(), labels["pooled_embeddings"].float()

    def rows(k):
        return text[k : k + 1].repeat(batch, 1, 1), pooled[k : k + 1].repeat(batch, 1)

    side = spec["image_size"] // 4
    return side, {"cond": rows(LABEL), "uncond": rows(spec["null_label"])}, float(spec["guidance_scale"])


# MagCache's calibration ratios, in the order the tail block records them, per context.
CALIBRATION: list[tuple[str, float]] = []
_original_calibration_step = mag_module.MagCacheBlockHook._perform_calibration_step


def _recording_calibration_step(self, state, current_residual):
    before = len(state.calibration_ratios)
    _original_calibration_step(self, state, current_residual)
    assert len(state.calibration_ratios) == before + 1
    CALIBRATION.append((self.state_manager.context.name, float(state.calibration_ratios[-1])))


mag_module.MagCacheBlockHook._perform_calibration_step = _recording_calibration_step


# ---------------------------------------------------------------------------------------------
# scenarios


class Scenario:
    def __init__(self, model: str, method: str, config: dict, attach, contexts, *, steps=10, batch=1, inferences=1, mode="drift", extra=None):
        self.model, self.method, self.config, self.attach = model, method, config, attach
        self.contexts, self.steps, self.batch, self.inferences = contexts, steps, batch, inferences
        self.mode, self.extra = mode, extra


def run_scenario(name: str, sc: Scenario) -> None:
    model = load(sc.model)
    inputs = Inputs(model, sc.steps, sc.batch, BASE_SEED, sc.contexts, sc.mode, MODELS[sc.model])
    state = sc.attach(model)
    recorder = Recorder(model)
    sched = schedule(sc.steps)
    calls, tensors = [], {}
    for key, t in inputs.sets.items():
        for k, v in t.items():
            tensors[f"in.{key}.{k}"] = v
    CALIBRATION.clear()
    for inference in range(sc.inferences):
        if inference > 0:
            reset_between_inferences(model, sc.method)
        for i in range(sc.steps):
            for ctx in sc.contexts:
                key = f"{i}.{ctx}"
                if sc.method == "magcache":
                    with model.cache_context(ctx):
                        out = inputs.call(model, key)
                else:
                    out = inputs.call(model, key)
                call = {
                    "inference": inference,
                    "step": i,
                    "timestep": sched[i][1],
                    "context": ctx,
                    "inputs": key,
                    "ran": recorder.take(),
                }
                tensors[f"out.{len(calls)}"] = out.detach().clone()
                calls.append(call)
    record = {
        "model": sc.model,
        "model_dir": str(MODELS[sc.model]),
        "class": model_class(MODELS[sc.model]),
        "method": sc.method,
        "config": sc.config,
        "calls": calls,
    }
    if sc.method == "magcache":
        record["magcache"] = {
            "mag_ratios": None if state is None else [float(r) for r in state],
            "calibration": [[ctx, r] for ctx, r in CALIBRATION],
        }
    if sc.method in ("dbcache", "dbprune"):
        record[sc.method] = context_stats(model, sc.method)
    summary = " ".join(f"{c['step']}{c['context'][0]}:{len(c['ran'])}" for c in calls)
    print(f"{name}: {summary}")
    if sc.method == "magcache" and CALIBRATION:
        print("  calibration", [round(r, 4) for _, r in CALIBRATION])
    for unit in record.get(sc.method, []) if sc.method in ("dbcache", "dbprune") else []:
        print(f"  cached {unit['cached_steps']} cfg {unit['cfg_cached_steps']}")
        if sc.method == "dbprune":
            print(f"  pruned {unit['pruned_blocks']} cfg {unit['cfg_pruned_blocks']}")
            print("  diffs", {k: [round(x, 3) for x in v] for k, v in unit["residual_diffs"].items()})
        else:
            print("  diffs", {k: round(v, 4) for k, v in unit["residual_diffs"].items()})
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUT / f"{name}.safetensors", {"generator": GENERATOR})
    with open(OUT / f"{name}.json", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


def reset_between_inferences(model, method: str) -> None:
    """What a pipeline does between two inferences (cachet: `CacheHooks::reset`): diffusers'
    `reset_stateful_hooks`, cache-dit's `refresh_context` (see `diffusion_cache.py` for cache-dit's
    automatic refresh, which fires one call late)."""
    if method in ("dbcache", "dbprune"):
        cache_dit.refresh_context(model)
    else:
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)


def context_stats(model, method: str) -> list[dict]:
    manager = model._context_manager
    units = []
    for name in model._context_names:
        ctx = manager.get_context(name)
        unit = {
            "cached_steps": list(ctx.get_cached_steps()),
            "cfg_cached_steps": list(ctx.get_cfg_cached_steps()),
        }
        if method == "dbprune":
            unit["residual_diffs"] = {k: [float(x) for x in v] for k, v in ctx.get_residual_diffs().items()}
            unit["cfg_residual_diffs"] = {k: [float(x) for x in v] for k, v in ctx.get_cfg_residual_diffs().items()}
            unit["pruned_blocks"] = list(ctx.get_pruned_blocks())
            unit["actual_blocks"] = list(ctx.get_actual_blocks())
            unit["cfg_pruned_blocks"] = list(ctx.get_cfg_pruned_blocks())
            unit["cfg_actual_blocks"] = list(ctx.get_cfg_actual_blocks())
        else:
            unit["residual_diffs"] = {k: float(v) for k, v in ctx.get_residual_diffs().items()}
            unit["cfg_residual_diffs"] = {k: float(v) for k, v in ctx.get_cfg_residual_diffs().items()}
        units.append(unit)
    return units


def magcache(ratios: list[float] | None, steps: int, calibrate: bool = False, **options) -> tuple[dict, object]:
    """diffusers' MagCache. The config's `mag_ratios` (after interpolation) is what `attach`
    returns, so the record holds the ratios diffusers used."""
    config = {"method": "magcache", "num_inference_steps": steps, "calibrate": calibrate, **options}
    if ratios is not None:
        config["mag_ratios"] = [float(r) for r in ratios]

    def attach(model):
        mc = MagCacheConfig(
            mag_ratios=None if ratios is None else torch.tensor(ratios),
            num_inference_steps=steps,
            calibrate=calibrate,
            **options,
        )
        apply_mag_cache(model, mc)
        return None if calibrate else mc.mag_ratios.tolist()

    return config, attach


FLUX_RATIOS = [float(r) for r in FLUX_MAG_RATIOS.tolist()]


def calibrated_ratios(model_name: str, steps: int, contexts: list[str], mode: str, batch: int = 1) -> list[float]:
    """The ratios MagCache's calibration mode records on `model_name` (first context)."""
    model = load(model_name)
    inputs = Inputs(model, steps, batch, BASE_SEED, contexts, mode, MODELS[model_name])
    apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    CALIBRATION.clear()
    for i in range(steps):
        for ctx in contexts:
            with model.cache_context(ctx):
                inputs.call(model, f"{i}.{ctx}")
    ratios = [r for ctx, r in CALIBRATION if ctx == contexts[0]]
    CALIBRATION.clear()
    return ratios


def cache_dit_adapter(model, adapter: str) -> BlockAdapter:
    """`flux`: cache-dit's default Flux adapter (both block lists as one unit); `flux_per_list`:
    one unit per block list; `cogvideox`: Pattern_0."""
    if adapter == "flux":
        from cache_dit.caching.patch_functors import FluxPatchFunctor

        return BlockAdapter(
            transformer=model,
            blocks=model.transformer_blocks + model.single_transformer_blocks,
            blocks_name="transformer_blocks",
            dummy_blocks_names=["single_transformer_blocks"],
            forward_pattern=ForwardPattern.Pattern_1,
            patch_functor=FluxPatchFunctor(),
        )
    if adapter == "flux_per_list":
        return BlockAdapter(
            transformer=model,
            blocks=[model.transformer_blocks, model.single_transformer_blocks],
            forward_pattern=[ForwardPattern.Pattern_1, ForwardPattern.Pattern_1],
            check_forward_pattern=True,
        )
    return BlockAdapter(transformer=model, blocks=model.transformer_blocks, forward_pattern=ForwardPattern.Pattern_0)


CALIBRATORS = {"taylorseer": TaylorSeerCalibratorConfig, "foca": FoCaCalibratorConfig, "dmd": DMDCalibratorConfig}


def calibrator_config(calibrator: dict | None):
    if calibrator is None:
        return None
    options = {k: v for k, v in calibrator.items() if k != "calibrator_type"}
    return CALIBRATORS[calibrator["calibrator_type"]](**options)


def dbcache(calibrator: dict | None, steps: int, adapter: str = "flux", **cache) -> tuple[dict, object]:
    cache = {"Fn_compute_blocks": 2, "Bn_compute_blocks": 0, "num_inference_steps": steps, **cache}
    config = {"method": "dbcache", "cache_config": cache}
    if calibrator is not None:
        config["calibrator_config"] = calibrator
    if adapter == "flux_per_list":
        config["adapter"] = {"blocks": [["transformer_blocks"], ["single_transformer_blocks"]]}

    def attach(model):
        cache_dit.enable_cache(
            cache_dit_adapter(model, adapter),
            cache_config=DBCacheConfig(**cache),
            calibrator_config=calibrator_config(calibrator),
        )

    return config, attach


def dbprune(calibrator: dict | None, steps: int, adapter: str = "flux", **cache) -> tuple[dict, object]:
    cache = {"num_inference_steps": steps, **cache}
    config = {"method": "dbprune", "cache_config": cache}
    if calibrator is not None:
        config["calibrator_config"] = calibrator
    if adapter == "flux_per_list":
        config["adapter"] = {"blocks": [["transformer_blocks"], ["single_transformer_blocks"]]}

    def attach(model):
        cache_dit.enable_cache(
            cache_dit_adapter(model, adapter),
            cache_config=DBPruneConfig(**cache),
            calibrator_config=calibrator_config(calibrator),
        )

    return config, attach


def textkv_flux(model_name: str) -> dict:
    """TextKV on Flux: which blocks diffusers hooks, and how much each double-stream block's text
    keys/values move from step to step (relative mean |change|), measured on the uncached model."""
    model = load(model_name)
    apply_text_kv_cache(model, TextKVCacheConfig())
    hooked = sorted(
        name
        for name, module in model.named_modules()
        if getattr(module, "_diffusers_hook", None) is not None
        and module._diffusers_hook.get_hook("text_kv_cache_block") is not None
    )
    steps = 10
    inputs = Inputs(model, steps, 1, BASE_SEED, ["cond"], "drift")
    seen: dict[str, list[torch.Tensor]] = {}
    for b, block in enumerate(model.transformer_blocks):
        for proj in ("add_k_proj", "add_v_proj"):
            layer = getattr(block.attn, proj)
            key = f"transformer_blocks.{b}.attn.{proj}"
            layer.register_forward_hook(lambda _m, _a, out, key=key: seen.setdefault(key, []).append(out.detach().clone()))
    outputs = []
    for i in range(steps):
        with model.cache_context("cond"):
            outputs.append(inputs.call(model, f"{i}.cond"))
    drift = {}
    for key, values in sorted(seen.items()):
        changes = [((b - a).abs().mean() / a.abs().mean()).item() for a, b in zip(values, values[1:])]
        drift[key] = min(changes)
        assert drift[key] > 1e-3, f"{key}: text K/V did not change between steps ({drift[key]})"
    plain = load(model_name)
    same = all(torch.equal(o, inputs.call(plain, f"{i}.cond")) for i, o in enumerate(outputs))
    return {
        "model": model_name,
        "hooked_blocks": hooked,
        "outputs_equal_uncached": same,
        "min_relative_step_change": drift,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR: a checkpoint folder")
    parser.add_argument("only", nargs="*", help="scenario names to (re)generate")
    args = parser.parse_args()
    for spec in args.model:
        name, _, path = spec.partition("=")
        MODELS[name] = Path(path)
    for name, path in TRAINED.items():
        if name not in MODELS and (path / "config.json").exists():
            try:
                load_check = FluxTransformer2DModel.from_pretrained(str(path), torch_dtype=torch.float32)
                del load_check
                MODELS[name] = path
            except Exception as e:  # noqa: BLE001 - a folder being written by its generator
                print(f"skipping {name}: {path} does not load ({e})")

    s: dict[str, Scenario] = {}
    n = 10
    # MagCache: Flux's published ratios interpolated to 10 steps.
    s["magcache_flux"] = Scenario("tiny-flux", "magcache", *magcache(FLUX_RATIOS, n, threshold=0.06), ["cond"])
    s["magcache_flux_threshold"] = Scenario(
        "tiny-flux", "magcache", *magcache(FLUX_RATIOS, n, threshold=0.2, max_skip_steps=2, retention_ratio=0.1), ["cond"]
    )
    s["magcache_flux_cond_uncond"] = Scenario(
        "flux", "magcache", *magcache(FLUX_RATIOS, n, threshold=0.12), ["cond", "uncond"], inferences=2
    )
    s["magcache_cogvideox"] = Scenario(
        "cogvideox", "magcache", *magcache(FLUX_RATIOS, n, threshold=0.1), ["cond_uncond"], batch=2
    )
    s["magcache_calibrate"] = Scenario("tiny-flux", "magcache", *magcache(None, n, calibrate=True), ["cond"], inferences=2)
    s["magcache_calibrate_cogvideox"] = Scenario(
        "cogvideox", "magcache", *magcache(None, n, calibrate=True), ["cond_uncond"], batch=2
    )
    own = calibrated_ratios("tiny-flux", n, ["cond"], "drift")
    s["magcache_calibrated"] = Scenario("tiny-flux", "magcache", *magcache(own, n, threshold=0.5), ["cond"])

    # FoCa and DMD calibrators in DBCache (cache-dit's default Flux adapter).
    foca = {"calibrator_type": "foca"}
    dmd = {"calibrator_type": "dmd"}
    s["dbcache_foca"] = Scenario(
        "tiny-flux", "dbcache", *dbcache(foca, n, residual_diff_threshold=0.9, max_warmup_steps=3, max_continuous_cached_steps=3), ["cond"]
    )
    s["dbcache_foca_long_gap"] = Scenario(
        "tiny-flux", "dbcache", *dbcache(foca, 14, residual_diff_threshold=0.95, max_warmup_steps=3, max_continuous_cached_steps=6), ["cond"], steps=14
    )
    s["dbcache_foca_hidden_states"] = Scenario(
        "tiny-flux",
        "dbcache",
        *dbcache(
            {**foca, "calibrator_cache_type": "hidden_states", "enable_encoder_calibrator": False},
            n,
            residual_diff_threshold=0.9,
            max_warmup_steps=3,
            max_continuous_cached_steps=2,
        ),
        ["cond"],
    )
    s["dbcache_foca_separate_cfg"] = Scenario(
        "tiny-flux",
        "dbcache",
        *dbcache(foca, n, residual_diff_threshold=0.9, max_warmup_steps=3, max_continuous_cached_steps=2, enable_separate_cfg=True),
        ["cond", "uncond"],
        inferences=2,
    )
    mask = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0]
    s["dbcache_dmd"] = Scenario(
        "tiny-flux",
        "dbcache",
        *dbcache(dmd, 14, residual_diff_threshold=0.9, max_warmup_steps=6, steps_computation_mask=mask, steps_computation_policy="static"),
        ["cond"],
        steps=14,
    )
    s["dbcache_dmd_history4_rank2"] = Scenario(
        "tiny-flux",
        "dbcache",
        *dbcache(
            {**dmd, "dmd_history": 4, "dmd_rank": 2, "dmd_ridge": 1e-6},
            14,
            residual_diff_threshold=0.9,
            max_warmup_steps=5,
            max_continuous_cached_steps=2,
        ),
        ["cond"],
        steps=14,
    )
    s["dbcache_dmd_taylor_fallback"] = Scenario(
        "tiny-flux",
        "dbcache",
        *dbcache(dmd, n, residual_diff_threshold=0.9, max_warmup_steps=2, max_continuous_cached_steps=2),
        ["cond"],
    )
    s["dbcache_dmd_hidden_states_cfg"] = Scenario(
        "flux",
        "dbcache",
        *dbcache(
            {**dmd, "calibrator_cache_type": "hidden_states", "dmd_history": 5},
            14,
            adapter="flux_per_list",
            Fn_compute_blocks=1,
            residual_diff_threshold=0.9,
            max_warmup_steps=5,
            max_continuous_cached_steps=2,
            enable_separate_cfg=True,
        ),
        ["cond", "uncond"],
        steps=14,
    )

    # DBPrune.
    s["dbprune_flux"] = Scenario(
        "tiny-flux", "dbprune", *dbprune(None, n, Fn_compute_blocks=1, residual_diff_threshold=0.35, max_warmup_steps=2), ["cond"], inferences=2
    )
    s["dbprune_dynamic_threshold"] = Scenario(
        "tiny-flux",
        "dbprune",
        *dbprune(
            None,
            n,
            Fn_compute_blocks=1,
            Bn_compute_blocks=1,
            residual_diff_threshold=0.2,
            max_warmup_steps=2,
            enable_dynamic_prune_threshold=True,
            non_prune_block_ids=[5, 6],
        ),
        ["cond"],
    )
    s["dbprune_dynamic_max"] = Scenario(
        "tiny-flux",
        "dbprune",
        *dbprune(
            None,
            n,
            Fn_compute_blocks=2,
            residual_diff_threshold=0.25,
            max_warmup_steps=2,
            enable_dynamic_prune_threshold=True,
            max_dynamic_prune_threshold=0.5,
            dynamic_prune_threshold_relax_ratio=1.5,
        ),
        ["cond"],
    )
    s["dbprune_limits"] = Scenario(
        "tiny-flux",
        "dbprune",
        *dbprune(None, n, Fn_compute_blocks=1, residual_diff_threshold=0.3, max_warmup_steps=1, max_cached_steps=4, max_continuous_cached_steps=1),
        ["cond"],
    )
    s["dbprune_separate_cfg"] = Scenario(
        "tiny-flux",
        "dbprune",
        *dbprune(None, n, Fn_compute_blocks=1, residual_diff_threshold=0.35, max_warmup_steps=2, enable_separate_cfg=True),
        ["cond", "uncond"],
    )
    s["dbprune_per_list"] = Scenario(
        "tiny-flux",
        "dbprune",
        *dbprune(None, n, adapter="flux_per_list", Fn_compute_blocks=1, residual_diff_threshold=0.35, max_warmup_steps=2),
        ["cond"],
    )
    s["dbprune_taylorseer"] = Scenario(
        "tiny-flux",
        "dbprune",
        *dbprune(
            {"calibrator_type": "taylorseer", "taylorseer_order": 1},
            n,
            Fn_compute_blocks=1,
            residual_diff_threshold=0.35,
            max_warmup_steps=3,
            max_continuous_cached_steps=2,
        ),
        ["cond"],
    )
    s["dbprune_foca_reduced_vram"] = Scenario(
        "tiny-flux",
        "dbprune",
        *dbprune(
            foca,
            n,
            Fn_compute_blocks=1,
            residual_diff_threshold=0.35,
            max_warmup_steps=3,
            max_continuous_cached_steps=2,
            force_reduce_calibrator_vram=True,
        ),
        ["cond"],
    )
    s["dbprune_cogvideox"] = Scenario(
        "cogvideox",
        "dbprune",
        *dbprune(None, n, adapter="cogvideox", Fn_compute_blocks=1, residual_diff_threshold=0.3, max_warmup_steps=2),
        ["cond_uncond"],
        batch=2,
    )

    if "digits-flux" in MODELS:
        # The trained model, 28 steps, separate cond / uncond calls of a guided trajectory, at the
        # methods' documented defaults (thresholds, warm-up, Fn).
        t, cu = "trajectory", ["cond", "uncond"]
        trained = calibrated_ratios("digits-flux", 28, cu, t)
        s["magcache_digits"] = Scenario("digits-flux", "magcache", *magcache(trained, 28), cu, steps=28, mode=t)
        s["magcache_calibrate_digits"] = Scenario("digits-flux", "magcache", *magcache(None, 28, calibrate=True), cu, steps=28, mode=t)
        fixed = {"max_warmup_steps": 8, "enable_separate_cfg": True}
        s["dbcache_foca_digits"] = Scenario(
            "digits-flux", "dbcache", *dbcache(foca, 28, Fn_compute_blocks=1, residual_diff_threshold=0.12, **fixed), cu, steps=28, mode=t
        )
        s["dbcache_dmd_digits"] = Scenario(
            "digits-flux", "dbcache", *dbcache(dmd, 28, Fn_compute_blocks=1, residual_diff_threshold=0.12, **fixed), cu, steps=28, mode=t
        )
        s["dbprune_digits"] = Scenario(
            "digits-flux", "dbprune", *dbprune(None, 28, Fn_compute_blocks=1, residual_diff_threshold=0.12, **fixed), cu, steps=28, mode=t
        )

    for name, sc in s.items():
        if args.only and name not in args.only:
            continue
        run_scenario(name, sc)
    if not args.only or "textkv_flux" in args.only:
        record = textkv_flux("tiny-flux")
        print("textkv_flux:", json.dumps(record["min_relative_step_change"]))
        with open(OUT / "textkv_flux.json", "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
