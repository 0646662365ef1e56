//! A flow-matching denoising loop: diffusers' `FlowMatchEulerDiscreteScheduler` (static or
//! resolution-dependent shift), optional classifier-free guidance with the two branches batched
//! in one call or run as separate calls, and the cache hooks told the step, timestep and context.

use std::time::Instant;

use crate::models::{
    CogVideoX, CogVideoXInputs, DitHooks, FluxInputs, FluxTransformer, HookableDit,
};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};
use crate::hooks::CacheHooks;

/// diffusers' `FlowMatchEulerDiscreteScheduler` for a fixed number of steps.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatchEuler {
    /// Noise levels, one per step plus the terminal 0.
    pub sigmas: Vec<f64>,
    /// `sigma * 1000` per step: what the hooks' timestep ranges refer to.
    pub timesteps: Vec<f64>,
}

impl FlowMatchEuler {
    /// `sigmas = linspace(1, 1/n, n)` shifted by `exp(mu)` (dynamic shifting, as Flux does with
    /// `mu` from the image sequence length) or by a static `shift`.
    pub fn new(steps: usize, shift: f64, mu: Option<f64>) -> Result<Self> {
        if steps == 0 {
            return Err(DiffusionError::InvalidOption {
                field: "steps",
                reason: "must be at least 1".into(),
            });
        }
        if shift <= 0.0 || shift.is_nan() {
            return Err(DiffusionError::InvalidOption {
                field: "shift",
                reason: format!("{shift}: must be positive"),
            });
        }
        let n = steps as f64;
        let mut sigmas: Vec<f64> = (0..steps)
            .map(|i| {
                let s = if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / n - 1.0) * i as f64 / (n - 1.0)
                };
                match mu {
                    Some(mu) => mu.exp() / (mu.exp() + (1.0 / s - 1.0)),
                    None => shift * s / (1.0 + (shift - 1.0) * s),
                }
            })
            .collect();
        let timesteps = sigmas.iter().map(|s| s * 1000.0).collect();
        sigmas.push(0.0);
        Ok(Self { sigmas, timesteps })
    }

    /// Flux's `calculate_shift`: `mu` grows linearly with the image sequence length.
    pub fn flux_mu(image_seq_len: usize) -> f64 {
        let (base_seq, max_seq, base_shift, max_shift) = (256.0, 4096.0, 0.5, 1.15);
        let m = (max_shift - base_shift) / (max_seq - base_seq);
        let b = base_shift - m * base_seq;
        image_seq_len as f64 * m + b
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// Whether there are no steps.
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// One Euler step: `x + (sigma_{i+1} - sigma_i) * v`.
    pub fn step(&self, i: usize, latents: Tensor<3>, velocity: Tensor<3>) -> Tensor<3> {
        latents + velocity * (self.sigmas[i + 1] - self.sigmas[i])
    }
}

/// A DiT the loop can drive: a velocity prediction for `[batch, tokens, channels]` latents.
pub trait Denoise: HookableDit {
    /// Conditioning for a batch (text states, positions, guidance).
    type Cond: Clone;
    /// Stacks two conditionings batch-wise (`[uncond; cond]` for batched CFG).
    fn concat_cond(first: &Self::Cond, second: &Self::Cond) -> Self::Cond;
    /// Predicts the velocity at noise level `sigma` (0–1).
    fn velocity(
        &self,
        latents: Tensor<3>,
        sigma: f64,
        cond: &Self::Cond,
        hooks: &mut dyn DitHooks,
    ) -> Result<Tensor<3>>;
}

/// How classifier-free guidance runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Guidance {
    /// `uncond + scale * (cond - uncond)`.
    pub scale: f64,
    /// Run cond and uncond as two model calls (contexts `cond` / `uncond`) instead of one batch.
    pub separate: bool,
}

/// What one denoising run produced.
#[derive(Clone, Debug)]
pub struct DenoiseOutput {
    /// Final latents.
    pub latents: Tensor<3>,
    /// Wall time of the whole loop, seconds.
    pub seconds: f64,
    /// Model calls made.
    pub model_calls: usize,
}

