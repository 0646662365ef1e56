//! DBPrune (cache-dit's Dynamic Block Prune): each block (but the first `Fn`, the last `Bn` and
//! `non_prune_block_ids`) compares its input with its input at the last step it ran; when the
//! relative L1 change is below the (optionally dynamic) threshold, the block is skipped and its
//! last residual (or a calibrator's forecast of it) is added instead. Warm-up, steps masks,
//! cached-step limits and separate-CFG step counting are cache-dit 1.5.3's `PrunedContext`.

use std::collections::HashMap;

use crate::models::{BlockFn, BlockGroup, BlockStates};
use burn::tensor::{Tensor, s};
use serde::{Deserialize, Serialize};

use super::calibrator::{Calibrator, CalibratorConfig};
use super::dbcache::BlockAdapter;
use super::{BlockMethod, GroupLayout, relative_l1};
use crate::error::{DiffusionError, Result, check_non_negative};
use crate::hooks::ModuleHooks;
use crate::log::{Action, Decision};

/// cache-dit's `DBPruneConfig` (`BasicCacheConfig` plus the prune fields), with its field names
/// and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(non_snake_case)]
pub struct DBPruneConfig {
    /// Always `"DBPrune"` here (accepted for compatibility).
    pub cache_type: String,
    /// The first `Fn` blocks of a unit are never pruned (≥ 1).
    pub Fn_compute_blocks: usize,
    /// The last `Bn` blocks of a unit are never pruned.
    pub Bn_compute_blocks: usize,
    /// Prune a block when its input moved by less than this (relative mean absolute change).
    pub residual_diff_threshold: f64,
    /// Accepted for compatibility; cache-dit's pruning never accumulates diffs, so it has no
    /// effect.
    pub max_accumulated_residual_diff_threshold: Option<f64>,
    /// Steps `range(0, max_warmup_steps, warmup_interval)` never prune.
    pub max_warmup_steps: usize,
    /// Stride of the warm-up steps.
    pub warmup_interval: usize,
    /// At most this many steps with pruned blocks per inference (-1: no limit).
    pub max_cached_steps: i64,
    /// At most this many steps with pruned blocks in a row (-1: no limit).
    pub max_continuous_cached_steps: i64,
    /// CFG branches run as separate forward calls (cond, then uncond): count steps per pair.
    pub enable_separate_cfg: Option<bool>,
    /// The CFG (uncond) call comes first in each pair.
    pub cfg_compute_first: bool,
    /// Must stay true with separate CFG: cache-dit cannot share per-block diffs across branches.
    pub cfg_diff_compute_separate: bool,
    /// Informational: the number of steps the mask was made for.
    pub num_inference_steps: Option<usize>,
    /// Per step: 1 = never prune, 0 = may prune (see `steps_computation_policy`).
    pub steps_computation_mask: Option<Vec<u8>>,
    /// `dynamic` (0-steps still check the threshold) or `static` (0-steps prune every block).
    pub steps_computation_policy: String,
    /// Raise the threshold to `relax × mean` of this step's first five positive diffs, while
    /// that stays below `max_dynamic_prune_threshold` (default 2 × the threshold).
    pub enable_dynamic_prune_threshold: bool,
    /// Cap of the dynamic threshold.
    pub max_dynamic_prune_threshold: Option<f64>,
    /// Factor on the mean diff for the dynamic threshold.
    pub dynamic_prune_threshold_relax_ratio: f64,
    /// Block indices (within a unit) that are never pruned.
    pub non_prune_block_ids: Vec<i64>,
    /// With a calibrator: compare every 4th channel of the block inputs only (less memory).
    pub force_reduce_calibrator_vram: bool,
}

impl Default for DBPruneConfig {
    fn default() -> Self {
        Self {
            cache_type: "DBPrune".into(),
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
            enable_dynamic_prune_threshold: false,
            max_dynamic_prune_threshold: None,
            dynamic_prune_threshold_relax_ratio: 1.25,
            non_prune_block_ids: Vec::new(),
            force_reduce_calibrator_vram: false,
        }
    }
}

