//! `wrap`: the cache for any external compiler, without code changes.
//!
//! The entry is the command line (each argument as its SHA-256, so shared entries carry no
//! secrets), the compiler binary's checksum (or a given version), the checksums of every
//! argument that names an existing file plus declared inputs, and selected environment variables
//! (their values hashed too). On a miss the command runs and its declared outputs are stored; on a
//! hit the outputs are restored and the command does not run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value, json};
use tracing::info;

use sha2::{Digest, Sha256};

use crate::cache::CompileCache;
use crate::entry::{CacheEntry, EntryBuilder, hex};
use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::CacheLayout;
use crate::local::{CachedModule, Source, sha256_file};

/// A compiler invocation to cache.
#[derive(Debug, Clone, Default)]
pub struct WrapCommand {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Files or folders the command writes (restored on a hit).
    pub outputs: Vec<PathBuf>,
    /// Extra input files hashed besides arguments that name files.
    pub inputs: Vec<PathBuf>,
    /// Environment variables whose values are part of the key.
    pub env: Vec<String>,
    /// Compiler version; `None` uses a checksum of the compiler binary.
    pub compiler_version: Option<String>,
}

/// What `wrap` did.
#[derive(Debug, Clone)]
pub struct WrapOutcome {
    /// The entry (its hash names the module).
    pub entry: CacheEntry,
    /// The module served.
    pub module: CachedModule,
}

fn find_program(program: &str) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|c| c.is_file())
}

impl WrapCommand {
    /// The compiler's short name (file name of the program).
    pub fn compiler(&self) -> Result<String> {
        let program = self
            .argv
            .first()
            .ok_or_else(|| CompileCacheError::InvalidCommand("empty command".into()))?;
        let name = Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.is_empty() || name.contains('/') {
            return Err(CompileCacheError::InvalidCommand(format!(
                "no program name in {program:?}"
            )));
        }
        Ok(name)
    }

    /// The compiler version: given, else `sha256-<16 hex>` of the binary found on `PATH`.
    pub fn version(&self) -> Result<String> {
        if let Some(v) = &self.compiler_version {
            return Ok(v.clone());
        }
        let program = &self.argv[0];
        let path = find_program(program).ok_or_else(|| {
            CompileCacheError::InvalidCommand(format!("{program} not found on PATH"))
        })?;
        Ok(format!("sha256-{}", &sha256_file(&path)?[..16]))
    }

    /// The layout: `<compiler>-<version>`.
    pub fn layout(&self) -> Result<CacheLayout> {
        Ok(CacheLayout::new(self.compiler()?, self.version()?))
    }

    /// The cache entry keyed on everything that affects the outputs.
    pub fn entry(&self) -> Result<CacheEntry> {
        let compiler = self.compiler()?;
        let version = self.version()?;
        let mut files = Map::new();
        let candidates = self.argv[1..]
            .iter()
            .flat_map(|a| [a.as_str(), a.split_once('=').map_or("", |(_, v)| v)])
            .map(PathBuf::from)
            .chain(self.inputs.iter().cloned());
        for path in candidates {
            if path.as_os_str().is_empty() || self.outputs.contains(&path) {
                continue;
            }
            if path.is_file() {
                files.insert(path.display().to_string(), sha256_file(&path)?.into());
            }
        }
        for input in &self.inputs {
            if !input.is_file() {
                return Err(CompileCacheError::InvalidCommand(format!(
                    "declared input {} is not a file",
                    input.display()
                )));
            }
        }
        // Registry entries are shared (a Hub cache uploads them): argument and environment
        // values enter the key as hashes, never verbatim, so a token on a command line or in
        // an environment variable does not leave the machine.
        let digest =
            |v: &str| Value::String(format!("sha256:{}", hex(&Sha256::digest(v.as_bytes()))));
        let env: Map<String, Value> = self
            .env
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    std::env::var(k).map_or(Value::Null, |v| digest(&v)),
                )
            })
            .collect();
        let args: Vec<Value> = self.argv[1..].iter().map(|a| digest(a)).collect();
        let outputs: Vec<String> = self
            .outputs
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let config = json!({
            "model_type": "command",
            "program": compiler,
            "args": args,
            "input_files": files,
            "outputs": outputs,
        });
        EntryBuilder::new(format!("local/{compiler}"), config)
            .task("compile")
            .compiler(&compiler, &version)
            .factor("env", env)
            .tool_version(env!("CARGO_PKG_VERSION"))
            .build()
    }

    /// Serves the outputs from `cache`, running the command on a miss.
    pub fn run(&self, cache: &CompileCache) -> Result<WrapOutcome> {
        if self.outputs.is_empty() {
            return Err(CompileCacheError::InvalidCommand(
                "declare at least one --output".into(),
            ));
        }
        let entry = self.entry()?;
        let hash = entry.hash();
        let module =
            cache.get_or_compile(&entry, |staging| -> std::result::Result<(), String> {
                info!(hash, "cache miss: running {:?}", self.argv);
                let status = Command::new(&self.argv[0])
                    .args(&self.argv[1..])
                    .status()
                    .map_err(|e| format!("cannot run {}: {e}", self.argv[0]))?;
                if !status.success() {
                    return Err(format!("{} exited with {status}", self.argv[0]));
                }
                for (i, out) in self.outputs.iter().enumerate() {
                    let dest = staging.join(format!("output{i}"));
                    copy_tree(out, &dest)
                        .map_err(|e| format!("declared output {} missing: {e}", out.display()))?;
                }
                Ok(())
            })?;
        if module.source != Source::Compiled {
            for (i, out) in self.outputs.iter().enumerate() {
                let src = module.dir.join(format!("output{i}"));
                if out.is_dir() {
                    fs::remove_dir_all(out).map_err(io_err(out))?;
                }
                copy_tree(&src, out)?;
            }
        }
        Ok(WrapOutcome { entry, module })
    }
}

/// Copies a file or a folder tree (symlinks refused).
pub(crate) fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(src).map_err(io_err(src))?;
    if meta.is_dir() {
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        for item in fs::read_dir(src).map_err(io_err(src))?.flatten() {
            copy_tree(&item.path(), &dest.join(item.file_name()))?;
        }
        Ok(())
    } else if meta.is_file() {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        // Copy to a temp name then rename, so a reader never sees a partial output.
        let tmp = dest.with_extension("cachet-partial");
        fs::copy(src, &tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, dest).map_err(io_err(dest))
    } else {
        Err(CompileCacheError::UnsafePath {
            path: src.display().to_string(),
            origin: "a wrapped command's output".into(),
            reason: "symlinks and special files are not cached",
        })
    }
}
