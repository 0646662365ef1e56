//! `wrap`: the cache for any external compiler, without code changes.
//!
//! The entry is the command line (each argument as its SHA-256, so shared entries carry no
//! secrets), the compiler binary's checksum (or a given version), the checksums of every
//! argument that names an existing file plus declared inputs, and selected environment variables
//! (their values hashed too). On a miss the command runs and its declared outputs are stored; on a
//! hit the outputs are restored and the command does not run.
//!
//! Files a compiler reads without naming them on the command line (`#include`d headers) come
//! from its own dependency output: when the command writes a Make-syntax depfile (`-MD`/`-MF`,
//! or `--depfile`), the result is keyed on the contents of every file the depfile lists, and
//! the list is remembered per command line ([`deps`], ccache's manifest), so the next lookup
//! hashes those files again: an edited header is a miss, never a stale hit. The depfile is
//! restored with the outputs.

mod depfile;
mod deps;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde_json::{Map, Value, json};
use tracing::{info, warn};

use sha2::{Digest, Sha256};

use crate::cache::CompileCache;
use crate::entry::{CacheEntry, EntryBuilder, hex};
use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::CacheLayout;
use crate::local::{CachedModule, Source, sha256_file};

use deps::DependencyManifest;

/// Name of the stored depfile inside a module.
const DEPFILE: &str = "depfile";

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
    /// The Make-syntax depfile the command writes; `None` finds it in gcc-style arguments
    /// (`-MD`/`-MMD` with `-MF FILE` or `-o OBJ`, `-Wp,-MD,FILE`).
    pub depfile: Option<PathBuf>,
}

/// What `wrap` did.
#[derive(Debug, Clone)]
pub struct WrapOutcome {
    /// The entry (its hash names the module).
    pub entry: CacheEntry,
    /// Where the outputs came from.
    pub source: Source,
    /// The module served or stored; `None` when a fresh result could not be cached (a
    /// dependency changed while the command ran).
    pub module: Option<CachedModule>,
    /// The files the depfile listed, which keyed the result (empty without a depfile).
    pub dependencies: Vec<String>,
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

    /// The cache entry keyed on everything on the command line that affects the outputs. With a
    /// depfile this is the base key its dependency sets are remembered under; the result itself
    /// is keyed by [`WrapCommand::entry_with_dependencies`].
    pub fn entry(&self) -> Result<CacheEntry> {
        self.build_entry(None)
    }

