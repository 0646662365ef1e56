//! Llama-family decoder: Llama, Mistral (sliding window) and Qwen2 (q/k/v bias).

pub mod config;
pub mod gguf;
mod model;
pub mod rope;

pub use config::{LlamaConfig, ModelFamily, Rope, RopeParameters, TokenIds};
pub use model::{
    Attention, DecoderLayer, Llama, Mlp, RmsNorm, TokenEmbedding, default_position_ids,
};
