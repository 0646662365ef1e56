//! Host 4-bit matmul kernels: the fused dequantize-and-multiply gemv and the tiled batched path.
//!
//! Batch-1 decode runs a fused gemv (rayon over output rows, a byte→pair lookup table feeding an
//! 8-lane accumulator, or AVX2 / AVX-512 decoders) that never materialises the f32 weight;
//! larger batches dequantize tiles of rows and reuse each tile for every input row.

use cachet_tensor::kernels::matmul_t_tile;
use rayon::prelude::*;

use crate::blockwise::{AbsMax, Quantized4bit, dequantize_4bit_into};
use crate::simd::SimdLevel;

#[cfg(target_arch = "x86_64")]
mod vbmi;
#[cfg(target_arch = "x86_64")]
use vbmi::{NestedScales, gemv_vbmi, vbmi_rows_apply};

/// Output rows per rayon task of the batch-1 gemv.
const ROWS_PER_TASK: usize = 16;

/// Output rows per tile of the batched path.
const TILE_ROWS: usize = 16;

/// Input rows from which [`matmul_4bit_tiled`] multiplies each dequantized tile with the
/// blocked gemm instead of dot products.
const GEMM_MIN_ROWS: usize = 16;

/// Output rows dequantized per task on the gemm path: the f32 tile (`GEMM_TILE_ROWS × in`)
/// stays in L2 while every input row meets it.
const GEMM_TILE_ROWS: usize = 64;

/// Dot product (`x · w` rows of the batched path) with the kernels of the current
/// [`SimdLevel`].
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(SimdLevel::current(), a, b)
}

/// [`dot`] with the kernels of `level` (lowered to what the CPU has).
fn dot_with(level: SimdLevel, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    match level.best_up_to() {
        // SAFETY: the level is available, so avx512f is; both slices hold `n` values.
        SimdLevel::Avx512 => return unsafe { dot_avx512(a, b) },
        // SAFETY: the level is available, so avx2 and fma are.
        SimdLevel::Avx2 => return unsafe { dot_avx2(a, b) },
        SimdLevel::Portable => {}
    }
    let _ = level;
    dot_portable(a, b)
}

/// Dot product with 8 independent lanes (auto-vectorised).
#[inline]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
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

/// Horizontal sum of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum_avx2(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Dot product of equal-length slices with AVX2+FMA (four 8-lane accumulators).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    assert_eq!(a.len(), b.len());
    let n = a.len() / 32;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: every load reads 8 floats at offsets below 32·n ≤ len in both slices.
    let mut sum = unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        for i in 0..n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i * 32 + j * 8;
                *acc =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
            }
        }
        hsum_avx2(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    };
    for (x, y) in a[n * 32..].iter().zip(&b[n * 32..]) {
        sum += x * y;
    }
    sum
}

/// Dot product of equal-length slices with AVX-512 (two 16-lane accumulators).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    assert_eq!(a.len(), b.len());
    let n = a.len() / 32;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: every load reads 16 floats at offsets below 32·n ≤ len in both slices.
    let mut sum = unsafe {
        let mut acc = [_mm512_setzero_ps(); 2];
        for i in 0..n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i * 32 + j * 16;
                *acc =
                    _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(o)), _mm512_loadu_ps(pb.add(o)), *acc);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    };
    for (x, y) in a[n * 32..].iter().zip(&b[n * 32..]) {
        sum += x * y;
    }
    sum
}

/// `Σ_j code[nibble_j] · x_j` over packed bytes (high nibble first) with AVX-512: 8 bytes
/// become 16 indices, looked up in the 16-entry code with one permute, then one FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_codes_avx512(bytes: &[u8], x: &[f32], code: &[f32; 16]) -> f32 {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), bytes.len() * 2);
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

