//! [`Checkpoint`]: opening single files and directories, and loading tensors out of the mapping.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use memmap2::Mmap;

use super::header::{Header, parse_header};
use super::{
    INDEX_FILE, PREFIX_LEN, Result, SINGLE_FILE, SafetensorsError, StoredDType, TensorInfo,
    swap_le_native,
};

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
pub(super) struct Shard {
    /// Name used in messages (the path as given, or the caller's label).
    pub(super) label: String,
    /// The mapped file (`None` for bytes in memory).
    path: Option<PathBuf>,
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
    pub(super) label: String,
    pub(super) shards: Vec<Shard>,
    /// Tensor name -> (index into `shards`, info).
    pub(super) tensors: BTreeMap<String, (usize, TensorInfo)>,
    pub(super) metadata: BTreeMap<String, String>,
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
            path: None,
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

    /// The file a tensor is mapped from, to read it with ordinary file I/O; `None` when absent
    /// or when its bytes are in memory ([`Checkpoint::from_bytes`], whose label is no path).
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        let (shard, _) = self.tensors.get(name)?;
        self.shards[*shard].path.as_deref()
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

/// Memory-maps and validates one file.
pub(super) fn open_shard(path: &Path) -> Result<(Shard, Header)> {
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
        path: Some(path.to_path_buf()),
        storage: Storage::Mapped(map),
        data_start: header.data_start,
    };
    Ok((shard, header))
}
