//! The embedded default model: a tiny Llama checkpoint made with transformers, shipped inside
//! the crate so the `cachet` demo runs offline, without a download or a GPU.

use burn::tensor::Device;
use cachet_tensor::{Checkpoint, Precision};

use crate::error::Result;
use crate::llama::{Llama, LlamaConfig};

const CONFIG: &str = include_str!("../assets/tiny-llama/config.json");
const WEIGHTS: &[u8] = include_bytes!("../assets/tiny-llama/model.safetensors");

/// Name under which the embedded model is reported.
pub const NAME: &str = "embedded:tiny-llama";

/// The embedded model's config.
pub fn config() -> Result<LlamaConfig> {
    LlamaConfig::from_json(CONFIG, NAME)
}

/// Loads the embedded tiny Llama onto `device`.
pub fn tiny_llama(device: &Device, precision: Precision) -> Result<Llama> {
    let checkpoint = Checkpoint::from_bytes(NAME, WEIGHTS)?;
    Llama::load(config()?, &checkpoint, device, precision)
}