/// `Σ_j code[nibble_j] · x_j` over packed bytes (high nibble first) with AVX2+FMA: 4 bytes give
/// 8 code values ([`decode8_avx2`](crate::blockwise::decode8_avx2)), then one FMA; two
/// accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_codes_avx2(bytes: &[u8], x: &[f32], code: &[f32; 16]) -> f32 {
    use crate::blockwise::{CodeAvx2, decode8_avx2};
    use std::arch::x86_64::*;
    assert_eq!(x.len(), bytes.len() * 2);
    let n = bytes.len() / 8;
    // SAFETY: every load reads within `bytes` (4 bytes at 8i and 8i + 4, 8i + 8 ≤ len) and `x`
    // (8 floats at 16i and 16i + 8).
    let mut sum = unsafe {
        let lut = CodeAvx2::new(code);
        let (b, xp) = (bytes.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        for i in 0..n {
            let w0 = decode8_avx2(b.add(i * 8), lut);
            let w1 = decode8_avx2(b.add(i * 8 + 4), lut);
            acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(i * 16)), acc[0]);
            acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(i * 16 + 8)), acc[1]);
        }
        hsum_avx2(_mm256_add_ps(acc[0], acc[1]))
    };
    for j in n * 8..bytes.len() {
        let b = bytes[j] as usize;
        sum += code[b >> 4] * x[2 * j] + code[b & 0x0f] * x[2 * j + 1];
    }
    sum
}

/// The first block and the block count of a row span made of whole blocks of `blocksize` (a
/// multiple of `unit`), after checking that its codes, scales and activations are all there:
/// what the SIMD row kernels rely on for their unchecked loads.
///
/// # Panics
/// If the span is not whole blocks or reaches past `packed` or `absmax`.
#[cfg(target_arch = "x86_64")]
fn whole_blocks(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    x: &[f32],
    start: usize,
    unit: usize,
) -> (usize, usize) {
    let first = start / blocksize;
    let blocks = x.len() / blocksize;
    assert!(
        start.is_multiple_of(blocksize)
            && x.len().is_multiple_of(blocksize)
            && blocksize.is_multiple_of(unit)
            && packed.len() * 2 >= start + x.len()
            && absmax.len() >= first + blocks
    );
    (first, blocks)
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
    let (first, blocks) = whole_blocks(packed, absmax, blocksize, x, start, 16);
    // SAFETY: `whole_blocks` bounds every load: bytes (start + 16·i)/2 .. +8 lie in `packed`,
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

/// [`gemv_row_blocks_avx512`] with AVX2+FMA: 32 values (16 bytes) per step through
/// [`decode8_avx2`](crate::blockwise::decode8_avx2) into four 8-lane accumulators (block sizes
/// are multiples of 32), summed and scaled by the block's absmax with one FMA; one reduction per
/// row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_row_blocks_avx2(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    x: &[f32],
    start: usize,
) -> f32 {
    use crate::blockwise::{CodeAvx2, decode8_avx2};
    use std::arch::x86_64::*;
    let (first, blocks) = whole_blocks(packed, absmax, blocksize, x, start, 32);
    // SAFETY: `whole_blocks` bounds every load: bytes (start + 8·i)/2 .. +4 lie in `packed`,
    // floats 8·i .. +8 in `x`, and block indices in `absmax`.
    unsafe {
        let lut = CodeAvx2::new(code);
        let mut row = _mm256_setzero_ps();
        let bytes = packed.as_ptr().add(start / 2);
        let xp = x.as_ptr();
        for b in 0..blocks {
            let mut acc = [_mm256_setzero_ps(); 4];
            let base = b * blocksize;
            for i in (base..base + blocksize).step_by(32) {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let w = decode8_avx2(bytes.add(i / 2 + j * 4), lut);
                    *acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(i + j * 8)), *acc);
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            row = _mm256_fmadd_ps(sum, _mm256_set1_ps(*absmax.get_unchecked(first + b)), row);
        }
        hsum_avx2(row)
    }
}

