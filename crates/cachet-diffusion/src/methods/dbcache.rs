//! DBCache (cache-dit's Dual Block Cache): the first `Fn` blocks always run; their residual
//! decides, against `residual_diff_threshold`, whether the middle blocks run or their last
//! residual (or a calibrator's forecast of it: TaylorSeer, FoCa, DMD) is reused; the last `Bn`
//! blocks always run.
//! Warm-up, interval, cached-step limits, CFG-separate counting and the steps computation mask
//! follow cache-dit 1.5.3's `CachedContext`/`CachedContextManager` step by step.
//!
//! Long file: the config, the per-unit context and the block runner are one port of cache-dit's
//! `cached_context.py`, kept in one file so it reads side by side with the Python it mirrors.

use crate::models::{BlockFn, BlockGroup, BlockStates, ForwardPattern};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::calibrator::{Calibrator, CalibratorConfig};
use super::{BlockMethod, GroupLayout, relative_l1};
use crate::error::{DiffusionError, Result, check_non_negative};
use crate::hooks::ModuleHooks;
use crate::log::{Action, Decision};

/// cache-dit's `BasicCacheConfig` / `DBCacheConfig`, with its field names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(non_snake_case)]
pub struct DBCacheConfig {
    /// Always `"DBCache"` here (accepted for compatibility).
    pub cache_type: String,
    /// Blocks always computed first; their residual drives the decision (≥ 1).
    pub Fn_compute_blocks: usize,
    /// Blocks always computed last, refining the approximation.
    pub Bn_compute_blocks: usize,
    /// Cache when the relative L1 change of the Fn residual is below this.
    pub residual_diff_threshold: f64,
    /// Stop caching once the summed diffs reach this (if set and > 0).
    pub max_accumulated_residual_diff_threshold: Option<f64>,
    /// Steps `range(0, max_warmup_steps, warmup_interval)` never cache.
    pub max_warmup_steps: usize,
    /// Stride of the warm-up steps.
    pub warmup_interval: usize,
    /// At most this many cached steps per inference (-1: no limit).
    pub max_cached_steps: i64,
    /// At most this many cached steps in a row (-1: no limit).
    pub max_continuous_cached_steps: i64,
    /// CFG branches run as separate forward calls (cond, then uncond): count steps per pair.
    pub enable_separate_cfg: Option<bool>,
    /// The CFG (uncond) call comes first in each pair.
    pub cfg_compute_first: bool,
    /// Measure the CFG branch's diff separately instead of reusing the cond one.
    pub cfg_diff_compute_separate: bool,
    /// Informational: the number of steps the mask was made for.
    pub num_inference_steps: Option<usize>,
    /// Per step: 1 = always compute, 0 = may cache (see `steps_computation_policy`).
    pub steps_computation_mask: Option<Vec<u8>>,
    /// `dynamic` (0-steps still check the threshold) or `static` (0-steps always cache).
    pub steps_computation_policy: String,
}

impl Default for DBCacheConfig {
    fn default() -> Self {
        Self {
            cache_type: "DBCache".into(),
            Fn_compute_blocks: 8,
            Bn_compute_blocks: 0,
            residual_diff_threshold: 0.08,
            max_accumulated_residual_diff_threshold: None,
            max_warmup_steps: 8,
            warmup_interval: 1,
            max_cached_steps: -1,
            max_continuous_cached_steps: -1,
            enable_separate_cfg: None,
            cfg_compute_first: false,
            cfg_diff_compute_separate: true,
            num_inference_steps: None,
            steps_computation_mask: None,
            steps_computation_policy: "dynamic".into(),
        }
    }
}

