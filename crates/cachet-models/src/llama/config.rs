//! `config.json` of Llama-family checkpoints, with Hugging Face's field names.

use std::path::Path;

use cachet_tensor::Precision;
use serde::{Deserialize, Serialize};

use cachet_nn::{ModelError, Result};

/// Which Hugging Face architecture a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM`: sliding-window attention.
    Mistral,
    /// `Qwen2ForCausalLM`: q/k/v projections with bias, optional sliding window.
    Qwen2,
}

/// One id or several (`eos_token_id` may be either in HF configs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// RoPE parameters: transformers 5's `rope_parameters`, or v4's `rope_scaling` (+ `rope_theta`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RopeParameters {
    /// `default`, `linear` or `llama3` (v4 also spelled it `type`).
    #[serde(default, alias = "type", skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Base of the inverse frequencies (v5 keeps it here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Scaling factor (`linear`, `llama3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// llama3: frequencies with wavelength above `original / low_freq_factor` are divided by `factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// llama3: frequencies with wavelength below `original / high_freq_factor` are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// llama3: the context length the model was trained with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// The resolved RoPE variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rope {
    /// Plain RoPE.
    Default {
        /// Frequency base.
        theta: f64,
    },
    /// Positions divided by `factor`.
    Linear {
        /// Frequency base.
        theta: f64,
        /// Position divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Frequency base.
        theta: f64,
        /// Scaling factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Original context length.
        original_max_position_embeddings: usize,
    },
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    2048
}

/// A Llama-family `config.json` (Llama, Mistral, Qwen2), field names as Hugging Face writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Longest context the model supports.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// MLP activation; only `silu` (SwiGLU) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// transformers 4 RoPE base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers 4 RoPE scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5 RoPE parameters (theta and scaling together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o (Llama's `attention_bias`); Qwen2 always has q/k/v bias.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Sliding attention window (Mistral; Qwen2 when `use_sliding_window`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` is used at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers below this index use full attention when the window is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Beginning-of-sequence id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<TokenIds>,
    /// Stored weight dtype (`torch_dtype` in v4, `dtype` in v5).
    #[serde(
        default,
        alias = "torch_dtype",
        skip_serializing_if = "Option::is_none"
    )]
    pub dtype: Option<Precision>,
}

/// Largest vocabulary accepted (16.7M entries; real models have up to ~256k).
pub(crate) const MAX_VOCAB: usize = 1 << 24;
/// Largest width accepted for hidden, intermediate and attention sizes (1M; real models ≤ 64k).
pub(crate) const MAX_WIDTH: usize = 1 << 20;
/// Most decoder layers accepted (real models have up to ~128).
pub(crate) const MAX_LAYERS: usize = 1 << 12;

