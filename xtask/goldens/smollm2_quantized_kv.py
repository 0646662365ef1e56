#!/usr/bin/env python3
"""Real-model goldens of the quantized KV cache: greedy tokens of SmolLM2-135M-Instruct (its GGUF
file loaded by transformers' GGUF loader in float32) through transformers 5.23's
`QuantizedCache` (quanto and hqq, 4-bit, group 64, residual 128), 32 new tokens.

In this configuration the two semantics coincide: the prompt is quantized once when it enters
the cache and fewer new tokens than `residual_length` follow, so transformers never re-quantizes
(which cachet, append-only, never does). Writes tests/fixtures/smollm2/quantized_kv.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goldens_lib.smollm2 import ROOT, greedy, models_dir  # noqa: E402

NEW_TOKENS = 32
CONFIGS = [
    {"backend": "quanto", "nbits": 4, "axis_key": 0, "axis_value": 0, "q_group_size": 64, "residual_length": 128},
    {"backend": "hqq", "nbits": 4, "axis_key": 0, "axis_value": 0, "q_group_size": 64, "residual_length": 128},
]


def root() -> Path:
    return ROOT


def main() -> None:
    # optimum-quanto builds its C++ kernels with the venv's ninja.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gguf = models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        sys.exit(f"{gguf} is missing: run `cargo xtask fetch-model smollm2` first")
    greedy_goldens = json.loads((root() / "tests" / "fixtures" / "smollm2" / "greedy.json").read_text())
    prompts = []
    for c in greedy_goldens["cases"]:
        if c["source"] == "gguf_f32" and c["input_ids"] not in [p for _, p in prompts]:
            prompts.append((c["prompt"], c["input_ids"]))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    cases = []
    for config in CONFIGS:
        for text, ids in prompts:
            out = greedy(model, ids, NEW_TOKENS, cache_implementation="quantized", cache_config=dict(config))
            tokens = out[0, len(ids):].tolist()
            cases.append({"prompt": text, "input_ids": ids, "cache_config": config, "tokens": tokens})
            print(f"{config['backend']:6} {text[:36]!r:40} {tokens[:8]}")
    meta = {
        "generator": "xtask/goldens/smollm2_quantized_kv.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "greedy": "generate(do_sample=False, cache_implementation='quantized'), eos stopping disabled",
    }
    out = root() / "tests" / "fixtures" / "smollm2" / "quantized_kv.json"
    out.write_text(json.dumps({"meta": meta, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
