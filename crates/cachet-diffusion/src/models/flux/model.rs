//! The Flux MMDiT (diffusers' `FluxTransformer2DModel`) and its checkpoint loader.
//!
//! The network, as diffusers 0.42.1 runs it: image tokens and text tokens are embedded apart
//! (`x_embedder`, `context_embedder`), a conditioning vector `temb` is made from the timestep, the
//! pooled text embedding and (guidance-distilled variants) the guidance scale; double-stream
//! blocks attend jointly over `[text, image]` with separate weights per stream; single-stream
//! blocks run on the concatenated sequence; `norm_out`/`proj_out` map image tokens back to
//! latent channels. Every block list and attention layer goes through [`DitHooks`].

use std::ops::Range;

use burn::module::Module;
use burn::tensor::activation::{gelu_approximate, silu, softmax};
use burn::tensor::{DType, Tensor, TensorData};
use cachet_tensor::Precision;

use super::config::FluxConfig;
use super::rope::{apply_rotary, rope_tables};
use crate::models::dit_hooks::{
    BlockGroup, BlockStates, DenoiserOutput, DitHooks, ForwardPattern, HookPoint, HookableDit,
    ModuleKind, ModulePath, hooked_module,
};
use cachet_nn::{LinearLayer, ModelError, Result, RmsNorm};

/// Name of the double-stream block list.
pub(crate) const DOUBLE_BLOCKS: &str = "transformer_blocks";
/// Name of the single-stream block list.
pub(crate) const SINGLE_BLOCKS: &str = "single_transformer_blocks";
/// Weights file diffusers writes.
pub(crate) const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// Sharded-weights index diffusers writes for large models.
pub(crate) const WEIGHTS_INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

/// Channels of the sinusoidal timestep projection (`Timesteps(num_channels=256)`).
pub(super) const TIME_CHANNELS: usize = 256;
/// `eps` of every LayerNorm and QK-RMSNorm in Flux.
pub(super) const NORM_EPS: f64 = 1e-6;

/// The inputs of one denoiser call, shaped as `FluxTransformer2DModel.forward` takes them.
#[derive(Clone, Debug)]
pub struct FluxInputs {
    /// Packed latent tokens, `[batch, img_tokens, in_channels]`.
    pub hidden_states: Tensor<3>,
    /// Text-encoder states, `[batch, txt_tokens, joint_attention_dim]`.
    pub encoder_hidden_states: Tensor<3>,
    /// Pooled text embedding, `[batch, pooled_projection_dim]`.
    pub pooled_projections: Tensor<2>,
    /// Timestep as a fraction in `[0, 1]` (`[batch]`); the model multiplies it by 1000.
    pub timestep: Tensor<1>,
    /// Position ids of the image tokens, `[img_tokens, axes]`.
    pub img_ids: Tensor<2>,
    /// Position ids of the text tokens, `[txt_tokens, axes]`.
    pub txt_ids: Tensor<2>,
    /// Guidance scale (`[batch]`), required exactly when the config has `guidance_embeds`.
    pub guidance: Option<Tensor<1>>,
}

impl FluxInputs {
    /// Batch size (rows of `hidden_states`).
    pub fn batch(&self) -> usize {
        self.hidden_states.dims()[0]
    }

    /// The inputs of batch rows `rows` only; position ids are shared by all rows and kept.
    pub fn select_batch(&self, rows: Range<usize>) -> Result<Self> {
        let batch = self.batch();
        if rows.start >= rows.end || rows.end > batch {
            return Err(ModelError::Input(format!(
                "batch rows {rows:?} are not a non-empty part of 0..{batch}"
            )));
        }
        let (start, len) = (rows.start, rows.end - rows.start);
        Ok(Self {
            hidden_states: self.hidden_states.clone().narrow(0, start, len),
            encoder_hidden_states: self.encoder_hidden_states.clone().narrow(0, start, len),
            pooled_projections: self.pooled_projections.clone().narrow(0, start, len),
            timestep: self.timestep.clone().narrow(0, start, len),
            img_ids: self.img_ids.clone(),
            txt_ids: self.txt_ids.clone(),
            guidance: self.guidance.clone().map(|g| g.narrow(0, start, len)),
        })
    }
}

