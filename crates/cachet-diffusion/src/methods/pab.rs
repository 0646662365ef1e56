//! Pyramid Attention Broadcast (diffusers' `PyramidAttentionBroadcastConfig`): attention layers
//! reuse their last output for `N - 1` of every `N` calls inside a timestep range, with separate
//! ranges for spatial, temporal and cross attention.

use std::collections::HashMap;

use crate::models::{HookPoint, ModuleFn, ModuleKind};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{ModuleMethod, bytes_of, point_names};
use crate::error::{DiffusionError, Result, check_positive, check_range};
use crate::log::{Action, StepInfo};
use crate::matching::Identifiers;

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// diffusers' `_SPATIAL_TRANSFORMER_BLOCK_IDENTIFIERS` (0.42.1).
pub(crate) fn default_spatial_identifiers() -> Vec<String> {
    strings(&[
        "blocks",
        "transformer_blocks",
        "single_transformer_blocks",
        "layers",
        "visual_transformer_blocks",
    ])
}

/// diffusers' `_TEMPORAL_TRANSFORMER_BLOCK_IDENTIFIERS`.
pub(crate) fn default_temporal_identifiers() -> Vec<String> {
    strings(&["temporal_transformer_blocks"])
}

/// diffusers' `_CROSS_TRANSFORMER_BLOCK_IDENTIFIERS`.
pub(crate) fn default_cross_identifiers() -> Vec<String> {
    strings(&["blocks", "transformer_blocks", "layers"])
}

fn default_range() -> (f64, f64) {
    (100.0, 800.0)
}

/// Configuration with diffusers' field names and defaults. When no `*_block_skip_range` is set,
/// `spatial_attention_block_skip_range = 2` is used, as diffusers does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PyramidAttentionBroadcastConfig {
    /// Recompute spatial attention every `N` calls.
    pub spatial_attention_block_skip_range: Option<usize>,
    /// Recompute temporal attention every `N` calls.
    pub temporal_attention_block_skip_range: Option<usize>,
    /// Recompute cross attention every `N` calls.
    pub cross_attention_block_skip_range: Option<usize>,
    /// Timesteps `(lo, hi)`, exclusive, inside which spatial attention may be skipped.
    pub spatial_attention_timestep_skip_range: (f64, f64),
    /// Same for temporal attention.
    pub temporal_attention_timestep_skip_range: (f64, f64),
    /// Same for cross attention.
    pub cross_attention_timestep_skip_range: (f64, f64),
    /// Regexes (searched in module names) selecting spatial attention layers.
    pub spatial_attention_block_identifiers: Vec<String>,
    /// Regexes selecting temporal attention layers.
    pub temporal_attention_block_identifiers: Vec<String>,
    /// Regexes selecting cross-attention layers.
    pub cross_attention_block_identifiers: Vec<String>,
}

impl Default for PyramidAttentionBroadcastConfig {
    fn default() -> Self {
        Self {
            spatial_attention_block_skip_range: None,
            temporal_attention_block_skip_range: None,
            cross_attention_block_skip_range: None,
            spatial_attention_timestep_skip_range: default_range(),
            temporal_attention_timestep_skip_range: default_range(),
            cross_attention_timestep_skip_range: default_range(),
            spatial_attention_block_identifiers: default_spatial_identifiers(),
            temporal_attention_block_identifiers: default_temporal_identifiers(),
            cross_attention_block_identifiers: default_cross_identifiers(),
        }
    }
}

#[derive(Debug)]
struct ModuleState {
    block_skip_range: usize,
    timestep_skip_range: (f64, f64),
    iteration: usize,
    cache: Option<Vec<Tensor<3>>>,
}

/// PAB attached to a model.
#[derive(Debug)]
pub(crate) struct Pab {
    modules: HashMap<String, ModuleState>,
}

