#!/usr/bin/env python3
"""Real-model goldens of the sink cache: greedy tokens of SmolLM2-135M-Instruct (the converted
Hugging Face folder of `cargo xtask fetch-model smollm2`, float32) through transformers 4.52's
`SinkCache` (the last release that has it; the `sink` venv of `cargo xtask goldens`), with a
window shorter than prompt + answer so the cache evicts and re-rotates keys.

Writes tests/fixtures/smollm2/sink.json, read by tests/tests/real_model.rs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.cache_utils import SinkCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goldens_lib.smollm2 import ROOT, greedy, models_dir  # noqa: E402

NEW_TOKENS = 24
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
]
CONFIGS = [(48, 4), (40, 2)]


def root() -> Path:
    return ROOT


def main() -> None:
    if not transformers.__version__.startswith("4.52"):
        sys.exit(f"transformers {transformers.__version__}: run in the sink venv (requirements-sink.txt)")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    folder = models_dir() / "SmolLM2-135M-Instruct"
    if not folder.exists():
        sys.exit(f"{folder} is missing: run `cargo xtask fetch-model smollm2` first")
    # transformers 4.52 cannot read the tokenizer_config.json 5.23 wrote: the prompts' ids (the
    # chat template applied by 5.23) come from the greedy goldens, tokenizer.json decodes.
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    greedy_goldens = json.loads((root() / "tests" / "fixtures" / "smollm2" / "greedy.json").read_text())
    prompt_ids = {c["prompt"]: c["input_ids"] for c in greedy_goldens["cases"]}
    # transformers 5 writes RoPE as `rope_parameters`, which 4.52 does not read (it would fall
    # back to theta 10000): the values are given to it under 4.52's names.
    raw = json.loads((folder / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        sys.exit(f"rope_parameters {rope}: only the default RoPE is mapped to transformers 4.52")
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, torch_dtype=torch.float32).eval()
    cases = []
    for text in PROMPTS:
        ids = prompt_ids[text]
        for window, sinks in CONFIGS:
            cache = SinkCache(window_length=window, num_sink_tokens=sinks)
            out = greedy(model, ids, NEW_TOKENS, past_key_values=cache)
            tokens = out[0, len(ids):].tolist()
            cases.append(
                {
                    "prompt": text,
                    "input_ids": list(ids),
                    "cache_implementation": "sink",
                    "cache_config": {"window_length": window, "num_sink_tokens": sinks},
                    "tokens": tokens,
                    "text": tokenizer.decode(tokens),
                }
            )
            print(f"sink {window}/{sinks} {text[:30]!r:34} {tokenizer.decode(tokens)!r}")
    out_dir = root() / "tests" / "fixtures" / "smollm2"
    meta = {
        "generator": "xtask/goldens/smollm2_sink.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "greedy": "generate(do_sample=False, past_key_values=SinkCache(...)), eos stopping disabled",
    }
    (out_dir / "sink.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
