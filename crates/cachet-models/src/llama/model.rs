//! The Llama-family network and its checkpoint loader.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use cachet_tensor::{Checkpoint, Precision, ensure_supported};

use super::config::LlamaConfig;
use super::rope::{RotaryEmbedding, apply_rotary};
use crate::error::{ModelError, Result};
use crate::linear::{DenseFactory, LinearFactory, LinearLayer, Loader};
use cachet_kv::{Cache, KvView, MaskLayout};

/// Root-mean-square layer norm, computed in f32 as transformers does.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Per-channel scale.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl RmsNorm {
    /// `weight * x / sqrt(mean(x²) + eps)`, in f32, cast back to the input dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let variance = x.clone().square().mean_dim(D - 1);
        let normed = (x * variance.add_scalar(self.eps).sqrt().recip()).cast(dtype);
        let width = self.weight.dims()[0];
        let mut shape = [1; D];
        shape[D - 1] = width;
        normed * self.weight.val().reshape(shape)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: LinearLayer,
    /// Up projection.
    pub up_proj: LinearLayer,
    /// Down projection.
    pub down_proj: LinearLayer,
}

impl Mlp {
    /// Applies the MLP.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// Grouped-query self-attention with RoPE and an optional KV cache.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: LinearLayer,
    /// Key projection.
    pub k_proj: LinearLayer,
    /// Value projection.
    pub v_proj: LinearLayer,
    /// Output projection.
    pub o_proj: LinearLayer,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Sliding window of this layer, if any.
    pub sliding_window: Option<usize>,
    /// Index of this layer (for the cache).
    pub layer: usize,
}

/// What every layer of one forward shares: RoPE tables, positions and the padding mask.
struct ForwardContext<'a> {
    cos: Tensor<4>,
    sin: Tensor<4>,
    cache_position: Vec<usize>,
    attention_mask: Option<Tensor<2, Int>>,
    /// RoPE frequencies per position (linear scaling folded in), for a sink cache's shift.
    rope_inv_freq: &'a [f32],
}

