//! Pruning other compiler and tool versions from a repo: [`plan_prune`] and its commit.

use hf_hub::repository::CommitOperation;
use serde::Serialize;
use tracing::{info, info_span};

use super::client::resolve_token;
use super::{HubCache, RemoteFile};
use crate::error::{CompileCacheError, Result};
use crate::layout::{MODULE_PREFIX, REGISTRY_FOLDER};

/// What [`HubCache::prune_old_versions`] deleted (or, with `dry_run`, would delete).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// The repo.
    pub repo: String,
    /// The compiler folders kept.
    pub kept: Vec<String>,
    /// Files deleted.
    pub deleted: Vec<String>,
    /// Their total size.
    pub bytes: u64,
    /// Whether this was a dry run (nothing deleted).
    pub dry_run: bool,
    /// Commit attempts used (0 when nothing was committed).
    pub attempts: u32,
}

/// Selects the files of a repo listing that pruning old versions deletes.
///
/// A top-level folder `<compiler>-<version>` is deleted whole when another folder of the same
/// compiler (the part before the first `-`, as in the local cache) is in `keep`. Inside the kept
/// folders, with `tool_version`, `0_REGISTRY/<other tool version>/…` entries are deleted, and
/// so is every `MODULE_<hash>` folder whose hash only those entries name (modules no registry
/// entry names are left alone: they may be served by hash). Files outside compiler folders
/// (README, `.gitattributes`) and compilers with no kept folder are never selected.
pub fn plan_prune<'a>(
    files: &'a [RemoteFile],
    keep: &[String],
    tool_version: Option<&str>,
) -> Vec<&'a RemoteFile> {
    let compiler_of = |dir: &str| dir.split('-').next().unwrap_or("").to_owned();
    let kept_compilers: Vec<String> = keep.iter().map(|k| compiler_of(k)).collect();
    let split = |path: &'a str| path.split_once('/');
    let mut out = Vec::new();
    let mut old_hashes = std::collections::BTreeSet::new();
    let mut live_hashes = std::collections::BTreeSet::new();
    let hash_of = |rest: &str| {
        rest.rsplit('/')
            .next()
            .and_then(|f| f.strip_suffix(".json"))
            .map(str::to_owned)
    };
    for file in files {
        let Some((dir, rest)) = split(&file.path) else {
            continue;
        };
        if !dir.contains('-') || !kept_compilers.contains(&compiler_of(dir)) {
            continue;
        }
        if !keep.iter().any(|k| k == dir) {
            out.push(file);
            continue;
        }
        let (Some(tool_version), Some(registry)) = (
            tool_version,
            rest.strip_prefix(&format!("{REGISTRY_FOLDER}/")),
        ) else {
            continue;
        };
        let Some((version, entry)) = registry.split_once('/') else {
            continue;
        };
        let hash = hash_of(entry).map(|h| (dir.to_owned(), h));
        if version == tool_version {
            live_hashes.extend(hash);
        } else {
            old_hashes.extend(hash);
            out.push(file);
        }
    }
    let dead: Vec<String> = old_hashes
        .difference(&live_hashes)
        .map(|(dir, hash)| format!("{dir}/{MODULE_PREFIX}{hash}/"))
        .collect();
    for file in files {
        if dead.iter().any(|d| file.path.starts_with(d)) {
            out.push(file);
        }
    }
    out
}

impl HubCache {
    /// Deletes what [`plan_prune`] selects from this repo in one commit: the folders of other
    /// versions of the kept compilers (`keep`: `<compiler>-<version>` folders) and, with
    /// `tool_version`, registry entries of other tool versions plus the `MODULE_` folders only
    /// they referenced. Needs a token with write access unless `dry_run`; folders of compilers
    /// with no kept version are never touched.
    pub fn prune_old_versions(
        &self,
        keep: &[String],
        tool_version: Option<&str>,
        dry_run: bool,
    ) -> Result<PruneReport> {
        let _span = info_span!("hub_prune", repo = self.repo_id, dry_run).entered();
        if !dry_run && resolve_token(&self.options).is_none() {
            return Err(CompileCacheError::TokenRequired {
                action: "deleting from",
                repo: self.repo_id.clone(),
            });
        }
        let files = self.list_files("")?;
        let mut report = PruneReport {
            repo: self.repo_id.clone(),
            kept: keep.to_vec(),
            dry_run,
            ..Default::default()
        };
        for file in plan_prune(&files, keep, tool_version) {
            report.bytes += file.size;
            report.deleted.push(file.path.clone());
        }
        if dry_run || report.deleted.is_empty() {
            return Ok(report);
        }
        let deleted = report.deleted.clone();
        let make = || deleted.iter().map(CommitOperation::delete).collect();
        let message = format!(
            "cachet-compile: prune versions other than {}",
            keep.join(", ")
        );
        report.attempts = self.commit(make, &message, None)?;
        info!(
            files = report.deleted.len(),
            bytes = report.bytes,
            "pruned old versions"
        );
        Ok(report)
    }
}
