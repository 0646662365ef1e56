#!/usr/bin/env python3
"""Golden generator for cachet's Llama-family models.

Builds tiny, randomly initialised checkpoints with `transformers` (no Hub access: every model
is built from a config under a fixed seed), writes them as `config.json` + `model.safetensors`
and writes reference outputs to `reference.safetensors` next to them.

Run from the workspace root with the pinned venv (`cargo xtask goldens`); CI never runs it, the
outputs are committed. Outputs:

* `tests/fixtures/llama/`        LlamaForCausalLM, untied lm_head, default RoPE (theta 1e4)
* `tests/fixtures/llama3-rope/`  LlamaForCausalLM, llama3 RoPE scaling, tied embeddings
* `tests/fixtures/mistral/`      MistralForCausalLM, sliding_window=4, explicit head_dim=32
* `tests/fixtures/qwen2/`        Qwen2ForCausalLM, non-zero q/k/v biases, untied
* `crates/cachet-models/assets/tiny-llama/`  demo model (weights stored in bf16, see below)

Test vectors (integers int64, floats float32), per fixture:

* `a.input_ids` [2, 9], `a.attention_mask` (ones), `a.position_ids` (arange), `a.logits` [2, 9, V]
* `b.*` same with row 0 left-padded by 3 pad tokens (id 0); `b.position_ids` is computed exactly
  like `GenerationMixin._prepare_position_ids_for_generation` in transformers 5.23:
  `(mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)`. Only positions with mask 1 are meaningful.
* `g.prompt_ids` [1, 5], `g.tokens` [1, N] = greedy `generate` new tokens only (EOS stopping
  disabled), cross-checked against a manual greedy loop of full forwards.

Every check (`make_vectors`, `verify`) must pass, or the script aborts and leaves the previous
outputs in place: reload via `from_pretrained` gives bit-identical logits and greedy tokens; an
independent forward written from config.json + model.safetensors alone matches HF (and shows
that the Mistral window rule `0 <= i - j < sliding_window` and the llama3 RoPE scaling both
matter); `generate` equals a cache-free greedy loop. Outputs are byte-reproducible.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import torch
from goldens_lib.safetensors_writer import save_file
import transformers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

BASE_SEED = 20240917
PAD_ID = 0
SEQ = 9
N_PAD = 3
PROMPT_LEN = 5
NEW_TOKENS = 12
# Greedy prompts are re-drawn (deterministically) until every greedy step has a top-1/top-2
# logit margin at least this large, so an f32 reimplementation cannot flip a token.
MIN_GREEDY_MARGIN = 0.05
# Random models readily collapse onto one repeated token; a varied greedy continuation exercises
# the KV cache far better, so the drawn prompt must also yield this many distinct new tokens.
MIN_DISTINCT_TOKENS = 6
# Re-initialisation scales (the transformers default, std 0.02, gives near-constant logits).
WEIGHT_STD = 0.15
EMBED_STD = 0.5
BIAS_STD = 0.1
NORM_NOISE = 0.1

torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
torch.use_deterministic_algorithms(True)

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------


def reinit_(model: torch.nn.Module, seed: int, round_to_bf16: bool = False) -> None:
    """Re-initialise every parameter under `seed` with scales that give meaningful logits."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=True):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.endswith("norm.weight"):
                new = 1.0 + NORM_NOISE * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                new = BIAS_STD * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                new = EMBED_STD * torch.randn(p.shape, generator=gen)
            else:
                new = WEIGHT_STD * torch.randn(p.shape, generator=gen)
            if round_to_bf16:
                new = new.to(torch.bfloat16).to(torch.float32)
            p.copy_(new.to(p.dtype))


def build(cls, config, seed: int, round_to_bf16: bool = False):
    torch.manual_seed(seed)
    model = cls(config)
    model = model.to(torch.float32)
    reinit_(model, seed + 1, round_to_bf16=round_to_bf16)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Test vectors
# --------------------------------------------------------------------------------------------


def generate_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Exactly `GenerationMixin._prepare_position_ids_for_generation` (transformers 5.23)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


