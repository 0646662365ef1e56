//! The Llama-family network and its checkpoint loader.

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use cachet_tensor::kernels::{AttentionShape, causal_attention};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{MemoryFootprint, Precision, ensure_supported, is_host_device};

use super::config::LlamaConfig;
use super::context::{ForwardContext, MaskNeed};
use super::quantizable::{
    EMBED_TOKENS, FINAL_NORM, LayerProjections, layer_norms, lm_head as lm_head_spec,
};
use super::rope::{RotaryEmbedding, apply_rotary};
use cachet_kv::{Cache, KvView, MaskLayout};
use cachet_nn::{
    FastDenseFactory, HostDense, LinearFactory, LinearLayer, LinearOp, LinearSpec, Loader,
    Pretrained, RmsNorm, round_slice, tensor_to_host,
};
use cachet_nn::{ModelError, Result};

/// Query tokens from which attention runs as one fused, KV-tiled op (flash attention on the CPU
/// backend) instead of explicit score tensors; decode steps stay on the strided matmuls, which
/// read the cache in place.
const FUSED_ATTENTION_MIN_QUERIES: usize = 16;

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
    /// Applies the MLP; a projection's error (see [`LinearOp::forward`]) is returned.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        if let (Some(gate), Some(up), Some(down)) = (
            self.gate_proj.host_op(),
            self.up_proj.host_op(),
            self.down_proj.host_op(),
        ) && let Some(y) = Self::forward_host(gate, up, down, x.clone())?
        {
            return Ok(y);
        }
        let gate = silu(self.gate_proj.forward(x.clone())?);
        self.down_proj.forward(gate * self.up_proj.forward(x)?)
    }

    /// The whole MLP in host memory: one trip of the activations to the host and back instead
    /// of one per projection, `silu(gate) * up` fused in the same pass (values rounded to the
    /// activations' dtype at the same points as the tensor path).
    fn forward_host(
        gate: &Arc<dyn LinearOp>,
        up: &Arc<dyn LinearOp>,
        down: &Arc<dyn LinearOp>,
        x: Tensor<3>,
    ) -> Result<Option<Tensor<3>>> {
        let device = x.device();
        let dtype = x.dtype();
        let [b, s, _] = x.dims();
        let (data, rows) = tensor_to_host(x)?;
        let Some(y) = Self::host_values(gate, up, down, &data, rows, dtype)? else {
            return Ok(None);
        };
        let out = down.out_features();
        Ok(Some(Tensor::from_data(
            TensorData::new(y, [b, s, out]),
            (&device, dtype),
        )))
    }

    /// The MLP on `[rows, hidden]` host activations; `None` when a projection has no host path.
    pub(super) fn host_values(
        gate: &Arc<dyn LinearOp>,
        up: &Arc<dyn LinearOp>,
        down: &Arc<dyn LinearOp>,
        data: &[f32],
        rows: usize,
        dtype: DType,
    ) -> Result<Option<Vec<f32>>> {
        let Some(mut g) = gate.forward_host(data, rows)? else {
            return Ok(None);
        };
        let Some(mut u) = up.forward_host(data, rows)? else {
            return Ok(None);
        };
        round_slice(dtype, &mut g);
        round_slice(dtype, &mut u);
        if dtype == DType::F32 {
            cachet_tensor::kernels::silu_mul(&mut g, &u);
        } else {
            // Half precision rounds after each tensor op of the tensor path (sigmoid, x ·
            // sigmoid, · up), each computed in f32 as burn's CPU backend does.
            let round = |v: f32| {
                let mut a = [v];
                round_slice(dtype, &mut a);
                a[0]
            };
            for (g, u) in g.iter_mut().zip(&u) {
                let s = round(cachet_tensor::kernels::sigmoid(*g));
                *g = round(round(*g * s) * u);
            }
        }
        down.forward_host(&g, rows)
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

impl Attention {
    /// The query, key and value projections; on the host, from one copy of the activations.
    fn project_qkv(&self, x: Tensor<3>) -> Result<(Tensor<3>, Tensor<3>, Tensor<3>)> {
        if let (Some(q), Some(k), Some(v)) = (
            self.q_proj.host_op(),
            self.k_proj.host_op(),
            self.v_proj.host_op(),
        ) {
            let device = x.device();
            let dtype = x.dtype();
            let [b, s, _] = x.dims();
            let (data, rows) = tensor_to_host(x.clone())?;
            let run = |op: &Arc<dyn LinearOp>| -> Result<Option<Tensor<3>>> {
                Ok(op.forward_host(&data, rows)?.map(|y| {
                    Tensor::<3>::from_data(
                        TensorData::new(y, [b, s, op.out_features()]),
                        (&device, dtype),
                    )
                }))
            };
            if let (Some(q), Some(k), Some(v)) = (run(q)?, run(k)?, run(v)?) {
                return Ok((q, k, v));
            }
        }
        Ok((
            self.q_proj.forward(x.clone())?,
            self.k_proj.forward(x.clone())?,
            self.v_proj.forward(x)?,
        ))
    }

    fn forward(
        &self,
        x: Tensor<3>,
        ctx: &ForwardContext,
        cache: Option<&mut dyn Cache>,
    ) -> Result<Tensor<3>> {
        let [batch, seq, _] = x.dims();
        let (heads, kv_heads, dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let split = |t: Tensor<3>, h: usize| t.reshape([batch, seq, h, dim]).swap_dims(1, 2);
        let (q, k, v) = self.project_qkv(x)?;
        let (q, k, v) = (split(q, heads), split(k, kv_heads), split(v, kv_heads));
        let q = apply_rotary(q, &ctx.cos, &ctx.sin);
        let k = apply_rotary(k, &ctx.cos, &ctx.sin);

        let view = match cache {
            Some(cache) => cache
                .update_view(self.layer, k, v, &ctx.cache_position)
                .map_err(ModelError::cache)?,
            None => KvView::dense(k, v, MaskLayout::contiguous(ctx.cache_position[0], seq)),
        };
        // The view checks itself against its layout and drops a preallocated cache's unused slots.
        let view = view.for_attention().map_err(ModelError::cache)?;
        let out = self.attend(q, view, ctx)?;
        self.o_proj.forward(out)
    }

    /// Attention of the rotated queries `q` `[batch, heads, seq, head_dim]` over `view`, before
    /// the output projection: `[batch, seq, heads * head_dim]`.
    pub(super) fn attend(
        &self,
        q: Tensor<4>,
        view: KvView,
        ctx: &ForwardContext,
    ) -> Result<Tensor<3>> {
        let [batch, _, seq, _] = q.dims();
        let (heads, kv_heads, dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let layout = view.layout;
        let kv_len = layout.kv_length;
        let need = ctx.mask_need(&layout, self.sliding_window);
        let device = q.device();

        if view.is_plain() && ctx.fused_attention && seq >= FUSED_ATTENTION_MIN_QUERIES {
            // Keys and values are plain tensors: a fused kernel reads them directly.
            let (k, v) = (view.keys, view.values);
            if let Some(window) = ctx.causal_window(&layout, self.sliding_window) {
                // A prompt over contiguous keys: cachet's tiled kernel, which skips the tiles
                // the causal mask or the window would zero.
                let dtype = q.dtype();
                let shape = AttentionShape {
                    batch,
                    heads,
                    kv_heads,
                    q_len: seq,
                    kv_len,
                    head_dim: dim,
                    v_dim: v.dims()[3],
                };
                let host = |t: Tensor<4>| tensor_to_host(t).map(|(values, _)| values);
                let scale = 1.0 / (dim as f32).sqrt();
                let out = causal_attention(&host(q)?, &host(k)?, &host(v)?, shape, window, scale)
                    .map_err(|e| ModelError::Input(e.to_string()))?;
                let out = Tensor::<4>::from_data(
                    TensorData::new(out, [batch, heads, seq, shape.v_dim]),
                    (&device, dtype),
                );
                let out = out.swap_dims(1, 2).reshape([batch, seq, heads * dim]);
                return Ok(out);
            }
            // Padding, sinks or ring buffers: burn's fused op with the mask (KV tiles with an
            // online softmax, grouped-query heads read in place).
            let (mask, is_causal) = match need {
                MaskNeed::Nothing => (None, false),
                MaskNeed::Causal => (None, true),
                MaskNeed::Explicit => (
                    Some(ctx.mask(layout, self.sliding_window, batch, &device)?),
                    false,
                ),
            };
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal,
            };
            let out = attention(q, k, v, mask, None, options);
            let out = out.swap_dims(1, 2).reshape([batch, seq, heads * dim]);
            return Ok(out);
        }

        // Grouped-query attention without copying keys: fold the query heads that share a kv
        // head into the query rows, [b, kv, rep * seq, d] against [b, kv, kv_len, d]. The view
        // does what is specific to its cache (keys kept compact, keys stored RoPE-shifted).
        let rep = heads / kv_heads;
        let scores = view
            .scores(q.reshape([batch, kv_heads, rep * seq, dim]))
            .map_err(ModelError::cache)?
            .mul_scalar(1.0 / (dim as f64).sqrt());
        let scores = if need == MaskNeed::Nothing {
            scores
        } else {
            let mask = ctx.mask(layout, self.sliding_window, batch, &device)?;
            scores.mask_fill(mask.repeat_dim(2, rep), f32::MIN)
        };
        let out = view
            .weighted_values(softmax(scores, 3))
            .map_err(ModelError::cache)?;
        let out = out.reshape([batch, heads, seq, dim]);
        Ok(out.swap_dims(1, 2).reshape([batch, seq, heads * dim]))
    }
}

/// Token embeddings: burn's `Embedding` on a compute device, or on the host a [`HostDense`]
/// matrix that a tied `lm_head` multiplies with directly (one copy of the matrix, no transpose).
#[derive(Module, Debug)]
pub struct TokenEmbedding {
    dense: Option<Embedding>,
    #[module(skip)]
    host: Option<Arc<HostDense>>,
}

impl TokenEmbedding {
    /// Embeddings held by burn's `Embedding` (`[vocab, hidden]`).
    pub fn dense(embedding: Embedding) -> Self {
        Self {
            dense: Some(embedding),
            host: None,
        }
    }

    /// Embeddings held in host memory.
    pub fn host(matrix: Arc<HostDense>) -> Self {
        Self {
            dense: None,
            host: Some(matrix),
        }
    }

    /// The host matrix, when the embeddings live in host memory.
    pub fn as_host(&self) -> Option<&Arc<HostDense>> {
        self.host.as_ref()
    }

    /// The burn embedding, when the embeddings are a tensor.
    pub fn as_dense(&self) -> Option<&Embedding> {
        self.dense.as_ref()
    }

    /// dtype of the stored embeddings.
    pub fn dtype(&self) -> DType {
        match (&self.dense, &self.host) {
            (Some(e), _) => e.weight.val().dtype(),
            (None, Some(h)) => match h.weight().dtype() {
                cachet_tensor::kernels::WeightDType::F32 => DType::F32,
                cachet_tensor::kernels::WeightDType::Bf16 => DType::BF16,
                cachet_tensor::kernels::WeightDType::F16 => DType::F16,
            },
            (None, None) => DType::F32,
        }
    }

    /// `[batch, seq, hidden]` embeddings of `ids` in `dtype` on `device`.
    fn forward(&self, ids: Tensor<2, Int>, dtype: DType, device: &Device) -> Result<Tensor<3>> {
        match (&self.dense, &self.host) {
            (Some(e), _) => Ok(e.forward(ids)),
            (None, Some(h)) => {
                let [b, s] = ids.dims();
                let ids = ids
                    .try_into_data()
                    .map_err(|err| cachet_tensor::TensorError::Transfer {
                        what: "input_ids to host".into(),
                        reason: err.to_string(),
                    })?
                    .convert::<i64>()
                    .try_into_vec::<i64>()
                    .map_err(|err| ModelError::Input(format!("reading input_ids: {err:?}")))?;
                let rows = h.gather_rows(&ids)?;
                Ok(Tensor::from_data(
                    TensorData::new(rows, [b, s, h.in_features()]),
                    (device, dtype),
                ))
            }
            (None, None) => Err(ModelError::Input("the model has no embeddings".into())),
        }
    }
}

impl MemoryFootprint for TokenEmbedding {
    fn memory_bytes(&self) -> usize {
        match (&self.dense, &self.host) {
            (Some(e), _) => e.weight.val().memory_bytes(),
            (None, Some(h)) => h.memory_bytes(),
            (None, None) => 0,
        }
    }
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
            .forward(self.post_attention_layernorm.forward(x.clone()))?;
        Ok(x + h)
    }
}

/// A Llama-family causal language model (`*ForCausalLM`).
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embeddings.
    pub embed_tokens: TokenEmbedding,
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
    /// The compute device.
    #[module(skip)]
    device: Device,
    /// The compute dtype.
    #[module(skip)]
    pub(super) dtype: DType,
}

