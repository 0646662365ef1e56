//! Device-resident quantized weights: on a compute device that is not the host (a wgpu GPU),
//! [`Linear4bit`](crate::Linear4bit) and [`Linear8bitLt`](crate::Linear8bitLt) keep their
//! weights on that device, still packed, and run their forward with burn tensor ops there.
//!
//! Layout (every integer tensor is `I32`, the one integer dtype all of cachet's backends share):
//! * 4-bit codes: 8 per element, element `8w + i` of the flattened `[out, in]` weight in bits
//!   `4i..4i + 4` of word `w` (half a byte per weight, as bnb's packed bytes);
//! * double-quant absmax codes and LLM.int8 `CB`: 4 bytes per element, byte `i` in bits
//!   `8i..8i + 8` (one byte per value, `CB` sign-extended when unpacked);
//! * absmax, nested absmax, `SCB`, the code tables and the bias: f32.
//!
//! The forward dequantizes a tile of output rows at a time (nibbles unpacked with shifts and
//! masks, mapped through the 16-entry code with `select`, scaled by the per-block absmax, itself
//! double-dequantized on the device) and multiplies the activations with it, so transient memory
//! stays under the tile budget (`DEFAULT_TILE_BYTES`) whatever the layer's size. Arithmetic
//! follows the host kernels step for step; only summation order differs.

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use cachet_tensor::Precision;

use crate::blockwise::{AbsMax, NestedAbsMax, Quantized4bit};
use crate::codes::QuantType;
use crate::error::{QuantError, Result};
use crate::int8::Int8Weight;
use crate::serialize::{Part, int8_part, int8_parts, quant_state_json};

/// Default bound on the transient memory of one dequantized tile (64 MiB).
pub const DEFAULT_TILE_BYTES: usize = 64 << 20;

/// Transient bytes counted per weight of a tile: the unpacked codes (i32), the looked-up code
/// values, the expanded scales and the product (f32 each).
const TRANSIENT_BYTES_PER_WEIGHT: usize = 16;

/// `1 / 127²` as bnb's `int8_mm_dequant` writes it (the host kernel's constant).
const MM_DEQUANT_SCALE: f32 = 6.200124e-05;
/// `1 / 127` as bnb's `int8_vectorwise_dequant` writes it (the host kernel's constant).
#[allow(clippy::excessive_precision)]
const VECTORWISE_DEQUANT_SCALE: f32 = 7.874015718698502e-3;

/// Whether `device` is the host: the CPU backend that cachet-tensor's `cpu` spec opens, the
/// same notion the offloaded KV caches use for their host store. There the host kernels run
/// (much faster than tensor ops on the CPU); any other device gets device-resident weights.
pub fn is_host_device(device: &Device) -> bool {
    cachet_tensor::device::cpu_device().is_ok_and(|cpu| cpu == *device)
}

/// Where a quantized layer keeps its weights; see [`is_host_device`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightResidence {
    /// Host memory on the host device, the compute device otherwise.
    #[default]
    Auto,
    /// Always host memory (host kernels; activations travel to the host and back).
    Host,
    /// Always the compute device, even the host one (tensor-op forward; mainly for tests).
    Device,
}

impl WeightResidence {
    /// Whether layers computing on `device` hold their weights there.
    pub fn on_device(self, device: &Device) -> bool {
        match self {
            Self::Auto => !is_host_device(device),
            Self::Host => false,
            Self::Device => true,
        }
    }
}

fn transfer_error(what: &str, err: impl std::fmt::Display) -> QuantError {
    QuantError::Tensor(Box::new(cachet_tensor::TensorError::Transfer {
        what: what.to_string(),
        reason: err.to_string(),
    }))
}

fn int_tensor(values: Vec<i32>, device: &Device) -> Tensor<1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), (device, DType::I32))
}

fn f32_tensor(values: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [values.len()]),
        (device, DType::F32),
    )
}

fn read_i32(t: &Tensor<1, Int>, what: &str) -> Result<Vec<i32>> {
    t.clone()
        .try_into_data()
        .map_err(|e| transfer_error(what, e))?
        .convert::<i32>()
        .try_into_vec::<i32>()
        .map_err(|e| transfer_error(what, format!("{e:?}")))
}

