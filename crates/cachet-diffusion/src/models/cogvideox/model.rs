//! The CogVideoX transformer (`CogVideoXTransformer3DModel`) and its checkpoint loader.

use std::ops::Range;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{gelu, gelu_approximate, silu, softmax};
use burn::tensor::{DType, Device, Tensor, TensorData};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{Precision, ensure_supported};

use super::config::CogVideoXConfig;
use super::embeddings::{
    RotaryEmbedding, joint_sincos_table, rotary_positional_embeddings, timestep_embedding,
};
use crate::models::dit_hooks::{
    BlockGroup, BlockStates, DenoiserOutput, DitHooks, ForwardPattern, HookPoint, HookableDit,
    ModuleKind, ModulePath, hooked_module,
};
use cachet_nn::{DenseFactory, LinearFactory, LinearLayer, Loader, Pretrained};
use cachet_nn::{ModelError, Result};

/// Name of the block list in diffusers (and in hook paths).
pub(crate) const TRANSFORMER_BLOCKS: &str = "transformer_blocks";

/// Layer norm over the last dimension, in f32 (`nn.LayerNorm`, affine optional).
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale, when elementwise affine.
    pub weight: Option<Param<Tensor<1>>>,
    /// Shift, when elementwise affine.
    pub bias: Option<Param<Tensor<1>>>,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// `(x - mean) / sqrt(var + eps) * weight + bias`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let mut y = (x - mean) * var.add_scalar(self.eps).sqrt().recip();
        let width = y.dims()[D - 1];
        let mut shape = [1; D];
        shape[D - 1] = width;
        if let Some(w) = &self.weight {
            y = y * w.val().cast(DType::F32).reshape(shape);
        }
        if let Some(b) = &self.bias {
            y = y + b.val().cast(DType::F32).reshape(shape);
        }
        y.cast(dtype)
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Module, Debug)]
pub struct TimestepMlp {
    /// First projection.
    pub linear_1: LinearLayer,
    /// Second projection.
    pub linear_2: LinearLayer,
}

impl TimestepMlp {
    fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        let x = x.unsqueeze_dim::<3>(1);
        let y = self.linear_2.forward(silu(self.linear_1.forward(x)?))?;
        let [b, _, d] = y.dims();
        Ok(y.reshape([b, d]))
    }
}

/// `CogVideoXLayerNormZero` / `AdaLayerNorm`: a layer norm modulated by `linear(silu(temb))`.
#[derive(Module, Debug)]
pub struct AdaNorm {
    /// Projects the time embedding to the modulation chunks.
    pub linear: LinearLayer,
    /// The normalisation.
    pub norm: LayerNorm,
}

impl AdaNorm {
    /// The modulation, split into `chunks` pieces of `[batch, 1, dim]`.
    fn modulation(&self, temb: &Tensor<2>, chunks: usize) -> Result<Vec<Tensor<3>>> {
        let m = self
            .linear
            .forward(silu(temb.clone()).unsqueeze_dim::<3>(1))?;
        Ok(m.chunk(chunks, 2))
    }

    /// `norm(x) * (1 + scale) + shift`.
    fn modulate(&self, x: Tensor<3>, shift: &Tensor<3>, scale: &Tensor<3>) -> Tensor<3> {
        self.norm.forward(x) * scale.clone().add_scalar(1.0) + shift.clone()
    }
}

/// CogVideoX joint attention (`attn1` with `CogVideoXAttnProcessor2_0`): text and video tokens
/// attend together; per-head layer norms on q and k, rotary on the video part.
#[derive(Module, Debug)]
pub struct JointAttention {
    /// Query projection.
    pub to_q: LinearLayer,
    /// Key projection.
    pub to_k: LinearLayer,
    /// Value projection.
    pub to_v: LinearLayer,
    /// Output projection (`to_out.0`).
    pub to_out: LinearLayer,
    /// Per-head query norm.
    pub norm_q: LayerNorm,
    /// Per-head key norm.
    pub norm_k: LayerNorm,
    /// Heads.
    pub heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

/// Applies diffusers' `apply_rotary_emb` (interleaved pairs) to `x` `[b, h, s, d]`.
fn apply_rotary(x: Tensor<4>, rotary: &RotaryEmbedding) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let pairs = x.clone().reshape([b, h, s, d / 2, 2]);
    let real = pairs.clone().slice([0..b, 0..h, 0..s, 0..d / 2, 0..1]);
    let imag = pairs.slice([0..b, 0..h, 0..s, 0..d / 2, 1..2]);
    let rotated = Tensor::cat(vec![imag.neg(), real], 4).reshape([b, h, s, d]);
    let cos = rotary.cos.clone().reshape([1, 1, s, d]);
    let sin = rotary.sin.clone().reshape([1, 1, s, d]);
    x * cos + rotated * sin
}

