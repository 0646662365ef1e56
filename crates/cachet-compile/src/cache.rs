//! The two-level cache: the local cache, then an optional Hub repo, then the compiler.

use std::path::Path;

use tracing::{info, warn};

use crate::entry::CacheEntry;
use crate::error::{CompileCacheError, Result, io_err};
use crate::hub::{HubCache, HubOptions, resolve_repo};
use crate::layout::CacheLayout;
use crate::local::{CachedModule, LocalCache, Source};

/// The local cache plus an optional Hub repo: local → Hub → compile.
#[derive(Debug)]
pub struct CompileCache {
    local: LocalCache,
    hub: Option<HubCache>,
    push: bool,
}

impl CompileCache {
    /// A cache with only the local level.
    pub fn local_only(local: LocalCache) -> Self {
        Self {
            local,
            hub: None,
            push: false,
        }
    }

    /// A cache with a Hub level; `push` uploads fresh compilations (needs a writable repo).
    pub fn with_hub(local: LocalCache, hub: HubCache, push: bool) -> Self {
        Self {
            local,
            hub: Some(hub),
            push,
        }
    }

    /// The default cache for `layout`: local dir from the environment and the repo resolved
    /// like optimum-neuron (pushing only to a configured repo, never to the public default).
    pub fn from_env(layout: CacheLayout) -> Result<Self> {
        Ok(Self::from_env_with_local(LocalCache::open_default(layout)))
    }

    /// Like [`from_env`](Self::from_env) over a given local cache.
    pub fn from_env_with_local(local: LocalCache) -> Self {
        match resolve_repo() {
            Some(choice) => {
                let push = choice.origin != "default";
                match HubCache::new(&choice.repo, HubOptions::default()) {
                    Ok(hub) => Self::with_hub(local, hub, push),
                    Err(e) => {
                        warn!("Hub cache disabled: {e}");
                        Self::local_only(local)
                    }
                }
            }
            None => Self::local_only(local),
        }
    }

    /// The local level.
    pub fn local(&self) -> &LocalCache {
        &self.local
    }

    /// The Hub level, if any.
    pub fn hub(&self) -> Option<&HubCache> {
        self.hub.as_ref()
    }

    /// Returns `entry`'s module from the local cache or the Hub, never compiling.
    pub fn fetch(&self, entry: &CacheEntry) -> Result<Option<CachedModule>> {
        self.local.layout().validate(Some(entry))?;
        let hash = entry.hash();
        if let Ok(Some(hit)) = self.local.lookup(&hash) {
            return Ok(Some(hit));
        }
        let Some(hub) = &self.hub else {
            return Ok(None);
        };
        let _lock = self.local.lock(&hash)?;
        if let Ok(Some(hit)) = self.local.lookup(&hash) {
            return Ok(Some(hit));
        }
        let staging = self.local.stage(&hash)?;
        match hub.fetch_module(self.local.layout(), &hash, staging.path()) {
            Ok(true) => {
                let module = self.local.commit(staging, Source::Hub)?;
                self.local.write_registry(entry)?;
                Ok(Some(module))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                warn!("Hub cache unusable: {e}");
                Ok(None)
            }
        }
    }

    /// Serves `entry`: a verified local module, else a verified Hub download, else `compile`
    /// into a fresh folder. Hub failures fall back to compiling; upload failures only warn.
    pub fn get_or_compile<F, E>(&self, entry: &CacheEntry, compile: F) -> Result<CachedModule>
    where
        F: FnOnce(&Path) -> std::result::Result<(), E>,
        E: std::fmt::Display,
    {
        self.local.layout().validate(Some(entry))?;
        let hash = entry.hash();
        let layout = self.local.layout().clone();
        let module = self.local.get_or_fill(&hash, |staging| {
            if let Some(hub) = &self.hub {
                match hub.fetch_module(&layout, &hash, staging) {
                    Ok(true) => return Ok(Source::Hub),
                    Ok(false) => info!(hash, repo = hub.repo_id(), "not in the Hub cache"),
                    Err(e) => warn!("Hub cache unusable, compiling instead: {e}"),
                }
                clear_dir(staging)?;
            }
            compile(staging).map_err(|e| CompileCacheError::CompileFailed {
                hash: hash.clone(),
                message: e.to_string(),
            })?;
            Ok(Source::Compiled)
        })?;
        if module.source != Source::Local {
            self.local.write_registry(entry)?;
        }
        if module.source == Source::Compiled
            && self.push
            && let Some(hub) = &self.hub
            && let Err(e) = hub.push_module(&self.local, &module, Some(entry))
        {
            warn!("not uploaded to {}: {e}", hub.repo_id());
        }
        Ok(module)
    }
}

fn clear_dir(dir: &Path) -> Result<()> {
    for item in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let path = item.path();
        let res = if item.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        res.map_err(io_err(&path))?;
    }
    Ok(())
}

/// Compiles once per configuration with the default cache ([`CompileCache::from_env`]):
/// `compile` writes its artifacts into the folder it is given; the verified module is returned.
pub fn with_compile_cache<F, E>(entry: &CacheEntry, compile: F) -> Result<CachedModule>
where
    F: FnOnce(&Path) -> std::result::Result<(), E>,
    E: std::fmt::Display,
{
    CompileCache::from_env(CacheLayout::for_entry(entry))?.get_or_compile(entry, compile)
}
