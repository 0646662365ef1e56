//! The AVX512-VBMI batch-1 4-bit gemv (what the `Avx512` level runs where the CPU has VBMI)
//! and the per-block scales it reads: plain f32 absmax, or bnb's nested statistics in place.

use rayon::prelude::*;

use super::ROWS_PER_TASK;
use crate::simd::SimdLevel;

/// Bit offsets for `vpmultishiftqb` that put nibble `L` of a broadcast 8-byte word (16 packed
/// codes, the first in the high nibble of each byte) in the low bits of 32-bit lane `L`.
#[cfg(target_arch = "x86_64")]
const NIBBLE_SHIFTS: [i64; 8] = {
    let mut c = [0i64; 8];
    let mut q = 0;
    while q < 8 {
        // Lane 2q (in the low half of word q) takes the high nibble of byte q, lane 2q + 1
        // (the high half) its low nibble.
        c[q] = (8 * q as i64 + 4) | ((8 * q as i64) << 32);
        q += 1;
    }
    c
};

/// Where a 4-bit gemv reads each block's scale: plain f32 absmax, or bnb's nested (double
/// quantized) statistics dequantized per block on the fly, so a decode step reads one byte per
/// block instead of materialising the f32 absmax of every layer.
pub(crate) trait BlockScales: Sync {
    /// Number of blocks covered.
    fn blocks(&self) -> usize;
    /// The scale of block `b < blocks()`.
    fn scale(&self, b: usize) -> f32;
}

impl BlockScales for [f32] {
    fn blocks(&self) -> usize {
        self.len()
    }

    #[inline(always)]
    fn scale(&self, b: usize) -> f32 {
        self[b]
    }
}

/// bnb's nested statistics read in place: `code[q[b]] · absmax[b / blocksize] + offset`, the
/// same two roundings as [`AbsMax::to_f32`](crate::blockwise::AbsMax::to_f32).
pub(crate) struct NestedScales<'a> {
    quantized: &'a [u8],
    absmax: &'a [f32],
    code: &'a [f32; 256],
    /// log2 of the nested block size (a power of two: a shift, not a division, per block).
    shift: u32,
    offset: f32,
}

impl<'a> NestedScales<'a> {
    /// `None` where the statistics are inconsistent (a code that is not 256 entries, too few
    /// nested scales) or the nested block size is not a power of two (bnb's is 256); the
    /// caller then dequantizes them the slow way.
    pub(crate) fn new(n: &'a crate::blockwise::NestedAbsMax) -> Option<Self> {
        let code = n.code.as_slice().try_into().ok()?;
        let covered = n.absmax.len().checked_mul(n.blocksize)?;
        (n.blocksize.is_power_of_two() && covered >= n.quantized.len()).then_some(Self {
            quantized: &n.quantized,
            absmax: &n.absmax,
            code,
            shift: n.blocksize.trailing_zeros(),
            offset: n.offset,
        })
    }
}

impl BlockScales for NestedScales<'_> {
    fn blocks(&self) -> usize {
        self.quantized.len()
    }

    #[inline(always)]
    fn scale(&self, b: usize) -> f32 {
        self.code[usize::from(self.quantized[b])] * self.absmax[b >> self.shift] + self.offset
    }
}

/// Whether [`gemv_rows_vbmi`] serves a gemv of `k` inputs on this CPU at `level`.
#[cfg(target_arch = "x86_64")]
pub(super) fn vbmi_rows_apply(level: SimdLevel, blocksize: usize, k: usize) -> bool {
    level.best_up_to() == SimdLevel::Avx512
        && std::arch::is_x86_feature_detected!("avx512vbmi")
        && blocksize > 0
        && blocksize.is_multiple_of(16)
        && k.is_multiple_of(blocksize)
}