impl JointAttention {
    /// Returns `[hidden, encoder]` outputs, as diffusers' `attn1` does.
    fn forward(
        &self,
        hidden: Tensor<3>,
        encoder: Tensor<3>,
        rotary: Option<&RotaryEmbedding>,
    ) -> Result<Vec<Tensor<3>>> {
        let text = encoder.dims()[1];
        let x = Tensor::cat(vec![encoder, hidden], 1);
        let [batch, seq, _] = x.dims();
        let (heads, dim) = (self.heads, self.head_dim);
        let split = |t: Tensor<3>| t.reshape([batch, seq, heads, dim]).swap_dims(1, 2);
        let mut q = self.norm_q.forward(split(self.to_q.forward(x.clone())?));
        let mut k = self.norm_k.forward(split(self.to_k.forward(x.clone())?));
        let v = split(self.to_v.forward(x)?);
        if let Some(rotary) = rotary {
            let tokens = rotary.cos.dims()[0];
            if tokens != seq - text {
                return Err(ModelError::Input(format!(
                    "image_rotary_emb covers {tokens} tokens, the video has {}",
                    seq - text
                )));
            }
            let rope = |t: Tensor<4>| {
                let head = t.clone().slice([0..batch, 0..heads, 0..text, 0..dim]);
                let tail = t.slice([0..batch, 0..heads, text..seq, 0..dim]);
                Tensor::cat(vec![head, apply_rotary(tail, rotary)], 2)
            };
            q = rope(q);
            k = rope(k);
        }
        let scores = q.matmul(k.swap_dims(2, 3)).cast(DType::F32);
        let probs = softmax(scores.mul_scalar(1.0 / (dim as f64).sqrt()), 3).cast(v.dtype());
        let out = probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, heads * dim]);
        let out = self.to_out.forward(out)?;
        let width = heads * dim;
        let encoder = out.clone().slice([0..batch, 0..text, 0..width]);
        let hidden = out.slice([0..batch, text..seq, 0..width]);
        Ok(vec![hidden, encoder])
    }
}

/// `FeedForward`: `net.2(gelu(net.0.proj(x)))`.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// `net.0.proj`.
    pub proj_in: LinearLayer,
    /// `net.2`.
    pub proj_out: LinearLayer,
    /// tanh-approximate GELU (`gelu-approximate`) or exact.
    pub approximate: bool,
}

impl FeedForward {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let h = self.proj_in.forward(x)?;
        let h = if self.approximate {
            gelu_approximate(h)
        } else {
            gelu(h)
        };
        self.proj_out.forward(h)
    }
}

/// `CogVideoXBlock`: modulated joint attention, then a modulated feed-forward over text and video.
#[derive(Module, Debug)]
pub struct CogVideoXBlock {
    /// Modulation before attention.
    pub norm1: AdaNorm,
    /// Joint self-attention.
    pub attn1: JointAttention,
    /// Modulation before the feed-forward.
    pub norm2: AdaNorm,
    /// Feed-forward.
    pub ff: FeedForward,
}

