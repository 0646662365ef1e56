#!/usr/bin/env python3
"""Golden generator for cachet-tensor's GGUF reader and dequantizers.

Writes, with fixed seeds, a small GGUF file through gguf-py's `GGUFWriter` and the values
gguf-py's reader and `gguf.quants.dequantize` give for each of its tensors. Run in the goldens
venv (`cargo xtask goldens --only gguf_io`); CI never runs it, the outputs are committed.
(Not named `gguf.py`: that would shadow the `gguf` package for every script in this folder.)
Outputs, under `crates/cachet-tensor/tests/fixtures/gguf/`:

* `types.gguf` (version 3, `general.alignment` 64):
  - metadata of every value type: `test.u8` ... `test.f64`, `test.bool_true`, `test.bool_false`,
    `test.string`, `test.empty_string`, arrays `test.array.<type>` of every element type,
    nested arrays `test.array.nested_i32`, `test.array.nested_str`, `test.array.nested3_f32`
    (values: see `METADATA` below, mirrored by the Rust test), and `test.ggml_sizes`, gguf-py's
    `[type id, block size, type size]` table for every ggml type (arrays of i32 arrays);
  - one tensor `t.<TYPE>` per dequantizable type: F32, F16 (normal, subnormal, infinite, NaN
    and signed-zero values), BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 made by `gguf.quants.quantize`
    from seeded normal data (with an all-zero block and a constant block), and Q2_K, Q3_K,
    Q4_K, Q5_K, Q6_K, Q8_K as seeded random block bytes whose scale fields hold finite f16
    (Q8_K: f32) scales; plus `t.Q8_0_3d` (a rank-3 tensor) and `t.I32` (not dequantizable).
* `expected.safetensors`: for each dequantizable tensor, its f32 values as gguf-py's
  `GGUFReader` + `gguf.quants.dequantize` return them (row-major, shape reversed from GGUF's
  dims), under the same name. gguf-py has no Q8_K dequantizer, so `t.Q8_K` is
  `d * q` computed here in f32 from the block fields (the definition in ggml-quants.c).

Outputs are byte-reproducible.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from goldens_lib.safetensors_writer import save_file

SEED = 20261205
OUT = Path(__file__).resolve().parents[2] / "crates/cachet-tensor/tests/fixtures/gguf"

# (key, value, type, array element type) — mirrored in crates/cachet-tensor/tests/gguf_io.rs.
METADATA = [
    ("test.u8", 200, V.UINT8, None),
    ("test.i8", -100, V.INT8, None),
    ("test.u16", 60000, V.UINT16, None),
    ("test.i16", -30000, V.INT16, None),
    ("test.u32", 4_000_000_000, V.UINT32, None),
    ("test.i32", -2_000_000_000, V.INT32, None),
    ("test.u64", 18_446_744_073_709_551_000, V.UINT64, None),
    ("test.i64", -9_000_000_000_000_000_000, V.INT64, None),
    ("test.f32", 123.456, V.FLOAT32, None),
    ("test.f64", 2.718281828459045, V.FLOAT64, None),
    ("test.bool_true", True, V.BOOL, None),
    ("test.bool_false", False, V.BOOL, None),
    ("test.string", "héllo ✓ GGUF", V.STRING, None),
    ("test.empty_string", "", V.STRING, None),
    ("test.array.u8", [0, 1, 255], V.ARRAY, V.UINT8),
    ("test.array.i8", [-128, 0, 127], V.ARRAY, V.INT8),
    ("test.array.u16", [0, 65535], V.ARRAY, V.UINT16),
    ("test.array.i16", [-32768, 32767], V.ARRAY, V.INT16),
    ("test.array.u32", [1, 4_294_967_295], V.ARRAY, V.UINT32),
    ("test.array.i32", [-2_147_483_648, 7], V.ARRAY, V.INT32),
    ("test.array.u64", [18_446_744_073_709_551_615], V.ARRAY, V.UINT64),
    ("test.array.i64", [-9_223_372_036_854_775_808, 9_223_372_036_854_775_807], V.ARRAY, V.INT64),
    ("test.array.f32", [0.5, -1.25, 1e-3], V.ARRAY, V.FLOAT32),
    ("test.array.f64", [1e300, -2.5], V.ARRAY, V.FLOAT64),
    ("test.array.bool", [True, False, True], V.ARRAY, V.BOOL),
    ("test.array.str", ["a", "", "ünï", "<|im_end|>"], V.ARRAY, V.STRING),
    ("test.array.nested_i32", [[1, 2], [3]], V.ARRAY, V.ARRAY),
    ("test.array.nested_str", [["x"], ["y", "z"]], V.ARRAY, V.ARRAY),
    ("test.array.nested3_f32", [[[1.5, -2.0]], [[0.25]]], V.ARRAY, V.ARRAY),
]

QUANTIZED = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# Byte offsets of each K-quant block's f16 scale fields (Q8_K: one f32 scale at 0).
K_SCALES = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_f16_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite f16 scales of either sign, magnitudes spread over [1e-4, 1]."""
    mag = 10.0 ** rng.uniform(-4, 0, size=n)
    sign = rng.choice([-1.0, 1.0], size=n)
    return (mag * sign).astype(np.float16)


