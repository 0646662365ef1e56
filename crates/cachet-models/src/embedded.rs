//! The embedded default model: a tiny Llama checkpoint made with transformers, shipped inside
//! the crate so the demos run offline, without a download or a GPU.

use burn::tensor::Device;
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;

use cachet_nn::{Pretrained, Result};

use crate::llama::{Llama, LlamaConfig};

const CONFIG: &str = include_str!("../assets/tiny-llama/config.json");
const WEIGHTS: &[u8] = include_bytes!("../assets/tiny-llama/model.safetensors");

/// Name under which the embedded model is reported.
pub const NAME: &str = "embedded:tiny-llama";

/// The embedded model's `tokenizer.json`: a byte-level BPE of its 512 tokens, trained on the
/// committed public-domain text (its weights are random, so it prints arbitrary words).
pub const TOKENIZER_JSON: &str = include_str!("../assets/tiny-llama/tokenizer.json");

/// The embedded model's `tokenizer_config.json` (special tokens and a ChatML chat template).
pub const TOKENIZER_CONFIG_JSON: &str = include_str!("../assets/tiny-llama/tokenizer_config.json");

/// The embedded model's config.
pub fn config() -> Result<LlamaConfig> {
    LlamaConfig::from_json(CONFIG, NAME)
}

/// Loads the embedded tiny Llama onto `device`.
pub fn tiny_llama(device: &Device, precision: Precision) -> Result<Llama> {
    Llama::load(config()?, &checkpoint()?, device, precision)
}

/// The embedded weights as a checkpoint (read in place from the binary).
pub(crate) fn checkpoint() -> Result<Checkpoint> {
    Ok(Checkpoint::from_bytes(NAME, WEIGHTS)?)
}
