#!/usr/bin/env python3
"""transformers' side of `cargo xtask bench --e2e`: prefill and marginal decode speed on CPU.

Run in the goldens venv (transformers 5.23, torch CPU, bitsandbytes 0.50.2's CPU backend) on the
same checkpoint folder and the same synthetic prompts as cachet's `e2e` binary
(benches/src/bin/e2e.rs): prompt token i is `base + (i * 7919 + 13) % (vocab - base)` with
base = 1000 (0 for vocabularies of 2000 or fewer). Greedy, EOS never stops generation
(`min_new_tokens` = `max_new_tokens`), DynamicCache.

For each weights kind and prompt length: a warm-up generation (once per model), then per
repetition one `generate` of NEW_TOKENS tokens with a stopping criterion that timestamps every
step. Prefill tok/s = prompt length / time to the first token; decode tok/s = the marginal rate of
decode steps 2..N (tokens 3..NEW_TOKENS), which leaves out the first decode step as cachet does.

Prints one JSON line per (weights, prompt length), after one `versions` line.

Usage: transformers_bench.py --model DIR [--weights f32,nf4,int8] [--prompt-lens 32,512,2048]
       [--new-tokens 64] [--reps 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)


def synthetic_prompt(length: int, vocab: int) -> list[int]:
    base = 1000 if vocab > 2000 else 0
    return [base + (i * 7919 + 13) % (vocab - base) for i in range(length)]


class StepClock(StoppingCriteria):
    """Records a timestamp after every generated token; never stops generation."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def load(model_dir: Path, weights: str):
    start = time.perf_counter()
    if weights == "f32":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    elif weights in ("nf4", "nf4-dq", "fp4"):
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if weights == "fp4" else "nf4",
            bnb_4bit_use_double_quant=weights == "nf4-dq",
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, quantization_config=config, device_map="cpu"
        )
    elif weights in ("int8", "int8-t0"):
        config = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=0.0 if weights == "int8-t0" else 6.0
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, quantization_config=config, device_map="cpu"
        )
    else:
        sys.exit(f"unknown --weights {weights!r} (f32, nf4, nf4-dq, fp4, int8, int8-t0)")
    model.eval()
    return model, time.perf_counter() - start


def weight_bytes(model) -> int:
    total = 0
    seen = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def one_rep(model, prompt: list[int], new_tokens: int):
    ids = torch.tensor([prompt], dtype=torch.long)
    mask = torch.ones_like(ids)
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            stopping_criteria=StoppingCriteriaList([clock]),
            pad_token_id=model.generation_config.pad_token_id
            if model.generation_config.pad_token_id is not None
            else 0,
        )
    stamps = clock.stamps
    produced = out.shape[1] - len(prompt)
    if produced != new_tokens or len(stamps) != new_tokens:
        sys.exit(f"generate produced {produced} tokens ({len(stamps)} steps), not {new_tokens}")
    prefill = stamps[0] - start
    first_step = stamps[1] - stamps[0]
    rest = stamps[-1] - stamps[1]
    return prefill, first_step, rest, new_tokens - 2, out[0, len(prompt) :].tolist()[:8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--weights", default="f32,nf4,int8")
    parser.add_argument("--prompt-lens", default="32,512,2048")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.new_tokens < 3:
        sys.exit("--new-tokens must be at least 3")
    torch.set_num_threads(args.threads)
    # bitsandbytes warns once per int8 matmul that it casts f32 inputs to f16.
    warnings.filterwarnings("ignore", message=".*inputs will be cast from")
    torch.manual_seed(0)

    import bitsandbytes

    print(
        json.dumps(
            {
                "engine": "transformers",
                "versions": {
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "bitsandbytes": bitsandbytes.__version__,
                    "python": sys.version.split()[0],
                },
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )
    lens = [int(x) for x in args.prompt_lens.split(",") if x]
    for weights in [w for w in args.weights.split(",") if w]:
        model, load_s = load(args.model, weights)
        vocab = model.config.vocab_size
        warm = time.perf_counter()
        one_rep(model, synthetic_prompt(16, vocab), 4)
        warm_s = time.perf_counter() - warm
        for length in lens:
            prompt = synthetic_prompt(length, vocab)
            reps = [one_rep(model, prompt, args.new_tokens) for _ in range(args.reps)]
            prefill_tps = [length / r[0] for r in reps]
            decode_tps = [r[3] / r[2] for r in reps]
            print(
                json.dumps(
                    {
                        "engine": "transformers",
                        "model": args.model.name,
                        "weights": weights,
                        "cache": "dynamic",
                        "threads": torch.get_num_threads(),
                        "prompt_len": length,
                        "new_tokens": args.new_tokens,
                        "reps": args.reps,
                        "prefill_tok_s": statistics.median(prefill_tps),
                        "decode_tok_s": statistics.median(decode_tps),
                        "prefill_tok_s_all": prefill_tps,
                        "decode_tok_s_all": decode_tps,
                        "prefill_s": [r[0] for r in reps],
                        "first_decode_step_s": [r[1] for r in reps],
                        "decode_steps_s": [r[2] for r in reps],
                        "decode_steps": reps[0][3],
                        "load_s": load_s,
                        "warmup_s": warm_s,
                        "weight_bytes": weight_bytes(model),
                        "first_tokens": reps[0][4],
                    }
                ),
                flush=True,
            )
        del model


if __name__ == "__main__":
    main()
