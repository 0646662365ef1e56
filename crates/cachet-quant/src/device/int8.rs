//! [`Resident8bit`]: an LLM.int8 layer's `CB`/`SCB` on the compute device, with the tiled
//! tensor-op forward (outlier decomposition included) and the read-back to host form.

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use cachet_tensor::Precision;

use super::{
    f32_tensor, int_tensor, pack_bytes, read_f32, read_i32, round_tensor, rows_per_tile,
    unpack_bytes, unpack_fields,
};
use crate::error::Result;
use crate::int8::Int8Weight;
use crate::serialize::{Part, int8_part, int8_parts};

/// `1 / 127²` as bnb's `int8_mm_dequant` writes it (the host kernel's constant).
const MM_DEQUANT_SCALE: f32 = 6.200124e-05;
/// `1 / 127` as bnb's `int8_vectorwise_dequant` writes it (the host kernel's constant).
#[allow(clippy::excessive_precision)]
const VECTORWISE_DEQUANT_SCALE: f32 = 7.874015718698502e-3;

/// What a device-resident LLM.int8 layer knows besides its tensors.
#[derive(Debug, Clone)]
struct Meta8bit {
    rows: usize,
    cols: usize,
    threshold: f32,
    tile_bytes: usize,
}

/// An LLM.int8 layer's weights on the compute device: `CB` packed 4 per i32, `SCB` and the
/// bias in f32, with the tensor-op forward (outlier decomposition included).
#[derive(Module)]
pub struct Resident8bit {
    /// `CB`, row-major `[out, in]`, 4 values per element.
    cb: Tensor<1, Int>,
    /// `SCB` `[out]`.
    scb: Tensor<1>,
    /// Bias `[out]`, f32.
    bias: Option<Tensor<1>>,
    #[module(skip)]
    meta: Meta8bit,
}

impl std::fmt::Debug for Resident8bit {
    /// Metadata only: formatting the tensors would read the weights back from the device.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resident8bit")
            .field("rows", &self.meta.rows)
            .field("cols", &self.meta.cols)
            .field("threshold", &self.meta.threshold)
            .field("bias", &self.bias.is_some())
            .field("device", &self.cb.device())
            .field("bytes", &self.memory_bytes())
            .finish()
    }
}