impl CogVideoXBlock {
    fn forward(
        &self,
        hooks: &mut dyn DitHooks,
        index: usize,
        states: BlockStates,
        temb: &Tensor<2>,
        rotary: Option<&RotaryEmbedding>,
    ) -> Result<BlockStates> {
        let hidden = states.hidden;
        let encoder = states.encoder.ok_or_else(|| {
            ModelError::Input("CogVideoX blocks need encoder_hidden_states".into())
        })?;
        let [batch, text, width] = encoder.dims();
        let m = self.norm1.modulation(temb, 6)?;
        let norm_hidden = self.norm1.modulate(hidden.clone(), &m[0], &m[1]);
        let norm_encoder = self.norm1.modulate(encoder.clone(), &m[3], &m[4]);
        let path = ModulePath {
            group: TRANSFORMER_BLOCKS,
            block: index,
            leaf: "attn1",
        };
        let out = hooked_module(hooks, path, batch, || {
            self.attn1
                .forward(norm_hidden.clone(), norm_encoder.clone(), rotary)
        })?;
        let [attn_hidden, attn_encoder]: [Tensor<3>; 2] =
            out.try_into().map_err(|out: Vec<_>| {
                ModelError::Hook(format!("{path} must return 2 tensors, got {}", out.len()).into())
            })?;
        let hidden = hidden + m[2].clone() * attn_hidden;
        let encoder = encoder + m[5].clone() * attn_encoder;

        let m = self.norm2.modulation(temb, 6)?;
        let norm_hidden = self.norm2.modulate(hidden.clone(), &m[0], &m[1]);
        let norm_encoder = self.norm2.modulate(encoder.clone(), &m[3], &m[4]);
        let ff = self
            .ff
            .forward(Tensor::cat(vec![norm_encoder, norm_hidden], 1))?;
        let seq = ff.dims()[1];
        let ff_encoder = ff.clone().slice([0..batch, 0..text, 0..width]);
        let ff_hidden = ff.slice([0..batch, text..seq, 0..width]);
        Ok(BlockStates {
            hidden: hidden + m[2].clone() * ff_hidden,
            encoder: Some(encoder + m[5].clone() * ff_encoder),
        })
    }
}

/// One forward's inputs, in diffusers' layout.
#[derive(Clone, Debug)]
pub struct CogVideoXInputs {
    /// Latents `[batch, frames, channels, height, width]`.
    pub hidden_states: Tensor<5>,
    /// Text encoder states `[batch, text_tokens, text_embed_dim]`.
    pub encoder_hidden_states: Tensor<3>,
    /// One timestep per batch row.
    pub timestep: Vec<f32>,
    /// `ofs` (CogVideoX 1.5 I2V): one value, or one per batch row.
    pub ofs: Option<Vec<f32>>,
    /// Rotary tables; `None` with rotary configs builds them as the pipeline does.
    pub image_rotary_emb: Option<RotaryEmbedding>,
}

impl CogVideoXInputs {
    /// Batch size.
    pub fn batch(&self) -> usize {
        self.hidden_states.dims()[0]
    }

    /// The inputs of batch rows `rows` (what FasterCache runs for the conditional branch).
    pub fn select_batch(&self, rows: Range<usize>) -> Result<Self> {
        let batch = self.batch();
        if rows.start >= rows.end || rows.end > batch {
            return Err(ModelError::Input(format!(
                "batch rows {rows:?} out of 0..{batch}"
            )));
        }
        let [_, f, c, h, w] = self.hidden_states.dims();
        let [_, t, d] = self.encoder_hidden_states.dims();
        let pick = |v: &Vec<f32>| {
            if v.len() == 1 {
                v.clone()
            } else {
                v.get(rows.clone()).map(<[f32]>::to_vec).unwrap_or_default()
            }
        };
        Ok(Self {
            hidden_states: self
                .hidden_states
                .clone()
                .slice([rows.clone(), 0..f, 0..c, 0..h, 0..w]),
            encoder_hidden_states: self.encoder_hidden_states.clone().slice([
                rows.clone(),
                0..t,
                0..d,
            ]),
            timestep: pick(&self.timestep),
            ofs: self.ofs.as_ref().map(pick),
            image_rotary_emb: self.image_rotary_emb.clone(),
        })
    }
}

/// Patch embedding: text projection, video patch projection and the optional positional table.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// Patch projection (1.0's `Conv2d` flattened to a linear map over `(C, p, p)` patches).
    pub proj: LinearLayer,
    /// `text_proj`.
    pub text_proj: LinearLayer,
    /// Positional table for the config's sample size (`[1, text + tokens, dim]`), sin-cos or learned.
    pub pos_embedding: Option<Param<Tensor<3>>>,
}