impl LlamaConfig {
    /// Parses a config from JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        cachet_nn::config::parse(text, origin, Self::validate)
    }

    /// Reads `config.json` from a file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let (text, origin) = cachet_nn::config::read(path.as_ref())?;
        Self::from_json(&text, &origin)
    }

    /// The architecture, from `model_type` (or `architectures`).
    pub fn family(&self) -> Result<ModelFamily> {
        let by_type = match self.model_type.as_str() {
            "llama" => Some(ModelFamily::Llama),
            "mistral" => Some(ModelFamily::Mistral),
            "qwen2" => Some(ModelFamily::Qwen2),
            _ => None,
        };
        let by_arch = self
            .architectures
            .iter()
            .find_map(|arch| match arch.as_str() {
                "LlamaForCausalLM" => Some(ModelFamily::Llama),
                "MistralForCausalLM" => Some(ModelFamily::Mistral),
                "Qwen2ForCausalLM" => Some(ModelFamily::Qwen2),
                _ => None,
            });
        by_type.or(by_arch).ok_or_else(|| ModelError::Config {
            origin: "config".into(),
            reason: format!(
                "unsupported model_type {:?} / architectures {:?} (supported: llama, mistral, qwen2)",
                self.model_type, self.architectures
            ),
        })
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    /// (0 when neither `head_dim` nor a positive `num_attention_heads` gives one; validation
    /// rejects such configs.)
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or_else(|| {
            self.hidden_size
                .checked_div(self.num_attention_heads)
                .unwrap_or(0)
        })
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || matches!(self.family(), Ok(ModelFamily::Qwen2))
    }

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        self.attention_bias && !matches!(self.family(), Ok(ModelFamily::Qwen2))
    }

    /// The sliding window of `layer`, if it uses one (Mistral always; Qwen2 as configured).
    pub fn sliding_window_for(&self, layer: usize) -> Option<usize> {
        match self.family().ok()? {
            ModelFamily::Llama => None,
            ModelFamily::Mistral => self.sliding_window,
            ModelFamily::Qwen2 => {
                let on = self.use_sliding_window.unwrap_or(false);
                let first = self.max_window_layers.unwrap_or(self.num_hidden_layers);
                (on && layer >= first)
                    .then_some(self.sliding_window)
                    .flatten()
            }
        }
    }

    /// End-of-sequence ids.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// The RoPE variant, from `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (v4).
    pub fn rope(&self) -> Result<Rope> {
        let params = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        let theta = params.rope_theta.or(self.rope_theta).unwrap_or(10_000.0);
        let need = |value: Option<f64>, field: &str| {
            value.ok_or_else(|| ModelError::Config {
                origin: "config".into(),
                reason: format!("rope type {:?} needs {field}", params.rope_type),
            })
        };
        match params.rope_type.as_deref().unwrap_or("default") {
            "default" => Ok(Rope::Default { theta }),
            "linear" => Ok(Rope::Linear {
                theta,
                factor: need(params.factor, "factor")?,
            }),
            "llama3" => Ok(Rope::Llama3 {
                theta,
                factor: need(params.factor, "factor")?,
                low_freq_factor: need(params.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(params.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: params
                    .original_max_position_embeddings
                    .ok_or_else(|| ModelError::Config {
                        origin: "config".into(),
                        reason: "rope type llama3 needs original_max_position_embeddings".into(),
                    })?,
            }),
            other => Err(ModelError::Config {
                origin: "config".into(),
                reason: format!(
                    "unsupported rope type {other:?} (supported: default, linear, llama3)"
                ),
            }),
        }
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| ModelError::Config {
            origin: origin.to_string(),
            reason,
        };
        self.family().map_err(|err| bad(err.to_string()))?;
        if self.hidden_act != "silu" {
            return Err(bad(format!(
                "hidden_act {:?} is not supported (only silu)",
                self.hidden_act
            )));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
        ] {
            if value == 0 {
                return Err(bad(format!("{name} must be positive")));
            }
        }
        // Sizes no checkpoint has, refused before anything is allocated for them.
        for (name, value, limit) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("num_key_value_heads", self.kv_heads(), MAX_WIDTH),
            ("head_dim", self.head_dim(), MAX_WIDTH),
        ] {
            if value > limit {
                return Err(bad(format!(
                    "{name} is {value}; at most {limit} is supported"
                )));
            }
        }
        let q_width = self.num_attention_heads * self.head_dim();
        if q_width > MAX_WIDTH {
            return Err(bad(format!(
                "num_attention_heads × head_dim is {q_width}; at most {MAX_WIDTH} is supported"
            )));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            )));
        }
        if self.sliding_window == Some(0) {
            return Err(bad("sliding_window must be positive".into()));
        }
        self.rope().map_err(|err| bad(err.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":32,
        "hidden_size":16,"intermediate_size":32,"num_hidden_layers":1,"num_attention_heads":4,
        "num_key_value_heads":2,"rope_theta":500000.0,"torch_dtype":"bfloat16",
        "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192},"eos_token_id":[1,2]}"#;

    #[test]
    fn reads_transformers_v4_fields() {
        let config = LlamaConfig::from_json(V4, "v4").unwrap();
        assert_eq!(config.family().unwrap(), ModelFamily::Llama);
        assert_eq!(config.head_dim(), 4);
        assert_eq!(config.kv_heads(), 2);
        assert_eq!(config.dtype, Some(Precision::BF16));
        assert_eq!(config.eos_ids(), vec![1, 2]);
        assert!(
            matches!(config.rope().unwrap(), Rope::Llama3 { theta, factor, .. } if theta == 500000.0 && factor == 8.0)
        );
    }

    #[test]
    fn reads_transformers_v5_rope_parameters() {
        let text = V4
            .replace(r#""rope_theta":500000.0,"#, "")
            .replace("rope_scaling", "rope_parameters")
            .replace(r#""factor":8.0"#, r#""factor":8.0,"rope_theta":250000.0"#);
        let config = LlamaConfig::from_json(&text, "v5").unwrap();
        assert!(matches!(config.rope().unwrap(), Rope::Llama3 { theta, .. } if theta == 250000.0));
    }

    #[test]
    fn rejects_bad_configs_by_name() {
        for (edit, needle) in [
            (
                (r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#),
                "multiple",
            ),
            (
                (r#""model_type":"llama""#, r#""model_type":"gpt2""#),
                "unsupported model_type",
            ),
            (
                (r#""rope_type":"llama3""#, r#""rope_type":"yarn""#),
                "unsupported rope type",
            ),
            (
                (r#""vocab_size":32"#, r#""vocab_size":"many""#),
                "vocab_size",
            ),
        ] {
            let mut text = V4.replace(edit.0, edit.1);
            if needle == "unsupported model_type" {
                text = text.replace("LlamaForCausalLM", "GPT2LMHeadModel");
            }
            let err = LlamaConfig::from_json(&text, "bad.json")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle) && err.contains("bad.json"), "{err}");
        }
    }

    #[test]
    fn zero_heads_and_absurd_sizes_are_errors_not_panics() {
        for (edit, needle) in [
            (
                (r#""num_attention_heads":4"#, r#""num_attention_heads":0"#),
                "num_attention_heads must be positive",
            ),
            (
                (
                    r#""num_attention_heads":4"#,
                    r#""num_attention_heads":0,"head_dim":4"#,
                ),
                "num_attention_heads must be positive",
            ),
            (
                (
                    r#""num_hidden_layers":1"#,
                    r#""num_hidden_layers":1000000000000"#,
                ),
                "num_hidden_layers is 1000000000000",
            ),
            (
                (r#""vocab_size":32"#, r#""vocab_size":18446744073709551615"#),
                "vocab_size is",
            ),
            (
                (
                    r#""num_attention_heads":4"#,
                    r#""num_attention_heads":4,"head_dim":1048576"#,
                ),
                "num_attention_heads × head_dim",
            ),
        ] {
            let text = V4.replace(edit.0, edit.1);
            let err = LlamaConfig::from_json(&text, "bad.json")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn qwen2_window_applies_from_max_window_layers() {
        let text = V4.replace(r#""model_type":"llama""#, r#""model_type":"qwen2","sliding_window":4,"use_sliding_window":true,"max_window_layers":1"#);
        let mut config = LlamaConfig::from_json(&text, "q").unwrap();
        config.architectures.clear();
        assert!(config.qkv_bias());
        assert_eq!(config.sliding_window_for(0), None);
        assert_eq!(config.sliding_window_for(1), Some(4));
    }
}
