//! Which cache repo to use (environment, saved default, public fallback), and creating one.

use std::path::PathBuf;

use hf_hub::RepoTypeModel;
use serde::Serialize;

use super::HubOptions;
use super::client::{client, hf_home, map_err};
use crate::error::{CompileCacheError, Result};
use crate::local::write_atomic;

/// Environment variable naming the cache repo (overrides the saved default).
pub(crate) const CUSTOM_CACHE_REPO_ENV: &str = "CUSTOM_CACHE_REPO";
/// Environment variable overriding the read-only public fallback repo (empty disables it).
pub(crate) const DEFAULT_REPO_ENV: &str = "CACHET_DEFAULT_CACHE_REPO";
/// The read-only public cache used when nothing else is configured (optimum-neuron's).
pub(crate) const DEFAULT_PUBLIC_REPO: &str = "aws-neuron/optimum-neuron-cache";
/// File under `$HF_HOME` persisting `set REPO`.
pub(crate) const SAVED_REPO_FILE: &str = "cachet_compile_cache_repo";
/// optimum-neuron's own saved-repo file under `$HF_HOME`, read as a fallback.
pub(crate) const OPTIMUM_SAVED_REPO_FILE: &str = "optimum_neuron_custom_cache";

/// The repo `set` saved, if any (ours first, then optimum-neuron's).
pub(crate) fn saved_repo() -> Option<String> {
    for name in [SAVED_REPO_FILE, OPTIMUM_SAVED_REPO_FILE] {
        if let Ok(text) = std::fs::read_to_string(hf_home().join(name)) {
            let repo = text.trim();
            if !repo.is_empty() {
                return Some(repo.to_owned());
            }
        }
    }
    None
}

/// Persists `repo` as the default cache repo (`cachet compile-cache set`).
pub fn save_repo(repo: &str) -> Result<PathBuf> {
    check_repo_id(repo)?;
    let path = hf_home().join(SAVED_REPO_FILE);
    write_atomic(&path, repo.as_bytes())?;
    Ok(path)
}

/// Which repo to use and why: `CUSTOM_CACHE_REPO`, then the saved one, then the public default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepoChoice {
    /// The repo id.
    pub repo: String,
    /// `env`, `saved` or `default`.
    pub origin: &'static str,
}

/// Resolves the cache repo the way optimum-neuron does.
pub fn resolve_repo() -> Option<RepoChoice> {
    if let Ok(repo) = std::env::var(CUSTOM_CACHE_REPO_ENV)
        && !repo.trim().is_empty()
    {
        return Some(RepoChoice {
            repo: repo.trim().to_owned(),
            origin: "env",
        });
    }
    if let Some(repo) = saved_repo() {
        return Some(RepoChoice {
            repo,
            origin: "saved",
        });
    }
    let default = std::env::var(DEFAULT_REPO_ENV).unwrap_or_else(|_| DEFAULT_PUBLIC_REPO.into());
    (!default.trim().is_empty()).then(|| RepoChoice {
        repo: default.trim().to_owned(),
        origin: "default",
    })
}

pub(super) fn check_repo_id(repo: &str) -> Result<()> {
    let ok = repo.split('/').count() == 2
        && repo.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(CompileCacheError::InvalidCommand(format!(
            "repo id {repo:?} is not of the form org/name"
        )))
    }
}

/// Creates a cache repo (private unless `public`) and returns its id; `name` may be `org/name`
/// or a bare name created under the token's user.
pub fn create_repo(options: &HubOptions, name: Option<&str>, public: bool) -> Result<String> {
    let client = client(options)?;
    let name = name.unwrap_or("cachet-compile-cache");
    let repo_id = if name.contains('/') {
        name.to_owned()
    } else {
        let user = client
            .whoami()
            .send()
            .map_err(|e| map_err(name, "whoami", e))?;
        format!("{}/{name}", user.username)
    };
    check_repo_id(&repo_id)?;
    client
        .create_repository()
        .repo_id(&repo_id)
        .repo_type(RepoTypeModel)
        .private(!public)
        .exist_ok(true)
        .send()
        .map_err(|e| map_err(&repo_id, "create", e))?;
    Ok(repo_id)
}
