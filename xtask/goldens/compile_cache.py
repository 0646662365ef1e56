#!/usr/bin/env python3
"""Golden generator for cachet-compile: optimum-neuron 0.4.5 cache-entry hashes.

Computes `hash`, `arch_digest` and the serialised text of `SingleModelCacheEntry` with
optimum-neuron's own code for a set of configs (non-ASCII strings, floats in every repr regime,
nested objects, volatile keys to drop, a `neuron` key embedded in the config, no task, and the
numbers only Python's JSON has: `NaN`, `Infinity`, `-Infinity`, integers beyond 64 bits up to
Python's 4300-digit limit, and raw `config.json` text with `1e400`, `-1e-400`, `-0` and duplicate
keys), and writes them to `crates/cachet-compile/tests/fixtures/entry_hashes.json`. The Rust
tests recompute every value and must match byte for byte.

optimum-neuron 0.4.5 installs with `pip install --no-deps` (see requirements-compile.txt): its
package `__init__` imports transformers 4.57 / torch, so this script loads the `cache/entries`
modules directly, with stub packages standing in for the parts it does not use (the entries
only use `transformers.PretrainedConfig` in `isinstance` checks, and we pass dicts).

With `--hub-server URL` it also checks the fidelity of the loopback Hub test server: the official
`huggingface_hub` client creates a repo, uploads a folder, uploads a file above the LFS threshold
through the Git LFS flow (preupload answering "lfs", the LFS batch API, multipart parts of
`LFS_PART_SIZE`, verify, a commit naming the object), lists the tree, downloads files and
deletes a file and a folder (commits with `deletedFile` / `deletedFolder`) through the server,
and the outcomes are written to `tests/fixtures/hub_fidelity.json`. Xet storage is disabled
(`HF_HUB_DISABLE_XET=1`): the loopback server speaks the LFS protocol only.

Run from the workspace root: `cargo xtask goldens --only compile_cache` (which prepares its own
venv from requirements-compile.txt with `--no-deps` and passes `--hub-server auto`), or by hand
`python xtask/goldens/compile_cache.py [--hub-server URL|auto]`; `auto` starts the server with
`cargo run -q -p cachet-compile --example loopback_hub -- --part-size LFS_PART_SIZE` and stops it
at the end (a server given by URL must use the same part size).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The LFS path of huggingface_hub, not Xet storage (read when huggingface_hub is imported).
os.environ["HF_HUB_DISABLE_XET"] = "1"
# Parts of multipart LFS uploads on the loopback server; the LFS file below takes three.
LFS_PART_SIZE = 5 << 20
# Above the Hub's 10 MiB LFS threshold.
LFS_FILE_SIZE = 12 << 20
FIXTURES = ROOT / "crates" / "cachet-compile" / "tests" / "fixtures"


def load_entries():
    """Imports optimum.neuron.cache.entries.single_model without the optimum-neuron package init."""
    import importlib.util

    spec = importlib.util.find_spec("optimum")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("optimum-neuron 0.4.5 is not installed (pip install --no-deps optimum-neuron==0.4.5)")
    optimum_dir = Path(list(spec.submodule_search_locations)[0])
    neuron_dir = optimum_dir / "neuron"

    def package(name, path):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
        return mod

    # transformers is only used for isinstance checks and Hub loading, neither of which we use.
    transformers = types.ModuleType("transformers")

    class PretrainedConfig:  # noqa: D401 - stand-in
        pass

    class AutoConfig:
        pass

    transformers.PretrainedConfig = PretrainedConfig
    transformers.AutoConfig = AutoConfig
    sys.modules.setdefault("transformers", transformers)

    package("optimum", optimum_dir)
    package("optimum.neuron", neuron_dir)
    package("optimum.neuron.cache", neuron_dir / "cache")
    package("optimum.neuron.cache.entries", neuron_dir / "cache" / "entries")
    configuration_utils = types.ModuleType("optimum.neuron.configuration_utils")

    class NeuronConfig:
        pass

    configuration_utils.NeuronConfig = NeuronConfig
    sys.modules["optimum.neuron.configuration_utils"] = configuration_utils

    import importlib.metadata

    version = importlib.metadata.version("optimum-neuron")
    if version != "0.4.5":
        sys.exit(f"optimum-neuron {version} installed, the goldens pin 0.4.5")
    single = importlib.import_module("optimum.neuron.cache.entries.single_model")
    cache_entry = importlib.import_module("optimum.neuron.cache.entries.cache_entry")
    return single.SingleModelCacheEntry, cache_entry.ModelCacheEntry, version


LLAMA = {
    "_name_or_path": "meta-llama/Llama-3.2-1B",
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

NEURON_LLAMA = {
    "batch_size": 4,
    "sequence_length": 4096,
    "tp_degree": 2,
    "torch_dtype": "bfloat16",
    "target": "trn1",
    "checkpoint_id": "meta-llama/Llama-3.2-1B",
    "checkpoint_revision": "4e20de362430cd3b72f300e6b0f18e50e7166e08",
    "compiler_type": "neuronx-cc",
    "compiler_version": "2.19.8089.0+8ab9f450",
    "compiler_flags": ["--auto-cast=none", "--model-type=transformer", "-O1"],
    "optimum_neuron_version": "0.4.5",
}


def cases():
    """(name, model_id, task, config, neuron_config) tuples covering the serialisation corners."""
    out = []
    out.append(("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "text-generation", LLAMA, NEURON_LLAMA))
    other = dict(NEURON_LLAMA, batch_size=1)
    out.append(("llama-batch-1", "meta-llama/Llama-3.2-1B", "text-generation", LLAMA, other))
    out.append(("llama-no-task", "meta-llama/Llama-3.2-1B", None, LLAMA, NEURON_LLAMA))
    # Non-ASCII everywhere: keys, values, astral-plane characters (surrogate pairs), controls.
    unicode_cfg = {
        "model_type": "qwen2",
        "label": "modèle à l'œuvre — 模型 😀",
        "id2label": {"0": "négatif", "1": "positif ✓", "2": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"},
        "ключ": "значение",
        "quote\"and\\backslash": "tab\there\nnewline\r\x00\x1f\x7f\u2028",
        "empty": {},
        "empty_list": [],
        "nested": {"deep": {"deeper": [1, [2, [3, {"z": None, "a": True, "b": False}]]]}},
    }
    out.append(("unicode", "org/modèle-ü", "text-generation", unicode_cfg, {"batch_size": 1}))
    # Floats in every repr regime of Python.
    float_cfg = {
        "model_type": "mistral",
        "values": [
            0.1, 0.2, 0.30000000000000004, 1e-05, 1e-4, 0.0001, 0.00001234, 1e16, 1e15,
            123456789012345678.0, 1.5e300, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
            -0.0, 0.0, 100.0, 3.141592653589793, 2.718281828459045, 1 / 3, 2 / 3, 1e22, 1e21,
            9007199254740993, -9223372036854775808, 18446744073709551615, 12345.678e-10,
        ],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 4096,
    }
    out.append(("floats", "mistralai/Mistral-7B-v0.3", "text-generation", float_cfg, {"x": 0.5}))
    # Volatile keys are dropped and a `neuron` key inside the config is used (legacy path).
    legacy = dict(LLAMA)
    legacy["neuron"] = {"batch_size": 2, "compiler_version": "2.15.0", "auto_cast": None}
    legacy["return_dict"] = False
    legacy["pad_token_id"] = 0
    legacy["_commit_hash"] = "abc"
    out.append(("legacy-embedded-neuron", "meta-llama/Llama-3.2-1B", "text-generation", legacy, None))
    # Numbers only Python's json has: json.dumps writes NaN / Infinity / -Infinity (allow_nan=True)
    # and ints of any size; optimum-neuron hashes that text.
    special_cfg = {
        "model_type": "llama",
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "rope_scaling": {"factor": float("inf"), "beta": [float("nan"), -0.0, 1e-05, float("-inf")]},
        "big_ints": [2**64, 2**64 - 1, -(2**63) - 1, 2**127, -(10**80), 10**300 + 7],
        "max_position_embeddings": 10**30,
    }
    special_neuron = {"batch_size": 2**70, "eps": float("nan"), "scale": float("-inf"), "ok": 1.5}
    out.append(("python-special-numbers", "org/special", "text-generation", special_cfg, special_neuron))
    # Raw config.json text (a str case is hashed from this text as json.loads reads it): floats
    # that overflow to infinities or underflow to (signed) zero, `-0` as an int, the last of
    # duplicate keys, and an int at Python's 4300-digit limit.
    raw = (
        '{"model_type": "gpt2", "overflow": 1e400, "neg_overflow": -1e400, "underflow": -1e-400,'
        ' "minus_zero_int": -0, "dup": 1, "dup": NaN, "limit": 1' + "0" * 4299 + "}"
    )
    out.append(("python-json-text", "gpt2", None, raw, None))
    # No compilation factors at all (neuron null).
    out.append(("no-neuron", "gpt2", "feature-extraction", {"model_type": "gpt2", "n_embd": 768}, None))
    return out


def entry_goldens():
    Single, Base, version = load_entries()
    records = []
    for name, model_id, task, config, neuron in cases():
        # The JSON fixture is what Rust reads; round-trip it exactly like a config.json load.
        config_text = config if isinstance(config, str) else json.dumps(config, ensure_ascii=False)
        neuron_text = json.dumps(neuron, ensure_ascii=False)
        entry = Single(model_id, task, json.loads(config_text), json.loads(neuron_text))
        text = entry.serialize()
        # Deserialize through optimum-neuron too: the hash must survive a registry round trip.
        again = Base.deserialize(text)
        assert again.hash == entry.hash, name
        records.append(
            {
                "name": name,
                "model_id": model_id,
                "task": task,
                "config_json": config_text,
                "neuron_json": None if neuron is None else neuron_text,
                "serialized": text,
                "hash": entry.hash,
                "arch_digest": entry.arch_digest(),
                "model_type": entry.model_type,
            }
        )
        print(f"{name:<24} {entry.hash} {entry.arch_digest()[:16]}…")
    return {"optimum_neuron_version": version, "entries": records}


def hub_fidelity(url: str):
    """Drives the official huggingface_hub client against the loopback Hub test server."""
    import huggingface_hub
    from huggingface_hub import HfApi, hf_hub_download

    token = "hf_write_token_for_tests"
    api = HfApi(endpoint=url, token=token)
    results = {"huggingface_hub_version": huggingface_hub.__version__, "steps": []}

    def step(name, fn):
        try:
            value = fn()
            results["steps"].append({"step": name, "ok": True, "value": value})
        except Exception as e:  # recorded, and fails the run below
            results["steps"].append({"step": name, "ok": False, "error": f"{type(e).__name__}: {e}"})

    repo = "alice/py-cache"
    step("whoami", lambda: api.whoami()["name"])
    step("create_repo", lambda: api.create_repo(repo, private=True).repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        module = Path(tmp) / "neuronxcc-2.0" / "MODULE_0123456789abcdef0123"
        module.mkdir(parents=True)
        payload = bytes(range(256)) * 4096 + "é".encode()
        (module / "model.neff").write_bytes(payload)
        (module / "compile_flags.json").write_text('["-O1"]')
        step(
            "upload_folder",
            lambda: bool(api.upload_folder(repo_id=repo, folder_path=tmp, commit_message="py upload").oid),
        )
        step(
            "list_repo_tree",
            lambda: sorted(
                (f.path, f.size) for f in api.list_repo_tree(repo, recursive=True) if hasattr(f, "size")
            ),
        )
        step("repo_info_private", lambda: api.repo_info(repo).private)
        with tempfile.TemporaryDirectory() as dl:
            path = "neuronxcc-2.0/MODULE_0123456789abcdef0123/model.neff"
            step(
                "hf_hub_download_sha256",
                lambda: hashlib.sha256(
                    Path(hf_hub_download(repo, path, endpoint=url, token=token, cache_dir=dl)).read_bytes()
                ).hexdigest()
                == hashlib.sha256(payload).hexdigest(),
            )
    # A file above the LFS threshold: preupload says "lfs", then the LFS batch API, parts, verify,
    # and a commit naming the object by its SHA-256 (the server refuses it inline).
    big = bytes((i * 31) % 251 for i in range(LFS_FILE_SIZE))
    big_path = "neuronxcc-2.0/MODULE_0123456789abcdef0123/big.neff"
    step("upload_lfs_file", lambda: bool(api.upload_file(path_or_fileobj=big, path_in_repo=big_path, repo_id=repo).oid))
    step(
        "lfs_tree",
        lambda: [
            [f.path, f.size, f.lfs.sha256 if f.lfs else None]
            for f in api.list_repo_tree(repo, recursive=True)
            if getattr(f, "path", None) == big_path
        ],
    )
    step("lfs_sha256", lambda: hashlib.sha256(big).hexdigest())
    with tempfile.TemporaryDirectory() as dl:
        step(
            "lfs_download_equal",
            lambda: Path(hf_hub_download(repo, big_path, endpoint=url, token=token, cache_dir=dl)).read_bytes() == big,
        )
    # Deletions in commits, as `huggingface_hub` sends them: `deletedFile` and `deletedFolder`.
    old = "neuronxcc-1.9/MODULE_old/old.neff"
    step("upload_file", lambda: bool(api.upload_file(path_or_fileobj=b"old", path_in_repo=old, repo_id=repo).oid))
    step("delete_folder", lambda: bool(api.delete_folder("neuronxcc-1.9", repo_id=repo).oid))
    step(
        "delete_file",
        lambda: bool(api.delete_file("neuronxcc-2.0/MODULE_0123456789abcdef0123/compile_flags.json", repo_id=repo).oid),
    )
    step("tree_after_deletes", lambda: sorted(f.path for f in api.list_repo_tree(repo, recursive=True) if hasattr(f, "size")))
    step("delete_missing_file_rejected", lambda: _raises(lambda: api.delete_file("nope.bin", repo_id=repo)))
    anon = HfApi(endpoint=url, token=False)
    step("anonymous_private_repo_info_rejected", lambda: _raises(lambda: anon.repo_info(repo)))
    step("missing_file_404", lambda: _raises(lambda: hf_hub_download(repo, "nope.bin", endpoint=url, token=token)))
    failed = [s for s in results["steps"] if not s["ok"] or s["value"] is False]
    return results, failed


def _raises(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub-server", help="base URL of a running loopback Hub test server")
    args = parser.parse_args()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    goldens = entry_goldens()
    out = FIXTURES / "entry_hashes.json"
    out.write_text(json.dumps(goldens, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")
    if args.hub_server:
        server = None
        url = args.hub_server
        if url == "auto":
            import subprocess

            server = subprocess.Popen(
                [
                    "cargo", "run", "-q", "-p", "cachet-compile", "--example", "loopback_hub",
                    "--", "--part-size", str(LFS_PART_SIZE),
                ],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            url = server.stdout.readline().strip()
            if not url.startswith("http://127.0.0.1:"):
                sys.exit(f"loopback Hub server did not start: {url!r}")
        try:
            results, failed = hub_fidelity(url)
        finally:
            if server is not None:
                server.stdin.close()
                server.wait(timeout=30)
        out = FIXTURES / "hub_fidelity.json"
        out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out.relative_to(ROOT)}")
        if failed:
            sys.exit(f"huggingface_hub disagrees with the test server: {failed}")


if __name__ == "__main__":
    main()
