//! The neural-network pieces and seams that cachet's model crates share.
//!
//! Language models (`cachet-models`), diffusion transformers (`cachet-diffusion`) and
//! quantizers (`cachet-quant`) depend on this crate instead of on each other:
//! - the loading seam [`Pretrained`] (`load_with` once per model; `load` and `from_pretrained`
//!   written once for all);
//! - the linear-layer seam: every projection is a [`LinearLayer`], dense or any [`LinearOp`]
//!   (a quantized layer); a [`LinearFactory`] decides per named layer what a loader builds;
//! - [`Loader`]: named weights with shape checks and typed errors;
//! - [`RmsNorm`], [`ModelError`], config parsing with the failing field named ([`config`]),
//!   and a seedable RNG ([`SplitMix64`]).

pub mod config;
mod error;
mod linear;
mod norm;
mod pretrained;
mod quantizable;
mod rng;

pub use error::{ModelError, Result};
pub use linear::{
    DenseFactory, FastDenseFactory, HostDense, LinearFactory, LinearLayer, LinearOp, LinearSpec,
    Loader, burn_linear, matrix_from_data, round_slice, tensor_to_host,
};
pub use norm::RmsNorm;
pub use pretrained::Pretrained;
pub use quantizable::{QuantizableModel, module_prefixes};
pub use rng::SplitMix64;