/// One output of the fused gemv for a row made of whole blocks (`start` and `x.len()` multiples
/// of `blocksize`, itself a multiple of 16) in plain Rust that LLVM auto-vectorises on any
/// target (SSE2, NEON, ...): per 16 values 8 byte→pair lookups assembled into 16 lanes in
/// registers (no round trip through memory) and multiplied into 16 independent lanes against x;
/// each block's lanes scaled by its absmax once, the row reduced once at the end.
fn gemv_row_blocks_portable(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    lut: &[[f32; 2]; 256],
    x: &[f32],
    start: usize,
) -> f32 {
    debug_assert!(start.is_multiple_of(blocksize) && blocksize.is_multiple_of(16));
    let first = start / blocksize;
    let bytes = &packed[start / 2..(start + x.len()) / 2];
    let mut row = [0.0f32; 16];
    for ((xb, bb), &scale) in x
        .chunks_exact(blocksize)
        .zip(bytes.chunks_exact(blocksize / 2))
        .zip(&absmax[first..])
    {
        let mut acc = [0.0f32; 16];
        let (xs, _) = xb.as_chunks::<16>();
        let (bs, _) = bb.as_chunks::<8>();
        for (xc, bc) in xs.iter().zip(bs) {
            let mut w = [0.0f32; 16];
            let q = u64::from_le_bytes(*bc);
            for j in 0..8 {
                let v = lut[((q >> (8 * j)) & 0xff) as usize];
                w[2 * j] = v[0];
                w[2 * j + 1] = v[1];
            }
            for l in 0..16 {
                acc[l] += w[l] * xc[l];
            }
        }
        for l in 0..16 {
            row[l] += acc[l] * scale;
        }
    }
    row.iter().sum()
}

/// One output of the fused 4-bit gemv: `Σ_c W[row, c] · x[c]` for the row starting at flat
/// element `start`, decoding codes on the fly block by block, with the kernels of `level`
/// (lowered to what the CPU has).
#[allow(clippy::too_many_arguments)]
fn gemv_row_4bit_with(
    level: SimdLevel,
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    lut: &[[f32; 2]; 256],
    code: &[f32; 16],
    x: &[f32],
    start: usize,
) -> f32 {
    let level = level.best_up_to();
    if level == SimdLevel::Portable
        && start.is_multiple_of(blocksize)
        && x.len().is_multiple_of(blocksize)
        && blocksize.is_multiple_of(16)
    {
        return gemv_row_blocks_portable(packed, absmax, blocksize, lut, x, start);
    }
    #[cfg(target_arch = "x86_64")]
    if level != SimdLevel::Portable
        && start.is_multiple_of(blocksize)
        && x.len().is_multiple_of(blocksize)
        && blocksize.is_multiple_of(32)
    {
        return if level == SimdLevel::Avx512 {
            // SAFETY: the level is available, so avx512f is; the row is made of whole blocks.
            unsafe { gemv_row_blocks_avx512(packed, absmax, blocksize, code, x, start) }
        } else {
            // SAFETY: the level is available, so avx2 and fma are; the row is whole blocks.
            unsafe { gemv_row_blocks_avx2(packed, absmax, blocksize, code, x, start) }
        };
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
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is available, so avx512f is.
            SimdLevel::Avx512 => partial += unsafe { dot_codes_avx512(bytes, xs, code) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is available, so avx2 and fma are.
            SimdLevel::Avx2 => partial += unsafe { dot_codes_avx2(bytes, xs, code) },
            _ => {
                for (chunk, xc) in bytes.chunks(32).zip(xs.chunks(64)) {
                    for (j, &b) in chunk.iter().enumerate() {
                        let v = lut[b as usize];
                        buf[2 * j] = v[0];
                        buf[2 * j + 1] = v[1];
                    }
                    partial += dot_portable(&buf[..xc.len()], xc);
                }
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

/// Whether the AVX2 gemv should decode through `vpshufb` byte planes
/// ([`gemv_row_blocks_avx2_planes`]) rather than permutes and blends: on cores that run in-lane
/// shuffles on two ports (Intel from Ice Lake on, told apart by AVX-512 or AVX-VNNI; AMD from
/// Zen 3 on). Skylake-family cores have one shuffle port, where the planes are slower.
#[cfg(target_arch = "x86_64")]
fn avx2_planes_preferred() -> bool {
    static PREFERRED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PREFERRED.get_or_init(|| {
        if std::arch::is_x86_feature_detected!("avx512f")
            || std::arch::is_x86_feature_detected!("avxvnni")
        {
            return true;
        }
        let vendor = std::arch::x86_64::__cpuid(0);
        let amd = (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
        let signature = std::arch::x86_64::__cpuid(1).eax;
        let family = ((signature >> 8) & 0xf) + ((signature >> 20) & 0xff);
        amd && family >= 0x19
    })
}

/// The code's four byte planes for `vpshufb`: plane p holds byte p of each of the 16 entries, in
/// both 128-bit halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn code_planes_avx2(code: &[f32; 16]) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    std::array::from_fn(|p| {
        let bytes: [u8; 16] = std::array::from_fn(|c| (code[c].to_bits() >> (8 * p)) as u8);
        // SAFETY: `bytes` holds 16 bytes.
        _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) })
    })
}

