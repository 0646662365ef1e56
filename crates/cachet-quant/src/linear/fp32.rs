//! [`Fp32Linear`]: a `keep_in_fp32_modules` projection, computed in f32 whatever the model's dtype.

use std::fmt;

use burn::tensor::Tensor;
use cachet_nn::{LinearLayer, LinearOp};

/// A projection of `keep_in_fp32_modules`: its weight (and bias) are f32 whatever the model's
/// dtype, as transformers/accelerate keep them. The input is cast to f32, multiplied with the
/// f32 weight, and the output cast back to the activations' dtype. `inner` is the f32 layer:
/// dense on the compute device, or offloaded (`CpuDenseLinear`/`DiskDenseLinear` built in f32).
pub struct Fp32Linear {
    name: String,
    inner: LinearLayer,
    shape: [usize; 2],
}

impl fmt::Debug for Fp32Linear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fp32Linear")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("weight_dtype", &self.weight_dtype())
            .finish()
    }
}

impl Fp32Linear {
    /// Wraps `inner`, a layer built in f32, as module `name` with `[out, in]` `shape`.
    pub fn new(name: &str, inner: LinearLayer, shape: [usize; 2]) -> Self {
        Self {
            name: name.to_string(),
            inner,
            shape,
        }
    }

    /// Module name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The f32 layer (dense, or an offloaded one).
    pub fn inner(&self) -> &LinearLayer {
        &self.inner
    }

    /// dtype of the weight held in memory: `Some(F32)` for a layer on the compute device (read
    /// from the tensor itself), `None` when it is offloaded behind another op.
    pub fn weight_dtype(&self) -> Option<burn::tensor::DType> {
        self.inner.as_dense().map(|l| l.weight.val().dtype())
    }
}

impl LinearOp for Fp32Linear {
    fn forward(&self, x: Tensor<3>) -> cachet_nn::Result<Tensor<3>> {
        let _span = tracing::trace_span!("fp32_linear", name = self.name.as_str()).entered();
        let dtype = x.dtype();
        let y = self.inner.forward(x.cast(burn::tensor::DType::F32))?;
        Ok(y.cast(dtype))
    }

    fn in_features(&self) -> usize {
        self.shape[1]
    }

    fn out_features(&self) -> usize {
        self.shape[0]
    }

    fn memory_bytes(&self) -> usize {
        cachet_tensor::MemoryFootprint::memory_bytes(&self.inner)
    }
}
