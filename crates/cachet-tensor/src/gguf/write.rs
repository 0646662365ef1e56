//! Writing GGUF files (version 3, little-endian), laid out as llama.cpp writes them.

use std::io::Write;
use std::path::Path;

use super::error::GgufError;
use super::read::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS};
use super::types::{Array, GgmlType, Value};

type Result<T, E = GgufError> = std::result::Result<T, E>;

/// One tensor queued for writing.
struct Pending {
    name: String,
    /// ggml order, innermost first.
    dims: Vec<u64>,
    ggml_type: GgmlType,
    bytes: Vec<u8>,
}

/// Builds a GGUF file: metadata in insertion order, then tensor infos, then each tensor's bytes
/// padded to the alignment (`general.alignment` when set, else 32).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<Pending>,
}

impl std::fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWriter")
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn rejected(what: String, reason: impl Into<String>) -> GgufError {
    GgufError::InvalidWrite {
        what,
        reason: reason.into(),
    }
}

fn array_depth(array: &Array) -> usize {
    match array {
        Array::Array(items) => 1 + items.iter().map(array_depth).max().unwrap_or(0),
        _ => 1,
    }
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key; keys must be unique, `general.alignment` a `u32` power of two.
    pub fn add_metadata(&mut self, key: &str, value: impl Into<Value>) -> Result<&mut Self> {
        let value = value.into();
        let what = || format!("metadata key {key:?}");
        if self.metadata.iter().any(|(k, _)| k == key) {
            return Err(rejected(what(), "the key is given twice"));
        }
        if key == ALIGNMENT_KEY && !matches!(value, Value::U32(a) if a.is_power_of_two()) {
            return Err(rejected(what(), "must be a u32 power of two"));
        }
        if let Value::Array(a) = &value
            && array_depth(a) > MAX_ARRAY_DEPTH
        {
            return Err(rejected(
                what(),
                format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"),
            ));
        }
        self.metadata.push((key.to_owned(), value));
        Ok(self)
    }

    /// Adds a tensor of row-major `shape` (outermost first) whose `bytes` are its blocks or
    /// little-endian elements of `ggml_type`.
    pub fn add_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        ggml_type: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<&mut Self> {
        let what = || format!("tensor {name:?}");
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(rejected(what(), "the name is given twice"));
        }
        if shape.len() > MAX_DIMS as usize {
            return Err(rejected(
                what(),
                format!("{} dimensions (at most {MAX_DIMS})", shape.len()),
            ));
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let row = dims.first().copied().unwrap_or(1);
        let elements = super::read::element_count(&dims);
        let expected = elements.and_then(|n| ggml_type.bytes_for(n));
        if row % ggml_type.block_size() as u64 != 0 {
            return Err(rejected(
                what(),
                format!(
                    "row length {row} is not a multiple of the {ggml_type} block size {}",
                    ggml_type.block_size()
                ),
            ));
        }
        if expected != Some(bytes.len() as u64) {
            return Err(rejected(
                what(),
                format!(
                    "{} bytes given, but {ggml_type} with shape {shape:?} needs {expected:?}",
                    bytes.len()
                ),
            ));
        }
        self.tensors.push(Pending {
            name: name.to_owned(),
            dims,
            ggml_type,
            bytes,
        });
        Ok(self)
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find_map(|(k, v)| match v {
                Value::U32(a) if k == ALIGNMENT_KEY => Some(u64::from(*a)),
                _ => None,
            })
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self.alignment() as usize;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.bytes.len().next_multiple_of(alignment);
        }
        out.resize(out.len().next_multiple_of(alignment), 0);
        for t in &self.tensors {
            out.extend_from_slice(&t.bytes);
            out.resize(out.len().next_multiple_of(alignment), 0);
        }
        out
    }

    /// Writes the file through a temporary sibling renamed over `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |op, p: &Path| {
            let p = p.to_path_buf();
            move |source| GgufError::Io {
                path: p,
                op,
                source,
            }
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let result = (|| {
            let mut file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
            file.write_all(&self.to_bytes())
                .map_err(io("write", &tmp))?;
            file.sync_all().map_err(io("sync", &tmp))?;
            drop(file);
            std::fs::rename(&tmp, path).map_err(io("rename into place", path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, array: &Array) {
    out.extend_from_slice(&array.element_type().id().to_le_bytes());
    out.extend_from_slice(&(array.len() as u64).to_le_bytes());
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match array {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => le!(v),
        Array::U16(v) => le!(v),
        Array::I16(v) => le!(v),
        Array::U32(v) => le!(v),
        Array::I32(v) => le!(v),
        Array::U64(v) => le!(v),
        Array::I64(v) => le!(v),
        Array::F32(v) => le!(v),
        Array::F64(v) => le!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => {
            for s in v {
                put_str(out, s);
            }
        }
        Array::Array(v) => {
            for a in v {
                put_array(out, a);
            }
        }
    }
}