/// `R` consecutive outputs (rows `row0 .. row0 + R` of a weight of whole-block rows) of the fused
/// gemv with AVX512-VBMI: 16 codes are spread to their lanes by one `vpmultishiftqb` of a
/// broadcast 8-byte word and looked up with one permute (which reads only the low 4 bits, so no
/// masking or widening is needed). Each 16-value slice of `x` is loaded once for the `R` rows;
/// every block's sum is scaled by its absmax with one FMA and each row reduced once at the end.
/// A 4-bit gemv is bound by these instructions, not by the bytes it reads.
///
/// # Panics
/// If `k = x.len()` is not whole blocks of a multiple of 16, or the rows reach past `packed` or
/// the scales.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vbmi")]
pub(super) unsafe fn gemv_rows_vbmi<const R: usize, S: BlockScales + ?Sized>(
    packed: &[u8],
    scales: &S,
    blocksize: usize,
    code: &[f32; 16],
    x: &[f32],
    row0: usize,
) -> [f32; R] {
    let k = x.len();
    let end = (row0 + R) * k;
    assert!(
        blocksize > 0
            && blocksize.is_multiple_of(16)
            && k.is_multiple_of(blocksize)
            && packed.len() * 2 >= end
            && scales.blocks() >= end / blocksize
    );
    // The common block size as a constant, so its 4 steps unroll.
    if blocksize == 64 {
        // SAFETY: as checked above; the caller has the features.
        unsafe { rows_vbmi_body::<R, S>(packed, scales, 64, code, x, row0) }
    } else {
        // SAFETY: as checked above; the caller has the features.
        unsafe { rows_vbmi_body::<R, S>(packed, scales, blocksize, code, x, row0) }
    }
}

/// The loop of [`gemv_rows_vbmi`], whose checks it relies on.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vbmi")]
#[inline]
unsafe fn rows_vbmi_body<const R: usize, S: BlockScales + ?Sized>(
    packed: &[u8],
    scales: &S,
    blocksize: usize,
    code: &[f32; 16],
    x: &[f32],
    row0: usize,
) -> [f32; R] {
    use std::arch::x86_64::*;
    let k = x.len();
    let per_row = k / blocksize;
    // SAFETY: the caller checked that rows row0 .. row0 + R are whole blocks inside `packed`
    // (bytes (row·k + 16·i)/2 .. +8) and the scales; floats 16·i .. +16 lie in `x`.
    unsafe {
        let lut = _mm512_loadu_ps(code.as_ptr());
        let shifts = _mm512_loadu_si512(NIBBLE_SHIFTS.as_ptr().cast());
        let bytes = packed.as_ptr().add(row0 * k / 2);
        let xp = x.as_ptr();
        let decode = |at: usize| {
            let word = _mm512_set1_epi64(bytes.add(at / 2).cast::<i64>().read_unaligned());
            _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(shifts, word), lut)
        };
        let mut rows = [_mm512_setzero_ps(); R];
        for b in 0..per_row {
            let base = b * blocksize;
            let mut acc = [_mm512_setzero_ps(); R];
            let mut i = base;
            while i < base + blocksize {
                let xv = _mm512_loadu_ps(xp.add(i));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(decode(r * k + i), xv, *acc);
                }
                i += 16;
            }
            for (r, (row, acc)) in rows.iter_mut().zip(acc).enumerate() {
                let scale = scales.scale((row0 + r) * per_row + b);
                *row = _mm512_fmadd_ps(acc, _mm512_set1_ps(scale), *row);
            }
        }
        rows.map(|r| _mm512_reduce_add_ps(r))
    }
}

/// The gemv through [`gemv_rows_vbmi`]: rayon tasks of [`ROWS_PER_TASK`] rows, groups of 4
/// rows, the last rows one by one.
/// The caller checked [`vbmi_rows_apply`].
#[cfg(target_arch = "x86_64")]
pub(super) fn gemv_vbmi<S: BlockScales + ?Sized>(
    packed: &[u8],
    scales: &S,
    blocksize: usize,
    code: &[f32; 16],
    x: &[f32],
    out: &mut [f32],
) {
    const R: usize = 4;
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(t, ys)| {
            for (c, ys) in ys.chunks_mut(R).enumerate() {
                let row0 = t * ROWS_PER_TASK + c * R;
                // SAFETY: `vbmi_rows_apply` found avx512f and avx512vbmi; the kernel checks bounds.
                if let Ok(ys) = <&mut [f32; R]>::try_from(&mut *ys) {
                    *ys =
                        unsafe { gemv_rows_vbmi::<R, S>(packed, scales, blocksize, code, x, row0) };
                } else {
                    for (j, y) in ys.iter_mut().enumerate() {
                        // SAFETY: as above.
                        let [v] = unsafe {
                            gemv_rows_vbmi::<1, S>(packed, scales, blocksize, code, x, row0 + j)
                        };
                        *y = v;
                    }
                }
            }
        });
}
