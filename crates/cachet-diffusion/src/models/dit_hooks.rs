//! The seam through which the cache methods of this crate wrap a DiT.
//!
//! A model written against [`DitHooks`] hands three kinds of work to the hooks instead of running
//! it directly: its whole forward ([`DitHooks::run_denoiser`]), each list of transformer blocks
//! ([`DitHooks::run_blocks`]), and each named sub-module such as an attention layer
//! ([`DitHooks::run_module`]). [`NoHooks`] runs everything as written; a cache decides per step
//! whether to run the closure or return an approximation. This is what diffusers does with module
//! forward hooks and cache-dit with its patched block lists, without monkey-patching.

use std::fmt;
use std::ops::Range;

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use cachet_nn::Result;

/// What a transformer block takes and returns: cache-dit's `ForwardPattern` 0–5.
///
/// In Rust a block always returns [`BlockStates`]; the pattern tells a cache whether a block
/// reads and writes `encoder_hidden_states`, and the order the Python block returns them in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ForwardPattern {
    /// In `(hidden, encoder)`, out `(hidden, encoder)`.
    #[serde(rename = "Pattern_0")]
    Pattern0,
    /// In `(hidden, encoder)`, out `(encoder, hidden)` (Flux's double- and single-stream blocks).
    #[serde(rename = "Pattern_1")]
    Pattern1,
    /// In `(hidden, encoder)`, out `hidden` (encoder states pass through unchanged).
    #[serde(rename = "Pattern_2")]
    Pattern2,
    /// In `hidden`, out `hidden`.
    #[serde(rename = "Pattern_3")]
    Pattern3,
    /// In `hidden`, out `(hidden, encoder)`.
    #[serde(rename = "Pattern_4")]
    Pattern4,
    /// In `hidden`, out `(encoder, hidden)`.
    #[serde(rename = "Pattern_5")]
    Pattern5,
}

impl ForwardPattern {
    /// All patterns, in cache-dit's order.
    pub const ALL: [ForwardPattern; 6] = [
        Self::Pattern0,
        Self::Pattern1,
        Self::Pattern2,
        Self::Pattern3,
        Self::Pattern4,
        Self::Pattern5,
    ];

    /// cache-dit's `Return_H_First`.
    pub fn returns_hidden_first(self) -> bool {
        matches!(self, Self::Pattern0 | Self::Pattern4)
    }

    /// cache-dit's `Return_H_Only`: the block returns no encoder states.
    pub fn returns_hidden_only(self) -> bool {
        matches!(self, Self::Pattern2 | Self::Pattern3)
    }

    /// cache-dit's `Forward_H_only`: the block takes no encoder states.
    pub fn forwards_hidden_only(self) -> bool {
        matches!(self, Self::Pattern3 | Self::Pattern4 | Self::Pattern5)
    }

    /// Index 0–5.
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }
}

/// The states flowing through a block list: image/video tokens and (optionally) text tokens.
#[derive(Clone, Debug)]
pub struct BlockStates {
    /// `hidden_states`, `[batch, tokens, dim]`.
    pub hidden: Tensor<3>,
    /// `encoder_hidden_states`, `[batch, text_tokens, dim]`, for patterns that carry them.
    pub encoder: Option<Tensor<3>>,
}

/// A list of transformer blocks a model runs in sequence, such as Flux's `transformer_blocks`.
#[derive(Clone, Copy, Debug)]
pub struct BlockGroup<'a> {
    /// The list's name in the Python model (`transformer_blocks`, `single_transformer_blocks`).
    pub name: &'a str,
    /// Position of this list among the model's lists (0 for the first).
    pub index: usize,
    /// Number of blocks.
    pub len: usize,
    /// What each block takes and returns.
    pub pattern: ForwardPattern,
}

/// Where a hookable sub-module sits: `<group>.<block>.<leaf>`, e.g. `transformer_blocks.3.attn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModulePath<'a> {
    /// Block list name.
    pub group: &'a str,
    /// Block index inside the list.
    pub block: usize,
    /// Sub-module name inside the block (`attn`, `attn1`, `ff`...).
    pub leaf: &'a str,
}

impl fmt::Display for ModulePath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.group, self.block, self.leaf)
    }
}

/// The kind of a hookable sub-module, so a method can tell attention layers from the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// Self-attention over image/video tokens (joint attention in MMDiT blocks).
    SpatialAttention,
    /// Attention across frames.
    TemporalAttention,
    /// Attention from image tokens to text tokens.
    CrossAttention,
    /// A feed-forward network.
    FeedForward,
}

/// One hookable sub-module a model exposes: its diffusers name and kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookPoint {
    /// Full dotted name as in the diffusers model (`transformer_blocks.0.attn`).
    pub name: String,
    /// Kind of module.
    pub kind: ModuleKind,
}

/// The denoiser's output, whatever its rank (Flux returns packed `[B, tokens, C]`, CogVideoX
/// returns `[B, F, C, H, W]`).
#[derive(Clone, Debug)]
pub enum DenoiserOutput {
    /// Rank-3 output.
    Rank3(Tensor<3>),
    /// Rank-4 output (`BCHW`).
    Rank4(Tensor<4>),
    /// Rank-5 output (`BCFHW` or `BFCHW`).
    Rank5(Tensor<5>),
}

