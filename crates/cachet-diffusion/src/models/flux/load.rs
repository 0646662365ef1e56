//! Loading a Flux model: diffusers' tensor names mapped onto the modules, every projection
//! built through the [`LinearFactory`] seam.

use std::path::Path;

use burn::tensor::Device;
use cachet_nn::{DenseFactory, LinearFactory, LinearLayer, Loader, Pretrained, Result, RmsNorm};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{Precision, ensure_supported};

use super::config::FluxConfig;
use super::model::*;

/// The shared [`Loader`] with the builders of Flux's composite modules.
struct FluxLoader<'a>(Loader<'a>);

impl FluxLoader<'_> {
    /// Every Flux projection has a bias.
    fn linear(&self, name: &str, in_features: usize, out_features: usize) -> Result<LinearLayer> {
        self.0.linear(name, in_features, out_features, true)
    }

    fn rms(&self, name: &str, dim: usize) -> Result<RmsNorm> {
        self.0.rms_norm(name, dim, NORM_EPS)
    }

    fn modulation(&self, name: &str, dim: usize, chunks: usize) -> Result<AdaModulation> {
        Ok(AdaModulation {
            linear: self.linear(&format!("{name}.linear"), dim, chunks * dim)?,
            chunks,
        })
    }

    fn embedder(&self, name: &str, in_features: usize, dim: usize) -> Result<MlpEmbedder> {
        Ok(MlpEmbedder {
            linear_1: self.linear(&format!("{name}.linear_1"), in_features, dim)?,
            linear_2: self.linear(&format!("{name}.linear_2"), dim, dim)?,
        })
    }

    fn feed_forward(&self, name: &str, dim: usize) -> Result<FeedForward> {
        Ok(FeedForward {
            proj_in: self.linear(&format!("{name}.net.0.proj"), dim, 4 * dim)?,
            proj_out: self.linear(&format!("{name}.net.2"), 4 * dim, dim)?,
        })
    }

    fn attention(&self, name: &str, config: &FluxConfig, double: bool) -> Result<FluxAttention> {
        let (dim, head_dim) = (config.inner_dim(), config.attention_head_dim);
        let context = if double {
            Some(ContextProjections {
                add_q_proj: self.linear(&format!("{name}.add_q_proj"), dim, dim)?,
                add_k_proj: self.linear(&format!("{name}.add_k_proj"), dim, dim)?,
                add_v_proj: self.linear(&format!("{name}.add_v_proj"), dim, dim)?,
                norm_added_q: self.rms(&format!("{name}.norm_added_q"), head_dim)?,
                norm_added_k: self.rms(&format!("{name}.norm_added_k"), head_dim)?,
                to_add_out: self.linear(&format!("{name}.to_add_out"), dim, dim)?,
            })
        } else {
            None
        };
        Ok(FluxAttention {
            to_q: self.linear(&format!("{name}.to_q"), dim, dim)?,
            to_k: self.linear(&format!("{name}.to_k"), dim, dim)?,
            to_v: self.linear(&format!("{name}.to_v"), dim, dim)?,
            norm_q: self.rms(&format!("{name}.norm_q"), head_dim)?,
            norm_k: self.rms(&format!("{name}.norm_k"), head_dim)?,
            to_out: if double {
                Some(self.linear(&format!("{name}.to_out.0"), dim, dim)?)
            } else {
                None
            },
            context,
            heads: config.num_attention_heads,
            head_dim,
        })
    }
}

impl Pretrained for FluxTransformer {
    type Config = FluxConfig;

    fn read_config(dir: &Path) -> Result<FluxConfig> {
        FluxConfig::from_file(dir.join("config.json"))
    }

    fn open_weights(dir: &Path) -> Result<Checkpoint> {
        crate::models::open_weights(dir)
    }

    fn default_factory() -> &'static dyn LinearFactory {
        &DenseFactory
    }

    fn load_with(
        config: FluxConfig,
        checkpoint: &Checkpoint,
        device: &Device,
        precision: Precision,
        factory: &dyn LinearFactory,
    ) -> Result<Self> {
        ensure_supported(device, precision)?;
        let l = FluxLoader(Loader {
            checkpoint,
            device,
            dtype: precision.dtype(),
            factory,
        });
        let dim = config.inner_dim();
        let time_text_embed = TimeTextEmbed {
            timestep_embedder: l.embedder(
                "time_text_embed.timestep_embedder",
                TIME_CHANNELS,
                dim,
            )?,
            guidance_embedder: if config.guidance_embeds {
                Some(l.embedder("time_text_embed.guidance_embedder", TIME_CHANNELS, dim)?)
            } else {
                None
            },
            text_embedder: l.embedder(
                "time_text_embed.text_embedder",
                config.pooled_projection_dim,
                dim,
            )?,
        };
        let transformer_blocks = (0..config.num_layers)
            .map(|i| {
                let p = format!("{DOUBLE_BLOCKS}.{i}");
                Ok(FluxTransformerBlock {
                    norm1: l.modulation(&format!("{p}.norm1"), dim, 6)?,
                    norm1_context: l.modulation(&format!("{p}.norm1_context"), dim, 6)?,
                    attn: l.attention(&format!("{p}.attn"), &config, true)?,
                    ff: l.feed_forward(&format!("{p}.ff"), dim)?,
                    ff_context: l.feed_forward(&format!("{p}.ff_context"), dim)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single_transformer_blocks = (0..config.num_single_layers)
            .map(|i| {
                let p = format!("{SINGLE_BLOCKS}.{i}");
                Ok(FluxSingleTransformerBlock {
                    norm: l.modulation(&format!("{p}.norm"), dim, 3)?,
                    proj_mlp: l.linear(&format!("{p}.proj_mlp"), dim, 4 * dim)?,
                    proj_out: l.linear(&format!("{p}.proj_out"), 5 * dim, dim)?,
                    attn: l.attention(&format!("{p}.attn"), &config, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            x_embedder: l.linear("x_embedder", config.in_channels, dim)?,
            context_embedder: l.linear("context_embedder", config.joint_attention_dim, dim)?,
            time_text_embed,
            transformer_blocks,
            single_transformer_blocks,
            norm_out: l.modulation("norm_out", dim, 2)?,
            proj_out: l.linear("proj_out", dim, config.output_width())?,
            config,
            precision,
        })
    }
}