impl DBCacheConfig {
    /// Checks the options against a block list of `blocks` blocks named `group`.
    pub fn validate(&self, blocks: usize, group: &str) -> Result<()> {
        if self.cache_type != "DBCache" {
            return Err(DiffusionError::InvalidOption {
                field: "cache_type",
                reason: format!("{:?}: only \"DBCache\" is supported", self.cache_type),
            });
        }
        if self.Fn_compute_blocks == 0 {
            return Err(DiffusionError::InvalidOption {
                field: "Fn_compute_blocks",
                reason: "must be at least 1 (the Fn residual drives the decision)".into(),
            });
        }
        // Checked: a config may give any usize, and Fn + Bn must not wrap below `blocks`.
        if self
            .Fn_compute_blocks
            .checked_add(self.Bn_compute_blocks)
            .is_none_or(|n| n > blocks)
        {
            return Err(DiffusionError::TooManyComputeBlocks {
                fn_blocks: self.Fn_compute_blocks,
                bn_blocks: self.Bn_compute_blocks,
                blocks,
                group: group.to_string(),
            });
        }
        check_non_negative("residual_diff_threshold", self.residual_diff_threshold)?;
        if let Some(t) = self.max_accumulated_residual_diff_threshold {
            check_non_negative("max_accumulated_residual_diff_threshold", t)?;
        }
        if self.warmup_interval == 0 {
            return Err(DiffusionError::InvalidOption {
                field: "warmup_interval",
                reason: "must be at least 1".into(),
            });
        }
        if let Some(mask) = &self.steps_computation_mask
            && let Some(bad) = mask.iter().find(|v| **v > 1)
        {
            return Err(DiffusionError::InvalidOption {
                field: "steps_computation_mask",
                reason: format!("values must be 0 or 1, found {bad}"),
            });
        }
        if !matches!(self.steps_computation_policy.as_str(), "dynamic" | "static") {
            return Err(DiffusionError::InvalidOption {
                field: "steps_computation_policy",
                reason: format!(
                    "{:?}: expected \"dynamic\" or \"static\"",
                    self.steps_computation_policy
                ),
            });
        }
        if self.enable_separate_cfg == Some(true)
            && self.cfg_diff_compute_separate
            && self.cfg_compute_first
        {
            return Err(DiffusionError::InvalidOption {
                field: "cfg_compute_first",
                reason:
                    "must be false when cfg_diff_compute_separate is enabled (as cache-dit asserts)"
                        .into(),
            });
        }
        Ok(())
    }

    fn separate_cfg(&self) -> bool {
        self.enable_separate_cfg == Some(true)
    }
}

/// Which block lists are cached, and how: cache-dit's `BlockAdapter`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockAdapter {
    /// Cache units: each is a list of block lists run back to back and cached as one (cache-dit
    /// concatenates Flux's two lists by default); `None`: all of the model's lists as one unit.
    pub blocks: Option<Vec<Vec<String>>>,
    /// Expected pattern of each listed block list (checked against the model), in `blocks` order.
    pub forward_pattern: Option<Vec<ForwardPattern>>,
    /// Per-unit overrides of `cache_config` fields (cache-dit's `ParamsModifier`), in unit order.
    pub params_modifiers: Option<Vec<serde_json::Value>>,
}

impl BlockAdapter {
    /// One unit per block list (cache-dit with `CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS=0`).
    pub fn per_list(layout: &GroupLayout) -> Self {
        Self {
            blocks: Some(layout.names().map(|n| vec![n.to_string()]).collect()),
            ..Self::default()
        }
    }
}

/// Residual / hidden-state buffers of one CFG branch.
#[derive(Clone, Debug, Default)]
struct Buffers {
    fn_residual: Option<Tensor<3>>,
    bn: Option<Tensor<3>>,
    bn_encoder: Option<Tensor<3>>,
}

/// cache-dit's `CachedContext` for one cache unit.
#[derive(Debug)]
struct Context {
    name: String,
    config: DBCacheConfig,
    calibrator_config: Option<CalibratorConfig>,
    executed_steps: i64,
    transformer_executed_steps: i64,
    cached_steps: [Vec<i64>; 2],
    residual_diffs: [Vec<(i64, f64)>; 2],
    accumulated_residual_diff: [f64; 2],
    continuous_cached_steps: [i64; 2],
    buffers: [Buffers; 2],
    /// (hidden, encoder) calibrators per branch.
    calibrators: [(Option<Calibrator>, Option<Calibrator>); 2],
}

