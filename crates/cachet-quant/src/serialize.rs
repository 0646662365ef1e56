//! The checkpoint layout transformers + bitsandbytes write for quantized linear layers, both
//! ways: `weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
//! `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__{nf4,fp4}` (JSON bytes) for
//! 4-bit; `weight` (int8), `SCB`, `weight_format` for LLM.int8.

use burn::tensor::{DType, TensorData};
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::safetensors::StoredDType;
use serde_json::Value;

use crate::blockwise::{AbsMax, NestedAbsMax, Quantized4bit};
use crate::codes::QuantType;
use crate::error::{QuantError, Result};
use crate::int8::Int8Weight;

/// Formats an f64 like Python's `repr(float)` (what `json.dumps` writes), so the quant-state
/// JSON cachet writes is byte-identical to bitsandbytes'.
pub use cachet_pyjson::float_repr as python_float_repr;

/// The quant-state JSON of a 4-bit tensor, key order and spacing as `json.dumps` writes it.
pub fn quant_state_json(q: &Quantized4bit, dtype: Precision) -> String {
    let dtype_name = dtype.torch_name().trim_start_matches("torch.");
    let shape = q
        .shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        q.quant_type, q.blocksize, dtype_name, shape
    );
    if let AbsMax::Nested(n) = &q.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            n.blocksize,
            python_float_repr(f64::from(n.offset))
        ));
    }
    s.push('}');
    s
}

fn f32_data(values: &[f32], shape: Vec<usize>) -> TensorData {
    TensorData::new(values.to_vec(), shape)
}

fn u8_data(values: &[u8], shape: Vec<usize>) -> TensorData {
    TensorData::from_bytes_vec(values.to_vec(), shape, DType::U8)
}

/// One tensor of a quantized layer in transformers' layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// 4-bit: the packed codes (`weight`, U8 `[n, 1]`).
    Packed,
    /// 4-bit: `weight.absmax` (F32, or U8 under double quantization).
    Absmax,
    /// 4-bit double quant: `weight.nested_absmax` (F32).
    NestedAbsmax,
    /// 4-bit double quant: `weight.nested_quant_map` (F32).
    NestedQuantMap,
    /// 4-bit: `weight.quant_map` (F32 `[16]`).
    QuantMap,
    /// 4-bit: `weight.quant_state.bitsandbytes__{nf4,fp4}` (JSON bytes, U8).
    QuantState,
    /// LLM.int8: `weight` (I8 `[out, in]`).
    Cb,
    /// LLM.int8: `SCB` (F32 `[out]`).
    Scb,
    /// LLM.int8: `weight_format` (U8 scalar 0).
    WeightFormat,
}

/// Name, part, dtype and shape of each tensor a 4-bit layer `prefix` saves — without copying
/// any data (what a streaming writer needs to lay out its header).
pub fn four_bit_parts(
    prefix: &str,
    q: &Quantized4bit,
    dtype: Precision,
) -> Vec<(String, Part, DType, Vec<usize>)> {
    let w = format!("{prefix}.weight");
    let mut out = vec![(w.clone(), Part::Packed, DType::U8, vec![q.packed.len(), 1])];
    match &q.absmax {
        AbsMax::Plain(a) => out.push((
            format!("{w}.absmax"),
            Part::Absmax,
            DType::F32,
            vec![a.len()],
        )),
        AbsMax::Nested(n) => {
            out.push((
                format!("{w}.absmax"),
                Part::Absmax,
                DType::U8,
                vec![n.quantized.len()],
            ));
            out.push((
                format!("{w}.nested_absmax"),
                Part::NestedAbsmax,
                DType::F32,
                vec![n.absmax.len()],
            ));
            out.push((
                format!("{w}.nested_quant_map"),
                Part::NestedQuantMap,
                DType::F32,
                vec![n.code.len()],
            ));
        }
    }
    out.push((
        format!("{w}.quant_map"),
        Part::QuantMap,
        DType::F32,
        vec![16],
    ));
    let len = quant_state_json(q, dtype).len();
    out.push((
        format!("{w}.quant_state.bitsandbytes__{}", q.quant_type),
        Part::QuantState,
        DType::U8,
        vec![len],
    ));
    out
}

