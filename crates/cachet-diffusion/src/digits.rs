//! A label-conditioned Flux that draws digits, with what judges its output: the model, its label
//! table ([`LabelEmbedding`]), a digit classifier ([`ImageClassifier`]) and the layout of its
//! latents (a 16x16 image folded 2x2 into 4 channels, then packed 2x2 as FluxPipeline packs).

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use cachet_nn::{Pretrained, SplitMix64};
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;
use serde::{Deserialize, Serialize};

use crate::classifier::ImageClassifier;
use crate::error::{DiffusionError, Result};
use crate::label::LabelEmbedding;
use crate::models::FluxTransformer;
use crate::pipeline::{FlowMatchEuler, FluxCond};
use crate::quality::GrayImage;

/// File names of a digits model folder, beside diffusers' `config.json` and weights.
pub const SPEC_FILE: &str = "digits.json";
/// The label tables.
pub const LABELS_FILE: &str = "labels.safetensors";
/// The classifier's weights.
pub const CLASSIFIER_FILE: &str = "classifier.safetensors";

/// `digits.json`: the model's layout and sampling defaults, and how its generator scored it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DigitsSpec {
    /// Labels drawn (0 to `num_labels - 1`).
    pub num_labels: usize,
    /// Row of the unconditional branch (`num_labels`).
    pub null_label: usize,
    /// Side of the square decoded image, in pixels.
    pub image_size: usize,
    /// Channels of the unpacked latent (the image folded 2x2).
    pub latent_channels: usize,
    /// Text tokens per label.
    pub text_tokens: usize,
    /// Default classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Default number of Euler steps.
    pub num_inference_steps: usize,
    /// The classifier's accuracy on real digits it was not trained on.
    pub classifier_heldout_accuracy: f64,
    /// The classifier's accuracy on the generator's own uncached samples.
    pub reference_sample_accuracy: f64,
}

/// A label-conditioned Flux with its label table, classifier and layout.
#[derive(Debug)]
pub struct DigitsFlux {
    /// The DiT.
    pub model: FluxTransformer,
    /// Label → conditioning.
    pub labels: LabelEmbedding,
    /// Scores decoded images.
    pub classifier: ImageClassifier,
    /// Layout and defaults.
    pub spec: DigitsSpec,
}

fn bad(reason: String) -> DiffusionError {
    DiffusionError::Config {
        what: "digits model",
        reason,
    }
}

impl DigitsFlux {
    /// Assembles the parts and checks that they fit each other.
    pub fn new(
        model: FluxTransformer,
        labels: &Checkpoint,
        classifier: &Checkpoint,
        spec_json: &str,
    ) -> Result<Self> {
        let spec: DigitsSpec =
            serde_json::from_str(spec_json).map_err(|e| bad(format!("{SPEC_FILE}: {e}")))?;
        let s = &spec;
        if s.image_size == 0 || !s.image_size.is_multiple_of(4) || s.image_size > 1 << 12 {
            return Err(bad(format!(
                "image_size {}: must be a positive multiple of 4 (folded 2x2, packed 2x2), at \
                 most 4096",
                s.image_size
            )));
        }
        if s.latent_channels != 4 || model.config.in_channels != 4 * s.latent_channels {
            return Err(bad(format!(
                "latent_channels {} with in_channels {}: a grayscale image folded 2x2 has 4 \
                 channels, packed 2x2 into 16",
                s.latent_channels, model.config.in_channels
            )));
        }
        if s.null_label != s.num_labels {
            return Err(bad(format!(
                "null_label {} must follow the labels (num_labels {})",
                s.null_label, s.num_labels
            )));
        }
        let labels = LabelEmbedding::from_checkpoint(labels, &model)?;
        if labels.labels() != s.num_labels || labels.tokens() != s.text_tokens {
            return Err(bad(format!(
                "the label table has {} labels of {} tokens, {SPEC_FILE} says {} of {}",
                labels.labels(),
                labels.tokens(),
                s.num_labels,
                s.text_tokens
            )));
        }
        let classifier = ImageClassifier::from_checkpoint(classifier, s.image_size, s.image_size)?;
        if classifier.classes() != s.num_labels {
            return Err(bad(format!(
                "the classifier has {} classes for {} labels",
                classifier.classes(),
                s.num_labels
            )));
        }
        Ok(Self {
            model,
            labels,
            classifier,
            spec,
        })
    }

