//! Diffusion transformers (DiTs) and the hook seam that diffusion caches plug into.
//!
//! Each model runs its forward through [`hooks::DitHooks`], so `cachet-diffusion` can skip or
//! approximate blocks and attention layers step by step without touching model code.

pub mod cogvideox;
pub mod flux;
pub mod hooks;

pub use cogvideox::{CogVideoX, CogVideoXConfig, CogVideoXInputs};
pub use flux::{FluxConfig, FluxInputs, FluxTransformer};
pub use hooks::{
    AsDynHooks, BlockFn, BlockGroup, BlockStates, DenoiserFn, DenoiserOutput, DitHooks,
    ForwardPattern, HookPoint, HookableDit, ModuleFn, ModuleKind, ModulePath, NoHooks,
    hooked_module,
};
