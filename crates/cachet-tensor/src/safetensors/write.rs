//! Writing: [`save`] and [`save_tensors`], atomically through a temporary sibling file.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::kind::Basic;
use burn::tensor::{BoolStore, DType, Tensor, TensorData};

use super::{METADATA_KEY, PREFIX_LEN, Result, SafetensorsError, StoredDType, swap_le_native};

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
