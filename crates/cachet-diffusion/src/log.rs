//! What the loop tells the hooks about each call, and the record of every decision they made.
//!
//! The decision log is what `summary()`, the steps-mask plot and the parity tests against
//! diffusers and cache-dit read: one entry per hooked block list or module per model call.

use serde::{Deserialize, Serialize};

/// The current denoising step as the loop reports it (diffusers' `current_timestep_callback`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepInfo {
    /// Index of the step in the loop (0-based).
    pub step: usize,
    /// The scheduler's timestep for this step (0–1000 scale), if the loop set one.
    pub timestep: Option<f64>,
    /// The active cache context (`cond`, `uncond`...), if any.
    pub context: Option<String>,
}

/// What a hook did with one block list or module on one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Ran as written.
    Computed,
    /// Returned a cached output unchanged (PAB) or a cached residual (FBCache/DBCache).
    Cached,
    /// Returned an extrapolation (FasterCache attention, TaylorSeer).
    Approximated,
    /// Ran only the conditional half of the batch and approximated the rest (FasterCache).
    UncondSkipped,
}

/// One decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Loop step.
    pub step: usize,
    /// Cache context (or the method's own context name, e.g. cache-dit's per-block-list one).
    pub context: String,
    /// What was decided on: a block-list name, a module name or `denoiser`.
    pub target: String,
    /// Block-list group index for block decisions (for the steps-mask plot), else `None`.
    pub group: Option<usize>,
    /// What happened.
    pub action: Action,
    /// Blocks actually run (block decisions) out of `total_blocks`.
    pub computed_blocks: usize,
    /// Blocks in the list (block decisions), 1 for modules.
    pub total_blocks: usize,
    /// The residual difference measured, when the method measured one.
    pub diff: Option<f64>,
}

/// Every decision of one inference (cleared by `CacheHooks::reset`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DecisionLog {
    /// Decisions in call order.
    pub decisions: Vec<Decision>,
}

impl DecisionLog {
    /// Appends a decision.
    pub fn push(&mut self, decision: Decision) {
        self.decisions.push(decision);
    }

    /// Decisions about one target (module name, block list, `denoiser`).
    pub fn for_target<'a>(&'a self, target: &'a str) -> impl Iterator<Item = &'a Decision> + 'a {
        self.decisions.iter().filter(move |d| d.target == target)
    }

    /// Clears the log.
    pub fn clear(&mut self) {
        self.decisions.clear();
    }
}