impl Llama {
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
        self.device.clone()
    }

    /// Logits `[batch, seq, vocab]` (f32) for `input_ids` `[batch, seq]` without a cache.
    ///
    /// `attention_mask` `[batch, seq]` has 1 for real tokens and 0 for padding; `position_ids`
    /// default to the positions of the mask's real tokens (`cumsum(mask) - 1`: 0, 1, 2... after
    /// left padding).
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
        cache: Option<&mut dyn Cache>,
    ) -> Result<Tensor<3>> {
        self.forward_keep(input_ids, attention_mask, position_ids, cache, 0)
    }

    /// [`Llama::forward_with_cache`] computing logits for the last `logits_to_keep` positions
    /// only (0 = all), as transformers' `logits_to_keep`: generation needs just the last one,
    /// which spares a prompt's `seq × vocab` head projection.
    pub fn forward_keep(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        position_ids: Option<Tensor<2, Int>>,
        mut cache: Option<&mut dyn Cache>,
        logits_to_keep: usize,
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
            fused_attention: is_host_device(&self.device),
            masks: RefCell::new(Vec::new()),
        };
        let mut x = self
            .embed_tokens
            .forward(input_ids, self.dtype, &self.device)?;
        if self.forward_host_applies(&ctx) {
            let hidden = x.dims()[2];
            let (h, _) = tensor_to_host(x)?;
            let cache = cache.as_mut().map(|c| &mut **c as &mut dyn Cache);
            let h = self.forward_host(h, (batch, seq), &ctx, cache)?;
            x = Tensor::from_data(TensorData::new(h, [batch, seq, hidden]), &self.device);
        } else {
            for layer in &self.layers {
                let cache = cache.as_mut().map(|c| &mut **c as &mut dyn Cache);
                x = layer.forward(x, &ctx, cache)?;
            }
        }
        let x = if logits_to_keep > 0 && logits_to_keep < seq {
            let hidden = x.dims()[2];
            x.slice([0..batch, seq - logits_to_keep..seq, 0..hidden])
        } else {
            x
        };
        let x = self.norm.forward(x);
        let logits = match (&self.lm_head, &self.embed_tokens) {
            (Some(head), _) => head.forward(x)?,
            (None, e) => match (e.as_host(), e.as_dense()) {
                (Some(host), _) => host.forward(x)?,
                (None, Some(dense)) => x.matmul(dense.weight.val().transpose().unsqueeze::<3>()),
                (None, None) => {
                    return Err(ModelError::Input("the model has no embeddings".into()));
                }
            },
        };
        Ok(logits.cast(DType::F32))
    }
}