/// The data of one part of a 4-bit layer (see [`four_bit_parts`]); `None` for an int8 part or
/// a nested part of a layer without double quantization.
pub fn four_bit_part(q: &Quantized4bit, dtype: Precision, part: Part) -> Option<TensorData> {
    Some(match (part, &q.absmax) {
        (Part::Packed, _) => u8_data(&q.packed, vec![q.packed.len(), 1]),
        (Part::Absmax, AbsMax::Plain(a)) => f32_data(a, vec![a.len()]),
        (Part::Absmax, AbsMax::Nested(n)) => u8_data(&n.quantized, vec![n.quantized.len()]),
        (Part::NestedAbsmax, AbsMax::Nested(n)) => f32_data(&n.absmax, vec![n.absmax.len()]),
        (Part::NestedQuantMap, AbsMax::Nested(n)) => f32_data(&n.code, vec![n.code.len()]),
        (Part::QuantMap, _) => f32_data(q.quant_type.code(), vec![16]),
        (Part::QuantState, _) => {
            let json = quant_state_json(q, dtype).into_bytes();
            let len = json.len();
            TensorData::from_bytes_vec(json, vec![len], DType::U8)
        }
        _ => return None,
    })
}

/// The tensors of a 4-bit layer `prefix` (e.g. `model.layers.0.mlp.up_proj`).
pub fn four_bit_tensors(
    prefix: &str,
    q: &Quantized4bit,
    dtype: Precision,
) -> Vec<(String, TensorData)> {
    four_bit_parts(prefix, q, dtype)
        .into_iter()
        .map(|(name, part, _, _)| {
            let data = four_bit_part(q, dtype, part).expect("a part four_bit_parts lists");
            (name, data)
        })
        .collect()
}

/// Name, part, dtype and shape of each tensor an LLM.int8 layer `prefix` saves.
pub fn int8_parts(prefix: &str, w: &Int8Weight) -> Vec<(String, Part, DType, Vec<usize>)> {
    vec![
        (
            format!("{prefix}.weight"),
            Part::Cb,
            DType::I8,
            vec![w.rows, w.cols],
        ),
        (format!("{prefix}.SCB"), Part::Scb, DType::F32, vec![w.rows]),
        (
            format!("{prefix}.weight_format"),
            Part::WeightFormat,
            DType::U8,
            vec![],
        ),
    ]
}

/// The data of one part of an LLM.int8 layer (see [`int8_parts`]); `None` for a 4-bit part.
pub fn int8_part(w: &Int8Weight, part: Part) -> Option<TensorData> {
    Some(match part {
        Part::Cb => {
            let cb: Vec<u8> = w.cb.iter().map(|&v| v as u8).collect();
            TensorData::from_bytes_vec(cb, vec![w.rows, w.cols], DType::I8)
        }
        Part::Scb => f32_data(&w.scb, vec![w.rows]),
        Part::WeightFormat => u8_data(&[0], vec![]),
        _ => return None,
    })
}

/// The tensors of an LLM.int8 layer `prefix`.
pub fn int8_tensors(prefix: &str, w: &Int8Weight) -> Vec<(String, TensorData)> {
    int8_parts(prefix, w)
        .into_iter()
        .map(|(name, part, _, _)| (name, int8_part(w, part).expect("an int8 part")))
        .collect()
}

/// How a layer is stored in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredLayout {
    /// Plain float weight (quantize on load).
    Float,
    /// bnb 4-bit with its quant state.
    FourBit(QuantType),
    /// LLM.int8 (`SCB` present).
    Int8,
}

/// Which layout the layer `prefix` has in `checkpoint`.
pub fn stored_layout(checkpoint: &Checkpoint, prefix: &str) -> StoredLayout {
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        if checkpoint.contains(&format!("{prefix}.weight.quant_state.bitsandbytes__{qt}")) {
            return StoredLayout::FourBit(qt);
        }
    }
    if checkpoint.contains(&format!("{prefix}.SCB")) {
        return StoredLayout::Int8;
    }
    StoredLayout::Float
}

fn bytes_of(
    checkpoint: &Checkpoint,
    name: &str,
    want: StoredDType,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let info = checkpoint
        .info(name)
        .ok_or_else(|| QuantError::InconsistentState {
            tensor: name.to_string(),
            reason: "missing from the checkpoint".into(),
        })?;
    if info.dtype != want {
        return Err(QuantError::InconsistentState {
            tensor: name.to_string(),
            reason: format!("stored as {}, expected {want}", info.dtype),
        });
    }
    let shape = info.shape.clone();
    let bytes = match read_stored(checkpoint, name) {
        Some(bytes) => bytes,
        None => checkpoint.tensor_data(name)?.as_bytes().to_vec(),
    };
    Ok((bytes, shape))
}

