//! Blockwise quantization kernels, bit-exact with bitsandbytes 0.50.2 on CPU: 4-bit NF4/FP4
//! (`quantize_4bit`, with double quantization of the absmax) and 8-bit on the dynamic map
//! (`quantize_blockwise`).
//!
//! Both work on the flattened tensor in blocks of `blocksize` values with one f32 absmax per
//! block; a trailing partial block gets its own absmax.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::codes::{DYNAMIC_MAP, QuantType, midpoints};
use crate::error::{QuantError, Result};
use crate::simd::SimdLevel;

/// Block sizes bnb accepts for 4-bit quantization.
pub const VALID_4BIT_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Block size of the nested (double) quantization of the absmax, fixed by bnb.
pub const NESTED_BLOCKSIZE: usize = 256;
/// Default block size of 8-bit blockwise quantization.
pub const DEFAULT_8BIT_BLOCKSIZE: usize = 4096;

/// Checks a 4-bit block size: a power of two in 32..=4096.
pub fn check_4bit_blocksize(blocksize: usize) -> Result<()> {
    if VALID_4BIT_BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(QuantError::InvalidBlocksize {
            blocksize,
            reason: "4-bit block sizes are powers of two from 32 to 4096".into(),
        })
    }
}

fn check_8bit_blocksize(blocksize: usize) -> Result<()> {
    if blocksize >= 2 && blocksize.is_power_of_two() && blocksize <= 1 << 20 {
        Ok(())
    } else {
        Err(QuantError::InvalidBlocksize {
            blocksize,
            reason: "8-bit block sizes are powers of two from 2 to 2^20".into(),
        })
    }
}

fn check_finite(what: &str, data: &[f32]) -> Result<()> {
    match data.par_iter().position_any(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            tensor: what.to_string(),
            index,
            value: data[index],
        }),
        None => Ok(()),
    }
}

/// The per-block scales of a 4-bit tensor: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum AbsMax {
    /// One f32 absmax per block.
    Plain(Vec<f32>),
    /// `absmax - offset` quantized to 8 bits on the dynamic map (bnb `compress_statistics`).
    Nested(NestedAbsMax),
}

/// Double-quantized absmax (`weight.absmax` u8, `weight.nested_absmax`, `nested_offset`).
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsMax {
    /// 8-bit codes of `absmax - offset`, one per 4-bit block.
    pub quantized: Vec<u8>,
    /// f32 absmax of each nested block of [`NESTED_BLOCKSIZE`] codes.
    pub absmax: Vec<f32>,
    /// The mean of the original absmax, added back after dequantization.
    pub offset: f32,
    /// Nested block size (always 256 for bnb).
    pub blocksize: usize,
    /// The 8-bit code (`nested_quant_map`).
    pub code: Vec<f32>,
}

impl AbsMax {
    /// Number of 4-bit blocks these scales cover.
    pub fn len(&self) -> usize {
        match self {
            Self::Plain(v) => v.len(),
            Self::Nested(n) => n.quantized.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 absmax of every block (dequantizing nested statistics as bnb does).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Self::Plain(v) => Cow::Borrowed(v),
            Self::Nested(n) => {
                let mut out =
                    dequantize_blockwise_with(&n.quantized, &n.absmax, &n.code, n.blocksize);
                for v in &mut out {
                    *v += n.offset;
                }
                Cow::Owned(out)
            }
        }
    }

    /// Bytes these statistics take in memory.
    pub fn memory_bytes(&self) -> usize {
        match self {
            Self::Plain(v) => v.len() * 4,
            Self::Nested(n) => n.quantized.len() + n.absmax.len() * 4 + n.code.len() * 4 + 4,
        }
    }
}

/// A tensor quantized to 4 bits (bnb `Params4bit` data + `QuantState`).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4bit {
    /// Two codes per byte, first element in the high nibble; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    /// Per-block scales.
    pub absmax: AbsMax,
    /// Shape of the original tensor (`[out, in]` for a weight).
    pub shape: Vec<usize>,
    /// Elements per block.
    pub blocksize: usize,
    /// NF4 or FP4.
    pub quant_type: QuantType,
}

