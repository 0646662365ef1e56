//! TaylorSeer: forecast a feature from its last computed values with a Taylor expansion in the
//! step count. Two flavours with their own reference semantics:
//! - `TaylorSeerCalibrator`, cache-dit's calibrator inside DBCache (`taylorseer_order`,
//!   residual or hidden-state cache type);
//! - `TaylorSeerCache`, diffusers' standalone `TaylorSeerCacheConfig` hook on attention layers
//!   (`cache_interval`, `disable_cache_before_step`, `max_order`), state per cache context.

use std::collections::HashMap;

use crate::models::{HookPoint, ModuleFn, ModuleKind};
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{ModuleMethod, bytes_of, point_names};
use crate::error::{DiffusionError, Result, check_positive};
use crate::log::{Action, StepInfo};
use crate::matching::Identifiers;

/// cache-dit's `TaylorSeerCalibratorConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaylorSeerCalibratorConfig {
    /// Forecast the hidden-state stream.
    pub enable_calibrator: bool,
    /// Forecast the encoder-state stream.
    pub enable_encoder_calibrator: bool,
    /// Always `"taylorseer"`.
    pub calibrator_type: String,
    /// `"residual"` (forecast the Bn residual) or `"hidden_states"` (forecast the states).
    pub calibrator_cache_type: String,
    /// Number of derivatives kept (1 or 2 recommended).
    pub taylorseer_order: usize,
}

impl Default for TaylorSeerCalibratorConfig {
    fn default() -> Self {
        Self {
            enable_calibrator: true,
            enable_encoder_calibrator: true,
            calibrator_type: "taylorseer".into(),
            calibrator_cache_type: "residual".into(),
            taylorseer_order: 1,
        }
    }
}

/// Highest `taylorseer_order` accepted: each order keeps one tensor per stream (cache-dit uses 1
/// or 2), so a config cannot size that list from an arbitrary number.
pub(crate) const MAX_TAYLORSEER_ORDER: usize = 16;

impl TaylorSeerCalibratorConfig {
    /// Checks the type names and the order.
    pub fn validate(&self) -> Result<()> {
        if self.taylorseer_order > MAX_TAYLORSEER_ORDER {
            return Err(DiffusionError::InvalidOption {
                field: "taylorseer_order",
                reason: format!(
                    "{}: at most {MAX_TAYLORSEER_ORDER} is supported",
                    self.taylorseer_order
                ),
            });
        }
        if self.calibrator_type != "taylorseer" {
            return Err(DiffusionError::InvalidOption {
                field: "calibrator_type",
                reason: format!(
                    "{:?} is not supported (only \"taylorseer\")",
                    self.calibrator_type
                ),
            });
        }
        if !matches!(
            self.calibrator_cache_type.as_str(),
            "residual" | "hidden_states"
        ) {
            return Err(DiffusionError::InvalidOption {
                field: "calibrator_cache_type",
                reason: format!(
                    "{:?}: expected \"residual\" or \"hidden_states\"",
                    self.calibrator_cache_type
                ),
            });
        }
        Ok(())
    }

    /// Whether the forecast stream is the residual.
    pub fn caches_residual(&self) -> bool {
        self.calibrator_cache_type == "residual"
    }
}

/// One forecast stream of cache-dit's TaylorSeer (its `TaylorSeerState`).
#[derive(Clone, Debug)]
struct SeerState {
    n_derivatives: usize,
    current_step: i64,
    last_non_approximated_step: i64,
    prev: Vec<Option<Tensor<3>>>,
    current: Vec<Option<Tensor<3>>>,
}

impl SeerState {
    fn new(n_derivatives: usize) -> Self {
        Self {
            n_derivatives,
            current_step: -1,
            last_non_approximated_step: -1,
            prev: vec![None; n_derivatives + 1],
            current: vec![None; n_derivatives + 1],
        }
    }

    fn reset(&mut self) {
        *self = Self::new(self.n_derivatives);
    }

