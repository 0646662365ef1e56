//! MagCache (diffusers' `MagCacheConfig`): skip every block of a step when the product of the
//! per-step residual magnitude ratios since the last computed step stays close to 1, and reuse
//! the last residual (`output = input + residual`). The ratios are model-dependent: a
//! calibration run (`calibrate: true`) computes every step and records them. State is kept per
//! cache context and wraps after `num_inference_steps` steps, as diffusers' hooks do.

use std::collections::HashMap;

use crate::models::{BlockFn, BlockGroup, BlockStates};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{BlockMethod, GroupLayout};
use crate::error::{DiffusionError, Result, check_non_negative};
use crate::hooks::{CacheConfig, CacheHooks, ModuleHooks};
use crate::log::{Action, Decision};
use crate::pipeline::{Denoise, FlowMatchEuler, Guidance, denoise};

/// The magnitude ratios diffusers ships for FLUX.1 (dev/schnell), 28 steps (`FLUX_MAG_RATIOS`).
pub const FLUX_MAG_RATIOS: [f64; 28] = [
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344,
    0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047,
    0.98828, 0.96484, 0.95703, 0.93359, 0.89062,
];

/// diffusers' `MagCacheConfig`, with its field names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MagCacheConfig {
    /// Skip while the accumulated error `Σ |1 − Π ratio|` stays at or below this.
    pub threshold: f64,
    /// At most this many steps skipped in a row.
    pub max_skip_steps: usize,
    /// The first `round(retention_ratio × num_inference_steps)` steps always compute.
    pub retention_ratio: f64,
    /// Steps of one inference: the ratios are interpolated to it and the state wraps after it.
    pub num_inference_steps: usize,
    /// Per-step magnitude ratios of the model (required unless `calibrate`); any length, resampled
    /// to `num_inference_steps` by nearest neighbour.
    pub mag_ratios: Option<Vec<f64>>,
    /// Compute every step and record the ratios ([`CacheHooks::magcache_calibration`]).
    ///
    /// [`CacheHooks::magcache_calibration`]: crate::CacheHooks::magcache_calibration
    pub calibrate: bool,
}

impl Default for MagCacheConfig {
    fn default() -> Self {
        Self {
            threshold: 0.06,
            max_skip_steps: 3,
            retention_ratio: 0.2,
            num_inference_steps: 28,
            mag_ratios: None,
            calibrate: false,
        }
    }
}

impl MagCacheConfig {
    /// Checks the options: ratios or calibration, and the numbers' domains.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("threshold", self.threshold)?;
        if !self.retention_ratio.is_finite() || self.retention_ratio < 0.0 {
            return Err(DiffusionError::InvalidOption {
                field: "retention_ratio",
                reason: format!("{}: must be finite and not negative", self.retention_ratio),
            });
        }
        if self.num_inference_steps == 0 {
            return Err(DiffusionError::InvalidOption {
                field: "num_inference_steps",
                reason: "must be at least 1".into(),
            });
        }
        match &self.mag_ratios {
            None if !self.calibrate => Err(DiffusionError::InvalidOption {
                field: "mag_ratios",
                reason: "MagCache needs the model's magnitude ratios: run once with \
                         {\"calibrate\": true} and pass the printed ratios as \"mag_ratios\" \
                         (FLUX.1's are FLUX_MAG_RATIOS)"
                    .into(),
            }),
            Some(r) if r.is_empty() => Err(DiffusionError::InvalidOption {
                field: "mag_ratios",
                reason: "is empty".into(),
            }),
            Some(r) if r.iter().any(|x| !x.is_finite()) => Err(DiffusionError::InvalidOption {
                field: "mag_ratios",
                reason: "holds a value that is not finite".into(),
            }),
            _ => Ok(()),
        }
    }

    /// The ratio of `step` after diffusers' `nearest_interp` to `num_inference_steps` (in
    /// float32, rounding half to even as `torch.round`), or `None` past the last step.
    pub(crate) fn ratio(&self, step: usize) -> Option<f32> {
        let ratios = self.mag_ratios.as_ref()?;
        let n = self.num_inference_steps;
        if step >= n {
            return None;
        }
        let src = ratios.len();
        let index = if src == n {
            step
        } else if n == 1 {
            src - 1
        } else {
            let scale = (src - 1) as f64 / (n - 1) as f64;
            ((step as f32) * (scale as f32)).round_ties_even() as usize
        };
        ratios.get(index.min(src - 1)).map(|r| *r as f32)
    }

    /// The ratios after interpolation to `num_inference_steps`, as diffusers stores them.
    pub fn interpolated_ratios(&self) -> Option<Vec<f64>> {
        self.mag_ratios.as_ref()?;
        Some(
            (0..self.num_inference_steps)
                .map_while(|s| self.ratio(s).map(f64::from))
                .collect(),
        )
    }

    /// Readies the config for a loop of `scheduler`'s steps: `num_inference_steps` becomes their
    /// count (unless `keep_steps`), and without `mag_ratios` (nor `calibrate`) the ratios are
    /// measured on `model` by [`calibrate_mag_ratios`] with the same inputs.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare<M: Denoise>(
        &mut self,
        keep_steps: bool,
        model: &M,
        scheduler: &FlowMatchEuler,
        latents: Tensor<3>,
        cond: &M::Cond,
        uncond: Option<&M::Cond>,
        guidance: Option<Guidance>,
    ) -> Result<()> {
        if !keep_steps {
            self.num_inference_steps = scheduler.len();
        }
        if self.mag_ratios.is_none() && !self.calibrate {
            let ratios = calibrate_mag_ratios(model, scheduler, latents, cond, uncond, guidance)?;
            self.mag_ratios = Some(ratios);
        }
        Ok(())
    }

    /// First step that may be skipped: `int(retention_ratio × num_inference_steps + 0.5)`.
    fn retention_step(&self) -> f64 {
        (self.retention_ratio * self.num_inference_steps as f64 + 0.5).trunc()
    }
}