impl Context {
    fn new(
        name: String,
        config: DBCacheConfig,
        calibrator_config: Option<CalibratorConfig>,
    ) -> Self {
        let make = |enabled: bool| {
            calibrator_config
                .as_ref()
                .filter(|_| enabled)
                .map(CalibratorConfig::build)
        };
        let hidden = calibrator_config
            .as_ref()
            .is_some_and(CalibratorConfig::enable_calibrator);
        let encoder = calibrator_config
            .as_ref()
            .is_some_and(CalibratorConfig::enable_encoder_calibrator);
        let separate = config.separate_cfg();
        let calibrators = [
            (make(hidden), make(encoder)),
            (make(hidden && separate), make(encoder && separate)),
        ];
        Self {
            name,
            config,
            calibrator_config,
            executed_steps: 0,
            transformer_executed_steps: 0,
            cached_steps: Default::default(),
            residual_diffs: Default::default(),
            accumulated_residual_diff: [0.0; 2],
            continuous_cached_steps: [0; 2],
            buffers: Default::default(),
            calibrators,
        }
    }

    fn current_step(&self) -> i64 {
        self.executed_steps - 1
    }

    fn current_transformer_step(&self) -> i64 {
        self.transformer_executed_steps - 1
    }

    fn is_cfg_step(&self) -> bool {
        if !self.config.separate_cfg() {
            return false;
        }
        if self.config.cfg_compute_first {
            self.current_transformer_step() % 2 == 0
        } else {
            self.current_transformer_step() % 2 != 0
        }
    }

    /// Branch index: 0 for the (non-CFG) main branch, 1 for the separate CFG branch.
    fn branch(&self) -> usize {
        usize::from(self.is_cfg_step())
    }

    fn calibrator_enabled(&self) -> bool {
        self.calibrator_config
            .as_ref()
            .is_some_and(CalibratorConfig::enable_calibrator)
    }

    fn encoder_calibrator_enabled(&self) -> bool {
        self.calibrator_config
            .as_ref()
            .is_some_and(CalibratorConfig::enable_encoder_calibrator)
    }

    fn cache_residual(&self) -> bool {
        !self.calibrator_enabled()
            || self
                .calibrator_config
                .as_ref()
                .is_some_and(|c| c.caches_residual())
    }

    fn encoder_cache_residual(&self) -> bool {
        !self.encoder_calibrator_enabled()
            || self
                .calibrator_config
                .as_ref()
                .is_some_and(|c| c.caches_residual())
    }

    fn mark_step_begin(&mut self) {
        self.transformer_executed_steps += 1;
        if !self.config.separate_cfg() {
            self.executed_steps += 1;
        } else if !self.config.cfg_compute_first {
            if !self.is_cfg_step() {
                self.executed_steps += 1;
            }
        } else if self.is_cfg_step() {
            self.executed_steps += 1;
        }
        if self.current_transformer_step() == 0 {
            for b in 0..2 {
                self.cached_steps[b].clear();
                self.residual_diffs[b].clear();
            }
            for (h, e) in self.calibrators.iter_mut() {
                for c in [h, e].into_iter().flatten() {
                    c.reset_cache();
                }
            }
        }
        let previous = self.current_step() - 1;
        let b = self.branch();
        if self.cached_steps[b].last() != Some(&previous) {
            self.continuous_cached_steps[b] = 0;
        }
        let (h, e) = &mut self.calibrators[b];
        for c in [h, e].into_iter().flatten() {
            c.mark_step_begin();
        }
    }

