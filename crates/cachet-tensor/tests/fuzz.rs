//! Property-based fuzzing of cachet-tensor's parsers: the safetensors header
//! (`Checkpoint::from_bytes`), the sharded index (`model.safetensors.index.json` through
//! `Checkpoint::open`) and GGUF (`GgufFile::from_bytes`).
//!
//! Each target takes arbitrary bytes and mutations of a valid file; the property is that the
//! parser returns a typed error or a checkpoint whose every tensor then loads (or fails with a
//! typed error), never panics, and never holds more than a small multiple of the input in memory.
//! Length fields claiming absurd sizes are fed in dedicated cases that must fail fast.
//! Budget: `CACHET_FUZZ_CASES` (default 256) per property; `cargo xtask fuzz` runs more.

#[path = "../../../tests/fuzz_support.rs"]
mod fuzz_support;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use cachet_tensor::gguf::{Array, GgmlType, GgufFile, GgufWriter, Value};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DType, Device, Precision};
use fuzz_support::{any_bytes, any_text, bounded, fails_fast, mutated_bytes, mutated_json};
use proptest::prelude::*;
use serde_json::json;

const FAST: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// safetensors header
// ---------------------------------------------------------------------------------------------

/// A safetensors file from a header object and its data section.
fn safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A small valid file: tensors of several dtypes and ranks, and metadata.
fn valid_safetensors_header() -> (serde_json::Value, Vec<u8>) {
    let header = json!({
        "__metadata__": {"format": "pt", "note": "fuzz"},
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [24, 30]},
        "h": {"dtype": "F16", "shape": [1, 1, 2], "data_offsets": [30, 34]},
        "i": {"dtype": "I64", "shape": [2], "data_offsets": [34, 50]},
        "m": {"dtype": "BOOL", "shape": [2], "data_offsets": [50, 52]},
        "u": {"dtype": "U8", "shape": [], "data_offsets": [52, 53]},
        "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [53, 53]},
        "f8": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [53, 56]}
    });
    let mut data: Vec<u8> = (0..56u8).collect();
    data[50] = 1;
    data[51] = 0;
    (header, data)
}

fn valid_safetensors() -> Vec<u8> {
    let (header, data) = valid_safetensors_header();
    safetensors(&header, &data)
}

const SAFETENSORS_KEYS: &[&str] = &[
    "__metadata__",
    "dtype",
    "shape",
    "data_offsets",
    "w",
    "b",
    "F32",
    "F4",
];

/// Every tensor of an accepted checkpoint loads or fails with a typed error.
fn exercise_checkpoint(checkpoint: &Checkpoint) {
    let device = Device::default();
    for name in checkpoint.names() {
        let info = checkpoint.info(name).expect("listed");
        assert_eq!(info.data_offsets.1 - info.data_offsets.0, info.byte_len());
        let _ = checkpoint.tensor_data(name);
        match info.shape.len() {
            1 => {
                let _ = checkpoint.load_float::<1>(name, &device, DType::F32);
                let _ = checkpoint.load_int::<1>(name, &device);
            }
            2 => {
                let _ = checkpoint.load_float::<2>(name, &device, DType::BF16);
                let _ = checkpoint.load_int::<2>(name, &device);
            }
            3 => {
                let _ = checkpoint.load_float::<3>(name, &device, DType::F16);
            }
            _ => {}
        }
    }
    let _ = checkpoint.total_bytes();
    let _ = format!("{checkpoint:?}");
}

fn check_safetensors(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let len = bytes.len();
    let parsed = bounded(len, || Checkpoint::from_bytes("fuzz.safetensors", bytes))?;
    if let Ok(checkpoint) = parsed {
        // Loading copies tensors out, each no larger than the file.
        bounded(len, || exercise_checkpoint(&checkpoint))?;
    }
    Ok(())
}

/// A header of arbitrary JSON text behind a correct length prefix (reaches the JSON layer far
/// more often than arbitrary bytes do).
fn any_header_text() -> impl Strategy<Value = Vec<u8>> {
    (any_text(), any_bytes()).prop_map(|(text, data)| {
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(&data[..data.len().min(64)]);
        out
    })
}

