//! The linear-layer seam: every projection of the model is a [`LinearLayer`], either burn's
//! dense `Linear` or any other implementation of [`LinearOp`] (the quantized layers of
//! `cachet-quant`). [`LinearFactory`] lets a loader decide, per named layer, what to build.

use std::fmt::Debug;
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{DType, Device, Tensor, TensorData};
use cachet_tensor::kernels::DenseMatrix;
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{MemoryFootprint, TensorError, is_host_device};

use crate::error::{ModelError, Result};
use crate::norm::RmsNorm;

/// A linear map `[.., in] -> [.., out]` implemented outside burn's `Linear` (e.g. quantized).
pub trait LinearOp: Send + Sync + Debug {
    /// Applies the layer to `x` `[batch, seq, in_features]`. Fallible because a layer may read
    /// its weights on use (a disk-offloaded file damaged since load) or read values back from a
    /// device: the error reaches the caller of the model's forward, never a panic.
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>>;
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// Bytes the layer's weights take.
    fn memory_bytes(&self) -> usize;

    /// Whether [`LinearOp::forward_host`] runs: the layer computes in host memory, so a model
    /// on the host can chain several such layers without a tensor round trip between them.
    fn has_host_forward(&self) -> bool {
        false
    }

    /// `[rows, in]` f32 activations in host memory to `[rows, out]` f32 (values rounded as the
    /// layer's compute dtype rounds them); `Ok(None)` when the layer has no host path, an error
    /// when it has one that failed (as [`LinearOp::forward`]).
    fn forward_host(&self, x: &[f32], rows: usize) -> Result<Option<Vec<f32>>> {
        let _ = (x, rows);
        Ok(None)
    }
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

    /// The host path of a custom layer, if it has one (see [`LinearOp::forward_host`]).
    pub fn host_op(&self) -> Option<&Arc<dyn LinearOp>> {
        self.custom.as_ref().filter(|op| op.has_host_forward())
    }

    /// Applies the layer; a custom layer's error (see [`LinearOp::forward`]) is returned as is.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        match (&self.dense, &self.custom) {
            (_, Some(op)) => op.forward(x),
            (Some(linear), None) => Ok(linear.forward(x)),
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

impl LinearSpec {
    /// `{name}.weight` as `[out, in]`, checked against the spec.
    pub fn load_weight(
        &self,
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor<2>> {
        load_checked(
            checkpoint,
            &format!("{}.weight", self.name),
            [self.out_features, self.in_features],
            device,
            dtype,
        )
    }

    /// `{name}.bias` as `[out]` when the spec has one.
    pub fn load_bias(
        &self,
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<Option<Tensor<1>>> {
        if !self.bias {
            return Ok(None);
        }
        let name = format!("{}.bias", self.name);
        load_checked(checkpoint, &name, [self.out_features], device, dtype).map(Some)
    }
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
        let weight = spec.load_weight(checkpoint, device, dtype)?;
        let bias = spec
            .load_bias(checkpoint, device, dtype)?
            .map(Param::from_tensor);
        Ok(LinearLayer::dense(burn_linear(weight, bias)))
    }
}

/// burn's `Linear` from a Hugging Face `[out, in]` weight: transposed once, here, into the
/// contiguous `[in, out]` tensor burn multiplies by, so no matmul ever copies a transposed view.
/// Every dense burn layer of cachet is built this way (one layout, the same numbers).
pub fn burn_linear(weight: Tensor<2>, bias: Option<Param<Tensor<1>>>) -> Linear {
    Linear {
        weight: Param::from_tensor(contiguous(weight.transpose())),
        bias,
    }
}

/// A tensor with the same values laid out contiguously (one copy, at load time).
fn contiguous<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    let device = t.device();
    let dtype = t.dtype();
    Tensor::from_data(t.into_data(), (&device, dtype))
}

/// The factory for a decoder's hot path: on the host device every projection is a
/// [`HostDense`] (weights in host memory in the checkpoint's `[out, in]` layout, run by
/// cachet-tensor's multi-threaded gemv for decode and gemm for prefill); on any other device
/// a burn `Linear`, as [`DenseFactory`] builds it.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastDenseFactory;

impl LinearFactory for FastDenseFactory {
    fn build(
        &self,
        spec: &LinearSpec,
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<LinearLayer> {
        if !is_host_device(device) {
            return DenseFactory.build(spec, checkpoint, device, dtype);
        }
        let name = format!("{}.weight", spec.name);
        let weight = spec.load_weight(checkpoint, device, dtype)?;
        let bias = match spec.load_bias(checkpoint, device, DType::F32)? {
            Some(bias) => Some(read_f32(bias.into_data(), &spec.name)?),
            None => None,
        };
        let matrix = matrix_from_data(weight.into_data(), &name)?;
        Ok(LinearLayer::custom(Arc::new(HostDense::new(
            matrix, bias, dtype,
        )?)))
    }
}

fn read_f32(data: TensorData, what: &str) -> Result<Vec<f32>> {
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|err| ModelError::Input(format!("reading {what}: {err:?}")))
}

/// A host [`DenseMatrix`] from `[rows, cols]` tensor data in f32, bf16 or f16.
pub fn matrix_from_data(data: TensorData, what: &str) -> Result<DenseMatrix> {
    let [rows, cols] = data.shape()[..] else {
        return Err(ModelError::Input(format!(
            "{what}: expected a matrix, got shape {:?}",
            data.shape()
        )));
    };
    let bad = |err: String| ModelError::Input(format!("reading {what}: {err}"));
    let matrix = match data.dtype() {
        DType::BF16 => DenseMatrix::from_bf16(
            rows,
            cols,
            data.try_into_vec::<half::bf16>()
                .map_err(|e| bad(format!("{e:?}")))?,
        ),
        DType::F16 => DenseMatrix::from_f16(
            rows,
            cols,
            data.try_into_vec::<half::f16>()
                .map_err(|e| bad(format!("{e:?}")))?,
        ),
        _ => DenseMatrix::from_f32(rows, cols, read_f32(data, what)?),
    };
    matrix.map_err(|e| bad(e.to_string()))
}

/// A dense projection whose weight lives in host memory, `[out, in]` as the checkpoint stores
/// it: `y = x · Wᵀ + b` by cachet-tensor's kernels, accumulated in f32 and rounded to the
/// compute dtype, like burn's CPU matmul does for half precision.
#[derive(Debug)]
pub struct HostDense {
    weight: DenseMatrix,
    bias: Option<Vec<f32>>,
    dtype: DType,
}

impl HostDense {
    /// A layer from its weight, optional f32 bias (`[out]`) and compute dtype.
    pub fn new(weight: DenseMatrix, bias: Option<Vec<f32>>, dtype: DType) -> Result<Self> {
        if let Some(b) = &bias
            && b.len() != weight.rows()
        {
            return Err(ModelError::Input(format!(
                "bias has {} values for {} outputs",
                b.len(),
                weight.rows()
            )));
        }
        Ok(Self {
            weight,
            bias,
            dtype,
        })
    }