@torch.no_grad()
def forward_logits(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits.to(torch.float32)


@torch.no_grad()
def manual_greedy(model, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    """Greedy decoding with a full (cache-free) forward per step; returns tokens and min margin."""
    ids = prompt.clone()
    toks: list[int] = []
    margin = math.inf
    for _ in range(n):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        logits = forward_logits(model, ids, torch.ones_like(ids), pos)[0, -1]
        top2 = torch.topk(logits, 2)
        margin = min(margin, float(top2.values[0] - top2.values[1]))
        nxt = int(top2.indices[0])
        toks.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return toks, margin


@torch.no_grad()
def hf_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    """`model.generate` greedy, EOS stopping disabled (generation_config.eos_token_id=None)."""
    saved = model.generation_config
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=None,
        eos_token_id=None,
        pad_token_id=PAD_ID,
        bos_token_id=model.config.bos_token_id,
    )
    model.generation_config = gc
    try:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
    finally:
        model.generation_config = saved
    new = out[0, prompt.shape[1] :].tolist()
    if len(new) != n:
        raise RuntimeError(f"generate stopped early: {len(new)} of {n} tokens")
    return new


def pick_prompt(model, gen: torch.Generator, vocab: int, n: int, fixed: list[int] | None):
    if fixed is not None:
        prompt = torch.tensor([fixed], dtype=torch.long)
        toks, margin = manual_greedy(model, prompt, n)
        return prompt, toks, margin, 1
    for attempt in range(1, 1001):
        prompt = torch.randint(1, vocab, (1, PROMPT_LEN), generator=gen)
        toks, margin = manual_greedy(model, prompt, n)
        if margin >= MIN_GREEDY_MARGIN and len(set(toks)) >= MIN_DISTINCT_TOKENS:
            return prompt, toks, margin, attempt
    raise RuntimeError("no prompt with a large enough greedy margin and varied output")


def make_vectors(model, seed: int, cases: str, new_tokens: int, fixed_prompt=None):
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 2)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, str] = {}
    if "a" in cases:
        ids = torch.randint(1, vocab, (2, SEQ), generator=gen)
        mask = torch.ones_like(ids)
        pos = torch.arange(SEQ).unsqueeze(0).expand(2, SEQ).contiguous()
        logits = forward_logits(model, ids, mask, pos)
        tensors.update({"a.input_ids": ids, "a.attention_mask": mask, "a.position_ids": pos, "a.logits": logits})
    if "b" in cases:
        ids = torch.randint(1, vocab, (2, SEQ), generator=gen)
        mask = torch.ones_like(ids)
        ids[0, :N_PAD] = PAD_ID
        mask[0, :N_PAD] = 0
        pos = generate_position_ids(mask)
        logits = forward_logits(model, ids, mask, pos)
        info["b.nan_count"] = str(int(torch.isnan(logits).sum()))
        info["b.nan_on_pad_rows"] = str(bool(torch.isnan(logits[0, :N_PAD]).any()))
        if torch.isnan(logits[mask.bool()]).any():
            raise RuntimeError("NaN logits at unmasked positions")
        # Unpadded re-run of row 0 must equal its padded logits (checks mask + positions).
        ref = forward_logits(
            model, ids[:1, N_PAD:], mask[:1, N_PAD:], torch.arange(SEQ - N_PAD).unsqueeze(0)
        )
        d = float((ref[0] - logits[0, N_PAD:]).abs().max())
        info["b.max_abs_diff_vs_unpadded"] = f"{d:.3e}"
        if d > 1e-4:
            raise RuntimeError(f"left-padded row differs from unpadded run by {d}")
        tensors.update({"b.input_ids": ids, "b.attention_mask": mask, "b.position_ids": pos, "b.logits": logits})
    if "g" in cases:
        prompt, toks, margin, attempts = pick_prompt(model, gen, vocab, new_tokens, fixed_prompt)
        hf = hf_greedy(model, prompt, new_tokens)
        if hf != toks:
            raise RuntimeError(f"generate {hf} != manual greedy {toks}")
        tensors.update({"g.prompt_ids": prompt, "g.tokens": torch.tensor([hf], dtype=torch.long)})
        info["g.min_top1_margin"] = f"{margin:.4f}"
        info["g.prompt_attempts"] = str(attempts)
        eos = model.config.eos_token_id
        info["g.eos_in_tokens"] = str(eos in hf)
    for k, v in list(tensors.items()):
        tensors[k] = v.to(torch.int64).contiguous() if not v.is_floating_point() else v.to(torch.float32).contiguous()
    return tensors, info


# --------------------------------------------------------------------------------------------
# Independent checks
# --------------------------------------------------------------------------------------------


def manual_inv_freq(cfg: dict, head_dim: int) -> torch.Tensor:
    """RoPE inverse frequencies from config.json alone (what the Rust side must reproduce)."""
    rp = cfg.get("rope_parameters") or {}
    theta = float(rp["rope_theta"])
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rp.get("rope_type", "default") == "llama3":
        factor = rp["factor"]
        lo, hi = rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        mid = ~(wl < hi_wl) & ~(wl > lo_wl)
        inv = torch.where(mid, smoothed, scaled)
    else:
        assert rp.get("rope_type", "default") == "default", rp
    return inv.to(torch.float32)


