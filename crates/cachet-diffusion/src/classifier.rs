//! A linear image classifier (multinomial logistic regression: `logits = W x + b` over the
//! flattened pixels), the quality measure of generated digits: how often a generated image is
//! classified as the label it was asked for.

use cachet_tensor::safetensors::Checkpoint;

use crate::error::{DiffusionError, Result};
use crate::label::host_f32;
use crate::quality::GrayImage;

/// Logistic-regression weights: `weight` `[classes, pixels]`, `bias` `[classes]`.
#[derive(Clone, Debug)]
pub struct ImageClassifier {
    weight: Vec<f32>,
    bias: Vec<f32>,
    classes: usize,
    width: usize,
    height: usize,
}

fn bad(reason: String) -> DiffusionError {
    DiffusionError::Config {
        what: "classifier",
        reason,
    }
}

impl ImageClassifier {
    /// Reads `weight` and `bias` for `width` x `height` images.
    pub fn from_checkpoint(checkpoint: &Checkpoint, width: usize, height: usize) -> Result<Self> {
        let (weight, weight_shape) = host_f32(checkpoint, "weight", "classifier")?;
        let (bias, bias_shape) = host_f32(checkpoint, "bias", "classifier")?;
        let pixels = width
            .checked_mul(height)
            .ok_or_else(|| bad(format!("a {width}x{height} image is too large")))?;
        let [classes, inputs] = weight_shape[..] else {
            return Err(bad(format!(
                "weight has shape {weight_shape:?}, expected [classes, {pixels}]"
            )));
        };
        if classes == 0 || inputs != pixels || bias_shape != [classes] {
            return Err(bad(format!(
                "weight {weight_shape:?} and bias {bias_shape:?} do not fit {width}x{height} \
                 images (expected [classes, {pixels}] and [classes])"
            )));
        }
        Ok(Self {
            weight,
            bias,
            classes,
            width,
            height,
        })
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Class scores of one image (before the softmax).
    pub fn logits(&self, image: &GrayImage) -> Result<Vec<f32>> {
        if (image.width, image.height) != (self.width, self.height) {
            return Err(DiffusionError::InvalidOption {
                field: "image",
                reason: format!(
                    "the classifier reads {}x{} images, not {}x{}",
                    self.width, self.height, image.width, image.height
                ),
            });
        }
        let n = image.pixels.len();
        Ok((0..self.classes)
            .map(|c| {
                let row = &self.weight[c * n..(c + 1) * n];
                let dot: f64 = row
                    .iter()
                    .zip(&image.pixels)
                    .map(|(w, x)| *w as f64 * *x as f64)
                    .sum();
                (dot + self.bias[c] as f64) as f32
            })
            .collect())
    }

    /// The most likely class of one image.
    pub fn predict(&self, image: &GrayImage) -> Result<usize> {
        let logits = self.logits(image)?;
        Ok(logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0)
    }

    /// Share of `(image, label)` pairs classified as their label (0 for an empty list).
    pub fn accuracy<'a>(
        &self,
        samples: impl IntoIterator<Item = (&'a GrayImage, usize)>,
    ) -> Result<f64> {
        let (mut right, mut total) = (0usize, 0usize);
        for (image, label) in samples {
            right += usize::from(self.predict(image)? == label);
            total += 1;
        }
        Ok(if total == 0 {
            0.0
        } else {
            right as f64 / total as f64
        })
    }
}
