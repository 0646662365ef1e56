//! Uploading local modules: [`HubCache::synchronize`] and [`HubCache::push_module`].

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;
use tracing::{info, info_span};

use super::HubCache;
use crate::entry::CacheEntry;
use crate::error::{CompileCacheError, Result};
use crate::layout::MODULE_PREFIX;
use crate::local::{CachedModule, LocalCache, MANIFEST_FILE};

/// What `synchronize` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Files uploaded.
    pub uploaded: Vec<String>,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Files already on the Hub.
    pub already_present: usize,
    /// Modules skipped (private model to public repo), with the reason.
    pub skipped: Vec<String>,
    /// Commit attempts used (more than one after conflicts).
    pub attempts: u32,
}

impl HubCache {
    /// Uploads the local cache's files the Hub lacks, never pushing compilations of private
    /// models to a public repo.
    pub fn synchronize(&self, local: &LocalCache) -> Result<SyncReport> {
        let layout = local.layout();
        let _span = info_span!("hub_synchronize", repo = self.repo_id).entered();
        let info = self.info()?;
        let remote: HashMap<String, u64> = self
            .list_files(&layout.compiler_dir())?
            .into_iter()
            .map(|f| (f.path, f.size))
            .collect();
        let mut report = SyncReport::default();
        let mut blocked_hashes = Vec::new();
        if !info.private {
            for (_, entry) in local.registry_entries()? {
                if self.model_is_private(entry.model_id()) {
                    report.skipped.push(format!(
                        "{} ({}): private model, public repo",
                        entry.hash(),
                        entry.model_id()
                    ));
                    blocked_hashes.push(entry.hash());
                }
            }
        }
        let mut files = Vec::new();
        for (rel, path, size) in local.publishable_files()? {
            if blocked_hashes.iter().any(|h| {
                rel.contains(&format!("/{MODULE_PREFIX}{h}/"))
                    || rel.ends_with(&format!("/{h}.json"))
            }) {
                continue;
            }
            if remote.get(&rel) == Some(&size) {
                report.already_present += 1;
                continue;
            }
            report.bytes += size;
            report.uploaded.push(rel.clone());
            files.push((rel, path));
        }
        if !files.is_empty() {
            report.attempts = self.upload(&files, "Synchronizing local compiler cache.")?;
            info!(files = files.len(), bytes = report.bytes, "synchronized");
        }
        Ok(report)
    }

    /// Uploads one module and its registry entry (after a compile).
    pub fn push_module(
        &self,
        local: &LocalCache,
        module: &CachedModule,
        entry: Option<&CacheEntry>,
    ) -> Result<()> {
        let layout = local.layout();
        if let Some(entry) = entry
            && !self.info()?.private
            && self.model_is_private(entry.model_id())
        {
            return Err(CompileCacheError::PrivateToPublic {
                model_id: entry.model_id().to_owned(),
                repo: self.repo_id.clone(),
            });
        }
        let prefix = layout.module_dir(&module.hash);
        let mut files: Vec<(String, PathBuf)> = module
            .manifest
            .files
            .iter()
            .map(|f| (format!("{prefix}/{}", f.path), module.dir.join(&f.path)))
            .collect();
        files.push((
            format!("{prefix}/{MANIFEST_FILE}"),
            module.dir.join(MANIFEST_FILE),
        ));
        if let Some(entry) = entry {
            for rel in [layout.registry_path(entry), layout.alias_path(entry)] {
                files.push((rel.clone(), local.root().join(rel)));
            }
        }
        self.upload(&files, &format!("cachet-compile: add {prefix}"))?;
        Ok(())
    }
}
