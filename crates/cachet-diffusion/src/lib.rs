//! Cache hooks for diffusion transformers: the inference accelerations of diffusers' cache
//! methods and cache-dit, on the burn DiTs of [`models`] (Flux and CogVideoX, equal to
//! diffusers', and the [`DitHooks`](models::DitHooks) seam they run their forward through).
//!
//! Attach a method to a model with [`CacheHooks::new`] and pass the hooks to the model's
//! forward; the loop tells them the step ([`CacheHooks::begin_step`]) and the cache context
//! ([`CacheHooks::cache_context`]). Every decision is logged ([`DecisionLog`]) for
//! [`summary()`](fn@crate::summary) and for the parity tests against the Python libraries.
//!
//! Methods: [`PyramidAttentionBroadcastConfig`], [`FasterCacheConfig`],
//! [`FirstBlockCacheConfig`], [`DBCacheConfig`] (+ [`TaylorSeerCalibratorConfig`]) and
//! [`TaylorSeerCacheConfig`].

mod error;
mod fft;
mod hooks;
mod log;
mod matching;
mod methods;
pub mod models;
mod pipeline;
mod steps_mask;
mod summary;

pub use error::{DiffusionError, Result};
pub use hooks::{CacheConfig, CacheHooks};
pub use log::{Action, Decision, DecisionLog, StepInfo};
pub use methods::GroupLayout;
pub use methods::dbcache::{BlockAdapter, DBCacheConfig, UnitStats};
pub use methods::faster_cache::{FasterCacheConfig, TensorFormat};
pub use methods::first_block::FirstBlockCacheConfig;
pub use methods::pab::PyramidAttentionBroadcastConfig;
pub use methods::taylorseer::{TaylorSeerCacheConfig, TaylorSeerCalibratorConfig};
pub use pipeline::{
    CogVideoXCond, Denoise, DenoiseOutput, FlowMatchEuler, FluxCond, Guidance, denoise,
    flux_image_ids,
};
pub use steps_mask::{steps_mask, steps_mask_from_bins};
pub use summary::{ContextSummary, DiffStats, Summary, latent_psnr, steps_mask_png, summary};