impl Quantized4bit {
    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Dequantizes to f32 (`code[q] * absmax[block]`, exactly as bnb).
    ///
    /// FP4 code 8 (which bnb's quantizer emits for tiny positive values) decodes to +0.0 as in
    /// `get_4bit_type`; bnb's own CPU kernels give -0.0 or +0.0 for it depending on the SIMD path
    /// the shape selects (AVX2 and scalar: -0.0; AVX-512 and the torch fallback: +0.0).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.numel()];
        self.dequantize_into(&mut out);
        out
    }

    /// Dequantizes into `out` (`numel()` values), e.g. a reused buffer.
    ///
    /// # Panics
    /// If `out` does not hold exactly `numel()` values.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.numel(), "dequantize_into: output length");
        let absmax = self.absmax.to_f32();
        // Chunks of whole blocks (block sizes are even, so chunks start on a byte).
        let chunk = self.blocksize * 64;
        let code = self.quant_type.code();
        let level = SimdLevel::current();
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
            let (packed, blocksize) = (&self.packed, self.blocksize);
            dequantize_4bit_with(packed, &absmax, blocksize, code, i * chunk, o, level);
        });
    }

    /// Bytes the quantized tensor takes in memory.
    pub fn memory_bytes(&self) -> usize {
        self.packed.len() + self.absmax.memory_bytes()
    }

    /// Checks that the parts agree with each other (after loading from a file).
    pub fn validate(&self, tensor: &str) -> Result<()> {
        check_4bit_blocksize(self.blocksize)?;
        let n = self.numel();
        let bad = |reason: String| QuantError::InconsistentState {
            tensor: tensor.to_string(),
            reason,
        };
        if self.packed.len() != n.div_ceil(2) {
            return Err(bad(format!(
                "{} packed bytes for shape {:?} ({} values need {})",
                self.packed.len(),
                self.shape,
                n,
                n.div_ceil(2)
            )));
        }
        let blocks = n.div_ceil(self.blocksize);
        if self.absmax.len() != blocks {
            return Err(bad(format!(
                "{} absmax values for {} blocks of {} (shape {:?})",
                self.absmax.len(),
                blocks,
                self.blocksize,
                self.shape
            )));
        }
        if let AbsMax::Nested(nested) = &self.absmax {
            if nested.blocksize != NESTED_BLOCKSIZE {
                return Err(bad(format!(
                    "nested blocksize {} (bnb only supports {NESTED_BLOCKSIZE})",
                    nested.blocksize
                )));
            }
            let nested_blocks = blocks.div_ceil(nested.blocksize);
            if nested.absmax.len() != nested_blocks {
                return Err(bad(format!(
                    "{} nested absmax values, {} blocks of absmax need {}",
                    nested.absmax.len(),
                    blocks,
                    nested_blocks
                )));
            }
            if nested.code.len() != 256 {
                return Err(bad(format!(
                    "nested quant map has {} values, expected 256",
                    nested.code.len()
                )));
            }
        }
        Ok(())
    }
}

/// Quantizes `data` (a tensor of `shape`, flattened row-major) to 4 bits like bnb's
/// `quantize_4bit(A, blocksize, compress_statistics=double_quant, quant_type)`.
pub fn quantize_4bit(
    tensor: &str,
    data: &[f32],
    shape: &[usize],
    blocksize: usize,
    quant_type: QuantType,
    double_quant: bool,
) -> Result<Quantized4bit> {
    check_4bit_blocksize(blocksize)?;
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(QuantError::InconsistentState {
            tensor: tensor.to_string(),
            reason: format!("{} values for shape {shape:?}", data.len()),
        });
    }
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0.0f32; n.div_ceil(blocksize)];
    if !quantize_4bit_codes(
        data,
        blocksize,
        quant_type,
        SimdLevel::current(),
        &mut packed,
        &mut absmax,
    ) {
        check_finite(tensor, data)?;
    }
    let absmax = if double_quant {
        AbsMax::Nested(double_quantize(tensor, &absmax)?)
    } else {
        AbsMax::Plain(absmax)
    };
    Ok(Quantized4bit {
        packed,
        absmax,
        shape: shape.to_vec(),
        blocksize,
        quant_type,
    })
}