@torch.no_grad()
def manual_forward(sd: dict, cfg: dict, ids, mask, pos, window_le: bool = False) -> torch.Tensor:
    """Eager Llama/Mistral/Qwen2 forward written from config.json + state dict only.

    Sliding window: key j is visible to query i iff 0 <= i - j < window (or <= window when
    `window_le`, used to show that the other convention gives different logits).
    """
    H = cfg["num_attention_heads"]
    KV = cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    window = cfg.get("sliding_window")
    if cfg["model_type"] == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    inv = manual_inv_freq(cfg, hd)
    B, T = ids.shape

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, prefix):
        y = x @ sd[prefix + ".weight"].T
        if prefix + ".bias" in sd:
            y = y + sd[prefix + ".bias"]
        return y

    ang = pos[..., None].to(torch.float32) * inv  # [B, T, hd/2]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & ((i - j <= window) if window_le else (i - j < window))
    allowed = allowed[None, None] & mask.bool()[:, None, None, :]
    bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)

    x = sd["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj").view(B, T, H, hd).transpose(1, 2)
        k = lin(h, p + "self_attn.k_proj").view(B, T, KV, hd).transpose(1, 2)
        v = lin(h, p + "self_attn.v_proj").view(B, T, KV, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + bias
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
        x = x + lin(o, p + "self_attn.o_proj")
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g = lin(h, p + "mlp.gate_proj")
        x = x + lin(torch.nn.functional.silu(g) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, sd["model.norm.weight"])
    head = sd.get("lm_head.weight")
    if head is None:
        assert cfg.get("tie_word_embeddings"), "lm_head missing but embeddings not tied"
        head = sd["model.embed_tokens.weight"]
    return x @ head.T


def load_sd(path: Path) -> dict[str, torch.Tensor]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}