    /// The weight.
    pub fn weight(&self) -> &DenseMatrix {
        &self.weight
    }

    /// `[rows, in]` f32 activations to `[rows, out]`, rounded to the compute dtype.
    pub fn matmul_host(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = self.weight.matmul_t(x, rows);
        if let Some(bias) = &self.bias {
            for row in y.chunks_mut(bias.len()) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        round_slice(self.dtype, &mut y);
        y
    }

    /// Gathers rows `ids` of the weight (an embedding lookup sharing a tied head's matrix) into
    /// `[ids.len(), in]` f32 values; an id out of range is an error naming it.
    pub fn gather_rows(&self, ids: &[i64]) -> Result<Vec<f32>> {
        let (n, k) = (self.weight.rows(), self.weight.cols());
        let mut out = vec![0.0f32; ids.len() * k];
        for (row, &id) in out.chunks_mut(k.max(1)).zip(ids) {
            let r = usize::try_from(id).ok().filter(|&r| r < n).ok_or_else(|| {
                ModelError::Input(format!("token id {id} is outside the vocabulary (0..{n})"))
            })?;
            self.weight.row_into(r, row);
        }
        Ok(out)
    }
}

impl LinearOp for HostDense {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let device = x.device();
        let [b, s, k] = x.dims();
        let _span =
            tracing::trace_span!("host_dense", rows = b * s, k, n = self.weight.rows()).entered();
        let (data, rows) = tensor_to_host(x)?;
        let y = self.matmul_host(&data, rows);
        Ok(Tensor::from_data(
            TensorData::new(y, [b, s, self.weight.rows()]),
            (&device, self.dtype),
        ))
    }

    fn in_features(&self) -> usize {
        self.weight.cols()
    }

    fn out_features(&self) -> usize {
        self.weight.rows()
    }

    fn memory_bytes(&self) -> usize {
        self.weight.memory_bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    fn has_host_forward(&self) -> bool {
        true
    }

    fn forward_host(&self, x: &[f32], rows: usize) -> Result<Option<Vec<f32>>> {
        Ok(Some(self.matmul_host(x, rows)))
    }
}

/// Rounds f32 values to what `dtype` holds (identity for f32), as a tensor of that dtype would.
pub fn round_slice(dtype: DType, values: &mut [f32]) {
    match dtype {
        DType::BF16 => values
            .iter_mut()
            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        DType::F16 => values
            .iter_mut()
            .for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
        _ => {}
    }
}

/// Activations `[.., in]` to host f32 values and the row count; a failed read from the
/// activations' device is a typed error ([`TensorError::Transfer`]), not a panic.
pub fn tensor_to_host<const D: usize>(x: Tensor<D>) -> Result<(Vec<f32>, usize)> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    let transfer = |reason: String| TensorError::Transfer {
        what: "activations to host".into(),
        reason,
    };
    let data = x
        .try_into_data()
        .map_err(|e| transfer(e.to_string()))?
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| transfer(format!("{e:?}")))?;
    Ok((data, rows))
}

/// Loads a model's named tensors with shape checks and builds its projections through a
/// [`LinearFactory`]: what every model's `load_with` uses.
pub struct Loader<'a> {
    /// The checkpoint weights are read from.
    pub checkpoint: &'a Checkpoint,
    /// Where tensors are placed.
    pub device: &'a Device,
    /// The compute dtype of floating-point weights.
    pub dtype: DType,
    /// Builds every projection.
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

    /// The RMS norm `prefix` (`{prefix}.weight` `[dim]`).
    pub fn rms_norm(&self, prefix: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let weight = self.tensor::<1>(&format!("{prefix}.weight"), [dim])?;
        Ok(RmsNorm {
            weight: Param::from_tensor(weight),
            eps,
        })
    }
}

/// Loads `name` as a float tensor of `shape`, with typed errors for a missing name or wrong shape.
pub(crate) fn load_checked<const D: usize>(
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
