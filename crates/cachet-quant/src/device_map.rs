//! `device_map`: where each module lives, as in accelerate (`{"model.layers": "cpu",
//! "lm_head": "disk", "model.embed_tokens": 0}`); the longest matching prefix wins.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::error::{QuantError, Result};

/// Where a module lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The compute device (a GPU index or name in accelerate's maps).
    Device,
    /// Host memory (quantized layers stay quantized there).
    Cpu,
    /// Memory-mapped from the offload folder and read on use (quantized layers stay quantized).
    Disk,
}

/// A per-module placement map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMap {
    entries: BTreeMap<String, Placement>,
}

impl DeviceMap {
    /// Parses accelerate's JSON form: values are `"cpu"`, `"disk"`, a device index or a device
    /// name (`"cuda:0"`, `"wgpu"`, `"mps"`...), all of which mean the compute device.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| QuantError::DeviceMap {
            reason: format!("expected an object of module -> placement, got {value}"),
        })?;
        let mut entries = BTreeMap::new();
        for (module, v) in obj {
            let placement = match v {
                Value::String(s) if s == "cpu" => Placement::Cpu,
                Value::String(s) if s == "disk" => Placement::Disk,
                Value::String(s) if !s.is_empty() => Placement::Device,
                Value::Number(n) if n.as_u64().is_some() => Placement::Device,
                other => {
                    return Err(QuantError::DeviceMap {
                        reason: format!(
                            "module {module:?}: placement {other} is not cpu, disk, a device index or a device name"
                        ),
                    });
                }
            };
            entries.insert(module.clone(), placement);
        }
        Ok(Self { entries })
    }

    /// Parses a JSON string (see [`DeviceMap::from_json`]).
    pub fn parse(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| QuantError::DeviceMap {
            reason: format!("not JSON: {e}"),
        })?;
        Self::from_json(&value)
    }

    /// Adds or replaces one entry.
    pub fn insert(&mut self, module: impl Into<String>, placement: Placement) {
        self.entries.insert(module.into(), placement);
    }

    /// The placement of `module`: its longest mapped prefix (`""` maps everything).
    pub fn placement(&self, module: &str) -> Placement {
        self.entries
            .iter()
            .filter(|(k, _)| {
                k.is_empty() || module == k.as_str() || module.starts_with(&format!("{k}."))
            })
            .max_by_key(|(k, _)| k.len())
            .map_or(Placement::Device, |(_, p)| p.clone())
    }

    /// Whether any module goes to disk.
    pub fn uses_disk(&self) -> bool {
        self.entries.values().any(|p| *p == Placement::Disk)
    }

    /// Fails on entries that name no module of the model.
    pub fn validate(&self, modules: &BTreeSet<String>) -> Result<()> {
        let unknown: Vec<&str> = self
            .entries
            .keys()
            .filter(|k| !k.is_empty() && !modules.contains(k.as_str()))
            .map(String::as_str)
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        // The model's top-level names (one or two components), as examples.
        let examples: Vec<&str> = modules
            .iter()
            .map(String::as_str)
            .filter(|m| m.split('.').count() <= 2)
            .take(8)
            .collect();
        Err(QuantError::DeviceMap {
            reason: format!(
                "unknown module(s) {unknown:?} (the model has e.g. {})",
                examples.join(", ")
            ),
        })
    }
}
