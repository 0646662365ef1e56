//! FasterCache (diffusers' `FasterCacheConfig`): attention outputs extrapolated from the last two
//! computed ones, and the unconditional CFG branch skipped and rebuilt from the conditional one
//! plus low/high-frequency deltas (FFT over each latent frame).

use std::collections::HashMap;
use std::ops::Range;

use crate::models::{DenoiserOutput, HookPoint, ModuleFn, ModuleKind};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::pab::current_timestep;
use super::{ModuleMethod, bytes_of};
use crate::error::{DiffusionError, Result, check_non_negative, check_positive, check_range};
use crate::fft::{Dft2, Spectrum, low_frequency_mask};
use crate::log::{Action, StepInfo};
use crate::matching::Identifiers;

/// How the denoiser output is laid out, for splitting it into frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TensorFormat {
    /// `[batch, channels, frames, height, width]`.
    #[serde(rename = "BCFHW")]
    Bcfhw,
    /// `[batch, frames, channels, height, width]` (CogVideoX).
    #[serde(rename = "BFCHW")]
    Bfchw,
    /// `[batch, channels, height, width]`.
    #[serde(rename = "BCHW")]
    Bchw,
}

impl TensorFormat {
    fn rank(self) -> usize {
        match self {
            Self::Bchw => 4,
            _ => 5,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Bcfhw => "BCFHW",
            Self::Bfchw => "BFCHW",
            Self::Bchw => "BCHW",
        }
    }
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Configuration with diffusers' field names and defaults. `attention_weight` is the constant
/// that diffusers' default `attention_weight_callback` returns (0.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FasterCacheConfig {
    /// Recompute spatial attention every `N` calls.
    pub spatial_attention_block_skip_range: Option<usize>,
    /// Recompute temporal attention every `N` calls.
    pub temporal_attention_block_skip_range: Option<usize>,
    /// Timesteps `(lo, hi)`, exclusive, inside which spatial attention may be skipped.
    pub spatial_attention_timestep_skip_range: (f64, f64),
    /// Same for temporal attention.
    pub temporal_attention_timestep_skip_range: (f64, f64),
    /// Timesteps inside which the low-frequency delta is scaled by `alpha_low_frequency`.
    pub low_frequency_weight_update_timestep_range: (f64, f64),
    /// Timesteps inside which the high-frequency delta is scaled by `alpha_high_frequency`.
    pub high_frequency_weight_update_timestep_range: (f64, f64),
    /// Low-frequency scale.
    pub alpha_low_frequency: f64,
    /// High-frequency scale.
    pub alpha_high_frequency: f64,
    /// Compute the unconditional branch every `N` denoiser calls.
    pub unconditional_batch_skip_range: usize,
    /// Timesteps inside which the unconditional branch may be skipped.
    pub unconditional_batch_timestep_skip_range: (f64, f64),
    /// Regexes (searched) selecting spatial attention layers.
    pub spatial_attention_block_identifiers: Vec<String>,
    /// Regexes selecting temporal attention layers.
    pub temporal_attention_block_identifiers: Vec<String>,
    /// Extrapolation weight: `out = t + (t - t_prev) * weight`.
    #[serde(alias = "attention_weight_callback")]
    pub attention_weight: f64,
    /// Layout of the denoiser output.
    pub tensor_format: TensorFormat,
    /// The model has no unconditional branch (guidance-distilled): no denoiser-level skipping.
    pub is_guidance_distilled: bool,
}

/// diffusers' `_SPATIAL_ATTENTION_BLOCK_IDENTIFIERS` of faster_cache.py.
pub(crate) fn default_spatial_identifiers() -> Vec<String> {
    strings(&[
        "^blocks.*attn",
        "^transformer_blocks.*attn",
        "^single_transformer_blocks.*attn",
    ])
}

/// diffusers' `_TEMPORAL_ATTENTION_BLOCK_IDENTIFIERS` of faster_cache.py.
pub(crate) fn default_temporal_identifiers() -> Vec<String> {
    strings(&["^temporal_transformer_blocks.*attn"])
}