/// Runs the loop from `latents` (pure noise at sigma 1). `uncond` is required with `guidance`.
/// `on_step(i)` is called after each step (progress bars).
#[allow(clippy::too_many_arguments)]
pub fn denoise<M: Denoise>(
    model: &M,
    hooks: &mut CacheHooks,
    scheduler: &FlowMatchEuler,
    latents: Tensor<3>,
    cond: &M::Cond,
    uncond: Option<&M::Cond>,
    guidance: Option<Guidance>,
    mut on_step: impl FnMut(usize),
) -> Result<DenoiseOutput> {
    let _span = tracing::info_span!(
        "denoise",
        steps = scheduler.len(),
        method = hooks.config().method()
    )
    .entered();
    let start = Instant::now();
    hooks.reset();
    let batched = match (guidance, uncond) {
        (Some(g), Some(u)) if !g.separate => Some(M::concat_cond(u, cond)),
        (Some(_), None) => {
            return Err(DiffusionError::InvalidOption {
                field: "guidance",
                reason: "classifier-free guidance needs an unconditional input".into(),
            });
        }
        _ => None,
    };
    let mut latents = latents;
    let mut calls = 0;
    for i in 0..scheduler.len() {
        let sigma = scheduler.sigmas[i];
        hooks.begin_step(i, scheduler.timesteps[i]);
        let velocity = match (guidance, uncond, &batched) {
            (Some(g), _, Some(both)) => {
                hooks.cache_context("cond_uncond");
                let doubled = Tensor::cat(vec![latents.clone(), latents.clone()], 0);
                let out = model.velocity(doubled, sigma, both, hooks)?;
                calls += 1;
                let b = latents.dims()[0];
                let u = out.clone().narrow(0, 0, b);
                let c = out.narrow(0, b, b);
                u.clone() + (c - u) * g.scale
            }
            (Some(g), Some(uncond), None) => {
                hooks.cache_context("cond");
                let c = model.velocity(latents.clone(), sigma, cond, hooks)?;
                hooks.cache_context("uncond");
                let u = model.velocity(latents.clone(), sigma, uncond, hooks)?;
                calls += 2;
                u.clone() + (c - u) * g.scale
            }
            _ => {
                hooks.cache_context("cond");
                calls += 1;
                model.velocity(latents.clone(), sigma, cond, hooks)?
            }
        };
        hooks.clear_context();
        latents = scheduler.step(i, latents, velocity);
        on_step(i);
    }
    Ok(DenoiseOutput {
        latents,
        seconds: start.elapsed().as_secs_f64(),
        model_calls: calls,
    })
}

/// Flux conditioning: text states, pooled embedding, position ids and (for guidance-distilled
/// checkpoints) the embedded guidance scale.
#[derive(Clone, Debug)]
pub struct FluxCond {
    /// `[batch, txt_tokens, joint_attention_dim]`.
    pub encoder_hidden_states: Tensor<3>,
    /// `[batch, pooled_projection_dim]`.
    pub pooled_projections: Tensor<2>,
    /// `[img_tokens, 3]`.
    pub img_ids: Tensor<2>,
    /// `[txt_tokens, 3]`.
    pub txt_ids: Tensor<2>,
    /// Guidance embedded by `guidance_embeds` models.
    pub guidance: Option<f64>,
    /// RoPE tables of the position ids, computed once ([`FluxCond::with_rope`]) so the steps
    /// make no device-to-host read; `None`: the model computes them on every call.
    pub rope: Option<(Tensor<2>, Tensor<2>)>,
}

impl FluxCond {
    /// Precomputes the RoPE tables of this conditioning's position ids for `model`.
    pub fn with_rope(mut self, model: &FluxTransformer) -> Result<Self> {
        self.rope = Some(
            model
                .rope(&self.txt_ids, &self.img_ids)
                .map_err(DiffusionError::from_model)?,
        );
        Ok(self)
    }
}