/// Position ids from an attention mask, as transformers 5's generate computes them:
/// `cumsum(mask) - 1`, with padding positions set to 0 (they are masked anyway).
pub(crate) fn default_position_ids(attention_mask: Tensor<2, Int>) -> Tensor<2, Int> {
    let positions = attention_mask.clone().cumsum(1).sub_scalar(1);
    positions.mask_fill(attention_mask.equal_elem(0), 0)
}

impl Pretrained for Llama {
    type Config = LlamaConfig;

    fn read_config(dir: &Path) -> Result<LlamaConfig> {
        LlamaConfig::from_file(dir.join("config.json"))
    }

    fn default_factory() -> &'static dyn LinearFactory {
        &FastDenseFactory
    }

    fn load_with(
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
        let norm = |name: &str| loader.rms_norm(name, hidden, config.rms_norm_eps);
        let build = |spec: &LinearSpec| factory.build(spec, checkpoint, device, loader.dtype);
        // Grown as layers load: a config's layer count is not trusted for an allocation.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let specs = LayerProjections::new(&config, i);
            let [input_norm, post_attention_norm] = layer_norms(i);
            layers.push(DecoderLayer {
                input_layernorm: norm(&input_norm)?,
                self_attn: Attention {
                    q_proj: build(&specs.q_proj)?,
                    k_proj: build(&specs.k_proj)?,
                    v_proj: build(&specs.v_proj)?,
                    o_proj: build(&specs.o_proj)?,
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_dim,
                    sliding_window: config.sliding_window_for(i),
                    layer: i,
                },
                post_attention_layernorm: norm(&post_attention_norm)?,
                mlp: Mlp {
                    gate_proj: build(&specs.gate_proj)?,
                    up_proj: build(&specs.up_proj)?,
                    down_proj: build(&specs.down_proj)?,
                },
            });
        }
        let embed_name = format!("{EMBED_TOKENS}.weight");
        let embed = loader.tensor::<2>(&embed_name, [config.vocab_size, hidden])?;
        let embed_tokens = if is_host_device(device) {
            // In host memory, where a tied lm_head's gemv reads the same matrix.
            let matrix = cachet_nn::matrix_from_data(embed.into_data(), "embed_tokens")?;
            TokenEmbedding::host(Arc::new(HostDense::new(matrix, None, precision.dtype())?))
        } else {
            TokenEmbedding::dense(Embedding {
                weight: Param::from_tensor(embed),
            })
        };
        let lm_head = lm_head_spec(&config).map(|s| build(&s)).transpose()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: norm(FINAL_NORM)?,
            lm_head,
            rotary: RotaryEmbedding::new(config.rope()?, head_dim, device),
            config,
            device: device.clone(),
            dtype: precision.dtype(),
        })
    }
}
