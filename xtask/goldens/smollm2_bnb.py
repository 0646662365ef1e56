#!/usr/bin/env python3
"""Real-model goldens of bitsandbytes quantization: SmolLM2-135M-Instruct (the converted
Hugging Face folder of `cargo xtask fetch-model smollm2`) loaded by transformers 5.23 with
bitsandbytes 0.50.2's CPU backend in NF4, NF4 + double quant, FP4 (compute float32) and LLM.int8
(threshold 6 and 0), greedy for 16 new tokens on three chat prompts.

For each step the file keeps the chosen token and the top-8 logits, so the Rust test can feed
transformers' own tokens to cachet's quantized model (teacher forcing) and bound the per-step
logit difference: bitsandbytes computes the prompt (several tokens: dequantize, then matmul) and
each decode step (one token: its gemv kernels; int8 casts activations to fp16) in different
ways, so token-for-token equality over many steps is not what either path promises.

Run by `cargo xtask goldens --only smollm2_bnb`; writes tests/fixtures/smollm2/bnb.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import bitsandbytes
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goldens_lib.smollm2 import ROOT, greedy, models_dir  # noqa: E402

NEW_TOKENS = 16
TOP = 8
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a key-value cache does in a language model.",
]


def root() -> Path:
    return ROOT


def config(kind: str) -> BitsAndBytesConfig:
    if kind.startswith("int8"):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0 if kind == "int8-t0" else 6.0)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4" if kind == "fp4" else "nf4",
        bnb_4bit_use_double_quant=kind == "nf4-dq",
        bnb_4bit_compute_dtype=torch.float32,
    )


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    folder = models_dir() / "SmolLM2-135M-Instruct"
    if not folder.exists():
        sys.exit(f"{folder} is missing: run `cargo xtask fetch-model smollm2` first")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = []
    for text in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))
    cases = []
    for kind in ["nf4", "nf4-dq", "fp4", "int8", "int8-t0"]:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=config(kind), device_map="cpu"
        ).eval()
        for text, ids in zip(PROMPTS, prompts):
            out = greedy(model, ids, NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
            tokens = out.sequences[0, len(ids):].tolist()
            steps = []
            for logits in out.logits:
                row = logits[0].float()
                values, top = row.topk(TOP)
                steps.append({"top_ids": top.tolist(), "top_logits": values.tolist()})
            cases.append({"weights": kind, "prompt": text, "input_ids": ids, "tokens": tokens, "steps": steps})
            print(f"{kind:8} {text[:36]!r:40} {tokenizer.decode(tokens)!r}")
        del model
    out_dir = root() / "tests" / "fixtures" / "smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "generator": "xtask/goldens/smollm2_bnb.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "new_tokens": NEW_TOKENS,
        "greedy": "generate(do_sample=False), eos stopping disabled; top-8 logits per step",
    }
    (out_dir / "bnb.json").write_text(json.dumps({"meta": meta, "cases": cases}) + "\n")


if __name__ == "__main__":
    main()
