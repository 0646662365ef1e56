//! Reading GGUF files, llama.cpp's single-file model format, and dequantizing their tensors.
//!
//! [`GgufFile`] memory-maps a file (versions 2 and 3, little-endian), validates the whole
//! header on open — metadata of every value type, tensor infos, `general.alignment`, byte
//! ranges, alignment and overlaps — and copies or dequantizes a tensor only when asked. Every
//! error names the file and the key or tensor; no input makes the reader panic, and no count read
//! from the file is allocated for before it is checked against the bytes that remain.
//!
//! [`dequantize`] and friends turn F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
//! Q4_K, Q5_K, Q6_K and Q8_K blocks into f32 values equal to the last bit to gguf-py's
//! `gguf.quants.dequantize` (f16/bf16 outputs round those f32 values to nearest-even).
//!
//! GGUF lists dimensions innermost first (`ne[0]` is contiguous); [`GgufTensorInfo::shape`] and
//! the tensors loaded here use the row-major order torch and burn use, i.e. the reverse.
//! [`GgufWriter`] writes files, for tests and small tools.

mod dequant;
mod error;
mod read;
mod types;
mod write;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::Path;

use burn::tensor::{DType, Device, Tensor, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;

pub use dequant::{dequantize, dequantize_into};
pub use error::{DequantizeError, GgufError};
pub use read::GgufTensorInfo;
pub use types::{Array, GgmlType, Value};
pub use write::GgufWriter;

use dequant::{dequantize_into_bf16, dequantize_into_f16};

use crate::dtype::Precision;

type Result<T, E = GgufError> = std::result::Result<T, E>;

/// One of the `dequantize_into*` functions.
type Kernel<T> = fn(GgmlType, &[u8], &mut [T]) -> std::result::Result<(), DequantizeError>;

/// Where the file's bytes live: a read-only mapping or caller-provided memory.
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

/// A validated GGUF file: metadata parsed, tensor infos checked, tensor bytes left in place.
pub struct GgufFile {
    /// Name used in messages (the path as given, or the caller's label).
    label: String,
    storage: Storage,
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: Vec<(String, Value)>,
    keys: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    names: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("label", &self.label)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates a `.gguf` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |op| {
            move |source| GgufError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        let file = File::open(path).map_err(io("open"))?;
        // SAFETY: the mapping is read-only and private to this process. The file is treated as
        // immutable while open, as every mmap-based model reader does; another process
        // truncating or rewriting it underneath would be undefined behaviour.
        let map = unsafe { Mmap::map(&file) }.map_err(io("memory-map"))?;
        let label = path.display().to_string();
        let _span = tracing::debug_span!("gguf_open", file = label.as_str()).entered();
        Self::new(label, Storage::Mapped(map))
    }

    /// Validates a GGUF file already in memory; `label` stands for the file name in messages.
    pub fn from_bytes(label: &str, bytes: impl Into<Cow<'static, [u8]>>) -> Result<Self> {
        Self::new(label.to_owned(), Storage::Memory(bytes.into()))
    }

    fn new(label: String, storage: Storage) -> Result<Self> {
        let header = read::parse(&label, storage.bytes())?;
        let keys = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let names = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        tracing::debug!(
            file = label.as_str(),
            version = header.version,
            metadata = header.metadata.len(),
            tensors = header.tensors.len(),
            "opened GGUF file"
        );
        Ok(Self {
            label,
            storage,
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            metadata: header.metadata,
            keys,
            tensors: header.tensors,
            names,
        })
    }

    /// The file name used in messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Offset of the data section in the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Every metadata key and value, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.keys.get(key).map(|&i| &self.metadata[i].1)
    }

    /// `general.architecture` (`llama`, `qwen2`, ...), if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// Every tensor info, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// A tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.names.get(name).map(|&i| &self.tensors[i])
    }

    /// Whether a tensor of this name is present.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn lookup(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            file: self.label.clone(),
            name: name.to_owned(),
            count: self.tensors.len(),
        })
    }

    fn bytes_of(&self, info: &GgufTensorInfo) -> &[u8] {
        // Validated on open: the range lies inside the data section.
        let start = self.data_start + info.offset as usize;
        &self.storage.bytes()[start..start + info.byte_len]
    }

    /// A tensor's stored bytes (blocks or little-endian elements), borrowed from the mapping.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        Ok(self.bytes_of(self.lookup(name)?))
    }

    fn dequantize_with<T: Copy + Default>(&self, name: &str, kernel: Kernel<T>) -> Result<Vec<T>> {
        let info = self.lookup(name)?;
        let error = |source| GgufError::Dequantize {
            file: self.label.clone(),
            tensor: name.to_owned(),
            source,
        };
        if !info.ggml_type.can_dequantize() {
            return Err(error(DequantizeError::Unsupported(info.ggml_type)));
        }
        let _span = tracing::debug_span!(
            "gguf_dequantize",
            tensor = name,
            ggml_type = info.ggml_type.name(),
            elements = info.elements
        )
        .entered();
        // The element count is bounded by the tensor's bytes, which are in the file.
        let mut out = vec![T::default(); info.elements];
        kernel(info.ggml_type, self.bytes_of(info), &mut out).map_err(error)?;
        Ok(out)
    }

    /// A tensor's values as f32, in row-major order of [`GgufTensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        self.dequantize_with(name, dequantize_into)
    }

    /// A tensor's values rounded to f16.
    pub fn dequantize_f16(&self, name: &str) -> Result<Vec<f16>> {
        self.dequantize_with(name, dequantize_into_f16)
    }

    /// A tensor's values rounded to bf16.
    pub fn dequantize_bf16(&self, name: &str) -> Result<Vec<bf16>> {
        self.dequantize_with(name, dequantize_into_bf16)
    }

    /// A tensor dequantized to host memory in `precision`, with its row-major shape.
    pub fn tensor_data(&self, name: &str, precision: Precision) -> Result<TensorData> {
        let shape = self.lookup(name)?.shape();
        Ok(match precision {
            Precision::F32 => TensorData::new(self.dequantize(name)?, shape),
            Precision::F16 => TensorData::new(self.dequantize_f16(name)?, shape),
            Precision::BF16 => TensorData::new(self.dequantize_bf16(name)?, shape),
        })
    }

    /// Dequantizes a tensor of rank `D` onto `device` as `dtype` (f32, f16 or bf16; other
    /// dtypes load as f32); the rank is checked before anything is dequantized.
    pub fn load_float<const D: usize>(
        &self,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor<D>> {
        let info = self.lookup(name)?;
        if info.dims.len() != D {
            return Err(GgufError::RankMismatch {
                file: self.label.clone(),
                tensor: name.to_owned(),
                expected: D,
                shape: info.shape(),
            });
        }
        let precision = Precision::from_dtype(dtype).unwrap_or(Precision::F32);
        let data = self.tensor_data(name, precision)?;
        Ok(Tensor::<D>::from_data(data, (device, precision.dtype())))
    }
}
