//! The error type every cachet model returns: loading (config, weights) and running.

use std::path::PathBuf;

use cachet_tensor::TensorError;
use cachet_tensor::gguf::GgufError;
use cachet_tensor::safetensors::SafetensorsError;

/// Result alias of the model crates.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What can go wrong loading or running a model; every variant names the file, tensor or input.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// config.json could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// config.json is not valid for this model.
    #[error("invalid config {origin}: {reason}")]
    Config {
        /// Where the config came from.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint lacks a weight the model needs.
    #[error("checkpoint has no tensor {name:?} (needed by {module})")]
    MissingWeight {
        /// Tensor name.
        name: String,
        /// Module that needs it.
        module: String,
    },
    /// A weight has the wrong shape for the config.
    #[error("tensor {name:?} has shape {actual:?}, but the config implies {expected:?}")]
    WeightShape {
        /// Tensor name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the checkpoint.
        actual: Vec<usize>,
    },
    /// The inputs of a forward call are inconsistent.
    #[error("invalid input: {0}")]
    Input(String),
    /// The KV cache refused an update (full, wrong shape, bad position...); the source is the
    /// cache crate's own typed error.
    #[error("kv cache: {0}")]
    Cache(Box<dyn std::error::Error + Send + Sync>),
    /// A tensor-layer error (device, dtype).
    #[error(transparent)]
    Tensor(Box<TensorError>),
    /// A safetensors error.
    #[error(transparent)]
    Safetensors(Box<SafetensorsError>),
    /// A GGUF file could not be read or dequantized.
    #[error(transparent)]
    Gguf(Box<GgufError>),
    /// A custom linear layer (a quantized `LinearOp` built by a `LinearFactory`) failed to load
    /// or run; the source is the layer crate's own typed error.
    #[error("layer: {0}")]
    Layer(Box<dyn std::error::Error + Send + Sync>),
    /// A forward hook (a diffusion cache) failed; the source says which and why.
    #[error("hook: {0}")]
    Hook(Box<dyn std::error::Error + Send + Sync>),
}

// The wrapped errors are boxed so `Result<_, ModelError>` stays small on every hot path.
impl ModelError {
    /// Wraps a KV cache's error (the cache crate sits beside the model crates, not below them).
    pub fn cache(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Cache(Box::new(err))
    }
}

impl From<TensorError> for ModelError {
    fn from(err: TensorError) -> Self {
        Self::Tensor(Box::new(err))
    }
}

impl From<SafetensorsError> for ModelError {
    fn from(err: SafetensorsError) -> Self {
        Self::Safetensors(Box::new(err))
    }
}

impl From<GgufError> for ModelError {
    fn from(err: GgufError) -> Self {
        Self::Gguf(Box::new(err))
    }
}