/// Applies a projection to `[batch, features]` rows.
fn linear2(layer: &LinearLayer, x: Tensor<2>) -> Result<Tensor<2>> {
    let [batch, features] = x.dims();
    let y = layer.forward(x.reshape([batch, 1, features]))?;
    let out = y.dims()[2];
    Ok(y.reshape([batch, out]))
}

/// LayerNorm without affine parameters over the last dimension, in f32.
fn layer_norm(x: Tensor<3>, eps: f64) -> Tensor<3> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let (var, mean) = x.clone().var_mean_bias(2);
    ((x - mean) / var.add_scalar(eps).sqrt()).cast(dtype)
}

/// `norm(x) * (1 + scale) + shift`, with `scale`/`shift` `[batch, 1, dim]`.
fn modulate(x: Tensor<3>, scale: &Tensor<3>, shift: &Tensor<3>) -> Tensor<3> {
    layer_norm(x, NORM_EPS) * scale.clone().add_scalar(1.0) + shift.clone()
}

/// `linear(silu(temb))` split into the modulation vectors of an adaLN layer
/// (`AdaLayerNormZero`: 6, `AdaLayerNormZeroSingle`: 3, `AdaLayerNormContinuous`: 2).
#[derive(Module, Debug)]
pub struct AdaModulation {
    /// `linear`: `inner_dim -> chunks · inner_dim`.
    pub linear: LinearLayer,
    /// Number of vectors the output is split into.
    pub chunks: usize,
}

impl AdaModulation {
    /// The modulation vectors, each `[batch, 1, inner_dim]`, in diffusers' chunk order.
    pub fn forward(&self, temb: &Tensor<2>) -> Result<Vec<Tensor<3>>> {
        let emb = linear2(&self.linear, silu(temb.clone()))?;
        let [batch, width] = emb.dims();
        Ok(emb.reshape([batch, 1, width]).chunk(self.chunks, 2))
    }
}

/// `linear_2(silu(linear_1(x)))`: diffusers' `TimestepEmbedding` and the SiLU
/// `PixArtAlphaTextProjection`.
#[derive(Module, Debug)]
pub struct MlpEmbedder {
    /// First projection.
    pub linear_1: LinearLayer,
    /// Second projection.
    pub linear_2: LinearLayer,
}

impl MlpEmbedder {
    /// Applies the embedder to `[batch, features]`.
    pub fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        linear2(&self.linear_2, silu(linear2(&self.linear_1, x)?))
    }
}

/// `CombinedTimestep(Guidance)TextProjEmbeddings`: the conditioning vector `temb`.
#[derive(Module, Debug)]
pub struct TimeTextEmbed {
    /// Embeds the sinusoidal timestep.
    pub timestep_embedder: MlpEmbedder,
    /// Embeds the sinusoidal guidance scale (guidance-distilled variants only).
    pub guidance_embedder: Option<MlpEmbedder>,
    /// Projects the pooled text embedding.
    pub text_embedder: MlpEmbedder,
}

/// Sinusoidal projection of `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`:
/// `[cos(t·f), sin(t·f)]` with `f_i = exp(-ln(10000) · i / 128)`, in f32 like diffusers.
fn timestep_projection(t: Tensor<1>) -> Tensor<2> {
    let half = TIME_CHANNELS / 2;
    let scale = -(10_000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((scale * i as f32) / half as f32).exp())
        .collect();
    let device = t.device();
    let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), (&device, DType::F32));
    let [batch] = t.dims();
    let args = t.cast(DType::F32).reshape([batch, 1]) * freqs.reshape([1, half]);
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

