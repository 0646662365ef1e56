//! Flux.1 MMDiT: diffusers' `FluxTransformer2DModel` (double-stream then single-stream blocks,
//! multi-axis RoPE), loading diffusers checkpoints and matching diffusers 0.42.1's forward.

pub mod config;
mod model;
pub mod rope;

pub use config::FluxConfig;
pub use model::{
    AdaModulation, ContextProjections, DOUBLE_BLOCKS, FeedForward, FluxAttention, FluxInputs,
    FluxSingleTransformerBlock, FluxTransformer, FluxTransformerBlock, MlpEmbedder, SINGLE_BLOCKS,
    TimeTextEmbed, WEIGHTS_FILE, WEIGHTS_INDEX,
};
