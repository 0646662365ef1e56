//! Class-label conditioning for a Flux model trained on labels instead of text: a learned table
//! gives each label the text tokens (`encoder_hidden_states`) and the pooled vector
//! (`pooled_projections`) a text encoder would, and one extra row, the null label, conditions the
//! unconditional branch of classifier-free guidance.

use burn::tensor::{Device, Tensor, TensorData};
use cachet_tensor::safetensors::Checkpoint;

use crate::error::{DiffusionError, Result};
use crate::models::FluxTransformer;
use crate::pipeline::{FluxCond, flux_image_ids};

/// Tensor names in a label-embedding file.
pub const TEXT_EMBEDDINGS: &str = "text_embeddings";
/// The pooled table's name.
pub const POOLED_EMBEDDINGS: &str = "pooled_embeddings";

/// Label → Flux conditioning: `[labels + 1, tokens, joint_attention_dim]` text states and
/// `[labels + 1, pooled_projection_dim]` pooled vectors, the last row the null label.
#[derive(Clone, Debug)]
pub struct LabelEmbedding {
    text: Vec<f32>,
    pooled: Vec<f32>,
    labels: usize,
    tokens: usize,
    joint_dim: usize,
    pooled_dim: usize,
}

/// A float tensor of a checkpoint as host f32 values and its shape; errors name `what`.
pub(crate) fn host_f32(
    checkpoint: &Checkpoint,
    name: &str,
    what: &'static str,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let bad = |reason: String| DiffusionError::Config { what, reason };
    let data = checkpoint
        .tensor_data(name)
        .map_err(|e| bad(e.to_string()))?;
    let shape = data.shape().to_vec();
    let values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| bad(format!("{name}: {e:?}")))?;
    Ok((values, shape))
}

impl LabelEmbedding {
    /// Reads the two tables (`text_embeddings`, `pooled_embeddings`) and checks them against the
    /// model's `joint_attention_dim` and `pooled_projection_dim`.
    pub fn from_checkpoint(checkpoint: &Checkpoint, model: &FluxTransformer) -> Result<Self> {
        let (text, text_shape) = host_f32(checkpoint, TEXT_EMBEDDINGS, "label embedding")?;
        let (pooled, pooled_shape) = host_f32(checkpoint, POOLED_EMBEDDINGS, "label embedding")?;
        let c = &model.config;
        let bad = |reason: String| DiffusionError::Config {
            what: "label embedding",
            reason,
        };
        let [rows, tokens, joint_dim] = text_shape[..] else {
            return Err(bad(format!(
                "{TEXT_EMBEDDINGS} has shape {text_shape:?}, expected [labels + 1, tokens, {}]",
                c.joint_attention_dim
            )));
        };
        if rows < 2 || tokens == 0 || joint_dim != c.joint_attention_dim {
            return Err(bad(format!(
                "{TEXT_EMBEDDINGS} has shape {text_shape:?}, expected [labels + 1 (at least 2), \
                 tokens (at least 1), {}]",
                c.joint_attention_dim
            )));
        }
        if pooled_shape != [rows, c.pooled_projection_dim] {
            return Err(bad(format!(
                "{POOLED_EMBEDDINGS} has shape {pooled_shape:?}, expected [{rows}, {}]",
                c.pooled_projection_dim
            )));
        }
        Ok(Self {
            text,
            pooled,
            labels: rows - 1,
            tokens,
            joint_dim,
            pooled_dim: c.pooled_projection_dim,
        })
    }

    /// Labels the table knows (0 to `labels() - 1`), the null label excluded.
    pub fn labels(&self) -> usize {
        self.labels
    }

    /// Text tokens per label.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The row of `label`, or of the null label for `None`.
    fn row(&self, label: Option<usize>) -> Result<usize> {
        match label {
            None => Ok(self.labels),
            Some(l) if l < self.labels => Ok(l),
            Some(label) => Err(DiffusionError::LabelOutOfRange {
                label,
                labels: self.labels,
            }),
        }
    }

    /// Conditioning of a batch, one entry per sample (`None`: the null label, the
    /// unconditional branch), for a `height` x `width` latent (before 2x2 packing), with the
    /// RoPE tables precomputed.
    pub fn cond(
        &self,
        model: &FluxTransformer,
        labels: &[Option<usize>],
        height: usize,
        width: usize,
        device: &Device,
    ) -> Result<FluxCond> {
        if labels.is_empty() {
            return Err(DiffusionError::InvalidOption {
                field: "labels",
                reason: "at least one label is needed".into(),
            });
        }
        let (mut text, mut pooled) = (Vec::new(), Vec::new());
        for label in labels {
            let row = self.row(*label)?;
            let t = self.tokens * self.joint_dim;
            text.extend_from_slice(&self.text[row * t..(row + 1) * t]);
            pooled.extend_from_slice(
                &self.pooled[row * self.pooled_dim..(row + 1) * self.pooled_dim],
            );
        }
        let batch = labels.len();
        FluxCond {
            encoder_hidden_states: Tensor::from_data(
                TensorData::new(text, [batch, self.tokens, self.joint_dim]),
                device,
            ),
            pooled_projections: Tensor::from_data(
                TensorData::new(pooled, [batch, self.pooled_dim]),
                device,
            ),
            img_ids: flux_image_ids(height / 2, width / 2, device),
            txt_ids: Tensor::zeros([self.tokens, 3], device),
            guidance: model.config.guidance_embeds.then_some(1.0),
            rope: None,
        }
        .with_rope(model)
    }
}
