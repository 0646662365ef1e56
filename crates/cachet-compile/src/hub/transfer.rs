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

/// The most bytes [`HubCache::read_text`] reads: 16 MiB. Registry entries and manifests are a
/// few kilobytes; a bigger text file from a cache repo is refused with
/// [`CompileCacheError::TooLarge`], and no more than one byte past the limit is requested.
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// The largest module [`HubCache::fetch_module`] downloads, file or total, by the sizes the
/// repo's listing advertises: 256 GiB. A listing over it is refused before any download.
pub const MAX_MODULE_BYTES: u64 = 256 << 30;

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
        self.check_advertised_sizes(&prefix, &files)?;
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
            let size = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            if size > MAX_TEXT_BYTES {
                return Err(CompileCacheError::TooLarge {
                    what: format!("{} in {}", remote.path, self.repo_id),
                    size,
                    limit: MAX_TEXT_BYTES,
                });
            }
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

    /// Refuses a module whose listing advertises a file or a total over [`MAX_MODULE_BYTES`],
    /// or a manifest over [`MAX_TEXT_BYTES`].
    fn check_advertised_sizes(&self, prefix: &str, files: &[RemoteFile]) -> Result<()> {
        let too_large = |what: &str, size, limit| CompileCacheError::TooLarge {
            what: format!("{what} in {}", self.repo_id),
            size,
            limit,
        };
        let mut total = 0u64;
        for remote in files {
            let limit = if remote.path.ends_with(&format!("/{MANIFEST_FILE}")) {
                MAX_TEXT_BYTES
            } else {
                MAX_MODULE_BYTES
            };
            if remote.size > limit {
                return Err(too_large(&remote.path, remote.size, limit));
            }
            total = total.saturating_add(remote.size);
        }
        if total > MAX_MODULE_BYTES {
            return Err(too_large(
                &format!("module {prefix}"),
                total,
                MAX_MODULE_BYTES,
            ));
        }
        Ok(())
    }

    fn download_path(&self, remote: &RemoteFile, dir: &Path) -> Result<PathBuf> {
        self.repo
            .download_file()
            .filename(remote.path.clone())
            .local_dir(dir.to_owned())
            .send()
            .map_err(|e| map_err(&self.repo_id, &remote.path, e))
    }

    /// Reads a small text file from the repo: at most [`MAX_TEXT_BYTES`]; a bigger file is a
    /// [`CompileCacheError::TooLarge`] naming it and its size. Only the first
    /// `MAX_TEXT_BYTES + 1` bytes are requested (an HTTP range, which the Hub honours), so an
    /// oversized file never fills memory.
    pub fn read_text(&self, path: &str) -> Result<String> {
        safe_relative(path, &self.repo_id)?;
        let got = self
            .repo
            .download_file_to_bytes()
            .filename(path.to_owned())
            .range(0..MAX_TEXT_BYTES + 1)
            .send();
        let bytes = match got {
            Ok(bytes) => bytes.to_vec(),
            // A range starting at byte 0 is unsatisfiable only for an empty file.
            Err(HFError::Http { context }) if context.status.as_u16() == 416 => {
                match self.advertised_size(path)? {
                    0 => Vec::new(),
                    n => {
                        return Err(CompileCacheError::Hub {
                            what: format!("{path} in {}", self.repo_id),
                            detail: format!("HTTP 416 for the first bytes of a {n}-byte file"),
                        });
                    }
                }
            }
            Err(e) => return Err(map_err(&self.repo_id, path, e)),
        };
        if bytes.len() as u64 > MAX_TEXT_BYTES {
            // The size for the message: the advertised one when the server gives it.
            let size = self
                .advertised_size(path)
                .ok()
                .filter(|&n| n > MAX_TEXT_BYTES)
                .unwrap_or(bytes.len() as u64);
            return Err(CompileCacheError::TooLarge {
                what: format!("{path} in {}", self.repo_id),
                size,
                limit: MAX_TEXT_BYTES,
            });
        }
        String::from_utf8(bytes).map_err(|_| CompileCacheError::CorruptRegistry {
            what: format!("{path} in {}", self.repo_id),
            reason: "not UTF-8".into(),
        })
    }

    /// The size the Hub advertises for `path` (a `HEAD` request).
    fn advertised_size(&self, path: &str) -> Result<u64> {
        self.repo
            .get_file_metadata()
            .filepath(path.to_owned())
            .send()
            .map(|meta| meta.file_size)
            .map_err(|e| map_err(&self.repo_id, path, e))
    }

    /// Commits `files` (`(path in repo, local file)`), large ones through Git LFS as the Hub
    /// asks, retrying conflicts with backoff.
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
        let result = self.commit_files(files, message, bar.as_ref());
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
