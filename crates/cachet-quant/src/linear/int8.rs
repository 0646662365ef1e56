//! [`Linear8bitLt`]: bitsandbytes' LLM.int8 layer, its host form and its device-resident form.

use std::fmt;

use burn::tensor::{Device, Tensor};

use super::two_form::{DeviceForm, Form, HostForm, TwoForm};
use crate::device::Resident8bit;
use crate::error::Result;
use crate::int8::{Int8Weight, int8_matmul};

/// The host form of an LLM.int8 layer: `CB`/`SCB` in host memory, run by the host kernel
/// ([`HostLinear8bitLt::forward_host`]). [`Linear8bitLt`] wraps it (or the device-resident form).
#[derive(Clone)]
pub struct HostLinear8bitLt {
    /// `CB` / `SCB`.
    pub weight: Int8Weight,
    /// Optional bias (`[out]`, f32).
    pub bias: Option<Vec<f32>>,
    /// Outlier threshold (`llm_int8_threshold`; 0 disables the decomposition).
    pub threshold: f32,
}

impl fmt::Debug for HostLinear8bitLt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostLinear8bitLt")
            .field("rows", &self.weight.rows)
            .field("cols", &self.weight.cols)
            .field("threshold", &self.threshold)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl HostLinear8bitLt {
    /// `y = x · Wᵀ + b` for row-major `x` `[rows, in]` on the host.
    pub fn forward_host(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let _span = tracing::trace_span!("linear8bitlt", rows, n = self.weight.rows).entered();
        int8_matmul(x, rows, &self.weight, self.bias.as_deref(), self.threshold)
    }
}

impl HostForm for HostLinear8bitLt {
    fn dims(&self) -> (usize, usize) {
        (self.weight.rows, self.weight.cols)
    }

    fn forward_host(&self, x: &[f32], rows: usize) -> Vec<f32> {
        HostLinear8bitLt::forward_host(self, x, rows)
    }

    fn memory_bytes(&self) -> usize {
        self.weight.memory_bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

impl DeviceForm for Resident8bit {
    type Host = HostLinear8bitLt;

    fn upload(h: &HostLinear8bitLt, device: &Device, tile_bytes: usize) -> Result<Self> {
        Resident8bit::upload(
            &h.weight,
            h.bias.as_deref(),
            h.threshold,
            device,
            tile_bytes,
        )
    }

    fn download(&self) -> Result<HostLinear8bitLt> {
        let (weight, bias) = self.to_host()?;
        Ok(HostLinear8bitLt {
            weight,
            bias,
            threshold: self.threshold(),
        })
    }

    fn shape(&self) -> [usize; 2] {
        Resident8bit::shape(self)
    }

    fn device(&self) -> Device {
        Resident8bit::device(self)
    }

    fn set_tile_bytes(&mut self, tile_bytes: usize) {
        Resident8bit::set_tile_bytes(self, tile_bytes);
    }

    fn forward<const N: usize>(&self, x: Tensor<N>) -> Result<Tensor<N>> {
        Resident8bit::forward(self, x)
    }

    fn memory_bytes(&self) -> usize {
        Resident8bit::memory_bytes(self)
    }
}

/// An LLM.int8 linear layer, bitsandbytes `Linear8bitLt` (inference, `has_fp16_weights=False`):
/// a burn module and a `LinearOp`, its weights in host memory ([`HostLinear8bitLt`], host
/// kernel) or on the compute device ([`Resident8bit`], tensor ops there); see
/// [`TwoForm::for_device`].
pub type Linear8bitLt = TwoForm<HostLinear8bitLt, Resident8bit>;

impl Linear8bitLt {
    /// A layer in host form from `CB`/`SCB`, an optional f32 bias and the outlier threshold.
    pub fn new(weight: Int8Weight, bias: Option<Vec<f32>>, threshold: f32) -> Self {
        HostLinear8bitLt {
            weight,
            bias,
            threshold,
        }
        .into()
    }

    /// Outlier threshold (`llm_int8_threshold`).
    pub fn threshold(&self) -> f32 {
        match self.form() {
            Form::Host(h) => h.threshold,
            Form::Resident(r) => r.threshold(),
        }
    }
}
