//! The file header: stored dtypes, tensor entries, and their parsing and layout validation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use burn::tensor::{BoolStore, DType};
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use super::{MAX_HEADER_LEN, METADATA_KEY, PREFIX_LEN, Result, SafetensorsError};

/// An element type of the safetensors format (the `dtype` string of a header entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum StoredDType {
    /// Boolean, one byte each (0 or 1).
    BOOL,
    /// 4-bit MX float, packed.
    F4,
    /// 6-bit MX float (e2m3), packed.
    F6_E2M3,
    /// 6-bit MX float (e3m2), packed.
    F6_E3M2,
    /// Unsigned byte.
    U8,
    /// Signed byte.
    I8,
    /// FP8 e5m2.
    F8_E5M2,
    /// FP8 e4m3.
    F8_E4M3,
    /// FP8 e8m0 (scale type).
    F8_E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex with two f32 parts.
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl StoredDType {
    /// Every dtype the format defines, for parsing and listing.
    const ALL: [StoredDType; 20] = [
        Self::BOOL,
        Self::F4,
        Self::F6_E2M3,
        Self::F6_E3M2,
        Self::U8,
        Self::I8,
        Self::F8_E5M2,
        Self::F8_E4M3,
        Self::F8_E8M0,
        Self::I16,
        Self::U16,
        Self::F16,
        Self::BF16,
        Self::I32,
        Self::U32,
        Self::F32,
        Self::C64,
        Self::F64,
        Self::I64,
        Self::U64,
    ];

    /// The dtype's name as written in headers (`"F32"`, `"BF16"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Self::BOOL => "BOOL",
            Self::F4 => "F4",
            Self::F6_E2M3 => "F6_E2M3",
            Self::F6_E3M2 => "F6_E3M2",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::F8_E5M2 => "F8_E5M2",
            Self::F8_E4M3 => "F8_E4M3",
            Self::F8_E8M0 => "F8_E8M0",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::F32 => "F32",
            Self::C64 => "C64",
            Self::F64 => "F64",
            Self::I64 => "I64",
            Self::U64 => "U64",
        }
    }

    /// Parses a header dtype string; `None` for names the format does not define.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Width of one element in bits (sub-byte types are packed).
    pub const fn bits(self) -> usize {
        match self {
            Self::F4 => 4,
            Self::F6_E2M3 | Self::F6_E3M2 => 6,
            Self::BOOL | Self::U8 | Self::I8 | Self::F8_E5M2 | Self::F8_E4M3 | Self::F8_E8M0 => 8,
            Self::I16 | Self::U16 | Self::F16 | Self::BF16 => 16,
            Self::I32 | Self::U32 | Self::F32 => 32,
            Self::C64 | Self::F64 | Self::I64 | Self::U64 => 64,
        }
    }

    /// The burn dtype holding the same values bit for bit, if burn has one.
    pub const fn to_burn(self) -> Option<DType> {
        Some(match self {
            Self::BOOL => DType::Bool(BoolStore::Native),
            Self::U8 => DType::U8,
            Self::I8 => DType::I8,
            Self::I16 => DType::I16,
            Self::U16 => DType::U16,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::I32 => DType::I32,
            Self::U32 => DType::U32,
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
            Self::I64 => DType::I64,
            Self::U64 => DType::U64,
            Self::F4
            | Self::F6_E2M3
            | Self::F6_E3M2
            | Self::F8_E5M2
            | Self::F8_E4M3
            | Self::F8_E8M0
            | Self::C64 => return None,
        })
    }

    /// The stored dtype for a burn dtype, if the format can hold it (`Flex32` is stored as F32,
    /// every bool storage as BOOL; quantized data has no equivalent).
    pub const fn from_burn(dtype: DType) -> Option<Self> {
        Some(match dtype {
            DType::F64 => Self::F64,
            DType::F32 | DType::Flex32 => Self::F32,
            DType::F16 => Self::F16,
            DType::BF16 => Self::BF16,
            DType::I64 => Self::I64,
            DType::I32 => Self::I32,
            DType::I16 => Self::I16,
            DType::I8 => Self::I8,
            DType::U64 => Self::U64,
            DType::U32 => Self::U32,
            DType::U16 => Self::U16,
            DType::U8 => Self::U8,
            DType::Bool(_) => Self::BOOL,
            DType::QFloat(_) => return None,
        })
    }

    /// Whether [`Checkpoint::load_float`](super::Checkpoint::load_float) accepts this stored dtype.
    pub const fn is_loadable_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::BF16)
    }

    /// Whether [`Checkpoint::load_int`](super::Checkpoint::load_int) accepts this stored dtype.
    pub const fn is_loadable_int(self) -> bool {
        matches!(
            self,
            Self::BOOL
                | Self::U8
                | Self::I8
                | Self::I16
                | Self::U16
                | Self::I32
                | Self::U32
                | Self::I64
                | Self::U64
        )
    }
}

impl fmt::Display for StoredDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Dtype, shape and byte range of one stored tensor, as validated from its file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type as stored.
    pub dtype: StoredDType,
    /// Dimensions, outermost first (row-major).
    pub shape: Vec<usize>,
    /// `[begin, end)` byte range relative to the start of the file's data section.
    pub data_offsets: (usize, usize),
}

