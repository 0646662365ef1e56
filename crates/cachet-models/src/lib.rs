//! Language models that cachet's caches and quantizers plug into.
//!
//! [`Llama`] is a decoder-only transformer that loads Hugging Face checkpoints of
//! `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` (config.json + safetensors,
//! through [`Pretrained`](cachet_nn::Pretrained)) or GGUF files, and matches transformers'
//! logits. Its attention takes any [`Cache`](cachet_kv::Cache) from `cachet-kv`. [`generate()`]
//! decodes (greedy, sampling, beam search); [`embedded`] ships a tiny checkpoint (with a
//! tokenizer) for offline demos; [`perplexity()`] scores a text with transformers'
//! sliding-window recipe.

pub mod embedded;
mod generate;
mod llama;
mod perplexity;

pub use generate::{
    EarlyStopping, Generation, GenerationConfig, GenerationOutput, GreedyOptions, NeverTag,
    StepTokens, default_cache, generate, generate_streaming, greedy,
};
pub use llama::{
    Llama, LlamaConfig, ModelFamily, Rope, RopeParameters, TokenIds, gguf_checkpoint, gguf_config,
    hf_tensor_name, inverse_frequencies,
};
pub use perplexity::{PerplexityConfig, PerplexityReport, perplexity};
