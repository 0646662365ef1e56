//! bitsandbytes-compatible quantization for cachet's burn models.
//!
//! * [`blockwise`] — 4-bit NF4/FP4 blockwise quantization with double quantization, and 8-bit
//!   blockwise quantization on the dynamic map, bit-exact with bitsandbytes 0.50.2.
//! * [`int8`] — LLM.int8: row-wise int8 weights (`CB`/`SCB`) and the outlier decomposition.
//! * [`codes`] — the NF4, FP4 and dynamic code tables.
//! * [`linear`] — `Linear4bit` / `Linear8bitLt`, plugged into models as `LinearOp`s.
//! * [`load`] — `load_and_quantize_model`, `load_pretrained`, `QuantizedModel::save_pretrained`
//!   (transformers' checkpoint layout, both ways), with [`config::BnbQuantizationConfig`],
//!   [`device_map`] and disk [`offload`] that keeps layers quantized.

pub mod blockwise;
pub mod codes;
pub mod config;
pub mod device_map;
pub mod error;
pub mod int8;
pub mod linear;
pub mod load;
pub mod offload;
pub mod serialize;

pub use blockwise::{
    AbsMax, Blockwise8bit, NestedAbsMax, Quantized4bit, quantize_4bit, quantize_blockwise,
};
pub use codes::QuantType;
pub use config::BnbQuantizationConfig;
pub use device_map::{DeviceMap, Placement};
pub use error::{QuantError, Result};
pub use int8::{Int8Weight, int8_matmul};
pub use linear::{Linear4bit, Linear8bitLt};
pub use load::{
    LoadOptions, QuantizedLinear, QuantizedModel, QuantizingFactory, load_and_quantize_model,
    load_pretrained,
};
