//! The error type of cachet-tensor.

use crate::dtype::Precision;
use crate::safetensors::SafetensorsError;

/// Result alias used across cachet-tensor.
pub(crate) type Result<T, E = TensorError> = std::result::Result<T, E>;

/// Everything that can go wrong in the tensor layer; each variant names the offending input.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// A device string did not parse.
    #[error(
        "invalid device {spec:?}: {reason} (expected cpu, flex, wgpu, wgpu:N, wgpu:integrated:N, wgpu:virtual:N, wgpu:cpu or auto)"
    )]
    InvalidDevice {
        /// The string as given.
        spec: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The requested backend was not compiled into this binary.
    #[error(
        "backend {backend} is not compiled in: rebuild with the cargo feature `{backend}` of cachet-tensor (or the `cachet` crate)"
    )]
    BackendNotCompiled {
        /// Backend name (`flex`, `wgpu`).
        backend: &'static str,
    },
    /// A GPU adapter could not be initialised (none present, driver missing, ...).
    #[error("no usable {backend} adapter for {spec}: {reason}")]
    NoAdapter {
        /// Backend name.
        backend: &'static str,
        /// The device asked for.
        spec: String,
        /// The driver's own message.
        reason: String,
    },
    /// The device cannot compute in this dtype (e.g. bf16 on Vulkan llvmpipe).
    #[error("dtype {dtype} is not supported on {device}: use f32{alt}")]
    UnsupportedDType {
        /// The dtype asked for.
        dtype: Precision,
        /// The device, as burn prints it.
        device: String,
        /// A hint naming a supported half type, if any.
        alt: &'static str,
    },
    /// A dtype name did not parse.
    #[error(
        "unknown dtype {0:?} (expected f32, f16 or bf16, or their torch names float32, float16, bfloat16)"
    )]
    UnknownDType(String),
    /// A host/device transfer failed.
    #[error("transfer of {what} failed: {reason}")]
    Transfer {
        /// What was being moved.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// Reading or writing a safetensors checkpoint failed.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
}
