//! The forward on the host: decode steps and prompts through every layer with the residual
//! stream in host memory. Norms, RoPE, the projections, the MLP and (for a cache read in place)
//! attention run as host kernels; only the KV cache update goes through the cache's tensors.
//! This removes the ≈30 tensor ops per layer of the general path, which cost as much as the
//! weights' memory traffic on a small model in a decode step, and which run on one thread, with
//! a copy each, in a prompt.

use std::sync::Arc;

use burn::tensor::{DType, Tensor, TensorData};
use cachet_kv::{Cache, KvView, MaskLayout};
use cachet_nn::{LinearOp, ModelError, Result, RmsNorm, tensor_to_host};
use cachet_tensor::kernels::{causal_attention_strided, decode_attention, rms_norm, rotate_half};
use cachet_tensor::{HostStrided, read_host_f32};

use super::context::{ForwardContext, MaskNeed};
use super::model::{DecoderLayer, Llama, Mlp};

/// The host operations of one layer, when all seven projections have one.
struct HostLayer<'a> {
    layer: &'a DecoderLayer,
    q: &'a Arc<dyn LinearOp>,
    k: &'a Arc<dyn LinearOp>,
    v: &'a Arc<dyn LinearOp>,
    o: &'a Arc<dyn LinearOp>,
    gate: &'a Arc<dyn LinearOp>,
    up: &'a Arc<dyn LinearOp>,
    down: &'a Arc<dyn LinearOp>,
}

impl<'a> HostLayer<'a> {
    fn new(layer: &'a DecoderLayer) -> Option<Self> {
        let attn = &layer.self_attn;
        let mlp = &layer.mlp;
        Some(Self {
            layer,
            q: attn.q_proj.host_op()?,
            k: attn.k_proj.host_op()?,
            v: attn.v_proj.host_op()?,
            o: attn.o_proj.host_op()?,
            gate: mlp.gate_proj.host_op()?,
            up: mlp.up_proj.host_op()?,
            down: mlp.down_proj.host_op()?,
        })
    }
}

/// A projection that declared a host path and then had none: not expected, reported as such.
fn host(op: &Arc<dyn LinearOp>, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    op.forward_host(x, rows)?
        .ok_or_else(|| ModelError::Input(format!("{op:?} declared a host path it lacks")))
}

/// `norm(x)` on the host, the weight read in place (checked by [`Llama::decode_host_applies`]).
fn norm_host(norm: &RmsNorm, x: &[f32]) -> Result<Vec<f32>> {
    let mut out = vec![0.0; x.len()];
    let weight = norm.weight.val();
    read_host_f32(&weight, |w| {
        let w = w.row([0])?;
        rms_norm(x, w, norm.eps as f32, &mut out);
        Some(())
    })
    .flatten()
    .ok_or_else(|| ModelError::Input("a norm weight is not readable on the host".into()))?;
    Ok(out)
}

/// Whether `norm`'s weight is an f32 host tensor read in place.
fn norm_readable(norm: &RmsNorm) -> bool {
    read_host_f32(&norm.weight.val(), |w| w.row([0]).is_some()) == Some(true)
}

impl Llama {
    /// Whether [`Llama::forward_host`] applies to this forward: f32 on the host backend,
    /// positions following the cache (no padding mask), every projection with a host path.
    pub(super) fn forward_host_applies(&self, ctx: &ForwardContext) -> bool {
        ctx.fused_attention && ctx.attention_mask.is_none() && self.host_decodable()
    }

    /// Whether the weights allow the host decode step: f32 activations, every projection with
    /// a host path, norm weights readable in place.
    fn host_decodable(&self) -> bool {
        self.dtype == DType::F32
            && self.layers.iter().all(|l| {
                HostLayer::new(l).is_some()
                    && norm_readable(&l.input_layernorm)
                    && norm_readable(&l.post_attention_layernorm)
            })
    }

