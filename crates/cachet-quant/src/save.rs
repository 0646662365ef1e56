//! `QuantizedModel::save_pretrained`: a streaming, sharded writer of transformers' layout.
//!
//! The header of each safetensors file is laid out first from the tensors' names, dtypes and
//! shapes alone ([`QuantizedLinear::parts`], the source checkpoint's header); then each tensor
//! is produced — read from the memory-mapped source (cast to `torch_dtype`) or serialised from
//! its quantized layer — written and dropped before the next one. Peak memory of a save is
//! therefore one tensor, whatever the model or shard size. Files are split as transformers'
//! `save_pretrained(max_shard_size=...)` splits them (`model-00001-of-0000N.safetensors` plus
//! `model.safetensors.index.json`); a model that fits one shard is a single `model.safetensors`.
//!
//! The directory is replaced atomically (the private `atomic_dir` module): the whole checkpoint is written
//! into a work folder beside it (`.NAME.cachet-save-PID-N`), every file and folder is synced,
//! and the folder is swapped in, so `dir` is at every moment the complete old checkpoint or the
//! complete new one (on Linux; elsewhere a crash between the two renames of the swap leaves the
//! old checkpoint parked in the work folder, put back by the next save or by
//! [`recover_interrupted_save`]). Files of `dir` that are not weight files (a README, a
//! tokenizer, a folder) are carried into the new checkpoint, hard-linked where possible.
//! `cachet_tensor::safetensors::save` is atomic per file but holds every tensor in memory; the
//! streaming writer here needs no per-file atomicity, since nothing it writes is visible before
//! the swap.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::safetensors::StoredDType;
use serde_json::Value;

use crate::atomic_dir::{DirSave, crash_point};
use crate::error::{QuantError, Result};
use crate::load::{QuantizedLinear, QuantizedModel, float_dtype_of, owned_by};
use crate::serialize::Part;

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// Source tensors at least this big are read through a mapping opened and dropped around them.
const OWN_MAPPING_BYTES: usize = 16 << 20;

/// Options of [`QuantizedModel::save_pretrained_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveOptions {
    /// Largest shard in bytes of tensor data (a tensor bigger than this gets a shard of its
    /// own, as in transformers). Parse transformers' strings with [`parse_shard_size`].
    pub max_shard_size: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
        }
    }
}

/// Parses a shard size as transformers' `convert_file_size_to_int` does: `"5GB"` (10⁹),
/// `"500MB"`, `"10KB"`, `"2GiB"` (2³⁰), `"512MiB"`, `"64KiB"`; a lower-case `b` means bits
/// (`"8Gb"` = 1 GB). A plain integer is a number of bytes.
pub fn parse_shard_size(text: &str) -> Result<u64> {
    let bad = || QuantError::Config {
        origin: "max_shard_size".into(),
        reason: format!(
            "{text:?} is not a size: use an integer followed by a unit, e.g. \"5GB\", \"500MB\" or \"2GiB\""
        ),
    };
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    let number = |digits: &str| digits.trim().parse::<u64>().map_err(|_| bad());
    let size = if let Ok(n) = t.parse::<u64>() {
        n
    } else if let Some((suffix, scale)) = [("GIB", 1u64 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10)]
        .into_iter()
        .find(|(s, _)| upper.ends_with(s))
    {
        number(&t[..t.len() - suffix.len()])?
            .checked_mul(scale)
            .ok_or_else(bad)?
    } else if let Some((suffix, scale)) =
        [("GB", 1_000_000_000u64), ("MB", 1_000_000), ("KB", 1_000)]
            .into_iter()
            .find(|(s, _)| upper.ends_with(s))
    {
        let bytes = number(&t[..t.len() - suffix.len()])?
            .checked_mul(scale)
            .ok_or_else(bad)?;
        if t.ends_with('b') { bytes / 8 } else { bytes }
    } else {
        return Err(bad());
    };
    if size == 0 {
        return Err(QuantError::Config {
            origin: "max_shard_size".into(),
            reason: format!("{text:?} is zero bytes"),
        });
    }
    Ok(size)
}

/// Where one output tensor's data comes from.
enum Source<'a> {
    /// A tensor of the source checkpoint, cast to `torch_dtype` if it is a float.
    Checkpoint,
    /// One part of a quantized layer.
    Quantized(&'a QuantizedLinear, Part),
}

/// One output tensor, known by its header entry before its data is produced.
struct Entry<'a> {
    name: String,
    dtype: StoredDType,
    shape: Vec<usize>,
    source: Source<'a>,
}