/// `CogVideoXTransformer3DModel`, diffusers 0.42.
#[derive(Module, Debug)]
pub struct CogVideoX {
    /// Patch and text embedding.
    pub patch_embed: PatchEmbed,
    /// `time_embedding`.
    pub time_embedding: TimestepMlp,
    /// `ofs_embedding` (1.5 I2V).
    pub ofs_embedding: Option<TimestepMlp>,
    /// The blocks.
    pub transformer_blocks: Vec<CogVideoXBlock>,
    /// `norm_final`.
    pub norm_final: LayerNorm,
    /// `norm_out` (AdaLayerNorm: shift first, then scale).
    pub norm_out: AdaNorm,
    /// `proj_out`.
    pub proj_out: LinearLayer,
    /// The parsed config.
    #[module(skip)]
    pub config: CogVideoXConfig,
}

impl CogVideoX {
    /// Video tokens of the config's sample size (the positional table's length after the text).
    fn sample_tokens(c: &CogVideoXConfig) -> usize {
        let frames = (c.sample_frames - 1) / c.temporal_compression_ratio + 1;
        frames * (c.sample_height / c.patch_size) * (c.sample_width / c.patch_size)
    }

    /// The rotary tables the CogVideoX pipeline builds for latents of this size.
    pub fn rotary_embeddings(
        &self,
        latent_frames: usize,
        height: usize,
        width: usize,
        device: &Device,
    ) -> Result<RotaryEmbedding> {
        rotary_positional_embeddings(&self.config, latent_frames, height, width, device)
    }

    /// Predicts the noise (or velocity) for `inputs`: `[batch, frames, out_channels, height, width]`.
    pub fn forward(&self, inputs: &CogVideoXInputs, hooks: &mut dyn DitHooks) -> Result<Tensor<5>> {
        let [batch, frames, channels, height, width] = inputs.hidden_states.dims();
        let _span =
            tracing::info_span!("cogvideox_forward", batch, frames, height, width).entered();
        self.check_inputs(inputs, channels, height, width)?;
        let out = hooks.run_denoiser(batch, &mut |hooks, rows| {
            let selected;
            let inputs = match rows {
                Some(rows) => {
                    selected = inputs.select_batch(rows)?;
                    &selected
                }
                None => inputs,
            };
            self.denoise(inputs, hooks).map(DenoiserOutput::Rank5)
        })?;
        match out {
            DenoiserOutput::Rank5(t) => Ok(t),
            other => Err(ModelError::Hook(
                format!("hooks returned a rank-{} output", other.dims().len()).into(),
            )),
        }
    }

