#!/usr/bin/env python3
"""Perplexity goldens: transformers' perplexity (sliding windows, exact per-token sum; the
recipe of xtask/bench/perplexity.py) on the committed public-domain text, with the token ids
the model's tokenizer makes of it, for

* `embedded`: the embedded tiny Llama (crates/cachet-models/assets/tiny-llama, random weights)
  with its embedded tokenizer: runs everywhere, no download;
* `smollm2_gguf`: SmolLM2-135M-Instruct's GGUF file loaded by transformers' GGUF loader in
  float32, when `cargo xtask fetch-model smollm2` has fetched it.

Run by `cargo xtask goldens --only perplexity`; writes tests/fixtures/perplexity/goldens.json,
read by tests/tests/perplexity.rs and tests/tests/real_model.rs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("perplexity_bench", ROOT / "xtask" / "bench" / "perplexity.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
perplexity = _bench.perplexity

TEXT = ROOT / "tests" / "fixtures" / "text" / "alice.txt"
OUT = ROOT / "tests" / "fixtures" / "perplexity" / "goldens.json"


def models_dir() -> Path:
    return Path(os.environ.get("CACHET_MODELS_DIR", ROOT / "target" / "models"))


def case(name, model, ids, context, stride):
    result = perplexity(model, ids, "f32", context, stride, 0)
    print(f"{name:14} {len(ids)} tokens, context {context}, stride {stride}: {result['perplexity']:.6f}")
    return {
        "name": name,
        "context": context,
        "stride": stride,
        "input_ids": ids,
        "perplexity": result["perplexity"],
        "mean_nll": result["mean_nll"],
        "tokens_scored": result["tokens_scored"],
    }


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    text = TEXT.read_text(encoding="utf-8")
    cases = []

    assets = ROOT / "crates" / "cachet-models" / "assets" / "tiny-llama"
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(assets / "tokenizer.json"), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    model = AutoModelForCausalLM.from_pretrained(assets, dtype=torch.float32).eval()
    ids = tok(text)["input_ids"][:1200]
    cases.append(case("embedded", model, ids, 128, 64))
    cases.append(case("embedded_full", model, ids[:100], 128, 128))

    gguf = models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf.exists():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        ).eval()
        ids = tok(text)["input_ids"][:600]
        cases.append(case("smollm2_gguf", model, ids, 256, 128))
    else:
        print(f"note: {gguf} is missing; no SmolLM2 case (cargo xtask fetch-model smollm2)")

    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "generator": "xtask/goldens/perplexity.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "text": "tests/fixtures/text/alice.txt",
        "recipe": "sliding windows (begin += stride), each token scored once, exact sum of NLLs",
    }
    OUT.write_text(json.dumps({"meta": meta, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