impl Entry<'_> {
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bits() / 8
    }
}

/// Sort key putting `model.layers.2` before `model.layers.10` (transformers writes in module
/// order, which for these models is numeric).
fn natural_key(name: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            let (d, r) = rest.split_at(digits);
            out.push((d.parse().unwrap_or(u64::MAX), String::new()));
            rest = r;
        } else {
            let text = rest.len() - rest.trim_start_matches(|c: char| !c.is_ascii_digit()).len();
            let (t, r) = rest.split_at(text);
            out.push((0, t.to_string()));
            rest = r;
        }
    }
    out
}

/// The bytes of `data` as a safetensors file stores them (little-endian, one byte per bool).
fn stored_bytes(data: &TensorData) -> Cow<'_, [u8]> {
    let bytes = data.as_bytes();
    match data.dtype() {
        DType::Bool(_) => {
            let n = data.num_elements().max(1);
            let width = (bytes.len() / n).max(1);
            Cow::Owned(
                bytes
                    .chunks(width)
                    .map(|c| u8::from(c.iter().any(|&b| b != 0)))
                    .collect(),
            )
        }
        other if cfg!(target_endian = "big") && other.size() > 1 => {
            let mut owned = bytes.to_vec();
            for elem in owned.chunks_exact_mut(other.size()) {
                elem.reverse();
            }
            Cow::Owned(owned)
        }
        _ => Cow::Borrowed(bytes),
    }
}

impl<M> QuantizedModel<M> {
    /// Writes `config.json` (with `quantization_config`) and the weights in transformers'
    /// layout to `dir`, with transformers' default `max_shard_size` of 5 GB (see
    /// [`QuantizedModel::save_pretrained_with`]).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_pretrained_with(dir, &SaveOptions::default())
    }

    /// Writes `config.json` (with `quantization_config`), `generation_config.json` when the
    /// source has one, and the weights: `model.safetensors` when they fit one shard of
    /// `options.max_shard_size`, else `model-0000i-of-0000N.safetensors` and
    /// `model.safetensors.index.json`, split as transformers splits them. Tensors are streamed:
    /// each one is produced, written and dropped before the next, so memory stays near the
    /// largest single tensor. The checkpoint is written into a work folder beside `dir`,
    /// synced, and swapped in whole (see the [module docs](self)): a failed save leaves nothing
    /// behind, a killed one leaves `dir` the old checkpoint or the new one. Weight files of an
    /// earlier save in `dir` that this one does not write are dropped; every other file and
    /// folder of `dir` is kept. Saves of one directory from two processes at once are not
    /// supported: each is atomic, the last one to finish wins, one may fail. Files written into
    /// `dir` while a save runs may be lost, and `dir` must not be a mount point.
    pub fn save_pretrained_with(&self, dir: impl AsRef<Path>, options: &SaveOptions) -> Result<()> {
        let dir = dir.as_ref();
        let _span = tracing::info_span!("save_pretrained", dir = %dir.display()).entered();
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| QuantError::Io { op, path, source }
        };
        if options.max_shard_size == 0 {
            return Err(QuantError::Config {
                origin: "max_shard_size".into(),
                reason: "must be at least one byte".into(),
            });
        }
        let checkpoint = Checkpoint::open(&self.source)?;
        let mut entries: Vec<Entry<'_>> = Vec::new();
        for name in checkpoint.names() {
            // A tied lm_head is the embedding matrix: transformers drops tied duplicates when
            // it saves (`_tied_weights_keys`), so the matrix is written once.
            if owned_by(&self.layers, name) || self.tied_weights.iter().any(|t| t == name) {
                continue;
            }
            let info = checkpoint.info(name).expect("a listed tensor has an info");
            let dtype = if info.dtype.is_loadable_float() {
                StoredDType::from_burn(
                    float_dtype_of(&self.fp32_modules, self.torch_dtype, name).dtype(),
                )
                .expect("f32, f16 and bf16 are safetensors dtypes")
            } else {
                info.dtype
            };
            entries.push(Entry {
                name: name.to_string(),
                dtype,
                shape: info.shape.clone(),
                source: Source::Checkpoint,
            });
        }
        for (prefix, layer) in &self.layers {
            for (name, part, dtype, shape) in layer.parts(prefix) {
                entries.push(Entry {
                    name,
                    dtype: StoredDType::from_burn(dtype).expect("quantized parts are U8/I8/F32"),
                    shape,
                    source: Source::Quantized(layer, part),
                });
            }
        }
        // Module order (numeric layer indices), so each quantized layer's tensors stay together.
        entries.sort_by_cached_key(|e| natural_key(&e.name));
        let shards = split_into_shards(entries, options.max_shard_size);
        let total_size: usize = shards.iter().flatten().map(Entry::byte_len).sum();

        let config_path = self.source.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(io("reading", &config_path))?;
        let mut config: Value = serde_json::from_str(&text).map_err(|e| QuantError::Config {
            origin: config_path.display().to_string(),
            reason: e.to_string(),
        })?;
        if let Value::Object(map) = &mut config {
            map.insert("quantization_config".into(), self.config.to_transformers());
        }
        // The whole checkpoint is written beside `dir`, synced, then swapped in (atomic_dir).
        let save = DirSave::begin(dir)?;
        let staging = save.staging().to_path_buf();
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        let n = shards.len();
        let file_names: Vec<String> = if n == 1 {
            vec!["model.safetensors".into()]
        } else {
            (1..=n)
                .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
                .collect()
        };
        let mut weight_map = BTreeMap::new();
        for (shard, file) in shards.into_iter().zip(&file_names) {
            for e in &shard {
                weight_map.insert(e.name.clone(), Value::String(file.clone()));
            }
            write_streaming(&staging.join(file), shard, &checkpoint, &metadata, self)?;
            crash_point("wrote a shard");
        }
        if n > 1 {
            let index = serde_json::json!({
                "metadata": {"total_size": total_size},
                "weight_map": weight_map,
            });
            let text = serde_json::to_string_pretty(&index).expect("JSON value serializes");
            save.write("model.safetensors.index.json", (text + "\n").as_bytes())?;
        }
        let cfg = serde_json::to_string_pretty(&config).expect("JSON value serializes") + "\n";
        save.write("config.json", cfg.as_bytes())?;
        let gen_cfg = self.source.join("generation_config.json");
        if gen_cfg.exists() {
            save.copy(&gen_cfg, "generation_config.json")?;
        }
        // Weight files of an earlier save that this one does not write would shadow or
        // contradict it (an index is preferred over a single file when both exist): they are
        // not carried over. Every other file of `dir` is.
        save.commit(is_weight_file)
    }
}

