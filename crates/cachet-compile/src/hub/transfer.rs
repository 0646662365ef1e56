//! Moving files: downloading and verifying modules, reading small files, committing uploads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::HFError;
use hf_hub::progress::Progress;
use hf_hub::repository::CommitOperation;
use indicatif::ProgressBar;
use tracing::{info_span, warn};

use super::client::map_err;
use super::progress::BarHandler;
use super::{HubCache, RemoteFile};
use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::{CacheLayout, safe_relative};
use crate::local::{MANIFEST_FILE, Manifest, Verify, sha256_file, verify_files};

impl HubCache {
    /// Downloads one file to `dest` (must not exist) with a progress bar for large files.
    fn download(&self, remote: &RemoteFile, tmp_root: &Path, dest: &Path) -> Result<()> {
        let _span = info_span!("hub_download", file = remote.path, bytes = remote.size).entered();
        let bar = self.bar(remote.size, &remote.path);
        let progress = bar.clone().map(|bar| Progress::new(BarHandler::new(bar)));
        let got = self
            .repo
            .download_file()
            .filename(remote.path.clone())
            .local_dir(tmp_root.to_owned())
            .maybe_progress(progress)
            .send()
            .map_err(|e| map_err(&self.repo_id, &remote.path, e))?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::rename(&got, dest).map_err(io_err(dest))?;
        Ok(())
    }

    /// Downloads module `hash` into `staging` and verifies it; `Ok(false)` if the Hub lacks it.
    pub fn fetch_module(&self, layout: &CacheLayout, hash: &str, staging: &Path) -> Result<bool> {
        let prefix = layout.module_dir(hash);
        let _span = info_span!("hub_fetch_module", repo = self.repo_id, hash).entered();
        let files = self.list_files(&prefix)?;
        if files.is_empty() {
            return Ok(false);
        }
        let tmp = tempfile::Builder::new()
            .prefix(".download.")
            .tempdir_in(staging)
            .map_err(io_err(staging))?;
        let mut listed = BTreeMap::new();
        for remote in &files {
            let rel = &remote.path[prefix.len() + 1..];
            if rel == MANIFEST_FILE {
                continue;
            }
            self.download(remote, tmp.path(), &staging.join(rel))?;
            listed.insert(rel.to_owned(), remote.clone());
        }
        drop(tmp);
        // Verify: the cachet manifest when present, else the listing's sizes and LFS sums.
        if let Some(remote) = files
            .iter()
            .find(|f| f.path.ends_with(&format!("/{MANIFEST_FILE}")))
        {
            let dl = tempfile::tempdir_in(staging).map_err(io_err(staging))?;
            let path = self.download_path(remote, dl.path())?;
            let text = std::fs::read(&path).map_err(io_err(&path))?;
            let manifest: Manifest =
                serde_json::from_slice(&text).map_err(|source| CompileCacheError::Json {
                    what: format!("{} in {}", remote.path, self.repo_id),
                    source,
                })?;
            drop(dl);
            if manifest.hash != hash {
                return Err(CompileCacheError::Corrupt {
                    path: staging.to_owned(),
                    reason: format!("remote manifest is for {}, not {hash}", manifest.hash),
                });
            }
            verify_files(staging, &manifest, Verify::Full)?;
        } else {
            for (rel, remote) in &listed {
                let path = staging.join(rel);
                let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
                if !meta.is_file() || meta.len() != remote.size {
                    return Err(CompileCacheError::Corrupt {
                        path,
                        reason: format!("size {} != listed {}", meta.len(), remote.size),
                    });
                }
                if let Some(want) = &remote.sha256
                    && &sha256_file(&path)? != want
                {
                    return Err(CompileCacheError::Corrupt {
                        path,
                        reason: "sha256 differs from the Hub's LFS object id".into(),
                    });
                }
            }
        }
        Ok(true)
    }

    fn download_path(&self, remote: &RemoteFile, dir: &Path) -> Result<PathBuf> {
        self.repo
            .download_file()
            .filename(remote.path.clone())
            .local_dir(dir.to_owned())
            .send()
            .map_err(|e| map_err(&self.repo_id, &remote.path, e))
    }

    /// Reads a small text file from the repo.
    pub fn read_text(&self, path: &str) -> Result<String> {
        safe_relative(path, &self.repo_id)?;
        let bytes = self
            .repo
            .download_file_to_bytes()
            .filename(path.to_owned())
            .send()
            .map_err(|e| map_err(&self.repo_id, path, e))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CompileCacheError::CorruptRegistry {
            what: format!("{path} in {}", self.repo_id),
            reason: "not UTF-8".into(),
        })
    }

    /// Commits `files` (`(path in repo, local file)`), retrying conflicts with backoff.
    pub fn upload(&self, files: &[(String, PathBuf)], message: &str) -> Result<u32> {
        for (path, _) in files {
            safe_relative(path, "an upload")?;
        }
        let total: u64 = files
            .iter()
            .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let _span = info_span!(
            "hub_upload",
            repo = self.repo_id,
            files = files.len(),
            bytes = total
        )
        .entered();
        let bar = self.bar(total, "upload");
        let make = || {
            files
                .iter()
                .map(|(path, local)| CommitOperation::add_file(path.clone(), local.clone()))
                .collect()
        };
        let result = self.commit(make, message, bar.as_ref());
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        result
    }

    /// Creates one commit of `operations()`, retrying conflicts (HTTP 409) with exponential
    /// backoff; returns the attempts used.
    pub(super) fn commit(
        &self,
        operations: impl Fn() -> Vec<CommitOperation>,
        message: &str,
        bar: Option<&ProgressBar>,
    ) -> Result<u32> {
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=self.options.commit_attempts.max(1) {
            let progress = bar.cloned().map(|b| Progress::new(BarHandler::new(b)));
            match self
                .repo
                .create_commit()
                .operations(operations())
                .commit_message(message.to_owned())
                .maybe_progress(progress)
                .send()
            {
                Ok(_) => return Ok(attempt),
                Err(HFError::Conflict { .. }) if attempt < self.options.commit_attempts => {
                    warn!(
                        repo = self.repo_id,
                        attempt, "commit conflict, retrying in {delay:?}"
                    );
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(HFError::Conflict { .. }) => {
                    return Err(CompileCacheError::Conflict {
                        repo: self.repo_id.clone(),
                        attempts: attempt,
                    });
                }
                Err(e) => return Err(map_err(&self.repo_id, "commit", e)),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }
}