/// The codes (`packed`, `ceil(n / 2)` bytes) and absmax (one per block) of `data` with the
/// kernels of `level` (lowered to what the CPU has); `false` when `data` holds a non-finite
/// value (the outputs are then incomplete).
pub(crate) fn quantize_4bit_codes(
    data: &[f32],
    blocksize: usize,
    quant_type: QuantType,
    level: SimdLevel,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> bool {
    let level = level.best_up_to();
    let (bounds, order) = midpoints(quant_type);
    let non_finite = std::sync::atomic::AtomicBool::new(false);
    // Whole blocks per rayon task, about 64 Ki values each: few enough tasks that splitting
    // costs nothing next to the work, enough to balance two to dozens of cores.
    let per_task = (1usize << 16).div_ceil(blocksize).max(1);
    packed
        .par_chunks_mut(per_task * blocksize / 2)
        .zip(absmax.par_chunks_mut(per_task))
        .zip(data.par_chunks(per_task * blocksize))
        .for_each(|((out, am), chunk)| {
            for ((out, am), block) in out
                .chunks_mut(blocksize / 2)
                .zip(am.iter_mut())
                .zip(chunk.chunks(blocksize))
            {
                if !quantize_block(level, block, out, am, blocksize, &bounds, &order) {
                    non_finite.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    !non_finite.into_inner()
}

/// One block with the kernel of `level` (an available level): full blocks go to the SIMD
/// kernels, a trailing partial block to the portable loop.
#[inline]
fn quantize_block(
    level: SimdLevel,
    block: &[f32],
    out: &mut [u8],
    am: &mut f32,
    blocksize: usize,
    bounds: &[f32; 15],
    order: &[u8; 16],
) -> bool {
    let full = block.len() == blocksize;
    #[cfg(target_arch = "x86_64")]
    if full && level != SimdLevel::Portable {
        let max = if level == SimdLevel::Avx512 {
            // SAFETY: `level` is available (the caller lowered it), so avx512f is; the block
            // holds `blocksize` values (a multiple of 16) and `out` blocksize / 2 bytes.
            unsafe { quantize_block_avx512(block, out, bounds, order) }
        } else {
            // SAFETY: as above, with avx2 and fma.
            unsafe { quantize_block_avx2(block, out, bounds, order) }
        };
        return match max {
            Some(max) => {
                *am = max;
                true
            }
            None => false,
        };
    }
    let _ = level;
    quantize_block_portable(block, out, am, full, bounds, order)
}

/// Quantizes one block to 4-bit codes in `out` (high nibble first) and its absmax in `am`;
/// `false` when the block holds a non-finite value (nothing is written then).
fn quantize_block_portable(
    block: &[f32],
    out: &mut [u8],
    am: &mut f32,
    full: bool,
    bounds: &[f32; 15],
    order: &[u8; 16],
) -> bool {
    // Non-finite values are detected here (one pass over the data) and reported by the caller:
    // the max over the magnitudes' bits, in 8 independent lanes that vectorise (for
    // non-negative floats the bit order is the value order, and NaN/inf sort above every
    // finite value).
    let magnitude = |v: &f32| v.to_bits() & 0x7fff_ffff;
    let mut lanes = [0u32; 8];
    let (chunks, rest) = block.as_chunks::<8>();
    for c in chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = (*m).max(magnitude(v));
        }
    }
    let bits = rest.iter().map(magnitude).chain(lanes).max().unwrap_or(0);
    if bits >= 0x7f80_0000 {
        return false;
    }
    let max = f32::from_bits(bits);
    // Full blocks multiply by the reciprocal; bnb's trailing block divides (and stores the
    // clamped absmax).
    let clamped = max.max(1e-38);
    *am = if full { max } else { clamped };
    let recip = 1.0f32 / clamped;
    let code = |v: f32| -> u8 {
        let scaled = if full { v * recip } else { v / clamped }.clamp(-1.0, 1.0);
        // torch.bucketize(right=False): the number of boundaries strictly below.
        let mut idx = 0u8;
        for b in bounds {
            idx += u8::from(*b < scaled);
        }
        order[idx as usize]
    };
    if full {
        // Full blocks: 16 values (8 bytes) at a time, compares laid out lane-wise so the
        // bucket count vectorises.
        for (bytes, vals) in out.chunks_exact_mut(8).zip(block.chunks_exact(16)) {
            let mut scaled = [0.0f32; 16];
            for (s, &v) in scaled.iter_mut().zip(vals) {
                *s = (v * recip).clamp(-1.0, 1.0);
            }
            let mut idx = [0u8; 16];
            for b in bounds {
                for (i, &s) in idx.iter_mut().zip(&scaled) {
                    *i += u8::from(*b < s);
                }
            }
            for (j, byte) in bytes.iter_mut().enumerate() {
                *byte = (order[idx[2 * j] as usize] << 4) | order[idx[2 * j + 1] as usize];
            }
        }
        return true;
    }
    let pad = code(0.0);
    for (byte, pair) in out.iter_mut().zip(block.chunks(2)) {
        let hi = code(pair[0]);
        let lo = if pair.len() == 2 { code(pair[1]) } else { pad };
        *byte = (hi << 4) | lo;
    }
    true
}

/// One full block with AVX-512, bit-identical to [`quantize_block_portable`]: the absmax as
/// an integer max over the magnitudes' bits (for non-negative floats the bit order is the
/// value order, and NaN/inf sort above every finite value, which flags them); the bucket as a
/// 4-step branchless binary search over the 15 midpoints held in one register (the count of
/// midpoints strictly below a value, as bucketize counts, since `midpoint < v` is monotone in
/// the sorted midpoints); codes paired into bytes with 64-bit shifts and narrowed with
/// `vpmovqb`. Returns the absmax, or `None` for a block holding a non-finite value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(
    block: &[f32],
    out: &mut [u8],
    bounds: &[f32; 15],
    order: &[u8; 16],
) -> Option<f32> {
    use std::arch::x86_64::*;
    assert!(block.len().is_multiple_of(16) && out.len() * 2 == block.len());
    let vectors = block.len() / 16;
    let src = block.as_ptr();
    let dst = out.as_mut_ptr();
    // SAFETY: every load reads 16 floats at 16i < block.len(); every store writes 8 bytes at
    // 8i < out.len().
    unsafe {
        let magnitude = _mm512_set1_epi32(0x7fff_ffff);
        let mut m = _mm512_setzero_si512();
        for i in 0..vectors {
            let v = _mm512_loadu_si512(src.add(i * 16).cast());
            m = _mm512_max_epu32(m, _mm512_and_si512(v, magnitude));
        }
        let bits = _mm512_reduce_max_epu32(m);
        if bits >= 0x7f80_0000 {
            return None;
        }
        let max = f32::from_bits(bits);
        let recip = _mm512_set1_ps(1.0f32 / max.max(1e-38));
        let (lo, hi) = (_mm512_set1_ps(-1.0), _mm512_set1_ps(1.0));
        let mut padded = [0.0f32; 16];
        padded[..15].copy_from_slice(bounds);
        let table = _mm512_loadu_ps(padded.as_ptr());
        let middle = _mm512_set1_ps(bounds[7]);
        let order_i32: [i32; 16] = std::array::from_fn(|i| i32::from(order[i]));
        let order_v = _mm512_loadu_si512(order_i32.as_ptr().cast());
        let reorder = !is_identity(order);
        let (k8, k4, k2, k1) = (
            _mm512_set1_epi32(8),
            _mm512_set1_epi32(4),
            _mm512_set1_epi32(2),
            _mm512_set1_epi32(1),
        );
        for i in 0..vectors {
            let v = _mm512_loadu_ps(src.add(i * 16));
            let s = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, recip), lo), hi);
            // idx += step where bounds[idx + step - 1] < s, for step 8, 4, 2, 1.
            let mut idx = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(middle, s), k8);
            let c = _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(3)), table);
            idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(c, s), idx, k4);
            let c = _mm512_permutexvar_ps(_mm512_add_epi32(idx, k1), table);
            idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(c, s), idx, k2);
            let c = _mm512_permutexvar_ps(idx, table);
            idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(c, s), idx, k1);
            let codes = if reorder {
                _mm512_permutexvar_epi32(idx, order_v)
            } else {
                idx
            };
            // Each 64-bit lane holds (even, odd) codes: byte = even << 4 | odd.
            let pairs = _mm512_or_si512(
                _mm512_slli_epi64::<4>(codes),
                _mm512_srli_epi64::<32>(codes),
            );
            _mm_storel_epi64(dst.add(i * 8).cast(), _mm512_cvtepi64_epi8(pairs));
        }
        Some(max)
    }
}

