//! File-system helpers: durable (synced, atomic) writes and recursive file listing.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, io_err};

pub(super) fn walk_files(
    dir: &Path,
    rel: &str,
    out: &mut Vec<(String, PathBuf, u64)>,
) -> Result<()> {
    for item in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let path = item.path();
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let name = item.file_name().to_string_lossy().into_owned();
        let child = format!("{rel}/{name}");
        if meta.is_dir() {
            walk_files(&path, &child, out)?;
        } else if meta.is_file() {
            out.push((child, path, meta.len()));
        }
    }
    Ok(())
}

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Writes a file atomically: a synced temp file in the same folder renamed over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path.parent().expect("cache paths have a parent");
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp.")
        .tempfile_in(parent)
        .map_err(io_err(parent))?;
    tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    Ok(())
}