/// The valid header with JSON edits (the data section kept).
fn mutated_header() -> impl Strategy<Value = Vec<u8>> {
    let (header, data) = valid_safetensors_header();
    mutated_json(header, SAFETENSORS_KEYS).prop_map(move |text| {
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(&data);
        out
    })
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn safetensors_arbitrary_bytes(bytes in prop_oneof![any_bytes(), any_header_text()]) {
        check_safetensors(bytes)?;
    }

    #[test]
    fn safetensors_mutated(bytes in prop_oneof![
        mutated_bytes(valid_safetensors()),
        mutated_header(),
    ]) {
        check_safetensors(bytes)?;
    }
}

#[test]
fn safetensors_valid_base_parses() {
    let checkpoint = Checkpoint::from_bytes("valid", valid_safetensors()).unwrap();
    assert_eq!(checkpoint.len(), 8);
    exercise_checkpoint(&checkpoint);
}

#[test]
fn safetensors_absurd_lengths_fail_fast() {
    // A header length of 2^60 bytes.
    let mut bytes = valid_safetensors();
    bytes[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    fails_fast("header length 2^60", FAST, || {
        Checkpoint::from_bytes("h", bytes.clone())
    });
    // Shapes whose element count overflows, or claims 2^60 elements backed by nothing.
    for (shape, offsets) in [
        (json!([1u64 << 60, 1u64 << 60]), json!([0, 0])),
        (json!([1u64 << 60]), json!([0, 1u64 << 62])),
        (json!([1u64 << 31, 1u64 << 31]), json!([0, 1u64 << 62])),
        (json!([u64::MAX]), json!([0, u64::MAX])),
    ] {
        let header = json!({"t": {"dtype": "F32", "shape": shape, "data_offsets": offsets}});
        let file = safetensors(&header, &[0; 16]);
        fails_fast(&format!("shape {shape}"), FAST, || {
            Checkpoint::from_bytes("s", file.clone())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// sharded index
// ---------------------------------------------------------------------------------------------

/// A directory with two valid shards (written once per test binary).
fn shard_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let a = json!({"a.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}});
        let b = json!({
            "__metadata__": {"format": "pt"},
            "b.w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
            "b.b": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]}
        });
        std::fs::write(dir.path().join("s-1.safetensors"), safetensors(&a, &[1; 8])).unwrap();
        std::fs::write(
            dir.path().join("s-2.safetensors"),
            safetensors(&b, &[2; 12]),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        dir
    })
    .path()
}

fn valid_index() -> serde_json::Value {
    json!({
        "metadata": {"total_size": 28, "format": "pt", "flag": true},
        "weight_map": {"a.w": "s-1.safetensors", "b.w": "s-2.safetensors", "b.b": "s-2.safetensors"}
    })
}

const INDEX_KEYS: &[&str] = &[
    "metadata",
    "weight_map",
    "total_size",
    "a.w",
    "b.w",
    "s-1.safetensors",
    "s-2.safetensors",
    "../s-1.safetensors",
    "/etc/passwd",
    "sub",
    ".",
    "",
];

/// Writes `text` as an index next to the shards (a file per test thread) and opens it.
fn check_index(name: &str, text: &str) -> Result<(), TestCaseError> {
    let path = shard_dir().join(format!("{name}.safetensors.index.json"));
    std::fs::write(&path, text).unwrap();
    let opened = bounded(text.len() + 64, || Checkpoint::open(&path))?;
    if let Ok(checkpoint) = opened {
        exercise_checkpoint(&checkpoint);
    }
    Ok(())
}

/// Index values drawn from shard names, odd paths and junk.
fn index_shard_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(INDEX_KEYS.to_vec()).prop_map(str::to_owned),
        "\\PC{0,16}",
    ]
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn index_arbitrary_text(text in prop_oneof![
        any_text(),
        prop::collection::btree_map("\\PC{0,8}", index_shard_name(), 0..6)
            .prop_map(|m| json!({"weight_map": m}).to_string()),
    ]) {
        check_index("arbitrary", &text)?;
    }

    #[test]
    fn index_mutated(text in mutated_json(valid_index(), INDEX_KEYS)) {
        check_index("mutated", &text)?;
    }
}

#[test]
fn index_valid_base_opens() {
    let path = shard_dir().join("base.safetensors.index.json");
    std::fs::write(&path, valid_index().to_string()).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    assert_eq!(checkpoint.names(), ["a.w", "b.b", "b.w"]);
}

// ---------------------------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------------------------

/// A small valid GGUF file where most bytes are header: metadata of every value type (nested
/// arrays and strings included) and a few tiny tensors.
fn valid_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama").unwrap();
    w.add_metadata("general.alignment", Value::U32(32)).unwrap();
    w.add_metadata("u8", Value::U8(7)).unwrap();
    w.add_metadata("i16", Value::I16(-3)).unwrap();
    w.add_metadata("u64", Value::U64(1 << 40)).unwrap();
    w.add_metadata("f64", Value::F64(0.25)).unwrap();
    w.add_metadata("flag", Value::Bool(true)).unwrap();
    w.add_metadata(
        "tokens",
        Value::Array(Array::String(vec!["a".into(), "bc".into()])),
    )
    .unwrap();
    w.add_metadata("ids", Value::Array(Array::I32(vec![1, -2, 3])))
        .unwrap();
    w.add_metadata(
        "nested",
        Value::Array(Array::Array(vec![
            Array::U8(vec![1, 2]),
            Array::Bool(vec![true]),
        ])),
    )
    .unwrap();
    w.add_tensor("f32", &[2, 2], GgmlType::F32, vec![0; 16])
        .unwrap();
    w.add_tensor("q8", &[32], GgmlType::Q8_0, vec![1; 34])
        .unwrap();
    w.add_tensor("q4k", &[256], GgmlType::Q4_K, vec![3; 144])
        .unwrap();
    w.add_tensor("scalar", &[], GgmlType::F16, vec![0, 60])
        .unwrap();
    w.to_bytes()
}

