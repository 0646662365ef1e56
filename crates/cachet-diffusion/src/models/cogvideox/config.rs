//! `config.json` of `CogVideoXTransformer3DModel`, with diffusers' field names and defaults.

use std::path::Path;

use serde::{Deserialize, Serialize};

use cachet_nn::{ModelError, Result};

/// Largest width accepted for any dimension and for `inner_dim` (1M; CogVideoX-5B has 3072):
/// sizes no checkpoint has are refused before anything is sized from them.
const MAX_WIDTH: usize = 1 << 20;
/// Most blocks, patch sizes and compression ratios accepted.
const MAX_LAYERS: usize = 1 << 12;
/// Largest sample size (pixels or frames) accepted for the positional table.
const MAX_SAMPLE: usize = 1 << 16;
/// Most elements of the positional table a config may ask for (`tokens x inner_dim`; 2^31 is
/// 40 times CogVideoX-5B's).
const MAX_TABLE: usize = 1 << 31;

/// The transformer's config as diffusers 0.42 writes it; absent fields take diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CogVideoXConfig {
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of one head; `inner_dim = heads * head_dim`.
    pub attention_head_dim: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out (`None`: diffusers still builds `proj_out` for 16).
    pub out_channels: Option<usize>,
    /// Timestep embedding order `cos, sin` instead of `sin, cos`.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep embedding.
    pub freq_shift: f64,
    /// Width of the timestep embedding (the modulation input).
    pub time_embed_dim: usize,
    /// Width of the `ofs` embedding (CogVideoX 1.5 I2V); must equal `time_embed_dim`.
    pub ofs_embed_dim: Option<usize>,
    /// Width of the text encoder's states.
    pub text_embed_dim: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Dropout (inference ignores it).
    pub dropout: f64,
    /// Bias of the q/k/v projections.
    pub attention_bias: bool,
    /// Latent width the positional table was built for.
    pub sample_width: usize,
    /// Latent height the positional table was built for.
    pub sample_height: usize,
    /// Pixel-space frame count the positional table was built for (`(K - 1) * 4 + 1`).
    pub sample_frames: usize,
    /// Spatial patch size.
    pub patch_size: usize,
    /// Temporal patch size (CogVideoX 1.5); `None` for 1.0.
    pub patch_size_t: Option<usize>,
    /// VAE temporal compression, used to size the positional table.
    pub temporal_compression_ratio: usize,
    /// Text tokens the positional table reserves (zeros) in front of the video tokens.
    pub max_text_seq_length: usize,
    /// Feed-forward activation: `gelu-approximate` or `gelu`.
    pub activation_fn: String,
    /// Activation inside the timestep MLP: `silu`.
    pub timestep_activation_fn: String,
    /// Learnable scale and shift in the layer norms.
    pub norm_elementwise_affine: bool,
    /// Layer-norm epsilon.
    pub norm_eps: f64,
    /// Divides spatial positions of the sin-cos table.
    pub spatial_interpolation_scale: f64,
    /// Divides temporal positions of the sin-cos table.
    pub temporal_interpolation_scale: f64,
    /// 3D rotary embeddings in attention instead of the sin-cos table.
    pub use_rotary_positional_embeddings: bool,
    /// A learned positional table (`patch_embed.pos_embedding`), with rotary.
    pub use_learned_positional_embeddings: bool,
    /// Bias of the patch projection.
    pub patch_bias: bool,
}

impl Default for CogVideoXConfig {
    fn default() -> Self {
        Self {
            num_attention_heads: 30,
            attention_head_dim: 64,
            in_channels: 16,
            out_channels: Some(16),
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            time_embed_dim: 512,
            ofs_embed_dim: None,
            text_embed_dim: 4096,
            num_layers: 30,
            dropout: 0.0,
            attention_bias: true,
            sample_width: 90,
            sample_height: 60,
            sample_frames: 49,
            patch_size: 2,
            patch_size_t: None,
            temporal_compression_ratio: 4,
            max_text_seq_length: 226,
            activation_fn: "gelu-approximate".into(),
            timestep_activation_fn: "silu".into(),
            norm_elementwise_affine: true,
            norm_eps: 1e-5,
            spatial_interpolation_scale: 1.875,
            temporal_interpolation_scale: 1.0,
            use_rotary_positional_embeddings: false,
            use_learned_positional_embeddings: false,
            patch_bias: true,
        }
    }
}

