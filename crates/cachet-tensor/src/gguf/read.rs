//! Parsing and validating a GGUF file's header, metadata and tensor infos.
//!
//! Every read is bounds-checked against the bytes that remain, and every count is checked
//! against what those bytes could hold before anything is allocated for it, so a crafted file
//! costs at most a small multiple of its own size in memory and never panics the reader.

use std::collections::HashSet;

use super::error::GgufError;
use super::types::{Array, GgmlType, Value, ValueType};

type Result<T, E = GgufError> = std::result::Result<T, E>;

/// The four bytes every GGUF file starts with.
pub(crate) const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment.
pub(crate) const ALIGNMENT_KEY: &str = "general.alignment";
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub(crate) const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays accepted in metadata (real files nest at most once).
pub(crate) const MAX_ARRAY_DEPTH: usize = 8;
/// Smallest encoding of one tensor info: name length, dimension count, type, offset.
const MIN_TENSOR_INFO: u64 = 8 + 4 + 4 + 8;
/// Smallest encoding of one key/value pair: key length, value type, a one-byte value.
const MIN_KV: u64 = 8 + 4 + 1;
/// Most elements reserved up front for a list read from the file: counts are checked against the
/// bytes that remain, and lists longer than this grow only as their elements are actually read.
const MAX_RESERVE: usize = 1 << 16;

/// A vector with room for `count` elements (at most [`MAX_RESERVE`]); `count` has been checked.
fn reserve<T>(count: u64) -> Vec<T> {
    Vec::with_capacity(
        usize::try_from(count)
            .unwrap_or(MAX_RESERVE)
            .min(MAX_RESERVE),
    )
}

/// One tensor's entry in the header, validated against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub(crate) name: String,
    pub(crate) dims: Vec<u64>,
    pub(crate) ggml_type: GgmlType,
    pub(crate) offset: u64,
    pub(crate) byte_len: usize,
    pub(crate) elements: usize,
}

impl GgufTensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Dimensions in ggml order: `dims()[0]` (`ne[0]`) is the innermost, contiguous one.
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// Dimensions outermost first (row-major, as torch and burn write shapes): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Each dimension is at most the element count, which fits in usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The stored element type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Offset of the tensor's first byte from the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes the tensor occupies.
    pub fn byte_len(&self) -> usize {
        self.byte_len
    }

    /// Number of elements (1 for a tensor without dimensions).
    pub fn num_elements(&self) -> usize {
        self.elements
    }
}

/// A fully validated header.
#[derive(Debug)]
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) alignment: u64,
    pub(crate) metadata: Vec<(String, Value)>,
    pub(crate) tensors: Vec<GgufTensorInfo>,
    /// Offset of the data section in the file.
    pub(crate) data_start: usize,
}