fn gguf_fixture() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/types.gguf"))
        .unwrap()
}

/// Every tensor of an accepted file dequantizes (or fails with a typed error).
fn exercise_gguf(file: &GgufFile) {
    let _ = format!("{file:?}");
    let _ = file.architecture();
    for (key, value) in file.metadata() {
        let _ = (
            file.get(key),
            value.as_u64(),
            value.as_f64(),
            value.as_str(),
        );
        if let Some(array) = value.as_array() {
            for i in 0..array.len().min(4) {
                let _ = array.get(i);
            }
        }
    }
    let device = Device::default();
    for info in file.tensors() {
        let name = info.name();
        assert_eq!(file.tensor_bytes(name).unwrap().len(), info.byte_len());
        let _ = file.dequantize(name);
        let _ = file.tensor_data(name, Precision::BF16);
        if info.dims().len() == 2 {
            let _ = file.load_float::<2>(name, &device, DType::F32);
        }
    }
}

fn check_gguf(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let len = bytes.len();
    let parsed = bounded(len, || GgufFile::from_bytes("fuzz.gguf", bytes))?;
    if let Ok(file) = parsed {
        bounded(len, || exercise_gguf(&file))?;
    }
    Ok(())
}

/// Arbitrary bytes behind a valid magic and version (otherwise nearly every case stops there).
fn any_gguf_body() -> impl Strategy<Value = Vec<u8>> {
    (prop_oneof![Just(2u32), Just(3u32)], any_bytes()).prop_map(|(version, body)| {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&body);
        out
    })
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn gguf_arbitrary_bytes(bytes in prop_oneof![any_bytes(), any_gguf_body()]) {
        check_gguf(bytes)?;
    }

    #[test]
    fn gguf_mutated(bytes in prop_oneof![
        4 => mutated_bytes(valid_gguf()),
        1 => mutated_bytes(gguf_fixture()),
    ]) {
        check_gguf(bytes)?;
    }
}

