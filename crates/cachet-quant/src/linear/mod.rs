//! Quantized linear layers plugged into models through `cachet_nn::LinearOp`:
//! [`Linear4bit`] (NF4/FP4) and [`Linear8bitLt`] (LLM.int8).
//!
//! Both are burn modules holding their weights in one of two forms, chosen by the compute
//! device at load ([`TwoForm`], the plumbing written once for every format): on the host device
//! the **host form** ([`HostLinear4bit`], [`HostLinear8bitLt`]) keeps them quantized in host
//! memory and runs the host kernels (`kernels`, [`crate::int8`]); on a GPU the
//! **device-resident form** ([`crate::device`]) keeps them packed on the device and runs tensor
//! ops there. [`Fp32Linear`] wraps the `keep_in_fp32_modules` projections.

mod four_bit;
mod fp32;
mod int8;
mod two_form;

pub use four_bit::{HostLinear4bit, Linear4bit};
pub use fp32::Fp32Linear;
pub use int8::{HostLinear8bitLt, Linear8bitLt};
pub(crate) use two_form::via_host;
pub use two_form::{DeviceForm, HostForm, TwoForm};
