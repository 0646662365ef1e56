//! Flux.1 MMDiT: diffusers' `FluxTransformer2DModel` (double-stream then single-stream blocks,
//! multi-axis RoPE), loading diffusers checkpoints and matching diffusers 0.42.1's forward.

mod config;
mod load;
mod model;
mod random;
mod rope;

pub use config::FluxConfig;
pub use model::{FluxInputs, FluxTransformer};
pub(crate) use model::{WEIGHTS_FILE, WEIGHTS_INDEX};