    /// Whether `step` is in `range(0, max_warmup_steps, warmup_interval)`, computed rather than
    /// listed (a config may ask for 2^63 warm-up steps).
    fn is_warmup_step(&self, step: i64) -> bool {
        let mut max_warmup = self.config.max_warmup_steps;
        if let Some(mask) = &self.config.steps_computation_mask {
            let first_compute = mask.iter().take_while(|m| **m == 1).count();
            max_warmup = max_warmup.min(first_compute);
        }
        usize::try_from(step)
            .is_ok_and(|s| s < max_warmup && s.is_multiple_of(self.config.warmup_interval))
    }

    fn in_full_compute_step(&self) -> bool {
        let step = self.current_step();
        match &self.config.steps_computation_mask {
            Some(mask) if step >= 0 && (step as usize) < mask.len() => mask[step as usize] == 1,
            _ => false,
        }
    }

    fn current_step_diff(&self) -> Option<f64> {
        let step = self.current_step();
        self.residual_diffs[0]
            .iter()
            .find(|(s, _)| *s == step)
            .map(|(_, d)| *d)
    }

    fn add_residual_diff(&mut self, diff: f64) {
        let step = self.current_step();
        let b = self.branch();
        if !self.residual_diffs[b].iter().any(|(s, _)| *s == step) {
            self.residual_diffs[b].push((step, diff));
            if diff > 0.0 {
                self.accumulated_residual_diff[b] += diff;
            }
        }
    }

    fn add_cached_step(&mut self) {
        let step = self.current_step();
        let b = self.branch();
        self.continuous_cached_steps[b] += 1;
        self.cached_steps[b].push(step);
    }

    /// cache-dit's `similarity`: records the diff and compares it with the threshold.
    fn similarity(
        &mut self,
        prev: &Tensor<3>,
        cur: &Tensor<3>,
        threshold: f64,
    ) -> (bool, Option<f64>) {
        if threshold <= 0.0 {
            self.add_residual_diff(-0.0);
            return (false, None);
        }
        if threshold >= 1.0 {
            self.add_residual_diff(-1.0);
            return (true, None);
        }
        if prev.dims() != cur.dims() {
            self.add_residual_diff(-2.0);
            return (false, None);
        }
        let reuse = self.config.separate_cfg()
            && self.is_cfg_step()
            && !self.config.cfg_diff_compute_separate;
        let diff = match (reuse, self.current_step_diff()) {
            (true, Some(d)) => d,
            _ => relative_l1(prev, cur),
        };
        self.add_residual_diff(diff);
        (diff < threshold, Some(diff))
    }

    /// cache-dit's `can_cache` on the Fn residual.
    fn can_cache(&mut self, residual: &Tensor<3>) -> (bool, Option<f64>) {
        if self.is_warmup_step(self.current_step()) {
            return (false, None);
        }
        if self.config.steps_computation_mask.is_some() {
            if self.in_full_compute_step() {
                return (false, None);
            }
            if self.config.steps_computation_policy == "static" {
                return (true, None);
            }
        }
        let b = self.branch();
        let max_cached = self.config.max_cached_steps;
        if max_cached >= 0 && self.cached_steps[b].len() as i64 >= max_cached {
            return (false, None);
        }
        let mut continuous = self.continuous_cached_steps[b];
        if self.cached_steps[b].last() == Some(&self.current_step()) {
            continuous -= 1;
        }
        let max_continuous = self.config.max_continuous_cached_steps;
        if max_continuous >= 0 && continuous >= max_continuous {
            return (false, None);
        }
        if let Some(limit) = self.config.max_accumulated_residual_diff_threshold
            && limit > 0.0
            && self.accumulated_residual_diff[b] >= limit
        {
            return (false, None);
        }
        let threshold = self.config.residual_diff_threshold;
        if threshold <= 0.0 {
            return (false, None);
        }
        match self.buffers[b].fn_residual.clone() {
            Some(prev) => self.similarity(&prev, residual, threshold),
            None => (false, None),
        }
    }