impl Pab {
    /// Resolves which attention layers PAB wraps, as `apply_pyramid_attention_broadcast` does.
    pub(crate) fn attach(
        config: &PyramidAttentionBroadcastConfig,
        points: &[HookPoint],
    ) -> Result<Self> {
        let mut config = config.clone();
        if config.spatial_attention_block_skip_range.is_none()
            && config.temporal_attention_block_skip_range.is_none()
            && config.cross_attention_block_skip_range.is_none()
        {
            tracing::warn!(
                "PAB: no *_block_skip_range set, using spatial_attention_block_skip_range=2"
            );
            config.spatial_attention_block_skip_range = Some(2);
        }
        let defaults = PyramidAttentionBroadcastConfig::default();
        let categories = [
            (
                "spatial_attention_block_identifiers",
                &config.spatial_attention_block_identifiers,
                &defaults.spatial_attention_block_identifiers,
                config.spatial_attention_block_skip_range,
                config.spatial_attention_timestep_skip_range,
                "spatial_attention_timestep_skip_range",
                false,
            ),
            (
                "temporal_attention_block_identifiers",
                &config.temporal_attention_block_identifiers,
                &defaults.temporal_attention_block_identifiers,
                config.temporal_attention_block_skip_range,
                config.temporal_attention_timestep_skip_range,
                "temporal_attention_timestep_skip_range",
                false,
            ),
            (
                "cross_attention_block_identifiers",
                &config.cross_attention_block_identifiers,
                &defaults.cross_attention_block_identifiers,
                config.cross_attention_block_skip_range,
                config.cross_attention_timestep_skip_range,
                "cross_attention_timestep_skip_range",
                true,
            ),
        ];
        let mut compiled = Vec::new();
        for (option, given, default_ids, skip, range, range_field, cross) in categories {
            check_range(range_field, range)?;
            let ids = Identifiers::search(option, given)?;
            if let Some(skip) = skip {
                check_positive(option, skip)?;
                let candidates: Vec<&HookPoint> = points
                    .iter()
                    .filter(|p| (p.kind == ModuleKind::CrossAttention) == cross)
                    .filter(|p| p.kind != ModuleKind::FeedForward)
                    .collect();
                let names = candidates.iter().map(|p| p.name.as_str());
                ids.require_matches(names, given != default_ids, "attention module")?;
            }
            compiled.push((ids, skip, range, cross));
        }
        let mut modules = HashMap::new();
        for point in points.iter().filter(|p| p.kind != ModuleKind::FeedForward) {
            let is_cross = point.kind == ModuleKind::CrossAttention;
            // Spatial, then temporal, then cross: the first category that matches wins.
            let chosen = compiled.iter().find(|(ids, skip, _, cross)| {
                skip.is_some() && *cross == is_cross && ids.matches(&point.name)
            });
            if let Some((_, Some(skip), range, _)) = chosen {
                modules.insert(
                    point.name.clone(),
                    ModuleState {
                        block_skip_range: *skip,
                        timestep_skip_range: *range,
                        iteration: 0,
                        cache: None,
                    },
                );
            }
        }
        if modules.is_empty() {
            return Err(DiffusionError::UnmatchedIdentifier {
                option: "PyramidAttentionBroadcastConfig",
                identifier: "*_attention_block_identifiers".into(),
                what: "attention module",
                available: point_names(points).collect::<Vec<_>>().join(", "),
            });
        }
        Ok(Self { modules })
    }
}

impl ModuleMethod for Pab {
    fn name(&self) -> &'static str {
        "pab"
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
        let timestep = current_timestep(step, "pab")?;
        let state = self
            .modules
            .get_mut(name)
            .ok_or_else(|| DiffusionError::State(format!("PAB does not hook {name}")))?;
        let (lo, hi) = state.timestep_skip_range;
        let within = lo < timestep && timestep < hi;
        let compute = state.cache.is_none()
            || state.iteration == 0
            || !within
            || state.iteration % state.block_skip_range == 0;
        let (output, action) = if compute {
            (run()?, Action::Computed)
        } else {
            (state.cache.clone().unwrap_or_default(), Action::Cached)
        };
        state.cache = Some(output.clone());
        state.iteration += 1;
        Ok((output, action))
    }

    fn reset(&mut self) {
        for state in self.modules.values_mut() {
            state.iteration = 0;
            state.cache = None;
        }
    }

    fn memory_bytes(&self) -> usize {
        self.modules
            .values()
            .filter_map(|s| s.cache.as_deref())
            .map(bytes_of)
            .sum()
    }
}

/// The loop's current timestep, required by timestep-ranged methods.
pub(crate) fn current_timestep(step: &StepInfo, method: &'static str) -> Result<f64> {
    step.timestep.ok_or_else(|| {
        DiffusionError::State(format!(
            "{method} needs the current timestep: call `hooks.begin_step(step, timestep)` before each model call"
        ))
    })
}
