//! [`Linear4bit`]: bitsandbytes' NF4/FP4 layer, its host form and its device-resident form.

use std::borrow::Cow;
use std::fmt;

use burn::tensor::{Device, Tensor};
use cachet_tensor::Precision;
use half::{bf16, f16};

use super::two_form::{DeviceForm, Form, HostForm, TwoForm};
use crate::blockwise::Quantized4bit;
use crate::device::Resident4bit;
use crate::error::Result;
use crate::kernels::{gemv_4bit, matmul_4bit_tiled};

/// Rounds `v` to `p` and back to f32 (emulates computing in a half type).
fn round_to(p: Precision, v: f32) -> f32 {
    match p {
        Precision::F32 => v,
        Precision::F16 => f16::from_f32(v).to_f32(),
        Precision::BF16 => bf16::from_f32(v).to_f32(),
    }
}

/// The host form of a 4-bit (NF4/FP4) layer: bnb's packed bytes in host memory, run by the
/// host kernels ([`HostLinear4bit::forward_host`]). [`Linear4bit`] wraps it (or the
/// device-resident form).
#[derive(Clone)]
pub struct HostLinear4bit {
    /// The quantized `[out, in]` weight.
    pub weight: Quantized4bit,
    /// Optional bias (`[out]`, f32).
    pub bias: Option<Vec<f32>>,
    /// Compute dtype (`bnb_4bit_compute_dtype`).
    pub compute_dtype: Precision,
    /// dtype the weight had before quantization (the quant state's `dtype`).
    pub weight_dtype: Precision,
}

impl fmt::Debug for HostLinear4bit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostLinear4bit")
            .field("shape", &self.weight.shape)
            .field("quant_type", &self.weight.quant_type)
            .field("blocksize", &self.weight.blocksize)
            .field(
                "double_quant",
                &matches!(self.weight.absmax, crate::AbsMax::Nested(_)),
            )
            .field("bias", &self.bias.is_some())
            .field("compute_dtype", &self.compute_dtype)
            .finish()
    }
}

impl HostLinear4bit {
    /// Output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.weight.shape[0], self.weight.shape[1])
    }

    /// `y = x · Wᵀ + b` for row-major `x` `[rows, in]` on the host (f32 in, f32 out).
    pub fn forward_host(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (n, k) = self.dims();
        let _span = tracing::trace_span!("linear4bit", rows, n, k).entered();
        let code = self.weight.quant_type.code();
        let x: Cow<'_, [f32]> = if self.compute_dtype == Precision::F32 {
            Cow::Borrowed(x)
        } else {
            Cow::Owned(x.iter().map(|&v| round_to(self.compute_dtype, v)).collect())
        };
        let mut out = vec![0.0f32; rows * n];
        if rows == 1 {
            let (packed, blocksize) = (&self.weight.packed, self.weight.blocksize);
            gemv_4bit(packed, &self.weight.absmax, blocksize, code, &x, &mut out);
        } else {
            let absmax = self.weight.absmax.to_f32();
            matmul_4bit_tiled(&self.weight, &absmax, &x, rows, &mut out);
        }
        for row in out.chunks_mut(n) {
            if let Some(bias) = &self.bias {
                for (y, b) in row.iter_mut().zip(bias) {
                    *y += round_to(self.compute_dtype, *b);
                }
            }
            for y in row.iter_mut() {
                *y = round_to(self.compute_dtype, *y);
            }
        }
        out
    }
}

impl HostForm for HostLinear4bit {
    fn dims(&self) -> (usize, usize) {
        HostLinear4bit::dims(self)
    }

    fn forward_host(&self, x: &[f32], rows: usize) -> Vec<f32> {
        HostLinear4bit::forward_host(self, x, rows)
    }

    fn memory_bytes(&self) -> usize {
        self.weight.memory_bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

impl DeviceForm for Resident4bit {
    type Host = HostLinear4bit;

    fn upload(h: &HostLinear4bit, device: &Device, tile_bytes: usize) -> Result<Self> {
        Resident4bit::upload(
            &h.weight,
            h.bias.as_deref(),
            h.compute_dtype,
            h.weight_dtype,
            device,
            tile_bytes,
        )
    }

    fn download(&self) -> Result<HostLinear4bit> {
        let (weight, bias) = self.to_host()?;
        Ok(HostLinear4bit {
            weight,
            bias,
            compute_dtype: self.compute_dtype(),
            weight_dtype: self.weight_dtype(),
        })
    }

    fn shape(&self) -> [usize; 2] {
        Resident4bit::shape(self)
    }

    fn device(&self) -> Device {
        Resident4bit::device(self)
    }

    fn set_tile_bytes(&mut self, tile_bytes: usize) {
        Resident4bit::set_tile_bytes(self, tile_bytes);
    }

    fn forward<const N: usize>(&self, x: Tensor<N>) -> Result<Tensor<N>> {
        Ok(Resident4bit::forward(self, x))
    }

    fn memory_bytes(&self) -> usize {
        Resident4bit::memory_bytes(self)
    }
}

/// A 4-bit (NF4/FP4) linear layer, bitsandbytes `Linear4bit`: a burn module (embed it in any
/// `#[derive(Module)]` struct) and a `LinearOp` for cachet's models. Its weights live either
/// in host memory ([`HostLinear4bit`], run by the host kernels; the form for the host device)
/// or on the compute device, still packed ([`Resident4bit`], run with tensor ops there; the form
/// for a GPU). [`TwoForm::for_device`] picks by device, as the loaders do.
pub type Linear4bit = TwoForm<HostLinear4bit, Resident4bit>;

impl Linear4bit {
    /// A layer in host form from a quantized `[out, in]` weight and optional f32 bias.
    pub fn new(
        weight: Quantized4bit,
        bias: Option<Vec<f32>>,
        compute_dtype: Precision,
        weight_dtype: Precision,
    ) -> Self {
        HostLinear4bit {
            weight,
            bias,
            compute_dtype,
            weight_dtype,
        }
        .into()
    }

    /// Compute dtype (`bnb_4bit_compute_dtype`).
    pub fn compute_dtype(&self) -> Precision {
        match self.form() {
            Form::Host(h) => h.compute_dtype,
            Form::Resident(r) => r.compute_dtype(),
        }
    }

    /// dtype the weight had before quantization (the quant state's `dtype`).
    pub fn weight_dtype(&self) -> Precision {
        match self.form() {
            Form::Host(h) => h.weight_dtype,
            Form::Resident(r) => r.weight_dtype(),
        }
    }
}
