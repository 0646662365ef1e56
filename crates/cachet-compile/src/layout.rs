//! Where things live in a cache, locally and on the Hub: optimum-neuron's layout.
//!
//! ```text
//! <compiler>-<version>/MODULE_<hash>/...                                   artifacts
//! <compiler>-<version>/0_REGISTRY/<tool version>/<arch digest>/<hash>.json  registry entry
//! <compiler>-<version>/0_REGISTRY/<tool version>/<model_type>/<org>/<name>/<hash>.json  alias
//! ```

use std::path::{Component, Path};

use crate::entry::CacheEntry;
use crate::error::{CompileCacheError, Result};

/// Name of the folder holding registry entries inside a compiler folder.
pub(crate) const REGISTRY_FOLDER: &str = "0_REGISTRY";
/// Prefix of artifact folders.
pub(crate) const MODULE_PREFIX: &str = "MODULE_";

/// A compiler and tool version: the first two levels of every cache path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheLayout {
    /// Compiler name, e.g. `neuronxcc`, `nvcc`, `cubecl`.
    pub compiler: String,
    /// Compiler version, e.g. `2.19.8089.0+8ab9f450`.
    pub compiler_version: String,
    /// Version of the tool that writes registry entries (optimum-neuron's `__version__`).
    pub tool_version: String,
}

impl CacheLayout {
    /// A layout for `compiler` at `version`, registry entries tagged with cachet-compile's version.
    pub fn new(compiler: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            compiler: compiler.into(),
            compiler_version: version.into(),
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// The layout optimum-neuron 0.4.5 writes for `neuronxcc` at `version`.
    pub fn neuron(neuronxcc_version: impl Into<String>) -> Self {
        Self::new("neuronxcc", neuronxcc_version).with_tool_version("0.4.5")
    }

    /// The layout from an entry's `compiler_type` / `compiler_version` factors.
    pub fn for_entry(entry: &CacheEntry) -> Self {
        let factor = |key: &str| {
            entry
                .compile_config()
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or("unknown")
                .to_owned()
        };
        Self::new(factor("compiler_type"), factor("compiler_version"))
    }

    /// Replaces the registry's tool version.
    pub fn with_tool_version(mut self, version: impl Into<String>) -> Self {
        self.tool_version = version.into();
        self
    }

    /// `<compiler>-<version>`, checked to be one safe path component.
    pub fn compiler_dir(&self) -> String {
        format!("{}-{}", self.compiler, self.compiler_version)
    }

    /// `<compiler>-<version>/MODULE_<hash>`.
    pub fn module_dir(&self, hash: &str) -> String {
        format!("{}/{MODULE_PREFIX}{hash}", self.compiler_dir())
    }

    /// `<compiler>-<version>/0_REGISTRY/<tool version>`.
    pub fn registry_dir(&self) -> String {
        format!(
            "{}/{REGISTRY_FOLDER}/{}",
            self.compiler_dir(),
            self.tool_version
        )
    }

    /// `…/0_REGISTRY/<tool version>/<arch digest>/<hash>.json`.
    pub fn registry_path(&self, entry: &CacheEntry) -> String {
        format!(
            "{}/{}/{}.json",
            self.registry_dir(),
            entry.arch_digest(),
            entry.hash()
        )
    }

    /// `…/0_REGISTRY/<tool version>/<model_type>/<model id>/<hash>.json`.
    pub fn alias_path(&self, entry: &CacheEntry) -> String {
        format!(
            "{}/{}/{}/{}.json",
            self.registry_dir(),
            entry.model_type(),
            entry.model_id(),
            entry.hash()
        )
    }

    /// Checks that the layout and an entry make only safe relative paths.
    pub fn validate(&self, entry: Option<&CacheEntry>) -> Result<()> {
        let origin = "the cache layout";
        safe_relative(&self.compiler_dir(), origin)?;
        if self.compiler_dir().contains('/') {
            return Err(CompileCacheError::UnsafePath {
                path: self.compiler_dir(),
                origin: origin.into(),
                reason: "compiler name and version must not contain '/'",
            });
        }
        safe_relative(&self.registry_dir(), origin)?;
        if let Some(entry) = entry {
            safe_relative(&self.alias_path(entry), "the entry's model id / model type")?;
        }
        Ok(())
    }
}

/// Rejects paths that could leave a directory they are joined to: absolute paths, `..`,
/// empty or `.` components, backslashes and NUL bytes.
pub(crate) fn safe_relative(path: &str, origin: &str) -> Result<()> {
    let fail = |reason| {
        Err(CompileCacheError::UnsafePath {
            path: path.to_owned(),
            origin: origin.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return fail("empty path");
    }
    if path.contains('\0') || path.contains('\\') {
        return fail("NUL or backslash in path");
    }
    if path.starts_with('/') {
        return fail("absolute path");
    }
    for part in path.split('/') {
        match part {
            "" | "." => return fail("empty or '.' component"),
            ".." => return fail("'..' component"),
            _ => {}
        }
    }
    for component in Path::new(path).components() {
        if !matches!(component, Component::Normal(_)) {
            return fail("non-normal path component");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes() {
        for bad in [
            "../x",
            "a/../../b",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "",
            "a\\..\\b",
        ] {
            assert!(safe_relative(bad, "test").is_err(), "{bad}");
        }
        safe_relative("neuronxcc-2.0/MODULE_abc/model.neff", "test").unwrap();
    }
}