/// Whether the code order maps every bucket to itself (NF4: its code is sorted).
#[cfg(target_arch = "x86_64")]
fn is_identity(order: &[u8; 16]) -> bool {
    order.iter().enumerate().all(|(i, &o)| usize::from(o) == i)
}

/// One full block with AVX2+FMA, bit-identical to [`quantize_block_portable`] by the method of
/// [`quantize_block_avx512`] on 8 lanes: the absmax as an integer max over the magnitudes' bits;
/// the bucket as a 4-step branchless binary search over the sorted midpoints, where each step
/// has at most 8 candidates, so one blend or one 8-entry permute fetches the midpoint to
/// compare with; 16 codes paired into 8 bytes with 64-bit shifts and two shuffles. Returns the
/// absmax, or `None` for a block holding a non-finite value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(
    block: &[f32],
    out: &mut [u8],
    bounds: &[f32; 15],
    order: &[u8; 16],
) -> Option<f32> {
    use std::arch::x86_64::*;
    // Whole 16-value groups (block sizes are multiples of 32).
    assert!(block.len().is_multiple_of(16) && out.len() * 2 == block.len());
    let groups = block.len() / 16;
    let src = block.as_ptr();
    let dst = out.as_mut_ptr();
    // SAFETY: every load reads 8 floats at 8i < block.len() (16 per group); every store writes
    // 8 bytes at 8g < out.len().
    unsafe {
        let magnitude = _mm256_set1_epi32(0x7fff_ffff);
        let mut m = _mm256_setzero_si256();
        for i in 0..groups * 2 {
            let v = _mm256_loadu_si256(src.add(i * 8).cast());
            m = _mm256_max_epu32(m, _mm256_and_si256(v, magnitude));
        }
        let m = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
        let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
        let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
        let bits = _mm_cvtsi128_si32(m) as u32;
        if bits >= 0x7f80_0000 {
            return None;
        }
        let max = f32::from_bits(bits);
        let recip = _mm256_set1_ps(1.0f32 / max.max(1e-38));
        let (lo, hi) = (_mm256_set1_ps(-1.0), _mm256_set1_ps(1.0));
        let b = bounds;
        // Step 8 compares with b[7]; step 4 with b[3] or b[11]; step 2 with b[idx + 1] for
        // idx in {0, 4, 8, 12}; step 1 with b[idx] for even idx.
        let (b7, b3, b11) = (
            _mm256_set1_ps(b[7]),
            _mm256_set1_ps(b[3]),
            _mm256_set1_ps(b[11]),
        );
        let t2 = _mm256_setr_ps(b[1], b[5], b[9], b[13], 0.0, 0.0, 0.0, 0.0);
        let t1 = _mm256_setr_ps(b[0], b[2], b[4], b[6], b[8], b[10], b[12], b[14]);
        let (k8, k4, k2) = (
            _mm256_set1_epi32(8),
            _mm256_set1_epi32(4),
            _mm256_set1_epi32(2),
        );
        let reorder = !is_identity(order);
        let o = order.map(i32::from);
        let order_lo = _mm256_loadu_si256(o.as_ptr().cast());
        let order_hi = _mm256_loadu_si256(o.as_ptr().add(8).cast());
        let code = |v: __m256| -> __m256i {
            let s = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, recip), lo), hi);
            let m8 = _mm256_cmp_ps::<_CMP_LT_OQ>(b7, s);
            let mut idx = _mm256_and_si256(_mm256_castps_si256(m8), k8);
            let c = _mm256_blendv_ps(b3, b11, m8);
            let m4 = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(c, s));
            idx = _mm256_add_epi32(idx, _mm256_and_si256(m4, k4));
            let c = _mm256_permutevar8x32_ps(t2, _mm256_srli_epi32::<2>(idx));
            let m2 = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(c, s));
            idx = _mm256_add_epi32(idx, _mm256_and_si256(m2, k2));
            let c = _mm256_permutevar8x32_ps(t1, _mm256_srli_epi32::<1>(idx));
            let m1 = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(c, s));
            idx = _mm256_sub_epi32(idx, m1);
            if reorder {
                let upper = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7));
                _mm256_blendv_epi8(
                    _mm256_permutevar8x32_epi32(order_lo, idx),
                    _mm256_permutevar8x32_epi32(order_hi, idx),
                    upper,
                )
            } else {
                idx
            }
        };
        // Byte 0 of each 32-bit lane to the low 4 bytes of its 128-bit half.
        let pick = _mm256_setr_epi8(
            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1,
            -1, -1, -1, -1, -1, -1, -1, -1, -1,
        );
        for g in 0..groups {
            let c0 = code(_mm256_loadu_ps(src.add(g * 16)));
            let c1 = code(_mm256_loadu_ps(src.add(g * 16 + 8)));
            // Low 32 bits of each 64-bit lane: byte = even << 4 | odd (B0..B3, then B4..B7).
            let p0 = _mm256_or_si256(_mm256_slli_epi64::<4>(c0), _mm256_srli_epi64::<32>(c0));
            let p1 = _mm256_or_si256(_mm256_slli_epi64::<4>(c1), _mm256_srli_epi64::<32>(c1));
            // Halves: [B0 B1 B4 B5 | B2 B3 B6 B7] as 32-bit lanes, then as bytes.
            let q = _mm256_castps_si256(_mm256_shuffle_ps::<0b10_00_10_00>(
                _mm256_castsi256_ps(p0),
                _mm256_castsi256_ps(p1),
            ));
            let q = _mm256_shuffle_epi8(q, pick);
            let bytes =
                _mm_unpacklo_epi16(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            _mm_storel_epi64(dst.add(g * 8).cast(), bytes);
        }
        Some(max)
    }
}