    fn derivative(&mut self, y: Tensor<3>) -> Vec<Option<Tensor<3>>> {
        let mut d: Vec<Option<Tensor<3>>> = vec![None; self.n_derivatives + 1];
        let window = (self.current_step - self.last_non_approximated_step) as f64;
        if let Some(prev0) = &self.prev[0]
            && prev0.dims() != y.dims()
        {
            self.reset();
        }
        d[0] = Some(y);
        for i in 0..self.n_derivatives {
            match (&self.prev[i], &d[i]) {
                (Some(prev), Some(cur)) if self.current_step > 1 => {
                    d[i + 1] = Some((cur.clone() - prev.clone()) / window);
                }
                _ => break,
            }
        }
        d
    }

    fn update(&mut self, y: Tensor<3>) {
        self.prev = std::mem::take(&mut self.current);
        self.current = self.derivative(y);
        self.last_non_approximated_step = self.current_step;
    }

    fn approximate(&self) -> Option<Tensor<3>> {
        let elapsed = (self.current_step - self.last_non_approximated_step) as f64;
        let mut out: Option<Tensor<3>> = None;
        let mut factorial = 1.0;
        for (i, d) in self.current.iter().enumerate() {
            let Some(d) = d else { break };
            if i > 0 {
                factorial *= i as f64;
            }
            let term = d.clone() * (elapsed.powi(i as i32) / factorial);
            out = Some(match out {
                None => term,
                Some(acc) => acc + term,
            });
        }
        out
    }

    fn bytes(&self) -> usize {
        self.prev
            .iter()
            .chain(&self.current)
            .flatten()
            .map(cachet_tensor::tensor_bytes)
            .sum()
    }
}

/// cache-dit's `TaylorSeerCalibrator`: named streams created lazily on first update.
#[derive(Clone, Debug)]
pub(crate) struct TaylorSeerCalibrator {
    n_derivatives: usize,
    states: HashMap<String, SeerState>,
}

impl TaylorSeerCalibrator {
    pub(crate) fn new(order: usize) -> Self {
        Self {
            n_derivatives: order,
            states: HashMap::new(),
        }
    }

    /// Resets every stream but keeps them (cache-dit's `reset_cache`).
    pub(crate) fn reset_cache(&mut self) {
        for s in self.states.values_mut() {
            s.reset();
        }
    }

    /// Advances every existing stream by one step.
    pub(crate) fn mark_step_begin(&mut self) {
        for s in self.states.values_mut() {
            s.current_step += 1;
        }
    }

    pub(crate) fn update(&mut self, y: Tensor<3>, name: &str) {
        let n = self.n_derivatives;
        self.states
            .entry(name.to_string())
            .or_insert_with(|| SeerState::new(n))
            .update(y);
    }

    pub(crate) fn approximate(&self, name: &str) -> Result<Tensor<3>> {
        self.states
            .get(name)
            .and_then(SeerState::approximate)
            .ok_or_else(|| {
                DiffusionError::State(format!(
                    "TaylorSeer stream {name:?} has no computed value yet"
                ))
            })
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.states.values().map(SeerState::bytes).sum()
    }
}

/// diffusers' `TaylorSeerCacheConfig` (lite mode, which hooks whole blocks and `proj_out`, is not
/// offered: the hook seam exposes attention layers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaylorSeerCacheConfig {
    /// Full computation every `cache_interval` steps after warm-up.
    pub cache_interval: usize,
    /// Steps `0..n` always compute.
    pub disable_cache_before_step: usize,
    /// Steps from this one on always compute.
    pub disable_cache_after_step: Option<usize>,
    /// Highest Taylor order.
    pub max_order: usize,
    /// Storage dtype of the Taylor factors: `bfloat16` (diffusers' default), `float16`, `float32`.
    pub taylor_factors_dtype: String,
    /// Regexes (full match) of modules that return zeros on predicted steps.
    pub skip_predict_identifiers: Option<Vec<String>>,
    /// Regexes (full match) of modules whose outputs are forecast.
    pub cache_identifiers: Option<Vec<String>>,
}

