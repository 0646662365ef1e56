//! FirstBlockCache (diffusers' `FirstBlockCacheConfig`): the first block always runs; when its
//! residual changed by less than `threshold` (relative mean absolute difference) since the last
//! full step, every other block is skipped and the residuals the tail added last time are reused.
//! State is kept per cache context (cond and uncond apart), as diffusers' `StateManager` does.

use std::collections::HashMap;

use crate::models::{BlockFn, BlockGroup, BlockStates};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{BlockMethod, GroupLayout, relative_l1};
use crate::error::{DiffusionError, Result, check_non_negative};
use crate::hooks::ModuleHooks;
use crate::log::{Action, Decision};

/// Configuration with diffusers' field names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirstBlockCacheConfig {
    /// Skip the remaining blocks when the first block's residual moved less than this.
    pub threshold: f64,
}

impl Default for FirstBlockCacheConfig {
    fn default() -> Self {
        Self { threshold: 0.05 }
    }
}

#[derive(Debug, Default)]
struct SharedState {
    head_output: Option<BlockStates>,
    head_residual: Option<Tensor<3>>,
    tail_residuals: Option<(Tensor<3>, Option<Tensor<3>>)>,
    should_compute: bool,
    diff: Option<f64>,
}

/// FirstBlockCache attached to a model.
#[derive(Debug)]
pub(crate) struct FirstBlockCache {
    threshold: f64,
    layout: GroupLayout,
    states: HashMap<String, SharedState>,
}

impl FirstBlockCache {
    pub(crate) fn attach(config: &FirstBlockCacheConfig, layout: GroupLayout) -> Result<Self> {
        check_non_negative("threshold", config.threshold)?;
        if layout.total() < 2 {
            return Err(DiffusionError::InvalidOption {
                field: "FirstBlockCache",
                reason: format!(
                    "needs at least two blocks, the model has {}",
                    layout.total()
                ),
            });
        }
        Ok(Self {
            threshold: config.threshold,
            layout,
            states: HashMap::new(),
        })
    }
}

fn add_opt(a: Option<Tensor<3>>, b: Option<&Tensor<3>>) -> Option<Tensor<3>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b.clone()),
        (a, _) => a,
    }
}

impl BlockMethod for FirstBlockCache {
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
            .ok_or(DiffusionError::NoContext {
                method: "FirstBlockCache",
            })?;
        let offset = self.layout.offset(group.name)?;
        let total = self.layout.total();
        let threshold = self.threshold;
        let shared = self.states.entry(context.clone()).or_default();
        let mut states = states;
        let mut computed = 0;
        for i in 0..group.len {
            let global = offset + i;
            if global == 0 {
                let input_hidden = states.hidden.clone();
                let output = block(hooks, i, states)?;
                computed += 1;
                let residual = output.hidden.clone() - input_hidden;
                let (should_compute, diff) = match &shared.head_residual {
                    None => (true, None),
                    Some(prev) => {
                        let diff = relative_l1(prev, &residual);
                        (diff > threshold, Some(diff))
                    }
                };
                shared.should_compute = should_compute;
                shared.diff = diff;
                states = if should_compute {
                    shared.head_output = Some(output.clone());
                    shared.head_residual = Some(residual);
                    output
                } else {
                    let (hidden_res, encoder_res) =
                        shared.tail_residuals.as_ref().ok_or_else(|| {
                            DiffusionError::State(
                                "FirstBlockCache: no tail residual cached yet".into(),
                            )
                        })?;
                    BlockStates {
                        hidden: output.hidden + hidden_res.clone(),
                        encoder: add_opt(output.encoder, encoder_res.as_ref()),
                    }
                };
                continue;
            }
            if !shared.should_compute {
                continue;
            }
            states = block(hooks, i, states)?;
            computed += 1;
            if global == total - 1 {
                let head = shared.head_output.as_ref().ok_or_else(|| {
                    DiffusionError::State("FirstBlockCache: head block output missing".into())
                })?;
                let hidden_res = states.hidden.clone() - head.hidden.clone();
                let encoder_res = match (&states.encoder, &head.encoder) {
                    (Some(out), Some(head)) => Some(out.clone() - head.clone()),
                    _ => None,
                };
                shared.tail_residuals = Some((hidden_res, encoder_res));
            }
        }
        let action = if shared.should_compute {
            Action::Computed
        } else {
            Action::Cached
        };
        hooks.log.push(Decision {
            step: hooks.step.step,
            context,
            target: group.name.to_string(),
            group: Some(group.index),
            action,
            computed_blocks: computed,
            total_blocks: group.len,
            diff: if offset == 0 { shared.diff } else { None },
        });
        Ok(states)
    }

    fn reset(&mut self) {
        self.states.clear();
    }

    fn memory_bytes(&self) -> usize {
        let t = |x: &Tensor<3>| cachet_tensor::tensor_bytes(x);
        self.states
            .values()
            .map(|s| {
                s.head_output
                    .as_ref()
                    .map_or(0, |h| t(&h.hidden) + h.encoder.as_ref().map_or(0, t))
                    + s.head_residual.as_ref().map_or(0, t)
                    + s.tail_residuals
                        .as_ref()
                        .map_or(0, |(h, e)| t(h) + e.as_ref().map_or(0, t))
            })
            .sum()
    }
}
