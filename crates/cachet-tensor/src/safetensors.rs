//! Reading and writing safetensors checkpoints.
//!
//! [`Checkpoint`] memory-maps one `.safetensors` file or every shard of a sharded checkpoint
//! (`model.safetensors.index.json`), validates each header completely up front (dtypes, shapes,
//! byte ranges, overlaps and gaps), and copies a tensor's bytes out of the mapping only when that
//! tensor is loaded. Every error names the file and, where there is one, the tensor.
//!
//! [`save`] writes a file atomically (temporary file in the same directory, then rename), with
//! the header padded with spaces to a multiple of 8 bytes as the format prescribes.
//!
//! The header is parsed here rather than by the `safetensors` crate so that diagnostics can name
//! the offending file and tensor; files written by either implementation are read by the other.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::kind::Basic;
use burn::tensor::{BoolStore, DType, Device, Int, Tensor, TensorData};
use memmap2::Mmap;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

/// Largest header accepted, as in the reference implementation (100 MB).
const MAX_HEADER_LEN: u64 = 100_000_000;
/// Size of the little-endian header-length prefix.
const PREFIX_LEN: usize = 8;
/// The reserved header key holding free-form string metadata.
const METADATA_KEY: &str = "__metadata__";
/// File name looked for first when a directory is opened.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Single-file name looked for when a directory holds no index.
const SINGLE_FILE: &str = "model.safetensors";