impl DBPruneConfig {
    /// Checks the options against a unit of `blocks` blocks named `unit`.
    pub fn validate(&self, blocks: usize, unit: &str) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| DiffusionError::InvalidOption { field, reason };
        if self.cache_type != "DBPrune" {
            return Err(bad(
                "cache_type",
                format!("{:?}: only \"DBPrune\" is supported", self.cache_type),
            ));
        }
        if self.Fn_compute_blocks == 0 {
            return Err(bad("Fn_compute_blocks", "must be at least 1".into()));
        }
        for (field, n) in [
            ("Fn_compute_blocks", self.Fn_compute_blocks),
            ("Bn_compute_blocks", self.Bn_compute_blocks),
        ] {
            if n > blocks {
                return Err(bad(
                    field,
                    format!("{n} is more than the {blocks} blocks of {unit}"),
                ));
            }
        }
        check_non_negative("residual_diff_threshold", self.residual_diff_threshold)?;
        if let Some(t) = self.max_dynamic_prune_threshold {
            check_non_negative("max_dynamic_prune_threshold", t)?;
        }
        if let Some(t) = self.max_accumulated_residual_diff_threshold {
            check_non_negative("max_accumulated_residual_diff_threshold", t)?;
        }
        if !self.dynamic_prune_threshold_relax_ratio.is_finite() {
            return Err(bad(
                "dynamic_prune_threshold_relax_ratio",
                "must be finite".into(),
            ));
        }
        if self.warmup_interval == 0 {
            return Err(bad("warmup_interval", "must be at least 1".into()));
        }
        if let Some(mask) = &self.steps_computation_mask
            && let Some(v) = mask.iter().find(|v| **v > 1)
        {
            return Err(bad(
                "steps_computation_mask",
                format!("values must be 0 or 1, found {v}"),
            ));
        }
        if !matches!(self.steps_computation_policy.as_str(), "dynamic" | "static") {
            return Err(bad(
                "steps_computation_policy",
                format!(
                    "{:?}: expected \"dynamic\" or \"static\"",
                    self.steps_computation_policy
                ),
            ));
        }
        if self.separate_cfg() && self.cfg_diff_compute_separate && self.cfg_compute_first {
            return Err(bad(
                "cfg_compute_first",
                "must be false when cfg_diff_compute_separate is enabled (as cache-dit asserts)"
                    .into(),
            ));
        }
        if self.separate_cfg() && !self.cfg_diff_compute_separate {
            return Err(bad(
                "cfg_diff_compute_separate",
                "must be true for DBPrune: its diffs are per block, and cache-dit fails reusing \
                 them across CFG branches"
                    .into(),
            ));
        }
        Ok(())
    }

    fn separate_cfg(&self) -> bool {
        self.enable_separate_cfg == Some(true)
    }
}

/// What one DBPrune unit recorded during an inference (cache-dit's `PrunedContext` statistics).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PruneStats {
    /// Unit name (its block lists joined by `+`).
    pub name: String,
    /// Steps in which at least one block was pruned.
    pub pruned_steps: Vec<i64>,
    /// `(step, diffs)`: every block-input diff measured in the step, in block order.
    pub residual_diffs: Vec<(i64, Vec<f64>)>,
    /// Blocks pruned in each forward call.
    pub pruned_blocks: Vec<usize>,
    /// Blocks of the unit in each forward call.
    pub actual_blocks: Vec<usize>,
    /// Same for the separate CFG branch.
    pub cfg_pruned_steps: Vec<i64>,
    /// Same for the separate CFG branch.
    pub cfg_residual_diffs: Vec<(i64, Vec<f64>)>,
    /// Same for the separate CFG branch.
    pub cfg_pruned_blocks: Vec<usize>,
    /// Same for the separate CFG branch.
    pub cfg_actual_blocks: Vec<usize>,
}

/// A block's buffers in one CFG branch.
#[derive(Clone, Debug, Default)]
struct Buffers {
    /// The block's input the last time it ran (every 4th channel with reduced VRAM).
    input: Option<Tensor<3>>,
    /// Its residual (or output, for a hidden-state calibrator) then.
    output: Option<Tensor<3>>,
    /// Its encoder residual then.
    encoder: Option<Tensor<3>>,
}

