//! 4-bit quantization kernels: codes and absmax per block, portable, AVX2 and AVX-512,
//! bit-identical to each other and to bnb.

use rayon::prelude::*;

use crate::codes::{QuantType, midpoints};
use crate::simd::SimdLevel;

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
pub(super) fn quantize_block(
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
pub(super) fn quantize_block_portable(
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