impl FluxCond {
    /// Seeded stand-in text conditioning (cachet ships no text encoder): normal text states and
    /// pooled embedding, FluxPipeline's position ids for a `height` x `width` latent (before
    /// 2x2 packing).
    pub fn random(
        model: &FluxTransformer,
        batch: usize,
        txt_tokens: usize,
        height: usize,
        width: usize,
        device: &Device,
    ) -> Self {
        let c = &model.config;
        let encoder_hidden_states = Tensor::random(
            [batch, txt_tokens, c.joint_attention_dim],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let pooled_projections = Tensor::random(
            [batch, c.pooled_projection_dim],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let img_ids = flux_image_ids(height / 2, width / 2, device);
        let txt_ids = Tensor::zeros([txt_tokens, 3], device);
        Self {
            encoder_hidden_states,
            pooled_projections,
            // Precomputed once; `None` only if the ids cannot be read, and then the model
            // computes the tables per call.
            rope: model.rope(&txt_ids, &img_ids).ok(),
            img_ids,
            txt_ids,
            guidance: c.guidance_embeds.then_some(3.5),
        }
    }
}

/// `FluxPipeline._prepare_latent_image_ids`: `(0, row, col)` per packed token.
pub fn flux_image_ids(rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    let mut ids = Vec::with_capacity(rows * cols * 3);
    for r in 0..rows {
        for c in 0..cols {
            ids.extend([0.0f32, r as f32, c as f32]);
        }
    }
    Tensor::from_data(burn::tensor::TensorData::new(ids, [rows * cols, 3]), device)
}

impl Denoise for FluxTransformer {
    type Cond = FluxCond;

    fn concat_cond(first: &FluxCond, second: &FluxCond) -> FluxCond {
        FluxCond {
            encoder_hidden_states: Tensor::cat(
                vec![
                    first.encoder_hidden_states.clone(),
                    second.encoder_hidden_states.clone(),
                ],
                0,
            ),
            pooled_projections: Tensor::cat(
                vec![
                    first.pooled_projections.clone(),
                    second.pooled_projections.clone(),
                ],
                0,
            ),
            img_ids: first.img_ids.clone(),
            txt_ids: first.txt_ids.clone(),
            guidance: first.guidance,
            rope: first.rope.clone(),
        }
    }

    fn velocity(
        &self,
        latents: Tensor<3>,
        sigma: f64,
        cond: &FluxCond,
        hooks: &mut dyn DitHooks,
    ) -> Result<Tensor<3>> {
        let device = latents.device();
        let batch = latents.dims()[0];
        let inputs = FluxInputs {
            hidden_states: latents,
            encoder_hidden_states: cond.encoder_hidden_states.clone(),
            pooled_projections: cond.pooled_projections.clone(),
            timestep: Tensor::full([batch], sigma, &device),
            img_ids: cond.img_ids.clone(),
            txt_ids: cond.txt_ids.clone(),
            guidance: cond.guidance.map(|g| Tensor::full([batch], g, &device)),
        };
        self.forward(&inputs, hooks)
            .map_err(DiffusionError::from_model)
    }
}

/// CogVideoX conditioning: text states and the latent video size.
#[derive(Clone, Debug)]
pub struct CogVideoXCond {
    /// `[batch, text_tokens, text_embed_dim]`.
    pub encoder_hidden_states: Tensor<3>,
    /// Latent frames, channels, height, width (the loop's latents are `[B, F, C·H·W]`).
    pub shape: [usize; 4],
}

impl Denoise for CogVideoX {
    type Cond = CogVideoXCond;

    fn concat_cond(first: &CogVideoXCond, second: &CogVideoXCond) -> CogVideoXCond {
        CogVideoXCond {
            encoder_hidden_states: Tensor::cat(
                vec![
                    first.encoder_hidden_states.clone(),
                    second.encoder_hidden_states.clone(),
                ],
                0,
            ),
            shape: first.shape,
        }
    }

    fn velocity(
        &self,
        latents: Tensor<3>,
        sigma: f64,
        cond: &CogVideoXCond,
        hooks: &mut dyn DitHooks,
    ) -> Result<Tensor<3>> {
        let batch = latents.dims()[0];
        let [f, c, h, w] = cond.shape;
        let inputs = CogVideoXInputs {
            hidden_states: latents.reshape([batch, f, c, h, w]),
            encoder_hidden_states: cond.encoder_hidden_states.clone(),
            timestep: vec![(sigma * 1000.0) as f32; batch],
            ofs: None,
            image_rotary_emb: None,
        };
        let out = self
            .forward(&inputs, hooks)
            .map_err(DiffusionError::from_model)?;
        let [b, f, c, h, w] = out.dims();
        Ok(out.reshape([b, f, c * h * w]))
    }
}
