//! Freeing space: [`cleanup`] of interrupted writes, corrupt modules and old versions.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{debug, info_span};

use super::manifest::{Manifest, Verify, verify_files};
use super::status::{dir_bytes, status};
use super::{MANIFEST_FILE, STAGING_DIR};
use crate::error::{Result, io_err};

/// What `cleanup` removes.
#[derive(Debug, Clone, Default)]
pub struct CleanupOptions {
    /// Remove compiler folders other than `keep` (an older compiler's artifacts).
    pub old_versions: bool,
    /// Remove everything.
    pub all: bool,
    /// Only report what would be removed.
    pub dry_run: bool,
    /// The compiler folder to keep with `old_versions` (`<compiler>-<version>`); with `None`
    /// the most recently modified folder of each compiler is kept.
    pub keep: Option<String>,
    /// Staging leftovers younger than this are kept (a write may be in progress).
    pub staging_grace: Duration,
}

/// What `cleanup` removed (or would remove, with `dry_run`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CleanupReport {
    /// Removed paths.
    pub removed: Vec<PathBuf>,
    /// Bytes freed.
    pub bytes: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// The most recently modified `<compiler>-<version>` folder of each compiler (the part before
/// the first `-`) in the cache at `root`: what `cleanup --old-versions` keeps by default.
pub fn newest_versions(root: &Path) -> Result<Vec<String>> {
    let mut newest: std::collections::BTreeMap<String, (SystemTime, String)> = Default::default();
    for v in &status(root)?.versions {
        let compiler = v.compiler_dir.split('-').next().unwrap_or("").to_owned();
        let mtime = fs::metadata(root.join(&v.compiler_dir))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let slot = newest
            .entry(compiler)
            .or_insert((mtime, v.compiler_dir.clone()));
        if mtime > slot.0 {
            *slot = (mtime, v.compiler_dir.clone());
        }
    }
    Ok(newest.into_values().map(|(_, d)| d).collect())
}

/// Removes interrupted writes, corrupt modules and, on request, old versions or everything.
pub fn cleanup(root: &Path, options: &CleanupOptions) -> Result<CleanupReport> {
    let _span = info_span!("compile_cache_cleanup", root = %root.display()).entered();
    let mut report = CleanupReport {
        dry_run: options.dry_run,
        ..Default::default()
    };
    let status = status(root)?;
    let remove = |path: PathBuf, report: &mut CleanupReport| -> Result<()> {
        let bytes = if path.is_dir() {
            dir_bytes(&path)
        } else {
            fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
        };
        debug!(path = %path.display(), bytes, "cleanup");
        if !options.dry_run {
            if path.is_dir() {
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
            } else {
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        report.bytes += bytes;
        report.removed.push(path);
        Ok(())
    };
    if options.all {
        for v in &status.versions {
            remove(root.join(&v.compiler_dir), &mut report)?;
        }
        return Ok(report);
    }
    let mut kept: Vec<String> = Vec::new();
    if options.old_versions {
        match &options.keep {
            Some(keep) => kept.push(keep.clone()),
            None => kept = newest_versions(root)?,
        }
    }
    for v in &status.versions {
        let dir = root.join(&v.compiler_dir);
        if options.old_versions && !kept.contains(&v.compiler_dir) {
            remove(dir, &mut report)?;
            continue;
        }
        // Interrupted writes: staging folders older than the grace period.
        let staging = dir.join(STAGING_DIR);
        if let Ok(items) = fs::read_dir(&staging) {
            for item in items.flatten() {
                let age = item
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                if age >= options.staging_grace {
                    remove(item.path(), &mut report)?;
                }
            }
        }
        // Corrupt managed modules (a manifest that no longer verifies sizes).
        for item in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let manifest_path = item.path().join(MANIFEST_FILE);
            if !manifest_path.is_file() {
                continue;
            }
            let ok = fs::read(&manifest_path)
                .ok()
                .and_then(|t| serde_json::from_slice::<Manifest>(&t).ok())
                .is_some_and(|m| verify_files(&item.path(), &m, Verify::Size).is_ok());
            if !ok {
                remove(item.path(), &mut report)?;
            }
        }
    }
    Ok(report)
}
