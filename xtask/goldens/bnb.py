#!/usr/bin/env python3
"""Golden generator for cachet-quant: bitsandbytes 0.50.2 (CPU backend) formats and
transformers + bitsandbytes quantized tiny Llama checkpoints.

Run from the workspace root with the pinned venv (`cargo xtask goldens`); CI never runs it, the
outputs are committed under `crates/cachet-quant/tests/fixtures/`.

Outputs:

* `formats.safetensors` — per case `<case>.*` tensors (see `format_cases`):
  - 4-bit: `input` f32, `packed` u8 (bnb's `[(n+1)//2, 1]` flattened), `absmax` f32 (plain) or
    `qabsmax` u8 + `nested_absmax` f32 + `offset` f32[1] (double quant), `dequant` f32.
    Metadata `<case>` = JSON {kind, quant_type, blocksize, double_quant, shape}.
  - 8-bit blockwise (dynamic map): `input`, `q` u8, `absmax`, `dequant`.
  - LLM.int8 weights (`Int8Params` path: weight cast to f16 first): `input`, `CB` i8, `SCB` f32.
  - LLM.int8 matmul (`Linear8bitLt.eval()` forward, f32 input): `x`, `weight`, `bias`,
    `out_t0` (threshold 0), `out_t6` (threshold 6.0).
  - `tables.nf4`, `tables.fp4` (get_4bit_type), `tables.dynamic` (create_dynamic_map()),
    `tables.fp4_order` (the argsort bnb's quantize_4bit uses to map bucket -> FP4 code).
* `llama-nf4-dq/`, `llama-fp4/`, `llama-int8/` — `tests/fixtures/llama` loaded by transformers
  with `BitsAndBytesConfig` (nf4 + double quant; fp4; LLM.int8 threshold 6), saved with
  `save_pretrained` (config.json + model.safetensors), plus `reference.safetensors`: `a.input_ids`,
  `a.logits` (quantized model), `g.prompt_ids`, `g.tokens` (greedy, 12 new tokens).
* If `cachet-saved/<variant>/` exists (written by `cargo run -p cachet-quant --example
  save_fixtures`), each is loaded by transformers: its tensors must equal transformers' own
  quantization byte for byte and its greedy tokens must match; the result is recorded in
  `cachet-saved/transformers-check.json`.

bnb's CPU `Linear4bit` switches to an AVX512-BF16 packed bf16 kernel on CPUs that have it; the
generator disables that (`support_avx512bf16_for_cpu = False`) so goldens come from the portable
dequantize + `F.linear` path, independent of the machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from goldens_lib.safetensors_writer import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as F
import transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

SEED = 20241124
torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))



def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Format cases
# --------------------------------------------------------------------------------------------


def tie_block(code_sorted: torch.Tensor, n: int) -> torch.Tensor:
    """A block whose absmax is 1 and whose other values sit exactly on code midpoints."""
    mids = (code_sorted[:-1] + code_sorted[1:]) / 2
    vals = [1.0] + mids.tolist()
    vals = (vals * (n // len(vals) + 1))[:n]
    return torch.tensor(vals, dtype=torch.float32)


def make_input(gen: torch.Generator, shape, special: str | None = None) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * 0.7
    flat = x.reshape(-1)
    if special == "zeros":
        flat[: min(64, flat.numel())] = 0.0
    elif special == "outliers":
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)
        flat[idx] *= 40.0
    return flat.reshape(shape).contiguous()


def format_cases(gen: torch.Generator):
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    nf4 = F.get_4bit_type("nf4", device="cpu")
    fp4 = F.get_4bit_type("fp4", device="cpu")
    tensors["tables.nf4"] = nf4
    tensors["tables.fp4"] = fp4
    tensors["tables.dynamic"] = F.create_dynamic_map()
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    _, order = _get_4bit_quantize_bounds("fp4", torch.device("cpu"))
    tensors["tables.fp4_order"] = order.to(torch.int64)

    # ---- 4-bit ----
    shapes = [
        ((64, 64), None),
        ((33, 47), None),  # 1551 elements: odd, not divisible by any block size
        ((3, 5), None),  # smaller than one block
        ((40, 72), "zeros"),  # an all-zero block
        ((1, 200), "outliers"),
        ((16, 40), "ties"),
    ]
    n = 0
    for quant_type in ("nf4", "fp4"):
        for shape, special in shapes:
            for blocksize in (64, 32, 128, 4096) if shape == (33, 47) else (64,):
                for dq in (False, True):
                    if special == "ties":
                        code = nf4 if quant_type == "nf4" else fp4
                        x = tie_block(torch.sort(code).values, shape[0] * shape[1]).reshape(shape)
                        x = x * 0.37  # absmax 0.37: x * (1/absmax) rounds, ties exercised after scaling too
                        x[0, :] = tie_block(torch.sort(code).values, shape[1])  # absmax 1 exact ties
                    else:
                        x = make_input(gen, shape, special)
                    q, st = F.quantize_4bit(
                        x.clone(), blocksize=blocksize, compress_statistics=dq, quant_type=quant_type
                    )
                    deq = F.dequantize_4bit(q, st)
                    case = f"q4.{n}"
                    n += 1
                    tensors[f"{case}.input"] = x
                    tensors[f"{case}.packed"] = q.reshape(-1)
                    if dq:
                        tensors[f"{case}.qabsmax"] = st.absmax
                        tensors[f"{case}.nested_absmax"] = st.state2.absmax
                        tensors[f"{case}.nested_code"] = st.state2.code
                        tensors[f"{case}.offset"] = st.offset.reshape(1).float()
                        if st.state2.blocksize != 256:
                            raise RuntimeError("nested blocksize is not 256")
                    else:
                        tensors[f"{case}.absmax"] = st.absmax
                    tensors[f"{case}.dequant"] = deq.float()
                    meta[case] = json.dumps(
                        {"kind": "4bit", "quant_type": quant_type, "blocksize": blocksize, "double_quant": dq,
                         "shape": list(shape), "special": special}
                    )

    # ---- 8-bit blockwise (dynamic map) ----
    n = 0
    for shape, blocksize, special in [
        ((60, 50), 4096, None),
        ((60, 50), 256, "zeros"),
        ((7, 9), 64, None),
        ((1500,), 4096, "outliers"),
        ((1, 300), 256, "ties"),
    ]:
        if special == "ties":
            dyn = F.create_dynamic_map()
            dyn[0] = -1.0
            x = tie_block(dyn, shape[0] * shape[1]).reshape(shape)
        else:
            x = make_input(gen, shape, special)
        q, st = F.quantize_blockwise(x.clone(), blocksize=blocksize)
        deq = F.dequantize_blockwise(q, st)
        case = f"q8.{n}"
        n += 1
        tensors[f"{case}.input"] = x
        tensors[f"{case}.q"] = q.reshape(-1)
        tensors[f"{case}.absmax"] = st.absmax
        tensors[f"{case}.code"] = st.code
        tensors[f"{case}.dequant"] = deq.float()
        meta[case] = json.dumps({"kind": "8bit", "blocksize": blocksize, "shape": list(shape), "special": special})

    # ---- LLM.int8 weights ----
    n = 0
    for shape, special in [((48, 80), None), ((5, 33), "zero_row"), ((17, 200), "outliers")]:
        x = make_input(gen, shape, "outliers" if special == "outliers" else None)
        if special == "zero_row":
            x[2] = 0.0
        p = bnb.nn.Int8Params(x.clone(), requires_grad=False, has_fp16_weights=False)
        p = p._quantize("cpu")
        case = f"int8w.{n}"
        n += 1
        tensors[f"{case}.input"] = x
        tensors[f"{case}.CB"] = p.CB.contiguous()
        tensors[f"{case}.SCB"] = p.SCB.float()
        meta[case] = json.dumps({"kind": "int8_weight", "shape": list(shape), "special": special})

    # ---- LLM.int8 matmul ----
    n = 0
    for rows, (out_f, in_f) in [(5, (48, 80)), (1, (48, 80)), (3, (20, 33))]:
        w = make_input(gen, (out_f, in_f)) * 0.3
        b = torch.randn(out_f, generator=gen) * 0.1
        x = torch.randn(rows, in_f, generator=gen)
        # Outliers (|x| >= 6) in a few input columns, some only in one row.
        cols = torch.randperm(in_f, generator=gen)[:3]
        x[0, cols[0]] = 9.5
        x[-1, cols[1]] = -7.25
        x[:, cols[2]] = 6.0  # exactly the threshold: `>=` counts it
        case = f"int8mm.{n}"
        n += 1
        tensors[f"{case}.x"] = x
        tensors[f"{case}.weight"] = w
        tensors[f"{case}.bias"] = b
        for thr, key in ((0.0, "out_t0"), (6.0, "out_t6")):
            lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False, threshold=thr)
            lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
            lin.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
            lin.weight._quantize("cpu")
            lin.eval()
            with torch.no_grad():
                out = lin(x.clone())
            tensors[f"{case}.{key}"] = out.float()
        tensors[f"{case}.outlier_cols"] = torch.sort(cols).values.to(torch.int64)
        meta[case] = json.dumps({"kind": "int8_matmul", "rows": rows, "out": out_f, "in": in_f})
    return tensors, meta


# --------------------------------------------------------------------------------------------
# Model goldens
# --------------------------------------------------------------------------------------------

VARIANTS = {
    "llama-nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32),
    "llama-fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                      bnb_4bit_compute_dtype=torch.float32),
    "llama-int8": dict(load_in_8bit=True, llm_int8_threshold=6.0),
}
NEW_TOKENS = 12


def load_quantized(src: Path, kwargs: dict | None):
    # A pre-quantized checkpoint brings its own `quantization_config` (passing None overrides it).
    extra = {"quantization_config": BitsAndBytesConfig(**kwargs)} if kwargs is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(src), device_map="cpu", dtype=torch.float32, attn_implementation="eager", **extra
    )
    model.eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    ids = prompt.clone()
    toks, margin = [], math.inf
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, -1].float()
        top2 = torch.topk(logits, 2)
        margin = min(margin, float(top2.values[0] - top2.values[1]))
        toks.append(int(top2.indices[0]))
        ids = torch.cat([ids, torch.tensor([[toks[-1]]])], dim=1)
    return toks, margin


def load_st(path: Path) -> dict[str, torch.Tensor]:
    import safetensors

    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def model_goldens(root: Path, out: Path) -> dict:
    src = root / "tests" / "fixtures" / "llama"
    ref = load_st(src / "reference.safetensors")
    ids = ref["a.input_ids"]
    prompt = ref["g.prompt_ids"]
    results = {}
    for name, kwargs in VARIANTS.items():
        log(f"== {name}")
        model = load_quantized(src, kwargs)
        tmp = Path(tempfile.mkdtemp(prefix=f"cachet-bnb-{name}-"))
        try:
            # Save before any forward (forward may repack weights for CPU kernels).
            model.save_pretrained(str(tmp), safe_serialization=True)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
            toks, margin = greedy(model, prompt, NEW_TOKENS)
            # The saved checkpoint reloads in transformers with the same logits.
            re = load_quantized(tmp, None)
            with torch.no_grad():
                relogits = re(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
            d = float((relogits - logits).abs().max())
            if d > 1e-5:
                raise RuntimeError(f"{name}: reloaded logits differ by {d}")
            fp = load_quantized(src, None)
            with torch.no_grad():
                fplogits = fp(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
            info = {
                "generator": "xtask/goldens/bnb.py",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "bitsandbytes": bnb.__version__,
                "quantization": json.dumps({k: str(v) for k, v in kwargs.items()}),
                "g.min_top1_margin": f"{margin:.4f}",
                "reload_max_abs_diff": f"{d:.3e}",
                "max_abs_diff_vs_f32_model": f"{float((fplogits - logits).abs().max()):.4f}",
            }
            tensors = {
                "a.input_ids": ids.to(torch.int64),
                "a.logits": logits,
                "g.prompt_ids": prompt.to(torch.int64),
                "g.tokens": torch.tensor([toks], dtype=torch.int64),
            }
            save_file(tensors, tmp / "reference.safetensors", info)
            dst = out / name
            keep = {"config.json", "model.safetensors", "reference.safetensors"}
            if dst.exists():
                shutil.rmtree(dst)
            dst.mkdir(parents=True)
            for f in tmp.iterdir():
                if f.name in keep:
                    shutil.copy(f, dst / f.name)
            results[name] = {"tokens": toks, "logits": logits, "info": info}
            for k, v in info.items():
                log(f"   {k}: {v}")
            log(f"   tokens: {toks}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def check_cachet_saved(out: Path, results: dict) -> None:
    """Load the checkpoints cachet wrote with transformers; record the outcome."""
    saved = out / "cachet-saved"
    if not saved.is_dir():
        log("== cachet-saved/ missing: run `cargo run -p cachet-quant --example save_fixtures` first, then rerun")
        return
    report = {"generator": "xtask/goldens/bnb.py", "bitsandbytes": bnb.__version__,
              "transformers": transformers.__version__, "checks": {}}
    for name in sorted(p.name for p in saved.iterdir() if p.is_dir()):
        log(f"== cachet-saved/{name} -> transformers")
        entry: dict = {}
        try:
            model = load_quantized(saved / name, None)
            ref = load_st(out / name / "reference.safetensors")
            toks, _ = greedy(model, ref["g.prompt_ids"], NEW_TOKENS)
            entry["loads"] = True
            entry["greedy_tokens"] = toks
            entry["greedy_matches_transformers_quantized"] = toks == ref["g.tokens"][0].tolist()
            # Tensor-by-tensor comparison with transformers' own save of the same quantization.
            ours = load_st(saved / name / "model.safetensors")
            theirs = load_st(out / name / "model.safetensors")
            diff = sorted(set(ours) ^ set(theirs))
            entry["key_sets_equal"] = not diff
            if diff:
                entry["key_set_difference"] = diff[:20]
            unequal = [k for k in sorted(set(ours) & set(theirs))
                       if ours[k].dtype != theirs[k].dtype or ours[k].shape != theirs[k].shape
                       or not torch.equal(ours[k], theirs[k])]
            entry["tensors_bit_identical"] = not unequal
            if unequal:
                entry["unequal_tensors"] = unequal[:20]
        except Exception as exc:  # recorded, and the script fails below
            entry["loads"] = False
            entry["error"] = repr(exc)
        report["checks"][name] = entry
        log(f"   {json.dumps(entry)}")
    (saved / "transformers-check.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    bad = [n for n, e in report["checks"].items() if not e.get("loads") or not e.get("greedy_matches_transformers_quantized")]
    if bad:
        raise RuntimeError(f"cachet-saved checkpoints failing in transformers: {bad}")


def main() -> int:
    root = Path.cwd()
    if not (root / "Cargo.toml").exists() or not (root / "xtask").is_dir():
        print("run from the workspace root", file=sys.stderr)
        return 2
    out = root / "crates" / "cachet-quant" / "tests" / "fixtures"
    out.mkdir(parents=True, exist_ok=True)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb.__version__}")
    gen = torch.Generator().manual_seed(SEED)
    tensors, meta = format_cases(gen)
    meta.update({"generator": "xtask/goldens/bnb.py", "bitsandbytes": bnb.__version__, "torch": torch.__version__})
    save_file(tensors, out / "formats.safetensors", meta)
    log(f"formats: {len(meta)} entries")
    if "--formats-only" not in sys.argv:
        results = model_goldens(root, out)
        check_cachet_saved(out, results)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"fixtures total: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