/// Whether `file` is a weight file `save_pretrained` writes (a single file, a shard, the index).
fn is_weight_file(file: &str) -> bool {
    file == "model.safetensors"
        || file == "model.safetensors.index.json"
        || (file.starts_with("model-") && file.ends_with(".safetensors"))
}

/// Finishes or undoes what a killed [`QuantizedModel::save_pretrained`] left beside `dir`: a
/// work folder of a save that died is removed, and if the save died between the two renames of
/// a swap without atomic exchange (never on Linux), the old checkpoint it parked there is put
/// back first. Work folders of saves still running are left alone. Every save does this first;
/// call it to repair a directory without saving.
pub fn recover_interrupted_save(dir: impl AsRef<Path>) -> Result<()> {
    crate::atomic_dir::recover(dir.as_ref())
}

/// huggingface_hub's `split_state_dict_into_shards`: tensors in order fill a shard until the
/// next would tip it over `max`; a tensor bigger than `max` gets a shard of its own.
fn split_into_shards(entries: Vec<Entry<'_>>, max: u64) -> Vec<Vec<Entry<'_>>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for e in entries {
        let size = e.byte_len() as u64;
        if size > max {
            shards.push(vec![e]);
            continue;
        }
        if current_size + size > max && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current_size += size;
        current.push(e);
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes one safetensors file: the header from `entries` alone, then each tensor's data,
/// produced just before it is written. Layout as `cachet_tensor::safetensors::save` (header keys
/// sorted; data by decreasing element size, then name, so every tensor is naturally aligned),
/// so a single-file save is byte-identical to saving all tensors at once.
fn write_streaming<M>(
    path: &Path,
    mut entries: Vec<Entry<'_>>,
    checkpoint: &Checkpoint,
    metadata: &BTreeMap<String, String>,
    model: &QuantizedModel<M>,
) -> Result<()> {
    let _span =
        tracing::debug_span!("write_shard", file = %path.display(), tensors = entries.len())
            .entered();
    let io = |op: &'static str, path: &Path| {
        let path: PathBuf = path.to_path_buf();
        move |source| QuantError::Io { op, path, source }
    };
    entries.sort_by(|a, b| {
        b.dtype
            .bits()
            .cmp(&a.dtype.bits())
            .then(a.name.cmp(&b.name))
    });
    let mut offsets = BTreeMap::new();
    let mut offset = 0usize;
    for e in &entries {
        let len = e.byte_len();
        offsets.insert(e.name.as_str(), (e, offset, offset + len));
        offset += len;
    }
    let mut header = serde_json::Map::new();
    let meta = metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    header.insert("__metadata__".to_owned(), Value::Object(meta));
    for (name, (e, begin, end)) in &offsets {
        header.insert(
            (*name).to_owned(),
            serde_json::json!({
                "dtype": e.dtype.name(),
                "shape": e.shape,
                "data_offsets": [begin, end],
            }),
        );
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("JSON value serializes");
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = File::create(path).map_err(io("creating", path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io("writing", path))?;
    w.write_all(&header).map_err(io("writing", path))?;
    for e in &entries {
        if matches!(e.source, Source::Checkpoint)
            && cfg!(target_endian = "little")
            && let Some(info) = checkpoint.info(&e.name)
            && info.dtype == e.dtype
            && info.dtype != StoredDType::BOOL
        {
            // Stored as it is written: copy the bytes file to file, nothing held in memory.
            let file = checkpoint
                .file_of(&e.name)
                .expect("a listed tensor has a file");
            copy_stored(Path::new(file), info.data_offsets, &mut w).map_err(|source| {
                QuantError::Io {
                    op: "copying a tensor from",
                    path: PathBuf::from(file),
                    source,
                }
            })?;
            continue;
        }
        let data = match e.source {
            Source::Checkpoint => {
                // A big tensor is read through a mapping of its own, unmapped right after, so
                // the source pages it touched leave the resident set with it.
                let own;
                let checkpoint = if e.byte_len() >= OWN_MAPPING_BYTES {
                    own = Checkpoint::open(&model.source)?;
                    &own
                } else {
                    checkpoint
                };
                let data = checkpoint.tensor_data(&e.name)?;
                let stored_float = checkpoint
                    .info(&e.name)
                    .is_some_and(|i| i.dtype.is_loadable_float());
                let want = float_dtype_of(&model.fp32_modules, model.torch_dtype, &e.name).dtype();
                if stored_float && data.dtype() != want {
                    data.convert_dtype(want)
                } else {
                    data
                }
            }
            Source::Quantized(layer, part) => {
                layer
                    .part(part)?
                    .ok_or_else(|| QuantError::InconsistentState {
                        tensor: e.name.clone(),
                        reason: format!("the layer has no {part:?} part"),
                    })?
            }
        };
        let bytes = stored_bytes(&data);
        if bytes.len() != e.byte_len() {
            return Err(QuantError::InconsistentState {
                tensor: e.name.clone(),
                reason: format!(
                    "{} bytes of data, the header announced {} ({} {:?})",
                    bytes.len(),
                    e.byte_len(),
                    e.dtype,
                    e.shape
                ),
            });
        }
        w.write_all(&bytes).map_err(io("writing", path))?;
    }
    let file = w
        .into_inner()
        .map_err(|e| io("writing", path)(e.into_error()))?;
    file.sync_all().map_err(io("syncing", path))?;
    Ok(())
}

/// Copies the data of a tensor at `offsets` of the safetensors file `path` to `out`.
fn copy_stored(path: &Path, offsets: (usize, usize), out: &mut impl Write) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)?;
    let data_start = 8 + u64::from_le_bytes(prefix);
    file.seek(SeekFrom::Start(data_start + offsets.0 as u64))?;
    let len = (offsets.1 - offsets.0) as u64;
    let copied = std::io::copy(&mut file.take(len), out)?;
    if copied != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{copied} of {len} bytes: the file changed since it was opened"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sizes_parse_like_transformers() {
        assert_eq!(parse_shard_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_shard_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_shard_size("10KB").unwrap(), 10_000);
        assert_eq!(parse_shard_size("10kb").unwrap(), 1_250);
        assert_eq!(parse_shard_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_shard_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_shard_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_shard_size("8Gb").unwrap(), 1_000_000_000);
        assert_eq!(parse_shard_size("4096").unwrap(), 4096);
        for bad in ["", "1.5GB", "GB", "5TB", "-1MB", "0MB"] {
            let err = parse_shard_size(bad).unwrap_err();
            assert!(matches!(err, QuantError::Config { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn natural_order_puts_layer_2_before_10() {
        let mut names = vec!["model.layers.10.x", "model.layers.2.x", "lm_head.weight"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            ["lm_head.weight", "model.layers.2.x", "model.layers.10.x"]
        );
    }
}