impl Default for TaylorSeerCacheConfig {
    fn default() -> Self {
        Self {
            cache_interval: 5,
            disable_cache_before_step: 3,
            disable_cache_after_step: None,
            max_order: 1,
            taylor_factors_dtype: "bfloat16".into(),
            skip_predict_identifiers: None,
            cache_identifiers: None,
        }
    }
}

/// diffusers' default active patterns of taylorseer_cache.py.
pub(crate) fn default_cache_identifiers() -> Vec<String> {
    [
        "^blocks.*attn",
        "^transformer_blocks.*attn",
        "^single_transformer_blocks.*attn",
        "^temporal_transformer_blocks.*attn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[derive(Clone, Debug)]
struct FactorState {
    inactive: bool,
    current_step: i64,
    last_update_step: Option<i64>,
    factors: Vec<Vec<Tensor<3>>>,
    shapes: Vec<[usize; 3]>,
    device: Option<burn::tensor::Device>,
}

impl FactorState {
    fn new(inactive: bool) -> Self {
        Self {
            inactive,
            current_step: -1,
            last_update_step: None,
            factors: Vec::new(),
            shapes: Vec::new(),
            device: None,
        }
    }
}

#[derive(Clone, Debug)]
struct ModuleSetting {
    inactive: bool,
}

/// diffusers' standalone TaylorSeer cache attached to a model.
#[derive(Debug)]
pub(crate) struct TaylorSeerCache {
    config: TaylorSeerCacheConfig,
    dtype: DType,
    precision: cachet_tensor::Precision,
    modules: HashMap<String, ModuleSetting>,
    /// Per context, per module.
    states: HashMap<(String, String), FactorState>,
}

impl TaylorSeerCache {
    pub(crate) fn attach(config: &TaylorSeerCacheConfig, points: &[HookPoint]) -> Result<Self> {
        check_positive("cache_interval", config.cache_interval)?;
        let precision = match config.taylor_factors_dtype.as_str() {
            "bfloat16" | "bf16" => cachet_tensor::Precision::BF16,
            "float16" | "fp16" => cachet_tensor::Precision::F16,
            "float32" | "fp32" => cachet_tensor::Precision::F32,
            other => {
                return Err(DiffusionError::InvalidOption {
                    field: "taylor_factors_dtype",
                    reason: format!("{other:?}: expected bfloat16, float16 or float32"),
                });
            }
        };
        let dtype = precision.dtype();
        let inactive = Identifiers::fullmatch(
            "skip_predict_identifiers",
            config.skip_predict_identifiers.as_deref().unwrap_or(&[]),
        )?;
        let user_active = config.cache_identifiers.clone();
        let active_list = user_active
            .clone()
            .unwrap_or_else(default_cache_identifiers);
        let active = Identifiers::fullmatch("cache_identifiers", &active_list)?;
        let names = point_names(points);
        inactive.require_matches(names.clone(), true, "module")?;
        active.require_matches(names, user_active.is_some(), "module")?;
        let modules: HashMap<String, ModuleSetting> = points
            .iter()
            .filter(|p| p.kind != ModuleKind::FeedForward || user_active.is_some())
            .filter_map(|p| {
                let is_inactive = inactive.matches(&p.name);
                (is_inactive || active.matches(&p.name)).then(|| {
                    (
                        p.name.clone(),
                        ModuleSetting {
                            inactive: is_inactive,
                        },
                    )
                })
            })
            .collect();
        Ok(Self {
            config: config.clone(),
            dtype,
            precision,
            modules,
            states: HashMap::new(),
        })
    }

    fn should_compute(&self, step: i64) -> bool {
        // In i128: the options are any usize (a config may say 2^63), the step may be -1.
        let step = i128::from(step);
        let before = self.config.disable_cache_before_step as i128;
        let warmup = step < before;
        let interval = (step - before - 1).rem_euclid(self.config.cache_interval as i128) == 0;
        let cooldown = self
            .config
            .disable_cache_after_step
            .is_some_and(|a| step >= a as i128);
        warmup || interval || cooldown
    }
}

impl ModuleMethod for TaylorSeerCache {
    fn name(&self) -> &'static str {
        "taylorseer"
    }

    fn hooks(&self, name: &str) -> bool {
        self.modules.contains_key(name)
    }

    fn run(
        &mut self,
        step: &StepInfo,
        name: &str,
        _batch: usize,
        run: &mut ModuleFn<'_>,
    ) -> Result<(Vec<Tensor<3>>, Action)> {
        let context = step.context.clone().ok_or(DiffusionError::NoContext {
            method: "TaylorSeer",
        })?;
        let inactive = self.modules.get(name).is_some_and(|m| m.inactive);
        let key = (context, name.to_string());
        let mut state = self
            .states
            .remove(&key)
            .unwrap_or_else(|| FactorState::new(inactive));
        state.current_step += 1;
        let compute = self.should_compute(state.current_step);
        let result = if compute {
            let outputs = run()?;
            state.device = outputs.first().map(|t| t.device());
            // A device without the factors' dtype (bf16 on WGSL) would panic inside the backend.
            if let Some(device) = state.device.as_ref().filter(|_| !state.inactive) {
                cachet_tensor::ensure_supported(device, self.precision).map_err(|e| {
                    DiffusionError::InvalidOption {
                        field: "taylor_factors_dtype",
                        reason: format!("{e}; set taylor_factors_dtype to \"float32\""),
                    }
                })?;
            }
            if state.inactive {
                state.shapes = outputs.iter().map(|t| t.dims()).collect();
            } else {
                let mut all = Vec::with_capacity(outputs.len());
                for (i, features) in outputs.iter().enumerate() {
                    let mut new: Vec<Tensor<3>> = vec![features.clone()];
                    if let Some(last) = state.last_update_step {
                        let delta = (state.current_step - last) as f64;
                        if let Some(prev) = state.factors.get(i) {
                            for j in 0..self.config.max_order {
                                match prev.get(j) {
                                    Some(p) if p.dims() == new[j].dims() => {
                                        let next =
                                            (new[j].clone() - p.clone().cast(DType::F32)) / delta;
                                        new.push(next);
                                    }
                                    _ => break,
                                }
                            }
                        }
                    }
                    all.push(new.into_iter().map(|f| f.cast(self.dtype)).collect());
                }
                state.factors = all;
            }
            state.last_update_step = Some(state.current_step);
            (outputs, Action::Computed)
        } else {
            let Some(last) = state.last_update_step else {
                return Err(DiffusionError::State(format!(
                    "TaylorSeer cannot predict {name} before computing it once"
                )));
            };
            let offset = (state.current_step - last) as f64;
            let outputs = if state.inactive {
                let device = state.device.clone().ok_or_else(|| {
                    DiffusionError::State(format!("TaylorSeer: {name} has not run yet"))
                })?;
                state
                    .shapes
                    .iter()
                    .map(|s| Tensor::zeros(*s, &device))
                    .collect()
            } else {
                state
                    .factors
                    .iter()
                    .map(|orders| {
                        let mut factorial = 1.0;
                        let mut out: Option<Tensor<3>> = None;
                        for (order, f) in orders.iter().enumerate() {
                            if order > 0 {
                                factorial *= order as f64;
                            }
                            let term = f.clone().cast(DType::F32)
                                * (offset.powi(order as i32) / factorial);
                            out = Some(match out {
                                None => term,
                                Some(acc) => acc + term,
                            });
                        }
                        out.expect("at least the zeroth order")
                    })
                    .collect()
            };
            (outputs, Action::Approximated)
        };
        self.states.insert(key, state);
        Ok(result)
    }

    fn reset(&mut self) {
        self.states.clear();
    }

    fn memory_bytes(&self) -> usize {
        self.states
            .values()
            .map(|s| s.factors.iter().map(|f| bytes_of(f)).sum::<usize>())
            .sum()
    }
}