impl Default for FasterCacheConfig {
    fn default() -> Self {
        Self {
            spatial_attention_block_skip_range: Some(2),
            temporal_attention_block_skip_range: None,
            spatial_attention_timestep_skip_range: (-1.0, 681.0),
            temporal_attention_timestep_skip_range: (-1.0, 681.0),
            low_frequency_weight_update_timestep_range: (99.0, 901.0),
            high_frequency_weight_update_timestep_range: (-1.0, 301.0),
            alpha_low_frequency: 1.1,
            alpha_high_frequency: 1.1,
            unconditional_batch_skip_range: 5,
            unconditional_batch_timestep_skip_range: (-1.0, 641.0),
            spatial_attention_block_identifiers: default_spatial_identifiers(),
            temporal_attention_block_identifiers: default_temporal_identifiers(),
            attention_weight: 0.5,
            tensor_format: TensorFormat::Bcfhw,
            is_guidance_distilled: false,
        }
    }
}

impl FasterCacheConfig {
    /// Checks ranges, weights and skip ranges.
    pub fn validate(&self) -> Result<()> {
        check_range(
            "spatial_attention_timestep_skip_range",
            self.spatial_attention_timestep_skip_range,
        )?;
        check_range(
            "temporal_attention_timestep_skip_range",
            self.temporal_attention_timestep_skip_range,
        )?;
        check_range(
            "low_frequency_weight_update_timestep_range",
            self.low_frequency_weight_update_timestep_range,
        )?;
        check_range(
            "high_frequency_weight_update_timestep_range",
            self.high_frequency_weight_update_timestep_range,
        )?;
        check_range(
            "unconditional_batch_timestep_skip_range",
            self.unconditional_batch_timestep_skip_range,
        )?;
        check_non_negative("alpha_low_frequency", self.alpha_low_frequency)?;
        check_non_negative("alpha_high_frequency", self.alpha_high_frequency)?;
        check_non_negative("attention_weight", self.attention_weight)?;
        check_positive(
            "unconditional_batch_skip_range",
            self.unconditional_batch_skip_range,
        )?;
        if let Some(n) = self.spatial_attention_block_skip_range {
            check_positive("spatial_attention_block_skip_range", n)?;
        }
        if let Some(n) = self.temporal_attention_block_skip_range {
            check_positive("temporal_attention_block_skip_range", n)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct AttentionState {
    block_skip_range: usize,
    timestep_skip_range: (f64, f64),
    iteration: usize,
    batch_size: Option<usize>,
    cache: Option<[Vec<Tensor<3>>; 2]>,
}

/// FasterCache's attention-layer part.
#[derive(Debug)]
pub(crate) struct FasterCacheAttention {
    modules: HashMap<String, AttentionState>,
    weight: f64,
    distilled: bool,
}

impl FasterCacheAttention {
    pub(crate) fn attach(config: &FasterCacheConfig, points: &[HookPoint]) -> Result<Self> {
        config.validate()?;
        let defaults = FasterCacheConfig::default();
        let all = [
            default_spatial_identifiers(),
            default_temporal_identifiers(),
        ]
        .concat();
        let eligible = Identifiers::search("FasterCache transformer blocks", &all)?;
        let spatial = Identifiers::search(
            "spatial_attention_block_identifiers",
            &config.spatial_attention_block_identifiers,
        )?;
        let temporal = Identifiers::search(
            "temporal_attention_block_identifiers",
            &config.temporal_attention_block_identifiers,
        )?;
        let attention: Vec<&HookPoint> = points
            .iter()
            .filter(|p| p.kind != ModuleKind::FeedForward && eligible.matches(&p.name))
            .collect();
        let self_attention: Vec<&str> = attention
            .iter()
            .filter(|p| p.kind != ModuleKind::CrossAttention)
            .map(|p| p.name.as_str())
            .collect();
        if config.spatial_attention_block_skip_range.is_some() {
            spatial.require_matches(
                self_attention.iter().copied(),
                config.spatial_attention_block_identifiers
                    != defaults.spatial_attention_block_identifiers,
                "attention module",
            )?;
        }
        if config.temporal_attention_block_skip_range.is_some() {
            temporal.require_matches(
                self_attention.iter().copied(),
                config.temporal_attention_block_identifiers
                    != defaults.temporal_attention_block_identifiers,
                "attention module",
            )?;
        }
        let mut modules = HashMap::new();
        for name in self_attention {
            let chosen =
                if spatial.matches(name) && config.spatial_attention_block_skip_range.is_some() {
                    config
                        .spatial_attention_block_skip_range
                        .map(|n| (n, config.spatial_attention_timestep_skip_range))
                } else if temporal.matches(name) {
                    config
                        .temporal_attention_block_skip_range
                        .map(|n| (n, config.temporal_attention_timestep_skip_range))
                } else {
                    None
                };
            if let Some((block_skip_range, timestep_skip_range)) = chosen {
                modules.insert(
                    name.to_string(),
                    AttentionState {
                        block_skip_range,
                        timestep_skip_range,
                        iteration: 0,
                        batch_size: None,
                        cache: None,
                    },
                );
            }
        }
        Ok(Self {
            modules,
            weight: config.attention_weight,
            distilled: config.is_guidance_distilled,
        })
    }
}

/// The conditional half (`chunk(2)[1]`) of a tensor holding uncond then cond rows.
fn cond_half(t: &Tensor<3>) -> Tensor<3> {
    let b = t.dims()[0];
    t.clone().narrow(0, b / 2, b - b / 2)
}

impl ModuleMethod for FasterCacheAttention {
    fn name(&self) -> &'static str {
        "fastercache"
    }

    fn hooks(&self, name: &str) -> bool {
        self.modules.contains_key(name)
    }

    fn run(
        &mut self,
        step: &StepInfo,
        name: &str,
        batch: usize,
        run: &mut ModuleFn<'_>,
    ) -> Result<(Vec<Tensor<3>>, Action)> {
        let timestep = current_timestep(step, "fastercache")?;
        let weight = self.weight;
        let distilled = self.distilled;
        let state = self
            .modules
            .get_mut(name)
            .ok_or_else(|| DiffusionError::State(format!("FasterCache does not hook {name}")))?;
        let full_batch = *state.batch_size.get_or_insert(batch);
        let (lo, hi) = state.timestep_skip_range;
        let mut skip = if lo < timestep && timestep < hi {
            let compute = state.iteration > 0 && state.iteration % state.block_skip_range == 0;
            !compute
        } else {
            false
        };
        // Skipping is only possible when the denoiser ran the conditional half alone (the cache
        // holds conditional outputs only), or when there is no unconditional branch.
        skip = skip && (distilled || full_batch != batch);
        let (output, action) = match (&state.cache, skip) {
            (Some([older, newer]), true) => {
                let approximated = older
                    .iter()
                    .zip(newer)
                    .map(|(t2, t1)| {
                        let t2 = if t2.dims()[0] != batch {
                            cond_half(t2)
                        } else {
                            t2.clone()
                        };
                        let t1 = if t1.dims()[0] != batch {
                            cond_half(t1)
                        } else {
                            t1.clone()
                        };
                        t1.clone() + (t1 - t2) * weight
                    })
                    .collect();
                (approximated, Action::Approximated)
            }
            _ => (run()?, Action::Computed),
        };
        let cached: Vec<Tensor<3>> = output
            .iter()
            .map(|t| {
                if !distilled && t.dims()[0] == full_batch {
                    cond_half(t)
                } else {
                    t.clone()
                }
            })
            .collect();
        state.cache = Some(match state.cache.take() {
            None => [cached.clone(), cached],
            Some([_, newer]) => [newer, cached],
        });
        state.iteration += 1;
        Ok((output, action))
    }

    fn reset(&mut self) {
        for state in self.modules.values_mut() {
            state.iteration = 0;
            state.batch_size = None;
            state.cache = None;
        }
    }

    fn memory_bytes(&self) -> usize {
        self.modules
            .values()
            .filter_map(|s| s.cache.as_ref())
            .map(|[a, b]| bytes_of(a) + bytes_of(b))
            .sum()
    }
}

/// FasterCache's denoiser part: skips the unconditional half of a CFG batch.
#[derive(Debug)]
pub(crate) struct FasterCacheDenoiser {
    config: FasterCacheConfig,
    iteration: usize,
    low_delta: Option<Spectrum>,
    high_delta: Option<Spectrum>,
    dft: Option<(Dft2, Tensor<4>)>,
}

/// What the denoiser hook decided before running the model.
#[derive(Clone, Debug)]
pub(crate) struct DenoiserPlan {
    /// Batch rows to run (`None`: all).
    pub rows: Option<Range<usize>>,
    skip: bool,
    timestep: f64,
}

impl FasterCacheDenoiser {
    pub(crate) fn new(config: &FasterCacheConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config: config.clone(),
            iteration: 0,
            low_delta: None,
            high_delta: None,
            dft: None,
        })
    }