def k_blocks(rng: np.random.Generator, qtype: T, rows: int, blocks_per_row: int) -> np.ndarray:
    """Random block bytes `[rows, blocks_per_row * type_size]` with sane scale fields."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    if qtype == T.Q8_K:
        d = (10.0 ** rng.uniform(-4, -1, size=rows * blocks_per_row)).astype(np.float32)
        raw[:, 0:4] = d.view(np.uint8).reshape(-1, 4)
    else:
        for off in K_SCALES[qtype]:
            raw[:, off : off + 2] = random_f16_scales(rng, rows * blocks_per_row).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * type_size)


def q8_k_reference(raw: np.ndarray) -> np.ndarray:
    """`d * q` per block: f32 scale, 256 signed bytes (ggml's dequantize_row_q8_K)."""
    blocks = raw.reshape(-1, 292)
    d = blocks[:, 0:4].copy().view(np.float32)
    q = blocks[:, 4:260].view(np.int8).astype(np.float32)
    return (d * q).reshape(raw.shape[0], -1)


def special_f32() -> np.ndarray:
    return np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-42, 65504.0, 1e38, -3.5], dtype=np.float32
    )


def special_f16() -> np.ndarray:
    bits = np.array([0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x0001, 0x83FF, 0x7BFF, 0x3C00, 0xC500], dtype=np.uint16)
    return bits.view(np.float16)


def build(rng: np.random.Generator, path: Path) -> dict[str, np.ndarray]:
    """Writes the GGUF file; returns the Q8_K reference computed here."""
    w = gguf.GGUFWriter(path, arch="cachet-test")
    w.add_custom_alignment(64)
    for key, value, vtype, sub in METADATA:
        w.add_key_value(key, value, vtype, sub_type=sub)
    sizes = [[int(t), b, s] for t, (b, s) in sorted(gguf.GGML_QUANT_SIZES.items())]
    w.add_key_value("test.ggml_sizes", sizes, V.ARRAY, sub_type=V.ARRAY)

    f32 = rng.standard_normal((3, 10)).astype(np.float32)
    f32[0] = special_f32()
    w.add_tensor("t.F32", f32)

    f16 = (rng.standard_normal((2, 10)) * 4).astype(np.float16)
    f16[0] = special_f16()
    w.add_tensor("t.F16", f16)

    bf = rng.standard_normal((4, 10)).astype(np.float32) * 100
    bf[0] = special_f32()
    w.add_tensor("t.BF16", gguf.quants.quantize(bf, T.BF16), raw_dtype=T.BF16)

    for qtype in QUANTIZED:
        data = (rng.standard_normal((3, 64)) * rng.uniform(0.01, 10)).astype(np.float32)
        data[1, :32] = 0.0  # a zero block: scale 0
        data[2, 32:] = 0.75  # a constant block
        w.add_tensor(f"t.{qtype.name}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    data3 = rng.standard_normal((2, 3, 32)).astype(np.float32)
    w.add_tensor("t.Q8_0_3d", gguf.quants.quantize(data3, T.Q8_0), raw_dtype=T.Q8_0)

    refs = {}
    for qtype in [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K]:
        raw = k_blocks(rng, qtype, rows=2, blocks_per_row=1)
        w.add_tensor(f"t.{qtype.name}", raw, raw_dtype=qtype)
        if qtype == T.Q8_K:
            refs["t.Q8_K"] = q8_k_reference(raw)

    w.add_tensor("t.I32", np.array([1, -2, 3, 2_000_000_000], dtype=np.int32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return refs


def expected(path: Path, refs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """What gguf-py's reader and dequantizer give for each tensor of the written file."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        if t.tensor_type == T.I32:
            continue
        if t.tensor_type == T.Q8_K:
            values = refs[t.name]
        else:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        values = np.ascontiguousarray(values, dtype=np.float32)
        assert list(values.shape) == [int(d) for d in reversed(t.shape)], t.name
        out[t.name] = torch.from_numpy(values.copy())
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    gguf_path = OUT / "types.gguf"
    refs = build(rng, gguf_path)
    values = expected(gguf_path, refs)
    save_file(
        values,
        OUT / "expected.safetensors",
        {"generator": "xtask/goldens/gguf_io.py", "gguf": metadata.version("gguf"), "seed": SEED},
    )
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(values)} expected tensors, {total} bytes under {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
