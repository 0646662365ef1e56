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
//! [`FirstBlockCacheConfig`], [`MagCacheConfig`], [`DBCacheConfig`] and [`DBPruneConfig`] (each
//! with a [`CalibratorConfig`]: [`TaylorSeerCalibratorConfig`], [`FoCaCalibratorConfig`] or
//! [`DMDCalibratorConfig`]), [`TaylorSeerCacheConfig`], and [`TextKVCacheConfig`] (refused on
//! these DiTs, where it would not be lossless).
//!
//! What a cached run is judged by: [`models::embedded::digits_flux`], a [`DigitsFlux`] (a Flux
//! trained on handwritten digits, drawing the label asked for), its [`ImageClassifier`], and
//! [`psnr`] and [`ssim`] of the decoded images against the uncached run's.

mod classifier;
mod digits;
mod error;
mod fft;
mod hooks;
mod label;
mod log;
mod matching;
mod methods;
pub mod models;
mod pipeline;
mod quality;
mod steps_mask;
mod summary;

pub use classifier::ImageClassifier;
pub use digits::{DigitsFlux, DigitsSpec};
pub use error::{DiffusionError, Result};
pub use hooks::{CacheConfig, CacheHooks};
pub use label::LabelEmbedding;
pub use log::{Action, Decision, DecisionLog, StepInfo};
pub use methods::GroupLayout;
pub use methods::calibrator::CalibratorConfig;
pub use methods::dbcache::{BlockAdapter, DBCacheConfig, UnitStats};
pub use methods::dbprune::{DBPruneConfig, PruneStats};
pub use methods::dmd::DMDCalibratorConfig;
pub use methods::faster_cache::{FasterCacheConfig, TensorFormat};
pub use methods::first_block::FirstBlockCacheConfig;
pub use methods::foca::FoCaCalibratorConfig;
pub use methods::magcache::{
    FLUX_MAG_RATIOS, MagCacheCalibration, MagCacheConfig, calibrate_mag_ratios,
};
pub use methods::pab::PyramidAttentionBroadcastConfig;
pub use methods::taylorseer::{TaylorSeerCacheConfig, TaylorSeerCalibratorConfig};
pub use methods::textkv::TextKVCacheConfig;
pub use pipeline::{
    CogVideoXCond, Denoise, DenoiseOutput, FlowMatchEuler, FluxCond, Guidance, denoise,
    flux_image_ids,
};
pub use quality::{GrayImage, psnr, ssim};
pub use steps_mask::{steps_mask, steps_mask_from_bins};
pub use summary::{ContextSummary, DiffStats, Summary, latent_psnr, steps_mask_png, summary};
