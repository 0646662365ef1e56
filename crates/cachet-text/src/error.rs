//! Typed errors naming the file (or GGUF key) and the problem.

use std::path::PathBuf;

/// What went wrong loading or using a tokenizer or chat template.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tokenizer could not be built from its description.
    #[error("{origin}: not a usable tokenizer: {reason}")]
    Tokenizer {
        /// The file (or GGUF file) it came from.
        origin: String,
        /// Why.
        reason: String,
    },
    /// A JSON file (tokenizer_config.json, a messages file) is malformed.
    #[error("{origin}: {reason}")]
    Json {
        /// The file.
        origin: String,
        /// Why.
        reason: String,
    },
    /// Encoding or decoding failed.
    #[error("{origin}: {op} failed: {reason}")]
    Codec {
        /// The tokenizer's origin.
        origin: String,
        /// `encode` or `decode`.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// A chat template does not parse.
    #[error("chat template from {origin} does not parse: {reason}")]
    TemplateSyntax {
        /// Where the template came from.
        origin: String,
        /// minijinja's message.
        reason: String,
    },
    /// A chat template failed while rendering (including its own `raise_exception`).
    #[error("chat template from {origin} failed to render: {reason}")]
    TemplateRender {
        /// Where the template came from.
        origin: String,
        /// minijinja's message.
        reason: String,
    },
    /// A model has no chat template but one was needed.
    #[error("{origin} has no chat template (pass the prompt raw instead)")]
    NoChatTemplate {
        /// The model folder or file.
        origin: String,
    },
    /// GGUF tokenizer metadata is missing or inconsistent.
    #[error("{origin}: tokenizer metadata: {reason}")]
    Gguf {
        /// The GGUF file.
        origin: String,
        /// Which key and what is wrong.
        reason: String,
    },
}

/// Result alias of this crate.
pub(crate) type Result<T, E = TextError> = std::result::Result<T, E>;

/// Reads a file, naming it in the error.
pub(crate) fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Renders an error with its whole source chain (minijinja and tokenizers nest theirs).
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
