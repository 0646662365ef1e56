//! The local cache: verified artifact folders written atomically under a cross-process lock.
//!
//! A module folder becomes visible only by renaming a finished staging folder into place, and it
//! carries a manifest of file sizes and SHA-256 sums checked on every read, so a process killed
//! mid-write never leaves an entry that reads as valid.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, info_span, warn};

use crate::entry::{CacheEntry, hex};
use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::{CacheLayout, MODULE_PREFIX, REGISTRY_FOLDER, safe_relative};

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
    /// Total bytes of the artifacts.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
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

fn walk_files(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf, u64)>) -> Result<()> {
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

/// Checks every manifest file: a regular file (no symlink) of the recorded size and checksum.
pub fn verify_files(dir: &Path, manifest: &Manifest, verify: Verify) -> Result<()> {
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
pub fn sha256_file(path: &Path) -> Result<String> {
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
fn scan_and_hash(dir: &Path) -> Result<Vec<ManifestFile>> {
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

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Writes a file atomically: a synced temp file in the same folder renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
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

fn dir_bytes(dir: &Path) -> u64 {
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