    fn set_bn(&mut self, hidden: Tensor<3>, encoder: Option<Tensor<3>>) {
        let b = self.branch();
        let (h, e) = &mut self.calibrators[b];
        match h {
            Some(c) => c.update(hidden, "Bn"),
            None => self.buffers[b].bn = Some(hidden),
        }
        if let Some(encoder) = encoder {
            match e {
                Some(c) => c.update(encoder, "Bn_encoder"),
                None => self.buffers[b].bn_encoder = Some(encoder),
            }
        }
    }

    /// cache-dit's `apply_cache`: adds (or substitutes) the cached Bn residual / states.
    fn apply_cache(&mut self, states: BlockStates) -> Result<BlockStates> {
        let b = self.branch();
        let (cache_residual, encoder_cache_residual) =
            (self.cache_residual(), self.encoder_cache_residual());
        let (h, e) = &mut self.calibrators[b];
        let prev = match h {
            Some(c) => c.approximate("Bn")?,
            None => self.buffers[b].bn.clone(),
        }
        .ok_or_else(|| {
            DiffusionError::State(format!(
                "{}: Bn buffer must be set before caching",
                self.name
            ))
        })?;
        let hidden = if cache_residual {
            prev + states.hidden
        } else {
            prev
        };
        let encoder = match states.encoder {
            Some(enc) => {
                let prev = match e {
                    Some(c) => c.approximate("Bn_encoder")?,
                    None => self.buffers[b].bn_encoder.clone(),
                };
                Some(match prev {
                    Some(p) if encoder_cache_residual => p + enc,
                    Some(p) => p,
                    None => enc,
                })
            }
            None => None,
        };
        Ok(BlockStates { hidden, encoder })
    }

    fn memory_bytes(&self) -> usize {
        let t = |x: &Option<Tensor<3>>| x.as_ref().map_or(0, cachet_tensor::tensor_bytes);
        let buffers: usize = self
            .buffers
            .iter()
            .map(|b| t(&b.fn_residual) + t(&b.bn) + t(&b.bn_encoder))
            .sum();
        let calibrators: usize = self
            .calibrators
            .iter()
            .flat_map(|(h, e)| [h, e])
            .flatten()
            .map(Calibrator::memory_bytes)
            .sum();
        buffers + calibrators
    }
}

/// Where one forward call is inside a unit.
#[derive(Debug, Default)]
struct UnitRun {
    original_hidden: Option<Tensor<3>>,
    cached: Option<bool>,
    mid_original: Option<BlockStates>,
    diff: Option<f64>,
}

#[derive(Debug)]
struct Unit {
    groups: Vec<(String, usize)>,
    total: usize,
    fn_blocks: usize,
    bn_blocks: usize,
    base_config: DBCacheConfig,
    calibrator: Option<CalibratorConfig>,
    context: Context,
    run: UnitRun,
}

impl Unit {
    fn offset(&self, group: &str) -> Option<usize> {
        let mut offset = 0;
        for (name, len) in &self.groups {
            if name == group {
                return Some(offset);
            }
            offset += len;
        }
        None
    }

    fn decide(&mut self, states: BlockStates) -> Result<BlockStates> {
        let original = self
            .run
            .original_hidden
            .take()
            .ok_or_else(|| DiffusionError::State("DBCache: Fn input missing".into()))?;
        let residual = states.hidden.clone() - original;
        self.context.mark_step_begin();
        let (cached, diff) = self.context.can_cache(&residual);
        self.run.cached = Some(cached);
        self.run.diff = diff;
        if cached {
            self.context.add_cached_step();
            return self.context.apply_cache(states);
        }
        let b = self.context.branch();
        self.context.buffers[b].fn_residual = Some(residual);
        self.run.mid_original = Some(states.clone());
        if self.fn_blocks == self.total - self.bn_blocks {
            self.finish_middle(&states)?;
        }
        Ok(states)
    }

