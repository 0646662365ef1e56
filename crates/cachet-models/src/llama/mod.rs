//! Llama-family decoder: Llama, Mistral (sliding window) and Qwen2 (q/k/v bias).

mod config;
mod context;
mod decode;
mod gguf;
mod model;
mod quantizable;
mod rope;

pub use config::{LlamaConfig, ModelFamily, Rope, RopeParameters, TokenIds};
pub use gguf::{gguf_checkpoint, gguf_config, hf_tensor_name};
pub use model::Llama;
pub use rope::inverse_frequencies;
