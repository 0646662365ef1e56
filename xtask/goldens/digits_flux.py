#!/usr/bin/env python3
"""Trains cachet's demo DiT: a small `FluxTransformer2DModel` that draws handwritten digits.

The data set is scikit-learn's bundled digits (`sklearn.datasets.load_digits`: 1,797 8x8 images,
no download), upsampled bilinearly to 16x16 and scaled to [-1, 1]. A 16x16 image is the decoded
image; its latent is the image folded 2x2 into channels (`pixel_unshuffle`: an 8x8 latent of 4
channels, a lossless stand-in for a VAE that downsamples by 2), packed 2x2 as FluxPipeline packs
latents (`_pack_latents`): 16 tokens of 16 channels.

The model is conditioned on the digit label: a learned table gives each label a few text tokens
(`encoder_hidden_states`, `[11, TEXT_TOKENS, joint_attention_dim]`) and a pooled vector
(`pooled_projections`, `[11, pooled_projection_dim]`); row 10 is the null label of the
unconditional branch, trained by dropping the label of `LABEL_DROPOUT` of the samples, so
classifier-free guidance works. Training is rectified flow as FLUX is trained: `x_t = (1 - t) x0
+ t noise`, the model predicts `noise - x0` at `timestep = t` (the model scales it by 1000),
`t` drawn logit-normal; the weights kept are an exponential moving average. cachet's
`FlowMatchEuler` then integrates `x += (sigma_next - sigma) * v` as diffusers'
`FlowMatchEulerDiscreteScheduler` does.

A multinomial logistic regression on the 16x16 images (trained on 75% of the digits, scored on
the other 25%) is the quality measure of generated images: their predicted class against the label
asked for.

Run from the workspace root with the pinned venv (`cargo xtask goldens --only digits_flux`); CI
never runs it, the outputs are committed. `--steps N --out DIR` trains a shorter run elsewhere
(for experiments). Outputs in `crates/cachet-diffusion/assets/digits-flux/`:

* `config.json`, `diffusion_pytorch_model.safetensors`: the DiT (`save_pretrained`, bf16).
* `labels.safetensors`: `text_embeddings` [11, T, J] and `pooled_embeddings` [11, P], f32 rounded
  to bf16 values.
* `classifier.safetensors`: `weight` [10, 256] and `bias` [10] (f32) of the digit classifier;
  metadata `heldout_accuracy` (on real digits it never saw).
* `digits.json`: the layout and defaults the Rust side reads (labels, null label, image size,
  latent channels, text tokens, guidance scale and steps of the reference runs), and the
  classifier's accuracy on the reference runs' images.
* `reference.safetensors`: goldens, all f32:
  - `sample.noise` [S, 16, 16] (packed latents), `sample.labels` [S] (int64),
    `sample.latents` [S, 16, 16] the final latents of diffusers' scheduler driving the saved model
    (read back as f32 from the bf16 file) with true CFG (separate cond / uncond calls) at
    `guidance_scale`, `num_inference_steps` steps, Flux's dynamic shift; `sample.images`
    [S, 16, 16] their decoded images (clamped to [-1, 1]), `sample.velocity0` [S, 16, 16] the
    guided velocity of the first step;
  - `classifier.images` [R, 16, 16] real held-out digits, `classifier.labels` [R],
    `classifier.logits` [R, 10];
  - `ssim.a`, `ssim.b` [K, 16, 16] image pairs, `ssim.value` [K] Gaussian-window SSIM (Wang et
    al. 2004: 11x11 window, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 2, valid region only,
    mean over it), computed by a numpy implementation here, and `ssim.psnr` [K] (data range 2).

Reproducibility: fixed seeds, `torch.use_deterministic_algorithms(True)`, 2 threads, sorted
safetensors headers; two runs on the same machine give byte-identical files. Training is float32
on the CPU, whose matmul kernels differ by instruction set (AVX2, AVX-512, ...), so another CPU
may train slightly different weights: the Rust tests never compare weights, they check the model
they load against goldens computed from those same weights, and sample quality with the
classifier at a stated rate.
"""

from __future__ import annotations

import os

# Threads sleep at OpenMP barriers instead of spinning: a spinning thread steals the core its
# partner needs whenever other processes share the machine (same results, set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import safetensors
import sklearn
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from goldens_lib.safetensors_writer import save_file
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

SEED = 20251207
THREADS = 2
torch.set_num_threads(THREADS)
torch.use_deterministic_algorithms(True)

