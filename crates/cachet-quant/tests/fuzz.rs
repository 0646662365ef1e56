//! Property-based fuzzing of cachet-quant's parsers: `BnbQuantizationConfig` (accelerate's
//! fields through serde, and transformers' `quantization_config` through `from_transformers`),
//! `DeviceMap::parse`, and the saved layouts `serialize::read_four_bit` (the
//! `quant_state.bitsandbytes__{nf4,fp4}` JSON and its companion tensors) and `read_int8`.
//!
//! The quantized-layer targets start from a layer quantized here and saved in transformers'
//! layout in memory, then edit the quant-state JSON and the other tensors (dropped, retyped,
//! cut short, corrupted). The property: a typed error, or a layer that dequantizes, never a
//! panic, never more than a small multiple of the checkpoint in memory.
//! Budget: `CACHET_FUZZ_CASES` (default 256) per property; `cargo xtask fuzz` runs more.

#[path = "../../../tests/fuzz_support.rs"]
mod fuzz_support;

use burn::tensor::{DType, TensorData};
use cachet_quant::serialize::{four_bit_tensors, int8_tensors, read_four_bit, read_int8};
use cachet_quant::{BnbQuantizationConfig, DeviceMap, Int8Weight, QuantType, quantize_4bit};
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;
use fuzz_support::{any_json, any_text, bounded, mutated_bytes, mutated_json};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------------------------

const CONFIG_KEYS: &[&str] = &[
    "load_in_8bit",
    "_load_in_8bit",
    "llm_int8_threshold",
    "load_in_4bit",
    "_load_in_4bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
    "torch_dtype",
    "skip_modules",
    "llm_int8_skip_modules",
    "keep_in_fp32_modules",
    "bnb_4bit_blocksize",
    "quant_method",
    "bnb_4bit_quant_storage",
];

/// accelerate's form (serde field names).
fn valid_accelerate() -> serde_json::Value {
    serde_json::to_value(BnbQuantizationConfig {
        skip_modules: Some(vec!["lm_head".into()]),
        keep_in_fp32_modules: Some(vec!["norm".into()]),
        torch_dtype: Some("bf16".into()),
        ..BnbQuantizationConfig::nf4(Precision::BF16)
    })
    .unwrap()
}

/// transformers' `quantization_config` (what `to_transformers` writes).
fn valid_transformers() -> serde_json::Value {
    BnbQuantizationConfig {
        keep_in_fp32_modules: Some(vec!["norm".into()]),
        bnb_4bit_blocksize: 128,
        ..BnbQuantizationConfig::nf4(Precision::F16)
    }
    .to_transformers()
}

/// Everything an accepted config answers must be answerable.
fn exercise_config(config: &BnbQuantizationConfig) {
    let _ = (
        config.quant_type(),
        config.compute_dtype("fuzz"),
        config.torch_dtype("fuzz"),
    );
    let _ = config.modules_not_to_convert();
    let _ = (
        config.converts("model.layers.0.mlp.up_proj"),
        config.keeps_in_fp32("norm"),
    );
    let round_trip = BnbQuantizationConfig::from_transformers(&config.to_transformers(), "again");
    if config.validate("fuzz").is_ok() {
        assert!(round_trip.is_ok(), "{config:?}: {round_trip:?}");
    }
}