/// `torch.mean` of a float32 vector on CPU, reproduced operation by operation: torch's cascade
/// sum (`SumKernel.cpp`: 8-lane vectors, 4 interleaved accumulators, 4 cascade levels, tail
/// added first), then one f32 division. Exact for up to 32768 values, where torch reduces on one
/// thread; beyond that torch splits the sum per thread, so its last bit depends on the thread
/// count and no single answer exists.
pub fn torch_mean_f32(values: &[f32]) -> f32 {
    torch_sum_f32(values) / values.len() as f32
}

/// The float32 sum of `torch.sum` on CPU for a contiguous vector (see [`torch_mean_f32`]).
pub fn torch_sum_f32(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    let n = values.len();
    if n < LANES {
        let items: Vec<[f32; 1]> = values.iter().map(|&v| [v]).collect();
        return row_sum(&items)[0];
    }
    let vectors = n / LANES;
    let items: Vec<[f32; LANES]> = values[..vectors * LANES]
        .chunks_exact(LANES)
        .map(|c| std::array::from_fn(|l| c[l]))
        .collect();
    let lanes = row_sum(&items);
    let mut total = 0.0f32;
    for &v in &values[vectors * LANES..] {
        total += v;
    }
    for l in lanes {
        total += l;
    }
    total
}

fn add<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// torch's `row_sum`: the items as a `(-1, 4)` array summed by `multi_row_sum`, the leftover
/// items into accumulator 0, then accumulators 1..4 into 0.
fn row_sum<const W: usize>(items: &[[f32; W]]) -> [f32; W] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let size = items.len() / ILP;
    let ceil_log2 = if size <= 1 {
        0
    } else {
        usize::BITS - (size - 1).leading_zeros()
    } as usize;
    let level_power = 4.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; W]; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (a, item) in acc[0].iter_mut().zip(&items[i * ILP..(i + 1) * ILP]) {
                add(a, item);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (u, l) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add(u, l);
                *l = [0.0; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (a, item) in acc[0].iter_mut().zip(&items[i * ILP..(i + 1) * ILP]) {
            add(a, item);
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let (first, rest) = acc.split_at_mut(1);
        for (a, u) in first[0].iter_mut().zip(&rest[j - 1]) {
            add(a, u);
        }
    }
    let mut partial = acc[0];
    for item in &items[size * ILP..] {
        add(&mut partial[0], item);
    }
    let mut out = partial[0];
    for p in &partial[1..] {
        add(&mut out, p);
    }
    out
}

fn double_quantize(tensor: &str, absmax: &[f32]) -> Result<NestedAbsMax> {
    let offset = torch_mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let q = quantize_blockwise(tensor, &centered, NESTED_BLOCKSIZE)?;
    Ok(NestedAbsMax {
        quantized: q.quantized,
        absmax: q.absmax,
        offset,
        blocksize: NESTED_BLOCKSIZE,
        code: DYNAMIC_MAP.to_vec(),
    })
}

/// Dequantizes packed 4-bit codes into `out`, where `out[0]` is element `start` of the tensor.
/// `start` must be even (byte-aligned).
pub fn dequantize_4bit_into(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    quant_type: QuantType,
    start: usize,
    out: &mut [f32],
) {
    dequantize_4bit_with(
        packed,
        absmax,
        blocksize,
        quant_type.code(),
        start,
        out,
        SimdLevel::current(),
    );
}

/// The 16 code values of 8 packed bytes at `bytes` (high nibble first), looked up in the
/// 16-entry code `lut` with one permute.
///
/// # Safety
/// AVX-512F must be available and `bytes` must point to 8 readable bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn decode16_avx512(
    bytes: *const u8,
    lut: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees 8 readable bytes.
    let raw = unsafe { _mm_loadl_epi64(bytes.cast()) };
    let mask = _mm_set1_epi8(0x0f);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), mask);
    let lo = _mm_and_si128(raw, mask);
    _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), lut)
}

/// The 16-entry code split for AVX2 lookups: entries 0..8 and 8..16, one register each.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct CodeAvx2 {
    lo: std::arch::x86_64::__m256,
    hi: std::arch::x86_64::__m256,
}

#[cfg(target_arch = "x86_64")]
impl CodeAvx2 {
    /// Loads `code` into two registers.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn new(code: &[f32; 16]) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: `code` holds 16 floats: two loads of 8.
        unsafe {
            Self {
                lo: _mm256_loadu_ps(code.as_ptr()),
                hi: _mm256_loadu_ps(code.as_ptr().add(8)),
            }
        }
    }
}