/// `x` reordered for [`gemv_row_blocks_avx2_planes`]: in each group of 32 values, 8-lane vector
/// `j` holds `x[4j..4j + 4]` then `x[16 + 4j..16 + 4j + 4]`, the order the planes decode in.
/// `x.len()` must be a multiple of 32.
#[cfg(target_arch = "x86_64")]
fn permute_x_for_planes(x: &[f32]) -> Vec<f32> {
    debug_assert!(x.len().is_multiple_of(32));
    let mut out = Vec::with_capacity(x.len());
    for group in x.chunks_exact(32) {
        for j in 0..4 {
            out.extend_from_slice(&group[4 * j..4 * j + 4]);
            out.extend_from_slice(&group[16 + 4 * j..16 + 4 * j + 4]);
        }
    }
    out
}

/// [`gemv_row_blocks_avx2`] decoding through byte planes: per 32 weights (16 bytes, broadcast to
/// both halves) the nibbles are interleaved in-lane into 32 indices, four `vpshufb` look up the
/// four bytes of each code value and two rounds of in-lane unpacks assemble the floats, in the
/// order of [`permute_x_for_planes`] (`xp`); four FMAs. Only in-lane shuffles, which recent
/// cores run on two ports, instead of `vpermd` and the multi-µop `vblendvps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_row_blocks_avx2_planes(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    planes: &[std::arch::x86_64::__m256i; 4],
    xp: &[f32],
    start: usize,
) -> f32 {
    use std::arch::x86_64::*;
    let first = start / blocksize;
    let blocks = xp.len() / blocksize;
    assert!(
        start.is_multiple_of(blocksize)
            && xp.len().is_multiple_of(blocksize)
            && blocksize.is_multiple_of(32)
            && packed.len() * 2 >= start + xp.len()
            && absmax.len() >= first + blocks
    );
    // SAFETY: `whole_blocks` bounds every load: bytes (start + 32·i)/2 .. +16 lie in `packed`,
    // floats 8·i .. +8 in `xp`, and block indices in `absmax`.
    unsafe {
        let nibble = _mm256_set1_epi8(0x0f);
        let mut row = _mm256_setzero_ps();
        let bytes = packed.as_ptr().add(start / 2);
        let x = xp.as_ptr();
        for b in 0..blocks {
            let mut acc = [_mm256_setzero_ps(); 4];
            let base = b * blocksize;
            for i in (base..base + blocksize).step_by(32) {
                let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(bytes.add(i / 2).cast()));
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble);
                let lo = _mm256_and_si256(raw, nibble);
                // Low half: values 0..16 (bytes 0..8); high half: values 16..32.
                let idx = _mm256_blend_epi32::<0xf0>(
                    _mm256_unpacklo_epi8(hi, lo),
                    _mm256_unpackhi_epi8(hi, lo),
                );
                let p0 = _mm256_shuffle_epi8(planes[0], idx);
                let p1 = _mm256_shuffle_epi8(planes[1], idx);
                let p2 = _mm256_shuffle_epi8(planes[2], idx);
                let p3 = _mm256_shuffle_epi8(planes[3], idx);
                let (b01l, b01h) = (_mm256_unpacklo_epi8(p0, p1), _mm256_unpackhi_epi8(p0, p1));
                let (b23l, b23h) = (_mm256_unpacklo_epi8(p2, p3), _mm256_unpackhi_epi8(p2, p3));
                let w = [
                    _mm256_unpacklo_epi16(b01l, b23l),
                    _mm256_unpackhi_epi16(b01l, b23l),
                    _mm256_unpacklo_epi16(b01h, b23h),
                    _mm256_unpackhi_epi16(b01h, b23h),
                ];
                for (j, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(i + 8 * j));
                    *acc = _mm256_fmadd_ps(_mm256_castsi256_ps(w[j]), xv, *acc);
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            row = _mm256_fmadd_ps(sum, _mm256_set1_ps(*absmax.get_unchecked(first + b)), row);
        }
        hsum_avx2(row)
    }
}

