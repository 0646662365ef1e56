//! Registry entries of the local cache and the files it publishes to the Hub.

use std::fs;
use std::path::PathBuf;

use tracing::warn;

use super::LocalCache;
use super::files::{walk_files, write_atomic};
use crate::entry::CacheEntry;
use crate::error::{Result, io_err};
use crate::layout::{MODULE_PREFIX, REGISTRY_FOLDER};

impl LocalCache {
    /// Writes `entry`'s registry file and its alias (both atomically; existing ones are kept).
    pub fn write_registry(&self, entry: &CacheEntry) -> Result<()> {
        self.layout.validate(Some(entry))?;
        let text = entry.serialize();
        for rel in [
            self.layout.registry_path(entry),
            self.layout.alias_path(entry),
        ] {
            let path = self.root.join(&rel);
            if path.is_file() {
                continue;
            }
            write_atomic(&path, text.as_bytes())?;
        }
        Ok(())
    }

    /// Lists the registry entries of every tool version (from their arch-digest files).
    pub fn registry_entries(&self) -> Result<Vec<(String, CacheEntry)>> {
        self.layout.validate(None)?;
        let registry = self
            .root
            .join(self.layout.compiler_dir())
            .join(REGISTRY_FOLDER);
        let mut out = Vec::new();
        let Ok(tools) = fs::read_dir(&registry) else {
            return Ok(out);
        };
        for tool in tools.flatten() {
            let tool_name = tool.file_name().to_string_lossy().into_owned();
            let Ok(dirs) = fs::read_dir(tool.path()) else {
                continue;
            };
            for dir in dirs.flatten() {
                let name = dir.file_name().to_string_lossy().into_owned();
                // Arch digests are 64 hex digits; alias trees start with a model type.
                if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                    continue;
                }
                for file in fs::read_dir(dir.path())
                    .map_err(io_err(dir.path()))?
                    .flatten()
                {
                    let path = file.path();
                    if path.extension().is_some_and(|e| e == "json") {
                        let rel = format!(
                            "{}/{REGISTRY_FOLDER}/{tool_name}/{name}/{}",
                            self.layout.compiler_dir(),
                            file.file_name().to_string_lossy()
                        );
                        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
                        match CacheEntry::deserialize(&text, &rel) {
                            Ok(entry) => out.push((rel, entry)),
                            Err(e) => warn!("skipping {e}"),
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Every cache file of every compiler folder, relative to the root, for synchronisation.
    pub fn publishable_files(&self) -> Result<Vec<(String, PathBuf, u64)>> {
        self.layout.validate(None)?;
        let mut out = Vec::new();
        let dir = self.compiler_root();
        if !dir.is_dir() {
            return Ok(out);
        }
        let prefix = self.layout.compiler_dir();
        for item in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            if name == REGISTRY_FOLDER {
                walk_files(&item.path(), &format!("{prefix}/{name}"), &mut out)?;
            } else if let Some(hash) = name.strip_prefix(MODULE_PREFIX) {
                // Only modules that verify are published.
                match self.lookup(hash) {
                    Ok(Some(_)) => walk_files(&item.path(), &format!("{prefix}/{name}"), &mut out)?,
                    Ok(None) => {}
                    Err(e) => warn!("not publishing {name}: {e}"),
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
