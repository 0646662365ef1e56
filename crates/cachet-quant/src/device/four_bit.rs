//! [`Resident4bit`]: a 4-bit (NF4/FP4) layer's packed weights on the compute device, with the
//! tiled tensor-op forward and the read-back to host form and checkpoint parts.

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use cachet_tensor::Precision;

use super::{
    expand_groups, f32_tensor, int_tensor, pack_bytes, pack_nibbles, read_f32, read_i32,
    round_tensor, rows_per_tile, unpack_bytes, unpack_fields, unpack_nibbles,
};
use crate::blockwise::{AbsMax, NestedAbsMax, Quantized4bit};
use crate::codes::QuantType;
use crate::error::{QuantError, Result};
use crate::serialize::{Part, quant_state_json};

/// What a device-resident 4-bit layer knows besides its tensors.
#[derive(Debug, Clone)]
struct Meta4bit {
    shape: [usize; 2],
    blocksize: usize,
    quant_type: QuantType,
    blocks: usize,
    packed_len: usize,
    /// Double quant: nested block size and offset.
    nested: Option<(usize, f32)>,
    compute_dtype: Precision,
    weight_dtype: Precision,
    tile_bytes: usize,
}

/// A 4-bit (NF4/FP4) layer's weights on the compute device (see the module docs for the
/// layout), with its tensor-op forward.
#[derive(Module)]
pub struct Resident4bit {
    /// Codes, 8 per element.
    packed: Tensor<1, Int>,
    /// f32 absmax per block, without double quant.
    absmax: Option<Tensor<1>>,
    /// Double quant: 8-bit codes of `absmax - offset`, 4 per element.
    nested_codes: Option<Tensor<1, Int>>,
    /// Double quant: f32 absmax per nested block.
    nested_absmax: Option<Tensor<1>>,
    /// Double quant: the 256-entry dynamic code.
    nested_code: Option<Tensor<1>>,
    /// The 16-entry NF4/FP4 code.
    code: Tensor<1>,
    /// Bias `[out]`, f32.
    bias: Option<Tensor<1>>,
    #[module(skip)]
    meta: Meta4bit,
}

impl std::fmt::Debug for Resident4bit {
    /// Metadata only: formatting the tensors would read the weights back from the device.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resident4bit")
            .field("shape", &self.meta.shape)
            .field("quant_type", &self.meta.quant_type)
            .field("blocksize", &self.meta.blocksize)
            .field("double_quant", &self.meta.nested.is_some())
            .field("bias", &self.bias.is_some())
            .field("compute_dtype", &self.meta.compute_dtype)
            .field("device", &self.packed.device())
            .field("bytes", &self.memory_bytes())
            .finish()
    }
}

