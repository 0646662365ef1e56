#!/usr/bin/env python3
"""Golden of the `llama` (SentencePiece) GGUF tokenizer: a small SentencePiece BPE model (byte
fallback, 400 pieces) trained on the committed public-domain text, written into a GGUF file the
way llama.cpp's converter writes one (`tokenizer.ggml.model = "llama"`, tokens, scores, token
types, bos/eos/unk ids, `add_bos_token`), with transformers' own GGUF tokenizer conversion
encoding a few strings and the start of the text.

Run by `cargo xtask goldens --only gguf_llama_tokenizer`; writes
crates/cachet-text/tests/fixtures/llama_tokenizer.gguf and llama_tokenizer.json.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import gguf
import sentencepiece as spm
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "tests" / "fixtures" / "text" / "alice.txt"
OUT = ROOT / "crates" / "cachet-text" / "tests" / "fixtures"
STRINGS = [
    "Alice was beginning to get very tired of sitting by her sister",
    "  Down the Rabbit-Hole\n\twith two  spaces",
    "ünïcödé, emoji 😀 and 日本語 fall back to bytes",
]


def main() -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.read_text(encoding="utf-8").splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "llama_tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    # The few llama.* keys transformers' GGUF config reader needs; no tensors.
    writer.add_context_length(128)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(8)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tok = AutoTokenizer.from_pretrained(str(OUT), gguf_file=path.name)
    text = TEXT.read_text(encoding="utf-8")
    cases = [{"text": s, "ids": tok(s)["input_ids"]} for s in STRINGS]
    cases.append({"text_prefix_chars": 2000, "ids": tok(text[:2000])["input_ids"]})
    golden = {
        "meta": {
            "generator": "xtask/goldens/gguf_llama_tokenizer.py",
            "transformers": transformers.__version__,
            "sentencepiece": spm.__version__,
            "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "?",
        },
        "cases": cases,
        "decoded": [tok.decode(c["ids"], skip_special_tokens=True) for c in cases[:3]],
    }
    (OUT / "llama_tokenizer.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes), {len(tokens)} pieces")
    for c in cases[:3]:
        print(c["text"][:30], c["ids"][:12])


if __name__ == "__main__":
    main()
