//! The caching methods. Module-level ones (PAB, FasterCache's attention part, TaylorSeer) wrap
//! named attention layers; block-level ones (FirstBlockCache, MagCache, DBCache, DBPrune) drive
//! block lists; DBCache's and DBPrune's calibrators (TaylorSeer, FoCa, DMD) forecast residuals.

pub(crate) mod calibrator;
pub(crate) mod dbcache;
pub(crate) mod dbprune;
pub(crate) mod dmd;
mod dmd_fit;
pub(crate) mod faster_cache;
pub(crate) mod first_block;
pub(crate) mod foca;
pub(crate) mod magcache;
pub(crate) mod pab;
pub(crate) mod taylorseer;
pub(crate) mod textkv;

use crate::models::{BlockFn, BlockGroup, BlockStates, ForwardPattern, HookPoint, ModuleFn};
use burn::tensor::Tensor;

use crate::error::{DiffusionError, Result};
use crate::hooks::ModuleHooks;
use crate::log::{Action, StepInfo};

/// A method that wraps named sub-modules.
pub(crate) trait ModuleMethod: Send {
    /// Method name for messages and the log.
    fn name(&self) -> &'static str;
    /// Whether the module with this full name is hooked.
    fn hooks(&self, name: &str) -> bool;
    /// Runs or replaces the module's forward.
    fn run(
        &mut self,
        step: &StepInfo,
        name: &str,
        batch: usize,
        run: &mut ModuleFn<'_>,
    ) -> Result<(Vec<Tensor<3>>, Action)>;
    /// Forgets all state (new inference).
    fn reset(&mut self);
    /// Bytes of tensors the method holds.
    fn memory_bytes(&self) -> usize;
}

/// Names of the hook points, for matching.
pub(crate) fn point_names(points: &[HookPoint]) -> impl Iterator<Item = &str> + Clone {
    points.iter().map(|p| p.name.as_str())
}

/// Bytes held by a list of tensors.
pub(crate) fn bytes_of(tensors: &[Tensor<3>]) -> usize {
    tensors.iter().map(cachet_tensor::tensor_bytes).sum()
}

/// A method that drives block lists (decides per step which blocks run).
pub(crate) trait BlockMethod: Send {
    /// Runs (part of) a block list; `hooks` is handed to each block for its sub-modules.
    fn run_blocks(
        &mut self,
        hooks: &mut ModuleHooks,
        group: BlockGroup<'_>,
        states: BlockStates,
        block: &mut BlockFn<'_>,
    ) -> Result<BlockStates>;
    /// Forgets all state (new inference).
    fn reset(&mut self);
    /// Bytes of tensors the method holds.
    fn memory_bytes(&self) -> usize;
}

/// The model's block lists in execution order, with global block offsets.
#[derive(Clone, Debug)]
pub struct GroupLayout {
    groups: Vec<(String, usize, ForwardPattern)>,
}

impl GroupLayout {
    /// From the model's block groups.
    pub fn new(groups: &[BlockGroup<'_>]) -> Self {
        Self {
            groups: groups
                .iter()
                .map(|g| (g.name.to_string(), g.len, g.pattern))
                .collect(),
        }
    }

    /// Total blocks over all lists.
    pub fn total(&self) -> usize {
        self.groups.iter().map(|g| g.1).sum()
    }

    /// Names of the lists.
    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        self.groups.iter().map(|g| g.0.as_str())
    }

    /// Number of blocks and pattern of a list.
    pub fn get(&self, name: &str) -> Option<(usize, ForwardPattern)> {
        self.groups.iter().find(|g| g.0 == name).map(|g| (g.1, g.2))
    }

    /// Global index of the first block of `name`.
    pub(crate) fn offset(&self, name: &str) -> Result<usize> {
        let mut offset = 0;
        for (group, len, _) in &self.groups {
            if group == name {
                return Ok(offset);
            }
            offset += len;
        }
        Err(DiffusionError::State(format!(
            "the model ran block list {name:?}, which it did not declare"
        )))
    }
}

/// `mean|cur - prev| / mean|prev|` as a host number (one device sync).
pub(crate) fn relative_l1(prev: &Tensor<3>, cur: &Tensor<3>) -> f64 {
    let num = (cur.clone() - prev.clone()).abs().mean();
    let den = prev.clone().abs().mean();
    let ratio: f32 = (num / den).into_scalar();
    ratio as f64
}