fn check_config(text: &str) -> Result<(), TestCaseError> {
    let len = text.len();
    if let Ok(config) = bounded(len, || serde_json::from_str::<BnbQuantizationConfig>(text))? {
        let _ = config.validate("fuzz");
        exercise_config(&config);
    }
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        if let Ok(config) = bounded(len, || {
            BnbQuantizationConfig::from_transformers(&value, "fuzz")
        })? {
            prop_assert!(config.validate("fuzz").is_ok());
            exercise_config(&config);
        }
        if let Ok(map) = bounded(len, || DeviceMap::from_json(&value))? {
            let _ = (map.placement("model.layers.0"), map.uses_disk());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn bnb_config_arbitrary(text in prop_oneof![
        any_text(),
        any_json(CONFIG_KEYS).prop_map(|v| v.to_string()),
    ]) {
        check_config(&text)?;
    }

    #[test]
    fn bnb_config_mutated(text in prop_oneof![
        mutated_json(valid_accelerate(), CONFIG_KEYS),
        mutated_json(valid_transformers(), CONFIG_KEYS),
        mutated_json(json!({"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}),
            &["model", "lm_head", "cpu", "disk", ""]),
    ]) {
        check_config(&text)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Saved 4-bit and int8 layers
// ---------------------------------------------------------------------------------------------

/// One stored tensor: name, safetensors dtype name, shape, little-endian bytes.
#[derive(Debug, Clone)]
struct Part {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::U8 => "U8",
        DType::I8 => "I8",
        DType::F32 => "F32",
        other => panic!("unexpected {other:?}"),
    }
}

fn parts(tensors: Vec<(String, TensorData)>) -> Vec<Part> {
    tensors
        .into_iter()
        .map(|(name, data)| Part {
            name,
            dtype: dtype_name(data.dtype()),
            shape: data.shape().to_vec(),
            bytes: data.as_bytes().to_vec(),
        })
        .collect()
}

/// A safetensors file in memory holding `parts` back to back.
fn checkpoint_bytes(parts: &[Part]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for p in parts {
        header.insert(
            p.name.clone(),
            json!({"dtype": p.dtype, "shape": p.shape,
                "data_offsets": [data.len(), data.len() + p.bytes.len()]}),
        );
        data.extend_from_slice(&p.bytes);
    }
    let text = serde_json::Value::Object(header).to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&data);
    out
}

const PREFIX: &str = "model.layers.0.mlp.up_proj";
const SHAPE: [usize; 2] = [4, 64];

fn weight() -> Vec<f32> {
    (0..SHAPE[0] * SHAPE[1])
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect()
}

/// A 4-bit layer in transformers' layout: NF4 with double quantization, or FP4 without.
fn four_bit_parts(double_quant: bool) -> (Vec<Part>, QuantType) {
    let qt = if double_quant {
        QuantType::Nf4
    } else {
        QuantType::Fp4
    };
    let q = quantize_4bit("w", &weight(), &SHAPE, 64, qt, double_quant).unwrap();
    (parts(four_bit_tensors(PREFIX, &q, Precision::BF16)), qt)
}

fn int8_parts() -> Vec<Part> {
    let w = Int8Weight::quantize("w", &weight(), SHAPE[0], SHAPE[1]).unwrap();
    parts(int8_tensors(PREFIX, &w))
}

const STATE_KEYS: &[&str] = &[
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
    "nf4",
    "fp4",
    "bfloat16",
];

/// An edit of one stored tensor.
#[derive(Debug, Clone)]
enum PartOp {
    /// Leave the tensor out.
    Drop(Index),
    /// Store it under another dtype (bytes kept, shape fixed up to match when possible).
    Retype(Index, &'static str),
    /// Cut its bytes short (shape flattened to match).
    Truncate(Index, Index),
    /// Edit its bytes in place (shape kept).
    Bytes(Index, Vec<fuzz_support::ByteOp>),
    /// Give it another shape with the same byte count.
    Reshape(Index, Vec<usize>),
}

fn part_op() -> impl Strategy<Value = PartOp> {
    prop_oneof![
        1 => any::<Index>().prop_map(PartOp::Drop),
        1 => (any::<Index>(), prop::sample::select(vec!["U8", "I8", "F32", "F16", "BOOL", "I64"]))
            .prop_map(|(i, d)| PartOp::Retype(i, d)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(i, n)| PartOp::Truncate(i, n)),
        3 => (any::<Index>(), prop::collection::vec(fuzz_support::byte_op(), 1..4))
            .prop_map(|(i, ops)| PartOp::Bytes(i, ops)),
        1 => (any::<Index>(), prop::collection::vec(0usize..80, 0..3))
            .prop_map(|(i, s)| PartOp::Reshape(i, s)),
    ]
}

fn width(dtype: &str) -> usize {
    match dtype {
        "F32" => 4,
        "F16" => 2,
        "I64" => 8,
        _ => 1,
    }
}

fn apply_part(parts: &mut Vec<Part>, op: &PartOp) {
    if parts.is_empty() {
        return;
    }
    match op {
        PartOp::Drop(i) => {
            parts.remove(i.index(parts.len()));
        }
        PartOp::Retype(i, dtype) => {
            let at = i.index(parts.len());
            let p = &mut parts[at];
            p.dtype = dtype;
            p.bytes
                .truncate(p.bytes.len() / width(dtype) * width(dtype));
            p.shape = vec![p.bytes.len() / width(dtype)];
        }
        PartOp::Truncate(i, n) => {
            let at = i.index(parts.len());
            let p = &mut parts[at];
            let w = width(p.dtype);
            let keep = n.index(p.bytes.len() / w + 1);
            p.bytes.truncate(keep * w);
            p.shape = vec![keep];
        }
        PartOp::Bytes(i, ops) => {
            let at = i.index(parts.len());
            let p = &mut parts[at];
            let len = p.bytes.len();
            let mut edited = fuzz_support::apply_bytes(std::mem::take(&mut p.bytes), ops);
            edited.resize(len, 0);
            p.bytes = edited;
        }
        PartOp::Reshape(i, shape) => {
            let at = i.index(parts.len());
            let p = &mut parts[at];
            let elements = p.bytes.len() / width(p.dtype);
            let known: usize = shape.iter().product::<usize>().max(1);
            let mut shape = shape.clone();
            if elements.is_multiple_of(known) {
                shape.push(elements / known);
                p.shape = shape;
            }
        }
    }
}

/// The layer with its quant-state JSON edited (or replaced by arbitrary bytes) and other
/// tensors edited.
fn mutated_four_bit() -> impl Strategy<Value = (Vec<u8>, QuantType, [usize; 2])> {
    let state = |dq: bool| {
        let (parts, _) = four_bit_parts(dq);
        let text = &parts
            .iter()
            .find(|p| p.name.contains("quant_state"))
            .unwrap()
            .bytes;
        serde_json::from_slice::<serde_json::Value>(text).unwrap()
    };
    let new_state = prop_oneof![
        3 => Just(None),
        4 => mutated_json(state(true), STATE_KEYS).prop_map(|s| Some(s.into_bytes())),
        2 => mutated_json(state(false), STATE_KEYS).prop_map(|s| Some(s.into_bytes())),
        1 => fuzz_support::any_bytes().prop_map(Some),
    ];
    let shape = prop_oneof![
        6 => Just(SHAPE),
        1 => prop::sample::select(vec![[64, 4], [0, 0], [1, 256], [usize::MAX, 2], [4, 63]]),
    ];
    (
        any::<bool>(),
        new_state,
        prop::collection::vec(part_op(), 0..3),
        any::<bool>(),
        shape,
    )
        .prop_map(|(dq, state, ops, swap_type, shape)| {
            let (mut parts, qt) = four_bit_parts(dq);
            if let Some(state) = state {
                let p = parts
                    .iter_mut()
                    .find(|p| p.name.contains("quant_state"))
                    .unwrap();
                p.shape = vec![state.len()];
                p.bytes = state;
            }
            for op in &ops {
                apply_part(&mut parts, op);
            }
            // Ask for the other quant type now and then (the key suffix then disagrees).
            let qt = match (swap_type, qt) {
                (true, QuantType::Nf4) => QuantType::Fp4,
                (true, QuantType::Fp4) => QuantType::Nf4,
                (false, qt) => qt,
            };
            (checkpoint_bytes(&parts), qt, shape)
        })
}

fn mutated_int8() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(part_op(), 1..4).prop_map(|ops| {
        let mut parts = int8_parts();
        for op in &ops {
            apply_part(&mut parts, op);
        }
        checkpoint_bytes(&parts)
    })
}

/// Reads the layer from an in-memory checkpoint (the label is no file, so every read goes
/// through the validated mapping) and dequantizes what was accepted.
fn check_four_bit(bytes: Vec<u8>, qt: QuantType, shape: [usize; 2]) -> Result<(), TestCaseError> {
    let len = bytes.len();
    let Ok(checkpoint) = Checkpoint::from_bytes("in-memory 4-bit layer", bytes) else {
        return Ok(());
    };
    let read = bounded(len, || read_four_bit(&checkpoint, PREFIX, qt, shape))?;
    if let Ok((q, _dtype)) = read {
        prop_assert_eq!(q.shape.as_slice(), shape.as_slice());
        let values = bounded(len, || q.dequantize())?;
        prop_assert_eq!(values.len(), shape[0] * shape[1]);
    }
    Ok(())
}

fn check_int8(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let len = bytes.len();
    let Ok(checkpoint) = Checkpoint::from_bytes("in-memory int8 layer", bytes) else {
        return Ok(());
    };
    if let Ok(w) = bounded(len, || read_int8(&checkpoint, PREFIX, SHAPE))? {
        prop_assert_eq!(w.dequantize().len(), SHAPE[0] * SHAPE[1]);
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn four_bit_arbitrary_state(
        state in prop_oneof![
            fuzz_support::any_bytes(),
            any_json(STATE_KEYS).prop_map(|v| v.to_string().into_bytes()),
        ],
        dq in any::<bool>(),
    ) {
        let (mut parts, qt) = four_bit_parts(dq);
        let p = parts.iter_mut().find(|p| p.name.contains("quant_state")).unwrap();
        p.shape = vec![state.len()];
        p.bytes = state;
        check_four_bit(checkpoint_bytes(&parts), qt, SHAPE)?;
    }

    #[test]
    fn four_bit_mutated((bytes, qt, shape) in prop_oneof![
        4 => mutated_four_bit(),
        1 => mutated_bytes(checkpoint_bytes(&four_bit_parts(true).0))
            .prop_map(|b| (b, QuantType::Nf4, SHAPE)),
    ]) {
        check_four_bit(bytes, qt, shape)?;
    }

    #[test]
    fn int8_mutated(bytes in prop_oneof![
        mutated_int8(),
        mutated_bytes(checkpoint_bytes(&int8_parts())),
    ]) {
        check_int8(bytes)?;
    }
}

#[test]
fn valid_bases_read_back() {
    for dq in [true, false] {
        let (parts, qt) = four_bit_parts(dq);
        let checkpoint = Checkpoint::from_bytes("valid", checkpoint_bytes(&parts)).unwrap();
        let (q, dtype) = read_four_bit(&checkpoint, PREFIX, qt, SHAPE).unwrap();
        assert_eq!((q.quant_type, dtype), (qt, Precision::BF16));
    }
    let checkpoint = Checkpoint::from_bytes("valid", checkpoint_bytes(&int8_parts())).unwrap();
    read_int8(&checkpoint, PREFIX, SHAPE).unwrap();
    for base in [valid_accelerate(), valid_transformers()] {
        check_config(&base.to_string()).unwrap();
    }
    serde_json::from_value::<BnbQuantizationConfig>(valid_accelerate())
        .unwrap()
        .validate("valid")
        .unwrap();
    BnbQuantizationConfig::from_transformers(&valid_transformers(), "valid").unwrap();
}

/// Found by `cargo xtask fuzz`: a quant state whose shape's product overflows a `usize`
/// (`[2^64 - 1, 2]`, which the reader accepted because the caller expected that very shape)
/// made `validate` overflow while counting its values. It is now a typed error.
#[test]
fn regression_four_bit_shape_product_overflow() {
    let (parts, qt) = four_bit_parts(false);
    let checkpoint = Checkpoint::from_bytes("valid", checkpoint_bytes(&parts)).unwrap();
    let (mut q, _) = read_four_bit(&checkpoint, PREFIX, qt, SHAPE).unwrap();
    q.shape = vec![usize::MAX, 2];
    let err = q.validate("w").unwrap_err().to_string();
    assert!(err.contains("more elements than"), "{err}");
    assert!(
        quantize_4bit("w", &[0.0; 4], &[usize::MAX, 2], 64, qt, false).is_err(),
        "quantizing into an overflowing shape"
    );
}