/// Measures `model`'s magnitude ratios for MagCache: one run of [`denoise`] with
/// `{"calibrate": true}` (nothing skipped) over `scheduler`'s steps from `latents`, returning the
/// ratios of the first cache context (the conditional one with separate CFG calls).
pub fn calibrate_mag_ratios<M: Denoise>(
    model: &M,
    scheduler: &FlowMatchEuler,
    latents: Tensor<3>,
    cond: &M::Cond,
    uncond: Option<&M::Cond>,
    guidance: Option<Guidance>,
) -> Result<Vec<f64>> {
    let _span = tracing::info_span!("magcache_calibration", steps = scheduler.len()).entered();
    let config = MagCacheConfig {
        calibrate: true,
        num_inference_steps: scheduler.len(),
        ..MagCacheConfig::default()
    };
    let mut hooks = CacheHooks::new(model, CacheConfig::MagCache(config))?;
    denoise(
        model,
        &mut hooks,
        scheduler,
        latents,
        cond,
        uncond,
        guidance,
        |_| {},
    )?;
    hooks
        .magcache_calibration()
        .into_iter()
        .filter(|c| c.complete)
        .min_by_key(|c| c.context != "cond")
        .map(|c| c.mag_ratios)
        .ok_or_else(|| {
            DiffusionError::State("MagCache's calibration run recorded no complete ratios".into())
        })
}

/// What MagCache's calibration recorded in one cache context; displayed as the
/// `--cache-config` fragment that reuses it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MagCacheCalibration {
    /// Cache context (`cond`, `uncond`, `cond_uncond`...).
    pub context: String,
    /// Ratio per step of the last completed inference (`mean ‖r_t‖ / ‖r_{t−1}‖` over tokens; 1 for
    /// the first step); the steps so far when no inference completed yet.
    pub mag_ratios: Vec<f64>,
    /// Whether `mag_ratios` covers a whole inference of `num_inference_steps` steps.
    pub complete: bool,
}

impl std::fmt::Display for MagCacheCalibration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ratios: Vec<String> = self.mag_ratios.iter().map(|r| format!("{r}")).collect();
        let partial = if self.complete { "" } else { ", incomplete" };
        write!(
            f,
            "MagCache calibration ({}{partial}): {{\"mag_ratios\": [{}]}}",
            self.context,
            ratios.join(", ")
        )
    }
}

/// diffusers' `MagCacheState` for one context.
#[derive(Debug)]
struct State {
    previous_residual: Option<Tensor<3>>,
    head_input: Option<Tensor<3>>,
    should_compute: bool,
    accumulated_ratio: f32,
    accumulated_err: f32,
    accumulated_steps: usize,
    step_index: usize,
    calibration: Vec<f64>,
    last_calibration: Option<Vec<f64>>,
    err: Option<f64>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            previous_residual: None,
            head_input: None,
            should_compute: true,
            accumulated_ratio: 1.0,
            accumulated_err: 0.0,
            accumulated_steps: 0,
            step_index: 0,
            calibration: Vec::new(),
            last_calibration: None,
            err: None,
        }
    }
}