/// Everything that can go wrong while reading or writing safetensors; each variant names the
/// file (or index) and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsError {
    /// An operating-system call on a file failed.
    #[error("{}: cannot {op}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What was being attempted ("open", "memory-map", "write", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the 8-byte header-length prefix.
    #[error(
        "{file}: file is {len} bytes long, too short to be a safetensors file (it must start with an 8-byte header length)"
    )]
    TooSmall {
        /// File name.
        file: String,
        /// Its length in bytes.
        len: u64,
    },
    /// The declared header length runs past the end of the file.
    #[error(
        "{file}: header length {header_len} runs past the end of the file ({file_len} bytes, so at most {} bytes of header)",
        file_len.saturating_sub(8)
    )]
    HeaderTooLarge {
        /// File name.
        file: String,
        /// The header length read from the first 8 bytes.
        header_len: u64,
        /// The file length.
        file_len: u64,
    },
    /// The header is not UTF-8, not JSON, not a JSON object, or has the wrong structure.
    #[error("{file}: invalid header: {reason}")]
    InvalidHeader {
        /// File name.
        file: String,
        /// What is wrong (including serde's message where there is one).
        reason: String,
    },
    /// One tensor's header entry has the wrong structure (missing or mistyped field, ...).
    #[error("{file}: tensor {tensor:?}: invalid header entry: {reason}")]
    InvalidTensorEntry {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// What is wrong (serde's message where there is one).
        reason: String,
    },
    /// A tensor's dtype string is not one the safetensors format defines.
    #[error("{file}: tensor {tensor:?}: unknown dtype {dtype:?}")]
    UnknownDtype {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// The dtype string as written.
        dtype: String,
    },
    /// A tensor's `data_offsets` end before they begin.
    #[error("{file}: tensor {tensor:?}: data_offsets [{begin}, {end}] end before they begin")]
    ReversedOffsets {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// First byte (relative to the data section).
        begin: usize,
        /// One past the last byte.
        end: usize,
    },
    /// A tensor's `data_offsets` run past the end of the data section.
    #[error(
        "{file}: tensor {tensor:?}: data_offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes)"
    )]
    OffsetsOutOfRange {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// First byte (relative to the data section).
        begin: usize,
        /// One past the last byte.
        end: usize,
        /// Length of the data section.
        data_len: usize,
    },
    /// A tensor's byte range does not match its shape and dtype.
    #[error(
        "{file}: tensor {tensor:?}: data_offsets span {actual} bytes but dtype {dtype} with shape {shape:?} needs {expected}"
    )]
    SizeMismatch {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Stored dtype.
        dtype: StoredDType,
        /// Stored shape.
        shape: Vec<usize>,
        /// Bytes implied by shape and dtype.
        expected: usize,
        /// Bytes spanned by `data_offsets`.
        actual: usize,
    },
    /// Two tensors' byte ranges overlap.
    #[error(
        "{file}: tensors {first:?} (bytes [{}, {}]) and {second:?} (bytes [{}, {}]) overlap",
        first_offsets.0, first_offsets.1, second_offsets.0, second_offsets.1
    )]
    Overlap {
        /// File name.
        file: String,
        /// The tensor that starts first.
        first: String,
        /// Its `data_offsets`.
        first_offsets: (usize, usize),
        /// The tensor that starts inside it.
        second: String,
        /// Its `data_offsets`.
        second_offsets: (usize, usize),
    },
    /// Part of the data section belongs to no tensor (the format requires it to be fully indexed).
    #[error(
        "{file}: bytes [{begin}, {end}) of the data section belong to no tensor (the data section must be entirely indexed)"
    )]
    Gap {
        /// File name.
        file: String,
        /// First unindexed byte.
        begin: usize,
        /// One past the last unindexed byte.
        end: usize,
    },
    /// The header is consistent but the file ends before the data it describes.
    #[error(
        "{file}: file is truncated: the header indexes {expected} bytes of tensor data but only {actual} are present (tensor {tensor:?} is cut short)"
    )]
    Truncated {
        /// File name.
        file: String,
        /// The first tensor that runs past the end.
        tensor: String,
        /// Data-section length the header describes.
        expected: usize,
        /// Data-section length present.
        actual: usize,
    },
    /// A tensor's bytes are not a valid representation of its dtype (e.g. a BOOL byte of 2).
    #[error("{file}: tensor {tensor:?}: invalid data: {reason}")]
    InvalidData {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor name asked for is not in the checkpoint.
    #[error("{checkpoint}: no tensor named {name:?} (the checkpoint holds {count} tensors)")]
    MissingTensor {
        /// The checkpoint's file or index.
        checkpoint: String,
        /// The name asked for.
        name: String,
        /// How many tensors the checkpoint holds.
        count: usize,
    },
    /// A shard listed in an index's `weight_map` does not exist.
    #[error("{index}: shard file {shard:?} listed in weight_map does not exist")]
    MissingShard {
        /// The index file.
        index: String,
        /// The shard file name as listed.
        shard: String,
    },
    /// The index file is not valid JSON or lacks a `weight_map` of strings.
    #[error("{index}: invalid checkpoint index: {reason}")]
    InvalidIndex {
        /// The index file.
        index: String,
        /// What is wrong.
        reason: String,
    },
    /// The index maps a tensor to a shard that does not contain it.
    #[error(
        "{index}: weight_map puts tensor {tensor:?} in shard {shard:?}, which does not contain it"
    )]
    TensorNotInShard {
        /// The index file.
        index: String,
        /// The shard file name as listed.
        shard: String,
        /// Tensor name.
        tensor: String,
    },
    /// The same tensor name is stored in two shards.
    #[error("tensor {tensor:?} is stored in two shards: {first} and {second}")]
    DuplicateTensor {
        /// Tensor name.
        tensor: String,
        /// One shard holding it.
        first: String,
        /// The other shard holding it.
        second: String,
    },
    /// The tensor's stored rank differs from the rank asked for.
    #[error(
        "{file}: tensor {tensor:?}: expected rank {expected} but the stored tensor has rank {actual} (shape {shape:?})"
    )]
    RankMismatch {
        /// File holding the tensor.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Rank asked for.
        expected: usize,
        /// Rank stored.
        actual: usize,
        /// Stored shape.
        shape: Vec<usize>,
    },
    /// The stored dtype cannot be converted to (or stored as) the dtype asked for.
    #[error("{file}: tensor {tensor:?}: cannot convert {from} to {to}")]
    UnsupportedConversion {
        /// File holding (or receiving) the tensor.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Source dtype.
        from: String,
        /// Target dtype.
        to: String,
    },
    /// An integer value does not fit the int dtype it is loaded as.
    #[error(
        "{file}: tensor {tensor:?}: element {index} has value {value}, which does not fit the device int dtype {to}"
    )]
    ValueOutOfRange {
        /// File holding the tensor.
        file: String,
        /// Tensor name.
        tensor: String,
        /// Flat index of the first offending element.
        index: usize,
        /// Its value.
        value: i128,
        /// The target dtype.
        to: String,
    },
    /// A tensor name given to [`save`] is empty, reserved or repeated.
    #[error("{file}: cannot save tensor {tensor:?}: {reason}")]
    InvalidTensorName {
        /// File being written.
        file: String,
        /// The offending name.
        tensor: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// Reading a tensor back from its device (to save it) failed.
    #[error("{file}: cannot read tensor {tensor:?} back from its device: {reason}")]
    ReadBack {
        /// File being written.
        file: String,
        /// Tensor name.
        tensor: String,
        /// The backend's message.
        reason: String,
    },
    /// A path given to [`Checkpoint::open`] is neither a checkpoint file, an index, nor a
    /// directory holding exactly one of them.
    #[error("{}: not a safetensors checkpoint: {reason}", path.display())]
    NotACheckpoint {
        /// The path given.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
}

type Result<T, E = SafetensorsError> = std::result::Result<T, E>;

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

    /// Whether [`Checkpoint::load_float`] accepts this stored dtype.
    pub const fn is_loadable_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::BF16)
    }

    /// Whether [`Checkpoint::load_int`] accepts this stored dtype.
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