/// Parses and validates everything but the tensor bytes themselves.
pub(crate) fn parse(file: &str, bytes: &[u8]) -> Result<Header> {
    let mut c = Cursor {
        file,
        bytes,
        pos: 0,
    };
    let magic = c.take(4, &|| "the magic".into());
    let magic = match magic {
        Ok(m) => m,
        Err(_) if bytes.len() < 4 && !MAGIC.starts_with(bytes) => {
            return Err(GgufError::BadMagic {
                file: file.to_owned(),
                found: bytes.to_vec(),
            });
        }
        Err(e) => return Err(e),
    };
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            file: file.to_owned(),
            found: magic.to_vec(),
        });
    }
    let version = c.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::UnsupportedVersion {
                file: file.to_owned(),
                version,
                reason: "version 1 (32-bit counts) predates GGUF v2; convert the file with a current llama.cpp",
            });
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(GgufError::UnsupportedVersion {
                file: file.to_owned(),
                version,
                reason: "this is a big-endian GGUF file; only little-endian files are read",
            });
        }
        _ => {
            return Err(GgufError::UnsupportedVersion {
                file: file.to_owned(),
                version,
                reason: "only versions 2 and 3 are read",
            });
        }
    }
    let tensor_count = c.u64(&|| "the tensor count".into())?;
    let kv_count = c.u64(&|| "the metadata count".into())?;
    c.check_count(tensor_count, MIN_TENSOR_INFO, &|| "tensor count".into())?;
    c.check_count(kv_count, MIN_KV, &|| "metadata count".into())?;

    let mut metadata = reserve(kv_count);
    let mut keys = HashSet::with_capacity(metadata.capacity());
    for index in 0..kv_count {
        let key = c.string(&|| format!("metadata key {index}"))?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey {
                file: file.to_owned(),
                key,
            });
        }
        let type_id = c.u32(&|| format!("the value type of metadata key {key:?}"))?;
        let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            file: file.to_owned(),
            key: key.clone(),
            type_id,
        })?;
        let value = c.value(ty, &key, 0)?;
        metadata.push((key, value));
    }
    let alignment = alignment(file, &metadata)?;

    let mut tensors = reserve(tensor_count);
    for index in 0..tensor_count {
        tensors.push(c.tensor_info(index)?);
    }
    let header_end = c.pos as u64;
    let data_start = header_end.div_ceil(alignment).saturating_mul(alignment);
    let data_len = (bytes.len() as u64).saturating_sub(data_start);
    let tensors = check_tensors(file, tensors, alignment, data_start, data_len)?;
    Ok(Header {
        version,
        alignment,
        metadata,
        tensors,
        // At most the file length when any data is present; otherwise nothing is read from it.
        data_start: data_start.min(bytes.len() as u64) as usize,
    })
}

/// `general.alignment`: a `u32` power of two, or the default.
fn alignment(file: &str, metadata: &[(String, Value)]) -> Result<u64> {
    let Some((_, value)) = metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let bad = |reason: String| GgufError::InvalidAlignment {
        file: file.to_owned(),
        reason,
    };
    match value {
        Value::U32(a) if a.is_power_of_two() => Ok(u64::from(*a)),
        Value::U32(a) => Err(bad(format!("{a} is not a positive power of two"))),
        other => Err(bad(format!(
            "must be a u32, but it is a {}",
            other.value_type()
        ))),
    }
}

/// A tensor info as read, before it is checked against the data section.
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
}