/// The 8 code values of the 4 packed bytes at `bytes` (high nibble first) with AVX2: the 32 bits
/// broadcast to every lane, each lane shifts its own nibble down (an 8-entry permute reads only
/// the low 3 bits, so no mask) and the nibble's bit 3 up to the sign, which picks the lower or
/// upper half of the code with one blend. No cross-lane unpacking: one load, two shifts, two
/// permutes and one blend per 8 values.
///
/// # Safety
/// AVX2 must be available and `bytes` must point to 4 readable bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn decode8_avx2(bytes: *const u8, code: CodeAvx2) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees 4 readable bytes.
    let word = unsafe { bytes.cast::<i32>().read_unaligned() };
    let b = _mm256_set1_epi32(word);
    // Value j is the high (j even) or low nibble of byte j / 2: bits 8·(j/2) + 4·(1 - j%2).
    let index = _mm256_srlv_epi32(b, _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24));
    let upper = _mm256_sllv_epi32(b, _mm256_setr_epi32(24, 28, 16, 20, 8, 12, 0, 4));
    _mm256_blendv_ps(
        _mm256_permutevar8x32_ps(code.lo, index),
        _mm256_permutevar8x32_ps(code.hi, index),
        _mm256_castsi256_ps(upper),
    )
}

/// The first block and the block count of a whole-block SIMD dequantize of `len` values from
/// `start`; panics unless every access the kernels make lies in `packed`, `absmax` and the output.
#[cfg(target_arch = "x86_64")]
fn whole_blocks(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    start: usize,
    len: usize,
) -> (usize, usize) {
    let (first, blocks) = (start / blocksize, len / blocksize);
    assert!(
        start.is_multiple_of(blocksize)
            && len.is_multiple_of(blocksize)
            && blocksize.is_multiple_of(16)
            && packed.len() * 2 >= start + len
            && absmax.len() >= first + blocks
    );
    (first, blocks)
}

/// Dequantizes whole blocks with AVX2: per 8 values one 4-byte broadcast, the lookup of
/// [`decode8_avx2`], one multiply by the block's absmax and one store.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_blocks_avx2(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    start: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (first, blocks) = whole_blocks(packed, absmax, blocksize, start, out.len());
    // SAFETY: `whole_blocks` bounds every access: bytes (start + 8·i)/2 .. +4 lie in `packed`,
    // floats 8·i .. +8 in `out`, block indices in `absmax`; avx2 is enabled here.
    unsafe {
        let lut = CodeAvx2::new(code);
        let bytes = packed.as_ptr().add(start / 2);
        let dst = out.as_mut_ptr();
        for b in 0..blocks {
            let scale = _mm256_set1_ps(*absmax.get_unchecked(first + b));
            let base = b * blocksize;
            for i in (0..blocksize).step_by(16) {
                let w0 = decode8_avx2(bytes.add((base + i) / 2), lut);
                let w1 = decode8_avx2(bytes.add((base + i) / 2 + 4), lut);
                _mm256_storeu_ps(dst.add(base + i), _mm256_mul_ps(w0, scale));
                _mm256_storeu_ps(dst.add(base + i + 8), _mm256_mul_ps(w1, scale));
            }
        }
    }
}

/// Dequantizes whole blocks with AVX-512: per 16 values one 8-byte load, one permute through the
/// 16-entry code, one multiply by the block's absmax and one store.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequantize_blocks_avx512(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    start: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (first, blocks) = whole_blocks(packed, absmax, blocksize, start, out.len());
    // SAFETY: `whole_blocks` bounds every access: bytes (start + 16·i)/2 .. +8 lie in `packed`,
    // floats 16·i .. +16 in `out`, block indices in `absmax`.
    unsafe {
        let lut = _mm512_loadu_ps(code.as_ptr());
        let bytes = packed.as_ptr().add(start / 2);
        for b in 0..blocks {
            let scale = _mm512_set1_ps(*absmax.get_unchecked(first + b));
            let base = b * blocksize;
            for i in (0..blocksize).step_by(16) {
                let w = _mm512_mul_ps(decode16_avx512(bytes.add((base + i) / 2), lut), scale);
                _mm512_storeu_ps(out.as_mut_ptr().add(base + i), w);
            }
        }
    }
}

/// Dequantizes with the kernels of `level` (lowered to what the CPU has): whole blocks from a
/// block start through SIMD, the rest (and any other start) through the portable loop.
pub(crate) fn dequantize_4bit_with(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    start: usize,
    out: &mut [f32],
    level: SimdLevel,
) {
    debug_assert!(start.is_multiple_of(2));
    let level = level.best_up_to();
    #[cfg(target_arch = "x86_64")]
    if level != SimdLevel::Portable
        && start.is_multiple_of(blocksize)
        && blocksize.is_multiple_of(16)
    {
        let whole = out.len() - out.len() % blocksize;
        let (head, tail) = out.split_at_mut(whole);
        if level == SimdLevel::Avx512 {
            // SAFETY: `level` is available, so avx512f is; `head` is whole blocks from a block
            // start.
            unsafe { dequantize_blocks_avx512(packed, absmax, blocksize, code, start, head) };
        } else {
            // SAFETY: as above, with avx2 and fma.
            unsafe { dequantize_blocks_avx2(packed, absmax, blocksize, code, start, head) };
        }
        if tail.is_empty() {
            return;
        }
        return dequantize_4bit_scalar(packed, absmax, blocksize, code, start + whole, tail);
    }
    let _ = level;
    dequantize_4bit_scalar(packed, absmax, blocksize, code, start, out);
}

