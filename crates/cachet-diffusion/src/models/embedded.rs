//! The embedded DiTs, shipped inside the crate so `cachet denoise` and the examples run offline,
//! without a download or a GPU: a small Flux trained on handwritten digits (the default of
//! `cachet denoise`, with its label table and digit classifier) and a tiny Flux with random
//! weights (the parity goldens' model).

use burn::tensor::Device;
use cachet_nn::{Pretrained, Result};
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;

use super::{FluxConfig, FluxTransformer};
use crate::digits::DigitsFlux;

const FLUX_CONFIG: &str = include_str!("../../assets/tiny-flux/config.json");
const FLUX_WEIGHTS: &[u8] =
    include_bytes!("../../assets/tiny-flux/diffusion_pytorch_model.safetensors");

const DIGITS_CONFIG: &str = include_str!("../../assets/digits-flux/config.json");
const DIGITS_WEIGHTS: &[u8] =
    include_bytes!("../../assets/digits-flux/diffusion_pytorch_model.safetensors");
const DIGITS_LABELS: &[u8] = include_bytes!("../../assets/digits-flux/labels.safetensors");
const DIGITS_CLASSIFIER: &[u8] = include_bytes!("../../assets/digits-flux/classifier.safetensors");
const DIGITS_SPEC: &str = include_str!("../../assets/digits-flux/digits.json");

/// Name under which the embedded random Flux model is reported.
pub const FLUX_NAME: &str = "embedded:tiny-flux";

/// Name under which the embedded digits model is reported.
pub const DIGITS_NAME: &str = "embedded:digits-flux";

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

/// The digits model's config: 6 double + 12 single blocks, width 64 (2 heads of 32), 16 input
/// channels (a 16x16 image folded 2x2 into 4 channels, packed 2x2), no guidance embedding.
pub fn digits_flux_config() -> Result<FluxConfig> {
    FluxConfig::from_json(DIGITS_CONFIG, DIGITS_NAME)
}

/// Loads the embedded digits model (a Flux trained with flow matching on scikit-learn's
/// handwritten digits, conditioned on the label; bf16 weights) with its label table and digit
/// classifier onto `device`.
pub fn digits_flux(device: &Device, precision: Precision) -> crate::Result<DigitsFlux> {
    let open = |label: &str, bytes: &'static [u8]| {
        Checkpoint::from_bytes(label, bytes).map_err(cachet_nn::ModelError::from)
    };
    let checkpoint = open(DIGITS_NAME, DIGITS_WEIGHTS)?;
    let model = FluxTransformer::load(digits_flux_config()?, &checkpoint, device, precision)?;
    let labels = open("embedded:digits-flux/labels", DIGITS_LABELS)?;
    let classifier = open("embedded:digits-flux/classifier", DIGITS_CLASSIFIER)?;
    DigitsFlux::new(model, &labels, &classifier, DIGITS_SPEC)
}
