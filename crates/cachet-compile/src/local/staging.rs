//! Building modules: staging folders, their atomic publication and get-or-compile.

use std::fs;
use std::path::Path;

use tracing::{info_span, warn};

use super::files::{sync_dir, write_synced};
use super::manifest::{Manifest, scan_and_hash};
use super::{CachedModule, LocalCache, MANIFEST_FILE, STAGING_DIR, Source};
use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::MODULE_PREFIX;

/// A module being built: a private staging folder that [`LocalCache::commit`] publishes.
#[derive(Debug)]
pub struct Staging {
    dir: tempfile::TempDir,
    hash: String,
}

impl Staging {
    /// The folder to write artifacts into.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl LocalCache {
    /// Creates a private staging folder for module `hash`.
    pub fn stage(&self, hash: &str) -> Result<Staging> {
        self.check_hash(hash)?;
        let dir = self.compiler_root().join(STAGING_DIR);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{MODULE_PREFIX}{hash}."))
            .tempdir_in(&dir)
            .map_err(io_err(&dir))?;
        Ok(Staging {
            dir: tmp,
            hash: hash.to_owned(),
        })
    }

    /// Publishes a staging folder: checksums every file, syncs, writes the manifest last, and
    /// renames the folder into place. Call it while holding the entry's [`lock`](Self::lock).
    pub fn commit(&self, staging: Staging, source: Source) -> Result<CachedModule> {
        let hash = staging.hash.clone();
        let _span = info_span!("compile_cache_commit", hash).entered();
        let files = scan_and_hash(staging.path())?;
        if files.is_empty() {
            return Err(CompileCacheError::EmptyOutput {
                hash,
                dir: staging.path().to_owned(),
            });
        }
        let manifest = Manifest {
            version: 1,
            hash: hash.clone(),
            files,
        };
        let manifest_path = staging.path().join(MANIFEST_FILE);
        write_synced(
            &manifest_path,
            serde_json::to_string_pretty(&manifest)
                .expect("manifest serialises")
                .as_bytes(),
        )?;
        sync_dir(staging.path())?;
        let target = self.module_dir(&hash);
        if target.exists() {
            // A corrupt leftover (checked by the caller under the lock): move it aside first.
            self.discard(&target)?;
        }
        let staged = staging.dir.keep();
        fs::rename(&staged, &target).map_err(|e| {
            let _ = fs::remove_dir_all(&staged);
            io_err(&target)(e)
        })?;
        sync_dir(&self.compiler_root())?;
        Ok(CachedModule {
            dir: target,
            hash,
            manifest,
            source,
        })
    }

    /// Atomically moves a folder out of the cache and deletes it.
    fn discard(&self, dir: &Path) -> Result<()> {
        let trash_root = self.compiler_root().join(STAGING_DIR);
        fs::create_dir_all(&trash_root).map_err(io_err(&trash_root))?;
        let trash = tempfile::Builder::new()
            .prefix("trash.")
            .tempdir_in(&trash_root)
            .map_err(io_err(&trash_root))?;
        let dest = trash.path().join("module");
        fs::rename(dir, &dest).map_err(io_err(dir))?;
        drop(trash);
        Ok(())
    }

    /// Serves module `entry_hash`, running `compile` into a staging folder on a miss.
    ///
    /// Concurrent callers (threads or processes) for the same missing entry compile it once:
    /// the others wait on the entry lock and then read the published module.
    pub fn get_or_compile<F, E>(&self, hash: &str, compile: F) -> Result<CachedModule>
    where
        F: FnOnce(&Path) -> std::result::Result<(), E>,
        E: std::fmt::Display,
    {
        self.get_or_fill(hash, |staging| {
            compile(staging).map_err(|e| CompileCacheError::CompileFailed {
                hash: hash.to_owned(),
                message: e.to_string(),
            })?;
            Ok(Source::Compiled)
        })
    }

    /// Like [`get_or_compile`](Self::get_or_compile) with a filler that says where the files
    /// came from (used by the Hub cache to try a download before compiling).
    pub fn get_or_fill<F>(&self, hash: &str, fill: F) -> Result<CachedModule>
    where
        F: FnOnce(&Path) -> Result<Source>,
    {
        match self.lookup(hash) {
            Ok(Some(hit)) => return Ok(hit),
            Ok(None) => {}
            Err(e) => warn!("{e}; rebuilding the entry"),
        }
        let _lock = self.lock(hash)?;
        // Another process may have published it while we waited.
        match self.lookup(hash) {
            Ok(Some(hit)) => return Ok(hit),
            Ok(None) => {}
            Err(e) => {
                warn!("{e}; discarding it");
                let dir = self.module_dir(hash);
                if dir.exists() {
                    self.discard(&dir)?;
                }
            }
        }
        let staging = self.stage(hash)?;
        let source = {
            let _span = info_span!("compile_cache_fill", hash).entered();
            fill(staging.path())?
        };
        self.commit(staging, source)
    }
}