/// The portable dequantizer (any start, any block size).
fn dequantize_4bit_scalar(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    start: usize,
    out: &mut [f32],
) {
    let lut: [[f32; 2]; 256] = std::array::from_fn(|b| [code[b >> 4], code[b & 0x0f]]);
    let mut e = start;
    let end = start + out.len();
    let mut pos = 0;
    while e < end {
        let block = e / blocksize;
        let seg_end = ((block + 1) * blocksize).min(end);
        let scale = absmax[block];
        let bytes = &packed[e / 2..seg_end.div_ceil(2)];
        let dst = &mut out[pos..pos + (seg_end - e)];
        let (pairs, rest) = dst.as_chunks_mut::<2>();
        for (pair, &b) in pairs.iter_mut().zip(bytes) {
            let v = lut[b as usize];
            pair[0] = v[0] * scale;
            pair[1] = v[1] * scale;
        }
        if let [last] = rest {
            *last = lut[bytes[pairs.len()] as usize][0] * scale;
        }
        pos += seg_end - e;
        e = seg_end;
    }
}

/// A tensor quantized blockwise to 8 bits on the dynamic map (bnb `quantize_blockwise`).
#[derive(Debug, Clone, PartialEq)]
pub struct Blockwise8bit {
    /// One code per value.
    pub quantized: Vec<u8>,
    /// f32 absmax per block.
    pub absmax: Vec<f32>,
    /// Elements per block.
    pub blocksize: usize,
}

impl Blockwise8bit {
    /// Dequantizes with the dynamic map.
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_blockwise_with(&self.quantized, &self.absmax, &DYNAMIC_MAP, self.blocksize)
    }
}

/// Entries of bnb's quantization lookup table over [-1, 1].
const LUT_SIZE: usize = 65536;

/// bnb 0.50.2's CPU 8-bit quantizer does not search the code: it maps the normalised value to
/// one of 65536 evenly spaced bins and reads the code index the bin was assigned (nearest code
/// to the bin's value, by f32 midpoints). Reproduced exactly, bins included.
fn dynamic_lut() -> &'static [u8; LUT_SIZE] {
    static LUT: std::sync::OnceLock<Box<[u8; LUT_SIZE]>> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let code = &DYNAMIC_MAP;
        let mids: [f32; 255] = std::array::from_fn(|i| 0.5f32 * (code[i] + code[i + 1]));
        let mut lut = Box::new([0u8; LUT_SIZE]);
        let mut idx = 0usize;
        for (i, entry) in lut.iter_mut().enumerate() {
            let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            while idx < 255 && mids[idx] < val {
                idx += 1;
            }
            *entry = idx as u8;
        }
        lut
    })
}

/// The bin of a normalised value: `((v + 1) * 0.5) * 65535 + 0.5`, truncated, in f32.
#[inline]
fn lut_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    ((v + 1.0f32) * 0.5f32 * (LUT_SIZE - 1) as f32 + 0.5f32) as u16 as usize
}

/// Quantizes `data` blockwise to 8 bits on the dynamic map exactly like bnb 0.50.2's CPU kernel
/// (`x * (1 / absmax)`, then its 65536-bin lookup table; an all-zero block stores code 0).
pub fn quantize_blockwise(tensor: &str, data: &[f32], blocksize: usize) -> Result<Blockwise8bit> {
    check_8bit_blocksize(blocksize)?;
    check_finite(tensor, data)?;
    let lut = dynamic_lut();
    let mut quantized = vec![0u8; data.len()];
    let mut absmax = vec![0.0f32; data.len().div_ceil(blocksize)];
    quantized
        .par_chunks_mut(blocksize)
        .zip(absmax.par_iter_mut())
        .zip(data.par_chunks(blocksize))
        .for_each(|((out, am), block)| {
            let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            *am = max;
            if max == 0.0 {
                out.fill(0);
                return;
            }
            let inv = 1.0f32 / max;
            for (o, &v) in out.iter_mut().zip(block) {
                *o = lut[lut_index(v * inv)];
            }
        });
    Ok(Blockwise8bit {
        quantized,
        absmax,
        blocksize,
    })
}

