//! Searching the repo's registry: [`LookupFilter`] and [`HubCache::lookup`].

use hf_hub::repository::RepoTreeEntry;
use tracing::{info_span, warn};

use super::HubCache;
use super::client::map_err;
use crate::entry::CacheEntry;
use crate::error::Result;
use crate::layout::{CacheLayout, REGISTRY_FOLDER};
use crate::pyjson::Value;

/// Filters of `lookup`, compared to the entries' compilation factors.
#[derive(Debug, Clone, Default)]
pub struct LookupFilter {
    /// The task.
    pub task: Option<String>,
    /// `torch_dtype` (or `dtype`).
    pub dtype: Option<String>,
    /// `batch_size`.
    pub batch_size: Option<u64>,
    /// `sequence_length`.
    pub sequence_length: Option<u64>,
    /// `tp_degree` (number of cores).
    pub num_cores: Option<u64>,
    /// Any other `key=value` factor (value parsed as Python JSON, else a string).
    pub factors: Vec<(String, Value)>,
}

impl LookupFilter {
    /// Whether `entry` passes every filter.
    pub fn matches(&self, entry: &CacheEntry) -> bool {
        let n = entry.compile_config();
        let get = |k: &str| n.get(k);
        if let Some(task) = &self.task
            && entry.task() != Some(task.as_str())
        {
            return false;
        }
        if let Some(dtype) = &self.dtype {
            let have = get("torch_dtype")
                .or_else(|| get("dtype"))
                .and_then(Value::as_str);
            let norm = |s: &str| s.trim_start_matches("torch.").to_ascii_lowercase();
            if have.map(norm) != Some(norm(dtype)) {
                return false;
            }
        }
        for (key, want) in [
            ("batch_size", self.batch_size),
            ("sequence_length", self.sequence_length),
            ("tp_degree", self.num_cores),
        ] {
            if let Some(want) = want
                && get(key).and_then(Value::as_u64) != Some(want)
            {
                return false;
            }
        }
        self.factors.iter().all(|(k, v)| get(k) == Some(v))
    }
}

impl HubCache {
    /// The registry folder of `layout` in this repo: exact compiler version, else (like
    /// optimum-neuron) the first root folder starting with `<compiler>-<version>`.
    pub fn registry_dir(&self, layout: &CacheLayout) -> Result<Option<String>> {
        let root = self
            .repo
            .list_tree()
            .send()
            .map_err(|e| map_err(&self.repo_id, "repo root", e))?;
        let prefix = layout.compiler_dir();
        let mut dirs: Vec<String> = root
            .into_iter()
            .filter_map(|e| match e {
                RepoTreeEntry::Directory { path, .. } if path.starts_with(&prefix) => Some(path),
                _ => None,
            })
            .collect();
        dirs.sort();
        let dir = dirs
            .iter()
            .find(|d| **d == prefix)
            .or_else(|| dirs.first())
            .cloned();
        Ok(dir.map(|d| format!("{d}/{REGISTRY_FOLDER}/{}", layout.tool_version)))
    }

    /// Searches the registry for entries of `model_id` (alias paths) or, with `arch_digest`,
    /// for every entry of that architecture, keeping those passing `filter`.
    pub fn lookup(
        &self,
        layout: &CacheLayout,
        model_id: &str,
        arch_digest: Option<&str>,
        filter: &LookupFilter,
    ) -> Result<Vec<(String, CacheEntry)>> {
        let _span = info_span!("hub_lookup", repo = self.repo_id, model_id).entered();
        let Some(registry) = self.registry_dir(layout)? else {
            return Ok(Vec::new());
        };
        let files = self.list_files(&registry)?;
        let alias_suffix = format!("/{model_id}/");
        let mut out = Vec::new();
        for file in files {
            if !file.path.ends_with(".json") {
                continue;
            }
            let rel = &file.path[registry.len() + 1..];
            let by_arch = arch_digest.is_some_and(|a| rel.starts_with(&format!("{a}/")));
            let by_alias = rel.split('/').count() == 4 && format!("/{rel}").contains(&alias_suffix);
            if !(by_arch || by_alias) {
                continue;
            }
            let text = match self.read_text(&file.path) {
                Ok(t) => t,
                Err(e) => {
                    warn!("skipping registry entry: {e}");
                    continue;
                }
            };
            match CacheEntry::deserialize(&text, &format!("{} in {}", file.path, self.repo_id)) {
                Ok(entry) if filter.matches(&entry) => out.push((file.path.clone(), entry)),
                Ok(_) => {}
                Err(e) => warn!("skipping {e}"),
            }
        }
        // An entry appears under its arch digest and its alias: keep one per hash.
        let mut seen = std::collections::HashSet::new();
        out.retain(|(_, e)| seen.insert(e.hash()));
        Ok(out)
    }
}