    fn check_inputs(
        &self,
        inputs: &CogVideoXInputs,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<()> {
        let c = &self.config;
        let batch = inputs.batch();
        let [text_batch, _, text_dim] = inputs.encoder_hidden_states.dims();
        let bad = |msg: String| Err(ModelError::Input(msg));
        if channels != c.in_channels {
            return bad(format!(
                "hidden_states has {channels} channels, config {}",
                c.in_channels
            ));
        }
        if text_batch != batch || text_dim != c.text_embed_dim {
            return bad(format!(
                "encoder_hidden_states is [{text_batch}, _, {text_dim}], expected [{batch}, _, {}]",
                c.text_embed_dim
            ));
        }
        if inputs.timestep.len() != batch && inputs.timestep.len() != 1 {
            return bad(format!(
                "{} timesteps for batch {batch}",
                inputs.timestep.len()
            ));
        }
        if !height.is_multiple_of(c.patch_size) || !width.is_multiple_of(c.patch_size) {
            return bad(format!(
                "{height}x{width} is not a multiple of patch_size {}",
                c.patch_size
            ));
        }
        if self.ofs_embedding.is_some() {
            match &inputs.ofs {
                Some(ofs) if ofs.len() == 1 || ofs.len() == batch => {}
                _ => return bad("this config needs `ofs` (one value or one per batch row)".into()),
            }
        }
        Ok(())
    }

    /// The forward body on (possibly a subset of) the batch.
    fn denoise(&self, inputs: &CogVideoXInputs, hooks: &mut dyn DitHooks) -> Result<Tensor<5>> {
        let c = &self.config;
        let x = inputs.hidden_states.clone();
        let device = x.device();
        let dtype = x.dtype();
        let [batch, frames, channels, height, width] = x.dims();
        let dim = c.inner_dim();

        // 1. Time (and ofs) embedding.
        let table = |values: &[f32], width: usize| -> Tensor<2> {
            let rows = if values.len() == 1 {
                batch
            } else {
                values.len()
            };
            let values: Vec<f32> = (0..rows).map(|i| values[i % values.len()]).collect();
            let data = timestep_embedding(&values, width, c.flip_sin_to_cos, c.freq_shift);
            Tensor::from_data(TensorData::new(data, [rows, width]), (&device, dtype))
        };
        let mut temb = self.time_embedding.forward(table(&inputs.timestep, dim))?;
        if let (Some(mlp), Some(ofs)) = (&self.ofs_embedding, &inputs.ofs) {
            let width = c.ofs_embed_dim.unwrap_or(c.time_embed_dim);
            temb = temb + mlp.forward(table(ofs, width))?;
        }

        // 2. Patch embedding.
        let (p, (h, w)) = (c.patch_size, (height / c.patch_size, width / c.patch_size));
        let (tokens, latent_frames) = match c.patch_size_t {
            None => {
                let t = x
                    .reshape([batch, frames, channels, h, p, w, p])
                    .permute([0, 1, 3, 5, 2, 4, 6])
                    .reshape([batch, frames * h * w, channels * p * p]);
                (t, frames)
            }
            Some(pt) => {
                if !frames.is_multiple_of(pt) {
                    return Err(ModelError::Input(format!(
                        "{frames} frames is not a multiple of patch_size_t {pt}"
                    )));
                }
                let f = frames / pt;
                let t = x
                    .reshape([batch, f, pt, channels, h, p, w, p])
                    .permute([0, 1, 4, 6, 3, 2, 5, 7])
                    .reshape([batch, f * h * w, channels * pt * p * p]);
                (t, f)
            }
        };
        let video = self.patch_embed.proj.forward(tokens)?;
        let text = self
            .patch_embed
            .text_proj
            .forward(inputs.encoder_hidden_states.clone())?;
        let text_len = text.dims()[1];
        let mut embeds = Tensor::cat(vec![text, video], 1);
        if c.uses_positional_table() {
            let pos = self.positional_table(frames, height, width, &device, dtype)?;
            let seq = embeds.dims()[1];
            if pos.dims()[1] != seq {
                return Err(ModelError::Input(format!(
                    "the positional table covers {} tokens ({} text), the input has {seq} \
                     ({text_len} text)",
                    pos.dims()[1],
                    c.max_text_seq_length
                )));
            }
            embeds = embeds + pos;
        }
        let seq = embeds.dims()[1];
        let encoder = embeds.clone().slice([0..batch, 0..text_len, 0..dim]);
        let hidden = embeds.slice([0..batch, text_len..seq, 0..dim]);

        // 3. Blocks.
        let built;
        let rotary = match (&inputs.image_rotary_emb, c.use_rotary_positional_embeddings) {
            (Some(r), _) => Some(r),
            (None, true) => {
                built = self.rotary_embeddings(frames, height, width, &device)?;
                Some(&built)
            }
            (None, false) => None,
        };
        let group = BlockGroup {
            name: TRANSFORMER_BLOCKS,
            index: 0,
            len: self.transformer_blocks.len(),
            pattern: ForwardPattern::Pattern0,
        };
        let states = BlockStates {
            hidden,
            encoder: Some(encoder),
        };
        let states = hooks.run_blocks(group, states, &mut |hooks, i, states| {
            let block = self.transformer_blocks.get(i).ok_or_else(|| {
                ModelError::Hook(format!("hooks asked for block {i} of {}", group.len).into())
            })?;
            block.forward(hooks, i, states, &temb, rotary)
        })?;

        // 4. Output.
        let hidden = self.norm_final.forward(states.hidden);
        let m = self.norm_out.modulation(&temb, 2)?;
        let hidden = self.norm_out.modulate(hidden, &m[0], &m[1]);
        let out = self.proj_out.forward(hidden)?;
        let oc = c.out_channels();

        // 5. Unpatchify.
        Ok(match c.patch_size_t {
            None => out
                .reshape([batch, frames, h, w, oc, p, p])
                .permute([0, 1, 4, 2, 5, 3, 6])
                .reshape([batch, frames, oc, height, width]),
            Some(pt) => out
                .reshape([batch, latent_frames, h, w, oc, pt, p, p])
                .permute([0, 1, 5, 4, 2, 6, 3, 7])
                .reshape([batch, latent_frames * pt, oc, height, width]),
        })
    }

    /// The positional table for this input size: the stored one at the config's sample size,
    /// else a recomputed sin-cos table (diffusers recomputes even for learned tables when only
    /// the frame count differs, and refuses other sizes for learned ones).
    fn positional_table(
        &self,
        frames: usize,
        height: usize,
        width: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor<3>> {
        let c = &self.config;
        if c.use_learned_positional_embeddings
            && (c.sample_width != width || c.sample_height != height)
        {
            return Err(ModelError::Input(format!(
                "learned positional embeddings only support the sample size {}x{}, got {height}x{width}",
                c.sample_height, c.sample_width
            )));
        }
        let pixel_frames = (frames.max(1) - 1) * c.temporal_compression_ratio + 1;
        match &self.patch_embed.pos_embedding {
            Some(pos)
                if c.sample_height == height
                    && c.sample_width == width
                    && c.sample_frames == pixel_frames =>
            {
                Ok(pos.val())
            }
            _ => {
                let latent = (pixel_frames - 1) / c.temporal_compression_ratio + 1;
                Ok(joint_sincos_table(c, latent, height, width, device, dtype))
            }
        }
    }
}

impl HookableDit for CogVideoX {
    fn block_groups(&self) -> Vec<BlockGroup<'static>> {
        vec![BlockGroup {
            name: TRANSFORMER_BLOCKS,
            index: 0,
            len: self.transformer_blocks.len(),
            pattern: ForwardPattern::Pattern0,
        }]
    }

    fn hook_points(&self) -> Vec<HookPoint> {
        (0..self.transformer_blocks.len())
            .map(|i| HookPoint {
                name: format!("{TRANSFORMER_BLOCKS}.{i}.attn1"),
                kind: ModuleKind::SpatialAttention,
            })
            .collect()
    }
}

impl Pretrained for CogVideoX {
    type Config = CogVideoXConfig;