impl DenoiserOutput {
    /// Shape of the output.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Self::Rank3(t) => t.dims().to_vec(),
            Self::Rank4(t) => t.dims().to_vec(),
            Self::Rank5(t) => t.dims().to_vec(),
        }
    }

    /// Batch size (first dimension).
    pub fn batch(&self) -> usize {
        self.dims()[0]
    }
}

/// Runs one block: `(hooks, block index, states) -> states`. The hooks are handed back in so the
/// block can hook its sub-modules while the hooks drive the block loop.
pub type BlockFn<'a> = dyn FnMut(&mut dyn DitHooks, usize, BlockStates) -> Result<BlockStates> + 'a;
/// Runs one sub-module and returns its output tensors (attention returns one or two).
pub type ModuleFn<'a> = dyn FnMut() -> Result<Vec<Tensor<3>>> + 'a;
/// Runs the denoiser on the given batch rows of its inputs (`None`: all rows).
pub type DenoiserFn<'a> =
    dyn FnMut(&mut dyn DitHooks, Option<Range<usize>>) -> Result<DenoiserOutput> + 'a;

/// Lets default methods of [`DitHooks`] hand `self` to closures as `&mut dyn DitHooks`.
pub trait AsDynHooks {
    /// `self` as a trait object.
    fn as_dyn_hooks(&mut self) -> &mut dyn DitHooks;
}

impl<T: DitHooks> AsDynHooks for T {
    fn as_dyn_hooks(&mut self) -> &mut dyn DitHooks {
        self
    }
}

/// Hooks a DiT calls instead of running its denoiser, block lists and sub-modules directly.
pub trait DitHooks: AsDynHooks {
    /// Wraps the whole forward; `batch` is the input batch size. May run only some batch rows
    /// (FasterCache's unconditional-branch skip) and fill in the others.
    fn run_denoiser(&mut self, batch: usize, run: &mut DenoiserFn<'_>) -> Result<DenoiserOutput> {
        let _ = batch;
        run(self.as_dyn_hooks(), None)
    }

    /// Runs a block list from `states`; the default runs every block in order.
    fn run_blocks(
        &mut self,
        group: BlockGroup<'_>,
        states: BlockStates,
        block: &mut BlockFn<'_>,
    ) -> Result<BlockStates> {
        let mut states = states;
        for i in 0..group.len {
            states = block(self.as_dyn_hooks(), i, states)?;
        }
        Ok(states)
    }

    /// Whether [`run_module`](Self::run_module) wants to see this module; models skip the call
    /// (and the closure) when it does not.
    fn hooks_module(&self, path: ModulePath<'_>) -> bool {
        let _ = path;
        false
    }

    /// Wraps a sub-module's forward; `batch` is its input batch size.
    fn run_module(
        &mut self,
        path: ModulePath<'_>,
        batch: usize,
        run: &mut ModuleFn<'_>,
    ) -> Result<Vec<Tensor<3>>> {
        let _ = (path, batch);
        run()
    }
}

/// Runs every block and module as written: the uncached model.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl DitHooks for NoHooks {}

/// Calls `run` directly when `hooks` does not hook `path`, otherwise through the hooks.
pub fn hooked_module(
    hooks: &mut dyn DitHooks,
    path: ModulePath<'_>,
    batch: usize,
    mut run: impl FnMut() -> Result<Vec<Tensor<3>>>,
) -> Result<Vec<Tensor<3>>> {
    if hooks.hooks_module(path) {
        hooks.run_module(path, batch, &mut run)
    } else {
        run()
    }
}

/// A DiT whose forward goes through [`DitHooks`]; what `cachet-diffusion` needs to know of it.
pub trait HookableDit {
    /// Its block lists, in execution order, with their patterns.
    fn block_groups(&self) -> Vec<BlockGroup<'static>>;
    /// Every hookable sub-module with its diffusers name.
    fn hook_points(&self) -> Vec<HookPoint>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_cache_dit_table() {
        let table: Vec<(bool, bool, bool)> = ForwardPattern::ALL
            .iter()
            .map(|p| {
                (
                    p.returns_hidden_first(),
                    p.returns_hidden_only(),
                    p.forwards_hidden_only(),
                )
            })
            .collect();
        assert_eq!(
            table,
            vec![
                (true, false, false),
                (false, false, false),
                (false, true, false),
                (false, true, true),
                (true, false, true),
                (false, false, true),
            ]
        );
        let json = serde_json::to_string(&ForwardPattern::Pattern3).unwrap();
        assert_eq!(json, "\"Pattern_3\"");
    }

    #[test]
    fn default_hooks_run_every_block_in_order() {
        let device = burn::tensor::Device::default();
        let states = BlockStates {
            hidden: Tensor::zeros([1, 2, 3], &device),
            encoder: None,
        };
        let mut seen = Vec::new();
        let group = BlockGroup {
            name: "transformer_blocks",
            index: 0,
            len: 3,
            pattern: ForwardPattern::Pattern3,
        };
        let out = NoHooks
            .run_blocks(group, states, &mut |_, i, s| {
                seen.push(i);
                Ok(BlockStates {
                    hidden: s.hidden + 1.0,
                    encoder: s.encoder,
                })
            })
            .unwrap();
        assert_eq!(seen, vec![0, 1, 2]);
        let sum: f32 = out.hidden.sum().into_scalar();
        assert_eq!(sum, 18.0);
    }
}
