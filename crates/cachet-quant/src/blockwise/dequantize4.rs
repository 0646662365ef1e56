//! 4-bit dequantization kernels: packed codes to f32, portable, AVX2 and AVX-512, and the
//! SIMD code decoders the host gemv shares.

use crate::codes::QuantType;
use crate::simd::SimdLevel;

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