/// cache-dit's `PrunedContext` for one unit.
#[derive(Debug)]
struct Context {
    name: String,
    config: DBPruneConfig,
    calibrator_config: Option<CalibratorConfig>,
    downsample: usize,
    non_prune: Vec<usize>,
    executed_steps: i64,
    transformer_executed_steps: i64,
    cached_steps: [Vec<i64>; 2],
    residual_diffs: [Vec<(i64, Vec<f64>)>; 2],
    continuous_cached_steps: [i64; 2],
    pruned_blocks: [Vec<usize>; 2],
    actual_blocks: [Vec<usize>; 2],
    buffers: [HashMap<usize, Buffers>; 2],
    /// (hidden, encoder) calibrators per branch, one stream per block.
    calibrators: [(Option<Calibrator>, Option<Calibrator>); 2],
}

impl Context {
    fn new(
        name: String,
        config: DBPruneConfig,
        calibrator_config: Option<CalibratorConfig>,
        blocks: usize,
    ) -> Self {
        let separate = config.separate_cfg();
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
        let calibrators = [
            (make(hidden), make(encoder)),
            (make(hidden && separate), make(encoder && separate)),
        ];
        let downsample = if calibrator_config.is_some() && config.force_reduce_calibrator_vram {
            4
        } else {
            1
        };
        // Never the first Fn and last Bn blocks, nor the listed ones (cache-dit's
        // `get_non_prune_blocks_ids`).
        let mut non_prune: Vec<usize> = (0..config.Fn_compute_blocks.min(blocks))
            .chain(blocks - config.Bn_compute_blocks.min(blocks)..blocks)
            .chain(
                config
                    .non_prune_block_ids
                    .iter()
                    .filter_map(|&i| usize::try_from(i).ok()),
            )
            .filter(|&i| i < blocks)
            .collect();
        non_prune.sort_unstable();
        non_prune.dedup();
        Self {
            name,
            config,
            calibrator_config,
            downsample,
            non_prune,
            executed_steps: 0,
            transformer_executed_steps: 0,
            cached_steps: Default::default(),
            residual_diffs: Default::default(),
            continuous_cached_steps: [0; 2],
            pruned_blocks: Default::default(),
            actual_blocks: Default::default(),
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
        let odd = self.current_transformer_step() % 2 != 0;
        if self.config.cfg_compute_first {
            !odd
        } else {
            odd
        }
    }

    fn branch(&self) -> usize {
        usize::from(self.is_cfg_step())
    }

    fn hidden_calibrated(&self) -> bool {
        self.calibrator_config
            .as_ref()
            .is_some_and(CalibratorConfig::enable_calibrator)
    }

    fn encoder_calibrated(&self) -> bool {
        self.calibrator_config
            .as_ref()
            .is_some_and(CalibratorConfig::enable_encoder_calibrator)
    }

    fn caches_residual(&self, calibrated: bool) -> bool {
        !calibrated
            || self
                .calibrator_config
                .as_ref()
                .is_some_and(CalibratorConfig::caches_residual)
    }

    fn mark_step_begin(&mut self) {
        self.transformer_executed_steps += 1;
        let separate = self.config.separate_cfg();
        if !separate || self.config.cfg_compute_first == self.is_cfg_step() {
            self.executed_steps += 1;
        }
        if self.current_transformer_step() == 0 {
            for b in 0..2 {
                self.cached_steps[b].clear();
                self.residual_diffs[b].clear();
            }
            self.pruned_blocks[0].clear();
            self.actual_blocks[0].clear();
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

    fn is_warmup_step(&self, step: i64) -> bool {
        let mut max_warmup = self.config.max_warmup_steps;
        if let Some(mask) = &self.config.steps_computation_mask {
            max_warmup = max_warmup.min(mask.iter().take_while(|m| **m == 1).count());
        }
        usize::try_from(step)
            .is_ok_and(|s| s < max_warmup && s.is_multiple_of(self.config.warmup_interval))
    }

    /// `PrunedContext.get_residual_diff_threshold`: the dynamic threshold reads the main branch's
    /// diffs of this step, whichever branch asks.
    fn threshold(&self) -> f64 {
        let base = self.config.residual_diff_threshold;
        if !self.config.enable_dynamic_prune_threshold {
            return base;
        }
        let step = self.current_step();
        let Some((_, diffs)) = self.residual_diffs[0].iter().find(|(s, _)| *s == step) else {
            return base;
        };
        let positive: Vec<f64> = diffs.iter().take(5).copied().filter(|d| *d > 0.0).collect();
        if step < 0 || positive.is_empty() {
            return base;
        }
        let mean = positive.iter().sum::<f64>() / positive.len() as f64;
        let relaxed = mean * self.config.dynamic_prune_threshold_relax_ratio;
        let cap = self
            .config
            .max_dynamic_prune_threshold
            .unwrap_or(2.0 * base);
        if relaxed < cap && relaxed > base {
            relaxed
        } else {
            base
        }
    }

    fn add_residual_diff(&mut self, diff: f64) {
        let step = self.current_step();
        let diffs = &mut self.residual_diffs[self.branch()];
        match diffs.iter_mut().find(|(s, _)| *s == step) {
            Some((_, list)) => list.push(diff),
            None => diffs.push((step, vec![diff])),
        }
    }

    fn add_pruned_step(&mut self) {
        let step = self.current_step();
        let b = self.branch();
        if !self.cached_steps[b].contains(&step) {
            self.continuous_cached_steps[b] += 1;
            self.cached_steps[b].push(step);
        }
    }

    fn downsampled(&self, t: Tensor<3>) -> Tensor<3> {
        if self.downsample > 1 {
            let step = self.downsample as isize;
            t.slice(s![.., .., ..;step])
        } else {
            t
        }
    }

    /// cache-dit's `can_prune` (its `can_cache`) on block `block`'s input; the diff measured.
    fn can_prune(&mut self, block: usize, input: &Tensor<3>) -> (bool, Option<f64>) {
        if self.is_warmup_step(self.current_step()) {
            return (false, None);
        }
        let step = self.current_step();
        if let Some(mask) = &self.config.steps_computation_mask {
            let full = usize::try_from(step)
                .ok()
                .and_then(|s| mask.get(s))
                .is_some_and(|m| *m == 1);
            if full {
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
        if self.cached_steps[b].last() == Some(&step) {
            continuous -= 1;
        }
        let max_continuous = self.config.max_continuous_cached_steps;
        if max_continuous >= 0 && continuous >= max_continuous {
            return (false, None);
        }
        let threshold = self.threshold();
        if threshold <= 0.0 {
            return (false, None);
        }
        let Some(prev) = self.buffers[b].get(&block).and_then(|x| x.input.clone()) else {
            return (false, None);
        };
        if threshold >= 1.0 {
            self.add_residual_diff(-1.0);
            return (true, None);
        }
        let cur = self.downsampled(input.clone());
        if prev.dims() != cur.dims() {
            self.add_residual_diff(-2.0);
            return (false, None);
        }
        let diff = relative_l1(&prev, &cur);
        self.add_residual_diff(diff);
        (diff < threshold, Some(diff))
    }

    /// cache-dit's `apply_prune`: the block's cached residual (or forecast) instead of the block.
    fn apply_prune(&mut self, block: usize, states: BlockStates) -> Result<BlockStates> {
        let b = self.branch();
        let (hidden_residual, encoder_residual) = (
            self.caches_residual(self.hidden_calibrated()),
            self.caches_residual(self.encoder_calibrated()),
        );
        let (hidden_key, encoder_key) = (format!("{block}_Bn"), format!("{block}_Bn_encoder"));
        let buffers = self.buffers[b].get(&block).cloned().unwrap_or_default();
        let (h, e) = &mut self.calibrators[b];
        let prev = match h {
            Some(c) => c.approximate(&hidden_key)?,
            None => buffers.output,
        }
        .ok_or_else(|| {
            DiffusionError::State(format!(
                "{}: block {block} was pruned before it ran",
                self.name
            ))
        })?;
        let hidden = if hidden_residual {
            prev + states.hidden
        } else {
            prev
        };
        let encoder = match states.encoder {
            Some(enc) => {
                let prev = match e {
                    Some(c) => c.approximate(&encoder_key)?,
                    None => buffers.encoder,
                };
                Some(match prev {
                    Some(p) if encoder_residual => p + enc,
                    Some(p) => p,
                    None => enc,
                })
            }
            None => None,
        };
        Ok(BlockStates { hidden, encoder })
    }

    /// Records what a computed, prunable block saw and produced.
    fn store(&mut self, block: usize, input: &BlockStates, output: &BlockStates) {
        let b = self.branch();
        let hidden_residual = self.caches_residual(self.hidden_calibrated());
        let value = if hidden_residual {
            output.hidden.clone() - input.hidden.clone()
        } else {
            output.hidden.clone()
        };
        // cache-dit stores the encoder residual under either cache type.
        let encoder = match (&output.encoder, &input.encoder) {
            (Some(out), Some(inp)) => Some(out.clone() - inp.clone()),
            _ => None,
        };
        let stored_input = self.downsampled(input.hidden.clone());
        let (h, e) = &mut self.calibrators[b];
        let entry = self.buffers[b].entry(block).or_default();
        entry.input = Some(stored_input);
        match h {
            Some(c) => c.update(value, &format!("{block}_Bn")),
            None => entry.output = Some(value),
        }
        if let Some(encoder) = encoder {
            match e {
                Some(c) => c.update(encoder, &format!("{block}_Bn_encoder")),
                None => entry.encoder = Some(encoder),
            }
        }
    }

    fn memory_bytes(&self) -> usize {
        let t = |x: &Option<Tensor<3>>| x.as_ref().map_or(0, cachet_tensor::tensor_bytes);
        let buffers: usize = self
            .buffers
            .iter()
            .flat_map(HashMap::values)
            .map(|b| t(&b.input) + t(&b.output) + t(&b.encoder))
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

#[derive(Debug)]
struct Unit {
    groups: Vec<(String, usize)>,
    total: usize,
    base_config: DBPruneConfig,
    calibrator: Option<CalibratorConfig>,
    context: Context,
    /// Blocks pruned so far in the current forward call.
    pruned_in_call: usize,
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
}

/// DBPrune attached to a model: one pruning context per unit.
#[derive(Debug)]
pub(crate) struct DbPrune {
    units: Vec<Unit>,
}

/// Merges a params modifier (partial config JSON) over a base config.
fn modified(base: &DBPruneConfig, modifier: Option<&serde_json::Value>) -> Result<DBPruneConfig> {
    let Some(modifier) = modifier else {
        return Ok(base.clone());
    };
    let config_error = |reason: String| DiffusionError::Config {
        what: "params_modifiers",
        reason,
    };
    let mut value = serde_json::to_value(base).map_err(|e| config_error(e.to_string()))?;
    let (Some(target), Some(overrides)) = (value.as_object_mut(), modifier.as_object()) else {
        return Err(config_error(
            "each modifier must be a JSON object of cache_config fields".into(),
        ));
    };
    for (k, v) in overrides {
        target.insert(k.clone(), v.clone());
    }
    serde_json::from_value(value).map_err(|e| config_error(e.to_string()))
}

impl DbPrune {
    pub(crate) fn attach(
        config: &DBPruneConfig,
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
                reason: "no block list to prune".into(),
            });
        }
        super::dbcache::check_patterns(adapter, &unit_lists, layout)?;
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
                context: Context::new(label, unit_config.clone(), calibrator.cloned(), total),
                base_config: unit_config,
                calibrator: calibrator.cloned(),
                pruned_in_call: 0,
            });
        }
        Ok(Self { units })
    }

    pub(crate) fn stats(&self) -> Vec<PruneStats> {
        self.units
            .iter()
            .map(|u| {
                let c = &u.context;
                PruneStats {
                    name: c.name.clone(),
                    pruned_steps: c.cached_steps[0].clone(),
                    residual_diffs: c.residual_diffs[0].clone(),
                    pruned_blocks: c.pruned_blocks[0].clone(),
                    actual_blocks: c.actual_blocks[0].clone(),
                    cfg_pruned_steps: c.cached_steps[1].clone(),
                    cfg_residual_diffs: c.residual_diffs[1].clone(),
                    cfg_pruned_blocks: c.pruned_blocks[1].clone(),
                    cfg_actual_blocks: c.actual_blocks[1].clone(),
                }
            })
            .collect()
    }
}

impl BlockMethod for DbPrune {
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
            // A block list no unit covers runs unpruned.
            let mut states = states;
            for i in 0..group.len {
                states = block(hooks, i, states)?;
            }
            return Ok(states);
        };
        let offset = unit.offset(group.name).unwrap_or(0);
        if offset == 0 {
            unit.pruned_in_call = 0;
            unit.context.mark_step_begin();
        }
        let context = &mut unit.context;
        let mut states = states;
        let (mut computed, mut pruned) = (0, 0);
        let mut diffs = Vec::new();
        for i in 0..group.len {
            let j = offset + i;
            let prunable = context.non_prune.binary_search(&j).is_err();
            let (prune, diff) = if prunable {
                context.can_prune(j, &states.hidden)
            } else {
                (false, None)
            };
            diffs.extend(diff);
            if prune {
                pruned += 1;
                context.add_pruned_step();
                states = context.apply_prune(j, states)?;
                continue;
            }
            let input = prunable.then(|| states.clone());
            states = block(hooks, i, states)?;
            computed += 1;
            if let Some(input) = input {
                context.store(j, &input, &states);
            }
        }
        unit.pruned_in_call += pruned;
        if offset + group.len == unit.total {
            let b = unit.context.branch();
            unit.context.pruned_blocks[b].push(unit.pruned_in_call);
            unit.context.actual_blocks[b].push(unit.total);
        }
        let diff = (!diffs.is_empty()).then(|| diffs.iter().sum::<f64>() / diffs.len() as f64);
        hooks.log.push(Decision {
            step: hooks.step.step,
            context: unit.context.name.clone(),
            target: group.name.to_string(),
            group: Some(group.index),
            action: if pruned > 0 {
                Action::Cached
            } else {
                Action::Computed
            },
            computed_blocks: computed,
            total_blocks: group.len,
            diff,
        });
        Ok(states)
    }

    fn reset(&mut self) {
        for unit in &mut self.units {
            unit.context = Context::new(
                unit.context.name.clone(),
                unit.base_config.clone(),
                unit.calibrator.clone(),
                unit.total,
            );
            unit.pruned_in_call = 0;
        }
    }

    fn memory_bytes(&self) -> usize {
        self.units.iter().map(|u| u.context.memory_bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_prune_ids_cover_fn_bn_and_the_list() {
        let config = DBPruneConfig {
            Fn_compute_blocks: 2,
            Bn_compute_blocks: 1,
            non_prune_block_ids: vec![5, -1, 40],
            ..DBPruneConfig::default()
        };
        let c = Context::new("u".into(), config, None, 8);
        assert_eq!(c.non_prune, vec![0, 1, 5, 7]);
    }

    #[test]
    fn options_are_checked() {
        assert!(DBPruneConfig::default().validate(8, "u").is_ok());
        for bad in [
            DBPruneConfig {
                Fn_compute_blocks: 0,
                ..DBPruneConfig::default()
            },
            DBPruneConfig {
                Bn_compute_blocks: 9,
                ..DBPruneConfig::default()
            },
            DBPruneConfig {
                enable_separate_cfg: Some(true),
                cfg_diff_compute_separate: false,
                ..DBPruneConfig::default()
            },
            DBPruneConfig {
                dynamic_prune_threshold_relax_ratio: f64::NAN,
                ..DBPruneConfig::default()
            },
            DBPruneConfig {
                cache_type: "DBCache".into(),
                ..DBPruneConfig::default()
            },
        ] {
            assert!(bad.validate(8, "u").is_err(), "{bad:?}");
        }
    }
}
