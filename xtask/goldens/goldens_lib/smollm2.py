"""What the SmolLM2 real-model generators share: where the models are, and transformers'
greedy generation the way every golden asks for it (all new tokens, EOS ignored)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]


def models_dir() -> Path:
    """`$CACHET_MODELS_DIR`, else target/models (where `cargo xtask fetch-model` writes)."""
    return Path(os.environ.get("CACHET_MODELS_DIR", ROOT / "target" / "models"))


def greedy(model, ids: list[int], new_tokens: int, **generate_kwargs):
    """`model.generate` greedy for exactly `new_tokens` tokens after `ids`, EOS stopping off;
    returns generate's output (a tensor, or a dict with `return_dict_in_generate`)."""
    prompt = torch.tensor([ids])
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
            **generate_kwargs,
        )
