#!/usr/bin/env python3
"""Golden generator for cachet's Flux MMDiT (`cachet_diffusion::models::FluxTransformer`).

Builds tiny, randomly initialised `FluxTransformer2DModel`s with diffusers 0.42.1 (no Hub access:
every model is built from its constructor arguments under a fixed seed), writes each with
`save_pretrained` as `config.json` + `diffusion_pytorch_model.safetensors`, and writes inputs and
the output of `forward` to `reference.safetensors` next to them.

Run from the workspace root with the pinned venv (`cargo xtask goldens`); CI never runs it, the
outputs are committed. Outputs:

* `tests/fixtures/flux/`           2 double + 2 single blocks, 2 heads x 16, in_channels 16,
                                   joint_attention_dim 32, pooled 24, axes_dims_rope (4, 6, 6)
* `tests/fixtures/flux-guidance/`  the same shape with `guidance_embeds=True` (Flux-dev style)
* `crates/cachet-diffusion/assets/tiny-flux/`  demo model embedded in the crate: 4 double + 8 single
                                   blocks, 2 heads x 24, in_channels 64 (16 latent channels packed
                                   2x2 like FluxPipeline), weights stored in bf16; its reference is
                                   computed in f32 from the same bf16-rounded values.

Every parameter is re-drawn under the seed (weights N(0, 1/fan_in), biases N(0, 0.1^2), RMSNorm
scales 1 + N(0, 0.1^2)) so no weight is trivially zero or one and the adaLN modulations matter.

Test vectors (float32), per fixture, for case `a` (and `b`, fixtures only):

* `a.hidden_states` [2, 16, C_in] (a 4x4 packed latent grid), `a.encoder_hidden_states` [2, 5, J],
  `a.pooled_projections` [2, P], `a.timestep` [2] in [0, 1] (the model scales it by 1000, as
  FluxPipeline passes `t / 1000`), `a.guidance` [2] (guidance variant only),
  `a.img_ids` [16, 3] built exactly like `FluxPipeline._prepare_latent_image_ids(4, 4)`,
  `a.txt_ids` [5, 3] zeros (as the pipeline), `a.output` [2, 16, C_out] = `forward(...).sample`.
* `b.*`: batch 1, a 2x4 grid (8 image tokens) whose ids carry index 1 on axis 0 (as Kontext marks a
  condition image), 3 text tokens with non-zero ids, so all three RoPE axes are exercised.

Checks (the script aborts and leaves previous outputs in place if one fails): reloading the
written directory with `from_pretrained` reproduces the outputs bit for bit, and a second forward
is bit-identical. Outputs are byte-reproducible (fixed seeds, deterministic algorithms, sorted
safetensors headers).
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

import diffusers
import numpy as np
import safetensors
import torch
from diffusers import FluxTransformer2DModel
from goldens_lib.safetensors_writer import save_file

BASE_SEED = 20251124
BIAS_STD = 0.1
NORM_NOISE = 0.1

torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

FIXTURE = dict(
    patch_size=1,
    in_channels=16,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)

DEMO = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=24,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 10, 10),
)


def log(msg: str) -> None:
    print(msg, flush=True)


def reinit_(model: torch.nn.Module, seed: int, round_to_bf16: bool) -> None:
    """Re-draws every parameter under `seed` (see the module docstring for the scales)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                new = BIAS_STD * torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:
                # RMSNorm scales (norm_q, norm_k, norm_added_q, norm_added_k).
                new = 1.0 + NORM_NOISE * torch.randn(p.shape, generator=gen)
            else:
                new = torch.randn(p.shape, generator=gen) / float(p.shape[1]) ** 0.5
            if round_to_bf16:
                new = new.to(torch.bfloat16).to(torch.float32)
            p.copy_(new)


def build(config: dict, seed: int, round_to_bf16: bool = False) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**config).to(torch.float32)
    reinit_(model, seed + 1, round_to_bf16)
    model.eval()
    return model


def latent_image_ids(height: int, width: int, axis0: float = 0.0) -> torch.Tensor:
    """`FluxPipeline._prepare_latent_image_ids` (diffusers 0.42.1), with axis 0 set to `axis0`."""
    ids = torch.zeros(height, width, 3)
    ids[..., 0] = axis0
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def make_case(prefix: str, config: dict, gen: torch.Generator, batch: int, grid: tuple[int, int],
              txt: int, axis0: float, txt_ids_nonzero: bool, guidance: bool) -> dict:
    h, w = grid
    joint = config["joint_attention_dim"]
    pooled = config["pooled_projection_dim"]
    v = {
        "hidden_states": torch.randn(batch, h * w, config["in_channels"], generator=gen),
        "encoder_hidden_states": torch.randn(batch, txt, joint, generator=gen),
        "pooled_projections": torch.randn(batch, pooled, generator=gen),
        "timestep": torch.tensor([0.25, 0.875][:batch]),
        "img_ids": latent_image_ids(h, w, axis0),
        "txt_ids": torch.zeros(txt, 3),
    }
    if txt_ids_nonzero:
        v["txt_ids"] = torch.tensor([[0.0, float(i), float(2 * i + 1)] for i in range(txt)])
    if guidance:
        v["guidance"] = torch.tensor([3.5, 1.0][:batch])
    return {f"{prefix}.{k}": t for k, t in v.items()}


