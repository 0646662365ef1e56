//! The local cache: verified artifact folders written atomically under a cross-process lock.
//!
//! A module folder becomes visible only by renaming a finished staging folder into place, and it
//! carries a manifest of file sizes and SHA-256 sums checked on every read, so a process killed
//! mid-write never leaves an entry that reads as valid.

mod cleanup;
mod files;
mod lock;
mod manifest;
mod registry;
mod staging;
mod status;

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::CacheLayout;

pub use cleanup::{CleanupOptions, CleanupReport, cleanup, newest_versions};
pub use lock::EntryLock;
pub use manifest::{Manifest, ManifestFile, Verify};
pub use staging::Staging;
pub use status::{CacheStatus, VersionStatus, status};

pub(crate) use files::write_atomic;
pub(crate) use manifest::{sha256_file, verify_files};

/// Environment variable overriding the default local cache directory.
pub const CACHE_DIR_ENV: &str = "CACHET_COMPILE_CACHE";
/// Default local cache directory, like optimum-neuron's `/var/tmp/neuron-compile-cache`.
pub const DEFAULT_CACHE_DIR: &str = "/var/tmp/cachet-compile-cache";
/// Manifest file written last into every module folder.
pub const MANIFEST_FILE: &str = "cachet-manifest.json";
const STAGING_DIR: &str = ".staging";
const LOCK_DIR: &str = ".locks";

/// The local cache directory: `$CACHET_COMPILE_CACHE`, else [`DEFAULT_CACHE_DIR`].
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os(CACHE_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
}

/// Where a module came from when it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Found valid in the local cache.
    Local,
    /// Downloaded from the Hub cache.
    Hub,
    /// Compiled by this call.
    Compiled,
}

/// A verified module folder in the local cache.
#[derive(Debug, Clone)]
pub struct CachedModule {
    /// The module folder (read-only by convention: shared with other processes).
    pub dir: PathBuf,
    /// The entry hash.
    pub hash: String,
    /// The verified manifest.
    pub manifest: Manifest,
    /// Whether it was a local hit, a Hub download or a fresh compile.
    pub source: Source,
}

/// The local cache rooted at one directory, for one compiler layout.
#[derive(Debug, Clone)]
pub struct LocalCache {
    root: PathBuf,
    layout: CacheLayout,
    verify: Verify,
}

impl LocalCache {
    /// A cache at `root` for `layout` (created lazily on first write).
    pub fn new(root: impl Into<PathBuf>, layout: CacheLayout) -> Self {
        Self {
            root: root.into(),
            layout,
            verify: Verify::Full,
        }
    }

    /// A cache at [`default_cache_dir`].
    pub fn open_default(layout: CacheLayout) -> Self {
        Self::new(default_cache_dir(), layout)
    }

    /// Sets how reads are verified.
    pub fn with_verify(mut self, verify: Verify) -> Self {
        self.verify = verify;
        self
    }

    /// The cache root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The compiler layout.
    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }

    /// The folder of module `hash` (whether it exists or not).
    pub fn module_dir(&self, hash: &str) -> PathBuf {
        self.root.join(self.layout.module_dir(hash))
    }

    fn compiler_root(&self) -> PathBuf {
        self.root.join(self.layout.compiler_dir())
    }

    /// Checks the entry hash and the layout (which a library user builds freely: a compiler
    /// name or version with `..` or `/` must not lead outside the cache root).
    fn check_hash(&self, hash: &str) -> Result<()> {
        self.layout.validate(None)?;
        if hash.is_empty() || !hash.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(CompileCacheError::UnsafePath {
                path: hash.to_owned(),
                origin: "an entry hash".into(),
                reason: "hashes are alphanumeric",
            });
        }
        Ok(())
    }

    /// Returns the module if it is present and verifies; `None` if absent.
    ///
    /// A present but corrupt module is reported as [`CompileCacheError::Corrupt`].
    pub fn lookup(&self, hash: &str) -> Result<Option<CachedModule>> {
        self.check_hash(hash)?;
        let dir = self.module_dir(hash);
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = match fs::read(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if dir.exists() {
                    return Err(CompileCacheError::Corrupt {
                        path: dir,
                        reason: "module folder has no manifest".into(),
                    });
                }
                return Ok(None);
            }
            Err(e) => return Err(io_err(&manifest_path)(e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|source| CompileCacheError::Json {
                what: manifest_path.display().to_string(),
                source,
            })?;
        if manifest.hash != hash {
            return Err(CompileCacheError::Corrupt {
                path: manifest_path,
                reason: format!("manifest is for entry {}, not {hash}", manifest.hash),
            });
        }
        verify_files(&dir, &manifest, self.verify)?;
        Ok(Some(CachedModule {
            dir,
            hash: hash.to_owned(),
            manifest,
            source: Source::Local,
        }))
    }
}
