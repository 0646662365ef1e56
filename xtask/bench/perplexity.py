#!/usr/bin/env python3
"""transformers' side of `cargo xtask bench --perplexity`: perplexity of a Hugging Face folder
on a text, with the sliding-window recipe of transformers' "Perplexity of fixed-length models"
guide and cachet's exact per-token sum (`cachet perplexity` computes the same windows).

    python -P xtask/bench/perplexity.py --model DIR --text FILE --rows f32,nf4,... \
        [--context 512 --stride 256 --max-tokens N --chunk 64 --threads 2]

Rows: `f32`; bitsandbytes weights `nf4`, `nf4-dq`, `fp4`, `int8`, `int8-t0` (threshold 0);
quantized KV caches `quanto-4`, `quanto-2`, `hqq-4`, `hqq-2` (axes 0, group 64, residual 128), fed
`--chunk` tokens per forward so the cache is read. One JSON line per row on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def windows(n: int, context: int, stride: int):
    prev_end, begin = 0, 0
    while begin < n:
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)
        if first < end:
            yield begin, end, first
        prev_end = end
        if end == n:
            break
        begin += stride


def load(model_dir: str, row: str):
    kwargs = {"dtype": torch.float32}
    if row in ("nf4", "nf4-dq", "fp4", "int8", "int8-t0"):
        from transformers import BitsAndBytesConfig

        if row.startswith("int8"):
            q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0 if row == "int8-t0" else 6.0)
        else:
            q = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="fp4" if row == "fp4" else "nf4",
                bnb_4bit_use_double_quant=row == "nf4-dq",
                bnb_4bit_compute_dtype=torch.float32,
            )
        kwargs["quantization_config"] = q
        kwargs["device_map"] = "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def make_cache(model, row: str):
    if row.split("-")[0] not in ("quanto", "hqq"):
        return None
    from transformers import QuantizedCache

    backend, bits = row.split("-")
    return QuantizedCache(
        backend=backend,
        config=model.config,
        nbits=int(bits),
        axis_key=0,
        axis_value=0,
        q_group_size=64,
        residual_length=128,
    )


def perplexity(model, ids: list[int], row: str, context: int, stride: int, chunk: int):
    total, scored, start = 0.0, 0, time.perf_counter()
    plan = list(windows(len(ids), context, stride))
    with torch.no_grad():
        for begin, end, first in plan:
            cache = make_cache(model, row)
            step = (end - begin) if (cache is None or chunk == 0) else chunk
            at = begin
            while at < end:
                stop = min(at + step, end)
                piece = torch.tensor([ids[at:stop]])
                kwargs = {"use_cache": cache is not None}
                if cache is not None:
                    kwargs["past_key_values"] = cache
                logits = model(piece, **kwargs).logits[0].float()
                lo, hi = max(first - 1, at), min(stop, end - 1)
                if hi > lo:
                    rows = logits[lo - at : hi - at]
                    targets = torch.tensor(ids[lo + 1 : hi + 1])
                    nll = torch.nn.functional.cross_entropy(rows.double(), targets, reduction="sum")
                    total += nll.item()
                    scored += hi - lo
                at = stop
    mean = total / scored
    return {
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "tokens_scored": scored,
        "windows": len(plan),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    # optimum-quanto builds its C++ kernels with the venv's ninja: its bin folder goes on PATH
    # even when the venv's python is run directly.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--rows", default="f32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(args.text, encoding="utf-8") as f:
        ids = tokenizer(f.read())["input_ids"]
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    model, loaded = None, None
    for row in args.rows.split(","):
        weights = row if row in ("nf4", "nf4-dq", "fp4", "int8", "int8-t0") else "f32"
        try:
            if loaded != weights:
                model, loaded = load(args.model, weights), weights
            result = perplexity(model, ids, row, args.context, args.stride, args.chunk)
            print(json.dumps({"row": row, "tokens": len(ids), "versions": versions, **result}), flush=True)
        except Exception as e:  # one failing row must not hide the others
            print(json.dumps({"row": row, "error": f"{type(e).__name__}: {e}"}), flush=True)
            print(f"{row}: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