/// The fused 4-bit gemv for one input row: `out[o] = Σ_c W[o, c] · x[c]` for every output
/// row `o` (rayon over rows), with the kernels of the current [`SimdLevel`]. Nested statistics
/// are read in place where the kernel can (AVX512-VBMI), else dequantized first.
pub(crate) fn gemv_4bit(
    packed: &[u8],
    absmax: &AbsMax,
    blocksize: usize,
    code: &[f32; 16],
    x: &[f32],
    out: &mut [f32],
) {
    let level = SimdLevel::current();
    #[cfg(target_arch = "x86_64")]
    if let AbsMax::Nested(nested) = absmax
        && vbmi_rows_apply(level, blocksize, x.len())
        && let Some(scales) = NestedScales::new(nested)
    {
        gemv_vbmi(packed, &scales, blocksize, code, x, out);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let planes = avx2_planes_preferred();
    #[cfg(not(target_arch = "x86_64"))]
    let planes = false;
    gemv_4bit_with(
        level,
        planes,
        packed,
        &absmax.to_f32(),
        blocksize,
        code,
        x,
        out,
    );
}

/// [`gemv_4bit`] with the kernels of `level` (lowered to what the CPU has); `planes` picks the
/// byte-plane AVX2 kernel where it applies (rows of whole blocks).
#[allow(clippy::too_many_arguments)]
fn gemv_4bit_with(
    level: SimdLevel,
    planes: bool,
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    x: &[f32],
    out: &mut [f32],
) {
    let level = level.best_up_to();
    let k = x.len();
    #[cfg(target_arch = "x86_64")]
    if vbmi_rows_apply(level, blocksize, k) {
        gemv_vbmi(packed, absmax, blocksize, code, x, out);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if planes
        && level == SimdLevel::Avx2
        && k.is_multiple_of(blocksize)
        && blocksize.is_multiple_of(32)
    {
        let xp = permute_x_for_planes(x);
        // SAFETY: the level is available, so avx2 and fma are.
        let planes = unsafe { code_planes_avx2(code) };
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(t, ys)| {
                for (i, y) in ys.iter_mut().enumerate() {
                    let o = t * ROWS_PER_TASK + i;
                    // SAFETY: as above; the row starts on a block (k is whole blocks).
                    *y = unsafe {
                        gemv_row_blocks_avx2_planes(packed, absmax, blocksize, &planes, &xp, o * k)
                    };
                }
            });
        return;
    }
    let _ = planes;
    let lut: [[f32; 2]; 256] = std::array::from_fn(|b| [code[b >> 4], code[b & 0x0f]]);
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(t, ys)| {
            for (i, y) in ys.iter_mut().enumerate() {
                let o = t * ROWS_PER_TASK + i;
                *y = gemv_row_4bit_with(level, packed, absmax, blocksize, &lut, code, x, o * k);
            }
        });
}