    fn finish_middle(&mut self, states: &BlockStates) -> Result<()> {
        let mid = self
            .run
            .mid_original
            .take()
            .ok_or_else(|| DiffusionError::State("DBCache: middle input missing".into()))?;
        let hidden = if self.context.cache_residual() {
            states.hidden.clone() - mid.hidden
        } else {
            states.hidden.clone()
        };
        let encoder = match (&states.encoder, mid.encoder) {
            (Some(out), Some(inp)) if self.context.encoder_cache_residual() => {
                Some(out.clone() - inp)
            }
            (Some(out), _) => Some(out.clone()),
            (None, _) => None,
        };
        self.context.set_bn(hidden, encoder);
        Ok(())
    }
}

/// DBCache attached to a model: one cache-dit context per unit.
#[derive(Debug)]
pub(crate) struct DbCache {
    units: Vec<Unit>,
}

/// Merges a params modifier (partial config JSON) over a base config.
fn modified(base: &DBCacheConfig, modifier: Option<&serde_json::Value>) -> Result<DBCacheConfig> {
    let Some(modifier) = modifier else {
        return Ok(base.clone());
    };
    let mut value = serde_json::to_value(base).map_err(|e| DiffusionError::Config {
        what: "DBCache",
        reason: e.to_string(),
    })?;
    let (Some(target), Some(overrides)) = (value.as_object_mut(), modifier.as_object()) else {
        return Err(DiffusionError::Config {
            what: "params_modifiers",
            reason: "each modifier must be a JSON object of cache_config fields".into(),
        });
    };
    for (k, v) in overrides {
        target.insert(k.clone(), v.clone());
    }
    serde_json::from_value(value).map_err(|e| DiffusionError::Config {
        what: "params_modifiers",
        reason: e.to_string(),
    })
}

/// Checks the adapter's `forward_pattern` (one per listed block list) against the model.
pub(crate) fn check_patterns(
    adapter: &BlockAdapter,
    unit_lists: &[Vec<String>],
    layout: &GroupLayout,
) -> Result<()> {
    let Some(patterns) = &adapter.forward_pattern else {
        return Ok(());
    };
    let listed: Vec<&String> = unit_lists.iter().flatten().collect();
    if patterns.len() != listed.len() {
        return Err(DiffusionError::InvalidOption {
            field: "forward_pattern",
            reason: format!(
                "{} patterns for {} block lists",
                patterns.len(),
                listed.len()
            ),
        });
    }
    for (name, pattern) in listed.iter().zip(patterns) {
        if let Some((_, actual)) = layout.get(name)
            && actual != *pattern
        {
            return Err(DiffusionError::InvalidOption {
                field: "forward_pattern",
                reason: format!("{name} follows {actual:?}, not {pattern:?}"),
            });
        }
    }
    Ok(())
}

impl DbCache {
    pub(crate) fn attach(
        config: &DBCacheConfig,
        calibrator: Option<&CalibratorConfig>,
        adapter: &BlockAdapter,
        layout: &GroupLayout,
    ) -> Result<Self> {
        if let Some(c) = calibrator {
            c.validate()?;
        }
        let unit_lists: Vec<Vec<String>> = adapter
            .blocks
            .clone()
            .unwrap_or_else(|| vec![layout.names().map(str::to_string).collect()]);
        if unit_lists.is_empty() {
            return Err(DiffusionError::InvalidOption {
                field: "blocks",
                reason: "no block list to cache".into(),
            });
        }
        check_patterns(adapter, &unit_lists, layout)?;
        let mut units = Vec::new();
        for (u, names) in unit_lists.iter().enumerate() {
            let mut groups = Vec::new();
            for name in names {
                let (len, _) =
                    layout
                        .get(name)
                        .ok_or_else(|| DiffusionError::UnmatchedIdentifier {
                            option: "blocks",
                            identifier: name.clone(),
                            what: "block list",
                            available: layout.names().collect::<Vec<_>>().join(", "),
                        })?;
                groups.push((name.clone(), len));
            }
            let total = groups.iter().map(|g| g.1).sum();
            let unit_config = modified(
                config,
                adapter.params_modifiers.as_ref().and_then(|m| m.get(u)),
            )?;
            let label = names.join("+");
            unit_config.validate(total, &label)?;
            units.push(Unit {
                groups,
                total,
                fn_blocks: unit_config.Fn_compute_blocks,
                bn_blocks: unit_config.Bn_compute_blocks,
                context: Context::new(label, unit_config.clone(), calibrator.cloned()),
                base_config: unit_config,
                calibrator: calibrator.cloned(),
                run: UnitRun::default(),
            });
        }
        Ok(Self { units })
    }