IMAGE = 16
LATENT_CHANNELS = 4
NUM_LABELS = 10
NULL_LABEL = 10
TEXT_TOKENS = 4
CONFIG = dict(
    patch_size=1,
    in_channels=LATENT_CHANNELS * 4,
    out_channels=None,
    num_layers=6,
    num_single_layers=12,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)

# Training: AdamW with a linear warm-up and a cosine decay, an EMA of the weights.
TRAIN_STEPS = 1200
BATCH = 128
LR = 1e-3
LR_END = 5e-5
WARMUP = 100
EMA_DECAY = 0.999
LABEL_DROPOUT = 0.12

# Sampling defaults (the Rust demo's and benchmark's) and the reference runs.
GUIDANCE_SCALE = 4.5
STEPS = 28
REFERENCE_SEEDS = 10
GOLDEN_CASES = 4


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# data: digits -> 16x16 images -> packed latents
# ------------------------------------------------------------------------------------------


def digit_images() -> tuple[torch.Tensor, np.ndarray]:
    """All digits as [N, 16, 16] float32 in [-1, 1] (bilinear upsampling of the 0-16 values)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
    return (x[:, 0] * 2.0 - 1.0).clamp(-1.0, 1.0), digits.target.astype(np.int64)


def to_latents(images: torch.Tensor) -> torch.Tensor:
    """[N, 16, 16] images -> [N, 16, 16] packed latents (pixel_unshuffle, then Flux's packing)."""
    n = images.shape[0]
    latent = F.pixel_unshuffle(images[:, None], 2)  # [N, 4, 8, 8]
    c, h, w = latent.shape[1:]
    latent = latent.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latent.reshape(n, (h // 2) * (w // 2), c * 4).contiguous()


def to_images(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_latents` (FluxPipeline's `_unpack_latents`, then pixel_shuffle)."""
    n = latents.shape[0]
    h = w = IMAGE // 2
    x = latents.view(n, h // 2, w // 2, LATENT_CHANNELS, 2, 2).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(n, LATENT_CHANNELS, h, w)
    return F.pixel_shuffle(x, 2)[:, 0]


def image_ids() -> torch.Tensor:
    """`FluxPipeline._prepare_latent_image_ids(8 // 2, 8 // 2)`: (0, row, col) per token."""
    rows = IMAGE // 4
    ids = torch.zeros(rows, rows, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(rows)[None, :]
    return ids.reshape(rows * rows, 3)


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------


class LabelEmbedding(torch.nn.Module):
    """Label (0-9, or 10 = null) -> (encoder_hidden_states [T, J], pooled_projections [P])."""

    def __init__(self) -> None:
        super().__init__()
        j, p = CONFIG["joint_attention_dim"], CONFIG["pooled_projection_dim"]
        self.text = torch.nn.Parameter(torch.randn(NUM_LABELS + 1, TEXT_TOKENS, j))
        self.pooled = torch.nn.Parameter(torch.randn(NUM_LABELS + 1, p))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text[labels], self.pooled[labels]


def build_model() -> tuple[FluxTransformer2DModel, LabelEmbedding]:
    torch.manual_seed(SEED)
    model = FluxTransformer2DModel(**CONFIG).to(torch.float32)
    # adaLN-Zero (as DiT trains): every modulation and the output projection start at zero, so
    # each block starts as the identity and the model as the zero velocity.
    with torch.no_grad():
        for name, module in model.named_modules():
            last = name.rsplit(".", 1)[-1]
            parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            zero = (last == "linear" and parent in ("norm1", "norm1_context", "norm", "norm_out"))
            zero = zero or name == "proj_out"
            if zero:
                module.weight.zero_()
                module.bias.zero_()
    labels = LabelEmbedding()
    return model, labels


def velocity(model, labels_module, x, t, labels):
    text, pooled = labels_module(labels)
    return model(
        hidden_states=x,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=t,
        img_ids=image_ids(),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        return_dict=True,
    ).sample


def learning_rate(step: int, total: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    p = (step - WARMUP) / max(1, total - WARMUP)
    return LR_END + 0.5 * (LR - LR_END) * (1.0 + math.cos(math.pi * p))


def train(steps: int) -> tuple[FluxTransformer2DModel, LabelEmbedding, list[float]]:
    images, targets = digit_images()
    x0_all = to_latents(images)
    y_all = torch.tensor(targets)
    model, labels = build_model()
    model.train()
    params = list(model.parameters()) + list(labels.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED + 1)
    losses, window = [], []
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps)
        idx = torch.randint(0, x0_all.shape[0], (BATCH,), generator=gen)
        x0, y = x0_all[idx], y_all[idx].clone()
        drop = torch.rand(BATCH, generator=gen) < LABEL_DROPOUT
        y[drop] = NULL_LABEL
        t = torch.sigmoid(torch.randn(BATCH, generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pred = velocity(model, labels, xt, t, y)
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1.0 - decay)
        window.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            log(f"   step {step + 1}/{steps}: loss {losses[-1]:.4f}, "
                f"lr {learning_rate(step, steps):.2e}, {time.time() - start:.0f} s")
            window = []
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e.to(torch.bfloat16).to(torch.float32))
    model.eval()
    return model, labels, losses


# ------------------------------------------------------------------------------------------
# reference sampling: diffusers' scheduler as FluxPipeline sets it up, true CFG
# ------------------------------------------------------------------------------------------


def scheduler(steps: int) -> FlowMatchEulerDiscreteScheduler:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    s = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    seq = (IMAGE // 4) ** 2
    s.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=calculate_shift(seq))
    return s


@torch.no_grad()
def sample(model, labels_module, noise: torch.Tensor, labels: torch.Tensor, steps: int,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents and the first step's guided velocity; cond and uncond as separate calls."""
    sched = scheduler(steps)
    x = noise.clone()
    null = torch.full_like(labels, NULL_LABEL)
    first = None
    for t in sched.timesteps:
        tt = (t / 1000.0).expand(x.shape[0]).to(x.dtype)
        cond = velocity(model, labels_module, x, tt, labels)
        uncond = velocity(model, labels_module, x, tt, null)
        v = uncond + scale * (cond - uncond)
        if first is None:
            first = v
        x = sched.step(v, t, x, return_dict=False)[0]
    return x, first


# ------------------------------------------------------------------------------------------
# quality: classifier, SSIM
# ------------------------------------------------------------------------------------------


def train_classifier(images: torch.Tensor, targets: np.ndarray):
    x = images.reshape(images.shape[0], -1).numpy().astype(np.float64)
    idx = np.arange(len(targets))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, random_state=0, stratify=targets)
    clf = LogisticRegression(C=0.5, max_iter=5000, tol=1e-6)
    clf.fit(x[train_idx], targets[train_idx])
    accuracy = float((clf.predict(x[test_idx]) == targets[test_idx]).mean())
    weight = torch.tensor(clf.coef_, dtype=torch.float32)
    bias = torch.tensor(clf.intercept_, dtype=torch.float32)
    return weight, bias, accuracy, test_idx


def classify(weight: torch.Tensor, bias: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1) @ weight.T + bias


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    g /= g.sum()
    return np.outer(g, g)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    """Mean SSIM over the valid (fully covered) window positions, Wang et al. 2004."""
    w = gaussian_window()
    k = w.shape[0]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    h, wd = a.shape
    vals = []
    for y in range(h - k + 1):
        for x in range(wd - k + 1):
            pa, pb = a[y:y + k, x:x + k], b[y:y + k, x:x + k]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va = (w * pa * pa).sum() - ma * ma
            vb = (w * pb * pb).sum() - mb * mb
            cov = (w * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * math.log10(data_range * data_range / mse)


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS, help="training steps")
    parser.add_argument("--out", type=Path, default=Path("crates/cachet-diffusion/assets/digits-flux"))
    args = parser.parse_args()
    if diffusers.__version__ != "0.42.1":
        raise RuntimeError(f"diffusers {diffusers.__version__}, expected 0.42.1 (requirements.txt)")
    out_dir = args.out if args.out.is_absolute() else Path.cwd() / args.out

    images, targets = digit_images()
    log(f"== digit classifier (logistic regression on {IMAGE}x{IMAGE} images)")
    weight, bias, heldout, test_idx = train_classifier(images, targets)
    log(f"   held-out accuracy {heldout:.4f} on {len(test_idx)} real digits")

    log(f"== training FluxTransformer2DModel on {len(targets)} digits, {args.steps} steps of {BATCH}")
    start = time.time()
    model, labels_module, losses = train(args.steps)
    train_seconds = time.time() - start

    tmp = Path(tempfile.mkdtemp(prefix="cachet-goldens-digits-flux-"))
    try:
        model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
        model = FluxTransformer2DModel.from_pretrained(str(tmp), torch_dtype=torch.float32).eval()
        with torch.no_grad():
            text = labels_module.text.detach().to(torch.bfloat16).to(torch.float32)
            pooled = labels_module.pooled.detach().to(torch.bfloat16).to(torch.float32)
            labels_module.text.copy_(text)
            labels_module.pooled.copy_(pooled)

        log(f"== reference runs: {NUM_LABELS} labels x {REFERENCE_SEEDS} seeds, {STEPS} steps, "
            f"CFG {GUIDANCE_SCALE}")
        gen = torch.Generator().manual_seed(SEED + 2)
        n = NUM_LABELS * REFERENCE_SEEDS
        noise = torch.randn(n, (IMAGE // 4) ** 2, LATENT_CHANNELS * 4, generator=gen)
        labels = torch.arange(n) % NUM_LABELS
        latents, first = sample(model, labels_module, noise, labels, STEPS, GUIDANCE_SCALE)
        generated = to_images(latents).clamp(-1.0, 1.0)
        predicted = classify(weight, bias, generated).argmax(-1)
        sample_accuracy = float((predicted == labels).float().mean())
        per_label = [float((predicted[labels == d] == d).float().mean()) for d in range(NUM_LABELS)]
        log(f"   classifier accuracy on generated digits {sample_accuracy:.3f} "
            f"(per label {', '.join(f'{a:.1f}' for a in per_label)})")
        for d in range(NUM_LABELS):
            row = generated[d]
            log("   label %d:\n%s" % (d, "\n".join(
                "     " + "".join(" .:-=+*#%@"[min(9, int((v + 1) * 5))] for v in r) for r in row)))

        vectors: dict[str, torch.Tensor] = {
            "sample.noise": noise[:GOLDEN_CASES],
            "sample.labels": labels[:GOLDEN_CASES],
            "sample.latents": latents[:GOLDEN_CASES],
            "sample.images": generated[:GOLDEN_CASES],
            "sample.velocity0": first[:GOLDEN_CASES],
        }
        pick = test_idx[:8]
        real = images[pick]
        vectors["classifier.images"] = real
        vectors["classifier.labels"] = torch.tensor(targets[pick])
        vectors["classifier.logits"] = classify(weight, bias, real)
        pairs = [(images[pick[0]], images[pick[1]]), (images[pick[2]], generated[2]),
                 (generated[0], generated[10]), (images[pick[3]], (images[pick[3]] * 0.8 + 0.1))]
        a = torch.stack([p[0] for p in pairs])
        b = torch.stack([p[1] for p in pairs])
        vectors["ssim.a"], vectors["ssim.b"] = a, b
        vectors["ssim.value"] = torch.tensor([ssim(x.numpy(), y.numpy()) for x, y in pairs],
                                             dtype=torch.float32)
        vectors["ssim.psnr"] = torch.tensor([psnr(x.numpy(), y.numpy()) for x, y in pairs],
                                            dtype=torch.float32)
        log(f"   ssim goldens {vectors['ssim.value'].tolist()}")

        meta = {
            "generator": "xtask/goldens/digits_flux.py",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "seed": str(SEED),
        }
        save_file(vectors, tmp / "reference.safetensors", meta)
        save_file({"text_embeddings": text, "pooled_embeddings": pooled}, tmp / "labels.safetensors",
                  dict(meta, null_label=str(NULL_LABEL)))
        save_file({"weight": weight, "bias": bias}, tmp / "classifier.safetensors",
                  dict(meta, heldout_accuracy=f"{heldout:.6f}", model="multinomial logistic regression"))
        spec = {
            "num_labels": NUM_LABELS,
            "null_label": NULL_LABEL,
            "image_size": IMAGE,
            "latent_channels": LATENT_CHANNELS,
            "text_tokens": TEXT_TOKENS,
            "guidance_scale": GUIDANCE_SCALE,
            "num_inference_steps": STEPS,
            "classifier_heldout_accuracy": round(heldout, 6),
            "reference_sample_accuracy": round(sample_accuracy, 6),
            "reference_samples": n,
            "train_steps": args.steps,
            "batch_size": BATCH,
            "label_dropout": LABEL_DROPOUT,
            "final_loss": round(losses[-1], 6),
        }
        (tmp / "digits.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        keep = {"config.json", "diffusion_pytorch_model.safetensors", "reference.safetensors",
                "labels.safetensors", "classifier.safetensors", "digits.json"}
        for f in tmp.iterdir():
            if f.name not in keep:
                raise RuntimeError(f"unexpected file written by save_pretrained: {f.name}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"\ntrained in {train_seconds:.0f} s; wrote {out_dir}:")
    for f in sorted(out_dir.iterdir()):
        log(f"  {f.name}: {f.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
