//! Quantized linear layers plugged into the model through `cachet_models::LinearOp`:
//! [`Linear4bit`] (NF4/FP4) and [`Linear8bitLt`] (LLM.int8).
//!
//! Weights stay quantized in host memory. Batch-1 decode runs a fused dequantize-and-multiply
//! gemv (rayon over output rows, a byte→pair lookup table feeding an 8-lane accumulator) that
//! never materialises the f32 weight; larger batches dequantize tiles of rows and reuse each
//! tile for every input row.

use std::borrow::Cow;
use std::fmt;

use burn::tensor::{Tensor, TensorData};
use cachet_models::LinearOp;
use cachet_tensor::Precision;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::blockwise::{Quantized4bit, dequantize_4bit_into};
use crate::int8::{Int8Weight, int8_matmul};

/// Output rows per tile of the batched path.
const TILE_ROWS: usize = 16;

/// Rounds `v` to `p` and back to f32 (emulates computing in a half type).
fn round_to(p: Precision, v: f32) -> f32 {
    match p {
        Precision::F32 => v,
        Precision::F16 => f16::from_f32(v).to_f32(),
        Precision::BF16 => bf16::from_f32(v).to_f32(),
    }
}

/// Reads `[b, s, k]` activations to host f32, returning the data and the dims.
fn host_input(x: Tensor<3>) -> ([usize; 3], Vec<f32>) {
    let dims = x.dims();
    let data = x
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("an f32 tensor reads back as f32");
    (dims, data)
}

/// Dot product with 8 independent lanes (auto-vectorised).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ_j code[nibble_j] · x_j` over packed bytes (high nibble first) with AVX-512: 8 bytes
/// become 16 indices, looked up in the 16-entry code with one permute, then one FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_codes_avx512(bytes: &[u8], x: &[f32], code: &[f32; 16]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.len(), bytes.len() * 2);
    let n = bytes.len() / 8;
    // SAFETY: every load reads within `bytes` (8 bytes at 8i < len) and `x` (16 floats at 16i).
    let mut sum = unsafe {
        let lut = _mm512_loadu_ps(code.as_ptr());
        let mut acc = _mm512_setzero_ps();
        for i in 0..n {
            let w = crate::blockwise::decode16_avx512(bytes.as_ptr().add(i * 8), lut);
            let xv = _mm512_loadu_ps(x.as_ptr().add(i * 16));
            acc = _mm512_fmadd_ps(w, xv, acc);
        }
        _mm512_reduce_add_ps(acc)
    };
    for j in n * 8..bytes.len() {
        let b = bytes[j] as usize;
        sum += code[b >> 4] * x[2 * j] + code[b & 0x0f] * x[2 * j + 1];
    }
    sum
}

/// One output of the fused gemv for a row made of whole blocks (`start` and `x.len()` multiples
/// of `blocksize`, itself a multiple of 16) with AVX-512: each block's codes are looked up with
/// one permute per 16 values and accumulated in a vector, scaled by the block's absmax with one
/// FMA, and the row is reduced once at the end.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemv_row_blocks_avx512(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    x: &[f32],
    start: usize,
) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(
        start.is_multiple_of(blocksize)
            && x.len().is_multiple_of(blocksize)
            && blocksize.is_multiple_of(16)
    );
    let first = start / blocksize;
    let blocks = x.len() / blocksize;
    assert!(packed.len() * 2 >= start + x.len() && absmax.len() >= first + blocks);
    // SAFETY: the assert above bounds every load: bytes (start + 16·i)/2 .. +8 lie in `packed`,
    // floats 16·i .. +16 in `x`, and block indices in `absmax`.
    unsafe {
        let lut = _mm512_loadu_ps(code.as_ptr());
        let mut row = _mm512_setzero_ps();
        let bytes = packed.as_ptr().add(start / 2);
        for b in 0..blocks {
            let mut acc = _mm512_setzero_ps();
            let base = b * blocksize;
            for i in (0..blocksize).step_by(16) {
                let w = crate::blockwise::decode16_avx512(bytes.add((base + i) / 2), lut);
                acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(x.as_ptr().add(base + i)), acc);
            }
            row = _mm512_fmadd_ps(acc, _mm512_set1_ps(*absmax.get_unchecked(first + b)), row);
        }
        _mm512_reduce_add_ps(row)
    }
}

