//! CogVideoX video DiT, equal to diffusers 0.42's `CogVideoXTransformer3DModel`.
//!
//! Text and video tokens attend jointly in every block; the forward runs through
//! [`DitHooks`](crate::models::DitHooks) (one `transformer_blocks` list, `Pattern_0`, hookable
//! `transformer_blocks.{i}.attn1`) so diffusers' PAB and FasterCache map onto it one to one.
//! Supports CogVideoX 1.0 (sin-cos table or rotary + learned table) and 1.5 (`patch_size_t`,
//! sliced rotary grid, `ofs` embedding).

mod config;
mod embeddings;
mod model;

pub use config::CogVideoXConfig;
pub use model::{CogVideoX, CogVideoXInputs};
