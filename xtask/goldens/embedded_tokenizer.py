#!/usr/bin/env python3
"""The embedded tiny Llama's tokenizer: a byte-level BPE of 512 tokens (the model's vocabulary)
trained with Hugging Face `tokenizers` on the committed public-domain text, plus a ChatML chat
template, so `cachet generate` on the embedded default takes and prints text. The model's
weights are random: what it prints is arbitrary words, in this vocabulary.

Run in the goldens venv from the workspace root:

    target/goldens-venv/bin/python -P xtask/goldens/embedded_tokenizer.py

Writes crates/cachet-models/assets/tiny-llama/tokenizer.json and tokenizer_config.json, and
crates/cachet-text/tests/fixtures/embedded_tokenizer.json (encodings for the Rust tests).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ASSETS = Path("crates/cachet-models/assets/tiny-llama")
TEXT = Path("tests/fixtures/text/alice.txt")
FIXTURE = Path("crates/cachet-text/tests/fixtures/embedded_tokenizer.json")
VOCAB = 512
# Ids 0, 1, 2 as the embedded config.json has them (pad, bos, eos); the chat markers after.
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = TEXT.read_text(encoding="utf-8").splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    assert tokenizer.get_vocab_size() == VOCAB, tokenizer.get_vocab_size()
    for i, token in enumerate(SPECIALS):
        assert tokenizer.token_to_id(token) == i, token

    ASSETS.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(ASSETS / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    (ASSETS / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # What transformers makes of the files: the Rust tests compare with these.
    fast = PreTrainedTokenizerFast(tokenizer_file=str(ASSETS / "tokenizer.json"), **{
        k: v for k, v in config.items() if k.endswith("_token")
    })
    fast.chat_template = CHAT_TEMPLATE
    texts = ["Alice was beginning to get very tired.", "Down the Rabbit-Hole — ünïcode 😀"]
    messages = [{"role": "user", "content": "Who is Alice?"}]
    rendered = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    golden = {
        "encodings": [{"text": t, "ids": fast.encode(t)} for t in texts],
        "chat": {"messages": messages, "rendered": rendered, "ids": fast.encode(rendered)},
    }
    FIXTURE.write_text(json.dumps(golden, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {ASSETS}/tokenizer.json ({VOCAB} tokens), tokenizer_config.json, {FIXTURE}")


if __name__ == "__main__":
    main()