impl Resident8bit {
    /// Uploads `weight` (and `bias`) to `device`; `tile_bytes` bounds the forward's transients.
    pub(crate) fn upload(
        weight: &Int8Weight,
        bias: Option<&[f32]>,
        threshold: f32,
        device: &Device,
        tile_bytes: usize,
    ) -> Result<Self> {
        weight.validate("Linear8bitLt")?;
        // bnb quantizes activations from float16.
        cachet_tensor::ensure_supported(device, Precision::F16)?;
        let bytes: Vec<u8> = weight.cb.iter().map(|&v| v as u8).collect();
        Ok(Self {
            cb: int_tensor(pack_bytes(&bytes), device),
            scb: f32_tensor(&weight.scb, device),
            bias: bias.map(|b| f32_tensor(b, device)),
            meta: Meta8bit {
                rows: weight.rows,
                cols: weight.cols,
                threshold,
                tile_bytes,
            },
        })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.meta.rows, self.meta.cols]
    }

    /// Outlier threshold.
    pub fn threshold(&self) -> f32 {
        self.meta.threshold
    }

    /// Bound on the forward's transient memory per tile.
    pub fn tile_bytes(&self) -> usize {
        self.meta.tile_bytes
    }

    /// Sets the bound on the forward's transient memory per tile.
    pub fn set_tile_bytes(&mut self, tile_bytes: usize) {
        self.meta.tile_bytes = tile_bytes;
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.cb.device()
    }

    /// Bytes the weights take on the device.
    pub fn memory_bytes(&self) -> usize {
        use cachet_tensor::MemoryFootprint;
        self.cb.memory_bytes() + self.scb.memory_bytes() + self.bias.memory_bytes()
    }

    /// `CB` rows `r0..r1`, `[r1 - r0, in]` signed values as i32.
    fn cb_rows(&self, r0: usize, r1: usize) -> Tensor<2, Int> {
        let k = self.meta.cols;
        let (start, end) = (r0 * k, r1 * k);
        let w0 = start / 4;
        let u = unpack_fields(self.cb.clone().slice(w0..end.div_ceil(4)), 8)
            .slice(start - 4 * w0..start - 4 * w0 + (end - start));
        let signed = u.clone() - u.bitwise_right_shift_scalar(7).mul_scalar(256);
        signed.reshape([r1 - r0, k])
    }

    /// LLM.int8 `y = x · Wᵀ + b` for `x` `[.., in]`, as the host kernel: activations rounded
    /// to f16 and quantized row-wise (outliers, |x| ≥ threshold, left out of the row absmax and
    /// their columns zeroed), an int8 × int8 → i32 product dequantized by `SCA·SCB/127²`, the
    /// bias, and the outlier columns multiplied in f32 with the dequantized weight columns.
    /// The output has `x`'s dtype. The outlier columns are read back from the device (as bnb
    /// does): a failed read is a typed error naming it
    /// ([`TensorError::Transfer`](cachet_tensor::TensorError::Transfer)), never a panic.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Result<Tensor<D>> {
        let (n, k) = (self.meta.rows, self.meta.cols);
        let dims = x.dims();
        let dtype = x.dtype();
        let rows = dims[..D - 1].iter().product::<usize>();
        let _span = tracing::trace_span!("linear8bitlt_device", rows, n, k).entered();
        let thr = self.meta.threshold;
        let x = x.cast(DType::F32).reshape([rows, k]);
        let half = round_tensor(x.clone(), Precision::F16);
        let magnitude = half.clone().abs();
        let outlier = (thr > 0.0).then(|| magnitude.clone().greater_equal_elem(thr));
        // Outlier columns, read back (as bnb does) to gather them.
        let outlier_cols: Vec<i32> = match &outlier {
            Some(mask) => {
                let cols = mask.clone().any_dim(0).int().reshape([k]);
                read_i32(&cols, "Linear8bitLt outlier columns to host")?
                    .iter()
                    .enumerate()
                    .filter_map(|(c, &f)| (f != 0).then_some(c as i32))
                    .collect()
            }
            None => Vec::new(),
        };
        let row_max = match &outlier {
            Some(mask) => magnitude.mask_fill(mask.clone(), 0.0).max_dim(1),
            None => magnitude.max_dim(1),
        };
        // torch evaluates `127.0 / t` as `t.reciprocal() * 127.0`.
        let scale = row_max.clone().recip().mul_scalar(127.0);
        let mut q = (half * scale).round();
        q = q.clone().mask_fill(q.is_nan(), 0.0);
        if let Some(mask) = &outlier {
            q = q.mask_fill(mask.clone(), 0.0);
            if !outlier_cols.is_empty() {
                let cols = mask.clone().any_dim(0).expand([rows, k]);
                q = q.mask_fill(cols, 0.0);
            }
        }
        let ca = q.int();
        let sca = row_max.reshape([rows, 1]);
        let device = x.device();
        let idx = (!outlier_cols.is_empty()).then(|| int_tensor(outlier_cols.clone(), &device));
        let sub_a = idx.as_ref().map(|i| x.clone().select(1, i.clone()));
        let step = rows_per_tile(n, k, self.meta.tile_bytes);
        let mut tiles: Vec<Tensor<2>> = (0..n)
            .step_by(step)
            .map(|r0| {
                let r1 = (r0 + step).min(n);
                let cb = self.cb_rows(r0, r1);
                let acc = ca.clone().matmul(cb.clone().transpose()).float();
                let scb = self.scb.clone().slice(r0..r1).reshape([1, r1 - r0]);
                let mut y = acc * (sca.clone() * scb.clone()) * MM_DEQUANT_SCALE;
                if let Some(bias) = &self.bias {
                    y = y + bias.clone().slice(r0..r1).reshape([1, r1 - r0]);
                }
                if let (Some(i), Some(a)) = (&idx, &sub_a) {
                    let sub_b = cb.select(1, i.clone()).float()
                        * scb.reshape([r1 - r0, 1])
                        * VECTORWISE_DEQUANT_SCALE;
                    y = y + a.clone().matmul(sub_b.transpose());
                }
                y
            })
            .collect();
        let y = if tiles.len() == 1 {
            tiles.pop().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(tiles, 1)
        };
        let mut out_dims = dims;
        out_dims[D - 1] = n;
        Ok(y.reshape(out_dims).cast(dtype))
    }

    /// Reads `CB`/`SCB` (and the bias) back to host memory, bit-identical to what was uploaded.
    pub fn to_host(&self) -> Result<(Int8Weight, Option<Vec<f32>>)> {
        let what = "int8 weight to host";
        let cb = unpack_bytes(&read_i32(&self.cb, what)?, self.meta.rows * self.meta.cols)
            .into_iter()
            .map(|b| b as i8)
            .collect();
        let bias = self.bias.as_ref().map(|b| read_f32(b, what)).transpose()?;
        Ok((
            Int8Weight {
                cb,
                scb: read_f32(&self.scb, what)?,
                rows: self.meta.rows,
                cols: self.meta.cols,
            },
            bias,
        ))
    }

    fn skeleton(&self) -> Int8Weight {
        Int8Weight {
            cb: Vec::new(),
            scb: Vec::new(),
            rows: self.meta.rows,
            cols: self.meta.cols,
        }
    }

    /// Name, part, dtype and shape of each tensor the layer saves under `prefix`.
    pub fn parts(&self, prefix: &str) -> Vec<(String, Part, DType, Vec<usize>)> {
        int8_parts(prefix, &self.skeleton())
    }

    /// The data of one part listed by [`Resident8bit::parts`], read back from the device.
    pub fn part(&self, part: Part) -> Result<Option<TensorData>> {
        Ok(match part {
            Part::Cb => {
                let (w, _) = self.to_host()?;
                int8_part(&w, part)
            }
            Part::Scb => {
                let scb = read_f32(&self.scb, "SCB to host")?;
                let n = scb.len();
                Some(TensorData::new(scb, [n]))
            }
            other => int8_part(&self.skeleton(), other),
        })
    }
}