/// Checks names, shapes, alignment, ranges and overlaps; returns the tensors in file order.
///
/// `data_start` is the data section's offset in the file and `data_len` the bytes present
/// after it (used to tell a cut-short file from offsets that point nowhere).
fn check_tensors(
    file: &str,
    raw: Vec<RawTensor>,
    alignment: u64,
    data_start: u64,
    data_len: u64,
) -> Result<Vec<GgufTensorInfo>> {
    let mut names = HashSet::with_capacity(raw.len());
    let mut sized = Vec::with_capacity(raw.len());
    for t in raw {
        if !names.insert(t.name.clone()) {
            return Err(GgufError::DuplicateTensor {
                file: file.to_owned(),
                tensor: t.name,
            });
        }
        let overflow = || GgufError::DimsOverflow {
            file: file.to_owned(),
            tensor: t.name.clone(),
            dims: t.dims.clone(),
        };
        // Every order of multiplying the dimensions must fit (a zero dimension must not hide
        // two huge ones: a reader multiplying in another order would overflow).
        let elements = element_count(&t.dims).ok_or_else(overflow)?;
        let block = t.ggml_type.block_size();
        let row = t.dims.first().copied().unwrap_or(1);
        if row % block as u64 != 0 {
            return Err(GgufError::PartialBlock {
                file: file.to_owned(),
                tensor: t.name,
                ggml_type: t.ggml_type,
                row,
                block,
            });
        }
        let byte_len = t.ggml_type.bytes_for(elements).ok_or_else(overflow)?;
        if t.offset % alignment != 0 {
            return Err(GgufError::Misaligned {
                file: file.to_owned(),
                tensor: t.name,
                offset: t.offset,
                alignment,
            });
        }
        sized.push((t, elements, byte_len));
    }

    // Where a writer following the format (each tensor right after the previous one, padded to
    // the alignment) puts each tensor: if the file does, data past the end means it was cut.
    let mut expected = 0u64;
    let canonical = sized.iter().all(|(t, _, len)| {
        let ok = t.offset == expected;
        expected = expected
            .saturating_add(*len)
            .div_ceil(alignment)
            .saturating_mul(alignment);
        ok
    });
    let mut tensors = Vec::with_capacity(sized.len());
    for (t, elements, byte_len) in sized {
        let end = t.offset.checked_add(byte_len);
        if end.is_none_or(|end| end > data_len) {
            return Err(if canonical {
                GgufError::Truncated {
                    file: file.to_owned(),
                    what: format!("the data of tensor {:?}", t.name),
                    offset: data_start.saturating_add(t.offset),
                    needed: byte_len,
                    available: data_len.saturating_sub(t.offset),
                }
            } else {
                GgufError::OutOfRange {
                    file: file.to_owned(),
                    tensor: t.name,
                    offset: t.offset,
                    end: end.unwrap_or(u64::MAX),
                    data_len,
                }
            });
        }
        // Within the data section, hence within memory.
        let (Ok(byte_len), Ok(elements)) = (usize::try_from(byte_len), usize::try_from(elements))
        else {
            return Err(GgufError::DimsOverflow {
                file: file.to_owned(),
                tensor: t.name,
                dims: t.dims,
            });
        };
        tensors.push(GgufTensorInfo {
            name: t.name,
            dims: t.dims,
            ggml_type: t.ggml_type,
            offset: t.offset,
            byte_len,
            elements,
        });
    }
    let mut order: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.byte_len > 0).collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let a_end = a.offset + a.byte_len as u64;
        if b.offset < a_end {
            return Err(GgufError::Overlap {
                file: file.to_owned(),
                first: a.name.clone(),
                first_range: (a.offset, a_end),
                second: b.name.clone(),
                second_range: (b.offset, b.offset + b.byte_len as u64),
            });
        }
    }
    Ok(tensors)
}

/// A bounds-checked reader over the file's bytes.
struct Cursor<'a> {
    file: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