/// `code[q] * absmax[block]` for every value.
pub fn dequantize_blockwise_with(
    quantized: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; quantized.len()];
    out.par_chunks_mut(blocksize)
        .zip(quantized.par_chunks(blocksize))
        .zip(absmax.par_iter())
        .for_each(|((o, q), &scale)| {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = code[q as usize] * scale;
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random values in ±0.15 (xorshift, no RNG dependency).
    fn values(state: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                ((*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.3
            })
            .collect()
    }

    /// The SIMD levels this CPU has besides the portable reference.
    fn simd_levels() -> Vec<SimdLevel> {
        let levels: Vec<SimdLevel> = [SimdLevel::Avx512, SimdLevel::Avx2]
            .into_iter()
            .filter(|l| l.is_available())
            .collect();
        if levels.is_empty() {
            eprintln!("no SIMD level on this CPU: nothing to compare");
        }
        levels
    }

    /// Every SIMD block kernel against the portable one, on values that include every midpoint
    /// exactly (bucketize ties), ±1 after scaling, zeros and a zero block; a NaN is reported.
    #[test]
    fn simd_blocks_equal_the_portable_ones() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for level in simd_levels() {
            for quant_type in [QuantType::Nf4, QuantType::Fp4] {
                let (bounds, order) = midpoints(quant_type);
                for blocksize in VALID_4BIT_BLOCKSIZES {
                    for case in 0..6 {
                        let mut block = values(&mut state, blocksize);
                        match case {
                            0 => {}
                            1 => {
                                // absmax 1: the midpoints themselves appear.
                                block[0] = 1.0;
                                for (v, b) in block[1..].iter_mut().zip(bounds.iter().cycle()) {
                                    *v = *b;
                                }
                            }
                            2 => block.fill(0.0),
                            3 => block.iter_mut().step_by(3).for_each(|v| *v = -*v * 7.0),
                            4 => block.iter_mut().step_by(5).for_each(|v| *v = 0.0),
                            _ => block[blocksize / 2] = -2.5,
                        }
                        let what = format!("{level} {quant_type} {blocksize} case {case}");
                        let mut want = vec![0u8; blocksize / 2];
                        let mut want_am = 0.0f32;
                        assert!(quantize_block_portable(
                            &block,
                            &mut want,
                            &mut want_am,
                            true,
                            &bounds,
                            &order
                        ));
                        let mut got = vec![0u8; blocksize / 2];
                        let mut am = f32::NAN;
                        let (b, o) = (&bounds, &order);
                        assert!(quantize_block(
                            level, &block, &mut got, &mut am, blocksize, b, o
                        ));
                        assert_eq!(am.to_bits(), want_am.to_bits(), "{what}");
                        assert_eq!(got, want, "{what}");
                        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                            block[1] = bad;
                            assert!(!quantize_block(
                                level, &block, &mut got, &mut am, blocksize, b, o
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Edge values for a tensor: zeros, ±absmax, every midpoint times the absmax (ties after
    /// scaling when the absmax is a power of two), code values times the absmax.
    fn edge_tensor(state: &mut u64, n: usize, blocksize: usize, quant_type: QuantType) -> Vec<f32> {
        let (bounds, _) = midpoints(quant_type);
        let code = quant_type.code();
        let mut data = values(state, n);
        for (b, block) in data.chunks_mut(blocksize).enumerate() {
            let scale = [1.0f32, 0.5, 0.25, 3.0, 0.1][b % 5];
            match b % 4 {
                0 => {
                    for (i, v) in block.iter_mut().enumerate() {
                        *v = match i % 4 {
                            0 => bounds[(i / 4) % 15] * scale,
                            1 => -bounds[(i / 4 + 7) % 15] * scale,
                            2 => code[i % 16] * scale,
                            _ => 0.0,
                        };
                    }
                    block[0] = scale;
                    if block.len() > 1 {
                        block[block.len() - 1] = -scale;
                    }
                }
                1 => block.fill(0.0),
                2 => {
                    block.iter_mut().step_by(3).for_each(|v| *v = 0.0);
                    if let Some(v) = block.last_mut() {
                        *v = -0.2;
                    }
                }
                _ => {}
            }
        }
        data
    }

    /// Whole tensors (partial trailing blocks included) through every SIMD level: the same
    /// bytes and absmax as the portable path, for every block size, NF4 and FP4.
    #[test]
    fn simd_quantize_4bit_equals_portable() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let levels = simd_levels();
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for blocksize in VALID_4BIT_BLOCKSIZES {
                for n in [
                    1,
                    7,
                    blocksize - 1,
                    blocksize,
                    blocksize + 1,
                    3 * blocksize + 17,
                    8 * blocksize,
                    (1 << 16) + blocksize + 2,
                ] {
                    let data = edge_tensor(&mut state, n, blocksize, quant_type);
                    let run = |level| {
                        let mut packed = vec![0u8; n.div_ceil(2)];
                        let mut absmax = vec![0.0f32; n.div_ceil(blocksize)];
                        let args = (blocksize, quant_type, level);
                        assert!(quantize_4bit_codes(
                            &data,
                            args.0,
                            args.1,
                            args.2,
                            &mut packed,
                            &mut absmax
                        ));
                        (
                            packed,
                            absmax.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                        )
                    };
                    let want = run(SimdLevel::Portable);
                    for &level in &levels {
                        let got = run(level);
                        let what = format!("{level} {quant_type} blocksize {blocksize} n {n}");
                        assert_eq!(got.1, want.1, "absmax, {what}");
                        assert_eq!(got.0, want.0, "codes, {what}");
                    }
                }
            }
        }
    }

    /// Dequantization through every SIMD level equals the portable loop bit for bit: whole
    /// tensors, ranges starting on and off block boundaries, partial trailing blocks.
    #[test]
    fn simd_dequantize_equals_portable() {
        let mut state = 0x1234_5678_9abc_def1u64;
        let levels = simd_levels();
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            let code = quant_type.code();
            for blocksize in VALID_4BIT_BLOCKSIZES {
                let n = 5 * blocksize + 37;
                let data = edge_tensor(&mut state, n, blocksize, quant_type);
                let q = quantize_4bit("t", &data, &[n], blocksize, quant_type, false).unwrap();
                let absmax = q.absmax.to_f32();
                for (start, len) in [
                    (0, n),
                    (0, 2 * blocksize),
                    (blocksize, 3 * blocksize + 5),
                    (2 * blocksize, n - 2 * blocksize),
                    (2, blocksize),
                    (blocksize + 16, 2 * blocksize + 1),
                ] {
                    let run = |level| {
                        let mut out = vec![f32::NAN; len];
                        dequantize_4bit_with(
                            &q.packed, &absmax, blocksize, code, start, &mut out, level,
                        );
                        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    };
                    let want = run(SimdLevel::Portable);
                    for &level in &levels {
                        assert_eq!(
                            run(level),
                            want,
                            "{level} {quant_type} blocksize {blocksize} [{start}, +{len})"
                        );
                    }
                }
            }
        }
    }
}