/// Where a shard's bytes live: a read-only file mapping or caller-provided memory.
enum Storage {
    Mapped(Mmap),
    Memory(Cow<'static, [u8]>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Memory(bytes) => bytes,
        }
    }
}

/// One validated safetensors file.
struct Shard {
    /// Name used in messages (the path as given, or the caller's label).
    label: String,
    storage: Storage,
    /// Offset of the data section within the file (8 + header length).
    data_start: usize,
}

impl Shard {
    fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let (begin, end) = info.data_offsets;
        &self.storage.bytes()[self.data_start + begin..self.data_start + end]
    }
}

/// A safetensors checkpoint of one or more memory-mapped files, validated on open; tensors are
/// copied out of the mapping one at a time, only when loaded.
pub struct Checkpoint {
    /// Name used in messages about the checkpoint as a whole (file or index path).
    label: String,
    shards: Vec<Shard>,
    /// Tensor name -> (index into `shards`, info).
    tensors: BTreeMap<String, (usize, TensorInfo)>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("label", &self.label)
            .field(
                "files",
                &self.shards.iter().map(|s| &s.label).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .field("total_bytes", &self.total_bytes())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, a `*.safetensors.index.json` index of shards,
    /// or a directory holding either (the index is preferred when both are present).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| SafetensorsError::Io {
            path: path.to_path_buf(),
            op: "open",
            source,
        })?;
        if meta.is_dir() {
            let target = Self::pick_in_dir(path)?;
            return Self::open(target);
        }
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".json"))
        {
            Self::open_index(path)
        } else {
            Self::open_file(path)
        }
    }

    /// Opens a checkpoint from bytes already in memory (e.g. `include_bytes!`); `label` stands
    /// for the file name in error messages.
    pub fn from_bytes(label: &str, bytes: impl Into<Cow<'static, [u8]>>) -> Result<Self> {
        let storage = Storage::Memory(bytes.into());
        let header = parse_header(label, storage.bytes())?;
        let shard = Shard {
            label: label.to_owned(),
            storage,
            data_start: header.data_start,
        };
        Ok(Self::single(shard, header))
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Dtype, shape and byte range of a tensor, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(|(_, info)| info)
    }

    /// Whether a tensor of this name is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Number of tensors in the checkpoint.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The file holding a tensor (its path as opened, or the `from_bytes` label), if present.
    pub fn file_of(&self, name: &str) -> Option<&str> {
        self.tensors
            .get(name)
            .map(|(shard, _)| self.shards[*shard].label.as_str())
    }

    /// Free-form metadata: every file's `__metadata__` merged (first file wins on conflicts),
    /// overridden by the scalar values of an index's `"metadata"` object.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Sum of the stored sizes of all tensors, in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|(_, info)| info.byte_len() as u64)
            .sum()
    }

    /// Copies a tensor to host memory in its stored dtype (little-endian values made native).
    pub fn tensor_data(&self, name: &str) -> Result<TensorData> {
        let (shard, info) = self.lookup(name)?;
        let _span = tracing::debug_span!(
            "safetensors_read",
            tensor = name,
            file = shard.label.as_str(),
            bytes = info.byte_len()
        )
        .entered();
        let dtype =
            info.dtype
                .to_burn()
                .ok_or_else(|| SafetensorsError::UnsupportedConversion {
                    file: shard.label.clone(),
                    tensor: name.to_owned(),
                    from: info.dtype.to_string(),
                    to: "any burn dtype".to_owned(),
                })?;
        // Copy out of the mapping: this also fixes alignment, since the data section only
        // guarantees 8-byte alignment of its start relative to the file, not of each tensor.
        let mut bytes = shard.tensor_bytes(info).to_vec();
        if info.dtype == StoredDType::BOOL
            && let Some(pos) = bytes.iter().position(|&b| b > 1)
        {
            return Err(SafetensorsError::InvalidData {
                file: shard.label.clone(),
                tensor: name.to_owned(),
                reason: format!(
                    "BOOL element {pos} has byte value {} (must be 0 or 1)",
                    bytes[pos]
                ),
            });
        }
        swap_le_native(&mut bytes, dtype.size());
        TensorData::try_from_bytes_vec(bytes, info.shape.clone(), dtype).map_err(|e| {
            SafetensorsError::InvalidData {
                file: shard.label.clone(),
                tensor: name.to_owned(),
                reason: e.to_string(),
            }
        })
    }

    /// Loads a float tensor of rank `D` onto `device` as `dtype` (stored F64/F32/F16/BF16 to any
    /// float dtype, rounding to nearest); the rank is checked before any byte is copied.
    pub fn load_float<const D: usize>(
        &self,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor<D>> {
        let (shard, info) = self.lookup(name)?;
        self.check_rank::<D>(shard, name, info)?;
        if !info.dtype.is_loadable_float() || !dtype.is_float() {
            return Err(SafetensorsError::UnsupportedConversion {
                file: shard.label.clone(),
                tensor: name.to_owned(),
                from: info.dtype.to_string(),
                to: format!("float tensor of dtype {}", dtype.name()),
            });
        }
        let data = self.tensor_data(name)?;
        let data = self.cast(shard, name, data, dtype)?;
        Ok(Tensor::<D>::from_data(data, (device, dtype)))
    }

    /// Loads an integer or boolean tensor of rank `D` onto `device` as an int tensor in the
    /// device's default int dtype (values outside that dtype's range are not representable).
    pub fn load_int<const D: usize>(&self, name: &str, device: &Device) -> Result<Tensor<D, Int>> {
        let (shard, info) = self.lookup(name)?;
        self.check_rank::<D>(shard, name, info)?;
        let dtype: DType = device.settings().int_dtype.into();
        if !info.dtype.is_loadable_int() {
            return Err(SafetensorsError::UnsupportedConversion {
                file: shard.label.clone(),
                tensor: name.to_owned(),
                from: info.dtype.to_string(),
                to: format!("int tensor of dtype {}", dtype.name()),
            });
        }
        let data = self.tensor_data(name)?;
        if let Some((index, value)) = first_out_of_range(&data, dtype) {
            return Err(SafetensorsError::ValueOutOfRange {
                file: shard.label.clone(),
                tensor: name.to_owned(),
                index,
                value,
                to: dtype.name().to_owned(),
            });
        }
        let data = self.cast(shard, name, data, dtype)?;
        Ok(Tensor::<D, Int>::from_data(data, (device, dtype)))
    }

    fn cast(
        &self,
        shard: &Shard,
        name: &str,
        data: TensorData,
        dtype: DType,
    ) -> Result<TensorData> {
        let from = data.dtype();
        if from == dtype {
            return Ok(data);
        }
        data.try_cast(dtype)
            .map_err(|e| SafetensorsError::UnsupportedConversion {
                file: shard.label.clone(),
                tensor: name.to_owned(),
                from: from.name().to_owned(),
                to: format!("{} ({e})", dtype.name()),
            })
    }

    fn check_rank<const D: usize>(
        &self,
        shard: &Shard,
        name: &str,
        info: &TensorInfo,
    ) -> Result<()> {
        if info.shape.len() == D {
            Ok(())
        } else {
            Err(SafetensorsError::RankMismatch {
                file: shard.label.clone(),
                tensor: name.to_owned(),
                expected: D,
                actual: info.shape.len(),
                shape: info.shape.clone(),
            })
        }
    }

    fn lookup(&self, name: &str) -> Result<(&Shard, &TensorInfo)> {
        match self.tensors.get(name) {
            Some((shard, info)) => Ok((&self.shards[*shard], info)),
            None => Err(SafetensorsError::MissingTensor {
                checkpoint: self.label.clone(),
                name: name.to_owned(),
                count: self.tensors.len(),
            }),
        }
    }

    fn single(shard: Shard, header: Header) -> Self {
        let tensors = header
            .tensors
            .into_iter()
            .map(|(name, info)| (name, (0, info)))
            .collect();
        Self {
            label: shard.label.clone(),
            shards: vec![shard],
            tensors,
            metadata: header.metadata,
        }
    }

    fn open_file(path: &Path) -> Result<Self> {
        let shard_and_header = open_shard(path)?;
        let (shard, header) = shard_and_header;
        tracing::debug!(
            file = shard.label.as_str(),
            tensors = header.tensors.len(),
            "opened safetensors file"
        );
        Ok(Self::single(shard, header))
    }

    fn open_index(index_path: &Path) -> Result<Self> {
        let index = index_path.display().to_string();
        let _span =
            tracing::debug_span!("safetensors_open_sharded", index = index.as_str()).entered();
        let text = std::fs::read_to_string(index_path).map_err(|source| SafetensorsError::Io {
            path: index_path.to_path_buf(),
            op: "read",
            source,
        })?;
        let raw: RawIndex =
            serde_json::from_str(&text).map_err(|e| SafetensorsError::InvalidIndex {
                index: index.clone(),
                reason: e.to_string(),
            })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let shard_names: BTreeSet<&str> = raw.weight_map.values().map(String::as_str).collect();
        let mut shards = Vec::with_capacity(shard_names.len());
        let mut shard_ids = BTreeMap::new();
        let mut tensors: BTreeMap<String, (usize, TensorInfo)> = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for name in shard_names {
            let relative = Path::new(name);
            if name.is_empty()
                || !relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
            {
                return Err(SafetensorsError::InvalidIndex {
                    index,
                    reason: format!(
                        "shard {name:?} is not a relative path inside the checkpoint directory"
                    ),
                });
            }
            let path = dir.join(relative);
            let (shard, header) = match open_shard(&path) {
                Err(SafetensorsError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(SafetensorsError::MissingShard {
                        index,
                        shard: name.to_owned(),
                    });
                }
                other => other?,
            };
            let id = shards.len();
            for (tensor, info) in header.tensors {
                if let Some((other, _)) = tensors.get(&tensor) {
                    return Err(SafetensorsError::DuplicateTensor {
                        tensor,
                        first: shards_label(&shards, *other),
                        second: shard.label.clone(),
                    });
                }
                tensors.insert(tensor, (id, info));
            }
            for (key, value) in header.metadata {
                metadata.entry(key).or_insert(value);
            }
            shard_ids.insert(name, id);
            shards.push(shard);
        }
        for (tensor, shard_name) in &raw.weight_map {
            let id = shard_ids[shard_name.as_str()];
            if tensors.get(tensor).is_none_or(|(found, _)| *found != id) {
                return Err(SafetensorsError::TensorNotInShard {
                    index,
                    shard: shard_name.clone(),
                    tensor: tensor.clone(),
                });
            }
        }
        for (key, value) in raw.metadata.unwrap_or_default() {
            let value = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            metadata.insert(key, value);
        }
        tracing::debug!(
            shards = shards.len(),
            tensors = tensors.len(),
            "opened sharded safetensors checkpoint"
        );
        Ok(Self {
            label: index,
            shards,
            tensors,
            metadata,
        })
    }

    /// Chooses what to open inside a directory: the standard index, else the standard single
    /// file, else the only index, else the only `.safetensors` file.
    fn pick_in_dir(dir: &Path) -> Result<PathBuf> {
        for standard in [INDEX_FILE, SINGLE_FILE] {
            let candidate = dir.join(standard);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        let entries = std::fs::read_dir(dir).map_err(|source| SafetensorsError::Io {
            path: dir.to_path_buf(),
            op: "list",
            source,
        })?;
        let mut indexes = Vec::new();
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SafetensorsError::Io {
                path: dir.to_path_buf(),
                op: "list",
                source,
            })?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".safetensors.index.json") {
                indexes.push(path);
            } else if name.ends_with(".safetensors") && path.is_file() {
                files.push(path);
            }
        }
        indexes.sort();
        files.sort();
        match (indexes.len(), files.len()) {
            (1, _) => Ok(indexes.remove(0)),
            (0, 1) => Ok(files.remove(0)),
            (0, 0) => Err(SafetensorsError::NotACheckpoint {
                path: dir.to_path_buf(),
                reason: "the directory holds no .safetensors file and no .safetensors.index.json"
                    .to_owned(),
            }),
            (0, n) => Err(SafetensorsError::NotACheckpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "the directory holds {n} .safetensors files but no index to tie them together; open one file or add {INDEX_FILE}"
                ),
            }),
            (n, _) => Err(SafetensorsError::NotACheckpoint {
                path: dir.to_path_buf(),
                reason: format!("the directory holds {n} index files; open one of them directly"),
            }),
        }
    }
}

