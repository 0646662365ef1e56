//! The shared tensor layer of cachet, on burn.
//!
//! Every other cachet crate goes through this one for the things burn leaves to the caller:
//! choosing a backend and device at run time ([`DeviceSpec`]), checked dtype conversion
//! ([`Precision`], [`cast_checked`]), counting the bytes that tensors hold ([`MemoryFootprint`]),
//! moving tensors between host memory and the compute device with overlap ([`HostTensor`],
//! [`Prefetch`]), reading and writing safetensors checkpoints ([`safetensors`]) and GGUF files
//! ([`gguf`]), and the host kernels of the hot path ([`kernels`]: dense projections, prompt
//! attention, SwiGLU). Library crates enable no burn backend; binaries pick one with the `flex`
//! or `wgpu` cargo features of this crate. Charts for reports live in the separate `cachet-plot`
//! crate, which needs no burn.

mod device;
mod dtype;
mod error;
pub mod gguf;
mod host_view;
pub mod kernels;
mod memory;
mod offload;
pub mod safetensors;

pub use burn::tensor::{DType, Device, Int, Tensor, TensorData};
pub use device::{DeviceSpec, available_backends, cpu_device, is_host_device};
pub use dtype::{Precision, cast_checked, ensure_supported, supports_dtype};
pub use error::TensorError;
pub use host_view::{HostStrided, read_host_f32};
pub use memory::{
    MemoryFootprint, device_bytes_in_use, host_memory_bytes, human_bytes, tensor_bytes,
    tune_host_allocator,
};
pub use offload::{HostTensor, Prefetch};
