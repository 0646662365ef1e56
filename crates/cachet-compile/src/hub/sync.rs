//! Uploading local modules: [`HubCache::synchronize`] and [`HubCache::push_module`].

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha1::{Digest, Sha1};
use tracing::{info, info_span};

use super::{HubCache, RemoteFile};
use crate::entry::{CacheEntry, hex};
use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::MODULE_PREFIX;
use crate::local::{CachedModule, LocalCache, MANIFEST_FILE, sha256_file};

/// What `synchronize` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Files uploaded.
    pub uploaded: Vec<String>,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Files already on the Hub with the same bytes.
    pub already_present: usize,
    /// Modules skipped (private model to public repo), with the reason.
    pub skipped: Vec<String>,
    /// Commit attempts used (more than one after conflicts).
    pub attempts: u32,
}

impl HubCache {
    /// Uploads the local cache's files the Hub lacks or holds with other bytes, never pushing
    /// compilations of private models to a public repo. A file of the same size is compared
    /// by content: its SHA-256 against the listing's LFS id, else its git blob id against the
    /// listing's object id; one the listing gives neither for is uploaded again.
    pub fn synchronize(&self, local: &LocalCache) -> Result<SyncReport> {
        let layout = local.layout();
        let _span = info_span!("hub_synchronize", repo = self.repo_id).entered();
        let info = self.info()?;
        let remote: HashMap<String, (RemoteFile, String)> = self
            .list_files_with_ids(&layout.compiler_dir())?
            .into_iter()
            .map(|(f, oid)| (f.path.clone(), (f, oid)))
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
            if let Some((file, oid)) = remote.get(&rel)
                && file.size == size
                && same_bytes(&path, file, oid)?
            {
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

/// Whether the local file at `path`, of `remote`'s size, holds its bytes: by SHA-256 for a file
/// in LFS, else by git blob id; `false` when the listing gives neither.
fn same_bytes(path: &Path, remote: &RemoteFile, oid: &str) -> Result<bool> {
    if let Some(sha256) = &remote.sha256 {
        return Ok(sha256_file(path)?.eq_ignore_ascii_case(sha256));
    }
    let is_sha1 = oid.len() == 40 && oid.bytes().all(|b| b.is_ascii_hexdigit());
    Ok(is_sha1 && git_blob_id(path)?.eq_ignore_ascii_case(oid))
}

/// The git blob id of a file: SHA-1 of `blob LEN\0` followed by its bytes, streamed.
fn git_blob_id(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        read += n as u64;
        hasher.update(&buf[..n]);
    }
    if read != len {
        // Changed while read: its id is unknown, so it counts as different.
        return Ok(String::new());
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_ids_are_gits() {
        // `printf 'hello\n' | git hash-object --stdin`, and the empty blob.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello\n").unwrap();
        assert_eq!(
            git_blob_id(&path).unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        std::fs::write(&path, b"").unwrap();
        assert_eq!(
            git_blob_id(&path).unwrap(),
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
        );
    }
}
