//! The cross-process lock of one entry: [`EntryLock`] and [`LocalCache::lock`].

use std::fs::{self, File};
use std::path::PathBuf;

use tracing::{info_span, warn};

use super::{LOCK_DIR, LocalCache};
use crate::error::{Result, io_err};
use crate::layout::MODULE_PREFIX;

/// A held cross-process lock on one entry; released on drop or process death.
#[derive(Debug)]
pub struct EntryLock {
    file: File,
    path: PathBuf,
}

impl Drop for EntryLock {
    fn drop(&mut self) {
        if let Err(e) = self.file.unlock() {
            warn!(lock = %self.path.display(), "unlocking failed: {e}");
        }
    }
}

impl LocalCache {
    /// Takes the cross-process lock of entry `hash`, blocking until it is free.
    pub fn lock(&self, hash: &str) -> Result<EntryLock> {
        self.check_hash(hash)?;
        let dir = self.compiler_root().join(LOCK_DIR);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("{MODULE_PREFIX}{hash}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let _span = info_span!("compile_cache_lock", hash).entered();
        file.lock().map_err(io_err(&path))?;
        Ok(EntryLock { file, path })
    }
}
