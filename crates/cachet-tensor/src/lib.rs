//! The shared tensor layer of cachet, on burn.
//!
//! Every other cachet crate goes through this one for the things burn leaves to the caller:
//! choosing a backend and device at run time ([`device`]), checked dtype conversion ([`dtype`]),
//! counting the bytes that tensors hold ([`memory`]), moving tensors between host memory and the
//! compute device with overlap ([`offload`]), and reading and writing safetensors checkpoints
//! ([`safetensors`]). Library crates enable no burn backend; binaries pick one with the `flex` or
//! `wgpu` cargo features of this crate.

pub mod device;
pub mod dtype;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod memory;
pub mod offload;
pub mod plot;
pub mod safetensors;

pub use burn::tensor::{Bool, DType, Device, Float, Int, Tensor, TensorData};
pub use device::{BackendInfo, DeviceSpec, available_backends};
pub use dtype::{Precision, cast_checked, ensure_supported, supports_dtype};
pub use error::{Result, TensorError};
pub use gguf::{GgmlType, GgufError, GgufFile};
pub use memory::{
    MemoryFootprint, device_bytes_in_use, host_memory_bytes, human_bytes, tensor_bytes,
    tune_host_allocator,
};
pub use offload::{HostTensor, Prefetch, TransferTiming};
pub use safetensors::{Checkpoint, SafetensorsError, TensorInfo};
