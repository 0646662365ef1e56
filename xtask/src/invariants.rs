//! `cargo xtask invariants`: the architecture invariants of ARCHITECTURE.md, checked.
//!
//! Two kinds of checks, both cheap enough for every CI run:
//! - the crate graph (`cargo metadata`): each library crate depends only on the cachet crates
//!   its floor allows, so a seam cannot quietly turn into a dependency on an implementation;
//! - source rules: the model crate names no specific cache method or quantizer, the quantizer
//!   names no model, the binary defines no model, and no source file grows past
//!   [`MAX_CODE_LINES`] lines of non-test code without saying why at its top.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Non-test lines a source file may have before it must give a reason at its top.
const MAX_CODE_LINES: usize = 800;

/// The marker a long file's module docs carry, followed by the reason.
const LONG_FILE_MARKER: &str = "Long file:";

/// The cachet crates each library crate may depend on (normal dependencies only; tests,
/// examples and benches may use anything). A crate missing here is an error: a new crate
/// takes its place on the map first.
const ALLOWED: &[(&str, &[&str])] = &[
    ("cachet-tensor", &[]),
    ("cachet-plot", &[]),
    ("cachet-pyjson", &[]),
    ("cachet-compile", &["cachet-pyjson"]),
    ("cachet-text", &["cachet-tensor"]),
    ("cachet-kv", &["cachet-tensor"]),
    ("cachet-nn", &["cachet-tensor"]),
    (
        "cachet-models",
        &["cachet-tensor", "cachet-nn", "cachet-kv"],
    ),
    (
        "cachet-quant",
        &["cachet-tensor", "cachet-nn", "cachet-pyjson"],
    ),
    (
        "cachet-diffusion",
        &["cachet-tensor", "cachet-nn", "cachet-plot"],
    ),
    (
        "cachet",
        &[
            "cachet-tensor",
            "cachet-plot",
            "cachet-pyjson",
            "cachet-compile",
            "cachet-text",
            "cachet-kv",
            "cachet-nn",
            "cachet-models",
            "cachet-quant",
            "cachet-diffusion",
        ],
    ),
];

/// Words a crate's library source must not contain, with the invariant each one guards.
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "crates/cachet-models/src",
        &[
            "SinkCache",
            "sink::",
            "QuantizedKv",
            "QuantizedCache",
            "StaticCache",
            "SlidingWindowCache",
            "OffloadedCache",
            "cachet_quant",
            "cachet_diffusion",
        ],
        "models know no cache method or quantizer (they see the Cache trait and its views)",
    ),
    (
        "crates/cachet-kv/src",
        &["cachet_models", "Llama", "cachet_nn"],
        "cachet-kv knows no model",
    ),
    (
        "crates/cachet-quant/src",
        &[
            "cachet_models",
            "Llama",
            "self_attn",
            "q_proj",
            "embed_tokens",
        ],
        "quantizers learn module names from the model (QuantizableModel), never spell them",
    ),
    (
        "crates/cachet/src",
        &[
            "derive(Module)",
            "impl Pretrained",
            "impl LinearOp",
            "impl Cache for",
        ],
        "the binary holds no model logic",
    ),
];

/// Runs every check and lists every violation before failing.
pub fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    problems.extend(crate_graph(root)?);
    for (dir, words, why) in FORBIDDEN {
        for file in rust_files(&root.join(dir))? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let code = non_test_code(&text);
            for word in *words {
                if let Some(line) = code
                    .lines()
                    .position(|l| !is_comment(l) && l.contains(word))
                {
                    problems.push(format!(
                        "{}:{}: `{word}` breaks \"{why}\"",
                        rel(root, &file),
                        line + 1
                    ));
                }
            }
        }
    }
    for file in rust_files(&root.join("crates"))? {
        if !file.components().any(|c| c.as_os_str() == "src") {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let lines = non_test_code(&text).lines().count();
        let top: String = text.lines().take(12).collect::<Vec<_>>().join("\n");
        if lines > MAX_CODE_LINES && !top.contains(LONG_FILE_MARKER) {
            problems.push(format!(
                "{}: {lines} lines of non-test code (over {MAX_CODE_LINES}): split it by job, or \
                 say why it is one file in its module docs (`//! {LONG_FILE_MARKER} …`)",
                rel(root, &file)
            ));
        }
    }
    if problems.is_empty() {
        println!("invariants: crate graph and source rules hold");
        Ok(())
    } else {
        for p in &problems {
            eprintln!("invariant broken: {p}");
        }
        bail!("{} architecture invariant(s) broken", problems.len())
    }
}

/// The crate graph against [`ALLOWED`].
fn crate_graph(root: &Path) -> Result<Vec<String>> {
    let meta = crate::cargo_metadata(root)?;
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(name, deps)| (*name, deps.iter().copied().collect()))
        .collect();
    let mut problems = Vec::new();
    for package in crate::json_items(&meta["packages"]) {
        let name = package["name"].as_str().unwrap_or_default();
        let manifest = package["manifest_path"].as_str().unwrap_or_default();
        if !manifest.contains("/crates/") {
            continue; // xtask, the integration tests and the benches may use anything
        }
        let Some(may) = allowed.get(name) else {
            problems.push(format!(
                "crate {name} is not on the map: add it to ARCHITECTURE.md and to ALLOWED in \
                 xtask/src/invariants.rs"
            ));
            continue;
        };
        for dep in crate::json_items(&package["dependencies"]) {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            let normal = dep["kind"].is_null();
            if normal && dep_name.starts_with("cachet") && !may.contains(dep_name) {
                problems.push(format!(
                    "{name} depends on {dep_name}; it may depend only on {may:?} among cachet crates"
                ));
            }
        }
    }
    Ok(problems)
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The text before the file's first `#[cfg(test)]` (unit tests sit at the end by convention).
fn non_test_code(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |i| &text[..i])
}

fn is_comment(line: &str) -> bool {
    let l = line.trim_start();
    l.starts_with("//")
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_test_code_stops_at_the_test_module() {
        assert_eq!(non_test_code("a\nb\n#[cfg(test)]\nmod t {}"), "a\nb\n");
        assert_eq!(non_test_code("a\n"), "a\n");
    }

    #[test]
    fn every_allowed_dependency_is_itself_on_the_map() {
        let names: BTreeSet<&str> = ALLOWED.iter().map(|(n, _)| *n).collect();
        for (_, deps) in ALLOWED {
            for d in *deps {
                assert!(names.contains(d), "{d}");
            }
        }
    }
}