#[test]
fn gguf_valid_bases_parse() {
    for bytes in [valid_gguf(), gguf_fixture()] {
        let file = GgufFile::from_bytes("valid", bytes).unwrap();
        exercise_gguf(&file);
    }
}

/// GGUF header: magic, version 3, tensor count, metadata count.
fn gguf_head(tensors: u64, kvs: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&tensors.to_le_bytes());
    out.extend_from_slice(&kvs.to_le_bytes());
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[test]
fn gguf_absurd_counts_fail_fast() {
    let huge = 1u64 << 60;
    let pad = |mut v: Vec<u8>| {
        v.extend_from_slice(&[0u8; 64]);
        v
    };
    fails_fast("tensor count 2^60", FAST, || {
        GgufFile::from_bytes("t", pad(gguf_head(huge, 0)))
    });
    fails_fast("metadata count 2^60", FAST, || {
        GgufFile::from_bytes("t", pad(gguf_head(0, huge)))
    });
    // A key whose length claims 2^60 bytes.
    let mut key = gguf_head(0, 1);
    key.extend_from_slice(&huge.to_le_bytes());
    fails_fast("key length 2^60", FAST, || {
        GgufFile::from_bytes("t", pad(key.clone()))
    });
    // Arrays of every element type claiming 2^60 elements.
    for type_id in 0u32..=12 {
        let mut array = gguf_head(0, 1);
        put_str(&mut array, "k");
        array.extend_from_slice(&9u32.to_le_bytes()); // array
        array.extend_from_slice(&type_id.to_le_bytes());
        array.extend_from_slice(&huge.to_le_bytes());
        fails_fast(
            &format!("array of type {type_id} with 2^60 elements"),
            FAST,
            || GgufFile::from_bytes("t", pad(array.clone())),
        );
    }
    // A tensor of 2^60 x 2^60 elements, and one of 2^60 elements backed by nothing.
    for dims in [[huge, huge], [huge, 1]] {
        let mut tensor = gguf_head(1, 0);
        put_str(&mut tensor, "t");
        tensor.extend_from_slice(&2u32.to_le_bytes());
        for d in dims {
            tensor.extend_from_slice(&d.to_le_bytes());
        }
        tensor.extend_from_slice(&0u32.to_le_bytes()); // F32
        tensor.extend_from_slice(&0u64.to_le_bytes());
        fails_fast(&format!("tensor dims {dims:?}"), FAST, || {
            GgufFile::from_bytes("t", pad(tensor.clone()))
        });
    }
}

/// Found by `cargo xtask fuzz`: a tensor with a zero dimension between two huge ones
/// (`[2^40 + 1, 0, 2^63, 2^39]`) counted 0 elements when the dimensions were multiplied in file
/// order, and then overflowed burn's shape product (multiplied the other way) in `tensor_data`.
/// Such a file is refused when it is read, and the writer refuses such a tensor.
#[test]
fn regression_gguf_zero_dimension_between_huge_ones() {
    let shape = [(1usize << 39), (1usize << 63), 0, (1usize << 40) + 1];
    let mut w = GgufWriter::new();
    assert!(
        w.add_tensor("t", &shape, GgmlType::F32, Vec::new())
            .is_err(),
        "the writer accepted {shape:?}"
    );
    // The same tensor written by hand: `valid_gguf`'s layout with the dims patched in.
    let mut w = GgufWriter::new();
    w.add_tensor("t", &[1, 0, 1, 1], GgmlType::F32, Vec::new())
        .unwrap();
    let mut bytes = w.to_bytes();
    let dims: Vec<u64> = [1u64, 1, 0, 1].to_vec();
    let at = bytes
        .windows(32)
        .position(|win| {
            win.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .eq(dims.iter().copied())
        })
        .expect("the dims in the header");
    for (i, d) in shape.iter().rev().enumerate() {
        bytes[at + 8 * i..at + 8 * i + 8].copy_from_slice(&(*d as u64).to_le_bytes());
    }
    let read = GgufFile::from_bytes("patched.gguf", bytes);
    assert!(read.is_err(), "read {read:?}");
}
