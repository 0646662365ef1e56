//! Seeded random Flux weights for benchmarks and tests, built through the ordinary loader.

use burn::tensor::Device;
use cachet_nn::{Pretrained, Result, SplitMix64};
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;

use super::config::FluxConfig;
use super::model::{DOUBLE_BLOCKS, FluxTransformer, SINGLE_BLOCKS, TIME_CHANNELS};

impl FluxTransformer {
    /// A model of `config` with seeded random weights, no checkpoint needed (benchmarks, tests):
    /// every linear weight `[out, in]` is drawn from `normal(0, 1/in)` so activations keep their
    /// scale through the layers, biases are zero and RMSNorm weights one. The weights go through
    /// an in-memory safetensors file with diffusers' tensor names and the ordinary loader, so the
    /// model is built exactly as a checkpoint would build it. Same `seed`, same weights.
    pub fn random(
        config: FluxConfig,
        device: &Device,
        precision: Precision,
        seed: u64,
    ) -> Result<Self> {
        let checkpoint = random_checkpoint(&config, seed)?;
        Self::load(config, &checkpoint, device, precision)
    }
}

/// diffusers' tensor names and shapes of a Flux model of `config`.
fn weight_shapes(config: &FluxConfig) -> Vec<(String, Vec<usize>)> {
    let dim = config.inner_dim();
    let head_dim = config.attention_head_dim;
    let mut shapes = Vec::new();
    let mut linear = |name: String, input: usize, output: usize| {
        shapes.push((format!("{name}.weight"), vec![output, input]));
        shapes.push((format!("{name}.bias"), vec![output]));
    };
    linear("x_embedder".into(), config.in_channels, dim);
    linear("context_embedder".into(), config.joint_attention_dim, dim);
    let mut embedders = vec![
        ("timestep_embedder", TIME_CHANNELS),
        ("text_embedder", config.pooled_projection_dim),
    ];
    if config.guidance_embeds {
        embedders.push(("guidance_embedder", TIME_CHANNELS));
    }
    for (name, input) in embedders {
        linear(format!("time_text_embed.{name}.linear_1"), input, dim);
        linear(format!("time_text_embed.{name}.linear_2"), dim, dim);
    }
    let mut norms = Vec::new();
    for i in 0..config.num_layers {
        let p = format!("{DOUBLE_BLOCKS}.{i}");
        linear(format!("{p}.norm1.linear"), dim, 6 * dim);
        linear(format!("{p}.norm1_context.linear"), dim, 6 * dim);
        for proj in [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ] {
            linear(format!("{p}.attn.{proj}"), dim, dim);
        }
        for norm in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            norms.push(format!("{p}.attn.{norm}.weight"));
        }
        for ff in ["ff", "ff_context"] {
            linear(format!("{p}.{ff}.net.0.proj"), dim, 4 * dim);
            linear(format!("{p}.{ff}.net.2"), 4 * dim, dim);
        }
    }
    for i in 0..config.num_single_layers {
        let p = format!("{SINGLE_BLOCKS}.{i}");
        linear(format!("{p}.norm.linear"), dim, 3 * dim);
        linear(format!("{p}.proj_mlp"), dim, 4 * dim);
        linear(format!("{p}.proj_out"), 5 * dim, dim);
        for proj in ["to_q", "to_k", "to_v"] {
            linear(format!("{p}.attn.{proj}"), dim, dim);
        }
        for norm in ["norm_q", "norm_k"] {
            norms.push(format!("{p}.attn.{norm}.weight"));
        }
    }
    linear("norm_out.linear".into(), dim, 2 * dim);
    linear("proj_out".into(), dim, config.output_width());
    shapes.extend(norms.into_iter().map(|n| (n, vec![head_dim])));
    shapes
}

/// An in-memory f32 safetensors file of seeded random weights for [`FluxTransformer::random`].
fn random_checkpoint(config: &FluxConfig, seed: u64) -> Result<Checkpoint> {
    let shapes = weight_shapes(config);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &shapes {
        let bytes = 4 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut file = Vec::with_capacity(8 + header.len() + offset);
    file.extend_from_slice(&(header.len() as u64).to_le_bytes());
    file.extend_from_slice(&header);
    let mut rng = SplitMix64::new(seed);
    for (name, shape) in &shapes {
        let count: usize = shape.iter().product();
        if name.ends_with(".bias") {
            file.extend(std::iter::repeat_n(0f32.to_le_bytes(), count).flatten());
        } else if shape.len() == 1 {
            file.extend(std::iter::repeat_n(1f32.to_le_bytes(), count).flatten());
        } else {
            let std = 1.0 / (shape[1] as f64).sqrt();
            for _ in 0..count {
                file.extend_from_slice(&((rng.normal() * std) as f32).to_le_bytes());
            }
        }
    }
    Ok(Checkpoint::from_bytes("random-flux", file)?)
}

#[cfg(test)]
mod random_tests {
    use super::*;
    use crate::models::{FluxInputs, NoHooks};
    use burn::tensor::Tensor;

    #[test]
    fn random_model_is_seeded_and_sane() {
        let device = Device::default();
        let config = FluxConfig::from_json(
            r#"{"in_channels": 8, "num_layers": 1, "num_single_layers": 1,
                "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 12,
                "pooled_projection_dim": 6, "axes_dims_rope": [2, 2, 4]}"#,
            "test",
        )
        .unwrap();
        let a = random_checkpoint(&config, 7).unwrap();
        let b = random_checkpoint(&config, 7).unwrap();
        let c = random_checkpoint(&config, 8).unwrap();
        let name = "transformer_blocks.0.attn.to_q.weight";
        let values = |ck: &Checkpoint| ck.tensor_data(name).unwrap().try_to_vec::<f32>().unwrap();
        assert_eq!(values(&a), values(&b));
        assert_ne!(values(&a), values(&c));
        let w = values(&a);
        let var = w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32;
        assert!(
            (var * 16.0 - 1.0).abs() < 0.5,
            "variance {var} is not 1/fan_in"
        );

        let model = FluxTransformer::random(config, &device, Precision::F32, 7).unwrap();
        let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
        let inputs = FluxInputs {
            hidden_states: Tensor::random([1, 4, 8], normal, &device),
            encoder_hidden_states: Tensor::random([1, 3, 12], normal, &device),
            pooled_projections: Tensor::random([1, 6], normal, &device),
            timestep: Tensor::full([1], 0.5, &device),
            img_ids: Tensor::zeros([4, 3], &device),
            txt_ids: Tensor::zeros([3, 3], &device),
            guidance: None,
        };
        let out: Vec<f32> = model
            .forward(&inputs, &mut NoHooks)
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap();
        assert_eq!(out.len(), 4 * 8);
        assert!(out.iter().all(|x| x.is_finite() && x.abs() < 100.0));
    }
}
