//! The linear-layer seam: every projection of the model is a [`LinearLayer`], either burn's
//! dense `Linear` or any other implementation of [`LinearOp`] (the quantized layers of
//! `cachet-quant`). [`LinearFactory`] lets a loader decide, per named layer, what to build.

use std::fmt::Debug;
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{DType, Device, Tensor};
use cachet_tensor::{Checkpoint, MemoryFootprint};

use crate::error::{ModelError, Result};

/// A linear map `[.., in] -> [.., out]` implemented outside burn's `Linear` (e.g. quantized).
pub trait LinearOp: Send + Sync + Debug {
    /// Applies the layer to `x` `[batch, seq, in_features]`.
    fn forward(&self, x: Tensor<3>) -> Tensor<3>;
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// Bytes the layer's weights take.
    fn memory_bytes(&self) -> usize;
}

/// One projection of the model: dense, or a custom [`LinearOp`].
#[derive(Module, Debug)]
pub struct LinearLayer {
    dense: Option<Linear>,
    #[module(skip)]
    custom: Option<Arc<dyn LinearOp>>,
}

impl LinearLayer {
    /// A dense layer.
    pub fn dense(linear: Linear) -> Self {
        Self {
            dense: Some(linear),
            custom: None,
        }
    }

    /// A custom layer (quantized, offloaded...).
    pub fn custom(op: Arc<dyn LinearOp>) -> Self {
        Self {
            dense: None,
            custom: Some(op),
        }
    }

    /// The dense layer, if this is one.
    pub fn as_dense(&self) -> Option<&Linear> {
        self.dense.as_ref()
    }

    /// The custom layer, if this is one.
    pub fn as_custom(&self) -> Option<&Arc<dyn LinearOp>> {
        self.custom.as_ref()
    }

    /// Applies the layer.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match (&self.dense, &self.custom) {
            (_, Some(op)) => op.forward(x),
            (Some(linear), None) => linear.forward(x),
            (None, None) => unreachable!("a LinearLayer is built dense or custom"),
        }
    }
}

impl MemoryFootprint for LinearLayer {
    fn memory_bytes(&self) -> usize {
        match (&self.dense, &self.custom) {
            (_, Some(op)) => op.memory_bytes(),
            (Some(linear), None) => {
                linear.weight.val().memory_bytes()
                    + linear.bias.as_ref().map_or(0, |b| b.val().memory_bytes())
            }
            (None, None) => 0,
        }
    }
}

/// What a loader knows about a projection it is about to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// Module path in the checkpoint, e.g. `model.layers.0.self_attn.q_proj` (weight at `{name}.weight`).
    pub name: String,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
    /// Whether the layer has a bias (`{name}.bias`).
    pub bias: bool,
}

/// Builds the projections of a model while it loads.
pub trait LinearFactory {
    /// Builds the layer `spec` from `checkpoint` on `device`, computing in `dtype`.
    fn build(
        &self,
        spec: &LinearSpec,
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<LinearLayer>;
}

/// The default factory: dense burn `Linear` layers in the compute dtype.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseFactory;

impl LinearFactory for DenseFactory {
    fn build(
        &self,
        spec: &LinearSpec,
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<LinearLayer> {
        let weight = load_checked::<2>(
            checkpoint,
            &format!("{}.weight", spec.name),
            [spec.out_features, spec.in_features],
            device,
            dtype,
        )?;
        let bias = if spec.bias {
            let bias = load_checked::<1>(
                checkpoint,
                &format!("{}.bias", spec.name),
                [spec.out_features],
                device,
                dtype,
            )?;
            Some(Param::from_tensor(bias))
        } else {
            None
        };
        // Hugging Face stores [out, in]; burn's Linear multiplies by [in, out].
        Ok(LinearLayer::dense(Linear {
            weight: Param::from_tensor(weight.transpose()),
            bias,
        }))
    }
}

/// Loads a model's named tensors with shape checks and builds its projections through a
/// [`LinearFactory`]: what every model's `load_with` uses.
pub(crate) struct Loader<'a> {
    pub checkpoint: &'a Checkpoint,
    pub device: &'a Device,
    pub dtype: DType,
    pub factory: &'a dyn LinearFactory,
}

impl Loader<'_> {
    /// Tensor `name`, which must have `shape`.
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        load_checked(self.checkpoint, name, shape, self.device, self.dtype)
    }

    /// The projection `prefix` (`{prefix}.weight` `[d_out, d_in]`, optional `{prefix}.bias`).
    pub fn linear(
        &self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<LinearLayer> {
        let spec = LinearSpec {
            name: prefix.to_string(),
            in_features: d_in,
            out_features: d_out,
            bias,
        };
        self.factory
            .build(&spec, self.checkpoint, self.device, self.dtype)
    }
}

/// Loads `name` as a float tensor of `shape`, with typed errors for a missing name or wrong shape.
pub fn load_checked<const D: usize>(
    checkpoint: &Checkpoint,
    name: &str,
    shape: [usize; D],
    device: &Device,
    dtype: DType,
) -> Result<Tensor<D>> {
    let info = checkpoint
        .info(name)
        .ok_or_else(|| ModelError::MissingWeight {
            name: name.to_string(),
            module: name.rsplit_once('.').map_or(name, |(m, _)| m).to_string(),
        })?;
    if info.shape != shape {
        return Err(ModelError::WeightShape {
            name: name.to_string(),
            expected: shape.to_vec(),
            actual: info.shape.clone(),
        });
    }
    Ok(checkpoint.load_float::<D>(name, device, dtype)?)
}
