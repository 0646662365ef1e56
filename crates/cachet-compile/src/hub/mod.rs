//! The Hugging Face Hub cache: a model repo laid out like optimum-neuron's, through `hf-hub`
//! (uploads through the Hub's commit API, with Git LFS for large files).
//!
//! Lookups go local → Hub → compile ([`crate::CompileCache::get_or_compile`]); a Hub hit is downloaded
//! into a staging folder, verified (cachet manifest, else listed sizes and LFS SHA-256) and only
//! then published locally, so a failed, truncated or hostile download never leaves an entry.
//! Everything from a repo is untrusted: paths are checked before anything touches the disk.

mod client;
mod lfs;
mod progress;
mod prune;
mod registry;
mod repo;
mod sync;
mod transfer;

use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use serde::Serialize;

use crate::error::{CompileCacheError, Result};
use crate::layout::safe_relative;
use client::{client, map_err};
use repo::check_repo_id;

pub use client::{HubOptions, resolve_token};
pub use prune::{PruneReport, plan_prune};
pub use registry::LookupFilter;
pub use repo::{RepoChoice, create_repo, resolve_repo, save_repo};
pub use sync::SyncReport;
pub use transfer::{MAX_MODULE_BYTES, MAX_TEXT_BYTES};

/// A Hub cache repo.
pub struct HubCache {
    client: HFClientSync,
    /// Uploads (preupload, LFS, NDJSON commits), which hf-hub cannot do without Xet storage.
    api: lfs::CommitApi,
    repo: HFRepositorySync<RepoTypeModel>,
    repo_id: String,
    options: HubOptions,
}

impl std::fmt::Debug for HubCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's Debug prints only whether a token is set, never the token.
        f.debug_struct("HubCache")
            .field("repo_id", &self.repo_id)
            .field("client", &self.client)
            .finish()
    }
}

/// One file listed in the repo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteFile {
    /// Path in the repo.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 when the Hub stores it in LFS.
    pub sha256: Option<String>,
}

/// Repo facts `lookup`/uploads need.
#[derive(Debug, Clone, Serialize)]
pub struct RepoInfo {
    /// The repo id.
    pub id: String,
    /// Whether the repo is private.
    pub private: bool,
}

impl HubCache {
    /// Opens `repo_id` on the Hub (no request is made yet).
    pub fn new(repo_id: &str, options: HubOptions) -> Result<Self> {
        check_repo_id(repo_id)?;
        let client = client(&options)?;
        let api = lfs::CommitApi::new(&options)?;
        let (owner, name) = hf_hub::split_id(repo_id);
        let repo = client.model(owner, name);
        Ok(Self {
            client,
            api,
            repo,
            repo_id: repo_id.to_owned(),
            options,
        })
    }

    /// The repo id.
    pub fn repo_id(&self) -> &str {
        &self.repo_id
    }

    /// Fetches whether the repo exists and is private.
    pub fn info(&self) -> Result<RepoInfo> {
        let info = self
            .repo
            .info()
            .send()
            .map_err(|e| map_err(&self.repo_id, "repo info", e))?;
        Ok(RepoInfo {
            id: self.repo_id.clone(),
            private: info.private.unwrap_or(false),
        })
    }

    /// Whether `model_id` is private (or unknown to the Hub, e.g. a local model).
    pub fn model_is_private(&self, model_id: &str) -> bool {
        if check_repo_id(model_id).is_err() {
            return true;
        }
        let (owner, name) = hf_hub::split_id(model_id);
        match self.client.model(owner, name).info().send() {
            Ok(info) => info.private.unwrap_or(false),
            Err(_) => true,
        }
    }

    /// Lists files under `prefix` (recursively; `""` is the whole repo); a missing folder is an
    /// empty list.
    pub fn list_files(&self, prefix: &str) -> Result<Vec<RemoteFile>> {
        Ok(self
            .list_files_with_ids(prefix)?
            .into_iter()
            .map(|(file, _)| file)
            .collect())
    }

    /// [`HubCache::list_files`] with each file's git object id as the Hub lists it (for a file
    /// outside LFS, the git blob id of its bytes).
    pub(crate) fn list_files_with_ids(&self, prefix: &str) -> Result<Vec<(RemoteFile, String)>> {
        let listing = if prefix.is_empty() {
            self.repo.list_tree().recursive(true).send()
        } else {
            self.repo
                .list_tree()
                .path_in_repo(prefix.to_owned())
                .recursive(true)
                .send()
        };
        let entries = match listing {
            Ok(entries) => entries,
            Err(HFError::EntryNotFound { .. }) | Err(HFError::RevisionNotFound { .. })
                if !prefix.is_empty() =>
            {
                return Ok(Vec::new());
            }
            // The tree endpoint's 404 for a missing folder comes back as a plain HTTP error; at
            // the root it means the repo is missing or invisible to us.
            Err(HFError::Http { context }) if context.status.as_u16() == 404 => {
                if prefix.is_empty() {
                    return Err(CompileCacheError::NotFound {
                        what: format!("repo {}", self.repo_id),
                    });
                }
                return Ok(Vec::new());
            }
            Err(e) => return Err(map_err(&self.repo_id, prefix, e)),
        };
        let origin = format!("the tree of {}", self.repo_id);
        let mut out = Vec::new();
        for entry in entries {
            if let RepoTreeEntry::File {
                path,
                size,
                lfs,
                oid,
                ..
            } = entry
            {
                safe_relative(&path, &origin)?;
                if !prefix.is_empty() && !path.starts_with(&format!("{prefix}/")) {
                    return Err(CompileCacheError::UnsafePath {
                        path,
                        origin,
                        reason: "listed outside the requested folder",
                    });
                }
                out.push((
                    RemoteFile {
                        path,
                        size,
                        sha256: lfs.and_then(|l| l.sha256),
                    },
                    oid,
                ));
            }
        }
        Ok(out)
    }
}