impl Attention {
    fn forward(
        &self,
        x: Tensor<3>,
        ctx: &ForwardContext,
        cache: Option<&mut dyn Cache>,
    ) -> Result<Tensor<3>> {
        let [batch, seq, _] = x.dims();
        let (heads, kv_heads, dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let split = |t: Tensor<3>, h: usize| t.reshape([batch, seq, h, dim]).swap_dims(1, 2);
        let q = split(self.q_proj.forward(x.clone()), heads);
        let k = split(self.k_proj.forward(x.clone()), kv_heads);
        let v = split(self.v_proj.forward(x), kv_heads);
        let q = apply_rotary(q, &ctx.cos, &ctx.sin);
        let k = apply_rotary(k, &ctx.cos, &ctx.sin);

        let view = match cache {
            Some(cache) => cache.update_view(self.layer, k, v, &ctx.cache_position)?,
            None => KvView::dense(k, v, MaskLayout::contiguous(ctx.cache_position[0], seq)),
        };
        // A quantized cache hands its old tokens over still quantized (`prefix`): they are
        // attended to in place, tile by tile, and only the recent tokens are dense tensors.
        let prefix_len = view.prefix_len();
        let KvView {
            prefix,
            keys: k,
            values: v,
            layout,
        } = view;
        let dense_len = k.dims()[2];
        let kv_len = prefix_len + dense_len;
        if kv_len != layout.kv_length || (prefix_len > 0 && layout.rope_shift > 0) {
            return Err(ModelError::Input(format!(
                "cache returned {kv_len} keys ({prefix_len} quantized) but a mask layout of {} \
                 (rope shift {})",
                layout.kv_length, layout.rope_shift
            )));
        }

        // Grouped-query attention without copying keys: fold the query heads that share a kv
        // head into the query rows, [b, kv, rep * seq, d] against [b, kv, kv_len, d].
        let rep = heads / kv_heads;
        let fold = |q: Tensor<4>| q.reshape([batch, kv_heads, rep * seq, dim]);
        let scores = if layout.rope_shift > 0 {
            // A sink cache stores its recent keys `rope_shift` positions ahead: rotate the query
            // forward by as much for them, and attend to the sinks with the plain query.
            let sinks = layout.sink_tokens.min(kv_len);
            let shifted =
                cachet_kv::sink::rotate_by(q.clone(), ctx.rope_inv_freq, layout.rope_shift);
            let k_sinks = k.clone().slice([0..batch, 0..kv_heads, 0..sinks, 0..dim]);
            let k_rest = k
                .clone()
                .slice([0..batch, 0..kv_heads, sinks..kv_len, 0..dim]);
            Tensor::cat(
                vec![
                    fold(q).matmul(k_sinks.swap_dims(2, 3)),
                    fold(shifted).matmul(k_rest.swap_dims(2, 3)),
                ],
                3,
            )
            .cast(DType::F32)
        } else if let Some(prefix) = &prefix {
            Tensor::cat(
                vec![
                    prefix.scores(fold(q.clone()))?,
                    fold(q).matmul(k.swap_dims(2, 3)).cast(DType::F32),
                ],
                3,
            )
        } else {
            fold(q).matmul(k.swap_dims(2, 3)).cast(DType::F32)
        };
        let scores = scores.mul_scalar(1.0 / (dim as f64).sqrt());
        let mask = attention_mask(ctx, layout, self.sliding_window, batch, &scores.device())?;
        let mask = mask.repeat_dim(2, rep);
        let scores = scores.mask_fill(mask, f32::MIN);
        let probs = softmax(scores, 3);
        let rows = rep * seq;
        let out = match &prefix {
            Some(prefix) => {
                let old = probs
                    .clone()
                    .slice([0..batch, 0..kv_heads, 0..rows, 0..prefix_len]);
                let recent = probs.slice([0..batch, 0..kv_heads, 0..rows, prefix_len..kv_len]);
                prefix.weighted_values(old)?.cast(v.dtype()) + recent.cast(v.dtype()).matmul(v)
            }
            None => probs.cast(v.dtype()).matmul(v),
        };
        let out = out.reshape([batch, heads, seq, dim]);
        let out = out.swap_dims(1, 2).reshape([batch, seq, heads * dim]);
        Ok(self.o_proj.forward(out))
    }
}

/// `[batch, 1, seq, kv_len]`, true where a query must not see a key: future keys, keys outside
/// the sliding window, unused cache slots and padding.
fn attention_mask(
    ctx: &ForwardContext,
    layout: MaskLayout,
    window: Option<usize>,
    batch: usize,
    device: &Device,
) -> Result<Tensor<4, Bool>> {
    let seq = ctx.cache_position.len();
    let kv_len = layout.kv_length;
    let mut blocked = Vec::with_capacity(seq * kv_len);
    for &query in &ctx.cache_position {
        for j in 0..kv_len {
            let key = layout.position(j);
            let window = match (window, layout.window) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let outside_window = window.is_some_and(|w| query >= key + w);
            blocked.push(key > query || outside_window || j >= layout.valid_length);
        }
    }
    let structural = Tensor::<2, Bool>::from_data(TensorData::new(blocked, [seq, kv_len]), device)
        .reshape([1, 1, seq, kv_len]);
    let Some(padding) = &ctx.attention_mask else {
        return Ok(structural.repeat_dim(0, batch));
    };
    let [mask_batch, mask_len] = padding.dims();
    if mask_batch != batch {
        return Err(ModelError::Input(format!(
            "attention_mask has batch {mask_batch}, input_ids {batch}"
        )));
    }
    // Padding flags of the keys, by their absolute positions: the sinks, then a contiguous run.
    let columns = |from: usize, to: usize| -> Result<Tensor<2, Bool>> {
        let covered = to.min(mask_len).max(from);
        if covered < to && covered < layout.valid_length.min(to) {
            return Err(ModelError::Input(format!(
                "attention_mask covers {mask_len} positions, but keys reach position {}",
                to - 1
            )));
        }
        let mut part = padding
            .clone()
            .slice([0..batch, from..covered])
            .equal_elem(0);
        if covered < to {
            let tail = Tensor::<2, Bool>::from_data(
                TensorData::new(vec![false; batch * (to - covered)], [batch, to - covered]),
                device,
            );
            part = Tensor::cat(vec![part, tail], 1);
        }
        Ok(part)
    };
    let sinks = layout.sink_tokens.min(kv_len);
    let n = kv_len - sinks;
    let mut rest = columns(layout.kv_offset, layout.kv_offset + n)?;
    let rotation = if n > 0 { layout.rotation % n } else { 0 };
    if rotation > 0 {
        // Physical key j holds logical key (j - rotation) mod n: rotate the flags the same way.
        rest = Tensor::cat(
            vec![
                rest.clone().slice([0..batch, n - rotation..n]),
                rest.slice([0..batch, 0..n - rotation]),
            ],
            1,
        );
    }
    let pad = if sinks > 0 {
        Tensor::cat(vec![columns(0, sinks)?, rest], 1)
    } else {
        rest
    };
    let pad = pad.reshape([batch, 1, 1, kv_len]);
    Ok(structural
        .repeat_dim(0, batch)
        .bool_or(pad.repeat_dim(2, seq)))
}

/// One pre-norm decoder layer: attention and MLP, each with a residual.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// Feed-forward.
    pub mlp: Mlp,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        ctx: &ForwardContext,
        cache: Option<&mut dyn Cache>,
    ) -> Result<Tensor<3>> {
        let h = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), ctx, cache)?;
        let x = x + h;
        let h = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        Ok(x + h)
    }
}

