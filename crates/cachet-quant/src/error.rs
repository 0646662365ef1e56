//! Errors of cachet-quant; every variant names the tensor, file, module or option at fault.

use std::path::PathBuf;

use cachet_nn::ModelError;
use cachet_tensor::TensorError;
use cachet_tensor::safetensors::SafetensorsError;

/// Result alias of cachet-quant.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

/// What can go wrong quantizing, loading or saving.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A block size bnb does not accept.
    #[error("invalid blocksize {blocksize}: {reason}")]
    InvalidBlocksize {
        /// The block size given.
        blocksize: usize,
        /// What the valid ones are.
        reason: String,
    },
    /// A tensor whose dtype cannot be quantized (integers, booleans, 8-bit floats...).
    #[error(
        "tensor {tensor:?} has dtype {dtype}, which cannot be quantized (expected F32, F16, BF16 or F64)"
    )]
    UnsupportedDType {
        /// Tensor name.
        tensor: String,
        /// Its stored dtype.
        dtype: String,
    },
    /// NaN or infinity in a tensor to quantize.
    #[error("tensor {tensor:?} holds the non-finite value {value} at flat index {index}")]
    NonFinite {
        /// Tensor name.
        tensor: String,
        /// Flat index of the first bad value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// Quantization state parts that disagree (shapes, lengths, quant_state JSON).
    #[error("inconsistent quantization state of {tensor:?}: {reason}")]
    InconsistentState {
        /// Tensor (or module) name.
        tensor: String,
        /// What disagrees.
        reason: String,
    },
    /// An invalid quantization config (config.json or options).
    #[error("invalid quantization config ({origin}): {reason}")]
    Config {
        /// Where it came from.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// A device_map naming modules the model does not have, or placements that do not parse.
    #[error("invalid device_map: {reason}")]
    DeviceMap {
        /// What is wrong.
        reason: String,
    },
    /// The disk-offload folder cannot be used.
    #[error("offload folder {path} is not usable: {reason}")]
    OffloadFolder {
        /// The folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A `disk` layer's offloaded file no longer holds what was written at load (truncated,
    /// removed or overwritten since): the layer cannot run, and the forward returns this.
    #[error("disk-offloaded layer {module} cannot be read back from {}: {reason}", path.display())]
    OffloadedFile {
        /// The layer (module name).
        module: String,
        /// Its file in the offload folder.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file or directory operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An error of the model crate (config, missing weight, shapes).
    #[error(transparent)]
    Model(Box<ModelError>),
    /// A tensor-layer error.
    #[error(transparent)]
    Tensor(Box<TensorError>),
    /// A safetensors error.
    #[error(transparent)]
    Safetensors(Box<SafetensorsError>),
}

impl From<ModelError> for QuantError {
    /// A quantization error that travelled through the model as [`ModelError::Layer`] comes
    /// back as itself; anything else is a model error.
    fn from(err: ModelError) -> Self {
        match err {
            ModelError::Layer(inner) => match inner.downcast::<QuantError>() {
                Ok(own) => *own,
                Err(other) => Self::Model(Box::new(ModelError::Layer(other))),
            },
            other => Self::Model(Box::new(other)),
        }
    }
}

impl From<TensorError> for QuantError {
    fn from(err: TensorError) -> Self {
        Self::Tensor(Box::new(err))
    }
}

impl From<SafetensorsError> for QuantError {
    fn from(err: SafetensorsError) -> Self {
        Self::Safetensors(Box::new(err))
    }
}

impl From<QuantError> for ModelError {
    fn from(err: QuantError) -> Self {
        match err {
            QuantError::Model(e) => *e,
            other => ModelError::Layer(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_errors_travel_through_the_model_typed() {
        let original = QuantError::InvalidBlocksize {
            blocksize: 7,
            reason: "not a power of two".into(),
        };
        let text = original.to_string();
        let through: ModelError = original.into();
        assert!(matches!(through, ModelError::Layer(_)), "{through:?}");
        assert!(through.to_string().contains(&text));
        let back = QuantError::from(through);
        assert!(
            matches!(back, QuantError::InvalidBlocksize { blocksize: 7, .. }),
            "{back:?}"
        );
        let model = QuantError::from(ModelError::Input("bad".into()));
        assert!(matches!(model, QuantError::Model(_)));
    }
}