impl TimeTextEmbed {
    /// `temb` `[batch, inner_dim]` from timesteps and guidance already scaled by 1000.
    pub fn forward(
        &self,
        timestep: Tensor<1>,
        guidance: Option<Tensor<1>>,
        pooled: Tensor<2>,
    ) -> Result<Tensor<2>> {
        let dtype = pooled.dtype();
        let time = self
            .timestep_embedder
            .forward(timestep_projection(timestep).cast(dtype))?;
        let time = match (&self.guidance_embedder, guidance) {
            (Some(embedder), Some(g)) => {
                time + embedder.forward(timestep_projection(g).cast(dtype))?
            }
            (None, None) => time,
            (Some(_), None) => {
                return Err(ModelError::Input(
                    "the model embeds guidance (guidance_embeds) but no guidance was given".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ModelError::Input(
                    "guidance was given but the model has no guidance embedder".into(),
                ));
            }
        };
        Ok(time + self.text_embedder.forward(pooled)?)
    }
}

/// The q/k/v/out projections of the text stream in a double-stream block.
#[derive(Module, Debug)]
pub struct ContextProjections {
    /// Text query projection.
    pub add_q_proj: LinearLayer,
    /// Text key projection.
    pub add_k_proj: LinearLayer,
    /// Text value projection.
    pub add_v_proj: LinearLayer,
    /// RMSNorm of text queries (per head).
    pub norm_added_q: RmsNorm,
    /// RMSNorm of text keys (per head).
    pub norm_added_k: RmsNorm,
    /// Text output projection.
    pub to_add_out: LinearLayer,
}

/// `FluxAttention` with `FluxAttnProcessor`: QK-RMSNorm, RoPE, full (non-causal) attention.
#[derive(Module, Debug)]
pub struct FluxAttention {
    /// Query projection.
    pub to_q: LinearLayer,
    /// Key projection.
    pub to_k: LinearLayer,
    /// Value projection.
    pub to_v: LinearLayer,
    /// RMSNorm of queries (per head).
    pub norm_q: RmsNorm,
    /// RMSNorm of keys (per head).
    pub norm_k: RmsNorm,
    /// `to_out.0`; absent in single-stream blocks (`pre_only`).
    pub to_out: Option<LinearLayer>,
    /// Text-stream projections; present in double-stream blocks.
    pub context: Option<ContextProjections>,
    /// Number of heads.
    pub heads: usize,
    /// Width of each head.
    pub head_dim: usize,
}

impl FluxAttention {
    fn heads_of(&self, t: Tensor<3>) -> Tensor<4> {
        let [batch, tokens, _] = t.dims();
        t.reshape([batch, tokens, self.heads, self.head_dim])
    }

    /// What diffusers' `attn(...)` returns: `[image_out, text_out]` when `encoder` is given
    /// (double-stream), `[out]` over the whole sequence otherwise (single-stream).
    pub fn forward(
        &self,
        hidden: Tensor<3>,
        encoder: Option<Tensor<3>>,
        rope: &(Tensor<2>, Tensor<2>),
    ) -> Result<Vec<Tensor<3>>> {
        let mut q = self
            .norm_q
            .forward(self.heads_of(self.to_q.forward(hidden.clone())?));
        let mut k = self
            .norm_k
            .forward(self.heads_of(self.to_k.forward(hidden.clone())?));
        let mut v = self.heads_of(self.to_v.forward(hidden)?);
        let mut text_len = 0;
        if let Some(encoder) = encoder {
            let ctx = self.context.as_ref().ok_or_else(|| {
                ModelError::Input("text states given to a single-stream attention".into())
            })?;
            text_len = encoder.dims()[1];
            let eq = ctx
                .norm_added_q
                .forward(self.heads_of(ctx.add_q_proj.forward(encoder.clone())?));
            let ek = ctx
                .norm_added_k
                .forward(self.heads_of(ctx.add_k_proj.forward(encoder.clone())?));
            let ev = self.heads_of(ctx.add_v_proj.forward(encoder)?);
            q = Tensor::cat(vec![eq, q], 1);
            k = Tensor::cat(vec![ek, k], 1);
            v = Tensor::cat(vec![ev, v], 1);
        }
        let [batch, tokens, heads, dim] = q.dims();
        let (cos, sin) = rope;
        if cos.dims()[0] != tokens {
            return Err(ModelError::Input(format!(
                "attention over {tokens} tokens but {} position ids",
                cos.dims()[0]
            )));
        }
        let q = apply_rotary(q, cos, sin).swap_dims(1, 2);
        let k = apply_rotary(k, cos, sin).swap_dims(1, 2);
        let v = v.swap_dims(1, 2);
        let scores = q.matmul(k.swap_dims(2, 3)).cast(DType::F32);
        let probs = softmax(scores.mul_scalar(1.0 / (dim as f64).sqrt()), 3).cast(v.dtype());
        let out = probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, tokens, heads * dim]);
        match &self.context {
            Some(ctx) if text_len > 0 => {
                let text = out.clone().narrow(1, 0, text_len);
                let image = out.narrow(1, text_len, tokens - text_len);
                let to_out = self.to_out.as_ref().ok_or_else(|| {
                    ModelError::Input("double-stream attention without to_out".into())
                })?;
                Ok(vec![to_out.forward(image)?, ctx.to_add_out.forward(text)?])
            }
            _ => Ok(vec![match &self.to_out {
                Some(to_out) => to_out.forward(out)?,
                None => out,
            }]),
        }
    }
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// `net.0.proj`: `dim -> 4·dim`.
    pub proj_in: LinearLayer,
    /// `net.2`: `4·dim -> dim`.
    pub proj_out: LinearLayer,
}

