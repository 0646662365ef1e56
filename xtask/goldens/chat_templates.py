#!/usr/bin/env python3
"""Goldens of cachet-text: chat templates rendered by transformers' `apply_chat_template`
(tokenize=False) and SmolLM2's tokenizer encoding and decoding a few strings.

Run in the goldens venv from the workspace root:

    target/goldens-venv/bin/python -P xtask/goldens/chat_templates.py [MODEL_DIR]

MODEL_DIR is the SmolLM2-135M-Instruct folder (default target/models/SmolLM2-135M-Instruct, made
by `cargo xtask fetch-model smollm2`); its tokenizer supplies bos/eos tokens to the templates.
Writes crates/cachet-text/tests/fixtures/chat_templates.json and tokenizer_goldens.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import transformers
from transformers import AutoTokenizer

FIXTURES = Path("crates/cachet-text/tests/fixtures")

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "  Capital of Italy?  "},
    ],
    "multi": [
        {"role": "user", "content": "Q: Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke 😀 — in Français."},
    ],
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "Name <city>"}},
                "required": ["city"],
            },
        },
    }
]

TOKENIZER_STRINGS = [
    "Hello, world!",
    "What is the capital of France?",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "Unicode: naïve café 東京 😀 — done.",
    "<|im_start|>user\nHi<|im_end|>\n",
    "numbers 1234567 and code: fn main() { println!(\"hi\"); }",
]


def main() -> None:
    model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "target/models/SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    cases = []
    for name in ["smollm2", "llama3", "qwen2_5", "controls"]:
        template = (FIXTURES / f"{name}.jinja").read_text()
        for conv_name, messages in CONVERSATIONS.items():
            for add_generation_prompt in (True, False):
                for tools in ([None, TOOLS] if name in ("qwen2_5", "controls") else [None]):
                    text = tok.apply_chat_template(
                        messages,
                        chat_template=template,
                        tokenize=False,
                        add_generation_prompt=add_generation_prompt,
                        tools=tools,
                    )
                    cases.append(
                        {
                            "template": f"{name}.jinja",
                            "messages": messages,
                            "add_generation_prompt": add_generation_prompt,
                            "tools": tools,
                            "expected": text,
                        }
                    )
    out = {
        "transformers": transformers.__version__,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "cases": cases,
    }
    (FIXTURES / "chat_templates.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")

    encodings = []
    for text in TOKENIZER_STRINGS:
        with_special = tok(text, add_special_tokens=True)["input_ids"]
        without = tok(text, add_special_tokens=False)["input_ids"]
        encodings.append(
            {
                "text": text,
                "ids": with_special,
                "ids_no_special": without,
                "decoded": tok.decode(with_special),
                "decoded_skip_special": tok.decode(with_special, skip_special_tokens=True),
            }
        )
    tok_out = {"transformers": transformers.__version__, "model": model_dir.name, "cases": encodings}
    (FIXTURES / "tokenizer_goldens.json").write_text(json.dumps(tok_out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} template cases and {len(encodings)} tokenizer cases")


if __name__ == "__main__":
    main()