    /// Per unit: name, cached steps and residual diffs of the main branch, and of the CFG branch.
    pub(crate) fn stats(&self) -> Vec<UnitStats> {
        self.units
            .iter()
            .map(|u| UnitStats {
                name: u.context.name.clone(),
                cached_steps: u.context.cached_steps[0].clone(),
                residual_diffs: u.context.residual_diffs[0].clone(),
                cfg_cached_steps: u.context.cached_steps[1].clone(),
                cfg_residual_diffs: u.context.residual_diffs[1].clone(),
            })
            .collect()
    }
}

/// What one DBCache unit recorded during an inference (cache-dit's `summary` inputs).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UnitStats {
    /// Unit name (its block lists joined by `+`).
    pub name: String,
    /// Steps that were cached.
    pub cached_steps: Vec<i64>,
    /// `(step, diff)` for each step a diff was recorded.
    pub residual_diffs: Vec<(i64, f64)>,
    /// Same for the separate CFG branch.
    pub cfg_cached_steps: Vec<i64>,
    /// Same for the separate CFG branch.
    pub cfg_residual_diffs: Vec<(i64, f64)>,
}

impl BlockMethod for DbCache {
    fn run_blocks(
        &mut self,
        hooks: &mut ModuleHooks,
        group: BlockGroup<'_>,
        states: BlockStates,
        block: &mut BlockFn<'_>,
    ) -> Result<BlockStates> {
        let Some(unit) = self
            .units
            .iter_mut()
            .find(|u| u.offset(group.name).is_some())
        else {
            // A block list no unit covers runs uncached.
            let mut states = states;
            for i in 0..group.len {
                states = block(hooks, i, states)?;
            }
            return Ok(states);
        };
        let offset = unit.offset(group.name).unwrap_or(0);
        let (n, fb, bb) = (unit.total, unit.fn_blocks, unit.bn_blocks);
        let mut states = states;
        let mut computed = 0;
        for i in 0..group.len {
            let j = offset + i;
            if j == 0 {
                unit.run = UnitRun {
                    original_hidden: Some(states.hidden.clone()),
                    ..UnitRun::default()
                };
            }
            if j < fb {
                states = block(hooks, i, states)?;
                computed += 1;
                if j + 1 == fb {
                    states = unit.decide(states)?;
                }
            } else if j < n - bb {
                if unit.run.cached == Some(true) {
                    continue;
                }
                states = block(hooks, i, states)?;
                computed += 1;
                if j + 1 == n - bb {
                    unit.finish_middle(&states)?;
                }
            } else {
                states = block(hooks, i, states)?;
                computed += 1;
            }
        }
        let cached = unit.run.cached == Some(true);
        let decided_here = (offset..offset + group.len).contains(&(fb - 1));
        hooks.log.push(Decision {
            step: hooks.step.step,
            context: unit.context.name.clone(),
            target: group.name.to_string(),
            group: Some(group.index),
            action: if cached {
                Action::Cached
            } else {
                Action::Computed
            },
            computed_blocks: computed,
            total_blocks: group.len,
            diff: if decided_here { unit.run.diff } else { None },
        });
        Ok(states)
    }

    fn reset(&mut self) {
        for unit in &mut self.units {
            unit.context = Context::new(
                unit.context.name.clone(),
                unit.base_config.clone(),
                unit.calibrator.clone(),
            );
            unit.run = UnitRun::default();
        }
    }

    fn memory_bytes(&self) -> usize {
        self.units.iter().map(|u| u.context.memory_bytes()).sum()
    }
}