impl State {
    fn reset_accumulators(&mut self) {
        self.accumulated_ratio = 1.0;
        self.accumulated_steps = 0;
        self.accumulated_err = 0.0;
    }
}

/// MagCache attached to a model.
#[derive(Debug)]
pub(crate) struct MagCache {
    config: MagCacheConfig,
    layout: GroupLayout,
    states: HashMap<String, State>,
}

impl MagCache {
    pub(crate) fn attach(config: &MagCacheConfig, layout: GroupLayout) -> Result<Self> {
        config.validate()?;
        if layout.total() == 0 {
            return Err(DiffusionError::InvalidOption {
                field: "MagCache",
                reason: "the model has no transformer blocks".into(),
            });
        }
        Ok(Self {
            config: config.clone(),
            layout,
            states: HashMap::new(),
        })
    }

    /// The head hook's decision for the current step.
    fn decide(config: &MagCacheConfig, state: &mut State) -> bool {
        state.err = None;
        if config.calibrate {
            return true;
        }
        let step = state.step_index;
        let scale = config.ratio(step).unwrap_or(1.0);
        if step as f64 >= config.retention_step() {
            state.accumulated_ratio *= scale;
            state.accumulated_steps += 1;
            state.accumulated_err += (1.0 - state.accumulated_ratio).abs();
            state.err = Some(f64::from(state.accumulated_err));
            if state.previous_residual.is_some()
                && state.accumulated_err <= config.threshold as f32
                && state.accumulated_steps <= config.max_skip_steps
            {
                return false;
            }
            state.reset_accumulators();
        }
        true
    }

    /// The tail hook's bookkeeping at the end of a step (diffusers' `_advance_step`).
    fn advance(config: &MagCacheConfig, state: &mut State) {
        state.step_index += 1;
        if state.step_index >= config.num_inference_steps {
            if config.calibrate {
                state.last_calibration = Some(std::mem::take(&mut state.calibration));
            }
            state.step_index = 0;
            state.reset_accumulators();
            state.previous_residual = None;
            state.calibration.clear();
        }
    }

    /// `mean(‖cur‖ / (‖prev‖ + 1e-8))` over tokens (norms over the last axis).
    fn ratio_of(current: &Tensor<3>, previous: &Tensor<3>) -> f64 {
        let norm = |t: &Tensor<3>| t.clone().powf_scalar(2.0).sum_dim(2).sqrt();
        let ratio = norm(current) / (norm(previous) + 1e-8);
        let mean: f32 = ratio.mean().into_scalar();
        f64::from(mean)
    }

    /// Per context, the ratios the calibration recorded.
    pub(crate) fn calibration(&self) -> Vec<MagCacheCalibration> {
        let mut out: Vec<MagCacheCalibration> = self
            .states
            .iter()
            .filter(|_| self.config.calibrate)
            .map(|(context, s)| match &s.last_calibration {
                Some(r) => MagCacheCalibration {
                    context: context.clone(),
                    mag_ratios: r.clone(),
                    complete: true,
                },
                None => MagCacheCalibration {
                    context: context.clone(),
                    mag_ratios: s.calibration.clone(),
                    complete: false,
                },
            })
            .collect();
        out.sort_by(|a, b| a.context.cmp(&b.context));
        out
    }
}