impl FeedForward {
    /// Applies the MLP.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        self.proj_out
            .forward(gelu_approximate(self.proj_in.forward(x)?))
    }
}

/// Checks that a hook returned as many attention outputs as the module does.
fn expect_outputs(
    outputs: Vec<Tensor<3>>,
    n: usize,
    path: ModulePath<'_>,
) -> Result<Vec<Tensor<3>>> {
    if outputs.len() == n {
        Ok(outputs)
    } else {
        Err(ModelError::Hook(
            format!(
                "{path} returned {} tensors, the module returns {n}",
                outputs.len()
            )
            .into(),
        ))
    }
}

/// `FluxTransformerBlock`: a double-stream (MMDiT) block with adaLN-Zero modulation per stream.
#[derive(Module, Debug)]
pub struct FluxTransformerBlock {
    /// `norm1`: image-stream modulation (6 vectors).
    pub norm1: AdaModulation,
    /// `norm1_context`: text-stream modulation (6 vectors).
    pub norm1_context: AdaModulation,
    /// Joint attention.
    pub attn: FluxAttention,
    /// Image-stream MLP.
    pub ff: FeedForward,
    /// Text-stream MLP.
    pub ff_context: FeedForward,
}

impl FluxTransformerBlock {
    /// Runs block `index`: `(hidden, encoder) -> (hidden, encoder)` (diffusers returns them as
    /// `(encoder, hidden)`, Pattern 1).
    pub fn forward(
        &self,
        hooks: &mut dyn DitHooks,
        index: usize,
        states: BlockStates,
        temb: &Tensor<2>,
        rope: &(Tensor<2>, Tensor<2>),
    ) -> Result<BlockStates> {
        let hidden = states.hidden;
        let encoder = states.encoder.ok_or_else(|| {
            ModelError::Hook(format!("{DOUBLE_BLOCKS}.{index} got no encoder states").into())
        })?;
        let m = self.norm1.forward(temb)?;
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) =
            (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
        let c = self.norm1_context.forward(temb)?;
        let (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) =
            (&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]);
        let norm_hidden = modulate(hidden.clone(), scale_msa, shift_msa);
        let norm_encoder = modulate(encoder.clone(), c_scale_msa, c_shift_msa);

        let path = ModulePath {
            group: DOUBLE_BLOCKS,
            block: index,
            leaf: "attn",
        };
        let batch = hidden.dims()[0];
        let outputs = hooked_module(hooks, path, batch, || {
            self.attn
                .forward(norm_hidden.clone(), Some(norm_encoder.clone()), rope)
        })?;
        let mut outputs = expect_outputs(outputs, 2, path)?.into_iter();
        let (attn_out, context_attn_out) = (outputs.next(), outputs.next());
        let (Some(attn_out), Some(context_attn_out)) = (attn_out, context_attn_out) else {
            unreachable!("expect_outputs checked the count");
        };

