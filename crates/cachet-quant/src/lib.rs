//! bitsandbytes-compatible quantization for cachet's burn models.
//!
//! * [`blockwise`] — 4-bit NF4/FP4 blockwise quantization with double quantization, and 8-bit
//!   blockwise quantization on the dynamic map, bit-exact with bitsandbytes 0.50.2.
//! * [`int8`] — LLM.int8: row-wise int8 weights (`CB`/`SCB`) and the outlier decomposition.
//! * [`codes`] — the NF4, FP4 and dynamic code tables.
//! * [`linear`] — `Linear4bit` / `Linear8bitLt`: burn modules, plugged into models as
//!   `LinearOp`s, with host-memory weights on the host device and packed device-resident ones
//!   on a GPU ([`device`]); one generic two-form layer ([`TwoForm`]) serves both formats.
//! * [`load`] — `load_and_quantize_model`, `load_pretrained` for any model implementing
//!   `cachet_nn::QuantizableModel`, which names its projections and modules (transformers'
//!   checkpoint layout, single or sharded), with [`config::BnbQuantizationConfig`],
//!   [`device_map`] and [`offload`] to `cpu` / `disk` (quantized layers stay quantized; dense
//!   projections are kept in host memory or memory-mapped from the offload folder).
//! * [`save`] — `QuantizedModel::save_pretrained[_with]`: streamed tensor by tensor, sharded
//!   as transformers does (`max_shard_size`, default "5GB"), written beside the target and
//!   swapped in whole, so a killed save leaves the old checkpoint or the new one.

mod atomic_dir;
pub mod blockwise;
pub mod codes;
pub mod config;
pub mod device;
pub mod device_map;
pub mod error;
mod factory;
pub mod int8;
mod kernels;
pub mod linear;
pub mod load;
pub mod offload;
pub mod save;
pub mod serialize;
pub mod simd;

pub use blockwise::{
    AbsMax, Blockwise8bit, NestedAbsMax, Quantized4bit, quantize_4bit, quantize_blockwise,
};
pub use codes::QuantType;
pub use config::BnbQuantizationConfig;
pub use device::{DEFAULT_TILE_BYTES, Resident4bit, Resident8bit, WeightResidence};
pub use device_map::{DeviceMap, Placement};
pub use error::{QuantError, Result};
pub use int8::{Int8Weight, int8_matmul};
pub use linear::{
    DeviceForm, Fp32Linear, HostForm, HostLinear4bit, HostLinear8bitLt, Linear4bit, Linear8bitLt,
    TwoForm,
};
pub use load::{
    LoadOptions, QuantizedLinear, QuantizedModel, QuantizingFactory, load_and_quantize_model,
    load_and_quantize_model_with, load_pretrained,
};
pub use save::{DEFAULT_MAX_SHARD_SIZE, SaveOptions, parse_shard_size, recover_interrupted_save};
