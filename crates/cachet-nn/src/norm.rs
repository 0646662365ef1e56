//! Normalisation layers shared by the model crates.

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor};

/// Root-mean-square layer norm, computed in f32 as transformers does.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Per-channel scale.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl RmsNorm {
    /// `weight * x / sqrt(mean(x²) + eps)`, in f32, cast back to the input dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let variance = x.clone().square().mean_dim(D - 1);
        let normed = (x * variance.add_scalar(self.eps).sqrt().recip()).cast(dtype);
        let width = self.weight.dims()[0];
        let mut shape = [1; D];
        shape[D - 1] = width;
        normed * self.weight.val().reshape(shape)
    }
}