    /// Runs every layer for the `[batch, seq, hidden]` host embeddings `x`; returns the final
    /// hidden states `[batch, seq, hidden]` before the final norm. Call only where
    /// [`Llama::forward_host_applies`].
    pub(super) fn forward_host(
        &self,
        mut x: Vec<f32>,
        (batch, seq): (usize, usize),
        ctx: &ForwardContext,
        mut cache: Option<&mut dyn Cache>,
    ) -> Result<Vec<f32>> {
        let rows = batch * seq;
        let (cos, _) = tensor_to_host(ctx.cos.clone())?;
        let (sin, _) = tensor_to_host(ctx.sin.clone())?;
        for layer in &self.layers {
            let ops = HostLayer::new(layer)
                .ok_or_else(|| ModelError::Input("a projection has no host path".into()))?;
            let cache = cache.as_mut().map(|c| &mut **c as &mut dyn Cache);
            let h = norm_host(&layer.input_layernorm, &x)?;
            let attn = self.attention_host(&ops, &h, (batch, seq), ctx, (&cos, &sin), cache)?;
            let o = host(ops.o, &attn, rows)?;
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = norm_host(&layer.post_attention_layernorm, &x)?;
            let m = Mlp::host_values(ops.gate, ops.up, ops.down, &h, rows, DType::F32)?
                .ok_or_else(|| ModelError::Input("an MLP projection lost its host path".into()))?;
            x.iter_mut().zip(&m).for_each(|(x, m)| *x += m);
        }
        Ok(x)
    }

    /// Self-attention of one layer for normed activations `h` `[batch, seq, hidden]`, before
    /// the output projection: `[batch, seq, heads * head_dim]`.
    fn attention_host(
        &self,
        ops: &HostLayer<'_>,
        h: &[f32],
        (batch, seq): (usize, usize),
        ctx: &ForwardContext,
        (cos, sin): (&[f32], &[f32]),
        cache: Option<&mut dyn Cache>,
    ) -> Result<Vec<f32>> {
        let attn = &ops.layer.self_attn;
        let (heads, kv_heads, dim) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
        let rows = batch * seq;
        let mut q = host(ops.q, h, rows)?;
        let mut k = host(ops.k, h, rows)?;
        let v = host(ops.v, h, rows)?;
        rotate_half(&mut q, dim, cos, sin);
        rotate_half(&mut k, dim, cos, sin);
        let device = self.device();
        // Token-first `[batch, seq, h, width]` values as the `[batch, h, seq, width]` tensor the
        // cache and the tensor attention take (the same layout when seq is 1).
        let tensor = |values: Vec<f32>, h: usize| {
            let width = values.len() / (rows * h);
            let values = if seq == 1 {
                values
            } else {
                heads_first(&values, (batch, seq, h, width))
            };
            Tensor::<4>::from_data(TensorData::new(values, [batch, h, seq, width]), &device)
        };
        let (kt, vt) = (tensor(k, kv_heads), tensor(v, kv_heads));
        let view = match cache {
            Some(cache) => cache
                .update_view(attn.layer, kt, vt, &ctx.cache_position)
                .map_err(ModelError::cache)?,
            None => KvView::dense(kt, vt, MaskLayout::contiguous(ctx.cache_position[0], seq)),
        };
        let view = view.for_attention().map_err(ModelError::cache)?;
        if view.is_plain() {
            let scale = 1.0 / (dim as f32).sqrt();
            let read = |f: &dyn Fn(HostStrided<'_, 4>, HostStrided<'_, 4>) -> Option<Vec<f32>>| {
                read_host_f32(&view.keys, |keys| {
                    read_host_f32(&view.values, |values| f(keys, values))
                })
                .flatten()
                .flatten()
            };
            let out = if seq == 1 {
                (ctx.mask_need(&view.layout, attn.sliding_window) == MaskNeed::Nothing)
                    .then(|| read(&|keys, values| decode_attention(&q, heads, keys, values, scale)))
                    .flatten()
            } else {
                // A prompt over contiguous positions: the tiled causal kernel, keys and values
                // read where the cache keeps them.
                ctx.causal_window(&view.layout, attn.sliding_window)
                    .and_then(|window| {
                        read(&|keys, values| {
                            causal_attention_strided(&q, heads, keys, values, window, scale).ok()
                        })
                    })
            };
            if let Some(out) = out {
                return Ok(out);
            }
        }
        // Masks, sinks, compact prefixes or another layout: the tensor path.
        let out = attn.attend(tensor(q, heads), view, ctx)?;
        Ok(tensor_to_host(out)?.0)
    }
}

