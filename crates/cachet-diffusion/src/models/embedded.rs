//! The embedded default DiT: a tiny Flux MMDiT made with diffusers, shipped inside the crate so
//! `cachet denoise` and the examples run offline, without a download or a GPU.

use burn::tensor::Device;
use cachet_nn::{Pretrained, Result};
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;

use super::{FluxConfig, FluxTransformer};

const FLUX_CONFIG: &str = include_str!("../../assets/tiny-flux/config.json");
const FLUX_WEIGHTS: &[u8] =
    include_bytes!("../../assets/tiny-flux/diffusion_pytorch_model.safetensors");

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
