//! `config.json` of diffusers' `FluxTransformer2DModel`, with diffusers' field names and defaults.

use std::path::Path;

use serde::{Deserialize, Serialize};

use cachet_nn::{ModelError, Result};

/// The diffusers class this config describes.
pub(crate) const CLASS_NAME: &str = "FluxTransformer2DModel";
/// Largest width accepted for any dimension, and for `inner_dim` and `proj_out` (1M; FLUX.1 has
/// 4096 at most): sizes no checkpoint has are refused before anything is sized from them.
pub(crate) const MAX_WIDTH: usize = 1 << 20;
/// Most blocks accepted in each block list (FLUX.1 has 38).
pub(crate) const MAX_LAYERS: usize = 1 << 12;

/// Hyper-parameters of a Flux MMDiT, exactly as diffusers 0.42.1 writes them (missing fields take
/// diffusers' defaults, i.e. FLUX.1's sizes). Unknown keys are ignored, as diffusers does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    /// diffusers' class name; must be `FluxTransformer2DModel` when present.
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    /// diffusers version that wrote the config (informational).
    #[serde(
        rename = "_diffusers_version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub diffusers_version: Option<String>,
    /// Side of the square patches the output is unpacked into (`proj_out` width is
    /// `patch_size² · out_channels`).
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    /// Channels of each (packed) image token.
    #[serde(default = "defaults::in_channels")]
    pub in_channels: usize,
    /// Output channels; `None` means `in_channels`.
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Number of double-stream (MMDiT) blocks, `transformer_blocks`.
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    /// Number of single-stream blocks, `single_transformer_blocks`.
    #[serde(default = "defaults::num_single_layers")]
    pub num_single_layers: usize,
    /// Width of each attention head.
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: usize,
    /// Number of attention heads (model width is `heads · head_dim`).
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width of the text encoder states (`encoder_hidden_states`).
    #[serde(default = "defaults::joint_attention_dim")]
    pub joint_attention_dim: usize,
    /// Width of the pooled text embedding.
    #[serde(default = "defaults::pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    /// Whether the model embeds a guidance scale (guidance-distilled variants such as FLUX.1-dev).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// RoPE width of each position-id axis; they sum to `attention_head_dim`.
    #[serde(default = "defaults::axes_dims_rope")]
    pub axes_dims_rope: Vec<usize>,
}

mod defaults {
    pub(crate) fn patch_size() -> usize {
        1
    }
    pub(crate) fn in_channels() -> usize {
        64
    }
    pub(crate) fn num_layers() -> usize {
        19
    }
    pub(crate) fn num_single_layers() -> usize {
        38
    }
    pub(crate) fn attention_head_dim() -> usize {
        128
    }
    pub(crate) fn num_attention_heads() -> usize {
        24
    }
    pub(crate) fn joint_attention_dim() -> usize {
        4096
    }
    pub(crate) fn pooled_projection_dim() -> usize {
        768
    }
    pub(crate) fn axes_dims_rope() -> Vec<usize> {
        vec![16, 56, 56]
    }
}

impl FluxConfig {
    /// Parses and validates `config.json` text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        cachet_nn::config::parse(text, origin, Self::validate)
    }

    /// Reads and validates `config.json` from a file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let (text, origin) = cachet_nn::config::read(path.as_ref())?;
        Self::from_json(&text, &origin)
    }

    /// Model width, `num_attention_heads · attention_head_dim` (diffusers' `inner_dim`).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels per token before unpatchifying (`out_channels` or `in_channels`).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Width of `proj_out`: `patch_size² · out_channels`.
    pub fn output_width(&self) -> usize {
        self.patch_size * self.patch_size * self.out_channels()
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |field: &str, reason: String| ModelError::Config {
            origin: origin.to_string(),
            reason: format!("field `{field}`: {reason}"),
        };
        if let Some(class) = &self.class_name
            && class != CLASS_NAME
        {
            return Err(bad(
                "_class_name",
                format!("{class:?} is not {CLASS_NAME:?}"),
            ));
        }
        for (name, value) in [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ] {
            if value == 0 {
                return Err(bad(name, "must be positive".into()));
            }
        }
        if self.out_channels == Some(0) {
            return Err(bad("out_channels", "must be positive".into()));
        }
        for (name, value, limit) in [
            ("patch_size", self.patch_size, MAX_WIDTH),
            ("in_channels", self.in_channels, MAX_WIDTH),
            ("out_channels", self.out_channels(), MAX_WIDTH),
            ("attention_head_dim", self.attention_head_dim, MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("joint_attention_dim", self.joint_attention_dim, MAX_WIDTH),
            (
                "pooled_projection_dim",
                self.pooled_projection_dim,
                MAX_WIDTH,
            ),
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("num_single_layers", self.num_single_layers, MAX_LAYERS),
        ] {
            if value > limit {
                return Err(bad(name, format!("{value}; at most {limit} is supported")));
            }
        }
        // Products of bounded factors: checked so that `inner_dim` and `output_width` never
        // overflow for an accepted config.
        let within = |product: Option<usize>| product.filter(|&n| n <= MAX_WIDTH);
        if within(
            self.num_attention_heads
                .checked_mul(self.attention_head_dim),
        )
        .is_none()
        {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} heads x attention_head_dim {} exceeds {MAX_WIDTH}",
                    self.num_attention_heads, self.attention_head_dim
                ),
            ));
        }
        let proj_out = self
            .patch_size
            .checked_mul(self.patch_size)
            .and_then(|p| p.checked_mul(self.out_channels()));
        if within(proj_out).is_none() {
            return Err(bad(
                "patch_size",
                format!(
                    "patch_size² x out_channels ({}² x {}) exceeds {MAX_WIDTH}",
                    self.patch_size,
                    self.out_channels()
                ),
            ));
        }
        if self.axes_dims_rope.is_empty() {
            return Err(bad("axes_dims_rope", "must list at least one axis".into()));
        }
        if let Some(odd) = self
            .axes_dims_rope
            .iter()
            .find(|d| **d == 0 || **d % 2 == 1)
        {
            return Err(bad(
                "axes_dims_rope",
                format!("every axis width must be even and positive, got {odd}"),
            ));
        }
        // Each axis is even and positive, so a sum equal to the (bounded) head width cannot
        // have overflowed on the way: saturate rather than wrap.
        let sum = self
            .axes_dims_rope
            .iter()
            .fold(0usize, |acc, &d| acc.saturating_add(d));
        if sum != self.attention_head_dim {
            return Err(bad(
                "axes_dims_rope",
                format!(
                    "widths {:?} sum to {sum}, but attention_head_dim is {}",
                    self.axes_dims_rope, self.attention_head_dim
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_takes_flux1_defaults() {
        let config = FluxConfig::from_json("{}", "test").unwrap();
        assert_eq!(config.inner_dim(), 3072);
        assert_eq!(config.axes_dims_rope, vec![16, 56, 56]);
        assert_eq!(config.output_width(), 64);
        assert!(!config.guidance_embeds);
    }

    #[test]
    fn errors_name_the_field() {
        let err = FluxConfig::from_json(r#"{"num_layers": "two"}"#, "t").unwrap_err();
        assert!(err.to_string().contains("num_layers"), "{err}");
        let err = FluxConfig::from_json(r#"{"axes_dims_rope": [16, 56, 50]}"#, "t").unwrap_err();
        assert!(err.to_string().contains("axes_dims_rope"), "{err}");
        let err =
            FluxConfig::from_json(r#"{"_class_name": "SD3Transformer2DModel"}"#, "t").unwrap_err();
        assert!(err.to_string().contains("_class_name"), "{err}");
    }
}
