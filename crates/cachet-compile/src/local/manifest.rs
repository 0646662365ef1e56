//! Module manifests: recording, hashing and verifying the files of a module folder.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::MANIFEST_FILE;
use super::files::sync_dir;
use crate::entry::hex;
use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::safe_relative;

/// How much of a cached module is checked when it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Sizes and SHA-256 of every file (default).
    #[default]
    Full,
    /// Sizes only: for multi-gigabyte artifacts read often.
    Size,
}

/// One file of a module, as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the module folder, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// The manifest of a module folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version (1).
    pub version: u32,
    /// The entry hash the module was compiled for.
    pub hash: String,
    /// Every artifact file with its size and checksum.
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// Total bytes of the artifacts (saturating: a manifest read from disk or a Hub repo may
    /// claim sizes that add up past `u64::MAX`).
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .fold(0u64, |total, f| total.saturating_add(f.size))
    }
}

/// Checks every manifest file: a regular file (no symlink) of the recorded size and checksum.
pub(crate) fn verify_files(dir: &Path, manifest: &Manifest, verify: Verify) -> Result<()> {
    let origin = format!("manifest of {}", dir.display());
    for file in &manifest.files {
        safe_relative(&file.path, &origin)?;
        let path = dir.join(&file.path);
        let meta = fs::symlink_metadata(&path).map_err(|e| CompileCacheError::Corrupt {
            path: path.clone(),
            reason: format!("missing: {e}"),
        })?;
        if !meta.is_file() {
            return Err(CompileCacheError::Corrupt {
                path,
                reason: "not a regular file (symlinks are refused)".into(),
            });
        }
        if meta.len() != file.size {
            return Err(CompileCacheError::Corrupt {
                path,
                reason: format!("size {} != recorded {}", meta.len(), file.size),
            });
        }
        if verify == Verify::Full {
            let sum = sha256_file(&path)?;
            if sum != file.sha256 {
                return Err(CompileCacheError::Corrupt {
                    path,
                    reason: format!("sha256 {sum} != recorded {}", file.sha256),
                });
            }
        }
    }
    Ok(())
}

/// SHA-256 of a file, streamed.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Hashes and fsyncs every file below `dir` (symlinks are refused), sorted by path.
pub(super) fn scan_and_hash(dir: &Path) -> Result<Vec<ManifestFile>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<ManifestFile>) -> Result<()> {
        for item in fs::read_dir(dir).map_err(io_err(dir))? {
            let item = item.map_err(io_err(dir))?;
            let path = item.path();
            let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            if meta.is_dir() {
                walk(root, &path, out)?;
                sync_dir(&path)?;
            } else if meta.is_file() {
                let rel = path
                    .strip_prefix(root)
                    .expect("walked below root")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                if rel == MANIFEST_FILE {
                    continue;
                }
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err(&path))?;
                out.push(ManifestFile {
                    path: rel,
                    size: meta.len(),
                    sha256: sha256_file(&path)?,
                });
            } else {
                return Err(CompileCacheError::UnsafePath {
                    path: path.display().to_string(),
                    origin: "compiler output".into(),
                    reason: "symlinks and special files are not cached",
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}