/// Describes what is being read, for messages; only called on error.
type What<'w> = &'w dyn Fn() -> String;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: What<'_>) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                file: self.file.to_owned(),
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            });
        }
        // n <= remaining <= usize::MAX.
        let slice = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(slice)
    }

    fn array_of<const N: usize>(&mut self, what: What<'_>) -> Result<[u8; N]> {
        let slice = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: What<'_>) -> Result<u32> {
        self.array_of(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What<'_>) -> Result<u64> {
        self.array_of(what).map(u64::from_le_bytes)
    }

    /// Fails unless `count` elements of at least `min_bytes` each fit in the rest of the file.
    fn check_count(&self, count: u64, min_bytes: u64, what: What<'_>) -> Result<()> {
        if count.saturating_mul(min_bytes) > self.remaining() {
            return Err(GgufError::CountTooLarge {
                file: self.file.to_owned(),
                what: what(),
                count,
                min_bytes,
                available: self.remaining(),
            });
        }
        Ok(())
    }

    fn string(&mut self, what: What<'_>) -> Result<String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let raw = self.take(len, what)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(GgufError::InvalidUtf8 {
                file: self.file.to_owned(),
                what: what(),
                valid_up_to: e.valid_up_to(),
            }),
        }
    }

    fn bool(&mut self, key: What<'_>) -> Result<bool> {
        let [b] = self.array_of(&|| format!("the value of metadata key {:?}", key()))?;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(GgufError::InvalidBool {
                file: self.file.to_owned(),
                key: key(),
                value,
            }),
        }
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
        let what = || format!("the value of metadata key {key:?}");
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array_of(&what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array_of(&what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array_of(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array_of(&what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array_of(&what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array_of(&what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array_of(&what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array_of(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array_of(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array_of(&what)?)),
            ValueType::Bool => Value::Bool(self.bool(&|| key.to_owned())?),
            ValueType::String => Value::String(self.string(&what)?),
            ValueType::Array => Value::Array(self.array(key, depth + 1)?),
        })
    }

    /// Reads `count` fixed-size little-endian scalars in one bounds check.
    fn scalars<T, const N: usize>(
        &mut self,
        count: u64,
        key: &str,
        decode: fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        // `count` was checked against the remaining bytes at N bytes per element.
        let raw = self.take(count * N as u64, &|| {
            format!("the elements of array {key:?}")
        })?;
        let (chunks, _) = raw.as_chunks::<N>();
        Ok(chunks.iter().map(|c| decode(*c)).collect())
    }

    fn array(&mut self, key: &str, depth: usize) -> Result<Array> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                file: self.file.to_owned(),
                key: key.to_owned(),
                max: MAX_ARRAY_DEPTH,
            });
        }
        let type_id = self.u32(&|| format!("the element type of array {key:?}"))?;
        let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            file: self.file.to_owned(),
            key: format!("{key}[]"),
            type_id,
        })?;
        let count = self.u64(&|| format!("the length of array {key:?}"))?;
        self.check_count(count, ty.min_bytes(), &|| {
            format!("array {key:?} of {ty} elements")
        })?;
        Ok(match ty {
            ValueType::U8 => Array::U8(self.scalars(count, key, u8::from_le_bytes)?),
            ValueType::I8 => Array::I8(self.scalars(count, key, i8::from_le_bytes)?),
            ValueType::U16 => Array::U16(self.scalars(count, key, u16::from_le_bytes)?),
            ValueType::I16 => Array::I16(self.scalars(count, key, i16::from_le_bytes)?),
            ValueType::U32 => Array::U32(self.scalars(count, key, u32::from_le_bytes)?),
            ValueType::I32 => Array::I32(self.scalars(count, key, i32::from_le_bytes)?),
            ValueType::U64 => Array::U64(self.scalars(count, key, u64::from_le_bytes)?),
            ValueType::I64 => Array::I64(self.scalars(count, key, i64::from_le_bytes)?),
            ValueType::F32 => Array::F32(self.scalars(count, key, f32::from_le_bytes)?),
            ValueType::F64 => Array::F64(self.scalars(count, key, f64::from_le_bytes)?),
            ValueType::Bool => {
                let mut out = reserve(count);
                for i in 0..count {
                    out.push(self.bool(&|| format!("{key}[{i}]"))?);
                }
                Array::Bool(out)
            }
            ValueType::String => {
                let mut out = reserve(count);
                for i in 0..count {
                    out.push(self.string(&|| format!("element {i} of array {key:?}"))?);
                }
                Array::String(out)
            }
            ValueType::Array => {
                let mut out = reserve(count);
                for i in 0..count {
                    out.push(self.array(&format!("{key}[{i}]"), depth + 1)?);
                }
                Array::Array(out)
            }
        })
    }

    fn tensor_info(&mut self, index: u64) -> Result<RawTensor> {
        let name = self.string(&|| format!("the name of tensor {index}"))?;
        let n_dims = self.u32(&|| format!("the dimension count of tensor {name:?}"))?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                file: self.file.to_owned(),
                tensor: name,
                n_dims,
                max: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for i in 0..n_dims {
            dims.push(self.u64(&|| format!("dimension {i} of tensor {name:?}"))?);
        }
        let type_id = self.u32(&|| format!("the type of tensor {name:?}"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownGgmlType {
            file: self.file.to_owned(),
            tensor: name.clone(),
            type_id,
        })?;
        let offset = self.u64(&|| format!("the data offset of tensor {name:?}"))?;
        Ok(RawTensor {
            name,
            dims,
            ggml_type,
            offset,
        })
    }
}

/// The element count of `dims`, or `None` where the product of the non-zero dimensions
/// overflows a `u64` (so no order of multiplication, and no `usize` shape product, overflows).
pub(crate) fn element_count(dims: &[u64]) -> Option<u64> {
    let nonzero = dims
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
    Some(if dims.contains(&0) { 0 } else { nonzero })
}