/// Inclusive value range of an integer dtype.
fn int_range(dtype: DType) -> Option<(i128, i128)> {
    Some(match dtype {
        DType::I64 => (i64::MIN.into(), i64::MAX.into()),
        DType::I32 => (i32::MIN.into(), i32::MAX.into()),
        DType::I16 => (i16::MIN.into(), i16::MAX.into()),
        DType::I8 => (i8::MIN.into(), i8::MAX.into()),
        DType::U64 => (0, u64::MAX.into()),
        DType::U32 => (0, u32::MAX.into()),
        DType::U16 => (0, u16::MAX.into()),
        DType::U8 => (0, u8::MAX.into()),
        DType::Bool(_) => (0, 1),
        _ => return None,
    })
}

/// The first element of integer `data` that `target` cannot hold (burn's cast would panic on it).
fn first_out_of_range(data: &TensorData, target: DType) -> Option<(usize, i128)> {
    let (lo, hi) = int_range(target)?;
    let (src_lo, src_hi) = int_range(data.dtype())?;
    if src_lo >= lo && src_hi <= hi {
        return None;
    }
    fn scan<T: burn::tensor::Element + Into<i128>>(
        data: &TensorData,
        lo: i128,
        hi: i128,
    ) -> Option<(usize, i128)> {
        let values = data.as_slice::<T>().ok()?;
        values
            .iter()
            .map(|&v| v.into())
            .enumerate()
            .find(|&(_, v)| v < lo || v > hi)
    }
    match data.dtype() {
        DType::I64 => scan::<i64>(data, lo, hi),
        DType::I32 => scan::<i32>(data, lo, hi),
        DType::I16 => scan::<i16>(data, lo, hi),
        DType::I8 => scan::<i8>(data, lo, hi),
        DType::U64 => scan::<u64>(data, lo, hi),
        DType::U32 => scan::<u32>(data, lo, hi),
        DType::U16 => scan::<u16>(data, lo, hi),
        DType::U8 => scan::<u8>(data, lo, hi),
        _ => None,
    }
}