        let hidden = hidden + gate_msa.clone() * attn_out;
        let ff = self
            .ff
            .forward(modulate(hidden.clone(), scale_mlp, shift_mlp))?;
        let hidden = hidden + gate_mlp.clone() * ff;

        let encoder = encoder + c_gate_msa.clone() * context_attn_out;
        let ff = self
            .ff_context
            .forward(modulate(encoder.clone(), c_scale_mlp, c_shift_mlp))?;
        let encoder = encoder + c_gate_mlp.clone() * ff;
        Ok(BlockStates {
            hidden,
            encoder: Some(encoder),
        })
    }
}

/// `FluxSingleTransformerBlock`: attention and MLP in parallel over `[text, image]` tokens.
#[derive(Module, Debug)]
pub struct FluxSingleTransformerBlock {
    /// `norm`: modulation (shift, scale, gate).
    pub norm: AdaModulation,
    /// `proj_mlp`: `dim -> 4·dim`.
    pub proj_mlp: LinearLayer,
    /// `proj_out`: `[attention, mlp] (5·dim) -> dim`.
    pub proj_out: LinearLayer,
    /// Self-attention over the joint sequence (no output projection).
    pub attn: FluxAttention,
}

impl FluxSingleTransformerBlock {
    /// Runs block `index` on the concatenation of `encoder` and `hidden`, then splits them again
    /// (diffusers returns `(encoder, hidden)`, Pattern 1).
    pub fn forward(
        &self,
        hooks: &mut dyn DitHooks,
        index: usize,
        states: BlockStates,
        temb: &Tensor<2>,
        rope: &(Tensor<2>, Tensor<2>),
    ) -> Result<BlockStates> {
        let encoder = states.encoder.ok_or_else(|| {
            ModelError::Hook(format!("{SINGLE_BLOCKS}.{index} got no encoder states").into())
        })?;
        let text_len = encoder.dims()[1];
        let x = Tensor::cat(vec![encoder, states.hidden], 1);
        let [batch, tokens, _] = x.dims();
        let m = self.norm.forward(temb)?;
        let (shift, scale, gate) = (&m[0], &m[1], &m[2]);
        let norm_x = modulate(x.clone(), scale, shift);
        let mlp = gelu_approximate(self.proj_mlp.forward(norm_x.clone())?);

        let path = ModulePath {
            group: SINGLE_BLOCKS,
            block: index,
            leaf: "attn",
        };
        let outputs = hooked_module(hooks, path, batch, || {
            self.attn.forward(norm_x.clone(), None, rope)
        })?;
        let attn_out = expect_outputs(outputs, 1, path)?.remove(0);

        let x = x + gate.clone() * self.proj_out.forward(Tensor::cat(vec![attn_out, mlp], 2))?;
        Ok(BlockStates {
            encoder: Some(x.clone().narrow(1, 0, text_len)),
            hidden: x.narrow(1, text_len, tokens - text_len),
        })
    }
}

/// diffusers' `FluxTransformer2DModel`: the Flux.1 MMDiT denoiser.
#[derive(Module, Debug)]
pub struct FluxTransformer {
    /// Embeds packed latent tokens.
    pub x_embedder: LinearLayer,
    /// Embeds text-encoder states.
    pub context_embedder: LinearLayer,
    /// Makes the conditioning vector.
    pub time_text_embed: TimeTextEmbed,
    /// Double-stream blocks.
    pub transformer_blocks: Vec<FluxTransformerBlock>,
    /// Single-stream blocks.
    pub single_transformer_blocks: Vec<FluxSingleTransformerBlock>,
    /// `norm_out` (`AdaLayerNormContinuous`: scale, shift).
    pub norm_out: AdaModulation,
    /// Maps image tokens to `patch_size² · out_channels`.
    pub proj_out: LinearLayer,
    /// The parsed config.
    #[module(skip)]
    pub config: FluxConfig,
    /// Compute dtype of activations.
    #[module(skip)]
    pub precision: Precision,
}

