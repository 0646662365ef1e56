//! Sharing burn's GPU kernel cache (`~/.cache/cubecl`) through the compile cache.
//!
//! burn's wgpu backend compiles and autotunes kernels on first use and keeps the results under
//! cubecl's cache folder ([`default_kernel_dir`]: `target/environment` of the Cargo workspace a
//! process runs in, else `~/.cache/cubecl`); a first process pays for it. The same snapshot
//! mechanism shares any driver cache folder, e.g. Mesa's shader cache, which is what makes a cold
//! wgpu process on llvmpipe slow (6.2 s cold vs 1.5 s after `pull`; see the crate README). [`push`]
//! publishes a snapshot of that folder as one cache module keyed by device, backend and
//! burn/cubecl versions, and [`pull`] restores it on another machine so it starts warm.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::cache::CompileCache;
use crate::entry::{CacheEntry, EntryBuilder};
use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::CacheLayout;
use crate::local::CachedModule;
use crate::wrap::copy_tree;

/// What a kernel cache depends on: device (adapter name), backend and library versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCacheKey {
    /// The device, e.g. `NVIDIA H100 80GB HBM3` or `llvmpipe`.
    pub device: String,
    /// The backend, e.g. `wgpu-vulkan`.
    pub backend: String,
    /// burn's version.
    pub burn_version: String,
    /// cubecl's version (names the cache folder: `cubecl-<version>`).
    pub cubecl_version: String,
}

impl KernelCacheKey {
    /// The cache entry of this key.
    pub fn entry(&self) -> Result<CacheEntry> {
        EntryBuilder::new(
            "cubecl/kernel-cache",
            json!({"model_type": "cubecl-kernel-cache", "device": self.device, "backend": self.backend}),
        )
        .task("kernel-cache")
        .compiler("cubecl", &self.cubecl_version)
        .factor("burn_version", self.burn_version.as_str())
        .build()
    }

    /// The layout: `cubecl-<version>/…`.
    pub fn layout(&self) -> CacheLayout {
        CacheLayout::new("cubecl", self.cubecl_version.clone())
    }
}

/// Where cubecl 0.11 keeps its caches for a process started in the current directory (see
/// [`kernel_dir_for`]).
pub fn default_kernel_dir() -> PathBuf {
    match std::env::current_dir() {
        Ok(cwd) => kernel_dir_for(&cwd),
        Err(_) => global_kernel_dir(),
    }
}

/// Where cubecl 0.11's default cache setting (`target`) puts the caches of a process started in
/// `cwd`: `<outermost folder with a Cargo.toml above cwd>/target/environment` inside a Cargo
/// project (so `cargo run` keeps them in the workspace's `target/`), else the user cache folder
/// ([`global_kernel_dir`]). A `cubecl.toml` (`[environment] path`) can move them elsewhere; pass
/// that folder explicitly then.
pub fn kernel_dir_for(cwd: &Path) -> PathBuf {
    cwd.ancestors()
        .filter(|dir| dir.join("Cargo.toml").is_file())
        .last()
        .map(|root| root.join("target").join("environment"))
        .unwrap_or_else(global_kernel_dir)
}

/// cubecl's user cache folder: `$XDG_CACHE_HOME/cubecl`, else `~/.cache/cubecl`.
pub fn global_kernel_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|v| v.is_absolute())
    {
        return xdg.join("cubecl");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache").join("cubecl")
}

/// Publishes a snapshot of `kernel_dir` (first publication wins; later calls return it).
pub fn push(cache: &CompileCache, key: &KernelCacheKey, kernel_dir: &Path) -> Result<CachedModule> {
    if !kernel_dir.is_dir() {
        return Err(CompileCacheError::Io {
            path: kernel_dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no kernel cache folder"),
        });
    }
    let entry = key.entry()?;
    cache.get_or_compile(&entry, |out| copy_tree(kernel_dir, &out.join("cubecl")))
}

/// Restores the kernel cache of `key` into `kernel_dir`, keeping files already there; returns
/// the number of files restored, or `None` when no snapshot exists locally or on the Hub.
pub fn pull(
    cache: &CompileCache,
    key: &KernelCacheKey,
    kernel_dir: &Path,
) -> Result<Option<usize>> {
    let entry = key.entry()?;
    let Some(module) = cache.fetch(&entry)? else {
        return Ok(None);
    };
    let mut restored = 0;
    for file in &module.manifest.files {
        let Some(rel) = file.path.strip_prefix("cubecl/") else {
            continue;
        };
        let dest = kernel_dir.join(rel);
        if dest.exists() {
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        copy_tree(&module.dir.join(&file.path), &dest)?;
        restored += 1;
    }
    Ok(Some(restored))
}