def verify(cls, out_dir: Path, model, vectors: dict, info: dict) -> None:
    cfg = json.loads((out_dir / "config.json").read_text())
    # 1. from_pretrained round trip gives identical logits.
    re = cls.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="eager").eval()
    for c in ("a", "b"):
        if f"{c}.logits" not in vectors:
            continue
        got = forward_logits(re, vectors[f"{c}.input_ids"], vectors[f"{c}.attention_mask"], vectors[f"{c}.position_ids"])
        if not torch.equal(got, vectors[f"{c}.logits"]):
            d = float((got - vectors[f"{c}.logits"]).abs().max())
            raise RuntimeError(f"{out_dir}: reloaded logits differ ({c}, max {d})")
    if "g.tokens" in vectors:
        if hf_greedy(re, vectors["g.prompt_ids"], vectors["g.tokens"].shape[1]) != vectors["g.tokens"][0].tolist():
            raise RuntimeError(f"{out_dir}: reloaded greedy differs")
    info["reload_identical"] = "true"
    # 2. Independent forward from config.json + model.safetensors only.
    sd = load_sd(out_dir / "model.safetensors")
    for c in ("a", "b"):
        if f"{c}.logits" not in vectors:
            continue
        ids, mask, pos = (vectors[f"{c}.{n}"] for n in ("input_ids", "attention_mask", "position_ids"))
        ref = vectors[f"{c}.logits"]
        man = manual_forward(sd, cfg, ids, mask, pos)
        sel = mask.bool()
        d = float((man[sel] - ref[sel]).abs().max())
        info[f"{c}.max_abs_diff_vs_manual"] = f"{d:.3e}"
        if d > 1e-4:
            raise RuntimeError(f"{out_dir}: manual forward differs from HF ({c}): {d}")
        if cfg.get("sliding_window") is not None and cfg["model_type"] == "mistral":
            alt = manual_forward(sd, cfg, ids, mask, pos, window_le=True)
            d_alt = float((alt[sel] - ref[sel]).abs().max())
            info[f"{c}.max_abs_diff_vs_manual_window_le"] = f"{d_alt:.3e}"
            if d_alt < 1e-2:
                raise RuntimeError("window convention not distinguishable")
            full = dict(cfg, sliding_window=None)
            d_full = float((manual_forward(sd, full, ids, mask, pos)[sel] - ref[sel]).abs().max())
            info[f"{c}.max_abs_diff_vs_manual_no_window"] = f"{d_full:.3e}"
            info["sliding_window_rule"] = "key j visible to query i iff 0 <= i - j < sliding_window (verified)"
        rp = cfg.get("rope_parameters") or {}
        if rp.get("rope_type", "default") != "default":
            plain = dict(cfg, rope_parameters={"rope_type": "default", "rope_theta": rp["rope_theta"]})
            d_plain = float((manual_forward(sd, plain, ids, mask, pos)[sel] - ref[sel]).abs().max())
            info[f"{c}.max_abs_diff_vs_manual_unscaled_rope"] = f"{d_plain:.3e}"
            if d_plain < 1e-2:
                raise RuntimeError("rope scaling has no visible effect")
    # 3. Logits are not degenerate.
    if "a.logits" in vectors:
        info["a.logits_std"] = f"{float(vectors['a.logits'].std()):.3f}"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_fixture(
    name: str,
    out_dir: Path,
    cls,
    config,
    seed: int,
    cases: str = "abg",
    new_tokens: int = NEW_TOKENS,
    fixed_prompt=None,
    save_bf16: bool = False,
) -> dict:
    log(f"== {name} -> {out_dir}")
    model = build(cls, config, seed, round_to_bf16=save_bf16)
    if fixed_prompt is not None:
        # The prompt is fixed, so draw the weights again (seed + 1000 k) until greedy decoding
        # of it is robust (margin) and not degenerate (distinct tokens).
        prompt = torch.tensor([fixed_prompt], dtype=torch.long)
        for k in range(100):
            toks, margin = manual_greedy(model, prompt, new_tokens)
            if margin >= MIN_GREEDY_MARGIN and len(set(toks)) >= MIN_DISTINCT_TOKENS:
                break
            seed += 1000
            model = build(cls, config, seed, round_to_bf16=save_bf16)
        else:
            raise RuntimeError("no seed gives a robust greedy continuation of the fixed prompt")
    vectors, info = make_vectors(model, seed, cases, new_tokens, fixed_prompt)
    # Staged in the system temp dir (never inside the source tree, where a half-written
    # directory could be committed), then copied over the previous outputs once verified.
    tmp = Path(tempfile.mkdtemp(prefix=f"cachet-goldens-{name}-"))
    try:
        to_save = model
        if save_bf16:
            to_save = copy.deepcopy(model).to(torch.bfloat16)
        to_save.save_pretrained(str(tmp), safe_serialization=True)
        meta = {
            "generator": "xtask/goldens/llama.py",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "seed": str(seed),
            "model_class": cls.__name__,
            "weights_dtype": "bfloat16 (reference computed in f32 from the same bf16 values)" if save_bf16 else "float32",
            "pad_token_id": str(PAD_ID),
            "position_ids_rule": "(mask.cumsum(-1)-1).masked_fill(mask==0,0)",
            "greedy": "generate(do_sample=False), eos stopping disabled (generation eos_token_id=None), new tokens only",
            "cases": cases,
        }
        meta.update(info)
        save_file(vectors, tmp / "reference.safetensors", meta)
        verify(cls, tmp, model, vectors, info)
        meta.update(info)
        save_file(vectors, tmp / "reference.safetensors", meta)
        keep = {"config.json", "model.safetensors", "generation_config.json", "reference.safetensors"}
        for f in tmp.iterdir():
            if f.name not in keep:
                raise RuntimeError(f"unexpected file written by save_pretrained: {f.name}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for k in sorted(info):
        log(f"   {k}: {info[k]}")
    return info


def main() -> int:
    root = Path.cwd()
    if not (root / "Cargo.toml").exists() or not (root / "xtask").is_dir():
        print("run from the workspace root", file=sys.stderr)
        return 2
    fixtures = root / "tests" / "fixtures"
    fixtures.mkdir(parents=True, exist_ok=True)
    assets = root / "crates" / "cachet-models" / "assets"
    assets.mkdir(parents=True, exist_ok=True)

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, seed {BASE_SEED}")

    write_fixture(
        "llama",
        fixtures / "llama",
        LlamaForCausalLM,
        LlamaConfig(**COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        BASE_SEED + 100,
    )
    write_fixture(
        "llama3-rope",
        fixtures / "llama3-rope",
        LlamaForCausalLM,
        LlamaConfig(
            **COMMON,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        BASE_SEED + 200,
    )
    write_fixture(
        "mistral",
        fixtures / "mistral",
        MistralForCausalLM,
        MistralConfig(**COMMON, head_dim=32, sliding_window=4, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        BASE_SEED + 300,
    )
    write_fixture(
        "qwen2",
        fixtures / "qwen2",
        Qwen2ForCausalLM,
        Qwen2Config(**COMMON, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        BASE_SEED + 400,
    )
    write_fixture(
        "tiny-llama",
        assets / "tiny-llama",
        LlamaForCausalLM,
        LlamaConfig(
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attn_implementation="eager",
        ),
        BASE_SEED + 500,
        cases="g",
        new_tokens=16,
        fixed_prompt=[1, 2, 3, 4, 5],
        save_bf16=True,
    )

    log("\nfile sizes:")
    for d in [fixtures / n for n in ("llama", "llama3-rope", "mistral", "qwen2")] + [assets / "tiny-llama"]:
        total = 0
        for f in sorted(d.iterdir()):
            total += f.stat().st_size
            log(f"  {f.relative_to(root)}: {f.stat().st_size} bytes")
        log(f"  {d.relative_to(root)}/ total: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