/// `[batch, seq, heads, width]` values reordered to `[batch, heads, seq, width]`.
fn heads_first(
    values: &[f32],
    (batch, seq, heads, width): (usize, usize, usize, usize),
) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for b in 0..batch {
        for s in 0..seq {
            for h in 0..heads {
                let src = ((b * seq + s) * heads + h) * width;
                let dst = ((b * heads + h) * seq + s) * width;
                out[dst..dst + width].copy_from_slice(&values[src..src + width]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, Tensor, TensorData};
    use cachet_kv::{CacheConfig, CacheImplementation, build_cache};
    use cachet_nn::{DenseFactory, Pretrained};
    use cachet_tensor::{Precision, cpu_device};

    use crate::Llama;
    use crate::embedded;

    /// Logits of a `prompt`-token prompt then `steps` single-token steps through a cache of
    /// `kind`.
    fn run(model: &Llama, kind: CacheImplementation, prompt: usize, steps: usize) -> Vec<Vec<f32>> {
        let device = model.device();
        let config = CacheConfig {
            sliding_window: Some(6),
            window_length: Some(7),
            num_sink_tokens: Some(2),
            residual_length: Some(2),
            ..CacheConfig::default()
        };
        let mut cache = build_cache(
            kind,
            &config,
            &model.cache_info(),
            &device,
            prompt + steps + 8,
        )
        .unwrap();
        let ids = |v: Vec<i64>, n: usize| {
            Tensor::<2, Int>::from_data(TensorData::new(v, [2, n]), &device)
        };
        let mut out = Vec::new();
        let mut logits = model
            .forward_keep(
                ids(
                    (0..2 * prompt as i64).map(|i| (i * 37 + 5) % 200).collect(),
                    prompt,
                ),
                None,
                None,
                Some(&mut *cache),
                1,
            )
            .unwrap();
        for step in 0..steps {
            let flat: Vec<f32> = logits.into_data().convert::<f32>().try_to_vec().unwrap();
            out.push(flat);
            let next = vec![(step * 7 + 3) as i64, (step * 5 + 11) as i64];
            logits = model
                .forward_keep(ids(next, 1), None, None, Some(&mut *cache), 1)
                .unwrap();
        }
        out.push(logits.into_data().convert::<f32>().try_to_vec().unwrap());
        out
    }

    #[test]
    fn the_host_forward_equals_the_tensor_path_for_every_cache() {
        let device = cpu_device().unwrap();
        let checkpoint = embedded::checkpoint().unwrap();
        let config = embedded::config().unwrap();
        let fast = Llama::load(config.clone(), &checkpoint, &device, Precision::F32).unwrap();
        let general =
            Llama::load_with(config, &checkpoint, &device, Precision::F32, &DenseFactory).unwrap();
        assert!(
            fast.host_decodable(),
            "the default loader gives host projections"
        );
        assert!(!general.host_decodable(), "burn's Linear has no host path");
        // Plain caches read in place; a window that cuts, sinks and a quantized prefix take the
        // tensor attention inside the host step.
        for kind in [
            CacheImplementation::Dynamic,
            CacheImplementation::Static,
            CacheImplementation::SlidingWindow,
            CacheImplementation::Sink,
            CacheImplementation::Quantized,
        ] {
            // Short prompts and one longer than a key tile and the windows (a sink cache takes
            // no prompt longer than its window).
            let prompts: &[usize] = if kind == CacheImplementation::Sink {
                &[4]
            } else {
                &[4, 70]
            };
            for &prompt in prompts {
                let (a, b) = (run(&fast, kind, prompt, 6), run(&general, kind, prompt, 6));
                for (step, (a, b)) in a.iter().zip(&b).enumerate() {
                    let worst = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0, f32::max);
                    assert!(
                        worst < 1e-4,
                        "{kind:?} prompt {prompt} step {step}: logits differ by {worst}"
                    );
                }
            }
        }
    }
}