    /// Loads a digits model folder: diffusers' files plus `digits.json`, `labels.safetensors`
    /// and `classifier.safetensors`.
    pub fn from_dir(dir: &Path, device: &Device, precision: Precision) -> Result<Self> {
        let model = FluxTransformer::from_pretrained(dir, device, precision)?;
        let spec_path = dir.join(SPEC_FILE);
        let spec = std::fs::read_to_string(&spec_path)
            .map_err(|e| bad(format!("cannot read {}: {e}", spec_path.display())))?;
        let open =
            |name: &str| Checkpoint::open(dir.join(name)).map_err(|e| bad(format!("{name}: {e}")));
        Self::new(model, &open(LABELS_FILE)?, &open(CLASSIFIER_FILE)?, &spec)
    }

    /// Whether a model folder is a digits model (has `digits.json`).
    pub fn is_digits_dir(dir: &Path) -> bool {
        dir.join(SPEC_FILE).is_file()
    }

    /// Side of the unpacked latent (the image folded 2x2).
    pub fn latent_size(&self) -> usize {
        self.spec.image_size / 2
    }

    /// Image tokens (the latent packed 2x2).
    pub fn tokens(&self) -> usize {
        (self.spec.image_size / 4).pow(2)
    }

    /// Conditioning of one sample: `Some(label)`, or `None` for the unconditional branch.
    pub fn cond(&self, label: Option<usize>, device: &Device) -> Result<FluxCond> {
        let side = self.latent_size();
        self.labels.cond(&self.model, &[label], side, side, device)
    }

    /// FluxPipeline's scheduler for this image size (dynamic shift from the token count).
    pub fn scheduler(&self, steps: usize) -> Result<FlowMatchEuler> {
        FlowMatchEuler::new(steps, 1.0, Some(FlowMatchEuler::flux_mu(self.tokens())))
    }

    /// Seeded standard-normal starting latents `[1, tokens, channels]`, drawn on the host so a
    /// seed gives the same digit on every backend.
    pub fn noise(&self, seed: u64, device: &Device) -> Tensor<3> {
        let (tokens, channels) = (self.tokens(), self.model.config.in_channels);
        let mut rng = SplitMix64::new(seed);
        let values: Vec<f32> = (0..tokens * channels)
            .map(|_| rng.normal() as f32)
            .collect();
        Tensor::from_data(TensorData::new(values, [1, tokens, channels]), device)
    }

    /// One sample's packed latents (`tokens * 16` values) as its image, clamped to [-1, 1].
    pub fn decode(&self, latents: &[f32]) -> Result<GrayImage> {
        let size = self.spec.image_size;
        let (tokens, channels) = (self.tokens(), self.model.config.in_channels);
        if latents.len() != tokens * channels {
            return Err(DiffusionError::InvalidOption {
                field: "latents",
                reason: format!(
                    "{} values, expected {tokens} tokens x {channels} channels",
                    latents.len()
                ),
            });
        }
        let grid = size / 4;
        let mut pixels = Vec::with_capacity(size * size);
        for y in 0..size {
            for x in 0..size {
                // pixel_shuffle: the latent channel is the position inside the 2x2 fold...
                let (c, ly, lx) = ((y % 2) * 2 + x % 2, y / 2, x / 2);
                // ... and FluxPipeline's packing puts 2x2 latent positions in one token.
                let token = (ly / 2) * grid + lx / 2;
                let channel = c * 4 + (ly % 2) * 2 + lx % 2;
                pixels.push(latents[token * channels + channel].clamp(-1.0, 1.0));
            }
        }
        GrayImage::new(size, size, pixels)
    }

    /// Every sample of a `[batch, tokens, channels]` latent tensor as an image (one read back).
    pub fn decode_batch(&self, latents: Tensor<3>) -> Result<Vec<GrayImage>> {
        let [batch, tokens, channels] = latents.dims();
        let values = latents
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| DiffusionError::State(format!("cannot read latents: {e:?}")))?;
        let per = tokens * channels;
        (0..batch)
            .map(|b| self.decode(&values[b * per..(b + 1) * per]))
            .collect()
    }
}