impl FluxTransformer {
    /// Checks the shapes of `inputs` against the config and each other.
    fn check_inputs(&self, inputs: &FluxInputs) -> Result<()> {
        let c = &self.config;
        let [batch, img, channels] = inputs.hidden_states.dims();
        let [eb, txt, joint] = inputs.encoder_hidden_states.dims();
        let [pb, pooled] = inputs.pooled_projections.dims();
        let [tb] = inputs.timestep.dims();
        let axes = c.axes_dims_rope.len();
        let bad = |what: String| Err(ModelError::Input(what));
        if channels != c.in_channels {
            return bad(format!(
                "hidden_states has {channels} channels, in_channels is {}",
                c.in_channels
            ));
        }
        if joint != c.joint_attention_dim {
            return bad(format!(
                "encoder_hidden_states has width {joint}, joint_attention_dim is {}",
                c.joint_attention_dim
            ));
        }
        if pooled != c.pooled_projection_dim {
            return bad(format!(
                "pooled_projections has width {pooled}, pooled_projection_dim is {}",
                c.pooled_projection_dim
            ));
        }
        if eb != batch || pb != batch || tb != batch {
            return bad(format!(
                "batch sizes differ: hidden_states {batch}, encoder_hidden_states {eb}, pooled_projections {pb}, timestep {tb}"
            ));
        }
        if let Some(g) = &inputs.guidance
            && g.dims()[0] != batch
        {
            return bad(format!(
                "guidance has {} rows, batch is {batch}",
                g.dims()[0]
            ));
        }
        if inputs.img_ids.dims() != [img, axes] {
            return bad(format!(
                "img_ids is {:?}, expected [{img}, {axes}]",
                inputs.img_ids.dims()
            ));
        }
        if inputs.txt_ids.dims() != [txt, axes] {
            return bad(format!(
                "txt_ids is {:?}, expected [{txt}, {axes}]",
                inputs.txt_ids.dims()
            ));
        }
        Ok(())
    }

    /// The RoPE tables (cos, sin) of `cat(txt_ids, img_ids)`: the ids are read back to the host
    /// and the tables computed in f64, as diffusers does. A denoising loop computes them once
    /// and passes them to [`FluxTransformer::forward_with_rope`] on every step, so steps make no
    /// device-to-host read for positions.
    pub fn rope(&self, txt_ids: &Tensor<2>, img_ids: &Tensor<2>) -> Result<(Tensor<2>, Tensor<2>)> {
        let ids = Tensor::cat(vec![txt_ids.clone(), img_ids.clone()], 0);
        let [tokens, _] = ids.dims();
        let device = ids.device();
        let values = ids
            .try_into_vec_as::<f32>()
            .map_err(|err| ModelError::Input(format!("cannot read position ids: {err}")))?;
        rope_tables(&values, tokens, &self.config.axes_dims_rope, &device)
    }

    /// One denoiser call: `FluxTransformer2DModel.forward(...).sample`, `[batch, img_tokens,
    /// patch_size² · out_channels]`, with the denoiser, both block lists and every attention
    /// layer run through `hooks` ([`NoHooks`](crate::models::NoHooks) runs the plain model).
    pub fn forward(&self, inputs: &FluxInputs, hooks: &mut dyn DitHooks) -> Result<Tensor<3>> {
        self.check_inputs(inputs)?;
        let rope = self.rope(&inputs.txt_ids, &inputs.img_ids)?;
        self.forward_with_rope(inputs, &rope, hooks)
    }

