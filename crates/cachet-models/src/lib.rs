//! Reference models that cachet's caches and quantizers plug into.
//!
//! [`llama`] is a decoder-only transformer that loads Hugging Face checkpoints of
//! `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` (config.json + safetensors)
//! and matches transformers' logits. Its attention takes an optional [`Cache`] from `cachet-kv`. [`generate()`] decodes (greedy, sampling, beam search); [`embedded`] ships a tiny
//! checkpoint (with a tokenizer) for offline demos; [`perplexity()`] scores a text with
//! transformers' sliding-window recipe.

mod config_file;
pub mod dit;
pub mod embedded;
pub mod error;
pub mod generate;
pub mod linear;
pub mod llama;
pub mod perplexity;

pub use cachet_kv::{Cache, MaskLayout};
pub use error::{ModelError, Result};
pub use generate::{
    Generation, GenerationConfig, GenerationOutput, GreedyOptions, StepTokens, generate,
    generate_streaming, greedy,
};
pub use linear::{
    DenseFactory, FastDenseFactory, HostDense, LinearFactory, LinearLayer, LinearOp, LinearSpec,
    burn_linear,
};
pub use llama::{Llama, LlamaConfig, ModelFamily};
pub use perplexity::{PerplexityConfig, PerplexityReport, perplexity};