    pub(crate) fn reset(&mut self) {
        self.iteration = 0;
        self.low_delta = None;
        self.high_delta = None;
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.low_delta.as_ref().map_or(0, Spectrum::bytes)
            + self.high_delta.as_ref().map_or(0, Spectrum::bytes)
    }

    /// Decides whether this call runs only the conditional half.
    pub(crate) fn plan(&self, step: &StepInfo, batch: usize) -> Result<DenoiserPlan> {
        let timestep = current_timestep(step, "fastercache")?;
        let (lo, hi) = self.config.unconditional_batch_timestep_skip_range;
        let within = lo < timestep && timestep < hi;
        let skip = self.iteration > 0
            && within
            && !self
                .iteration
                .is_multiple_of(self.config.unconditional_batch_skip_range)
            && !self.config.is_guidance_distilled;
        if !self.config.is_guidance_distilled && !batch.is_multiple_of(2) {
            return Err(DiffusionError::State(format!(
                "FasterCache needs the unconditional and conditional inputs batched together \
                 (uncond rows first), but the batch has {batch} rows; set is_guidance_distilled \
                 for models without CFG"
            )));
        }
        Ok(DenoiserPlan {
            rows: skip.then_some(batch / 2..batch),
            skip,
            timestep,
        })
    }

    fn in_range(timestep: f64, (lo, hi): (f64, f64)) -> bool {
        lo < timestep && timestep < hi
    }

