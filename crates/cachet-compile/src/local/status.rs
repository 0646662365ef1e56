//! What the local cache holds: [`status`] per compiler folder.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::files::walk_files;
use super::{MANIFEST_FILE, STAGING_DIR};
use crate::error::{Result, io_err};
use crate::layout::{MODULE_PREFIX, REGISTRY_FOLDER};

/// What `status` reports about one compiler folder.
#[derive(Debug, Clone, Serialize)]
pub struct VersionStatus {
    /// `<compiler>-<version>` folder name.
    pub compiler_dir: String,
    /// Module folders that carry a manifest.
    pub modules: usize,
    /// Module folders without a manifest (foreign, e.g. neuronx-cc's own, or broken).
    pub unmanaged_modules: usize,
    /// Registry entry files (arch-digest and alias paths).
    pub registry_files: usize,
    /// Tool versions found under `0_REGISTRY`.
    pub tool_versions: Vec<String>,
    /// Leftover staging folders (from interrupted writes).
    pub staging_leftovers: usize,
    /// Bytes on disk.
    pub bytes: u64,
}

/// What `status` reports about a whole cache directory.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStatus {
    /// The cache directory.
    pub root: PathBuf,
    /// One row per compiler folder.
    pub versions: Vec<VersionStatus>,
    /// Bytes on disk in total.
    pub total_bytes: u64,
}

/// Reports entries, sizes and versions of every compiler folder under `root`.
pub fn status(root: &Path) -> Result<CacheStatus> {
    let mut versions = Vec::new();
    let dirs = match fs::read_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(CacheStatus {
                root: root.to_owned(),
                versions,
                total_bytes: 0,
            });
        }
        Err(e) => return Err(io_err(root)(e)),
    };
    for dir in dirs.flatten() {
        if !dir.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = dir.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let mut row = VersionStatus {
            compiler_dir: name,
            modules: 0,
            unmanaged_modules: 0,
            registry_files: 0,
            tool_versions: Vec::new(),
            staging_leftovers: 0,
            bytes: dir_bytes(&dir.path()),
        };
        for item in fs::read_dir(dir.path())
            .map_err(io_err(dir.path()))?
            .flatten()
        {
            let item_name = item.file_name().to_string_lossy().into_owned();
            if item_name.starts_with(MODULE_PREFIX) {
                if item.path().join(MANIFEST_FILE).is_file() {
                    row.modules += 1;
                } else {
                    row.unmanaged_modules += 1;
                }
            } else if item_name == REGISTRY_FOLDER {
                let mut files = Vec::new();
                walk_files(&item.path(), "", &mut files)?;
                row.registry_files = files.len();
                if let Ok(tools) = fs::read_dir(item.path()) {
                    row.tool_versions = tools
                        .flatten()
                        .map(|t| t.file_name().to_string_lossy().into_owned())
                        .collect();
                    row.tool_versions.sort();
                }
            } else if item_name == STAGING_DIR {
                row.staging_leftovers = fs::read_dir(item.path()).map(|d| d.count()).unwrap_or(0);
            }
        }
        versions.push(row);
    }
    versions.sort_by(|a, b| a.compiler_dir.cmp(&b.compiler_dir));
    let total_bytes = versions.iter().map(|v| v.bytes).sum();
    Ok(CacheStatus {
        root: root.to_owned(),
        versions,
        total_bytes,
    })
}

pub(super) fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(items) = fs::read_dir(dir) {
        for item in items.flatten() {
            match item.file_type() {
                Ok(t) if t.is_dir() => total += dir_bytes(&item.path()),
                Ok(t) if t.is_file() => total += item.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}
