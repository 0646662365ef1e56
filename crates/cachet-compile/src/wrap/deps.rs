//! The dependency manifest of a wrapped command, as ccache keeps one in its direct mode: for one
//! command line (its base entry), the sets of files the command's depfiles listed. A lookup
//! hashes each recorded set's files as they are now and asks the cache for the result keyed on
//! those contents, so an edited header is a miss, never a stale hit.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::error::{Result, io_err};
use crate::local::{LocalCache, sha256_file, write_atomic};

/// Dependency sets kept per command line (newest first); older ones are forgotten.
pub(crate) const MAX_SETS: usize = 16;
/// A manifest larger than this is ignored (it only costs a compile).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Folder of the manifests, inside the compiler's folder of the local cache.
const DEPS_DIR: &str = "wrap-deps";

/// Dependency sets recorded for one command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DependencyManifest {
    /// Sets of files (as the depfile names them), newest first.
    pub sets: Vec<Vec<String>>,
}

impl DependencyManifest {
    /// Where the manifest of base entry `hash` lives in `local`.
    pub fn path(local: &LocalCache, hash: &str) -> PathBuf {
        local
            .root()
            .join(local.layout().compiler_dir())
            .join(DEPS_DIR)
            .join(format!("{hash}.json"))
    }

    /// Reads a manifest; absent, unreadable or damaged is an empty one (warned).
    pub fn load(path: &Path) -> Self {
        let read = || -> std::result::Result<Self, String> {
            let len = match fs::metadata(path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
                Err(e) => return Err(e.to_string()),
            };
            if len > MAX_MANIFEST_BYTES {
                return Err(format!("{len} bytes, more than {MAX_MANIFEST_BYTES}"));
            }
            let text = fs::read(path).map_err(|e| e.to_string())?;
            Self::parse(&text)
        };
        read().unwrap_or_else(|reason| {
            warn!(manifest = %path.display(), "dependency manifest ignored: {reason}");
            Self::default()
        })
    }

    /// Parses a manifest's JSON, keeping at most [`MAX_SETS`] sets.
    pub fn parse(text: &[u8]) -> std::result::Result<Self, String> {
        let mut manifest: Self = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        manifest.sets.truncate(MAX_SETS);
        Ok(manifest)
    }

    /// Writes the manifest atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        write_atomic(path, &text)
    }

    /// Puts `set` first (moving it if it was known), forgetting sets past [`MAX_SETS`].
    pub fn record(&mut self, set: Vec<String>) {
        self.sets.retain(|s| *s != set);
        self.sets.insert(0, set);
        self.sets.truncate(MAX_SETS);
    }
}

/// The content of each file of `set` as it is now: its SHA-256, or `None` where it is absent
/// (a dependency that appears later is then a change too).
pub(crate) fn digest_set(set: &[String]) -> Result<BTreeMap<String, Option<String>>> {
    set.iter()
        .map(|name| {
            let path = Path::new(name);
            let digest = match fs::metadata(path) {
                Ok(meta) if meta.is_file() => Some(sha256_file(path)?),
                Ok(_) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(path)(e)),
            };
            Ok((name.clone(), digest))
        })
        .collect()
}

/// The files of `set` modified at or after `start` (while the command ran): their contents may
/// not be what the command read, so the result must not be keyed on them.
pub(crate) fn changed_since(set: &[String], start: SystemTime) -> Vec<String> {
    set.iter()
        .filter(|name| {
            fs::metadata(name)
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified >= start)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_newest_first_without_repeats_and_bounded() {
        let mut manifest = DependencyManifest::default();
        for i in 0..MAX_SETS + 3 {
            manifest.record(vec![format!("{i}.h")]);
        }
        manifest.record(vec!["5.h".into()]);
        assert_eq!(manifest.sets.len(), MAX_SETS);
        assert_eq!(manifest.sets[0], vec!["5.h".to_string()]);
        assert_eq!(manifest.sets.iter().filter(|s| s[0] == "5.h").count(), 1);
        let text = serde_json::to_vec(&manifest).unwrap();
        assert_eq!(DependencyManifest::parse(&text).unwrap(), manifest);
        assert!(DependencyManifest::parse(b"{\"sets\": 3}").is_err());
    }
}