impl BlockMethod for MagCache {
    fn run_blocks(
        &mut self,
        hooks: &mut ModuleHooks,
        group: BlockGroup<'_>,
        states: BlockStates,
        block: &mut BlockFn<'_>,
    ) -> Result<BlockStates> {
        let context = hooks
            .step
            .context
            .clone()
            .unwrap_or_else(|| "inference".into());
        let offset = self.layout.offset(group.name)?;
        let total = self.layout.total();
        let config = &self.config;
        let state = self.states.entry(context.clone()).or_default();
        let mut states = states;
        let mut computed = 0;
        let contains_head = offset == 0;
        let contains_tail = offset + group.len == total;
        if contains_head && group.len > 0 {
            state.head_input = Some(states.hidden.clone());
            state.should_compute = Self::decide(config, state);
            if !state.should_compute {
                let residual = state.previous_residual.clone().ok_or_else(|| {
                    DiffusionError::State("MagCache: no residual cached yet".into())
                })?;
                if residual.dims() != states.hidden.dims() {
                    return Err(DiffusionError::State(format!(
                        "MagCache: the cached residual has shape {:?}, the input {:?} (did the \
                         batch change within an inference?)",
                        residual.dims(),
                        states.hidden.dims()
                    )));
                }
                states.hidden = states.hidden + residual;
            }
        }
        if state.should_compute {
            for i in 0..group.len {
                states = block(hooks, i, states)?;
                computed += 1;
            }
            if contains_tail && group.len > 0 {
                let input = state.head_input.clone().ok_or_else(|| {
                    DiffusionError::State("MagCache: the head block's input is missing".into())
                })?;
                let residual = states.hidden.clone() - input;
                if config.calibrate {
                    let ratio = match &state.previous_residual {
                        None => 1.0,
                        Some(prev) => Self::ratio_of(&residual, prev),
                    };
                    state.calibration.push(ratio);
                }
                state.previous_residual = Some(residual);
                Self::advance(config, state);
            }
        } else if contains_tail && group.len > 0 && total > 1 {
            // The tail block's hook advances the step even when it is skipped; a model of one
            // block has no separate tail hook, as in diffusers.
            Self::advance(config, state);
        }
        hooks.log.push(Decision {
            step: hooks.step.step,
            context,
            target: group.name.to_string(),
            group: Some(group.index),
            action: if state.should_compute {
                Action::Computed
            } else {
                Action::Cached
            },
            computed_blocks: computed,
            total_blocks: group.len,
            diff: if contains_head { state.err } else { None },
        });
        Ok(states)
    }

    fn reset(&mut self) {
        self.states.clear();
    }

    fn memory_bytes(&self) -> usize {
        self.states
            .values()
            .map(|s| {
                s.previous_residual
                    .as_ref()
                    .map_or(0, cachet_tensor::tensor_bytes)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_resampled_as_nearest_interp() {
        let config = MagCacheConfig {
            mag_ratios: Some(FLUX_MAG_RATIOS.to_vec()),
            num_inference_steps: 7,
            ..MagCacheConfig::default()
        };
        // torch.round(arange(7) * 27/6) = [0, 4, 9, 14, 18, 22, 27] (4.5 rounds to 4).
        let want: Vec<f64> = [0, 4, 9, 14, 18, 22, 27]
            .iter()
            .map(|&i| f64::from(FLUX_MAG_RATIOS[i] as f32))
            .collect();
        assert_eq!(config.interpolated_ratios().unwrap(), want);
        let one = MagCacheConfig {
            num_inference_steps: 1,
            ..config.clone()
        };
        assert_eq!(one.ratio(0), Some(0.89062));
        assert_eq!(config.ratio(7), None);
    }

    #[test]
    fn ratios_or_calibration_are_required() {
        let err = MagCacheConfig::default().validate().unwrap_err();
        assert!(err.to_string().contains("calibrate"), "{err}");
        MagCacheConfig {
            calibrate: true,
            ..MagCacheConfig::default()
        }
        .validate()
        .unwrap();
        for bad in [
            MagCacheConfig {
                mag_ratios: Some(vec![]),
                ..MagCacheConfig::default()
            },
            MagCacheConfig {
                mag_ratios: Some(vec![f64::NAN]),
                ..MagCacheConfig::default()
            },
            MagCacheConfig {
                calibrate: true,
                num_inference_steps: 0,
                ..MagCacheConfig::default()
            },
            MagCacheConfig {
                calibrate: true,
                retention_ratio: f64::INFINITY,
                ..MagCacheConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn decisions_follow_the_accumulated_error() {
        let config = MagCacheConfig {
            mag_ratios: Some(vec![1.0, 1.0, 1.02, 1.02, 1.02, 1.02, 1.5, 1.0]),
            num_inference_steps: 8,
            retention_ratio: 0.2,
            threshold: 0.07,
            max_skip_steps: 2,
            calibrate: false,
        };
        let mut state = State {
            previous_residual: Some(Tensor::zeros([1, 1, 1], &Default::default())),
            ..State::default()
        };
        let mut computed = Vec::new();
        for _ in 0..8 {
            computed.push(MagCache::decide(&config, &mut state));
            MagCache::advance(&config, &mut state);
            state.previous_residual = Some(Tensor::zeros([1, 1, 1], &Default::default()));
        }
        // Steps 0-1 retained; 2 (error 0.02) and 3 (0.02 + 0.0404) skip; 4 passes the threshold
        // (0.12) and starts over; 5 skips; 6 jumps past the threshold; 7 skips.
        assert_eq!(
            computed,
            [true, true, false, false, true, false, true, false]
        );
    }
}
