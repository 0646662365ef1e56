#!/usr/bin/env python3
"""Golden generator for cachet's CogVideoX video DiT (`cachet_diffusion::models::CogVideoX`).

Builds tiny, randomly initialised `CogVideoXTransformer3DModel`s with diffusers 0.42.1 (no Hub
access: every model comes from a config under a fixed seed), writes each as `config.json` +
`diffusion_pytorch_model.safetensors` (via `save_pretrained`, then rewritten byte-reproducibly)
and the inputs and outputs of its forward to `reference.safetensors` next to them.

Run from the workspace root with the pinned venv (`cargo xtask goldens`); CI never runs it, the
outputs are committed. Outputs:

* `tests/fixtures/cogvideox/`         CogVideoX 1.0 defaults: 3D sin-cos positional embeddings,
                                      no rotary, Conv2d patch embedding
* `tests/fixtures/cogvideox-rotary/`  CogVideoX 1.0 I2V style: 3D rotary embeddings (linspace
                                      grid with resize-crop coords) + learned positional embeddings
* `tests/fixtures/cogvideox15/`       CogVideoX 1.5 style: `patch_size_t=2` (Linear patch
                                      embedding), rotary with the "slice" grid, `ofs_embed_dim`,
                                      no patch bias

Test vectors (float32; timesteps are integer-valued like the pipeline's), per fixture and case
`<c>` (`a`: the config's sample size; `b`, only in `cogvideox/`: another size, so the sin-cos
table is recomputed as diffusers does):

* `<c>.hidden_states` [2, F, C, H, W], `<c>.encoder_hidden_states` [2, T, text_embed_dim],
  `<c>.timestep` [2], `<c>.ofs` [1] (only with `ofs_embed_dim`), `<c>.output` [2, F', C, H, W]
* `<c>.rotary_cos`, `<c>.rotary_sin` [F'*H/p*W/p, head_dim] (rotary fixtures): exactly
  `CogVideoXPipeline._prepare_rotary_positional_embeddings` for the latent size of the case,
  with `vae_scale_factor_spatial = 8`; the output is computed with them.

Checks (the script aborts before writing if one fails): reloading with `from_pretrained` gives a
bit-identical output; norms, biases and embeddings are perturbed away from 0/1; the second batch
row differs from the first. Outputs are byte-reproducible.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import safetensors.torch
import torch
from goldens_lib.safetensors_writer import save_file

import diffusers
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

BASE_SEED = 20251124
WEIGHT_STD = 0.15
BIAS_STD = 0.1
NORM_NOISE = 0.1
POS_STD = 0.5
VAE_SCALE_FACTOR_SPATIAL = 8
TIMESTEPS = [999.0, 437.0]

torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    time_embed_dim=16,
    text_embed_dim=32,
    num_layers=2,
    sample_width=8,
    sample_height=8,
    patch_size=2,
    max_text_seq_length=6,
)

# name -> (config overrides, cases: name -> (latent frames, height, width))
FIXTURES = {
    "cogvideox": (
        dict(sample_frames=5),
        {"a": (2, 8, 8), "b": (3, 8, 12)},
    ),
    "cogvideox-rotary": (
        dict(
            sample_frames=9,
            in_channels=8,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,
        ),
        {"a": (3, 8, 8)},
    ),
    "cogvideox15": (
        dict(
            sample_frames=9,
            patch_size_t=2,
            ofs_embed_dim=16,
            patch_bias=False,
            use_rotary_positional_embeddings=True,
        ),
        {"a": (4, 8, 6)},
    ),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter (and the learned positional table) under `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                new = 1.0 + NORM_NOISE * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                new = BIAS_STD * torch.randn(p.shape, generator=gen)
            else:
                new = WEIGHT_STD * torch.randn(p.shape, generator=gen)
            p.copy_(new)
        if model.config.use_learned_positional_embeddings:
            buf = model.patch_embed.pos_embedding
            buf.copy_(POS_STD * torch.randn(buf.shape, generator=gen))


def rotary(model, frames: int, height: int, width: int):
    """`CogVideoXPipeline._prepare_rotary_positional_embeddings` for latents of this size."""
    fake = SimpleNamespace(transformer=model, vae_scale_factor_spatial=VAE_SCALE_FACTOR_SPATIAL)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        fake,
        height * VAE_SCALE_FACTOR_SPATIAL,
        width * VAE_SCALE_FACTOR_SPATIAL,
        frames,
        torch.device("cpu"),
    )


@torch.no_grad()
def run_case(model, gen, frames, height, width):
    cfg = model.config
    inputs = {
        "hidden_states": torch.randn((2, frames, cfg.in_channels, height, width), generator=gen),
        "encoder_hidden_states": torch.randn((2, cfg.max_text_seq_length, cfg.text_embed_dim), generator=gen),
        "timestep": torch.tensor(TIMESTEPS, dtype=torch.float32),
    }
    kwargs = dict(inputs)
    kwargs["timestep"] = inputs["timestep"].long()
    if cfg.ofs_embed_dim:
        inputs["ofs"] = torch.full((1,), 2.0)
        kwargs["ofs"] = inputs["ofs"]
    if cfg.use_rotary_positional_embeddings:
        cos, sin = rotary(model, frames, height, width)
        inputs["rotary_cos"], inputs["rotary_sin"] = cos, sin
        kwargs["image_rotary_emb"] = (cos, sin)
    out = model(**kwargs, return_dict=False)[0]
    return inputs, kwargs, out


def build(name: str, overrides: dict, seed: int):
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**{**TINY, **overrides}).to(torch.float32)
    reinit_(model, seed + 1)
    return model.eval()


def write_fixture(name: str, overrides: dict, cases: dict, seed: int, root: Path) -> None:
    model = build(name, overrides, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    tensors = {}
    for case, (frames, height, width) in cases.items():
        inputs, kwargs, out = run_case(model, gen, frames, height, width)
        if torch.equal(out[0], out[1]):
            raise RuntimeError(f"{name}.{case}: batch rows give identical outputs")
        for key, value in inputs.items():
            tensors[f"{case}.{key}"] = value.to(torch.float32)
        tensors[f"{case}.output"] = out.to(torch.float32)
        log(f"  {name}.{case}: output {tuple(out.shape)}, |out| max {out.abs().max():.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        reloaded = CogVideoXTransformer3DModel.from_pretrained(tmp).eval()
        gen = torch.Generator().manual_seed(seed + 2)
        for case, (frames, height, width) in cases.items():
            _, _, again = run_case(reloaded, gen, frames, height, width)
            if not torch.equal(again, tensors[f"{case}.output"]):
                raise RuntimeError(f"{name}.{case}: reloaded model differs")
        config = json.loads((Path(tmp) / "config.json").read_text())
        weights = safetensors.torch.load_file(str(Path(tmp) / "diffusion_pytorch_model.safetensors"))

    for key, value in weights.items():
        if value.numel() > 1 and (torch.all(value == 0) or torch.all(value == 1)):
            raise RuntimeError(f"{name}: {key} is trivially constant")
    out_dir = root / "tests" / "fixtures" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(weights, out_dir / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    meta = {"generator": "xtask/goldens/cogvideox.py", "diffusers": diffusers.__version__, "torch": torch.__version__}
    save_file(tensors, out_dir / "reference.safetensors", meta)
    log(f"wrote {out_dir.relative_to(root)}")


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    if diffusers.__version__ != "0.42.1":
        raise RuntimeError(f"diffusers 0.42.1 required, found {diffusers.__version__}")
    for i, (name, (overrides, cases)) in enumerate(FIXTURES.items()):
        write_fixture(name, overrides, cases, BASE_SEED + 100 * i, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