/// One output of the fused 4-bit gemv: `Σ_c W[row, c] · x[c]` for the row starting at flat
/// element `start`, decoding codes on the fly block by block.
fn gemv_row_4bit(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    lut: &[[f32; 2]; 256],
    code: &[f32; 16],
    x: &[f32],
    start: usize,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if start.is_multiple_of(blocksize)
        && x.len().is_multiple_of(blocksize)
        && blocksize.is_multiple_of(16)
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: avx512f was detected at run time; the row is made of whole blocks.
        return unsafe { gemv_row_blocks_avx512(packed, absmax, blocksize, code, x, start) };
    }
    let end = start + x.len();
    let mut e = start;
    let mut acc = 0.0f32;
    let mut buf = [0.0f32; 64];
    while e < end {
        let block = e / blocksize;
        let seg_end = ((block + 1) * blocksize).min(end);
        let mut partial = 0.0f32;
        let mut i = e;
        if i % 2 == 1 {
            partial += code[(packed[i / 2] & 0x0f) as usize] * x[i - start];
            i += 1;
        }
        let pairs = (seg_end - i) / 2;
        let bytes = &packed[i / 2..i / 2 + pairs];
        let xs = &x[i - start..i - start + 2 * pairs];
        #[cfg(target_arch = "x86_64")]
        let simd = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        if simd {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: avx512f was detected at run time.
                partial += unsafe { dot_codes_avx512(bytes, xs, code) };
            }
        } else {
            for (chunk, xc) in bytes.chunks(32).zip(xs.chunks(64)) {
                for (j, &b) in chunk.iter().enumerate() {
                    let v = lut[b as usize];
                    buf[2 * j] = v[0];
                    buf[2 * j + 1] = v[1];
                }
                partial += dot(&buf[..xc.len()], xc);
            }
        }
        i += 2 * pairs;
        if i < seg_end {
            partial += code[(packed[i / 2] >> 4) as usize] * x[i - start];
        }
        acc += partial * absmax[block];
        e = seg_end;
    }
    acc
}

/// A 4-bit (NF4/FP4) linear layer, bitsandbytes `Linear4bit`.
pub struct Linear4bit {
    /// The quantized `[out, in]` weight.
    pub weight: Quantized4bit,
    /// Optional bias (`[out]`, f32).
    pub bias: Option<Vec<f32>>,
    /// Compute dtype (`bnb_4bit_compute_dtype`).
    pub compute_dtype: Precision,
    /// dtype the weight had before quantization (the quant state's `dtype`).
    pub weight_dtype: Precision,
}

impl fmt::Debug for Linear4bit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Linear4bit")
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

impl Linear4bit {
    /// Output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.weight.shape[0], self.weight.shape[1])
    }

    /// `y = x · Wᵀ + b` for row-major `x` `[rows, in]` on the host (f32 in, f32 out).
    pub fn forward_host(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (n, k) = self.dims();
        let _span = tracing::trace_span!("linear4bit", rows, n, k).entered();
        let absmax: Cow<'_, [f32]> = self.weight.absmax.to_f32();
        let code = self.weight.quant_type.code();
        let x: Cow<'_, [f32]> = if self.compute_dtype == Precision::F32 {
            Cow::Borrowed(x)
        } else {
            Cow::Owned(x.iter().map(|&v| round_to(self.compute_dtype, v)).collect())
        };
        let mut out = vec![0.0f32; rows * n];
        if rows == 1 {
            let lut: [[f32; 2]; 256] = std::array::from_fn(|b| [code[b >> 4], code[b & 0x0f]]);
            out.par_iter_mut()
                .enumerate()
                .with_min_len(16)
                .for_each(|(o, y)| {
                    *y = gemv_row_4bit(
                        &self.weight.packed,
                        &absmax,
                        self.weight.blocksize,
                        &lut,
                        code,
                        &x,
                        o * k,
                    );
                });
        } else {
            let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(TILE_ROWS))
                .into_par_iter()
                .map(|t| {
                    let r0 = t * TILE_ROWS;
                    let r1 = (r0 + TILE_ROWS).min(n);
                    // Dequantize rows r0..r1 (from an even element, for the byte alignment).
                    let start = r0 * k;
                    let aligned = start & !1;
                    let mut w = vec![0.0f32; (r1 * k) - aligned];
                    dequantize_4bit_into(
                        &self.weight.packed,
                        &absmax,
                        self.weight.blocksize,
                        self.weight.quant_type,
                        aligned,
                        &mut w,
                    );
                    let w = &w[start - aligned..];
                    let mut part = vec![0.0f32; rows * (r1 - r0)];
                    for (r, xr) in x.chunks(k).enumerate() {
                        for (j, wr) in w.chunks(k).enumerate() {
                            part[r * (r1 - r0) + j] = dot(xr, wr);
                        }
                    }
                    (r0, part)
                })
                .collect();
            for (r0, part) in tiles {
                let width = part.len() / rows;
                for r in 0..rows {
                    out[r * n + r0..r * n + r0 + width]
                        .copy_from_slice(&part[r * width..(r + 1) * width]);
                }
            }
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

