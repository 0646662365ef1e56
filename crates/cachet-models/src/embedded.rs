//! The embedded default models: a tiny Llama checkpoint made with transformers and a tiny Flux
//! MMDiT made with diffusers, shipped inside the crate so the demos run offline, without a
//! download or a GPU.

use burn::tensor::Device;
use cachet_tensor::{Checkpoint, Precision};

use crate::dit::flux::{FluxConfig, FluxTransformer};
use crate::error::Result;
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
    let checkpoint = Checkpoint::from_bytes(NAME, WEIGHTS)?;
    Llama::load(config()?, &checkpoint, device, precision)
}

const FLUX_CONFIG: &str = include_str!("../assets/tiny-flux/config.json");
const FLUX_WEIGHTS: &[u8] =
    include_bytes!("../assets/tiny-flux/diffusion_pytorch_model.safetensors");

/// Name under which the embedded Flux model is reported.
pub const FLUX_NAME: &str = "embedded:tiny-flux";

/// The embedded Flux model's config: 4 double + 8 single blocks, width 48, 64 input channels
/// (16 latent channels packed 2x2, like FluxPipeline), no guidance embedding.
pub fn flux_config() -> Result<FluxConfig> {
    FluxConfig::from_json(FLUX_CONFIG, FLUX_NAME)
}

/// Loads the embedded tiny Flux MMDiT (random weights, stored in bf16) onto `device`.
pub fn tiny_flux(device: &Device, precision: Precision) -> Result<FluxTransformer> {
    let checkpoint = Checkpoint::from_bytes(FLUX_NAME, FLUX_WEIGHTS)?;
    FluxTransformer::load(flux_config()?, &checkpoint, device, precision)
}