impl TensorInfo {
    /// Number of elements (1 for a scalar of shape `[]`).
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of bytes the tensor occupies in the file.
    pub fn byte_len(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A validated header.
pub(super) struct Header {
    pub(super) tensors: Vec<(String, TensorInfo)>,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) data_start: usize,
}

/// The top-level header object, keys in file order, duplicates kept so they can be rejected.
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for HeaderEntries {
    fn deserialize<De: serde::Deserializer<'de>>(deserializer: De) -> Result<Self, De::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object mapping tensor names to entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HeaderEntries, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(HeaderEntries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// One tensor's header entry before validation.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Parses and fully validates the header of the file in `bytes`.
pub(super) fn parse_header(file: &str, bytes: &[u8]) -> Result<Header> {
    let invalid = |reason: String| SafetensorsError::InvalidHeader {
        file: file.to_owned(),
        reason,
    };
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.first_chunk::<PREFIX_LEN>() else {
        return Err(SafetensorsError::TooSmall {
            file: file.to_owned(),
            len: file_len,
        });
    };
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > file_len - PREFIX_LEN as u64 {
        return Err(SafetensorsError::HeaderTooLarge {
            file: file.to_owned(),
            header_len,
            file_len,
        });
    }
    if header_len > MAX_HEADER_LEN {
        return Err(invalid(format!(
            "header length {header_len} exceeds the {MAX_HEADER_LEN}-byte limit"
        )));
    }
    // Fits in usize: it is no larger than the in-memory buffer.
    let data_start = PREFIX_LEN + header_len as usize;
    let text = std::str::from_utf8(&bytes[PREFIX_LEN..data_start]).map_err(|e| {
        invalid(format!(
            "header is not valid UTF-8 (bad byte at header offset {})",
            e.valid_up_to()
        ))
    })?;
    let entries: HeaderEntries = serde_json::from_str(text).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => invalid(format!("header has the wrong structure: {e}")),
            Category::Syntax | Category::Eof | Category::Io => {
                invalid(format!("header is not valid JSON: {e}"))
            }
        }
    })?;
    let data_len = bytes.len() - data_start;

    let mut seen = BTreeSet::new();
    let mut metadata = BTreeMap::new();
    let mut tensors: Vec<(String, TensorInfo)> = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(invalid(format!("key {name:?} appears more than once")));
        }
        if name == METADATA_KEY {
            metadata = serde_json::from_value(value).map_err(|e| {
                invalid(format!(
                    "{METADATA_KEY} must be an object of string values: {e}"
                ))
            })?;
            continue;
        }
        let entry_error = |reason: String| SafetensorsError::InvalidTensorEntry {
            file: file.to_owned(),
            tensor: name.clone(),
            reason,
        };
        let raw: RawEntry =
            serde_json::from_value(value).map_err(|e| entry_error(e.to_string()))?;
        let dtype =
            StoredDType::parse(&raw.dtype).ok_or_else(|| SafetensorsError::UnknownDtype {
                file: file.to_owned(),
                tensor: name.clone(),
                dtype: raw.dtype.clone(),
            })?;
        let (begin, end) = raw.data_offsets;
        if end < begin {
            return Err(SafetensorsError::ReversedOffsets {
                file: file.to_owned(),
                tensor: name,
                begin,
                end,
            });
        }
        let expected = raw
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bits()))
            .ok_or_else(|| {
                entry_error(format!(
                    "shape {:?} of {dtype} overflows the address space",
                    raw.shape
                ))
            })?;
        if expected % 8 != 0 {
            return Err(entry_error(format!(
                "shape {:?} of {dtype} ({} bits each) is not a whole number of bytes",
                raw.shape,
                dtype.bits()
            )));
        }
        let expected = expected / 8;
        if end - begin != expected {
            return Err(SafetensorsError::SizeMismatch {
                file: file.to_owned(),
                tensor: name,
                dtype,
                shape: raw.shape,
                expected,
                actual: end - begin,
            });
        }
        tensors.push((
            name,
            TensorInfo {
                dtype,
                shape: raw.shape,
                data_offsets: (begin, end),
            },
        ));
    }

    check_layout(file, &tensors, data_len)?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

/// Checks that the tensors tile the data section exactly: in range, no overlap, no gap.
fn check_layout(file: &str, tensors: &[(String, TensorInfo)], data_len: usize) -> Result<()> {
    let mut order: Vec<&(String, TensorInfo)> = tensors.iter().collect();
    order.sort_by_key(|(_, info)| info.data_offsets);
    let contiguous = order
        .iter()
        .try_fold(0usize, |pos, (_, info)| {
            (info.data_offsets.0 == pos).then_some(info.data_offsets.1)
        })
        .is_some();

    if let Some((name, info)) = order
        .iter()
        .find(|(_, info)| info.data_offsets.1 > data_len)
    {
        let (begin, end) = info.data_offsets;
        return Err(if contiguous {
            SafetensorsError::Truncated {
                file: file.to_owned(),
                tensor: name.clone(),
                expected: order.last().map_or(0, |(_, i)| i.data_offsets.1),
                actual: data_len,
            }
        } else {
            SafetensorsError::OffsetsOutOfRange {
                file: file.to_owned(),
                tensor: name.clone(),
                begin,
                end,
                data_len,
            }
        });
    }

    let mut covered = 0usize;
    let mut last: Option<&(String, TensorInfo)> = None;
    for entry in order {
        let (begin, end) = entry.1.data_offsets;
        if begin < covered {
            // `last` is set: nothing can start before 0.
            let (first, first_info) = last.expect("overlap needs an earlier tensor");
            return Err(SafetensorsError::Overlap {
                file: file.to_owned(),
                first: first.clone(),
                first_offsets: first_info.data_offsets,
                second: entry.0.clone(),
                second_offsets: (begin, end),
            });
        }
        if begin > covered {
            return Err(SafetensorsError::Gap {
                file: file.to_owned(),
                begin: covered,
                end: begin,
            });
        }
        covered = end;
        last = Some(entry);
    }
    if covered < data_len {
        return Err(SafetensorsError::Gap {
            file: file.to_owned(),
            begin: covered,
            end: data_len,
        });
    }
    Ok(())
}
