//! Diffusion transformers (DiTs) equal to diffusers' and the hook seam the cache methods plug
//! into.
//!
//! Each model runs its forward through [`DitHooks`], so the methods of this crate can skip or
//! approximate blocks and attention layers step by step without touching model code.

mod cogvideox;
mod dit_hooks;
pub mod embedded;
mod flux;

pub use cogvideox::{CogVideoX, CogVideoXConfig, CogVideoXInputs};
pub use dit_hooks::{
    AsDynHooks, BlockFn, BlockGroup, BlockStates, DenoiserFn, DenoiserOutput, DitHooks,
    ForwardPattern, HookPoint, HookableDit, ModuleFn, ModuleKind, ModulePath, NoHooks,
    hooked_module,
};
pub use flux::{FluxConfig, FluxInputs, FluxTransformer};

/// diffusers' weights in a model directory: the shard index when sharded, else
/// `diffusion_pytorch_model.safetensors`, else every safetensors file of the directory.
pub(crate) fn open_weights(
    dir: &std::path::Path,
) -> cachet_nn::Result<cachet_tensor::safetensors::Checkpoint> {
    let index = dir.join(flux::WEIGHTS_INDEX);
    let single = dir.join(flux::WEIGHTS_FILE);
    let path = if index.is_file() {
        index
    } else if single.is_file() {
        single
    } else {
        dir.to_path_buf()
    };
    Ok(cachet_tensor::safetensors::Checkpoint::open(path)?)
}