/// A tensor's stored bytes read from its file with ordinary reads rather than through the
/// checkpoint's mapping: pages touched through a mapping stay in the process's resident set
/// until the whole checkpoint is dropped, so quantizing a model while loading it would otherwise
/// end up holding all of the f32 source. `None` where that is not possible (a checkpoint in
/// memory, a big-endian host, a read error — the mapping then reports it properly).
fn read_stored(checkpoint: &Checkpoint, name: &str) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    if cfg!(target_endian = "big") {
        return None;
    }
    let info = checkpoint.info(name)?;
    if info.dtype == StoredDType::BOOL {
        return None;
    }
    // Only a mapped file can be read again; an in-memory checkpoint's label is no path.
    let mut file = std::fs::File::open(checkpoint.path_of(name)?).ok()?;
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).ok()?;
    let start = 8 + u64::from_le_bytes(prefix) + info.data_offsets.0 as u64;
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut bytes = vec![0u8; info.byte_len()];
    file.read_exact(&mut bytes).ok()?;
    Some(bytes)
}

fn f32s_of(checkpoint: &Checkpoint, name: &str) -> Result<Vec<f32>> {
    let (bytes, _) = bytes_of(checkpoint, name, StoredDType::F32)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads a 4-bit layer saved by transformers/bitsandbytes (or cachet), checking every part
/// against the quant state JSON and the expected `[out, in]` shape.
pub fn read_four_bit(
    checkpoint: &Checkpoint,
    prefix: &str,
    quant_type: QuantType,
    expected_shape: [usize; 2],
) -> Result<(Quantized4bit, Precision)> {
    let w = format!("{prefix}.weight");
    let state_name = format!("{w}.quant_state.bitsandbytes__{quant_type}");
    let bad = |reason: String| QuantError::InconsistentState {
        tensor: state_name.clone(),
        reason,
    };
    let (json, _) = bytes_of(checkpoint, &state_name, StoredDType::U8)?;
    let state: Value = serde_json::from_slice(&json).map_err(|e| bad(format!("not JSON: {e}")))?;
    let field = |k: &str| state.get(k).ok_or_else(|| bad(format!("has no {k:?}")));
    let state_type = field("quant_type")?.as_str().unwrap_or_default();
    if state_type != quant_type.name() {
        return Err(bad(format!(
            "quant_type {state_type:?} disagrees with the key suffix {quant_type}"
        )));
    }
    let blocksize = field("blocksize")?
        .as_u64()
        .ok_or_else(|| bad("blocksize is not an integer".into()))? as usize;
    let dtype_name = field("dtype")?.as_str().unwrap_or_default();
    let dtype: Precision = dtype_name.parse().map_err(|_| {
        bad(format!(
            "dtype {dtype_name:?} is not float32/float16/bfloat16"
        ))
    })?;
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .ok_or_else(|| bad("shape is not a list".into()))?
        .iter()
        .map(|v| v.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("shape holds a non-integer".into()))?;
    if shape != expected_shape {
        return Err(bad(format!(
            "shape {shape:?} disagrees with the layer's [out, in] = {expected_shape:?}"
        )));
    }
    let (packed, _) = bytes_of(checkpoint, &w, StoredDType::U8)?;
    let nested = state.get("nested_blocksize").is_some();
    let absmax = if nested {
        let nested_blocksize = field("nested_blocksize")?
            .as_u64()
            .ok_or_else(|| bad("nested_blocksize is not an integer".into()))?
            as usize;
        let offset = field("nested_offset")?
            .as_f64()
            .ok_or_else(|| bad("nested_offset is not a number".into()))?
            as f32;
        let (quantized, _) = bytes_of(checkpoint, &format!("{w}.absmax"), StoredDType::U8)?;
        AbsMax::Nested(NestedAbsMax {
            quantized,
            absmax: f32s_of(checkpoint, &format!("{w}.nested_absmax"))?,
            offset,
            blocksize: nested_blocksize,
            code: f32s_of(checkpoint, &format!("{w}.nested_quant_map"))?,
        })
    } else {
        AbsMax::Plain(f32s_of(checkpoint, &format!("{w}.absmax"))?)
    };
    let quant_map = f32s_of(checkpoint, &format!("{w}.quant_map"))?;
    if quant_map.len() != 16 {
        return Err(QuantError::InconsistentState {
            tensor: format!("{w}.quant_map"),
            reason: format!("{} values, expected 16", quant_map.len()),
        });
    }
    // The kernels decode with the built-in table of the quant type: a checkpoint carrying any
    // other table would be decoded wrongly, so it is refused rather than replaced silently.
    let table = quant_type.code();
    if let Some(i) = (0..16).find(|&i| (quant_map[i] - table[i]).abs() > 1e-6) {
        return Err(QuantError::InconsistentState {
            tensor: format!("{w}.quant_map"),
            reason: format!(
                "value {i} is {}, but the {quant_type} table has {} (custom code tables are not supported)",
                quant_map[i], table[i]
            ),
        });
    }
    let q = Quantized4bit {
        packed,
        absmax,
        shape,
        blocksize,
        quant_type,
    };
    q.validate(&w)?;
    Ok((q, dtype))
}

/// Reads an LLM.int8 layer (`weight` int8, `SCB`, optional `weight_format` = 0 / row).
pub fn read_int8(
    checkpoint: &Checkpoint,
    prefix: &str,
    expected_shape: [usize; 2],
) -> Result<Int8Weight> {
    let w = format!("{prefix}.weight");
    let (cb, shape) = bytes_of(checkpoint, &w, StoredDType::I8)?;
    if shape != expected_shape {
        return Err(QuantError::InconsistentState {
            tensor: w,
            reason: format!("shape {shape:?}, the layer is [out, in] = {expected_shape:?}"),
        });
    }
    let fmt_name = format!("{prefix}.weight_format");
    if let Some(info) = checkpoint.info(&fmt_name) {
        let data = checkpoint.tensor_data(&fmt_name)?;
        let ok = info.num_elements() == 1 && data.as_bytes().iter().all(|&b| b == 0);
        if !ok {
            return Err(QuantError::InconsistentState {
                tensor: fmt_name,
                reason: "only weight_format 0 (row-major) is supported, as in bitsandbytes".into(),
            });
        }
    }
    let weight = Int8Weight {
        cb: cb.into_iter().map(|b| b as i8).collect(),
        scb: f32s_of(checkpoint, &format!("{prefix}.SCB"))?,
        rows: expected_shape[0],
        cols: expected_shape[1],
    };
    weight.validate(&w)?;
    Ok(weight)
}

/// Reads a float tensor as f32 values, refusing dtypes that cannot be quantized.
pub fn read_float(checkpoint: &Checkpoint, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let info = checkpoint
        .info(name)
        .ok_or_else(|| QuantError::InconsistentState {
            tensor: name.to_string(),
            reason: "missing from the checkpoint".into(),
        })?;
    if !matches!(
        info.dtype,
        StoredDType::F32 | StoredDType::F16 | StoredDType::BF16 | StoredDType::F64
    ) {
        return Err(QuantError::UnsupportedDType {
            tensor: name.to_string(),
            dtype: info.dtype.to_string(),
        });
    }
    let shape = info.shape.clone();
    let data = match (read_stored(checkpoint, name), info.dtype.to_burn()) {
        (Some(bytes), Some(dtype)) => TensorData::from_bytes_vec(bytes, shape.clone(), dtype),
        _ => checkpoint.tensor_data(name)?,
    }
    .convert::<f32>();
    let values = data
        .try_into_vec::<f32>()
        .map_err(|e| QuantError::InconsistentState {
            tensor: name.to_string(),
            reason: format!("{e:?}"),
        })?;
    Ok((values, shape))
}

#[cfg(test)]
mod tests {
    use super::{python_float_repr, read_float};
    use cachet_tensor::safetensors::Checkpoint;

    /// A safetensors file holding one F32 tensor `w`.
    fn one_tensor(values: &[f32]) -> Vec<u8> {
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}}"#,
            values.len(),
            values.len() * 4
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        bytes
    }

    #[test]
    fn an_in_memory_checkpoint_is_read_from_memory_not_from_a_file_named_like_its_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, one_tensor(&[9.0, 9.0])).unwrap();
        let label = path.to_str().unwrap();
        let in_memory = Checkpoint::from_bytes(label, one_tensor(&[1.0, 2.0])).unwrap();
        assert_eq!(read_float(&in_memory, "w").unwrap().0, vec![1.0, 2.0]);
        // The file itself is still read through its own path.
        let on_disk = Checkpoint::open(&path).unwrap();
        assert_eq!(read_float(&on_disk, "w").unwrap().0, vec![9.0, 9.0]);
    }

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3's repr() of the same doubles.
        let cases = [
            (f64::from(0.389_709_1_f32), "0.38970908522605896"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5e-07"),
            (123.0, "123.0"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5, "-2.5"),
            (0.0, "0.0"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }
}