    fn read_config(dir: &Path) -> Result<CogVideoXConfig> {
        CogVideoXConfig::from_file(dir.join("config.json"))
    }

    fn open_weights(dir: &Path) -> Result<Checkpoint> {
        crate::models::open_weights(dir)
    }

    fn default_factory() -> &'static dyn LinearFactory {
        &DenseFactory
    }

    fn load_with(
        config: CogVideoXConfig,
        checkpoint: &Checkpoint,
        device: &Device,
        precision: Precision,
        factory: &dyn LinearFactory,
    ) -> Result<Self> {
        config.validate("config")?;
        ensure_supported(device, precision)?;
        let dtype = precision.dtype();
        let loader = Loader {
            checkpoint,
            device,
            dtype,
            factory,
        };
        let c = &config;
        let dim = c.inner_dim();
        let (p, out_ch) = (c.patch_size, c.out_channels());
        let ln = |name: &str, width: usize, eps: f64, affine: bool| -> Result<LayerNorm> {
            let (weight, bias) = if affine {
                (
                    Some(Param::from_tensor(
                        loader.tensor::<1>(&format!("{name}.weight"), [width])?,
                    )),
                    Some(Param::from_tensor(
                        loader.tensor::<1>(&format!("{name}.bias"), [width])?,
                    )),
                )
            } else {
                (None, None)
            };
            Ok(LayerNorm { weight, bias, eps })
        };
        let mlp = |name: &str, d_in: usize, d_out: usize| -> Result<TimestepMlp> {
            Ok(TimestepMlp {
                linear_1: loader.linear(&format!("{name}.linear_1"), d_in, d_out, true)?,
                linear_2: loader.linear(&format!("{name}.linear_2"), d_out, d_out, true)?,
            })
        };
        let ada = |name: &str, chunks: usize| -> Result<AdaNorm> {
            Ok(AdaNorm {
                linear: loader.linear(
                    &format!("{name}.linear"),
                    c.time_embed_dim,
                    chunks * dim,
                    true,
                )?,
                norm: ln(
                    &format!("{name}.norm"),
                    dim,
                    c.norm_eps,
                    c.norm_elementwise_affine,
                )?,
            })
        };

        let proj = match c.patch_size_t {
            None => {
                let name = "patch_embed.proj.weight";
                let weight = loader.tensor::<4>(name, [dim, c.in_channels, p, p])?;
                let weight = weight.reshape([dim, c.in_channels * p * p]).transpose();
                let bias = if c.patch_bias {
                    Some(Param::from_tensor(
                        loader.tensor::<1>("patch_embed.proj.bias", [dim])?,
                    ))
                } else {
                    None
                };
                LinearLayer::dense(Linear {
                    weight: Param::from_tensor(weight),
                    bias,
                })
            }
            // diffusers' 1.5 `nn.Linear` here always has a bias.
            Some(pt) => loader.linear("patch_embed.proj", c.in_channels * pt * p * p, dim, true)?,
        };
        let pos_embedding = if c.use_learned_positional_embeddings {
            let tokens = c.max_text_seq_length + Self::sample_tokens(c);
            Some(loader.tensor::<3>("patch_embed.pos_embedding", [1, tokens, dim])?)
        } else if c.uses_positional_table() {
            let frames = (c.sample_frames - 1) / c.temporal_compression_ratio + 1;
            Some(joint_sincos_table(
                c,
                frames,
                c.sample_height,
                c.sample_width,
                device,
                dtype,
            ))
        } else {
            None
        };
        let patch_embed = PatchEmbed {
            proj,
            text_proj: loader.linear("patch_embed.text_proj", c.text_embed_dim, dim, true)?,
            pos_embedding: pos_embedding.map(Param::from_tensor),
        };

        let ofs_embedding = match c.ofs_embed_dim.filter(|&d| d > 0) {
            Some(d) => Some(mlp("ofs_embedding", d, d)?),
            None => None,
        };
        // Grown as blocks load: a config's layer count is not trusted for an allocation.
        let mut transformer_blocks = Vec::new();
        for i in 0..c.num_layers {
            let b = format!("{TRANSFORMER_BLOCKS}.{i}");
            let a = format!("{b}.attn1");
            let hd = c.attention_head_dim;
            transformer_blocks.push(CogVideoXBlock {
                norm1: ada(&format!("{b}.norm1"), 6)?,
                attn1: JointAttention {
                    to_q: loader.linear(&format!("{a}.to_q"), dim, dim, c.attention_bias)?,
                    to_k: loader.linear(&format!("{a}.to_k"), dim, dim, c.attention_bias)?,
                    to_v: loader.linear(&format!("{a}.to_v"), dim, dim, c.attention_bias)?,
                    to_out: loader.linear(&format!("{a}.to_out.0"), dim, dim, true)?,
                    norm_q: ln(&format!("{a}.norm_q"), hd, 1e-6, true)?,
                    norm_k: ln(&format!("{a}.norm_k"), hd, 1e-6, true)?,
                    heads: c.num_attention_heads,
                    head_dim: hd,
                },
                norm2: ada(&format!("{b}.norm2"), 6)?,
                ff: FeedForward {
                    proj_in: loader.linear(&format!("{b}.ff.net.0.proj"), dim, 4 * dim, true)?,
                    proj_out: loader.linear(&format!("{b}.ff.net.2"), 4 * dim, dim, true)?,
                    approximate: c.activation_fn == "gelu-approximate",
                },
            });
        }
        let patch_out = p * p * c.patch_size_t.unwrap_or(1) * out_ch;
        Ok(Self {
            patch_embed,
            time_embedding: mlp("time_embedding", dim, c.time_embed_dim)?,
            ofs_embedding,
            transformer_blocks,
            norm_final: ln("norm_final", dim, c.norm_eps, c.norm_elementwise_affine)?,
            norm_out: ada("norm_out", 2)?,
            proj_out: loader.linear("proj_out", dim, patch_out, true)?,
            config,
        })
    }
}