    /// Turns the model output into `[N, C, H, W]` frames, and back.
    fn to_frames(&self, output: &DenoiserOutput) -> Result<(Tensor<4>, Vec<usize>)> {
        let format = self.config.tensor_format;
        let shape = output.dims();
        let bad = || DiffusionError::TensorFormat {
            format: format.name().into(),
            expected: format.rank(),
            shape: shape.clone(),
        };
        let frames = match (format, output) {
            (TensorFormat::Bchw, DenoiserOutput::Rank4(t)) => t.clone(),
            (TensorFormat::Bfchw, DenoiserOutput::Rank5(t)) => {
                let [b, f, c, h, w] = t.dims();
                t.clone().reshape([b * f, c, h, w])
            }
            (TensorFormat::Bcfhw, DenoiserOutput::Rank5(t)) => {
                let [b, c, f, h, w] = t.dims();
                t.clone().swap_dims(1, 2).reshape([b * f, c, h, w])
            }
            _ => return Err(bad()),
        };
        Ok((frames, shape))
    }

    fn frames_to_output(&self, frames: Tensor<4>, batch: usize, shape: &[usize]) -> DenoiserOutput {
        match self.config.tensor_format {
            TensorFormat::Bchw => DenoiserOutput::Rank4(frames),
            TensorFormat::Bfchw => DenoiserOutput::Rank5(
                frames.reshape([batch, shape[1], shape[2], shape[3], shape[4]]),
            ),
            TensorFormat::Bcfhw => DenoiserOutput::Rank5(
                frames
                    .reshape([batch, shape[2], shape[1], shape[3], shape[4]])
                    .swap_dims(1, 2),
            ),
        }
    }