/// A Llama-family causal language model (`*ForCausalLM`).
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embeddings.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output projection; `None` when tied to the embeddings.
    pub lm_head: Option<LinearLayer>,
    /// RoPE frequencies.
    #[module(skip)]
    pub rotary: RotaryEmbedding,
    /// The parsed config.
    #[module(skip)]
    pub config: LlamaConfig,
}

impl Llama {
    /// Loads a Hugging Face checkpoint directory (`config.json` + safetensors, single or sharded)
    /// onto `device` in `precision`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let _span = tracing::info_span!("load_model", dir = %dir.display()).entered();
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::load(config, &checkpoint, device, precision)
    }

    /// Builds the model from a parsed config and an opened checkpoint.
    pub fn load(
        config: LlamaConfig,
        checkpoint: &Checkpoint,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        Self::load_with(config, checkpoint, device, precision, &DenseFactory)
    }

    /// Like [`Llama::load`], with `factory` building every projection (q/k/v/o, the MLP and
    /// `lm_head`): the hook quantizers use to load straight into quantized layers.
    pub fn load_with(
        config: LlamaConfig,
        checkpoint: &Checkpoint,
        device: &Device,
        precision: Precision,
        factory: &dyn LinearFactory,
    ) -> Result<Self> {
        ensure_supported(device, precision)?;
        let loader = Loader {
            checkpoint,
            device,
            dtype: precision.dtype(),
            factory,
        };
        let (hidden, heads, kv_heads, head_dim) = (
            config.hidden_size,
            config.num_attention_heads,
            config.kv_heads(),
            config.head_dim(),
        );
        let inter = config.intermediate_size;
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: Param::from_tensor(
                    loader.tensor::<1>(&format!("{name}.weight"), [hidden])?,
                ),
                eps: config.rms_norm_eps,
            })
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv_bias = config.qkv_bias();
            layers.push(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm"))?,
                self_attn: Attention {
                    q_proj: loader.linear(
                        &format!("{p}.self_attn.q_proj"),
                        hidden,
                        heads * head_dim,
                        qkv_bias,
                    )?,
                    k_proj: loader.linear(
                        &format!("{p}.self_attn.k_proj"),
                        hidden,
                        kv_heads * head_dim,
                        qkv_bias,
                    )?,
                    v_proj: loader.linear(
                        &format!("{p}.self_attn.v_proj"),
                        hidden,
                        kv_heads * head_dim,
                        qkv_bias,
                    )?,
                    o_proj: loader.linear(
                        &format!("{p}.self_attn.o_proj"),
                        heads * head_dim,
                        hidden,
                        config.o_bias(),
                    )?,
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_dim,
                    sliding_window: config.sliding_window_for(i),
                    layer: i,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp {
                    gate_proj: loader.linear(
                        &format!("{p}.mlp.gate_proj"),
                        hidden,
                        inter,
                        config.mlp_bias,
                    )?,
                    up_proj: loader.linear(
                        &format!("{p}.mlp.up_proj"),
                        hidden,
                        inter,
                        config.mlp_bias,
                    )?,
                    down_proj: loader.linear(
                        &format!("{p}.mlp.down_proj"),
                        inter,
                        hidden,
                        config.mlp_bias,
                    )?,
                },
            });
        }
        let embed_tokens = Embedding {
            weight: Param::from_tensor(
                loader.tensor::<2>("model.embed_tokens.weight", [config.vocab_size, hidden])?,
            ),
        };
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(loader.linear("lm_head", hidden, config.vocab_size, false)?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: norm("model.norm")?,
            lm_head,
            rotary: RotaryEmbedding::new(config.rope()?, head_dim, device),
            config,
        })
    }

    /// What a KV cache needs to know about this model.
    pub fn cache_info(&self) -> cachet_kv::ModelCacheInfo {
        cachet_kv::ModelCacheInfo {
            num_layers: self.layers.len(),
            sliding_window: self
                .config
                .sliding_window_for(self.layers.len().saturating_sub(1)),
            rope_inv_freq: self.rotary.angle_per_position().to_vec(),
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.embed_tokens.weight.device()
    }

    /// Logits `[batch, seq, vocab]` (f32) for `input_ids` `[batch, seq]` without a cache.
    ///
    /// `attention_mask` `[batch, seq]` has 1 for real tokens and 0 for padding; `position_ids`
    /// default to [`default_position_ids`] of the mask (0, 1, 2... after left padding).
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        position_ids: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<3>> {
        self.forward_with_cache(input_ids, attention_mask, position_ids, None)
    }

    /// Forward through a KV cache: `input_ids` are the new tokens only, `attention_mask` covers
    /// past and new tokens `[batch, past + seq]`, and `position_ids` default to the next
    /// positions of the mask.
    pub fn forward_with_cache(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        position_ids: Option<Tensor<2, Int>>,
        mut cache: Option<&mut dyn Cache>,
    ) -> Result<Tensor<3>> {
        let [batch, seq] = input_ids.dims();
        if seq == 0 {
            return Err(ModelError::Input("input_ids has no tokens".into()));
        }
        let past = cache.as_ref().map_or(0, |c| c.seq_length(0));
        let _span = tracing::debug_span!("llama_forward", batch, seq, past).entered();
        if let Some(mask) = &attention_mask
            && mask.dims()[1] != past + seq
        {
            return Err(ModelError::Input(format!(
                "attention_mask has {} positions, expected past ({past}) + new tokens ({seq})",
                mask.dims()[1]
            )));
        }
        let position_ids = match position_ids {
            Some(ids) if ids.dims() != [batch, seq] => {
                return Err(ModelError::Input(format!(
                    "position_ids have shape {:?}, input_ids {:?}",
                    ids.dims(),
                    [batch, seq]
                )));
            }
            Some(ids) => ids,
            None => match &attention_mask {
                Some(mask) => {
                    default_position_ids(mask.clone()).slice([0..batch, past..past + seq])
                }
                None => Tensor::<1, Int>::arange(past as i64..(past + seq) as i64, &self.device())
                    .reshape([1, seq])
                    .repeat_dim(0, batch),
            },
        };
        let (cos, sin) = self.rotary.cos_sin(position_ids);
        let ctx = ForwardContext {
            cos,
            sin,
            cache_position: (past..past + seq).collect(),
            attention_mask,
            rope_inv_freq: self.rotary.angle_per_position(),
        };
        let mut x = self.embed_tokens.forward(input_ids);
        for layer in &self.layers {
            let cache = cache.as_mut().map(|c| &mut **c as &mut dyn Cache);
            x = layer.forward(x, &ctx, cache)?;
        }
        let x = self.norm.forward(x);
        let logits = match &self.lm_head {
            Some(head) => head.forward(x),
            None => x.matmul(self.embed_tokens.weight.val().transpose().unsqueeze::<3>()),
        };
        Ok(logits.cast(DType::F32))
    }
}

/// Position ids from an attention mask, as transformers 5's generate computes them:
/// `cumsum(mask) - 1`, with padding positions set to 0 (they are masked anyway).
pub fn default_position_ids(attention_mask: Tensor<2, Int>) -> Tensor<2, Int> {
    let positions = attention_mask.clone().cumsum(1).sub_scalar(1);
    positions.mask_fill(attention_mask.equal_elem(0), 0)
}