    /// The entry of a result that read `dependencies` (file name to SHA-256, `None` if absent)
    /// besides what the command line names.
    pub fn entry_with_dependencies(
        &self,
        dependencies: &std::collections::BTreeMap<String, Option<String>>,
    ) -> Result<CacheEntry> {
        let deps: Map<String, Value> = dependencies
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().map_or(Value::Null, Value::String)))
            .collect();
        self.build_entry(Some(deps))
    }

    /// The depfile this command writes, given or found in its arguments.
    pub fn depfile(&self) -> Option<PathBuf> {
        self.depfile
            .clone()
            .or_else(|| depfile::detect(self.argv.get(1..).unwrap_or_default()))
    }

    fn build_entry(&self, dependencies: Option<Map<String, Value>>) -> Result<CacheEntry> {
        let compiler = self.compiler()?;
        let version = self.version()?;
        let mut files = Map::new();
        let candidates = self.argv[1..]
            .iter()
            .flat_map(|a| [a.as_str(), a.split_once('=').map_or("", |(_, v)| v)])
            .map(PathBuf::from)
            .chain(self.inputs.iter().cloned());
        // The depfile is an output too: it exists only after a first run.
        let depfile = self.depfile();
        for path in candidates {
            if path.as_os_str().is_empty()
                || self.outputs.contains(&path)
                || depfile.as_ref() == Some(&path)
            {
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
        let mut config = json!({
            "model_type": "command",
            "program": compiler,
            "args": args,
            "input_files": files,
            "outputs": outputs,
        });
        if let Some(dependencies) = dependencies {
            config["dependencies"] = Value::Object(dependencies);
        }
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
        if let Some(depfile) = self.depfile() {
            return self.run_with_depfile(cache, entry, &depfile);
        }
        let hash = entry.hash();
        let module = cache.get_or_compile(&entry, |staging| {
            self.execute(&hash)?;
            self.stage_outputs(staging, None)
        })?;
        if module.source != Source::Compiled {
            self.restore(&module, None)?;
        }
        Ok(WrapOutcome {
            entry,
            source: module.source,
            module: Some(module),
            dependencies: Vec::new(),
        })
    }

    /// The depfile path: look up each remembered dependency set with its files' contents now;
    /// on a miss run the command, key the result on what its depfile lists and remember the set.
    fn run_with_depfile(
        &self,
        cache: &CompileCache,
        base: CacheEntry,
        depfile: &Path,
    ) -> Result<WrapOutcome> {
        let base_hash = base.hash();
        let manifest_path = DependencyManifest::path(cache.local(), &base_hash);
        for set in DependencyManifest::load(&manifest_path).sets {
            let entry = self.entry_with_dependencies(&deps::digest_set(&set)?)?;
            if let Some(module) = cache.fetch(&entry)? {
                info!(
                    hash = entry.hash(),
                    "cache hit through the dependency manifest"
                );
                self.restore(&module, Some(depfile))?;
                return Ok(WrapOutcome {
                    entry,
                    source: module.source,
                    module: Some(module),
                    dependencies: set,
                });
            }
        }
        let start = SystemTime::now();
        self.execute(&base_hash)
            .map_err(|message| CompileCacheError::CompileFailed {
                hash: base_hash.clone(),
                message,
            })?;
        let text = fs::read_to_string(depfile).map_err(|e| {
            CompileCacheError::InvalidCommand(format!(
                "the command did not write its depfile {}: {e}",
                depfile.display()
            ))
        })?;
        let set: Vec<String> = depfile::parse(&text)
            .into_iter()
            .filter(|name| {
                let path = Path::new(name);
                path != depfile && !depfile::is_output(path, &self.outputs)
            })
            .collect();
        let changed = deps::changed_since(&set, start);
        let entry = self.entry_with_dependencies(&deps::digest_set(&set)?)?;
        if !changed.is_empty() {
            // The contents hashed now may not be those the compiler read: keying the outputs on
            // them could serve a stale result later. Leave the outputs, cache nothing.
            warn!(
                ?changed,
                "dependencies changed while the command ran: result not cached"
            );
            return Ok(WrapOutcome {
                entry,
                source: Source::Compiled,
                module: None,
                dependencies: set,
            });
        }
        let module =
            cache.get_or_compile(&entry, |staging| self.stage_outputs(staging, Some(depfile)))?;
        {
            let _lock = cache.local().lock(&base_hash)?;
            let mut manifest = DependencyManifest::load(&manifest_path);
            manifest.record(set.clone());
            manifest.save(&manifest_path)?;
        }
        Ok(WrapOutcome {
            entry,
            // The command ran, whether or not another process stored the same result first.
            source: Source::Compiled,
            module: Some(module),
            dependencies: set,
        })
    }

    /// Runs the command; a failure is its message.
    fn execute(&self, hash: &str) -> std::result::Result<(), String> {
        info!(hash, "cache miss: running {:?}", self.argv);
        let status = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .status()
            .map_err(|e| format!("cannot run {}: {e}", self.argv[0]))?;
        if !status.success() {
            return Err(format!("{} exited with {status}", self.argv[0]));
        }
        Ok(())
    }

    /// Copies the outputs (and the depfile) the command wrote into a module's staging folder.
    fn stage_outputs(
        &self,
        staging: &Path,
        depfile: Option<&Path>,
    ) -> std::result::Result<(), String> {
        for (i, out) in self.outputs.iter().enumerate() {
            let dest = staging.join(format!("output{i}"));
            copy_tree(out, &dest)
                .map_err(|e| format!("declared output {} missing: {e}", out.display()))?;
        }
        if let Some(depfile) = depfile {
            copy_tree(depfile, &staging.join(DEPFILE))
                .map_err(|e| format!("depfile {} missing: {e}", depfile.display()))?;
        }
        Ok(())
    }

    /// Puts a served module's outputs (and depfile) where the command would have written them.
    fn restore(&self, module: &CachedModule, depfile: Option<&Path>) -> Result<()> {
        for (i, out) in self.outputs.iter().enumerate() {
            let src = module.dir.join(format!("output{i}"));
            if out.is_dir() {
                fs::remove_dir_all(out).map_err(io_err(out))?;
            }
            copy_tree(&src, out)?;
        }
        if let Some(depfile) = depfile {
            copy_tree(&module.dir.join(DEPFILE), depfile)?;
        }
        Ok(())
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