fn shards_label(shards: &[Shard], id: usize) -> String {
    shards[id].label.clone()
}

/// Memory-maps and validates one file.
fn open_shard(path: &Path) -> Result<(Shard, Header)> {
    let label = path.display().to_string();
    let io = |op| {
        move |source| SafetensorsError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let file = File::open(path).map_err(io("open"))?;
    let len = file.metadata().map_err(io("stat"))?.len();
    if len < PREFIX_LEN as u64 {
        return Err(SafetensorsError::TooSmall { file: label, len });
    }
    // SAFETY: the mapping is read-only and private to this process. Safetensors files are treated
    // as immutable while open (as every mmap-based reader does); another process truncating or
    // rewriting the file underneath would be undefined behaviour, which `save` avoids for its own
    // writes by replacing files through an atomic rename instead of writing in place.
    let map = unsafe { Mmap::map(&file) }.map_err(io("memory-map"))?;
    let header = parse_header(&label, &map)?;
    let shard = Shard {
        label,
        storage: Storage::Mapped(map),
        data_start: header.data_start,
    };
    Ok((shard, header))
}

/// A validated header.
struct Header {
    tensors: Vec<(String, TensorInfo)>,
    metadata: BTreeMap<String, String>,
    data_start: usize,
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

/// A `*.safetensors.index.json` before validation.
#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    weight_map: BTreeMap<String, String>,
}

/// Parses and fully validates the header of the file in `bytes`.
fn parse_header(file: &str, bytes: &[u8]) -> Result<Header> {
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

/// Swaps element bytes between little-endian and native order in place (its own inverse; a no-op
/// on little-endian hosts).
fn swap_le_native(bytes: &mut [u8], elem_size: usize) {
    if cfg!(target_endian = "big") && elem_size > 1 {
        for elem in bytes.chunks_exact_mut(elem_size) {
            elem.reverse();
        }
    }
}

/// Writes `tensors` (any dtype burn can store) and optional `__metadata__` to a safetensors file,
/// atomically: a temporary file in the same directory is written, synced, then renamed over `path`.
///
/// Header keys are sorted by name; in the data section tensors are laid out by decreasing element
/// size, then name, so that every tensor is naturally aligned (as the reference writer does).
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(String, TensorData)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let _span = tracing::debug_span!(
        "safetensors_save",
        file = file.as_str(),
        tensors = tensors.len()
    )
    .entered();

    struct Prepared<'a> {
        name: &'a str,
        dtype: StoredDType,
        shape: Vec<usize>,
        bytes: Cow<'a, [u8]>,
    }
    let mut prepared: Vec<Prepared<'_>> = Vec::with_capacity(tensors.len());
    let mut names = BTreeSet::new();
    for (name, data) in tensors {
        let bad_name = |reason| SafetensorsError::InvalidTensorName {
            file: file.clone(),
            tensor: name.clone(),
            reason,
        };
        if name.is_empty() {
            return Err(bad_name("the name is empty"));
        }
        if name == METADATA_KEY {
            return Err(bad_name("the name is reserved for the metadata entry"));
        }
        if !names.insert(name.as_str()) {
            return Err(bad_name("the name is given twice"));
        }
        let dtype = StoredDType::from_burn(data.dtype()).ok_or_else(|| {
            SafetensorsError::UnsupportedConversion {
                file: file.clone(),
                tensor: name.clone(),
                from: data.dtype().name().to_owned(),
                to: "any safetensors dtype".to_owned(),
            }
        })?;
        let bytes: Cow<'_, [u8]> = match data.dtype() {
            // Burn's u32-backed booleans become one byte each.
            DType::Bool(BoolStore::U32) => Cow::Owned(
                data.as_bytes()
                    .chunks_exact(4)
                    .map(|c| u8::from(c.iter().any(|&b| b != 0)))
                    .collect(),
            ),
            DType::Bool(_) => {
                Cow::Owned(data.as_bytes().iter().map(|&b| u8::from(b != 0)).collect())
            }
            other if cfg!(target_endian = "big") && other.size() > 1 => {
                let mut owned = data.as_bytes().to_vec();
                swap_le_native(&mut owned, other.size());
                Cow::Owned(owned)
            }
            _ => Cow::Borrowed(data.as_bytes()),
        };
        let shape = data.shape().as_slice().to_vec();
        let expected = shape.iter().product::<usize>() * dtype.bits() / 8;
        if bytes.len() != expected {
            return Err(SafetensorsError::SizeMismatch {
                file: file.clone(),
                tensor: name.clone(),
                dtype,
                shape,
                expected,
                actual: bytes.len(),
            });
        }
        prepared.push(Prepared {
            name,
            dtype,
            shape,
            bytes,
        });
    }
    prepared.sort_by(|a, b| b.dtype.bits().cmp(&a.dtype.bits()).then(a.name.cmp(b.name)));

    let mut offsets = BTreeMap::new();
    let mut offset = 0usize;
    for p in &prepared {
        offsets.insert(p.name, (p, offset, offset + p.bytes.len()));
        offset += p.bytes.len();
    }
    let mut header = serde_json::Map::new();
    if let Some(metadata) = metadata {
        let map = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert(METADATA_KEY.to_owned(), serde_json::Value::Object(map));
    }
    for (name, (p, begin, end)) in &offsets {
        header.insert(
            (*name).to_owned(),
            serde_json::json!({
                "dtype": p.dtype.name(),
                "shape": p.shape,
                "data_offsets": [begin, end],
            }),
        );
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))
        .expect("a JSON value of strings and integers always serializes");
    header.resize(header.len().next_multiple_of(PREFIX_LEN), b' ');

    write_atomically(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for p in &prepared {
            w.write_all(&p.bytes)?;
        }
        Ok(())
    })?;
    tracing::debug!(
        bytes = PREFIX_LEN + header.len() + offset,
        "saved safetensors file"
    );
    Ok(())
}

/// Reads burn tensors (of any one rank and kind) back from their device and [`save`]s them.
pub fn save_tensors<const D: usize, K: Basic>(
    path: impl AsRef<Path>,
    tensors: Vec<(String, Tensor<D, K>)>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let data = tensors
        .into_iter()
        .map(|(name, tensor)| match tensor.try_into_data() {
            Ok(data) => Ok((name, data)),
            Err(e) => Err(SafetensorsError::ReadBack {
                file: path.display().to_string(),
                tensor: name,
                reason: e.to_string(),
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    save(path, &data, metadata)
}

/// Writes a file through `write` into a temporary sibling, syncs it, and renames it over `path`;
/// the temporary file is removed on failure.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| SafetensorsError::Io {
            path: p,
            op,
            source,
        }
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| SafetensorsError::Io {
            path: path.to_path_buf(),
            op: "write",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        write(&mut writer).map_err(io("write", &tmp))?;
        let file = writer
            .into_inner()
            .map_err(|e| io("write", &tmp)(e.into_error()))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io("rename into place", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        // Persist the rename itself; failure here does not lose data already written.
        #[cfg(unix)]
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    result
}