    /// [`FluxTransformer::forward`] with RoPE tables from [`FluxTransformer::rope`] for the same
    /// position ids (computed once per inference instead of once per call).
    pub fn forward_with_rope(
        &self,
        inputs: &FluxInputs,
        rope: &(Tensor<2>, Tensor<2>),
        hooks: &mut dyn DitHooks,
    ) -> Result<Tensor<3>> {
        let [batch, img_tokens, _] = inputs.hidden_states.dims();
        let txt_tokens = inputs.encoder_hidden_states.dims()[1];
        let _span = tracing::debug_span!("flux_forward", batch, img_tokens, txt_tokens).entered();
        self.check_inputs(inputs)?;
        let tokens = txt_tokens + img_tokens;
        if rope.0.dims()[0] != tokens || rope.1.dims()[0] != tokens {
            return Err(ModelError::Input(format!(
                "RoPE tables cover {} tokens, the inputs have {tokens}",
                rope.0.dims()[0]
            )));
        }
        let out = hooks.run_denoiser(batch, &mut |hooks, rows| {
            let selected;
            let inputs = match rows {
                None => inputs,
                Some(rows) => {
                    selected = inputs.select_batch(rows)?;
                    &selected
                }
            };
            Ok(DenoiserOutput::Rank3(self.denoise(inputs, hooks, rope)?))
        })?;
        let want = [batch, img_tokens, self.config.output_width()];
        match out {
            DenoiserOutput::Rank3(t) if t.dims() == want => Ok(t),
            other => Err(ModelError::Hook(
                format!(
                    "denoiser hook returned shape {:?}, expected {want:?}",
                    other.dims()
                )
                .into(),
            )),
        }
    }

    fn denoise(
        &self,
        inputs: &FluxInputs,
        hooks: &mut dyn DitHooks,
        rope: &(Tensor<2>, Tensor<2>),
    ) -> Result<Tensor<3>> {
        let dtype = self.precision.dtype();
        let hidden = self
            .x_embedder
            .forward(inputs.hidden_states.clone().cast(dtype))?;
        let timestep = inputs.timestep.clone().cast(dtype).mul_scalar(1000.0);
        let guidance = inputs
            .guidance
            .clone()
            .map(|g| g.cast(dtype).mul_scalar(1000.0));
        let temb = self.time_text_embed.forward(
            timestep,
            guidance,
            inputs.pooled_projections.clone().cast(dtype),
        )?;
        let encoder = self
            .context_embedder
            .forward(inputs.encoder_hidden_states.clone().cast(dtype))?;

        let [double, single] = self.groups();
        let states = BlockStates {
            hidden,
            encoder: Some(encoder),
        };
        let states = hooks.run_blocks(double, states, &mut |hooks, i, states| {
            let block = self
                .transformer_blocks
                .get(i)
                .ok_or_else(|| ModelError::Hook(format!("no block {DOUBLE_BLOCKS}.{i}").into()))?;
            block.forward(hooks, i, states, &temb, rope)
        })?;
        let states = hooks.run_blocks(single, states, &mut |hooks, i, states| {
            let block = self
                .single_transformer_blocks
                .get(i)
                .ok_or_else(|| ModelError::Hook(format!("no block {SINGLE_BLOCKS}.{i}").into()))?;
            block.forward(hooks, i, states, &temb, rope)
        })?;

        let m = self.norm_out.forward(&temb)?;
        let (scale, shift) = (&m[0], &m[1]);
        let hidden = modulate(states.hidden, scale, shift);
        self.proj_out.forward(hidden)
    }

    fn groups(&self) -> [BlockGroup<'static>; 2] {
        [
            BlockGroup {
                name: DOUBLE_BLOCKS,
                index: 0,
                len: self.transformer_blocks.len(),
                pattern: ForwardPattern::Pattern1,
            },
            BlockGroup {
                name: SINGLE_BLOCKS,
                index: 1,
                len: self.single_transformer_blocks.len(),
                pattern: ForwardPattern::Pattern1,
            },
        ]
    }
}

impl HookableDit for FluxTransformer {
    fn block_groups(&self) -> Vec<BlockGroup<'static>> {
        self.groups().to_vec()
    }

    fn hook_points(&self) -> Vec<HookPoint> {
        self.groups()
            .iter()
            .flat_map(|g| {
                (0..g.len).map(move |i| HookPoint {
                    name: format!("{}.{i}.attn", g.name),
                    kind: ModuleKind::SpatialAttention,
                })
            })
            .collect()
    }
}
