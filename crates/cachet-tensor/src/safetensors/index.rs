//! Sharded checkpoints: a `*.safetensors.index.json` and every shard its `weight_map` lists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

use serde::Deserialize;

use super::read::{Shard, open_shard};
use super::{Checkpoint, Result, SafetensorsError, TensorInfo};

impl Checkpoint {
    pub(super) fn open_index(index_path: &Path) -> Result<Self> {
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
}

/// A `*.safetensors.index.json` before validation.
#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    weight_map: BTreeMap<String, String>,
}

fn shards_label(shards: &[Shard], id: usize) -> String {
    shards[id].label.clone()
}