impl Resident4bit {
    /// Uploads `weight` (and `bias`) to `device`; `tile_bytes` bounds the forward's transients.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn upload(
        weight: &Quantized4bit,
        bias: Option<&[f32]>,
        compute_dtype: Precision,
        weight_dtype: Precision,
        device: &Device,
        tile_bytes: usize,
    ) -> Result<Self> {
        let shape = match weight.shape.as_slice() {
            &[n, k] => [n, k],
            other => {
                return Err(QuantError::InconsistentState {
                    tensor: "Linear4bit".into(),
                    reason: format!("a linear weight is 2-D, this one has shape {other:?}"),
                });
            }
        };
        check_compute_dtype(device, compute_dtype)?;
        let (absmax, nested_codes, nested_absmax, nested_code, nested) = match &weight.absmax {
            AbsMax::Plain(a) => (Some(f32_tensor(a, device)), None, None, None, None),
            AbsMax::Nested(n) => (
                None,
                Some(int_tensor(pack_bytes(&n.quantized), device)),
                Some(f32_tensor(&n.absmax, device)),
                Some(f32_tensor(&n.code, device)),
                Some((n.blocksize, n.offset)),
            ),
        };
        Ok(Self {
            packed: int_tensor(pack_nibbles(&weight.packed), device),
            absmax,
            nested_codes,
            nested_absmax,
            nested_code,
            code: f32_tensor(weight.quant_type.code(), device),
            bias: bias.map(|b| f32_tensor(b, device)),
            meta: Meta4bit {
                shape,
                blocksize: weight.blocksize,
                quant_type: weight.quant_type,
                blocks: weight.absmax.len(),
                packed_len: weight.packed.len(),
                nested,
                compute_dtype,
                weight_dtype,
                tile_bytes,
            },
        })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        self.meta.shape
    }

    /// Compute dtype.
    pub fn compute_dtype(&self) -> Precision {
        self.meta.compute_dtype
    }

    /// dtype of the weight before quantization.
    pub fn weight_dtype(&self) -> Precision {
        self.meta.weight_dtype
    }

    /// Bound on the forward's transient memory per tile.
    pub fn tile_bytes(&self) -> usize {
        self.meta.tile_bytes
    }

    /// Sets the bound on the forward's transient memory per tile.
    pub fn set_tile_bytes(&mut self, tile_bytes: usize) {
        self.meta.tile_bytes = tile_bytes;
    }

    /// Whether the absmax is double-quantized.
    pub fn double_quant(&self) -> bool {
        self.meta.nested.is_some()
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.packed.device()
    }

    /// Bytes the weights take on the device (codes, scales, code tables, bias).
    pub fn memory_bytes(&self) -> usize {
        use cachet_tensor::MemoryFootprint;
        self.packed.memory_bytes()
            + self.absmax.memory_bytes()
            + self.nested_codes.memory_bytes()
            + self.nested_absmax.memory_bytes()
            + self.nested_code.memory_bytes()
            + self.code.memory_bytes()
            + self.bias.memory_bytes()
    }

    /// The f32 absmax of blocks `b0..b1` (double-dequantized here when nested, as the host
    /// does: `code[q] · nested_absmax + offset`).
    fn absmax_blocks(&self, b0: usize, b1: usize) -> Tensor<1> {
        let nested = (
            &self.nested_codes,
            &self.nested_absmax,
            &self.nested_code,
            self.meta.nested,
        );
        match (&self.absmax, nested) {
            (Some(a), _) => a.clone().slice(b0..b1),
            (None, (Some(codes), Some(scales), Some(code), Some((nbs, offset)))) => {
                let q = unpack_fields(codes.clone().slice(b0 / 4..b1.div_ceil(4)), 8)
                    .slice(b0 % 4..b0 % 4 + (b1 - b0));
                let values = code.clone().select(0, q);
                let n0 = b0 / nbs;
                let scales = expand_groups(
                    scales.clone().slice(n0..b1.div_ceil(nbs)),
                    n0,
                    nbs,
                    b0,
                    b1 - b0,
                );
                (values * scales).add_scalar(offset)
            }
            _ => unreachable!("a Resident4bit holds plain or nested absmax"),
        }
    }

    /// Dequantized rows `r0..r1` of the weight, `[r1 - r0, in]` f32.
    pub fn dequantize_rows(&self, r0: usize, r1: usize) -> Tensor<2> {
        let [_, k] = self.meta.shape;
        let bs = self.meta.blocksize;
        let (start, end) = (r0 * k, r1 * k);
        let len = end - start;
        let w0 = start / 8;
        let codes = unpack_fields(self.packed.clone().slice(w0..end.div_ceil(8)), 4)
            .slice(start - 8 * w0..start - 8 * w0 + len);
        let values = self.code.clone().select(0, codes);
        let b0 = start / bs;
        let scales = expand_groups(self.absmax_blocks(b0, end.div_ceil(bs)), b0, bs, start, len);
        (values * scales).reshape([r1 - r0, k])
    }

    /// `y = x · Wᵀ + b` for `x` `[.., in]` on the weights' device, in `x`'s dtype: inputs,
    /// bias and outputs rounded to the compute dtype as the host path does.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let [n, k] = self.meta.shape;
        let dims = x.dims();
        let dtype = x.dtype();
        let rows = dims[..D - 1].iter().product::<usize>();
        let _span = tracing::trace_span!("linear4bit_device", rows, n, k).entered();
        let cd = self.meta.compute_dtype;
        let x = round_tensor(x.cast(DType::F32).reshape([rows, k]), cd);
        let step = rows_per_tile(n, k, self.meta.tile_bytes);
        let mut tiles: Vec<Tensor<2>> = (0..n)
            .step_by(step)
            .map(|r0| {
                let r1 = (r0 + step).min(n);
                x.clone().matmul(self.dequantize_rows(r0, r1).transpose())
            })
            .collect();
        let mut y = if tiles.len() == 1 {
            tiles.pop().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(tiles, 1)
        };
        if let Some(bias) = &self.bias {
            y = y + round_tensor(bias.clone(), cd).reshape([1, n]);
        }
        let mut out_dims = dims;
        out_dims[D - 1] = n;
        round_tensor(y, cd).reshape(out_dims).cast(dtype)
    }

    /// Reads the weights back to host memory, bit-identical to what was uploaded.
    pub fn to_host(&self) -> Result<(Quantized4bit, Option<Vec<f32>>)> {
        let what = "4-bit weight to host";
        let packed = unpack_nibbles(&read_i32(&self.packed, what)?, self.meta.packed_len);
        let absmax = match (&self.absmax, &self.nested_codes) {
            (Some(a), _) => AbsMax::Plain(read_f32(a, what)?),
            (None, Some(codes)) => {
                let (blocksize, offset) = self.meta.nested.unwrap_or((256, 0.0));
                let nested = |t: &Option<Tensor<1>>| match t {
                    Some(t) => read_f32(t, what),
                    None => unreachable!("double quant uploads all its statistics"),
                };
                AbsMax::Nested(NestedAbsMax {
                    quantized: unpack_bytes(&read_i32(codes, what)?, self.meta.blocks),
                    absmax: nested(&self.nested_absmax)?,
                    offset,
                    blocksize,
                    code: nested(&self.nested_code)?,
                })
            }
            (None, None) => unreachable!("a Resident4bit holds plain or nested absmax"),
        };
        let bias = self.bias.as_ref().map(|b| read_f32(b, what)).transpose()?;
        Ok((
            Quantized4bit {
                packed,
                absmax,
                shape: self.meta.shape.to_vec(),
                blocksize: self.meta.blocksize,
                quant_type: self.meta.quant_type,
            },
            bias,
        ))
    }

    /// A data-free stand-in with this layer's metadata (what the quant-state JSON needs).
    fn skeleton(&self) -> Quantized4bit {
        Quantized4bit {
            packed: Vec::new(),
            absmax: match self.meta.nested {
                None => AbsMax::Plain(Vec::new()),
                Some((blocksize, offset)) => AbsMax::Nested(NestedAbsMax {
                    quantized: Vec::new(),
                    absmax: Vec::new(),
                    offset,
                    blocksize,
                    code: Vec::new(),
                }),
            },
            shape: self.meta.shape.to_vec(),
            blocksize: self.meta.blocksize,
            quant_type: self.meta.quant_type,
        }
    }

    /// Name, part, dtype and shape of each tensor the layer saves under `prefix` — the same
    /// list `serialize::four_bit_parts` gives for the host form, from metadata alone.
    pub fn parts(&self, prefix: &str, dtype: Precision) -> Vec<(String, Part, DType, Vec<usize>)> {
        let w = format!("{prefix}.weight");
        let mut out = vec![(
            w.clone(),
            Part::Packed,
            DType::U8,
            vec![self.meta.packed_len, 1],
        )];
        match (&self.nested_absmax, &self.nested_code) {
            (Some(nested), Some(code)) => {
                out.push((
                    format!("{w}.absmax"),
                    Part::Absmax,
                    DType::U8,
                    vec![self.meta.blocks],
                ));
                out.push((
                    format!("{w}.nested_absmax"),
                    Part::NestedAbsmax,
                    DType::F32,
                    nested.dims().to_vec(),
                ));
                out.push((
                    format!("{w}.nested_quant_map"),
                    Part::NestedQuantMap,
                    DType::F32,
                    code.dims().to_vec(),
                ));
            }
            _ => out.push((
                format!("{w}.absmax"),
                Part::Absmax,
                DType::F32,
                vec![self.meta.blocks],
            )),
        }
        out.push((
            format!("{w}.quant_map"),
            Part::QuantMap,
            DType::F32,
            vec![16],
        ));
        let len = quant_state_json(&self.skeleton(), dtype).len();
        out.push((
            format!("{w}.quant_state.bitsandbytes__{}", self.meta.quant_type),
            Part::QuantState,
            DType::U8,
            vec![len],
        ));
        out
    }

    /// The data of one part listed by [`Resident4bit::parts`], read back from the device
    /// (only that tensor); `None` for a part this layer does not have.
    pub fn part(&self, dtype: Precision, part: Part) -> Result<Option<TensorData>> {
        let what = "4-bit weight part to host";
        let u8_data =
            |bytes: Vec<u8>, shape: Vec<usize>| TensorData::from_bytes_vec(bytes, shape, DType::U8);
        let f32_data = |values: Vec<f32>| {
            let n = values.len();
            TensorData::new(values, [n])
        };
        Ok(Some(match part {
            Part::Packed => u8_data(
                unpack_nibbles(&read_i32(&self.packed, what)?, self.meta.packed_len),
                vec![self.meta.packed_len, 1],
            ),
            Part::Absmax => match (&self.absmax, &self.nested_codes) {
                (Some(a), _) => f32_data(read_f32(a, what)?),
                (None, Some(codes)) => u8_data(
                    unpack_bytes(&read_i32(codes, what)?, self.meta.blocks),
                    vec![self.meta.blocks],
                ),
                (None, None) => return Ok(None),
            },
            Part::NestedAbsmax => match &self.nested_absmax {
                Some(t) => f32_data(read_f32(t, what)?),
                None => return Ok(None),
            },
            Part::NestedQuantMap => match &self.nested_code {
                Some(t) => f32_data(read_f32(t, what)?),
                None => return Ok(None),
            },
            Part::QuantMap => f32_data(self.meta.quant_type.code().to_vec()),
            Part::QuantState => {
                let json = quant_state_json(&self.skeleton(), dtype).into_bytes();
                let len = json.len();
                u8_data(json, vec![len])
            }
            _ => return Ok(None),
        }))
    }
}

/// Fails with a typed error when `device` cannot compute in `precision`.
fn check_compute_dtype(device: &Device, precision: Precision) -> Result<()> {
    if precision != Precision::F32 {
        cachet_tensor::ensure_supported(device, precision)?;
    }
    Ok(())
}