fn read_f32(t: &Tensor<1>, what: &str) -> Result<Vec<f32>> {
    t.clone()
        .try_into_data()
        .map_err(|e| transfer_error(what, e))?
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| transfer_error(what, format!("{e:?}")))
}

/// Packs bnb's 4-bit bytes (two codes per byte, first in the high nibble) 8 codes per i32.
pub(crate) fn pack_nibbles(packed: &[u8]) -> Vec<i32> {
    packed
        .chunks(4)
        .map(|bytes| {
            let mut word = 0u32;
            for (j, &b) in bytes.iter().enumerate() {
                let b = u32::from(b);
                word |= (b >> 4) << (8 * j);
                word |= (b & 0x0f) << (8 * j + 4);
            }
            word as i32
        })
        .collect()
}

/// Inverse of [`pack_nibbles`]: the first `len` bytes in bnb's layout.
pub(crate) fn unpack_nibbles(words: &[i32], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 4);
    for &w in words {
        let w = w as u32;
        for j in 0..4 {
            let hi = (w >> (8 * j)) & 0x0f;
            let lo = (w >> (8 * j + 4)) & 0x0f;
            out.push(((hi << 4) | lo) as u8);
        }
    }
    out.truncate(len);
    out
}

/// Packs bytes 4 per i32, byte `i` in bits `8i..8i + 8`.
pub(crate) fn pack_bytes(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            i32::from_le_bytes(b)
        })
        .collect()
}

/// Inverse of [`pack_bytes`]: the first `len` bytes.
pub(crate) fn unpack_bytes(words: &[i32], len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.truncate(len);
    out
}

/// Fields of `bits` bits (4 or 8) of `words`, low bits first: `[words · 32/bits]`, unsigned.
fn unpack_fields(words: Tensor<1, Int>, bits: usize) -> Tensor<1, Int> {
    let per = 32 / bits;
    let [n] = words.dims();
    let device = words.device();
    let shifts = Tensor::<1, Int>::arange(0..per as i64, &device)
        .mul_scalar(bits as i64)
        .cast(DType::I32)
        .reshape([1, per])
        .expand([n, per]);
    words
        .reshape([n, 1])
        .expand([n, per])
        .bitwise_right_shift(shifts)
        .bitwise_and_scalar(((1u32 << bits) - 1) as i64)
        .reshape([n * per])
}

/// Values `start..start + len` of a per-group tensor `groups` (group `g` covering elements
/// `g·size .. (g+1)·size`), given its groups from `g0` on: each group repeated `size` times.
fn expand_groups(groups: Tensor<1>, g0: usize, size: usize, start: usize, len: usize) -> Tensor<1> {
    let [n] = groups.dims();
    let offset = start - g0 * size;
    groups
        .reshape([n, 1])
        .expand([n, size])
        .reshape([n * size])
        .slice(offset..offset + len)
}

/// Rounds to `p` and back to f32 (the host kernels' `round_to`).
fn round_tensor<const D: usize>(x: Tensor<D>, p: Precision) -> Tensor<D> {
    match p {
        Precision::F32 => x,
        _ => x.cast(p.dtype()).cast(DType::F32),
    }
}

/// Output rows per tile for `k` inputs under `tile_bytes`.
fn rows_per_tile(n: usize, k: usize, tile_bytes: usize) -> usize {
    (tile_bytes / (k.max(1) * TRANSIENT_BYTES_PER_WEIGHT)).clamp(1, n.max(1))
}

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
    /// The output has `x`'s dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
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
                read_i32(&cols, "outlier columns to host")
                    .unwrap_or_else(|e| panic!("Linear8bitLt: {e}"))
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
        y.reshape(out_dims).cast(dtype)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibble_and_byte_packing_round_trip() {
        for len in [0usize, 1, 3, 4, 5, 9, 17] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(unpack_nibbles(&pack_nibbles(&bytes), len), bytes);
            assert_eq!(unpack_bytes(&pack_bytes(&bytes), len), bytes);
        }
        // Element 8w + i in bits 4i: byte 0x12 holds elements 0 (1) and 1 (2).
        assert_eq!(pack_nibbles(&[0x12, 0x34]), vec![0x4321]);
    }
}