impl LinearOp for Linear4bit {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let device = x.device();
        let dtype = x.dtype();
        let ([b, s, _], data) = host_input(x);
        let out = self.forward_host(&data, b * s);
        let n = self.weight.shape[0];
        Tensor::<3>::from_data(TensorData::new(out, [b, s, n]), (&device, dtype))
    }

    fn in_features(&self) -> usize {
        self.weight.shape[1]
    }

    fn out_features(&self) -> usize {
        self.weight.shape[0]
    }

    fn memory_bytes(&self) -> usize {
        self.weight.memory_bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// An LLM.int8 linear layer, bitsandbytes `Linear8bitLt` (inference, `has_fp16_weights=False`).
pub struct Linear8bitLt {
    /// `CB` / `SCB`.
    pub weight: Int8Weight,
    /// Optional bias (`[out]`, f32).
    pub bias: Option<Vec<f32>>,
    /// Outlier threshold (`llm_int8_threshold`; 0 disables the decomposition).
    pub threshold: f32,
}

impl fmt::Debug for Linear8bitLt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Linear8bitLt")
            .field("rows", &self.weight.rows)
            .field("cols", &self.weight.cols)
            .field("threshold", &self.threshold)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl Linear8bitLt {
    /// `y = x · Wᵀ + b` for row-major `x` `[rows, in]` on the host.
    pub fn forward_host(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let _span = tracing::trace_span!("linear8bitlt", rows, n = self.weight.rows).entered();
        int8_matmul(x, rows, &self.weight, self.bias.as_deref(), self.threshold)
    }
}

impl LinearOp for Linear8bitLt {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let device = x.device();
        let dtype = x.dtype();
        let ([b, s, _], data) = host_input(x);
        let out = self.forward_host(&data, b * s);
        Tensor::<3>::from_data(
            TensorData::new(out, [b, s, self.weight.rows]),
            (&device, dtype),
        )
    }

    fn in_features(&self) -> usize {
        self.weight.cols
    }

    fn out_features(&self) -> usize {
        self.weight.rows
    }

    fn memory_bytes(&self) -> usize {
        self.weight.memory_bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// A projection of `keep_in_fp32_modules`: its weight (and bias) are f32 whatever the model's
/// dtype, as transformers/accelerate keep them. The input is cast to f32, multiplied with the
/// f32 weight, and the output cast back to the activations' dtype. `inner` is the f32 layer:
/// dense on the compute device, or offloaded (`CpuDenseLinear`/`DiskDenseLinear` built in f32).
pub struct Fp32Linear {
    name: String,
    inner: cachet_models::LinearLayer,
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
    pub fn new(name: &str, inner: cachet_models::LinearLayer, shape: [usize; 2]) -> Self {
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
    pub fn inner(&self) -> &cachet_models::LinearLayer {
        &self.inner
    }

    /// dtype of the weight held in memory: `Some(F32)` for a layer on the compute device (read
    /// from the tensor itself), `None` when it is offloaded behind another op.
    pub fn weight_dtype(&self) -> Option<burn::tensor::DType> {
        self.inner.as_dense().map(|l| l.weight.val().dtype())
    }
}

impl LinearOp for Fp32Linear {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let _span = tracing::trace_span!("fp32_linear", name = self.name.as_str()).entered();
        let dtype = x.dtype();
        let y = self.inner.forward(x.cast(burn::tensor::DType::F32));
        y.cast(dtype)
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