/// `out[r·n + o] = Σ_c W[o, c] · x[r·k + c]` for `rows` input rows (`out` holds `rows · n`
/// values): tiles of [`TILE_ROWS`] output rows are dequantized once (rayon over tiles) and
/// reused for every input row. `absmax` is the weight's f32 absmax.
pub(crate) fn matmul_4bit_tiled(
    weight: &Quantized4bit,
    absmax: &[f32],
    x: &[f32],
    rows: usize,
    out: &mut [f32],
) {
    let (n, k) = (weight.shape[0], weight.shape[1]);
    // Many input rows: bigger tiles through the blocked gemm (a prompt reuses each dequantized
    // weight hundreds of times); a few rows: small tiles of dot products.
    let blocked = rows >= GEMM_MIN_ROWS;
    let tile_rows = if blocked { GEMM_TILE_ROWS } else { TILE_ROWS };
    let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(tile_rows))
        .into_par_iter()
        .map(|t| {
            let r0 = t * tile_rows;
            let r1 = (r0 + tile_rows).min(n);
            // Dequantize rows r0..r1 (from an even element, for the byte alignment).
            let start = r0 * k;
            let aligned = start & !1;
            let mut w = vec![0.0f32; (r1 * k) - aligned];
            dequantize_4bit_into(
                &weight.packed,
                absmax,
                weight.blocksize,
                weight.quant_type,
                aligned,
                &mut w,
            );
            let w = &w[start - aligned..];
            let mut part = vec![0.0f32; rows * (r1 - r0)];
            if blocked {
                matmul_t_tile(x, rows, &w[..(r1 - r0) * k], r1 - r0, k, &mut part);
            } else {
                for (r, xr) in x.chunks(k).enumerate() {
                    for (j, wr) in w.chunks(k).enumerate() {
                        part[r * (r1 - r0) + j] = dot(xr, wr);
                    }
                }
            }
            (r0, part)
        })
        .collect();
    for (r0, part) in tiles {
        let width = part.len() / rows;
        for r in 0..rows {
            out[r * n + r0..r * n + r0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::{VALID_4BIT_BLOCKSIZES, quantize_4bit};
    use crate::codes::QuantType;

    fn values(state: &mut u64, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                ((*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    #[test]
    fn tiled_4bit_matmul_equals_the_dequantized_product_with_dots_and_with_the_gemm() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        // An odd output width (a partial tile on both paths) and rows on both sides of the
        // gemm threshold.
        let (n, k) = (GEMM_TILE_ROWS + TILE_ROWS + 3, 128);
        let w = values(&mut state, n * k, 2.0);
        let q = quantize_4bit("w", &w, &[n, k], 64, QuantType::Nf4, false).unwrap();
        let absmax = q.absmax.to_f32();
        let dense = q.dequantize();
        for rows in [2, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 37] {
            let x = values(&mut state, rows * k, 1.0);
            let mut out = vec![f32::NAN; rows * n];
            matmul_4bit_tiled(&q, &absmax, &x, rows, &mut out);
            for r in 0..rows {
                for o in 0..n {
                    let (xr, wr) = (&x[r * k..(r + 1) * k], &dense[o * k..(o + 1) * k]);
                    let exact: f64 = xr.iter().zip(wr).map(|(a, b)| f64::from(a * b)).sum();
                    let scale: f32 = xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum();
                    let got = f64::from(out[r * n + o]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * f64::from(scale.max(1e-6)),
                        "rows {rows}, out {o}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    fn simd_levels() -> Vec<SimdLevel> {
        [SimdLevel::Avx512, SimdLevel::Avx2]
            .into_iter()
            .filter(|l| l.is_available())
            .collect()
    }

    /// The largest |got − want| / Σ|w·x| over all rows (the scale the rounding of a sum of
    /// products is measured against: relative to `want` itself a row summing to ~0 would have
    /// no bound), `got` from `level` (with or without the byte-plane AVX2 kernel).
    fn gemv_rel_err(level: SimdLevel, planes: bool, q: &crate::Quantized4bit, x: &[f32]) -> f32 {
        let absmax = q.absmax.to_f32();
        let code = q.quant_type.code();
        let w = q.dequantize();
        let (n, k) = (q.shape[0], x.len());
        let run = |level, planes| {
            let mut out = vec![f32::NAN; n];
            gemv_4bit_with(
                level,
                planes,
                &q.packed,
                &absmax,
                q.blocksize,
                code,
                x,
                &mut out,
            );
            out
        };
        let want = run(SimdLevel::Portable, false);
        let got = run(level, planes);
        let mut worst = 0.0f32;
        for ((wr, &want), &got) in w.chunks(k).zip(&want).zip(&got) {
            let exact: f64 = wr
                .iter()
                .zip(x)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let scale: f32 = wr.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
            assert!(
                (f64::from(want) - exact).abs() <= 1e-5 * f64::from(scale),
                "portable vs f64"
            );
            worst = worst.max((got - want).abs() / scale.max(f32::MIN_POSITIVE));
        }
        worst
    }

    /// The fused gemv of every SIMD level (AVX2 both with permutes and with byte planes)
    /// against the portable one: rows made of whole blocks (the block kernels) and rows that
    /// start inside a block or on an odd element (the per-segment kernels), every block size,
    /// NF4 and FP4.
    #[test]
    fn simd_gemv_matches_portable() {
        let mut state = 0x5851_f42d_4c95_7f2du64;
        for level in simd_levels() {
            for planes in [false, true] {
                for quant_type in [QuantType::Nf4, QuantType::Fp4] {
                    for blocksize in VALID_4BIT_BLOCKSIZES {
                        for k in [blocksize, 2 * blocksize, 3 * blocksize + 7, 100, 257, 4096] {
                            let rows = 5;
                            let w = values(&mut state, rows * k, 0.2);
                            let x = values(&mut state, k, 2.0);
                            let q =
                                quantize_4bit("w", &w, &[rows, k], blocksize, quant_type, false)
                                    .unwrap();
                            let err = gemv_rel_err(level, planes, &q, &x);
                            assert!(
                                err <= 1e-5,
                                "{level} planes {planes} {quant_type} blocksize {blocksize} k {k}: \
                                 rel err {err:e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The AVX512-VBMI kernel (what `Avx512` runs where VBMI exists), 4 rows at a time and one
    /// at a time, against the plain AVX-512 row kernel, so both stay tested on a machine that
    /// has VBMI.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vbmi_rows_kernel_matches_the_avx512_one() {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vbmi"))
        {
            return;
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for blocksize in VALID_4BIT_BLOCKSIZES.into_iter().filter(|b| b % 16 == 0) {
                let (rows, k) = (5, 3 * blocksize);
                let w = values(&mut state, rows * k, 0.2);
                let x = values(&mut state, k, 2.0);
                let q = quantize_4bit("w", &w, &[rows, k], blocksize, quant_type, false).unwrap();
                let absmax = q.absmax.to_f32();
                let code = q.quant_type.code();
                // SAFETY: both features were detected; the rows are whole blocks of the data.
                let (four, [last]) = unsafe {
                    (
                        vbmi::gemv_rows_vbmi::<4, [f32]>(
                            &q.packed, &absmax, blocksize, code, &x, 0,
                        ),
                        vbmi::gemv_rows_vbmi::<1, [f32]>(
                            &q.packed, &absmax, blocksize, code, &x, 4,
                        ),
                    )
                };
                let scale: f32 = x.iter().map(|v| v.abs()).sum::<f32>() * 0.2;
                for (row, got) in four.into_iter().chain([last]).enumerate() {
                    // SAFETY: as above.
                    let want = unsafe {
                        gemv_row_blocks_avx512(&q.packed, &absmax, blocksize, code, &x, row * k)
                    };
                    assert!(
                        (want - got).abs() <= 1e-5 * scale.max(1.0),
                        "{quant_type} blocksize {blocksize} row {row}: {want} vs {got}"
                    );
                }
            }
        }
    }

    /// Nested (double-quantized) statistics read in place give the very outputs of the gemv
    /// over their f32 dequantization, for every row count (groups of 4 and the rest).
    #[test]
    fn gemv_reads_nested_statistics_exactly() {
        let mut state = 0x51af_d7ed_558c_cd1du64;
        for blocksize in [64, 128] {
            for rows in [1, 4, 7, 9] {
                let k = 2 * blocksize;
                let w = values(&mut state, rows * k, 0.3);
                let x = values(&mut state, k, 1.5);
                let q =
                    quantize_4bit("w", &w, &[rows, k], blocksize, QuantType::Nf4, true).unwrap();
                assert!(matches!(q.absmax, AbsMax::Nested(_)));
                let code = q.quant_type.code();
                let mut nested = vec![f32::NAN; rows];
                gemv_4bit(&q.packed, &q.absmax, blocksize, code, &x, &mut nested);
                let mut plain = vec![f32::NAN; rows];
                let absmax = q.absmax.to_f32();
                let level = SimdLevel::current();
                gemv_4bit_with(
                    level, false, &q.packed, &absmax, blocksize, code, &x, &mut plain,
                );
                assert_eq!(nested, plain, "blocksize {blocksize} rows {rows}");
            }
        }
    }

    /// The portable gemv (the block kernel for rows of whole blocks, the per-segment loop
    /// otherwise) against an f64 sum over the dequantized weight, on every target: within 1e-5
    /// of Σ|w·x| per row.
    #[test]
    fn portable_gemv_matches_f64() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for blocksize in VALID_4BIT_BLOCKSIZES {
                for k in [blocksize, 2 * blocksize, 3 * blocksize + 7, 100, 257, 4096] {
                    let rows = 5;
                    let w = values(&mut state, rows * k, 0.2);
                    let x = values(&mut state, k, 2.0);
                    let q =
                        quantize_4bit("w", &w, &[rows, k], blocksize, quant_type, false).unwrap();
                    let absmax = q.absmax.to_f32();
                    let mut out = vec![f32::NAN; rows];
                    let (packed, code) = (&q.packed, q.quant_type.code());
                    gemv_4bit_with(
                        SimdLevel::Portable,
                        false,
                        packed,
                        &absmax,
                        blocksize,
                        code,
                        &x,
                        &mut out,
                    );
                    let wd = q.dequantize();
                    for (r, (wr, &got)) in wd.chunks(k).zip(&out).enumerate() {
                        let exact: f64 = wr
                            .iter()
                            .zip(&x)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum();
                        let scale: f32 = wr.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                        assert!(
                            (f64::from(got) - exact).abs() <= 1e-5 * f64::from(scale),
                            "{quant_type} blocksize {blocksize} k {k} row {r}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    /// The dot product of the batched path, every SIMD level against the portable one.
    #[test]
    fn simd_dot_matches_portable() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for n in [0, 1, 7, 8, 31, 32, 33, 100, 1000, 4096, 4099] {
            let a = values(&mut state, n, 1.0);
            let b = values(&mut state, n, 3.0);
            let want = dot_with(SimdLevel::Portable, &a, &b);
            let scale: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
            for level in simd_levels() {
                let got = dot_with(level, &a, &b);
                assert!(
                    (got - want).abs() <= 1e-5 * scale.max(f32::MIN_POSITIVE),
                    "{level} n {n}: {got} vs {want}"
                );
            }
        }
    }
}