impl CogVideoXConfig {
    /// Parses a config from JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        cachet_nn::config::parse(text, origin, Self::validate)
    }

    /// Reads `config.json` from a file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let (text, origin) = cachet_nn::config::read(path.as_ref())?;
        Self::from_json(&text, &origin)
    }

    /// `num_attention_heads * attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels (diffusers' `proj_out` assumes 16 when `out_channels` is null).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(16)
    }

    /// Whether the patch embedding adds a positional table (sin-cos or learned).
    pub fn uses_positional_table(&self) -> bool {
        !self.use_rotary_positional_embeddings || self.use_learned_positional_embeddings
    }

    /// Rejects configs diffusers would reject or this port does not implement.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| ModelError::Config {
            origin: origin.to_string(),
            reason,
        };
        for (name, value) in [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels()),
            ("time_embed_dim", self.time_embed_dim),
            ("text_embed_dim", self.text_embed_dim),
            ("patch_size", self.patch_size),
            (
                "temporal_compression_ratio",
                self.temporal_compression_ratio,
            ),
        ] {
            if value == 0 {
                return Err(bad(format!("{name} must be positive")));
            }
        }
        if self.patch_size_t == Some(0) {
            return Err(bad("patch_size_t must be positive".into()));
        }
        if self.sample_frames == 0 {
            return Err(bad("sample_frames must be positive".into()));
        }
        for (name, value, limit) in [
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("attention_head_dim", self.attention_head_dim, MAX_WIDTH),
            ("in_channels", self.in_channels, MAX_WIDTH),
            ("out_channels", self.out_channels(), MAX_WIDTH),
            ("time_embed_dim", self.time_embed_dim, MAX_WIDTH),
            ("ofs_embed_dim", self.ofs_embed_dim.unwrap_or(0), MAX_WIDTH),
            ("text_embed_dim", self.text_embed_dim, MAX_WIDTH),
            ("max_text_seq_length", self.max_text_seq_length, MAX_WIDTH),
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("patch_size", self.patch_size, MAX_LAYERS),
            ("patch_size_t", self.patch_size_t.unwrap_or(1), MAX_LAYERS),
            (
                "temporal_compression_ratio",
                self.temporal_compression_ratio,
                MAX_LAYERS,
            ),
            ("sample_width", self.sample_width, MAX_SAMPLE),
            ("sample_height", self.sample_height, MAX_SAMPLE),
            ("sample_frames", self.sample_frames, MAX_SAMPLE),
        ] {
            if value > limit {
                return Err(bad(format!(
                    "{name} is {value}; at most {limit} is supported"
                )));
            }
        }
        // Bounded factors, so these products are exact; `inner_dim` never overflows for an
        // accepted config.
        let inner = self.num_attention_heads * self.attention_head_dim;
        if inner > MAX_WIDTH {
            return Err(bad(format!(
                "num_attention_heads x attention_head_dim is {inner}; at most {MAX_WIDTH} is supported"
            )));
        }
        let frames = (self.sample_frames - 1) / self.temporal_compression_ratio + 1;
        let tokens = self.max_text_seq_length
            + frames
                * (self.sample_height / self.patch_size)
                * (self.sample_width / self.patch_size);
        if tokens.saturating_mul(inner) > MAX_TABLE {
            return Err(bad(format!(
                "the positional table of the sample size ({tokens} tokens x inner_dim {inner}) exceeds {MAX_TABLE} elements"
            )));
        }
        if !self.use_rotary_positional_embeddings && self.use_learned_positional_embeddings {
            return Err(bad(
                "use_learned_positional_embeddings needs use_rotary_positional_embeddings \
                 (diffusers rejects this combination)"
                    .into(),
            ));
        }
        if !matches!(self.activation_fn.as_str(), "gelu-approximate" | "gelu") {
            return Err(bad(format!(
                "activation_fn {:?} is not supported (gelu-approximate, gelu)",
                self.activation_fn
            )));
        }
        if !matches!(self.timestep_activation_fn.as_str(), "silu" | "swish") {
            return Err(bad(format!(
                "timestep_activation_fn {:?} is not supported (silu)",
                self.timestep_activation_fn
            )));
        }
        if let Some(ofs) = self.ofs_embed_dim.filter(|&d| d > 0)
            && ofs != self.time_embed_dim
        {
            return Err(bad(format!(
                "ofs_embed_dim {ofs} must equal time_embed_dim {} (the embeddings are summed)",
                self.time_embed_dim
            )));
        }
        if self.uses_positional_table() && !inner.is_multiple_of(16) {
            return Err(bad(format!(
                "inner_dim {inner} must be a multiple of 16 for the 3D sin-cos table"
            )));
        }
        if self.use_rotary_positional_embeddings && !self.attention_head_dim.is_multiple_of(16) {
            return Err(bad(format!(
                "attention_head_dim {} must be a multiple of 16 for 3D rotary embeddings",
                self.attention_head_dim
            )));
        }
        if !inner.is_multiple_of(2) {
            return Err(bad(format!("inner_dim {inner} must be even")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_diffusers() {
        let config = CogVideoXConfig::from_json("{}", "test").unwrap();
        assert_eq!(config.inner_dim(), 1920);
        assert_eq!(config.max_text_seq_length, 226);
        assert!(!config.use_rotary_positional_embeddings);
    }

    #[test]
    fn rejects_learned_without_rotary_and_bad_types() {
        let err = CogVideoXConfig::from_json(r#"{"use_learned_positional_embeddings": true}"#, "t")
            .unwrap_err();
        assert!(matches!(err, ModelError::Config { .. }), "{err}");
        let err = CogVideoXConfig::from_json(r#"{"num_layers": "two"}"#, "t").unwrap_err();
        assert!(err.to_string().contains("num_layers"), "{err}");
    }
}
