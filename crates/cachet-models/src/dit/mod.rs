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

/// diffusers' weights in a model directory: the shard index when sharded, else
/// `diffusion_pytorch_model.safetensors`, else every safetensors file of the directory.
pub(crate) fn open_weights(dir: &std::path::Path) -> crate::Result<cachet_tensor::Checkpoint> {
    let index = dir.join(flux::WEIGHTS_INDEX);
    let single = dir.join(flux::WEIGHTS_FILE);
    let path = if index.is_file() {
        index
    } else if single.is_file() {
        single
    } else {
        dir.to_path_buf()
    };
    Ok(cachet_tensor::Checkpoint::open(path)?)
}