@torch.no_grad()
def run(model: FluxTransformer2DModel, vectors: dict, prefix: str) -> torch.Tensor:
    g = vectors.get(f"{prefix}.guidance")
    out = model(
        hidden_states=vectors[f"{prefix}.hidden_states"],
        encoder_hidden_states=vectors[f"{prefix}.encoder_hidden_states"],
        pooled_projections=vectors[f"{prefix}.pooled_projections"],
        timestep=vectors[f"{prefix}.timestep"],
        img_ids=vectors[f"{prefix}.img_ids"],
        txt_ids=vectors[f"{prefix}.txt_ids"],
        guidance=g,
        return_dict=True,
    )
    return out.sample.to(torch.float32)


def write_fixture(name: str, out_dir: Path, config: dict, seed: int, cases: str,
                  save_bf16: bool = False) -> None:
    log(f"== {name} -> {out_dir}")
    model = build(config, seed, round_to_bf16=save_bf16)
    guidance = bool(config.get("guidance_embeds", False))
    gen = torch.Generator().manual_seed(seed + 2)
    vectors: dict[str, torch.Tensor] = {}
    if "a" in cases:
        vectors.update(make_case("a", config, gen, 2, (4, 4), 5, 0.0, False, guidance))
    if "b" in cases:
        vectors.update(make_case("b", config, gen, 1, (2, 4), 3, 1.0, True, guidance))
    for c in cases:
        vectors[f"{c}.output"] = run(model, vectors, c)
        again = run(model, vectors, c)
        if not torch.equal(again, vectors[f"{c}.output"]):
            raise RuntimeError(f"{name}: forward is not deterministic")
        log(f"   {c}.output {list(vectors[f'{c}.output'].shape)} "
            f"max|y| {vectors[f'{c}.output'].abs().max():.4f} std {vectors[f'{c}.output'].std():.4f}")

    tmp = Path(tempfile.mkdtemp(prefix=f"cachet-goldens-{name}-"))
    try:
        to_save = copy.deepcopy(model).to(torch.bfloat16) if save_bf16 else model
        to_save.save_pretrained(str(tmp), safe_serialization=True)
        reloaded = FluxTransformer2DModel.from_pretrained(str(tmp), torch_dtype=torch.float32).eval()
        for c in cases:
            if not torch.equal(run(reloaded, vectors, c), vectors[f"{c}.output"]):
                raise RuntimeError(f"{name}: reloaded model differs on case {c}")
        meta = {
            "generator": "xtask/goldens/flux.py",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "seed": str(seed),
            "model_class": "FluxTransformer2DModel",
            "weights_dtype": "bfloat16 (reference computed in f32 from the same bf16 values)"
            if save_bf16 else "float32",
            "timestep": "fraction in [0, 1]; the model multiplies it (and guidance) by 1000",
            "cases": cases,
        }
        save_file(vectors, tmp / "reference.safetensors", meta)
        keep = {"config.json", "diffusion_pytorch_model.safetensors", "reference.safetensors"}
        for f in tmp.iterdir():
            if f.name not in keep:
                raise RuntimeError(f"unexpected file written by save_pretrained: {f.name}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main() -> int:
    root = Path.cwd()
    fixtures = root / "tests" / "fixtures"
    assets = root / "crates" / "cachet-diffusion" / "assets"
    if diffusers.__version__ != "0.42.1":
        raise RuntimeError(f"diffusers {diffusers.__version__}, expected 0.42.1 (requirements.txt)")
    write_fixture("flux", fixtures / "flux", dict(FIXTURE, guidance_embeds=False), BASE_SEED, "ab")
    write_fixture("flux-guidance", fixtures / "flux-guidance", dict(FIXTURE, guidance_embeds=True),
                  BASE_SEED + 100, "ab")
    write_fixture("tiny-flux", assets / "tiny-flux", DEMO, BASE_SEED + 200, "a", save_bf16=True)

    log("\nfile sizes:")
    for d in [fixtures / "flux", fixtures / "flux-guidance", assets / "tiny-flux"]:
        total = 0
        for f in sorted(d.iterdir()):
            total += f.stat().st_size
            log(f"  {f.relative_to(root)}: {f.stat().st_size} bytes")
        log(f"  {d.relative_to(root)}/ total: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