    fn split(&mut self, frames: &Tensor<4>) -> (Spectrum, Spectrum) {
        let [_, _, h, w] = frames.dims();
        let fits = self.dft.as_ref().is_some_and(|(d, _)| d.fits(h, w));
        if !fits {
            let device = frames.device();
            self.dft = Some((Dft2::new(h, w, &device), low_frequency_mask(h, w, &device)));
        }
        let (dft, low) = self.dft.as_ref().expect("tables set above");
        let spectrum = dft.forward(frames);
        let high = low.clone().neg() + 1.0;
        (spectrum.mask(low), spectrum.mask(&high))
    }

    /// Completes the call: rebuilds the unconditional half when it was skipped, or refreshes
    /// the frequency deltas when both halves ran.
    pub(crate) fn finish(
        &mut self,
        plan: &DenoiserPlan,
        output: DenoiserOutput,
    ) -> Result<DenoiserOutput> {
        if self.config.is_guidance_distilled {
            self.iteration += 1;
            return Ok(output);
        }
        let (frames, shape) = self.to_frames(&output)?;
        let batch = shape[0];
        let output = if plan.skip {
            let (Some(low), Some(high)) = (self.low_delta.take(), self.high_delta.take()) else {
                return Err(DiffusionError::State(
                    "FasterCache skipped the unconditional branch before computing it once".into(),
                ));
            };
            let t = plan.timestep;
            let wl = if Self::in_range(t, self.config.low_frequency_weight_update_timestep_range) {
                self.config.alpha_low_frequency
            } else {
                1.0
            };
            let wh = if Self::in_range(t, self.config.high_frequency_weight_update_timestep_range) {
                self.config.alpha_high_frequency
            } else {
                1.0
            };
            // diffusers scales the stored deltas in place, so repeated skips compound.
            let low = low.mul_scalar(wl);
            let high = high.mul_scalar(wh);
            let (dft, _) = self.dft.as_ref().ok_or_else(|| {
                DiffusionError::State("FasterCache frequency tables missing".into())
            })?;
            let uncond = frames.clone() + dft.inverse_real(&low.clone().add(high.clone()));
            self.low_delta = Some(low);
            self.high_delta = Some(high);
            let uncond = self.frames_to_output(uncond, batch, &shape);
            let cond = self.frames_to_output(frames, batch, &shape);
            concat(uncond, cond)
        } else {
            let n = frames.dims()[0];
            let uncond = frames.clone().narrow(0, 0, n / 2);
            let cond = frames.narrow(0, n / 2, n - n / 2);
            let (low_u, high_u) = self.split(&uncond);
            let (low_c, high_c) = self.split(&cond);
            self.low_delta = Some(low_u.sub(low_c));
            self.high_delta = Some(high_u.sub(high_c));
            output
        };
        self.iteration += 1;
        Ok(output)
    }
}

fn concat(a: DenoiserOutput, b: DenoiserOutput) -> DenoiserOutput {
    match (a, b) {
        (DenoiserOutput::Rank3(a), DenoiserOutput::Rank3(b)) => {
            DenoiserOutput::Rank3(Tensor::cat(vec![a, b], 0))
        }
        (DenoiserOutput::Rank4(a), DenoiserOutput::Rank4(b)) => {
            DenoiserOutput::Rank4(Tensor::cat(vec![a, b], 0))
        }
        (DenoiserOutput::Rank5(a), DenoiserOutput::Rank5(b)) => {
            DenoiserOutput::Rank5(Tensor::cat(vec![a, b], 0))
        }
        (a, _) => a,
    }
}
