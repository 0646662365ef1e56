//! The AVX-512 body of a prompt-attention task: four query rows at a time share every key and
//! value load, so the inner loops are bound by FMAs rather than loads (one row at a time reads a
//! vector per FMA).

use std::arch::x86_64::*;

use super::{KEY_TILE, Task};

/// Query rows sharing each key/value vector load: 4 rows × 4 registers of 16 lanes = 16
/// accumulators, half the register file.
const ROWS: usize = 4;
/// Registers covering a key tile or a value chunk.
const VECS: usize = KEY_TILE / 16;
/// Value columns per pass over a tile (one register set of accumulators).
const VALUE_CHUNK: usize = VECS * 16;

/// `e^x` on 16 lanes for `x ≤ 0` (`-inf` gives 0): the polynomial of
/// [`super::exp_nonpositive`], lane for lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_nonpositive(x: __m512) -> __m512 {
    let floor = _mm512_set1_ps(-87.0);
    let underflow = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, floor);
    let x = _mm512_max_ps(x, floor);
    let shifter = _mm512_set1_ps(12_582_912.0);
    let n = _mm512_sub_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), shifter),
        shifter,
    );
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_145_75), x);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    let y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    _mm512_mask_blend_ps(underflow, y, _mm512_setzero_ps())
}

impl Task<'_> {
    /// Same contract as the portable body (`run_body`).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn run_avx512(&self, queries: &[&[f32]]) -> Vec<f32> {
        let (d, dv) = (self.d, self.dv);
        let n = queries.len();
        let mut out = vec![0.0f32; n * dv];
        let mut row_max = vec![f32::NEG_INFINITY; n];
        let mut row_sum = vec![0.0f32; n];
        let mut kt = vec![0.0f32; d * KEY_TILE];
        let (lo, hi) = self.visible_keys();
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut probs = [[0.0f32; KEY_TILE]; ROWS];
        let mut tile_start = lo - lo % KEY_TILE;
        while tile_start < hi {
            let tile_end = (tile_start + KEY_TILE).min(self.kv_len);
            let width = tile_end - tile_start;
            self.transpose_tile(&mut kt, tile_start, width);
            let mut r0 = 0;
            while r0 < n {
                let live = ROWS.min(n - r0);
                // Visible keys of each row within the tile, as offsets into it: [first, last].
                let mut span = [None; ROWS];
                for (r, s) in span.iter_mut().enumerate().take(live) {
                    let pos = self.i0 + (r0 + r) % self.rows + self.offset;
                    let first = self
                        .window
                        .map_or(0, |w| (pos + 1).saturating_sub(w))
                        .max(tile_start);
                    let last = pos.min(tile_end - 1);
                    *s = (first <= last).then(|| (first - tile_start, last - tile_start));
                }
                if span.iter().all(Option::is_none) {
                    r0 += live;
                    continue;
                }
                // Rows past the end repeat the first one; their results are dropped.
                let q: [&[f32]; ROWS] =
                    std::array::from_fn(|r| queries[r0 + if r < live { r } else { 0 }]);
                let mut acc = [_mm512_setzero_ps(); ROWS * VECS];
                for c in 0..d {
                    let k_row = kt[c * KEY_TILE..].as_ptr();
                    // SAFETY: kt holds d rows of KEY_TILE values.
                    let k: [__m512; VECS] =
                        std::array::from_fn(|t| unsafe { _mm512_loadu_ps(k_row.add(16 * t)) });
                    for r in 0..ROWS {
                        let qc = _mm512_set1_ps(q[r][c]);
                        for t in 0..VECS {
                            acc[r * VECS + t] = _mm512_fmadd_ps(qc, k[t], acc[r * VECS + t]);
                        }
                    }
                }
                // Online softmax per row: scale, mask, running maximum and sum.
                let mut correction = [1.0f32; ROWS];
                let scale = _mm512_set1_ps(self.scale);
                for r in 0..live {
                    let Some((first, last)) = span[r] else {
                        probs[r] = [0.0; KEY_TILE];
                        continue;
                    };
                    let lo_v = _mm512_set1_epi32(first as i32);
                    let hi_v = _mm512_set1_epi32(last as i32);
                    let mut s = [_mm512_setzero_ps(); VECS];
                    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
                    for (t, st) in s.iter_mut().enumerate() {
                        let idx = _mm512_add_epi32(iota, _mm512_set1_epi32(16 * t as i32));
                        let visible =
                            _mm512_cmpge_epi32_mask(idx, lo_v) & _mm512_cmple_epi32_mask(idx, hi_v);
                        *st = _mm512_mask_blend_ps(
                            visible,
                            _mm512_set1_ps(f32::NEG_INFINITY),
                            _mm512_mul_ps(acc[r * VECS + t], scale),
                        );
                        m = _mm512_max_ps(m, *st);
                    }
                    let new_max = row_max[r0 + r].max(_mm512_reduce_max_ps(m));
                    let nm = _mm512_set1_ps(new_max);
                    let mut sum = _mm512_setzero_ps();
                    for (t, st) in s.iter().enumerate() {
                        let e = exp_nonpositive(_mm512_sub_ps(*st, nm));
                        sum = _mm512_add_ps(sum, e);
                        // SAFETY: probs rows hold KEY_TILE values.
                        unsafe { _mm512_storeu_ps(probs[r][16 * t..].as_mut_ptr(), e) };
                    }
                    let c = if row_max[r0 + r] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        super::exp_nonpositive(row_max[r0 + r] - new_max)
                    };
                    correction[r] = c;
                    row_max[r0 + r] = new_max;
                    row_sum[r0 + r] = row_sum[r0 + r] * c + _mm512_reduce_add_ps(sum);
                }
                for row in probs.iter_mut().skip(live) {
                    *row = [0.0; KEY_TILE];
                }
                // o = o · correction + Σ_j p_j · v_j, a chunk of value columns at a time.
                let mut c0 = 0;
                while c0 < dv {
                    let masks: [__mmask16; VECS] = std::array::from_fn(|t| {
                        let left = dv.saturating_sub(c0 + 16 * t).min(16);
                        ((1u32 << left) - 1) as __mmask16
                    });
                    let mut acc = [_mm512_setzero_ps(); ROWS * VECS];
                    for r in 0..live {
                        let o = out[(r0 + r) * dv + c0..].as_ptr();
                        let cr = _mm512_set1_ps(correction[r]);
                        for t in 0..VECS {
                            // SAFETY: masked lanes are not read; the rest lie in the row.
                            let x =
                                unsafe { _mm512_maskz_loadu_ps(masks[t], o.wrapping_add(16 * t)) };
                            acc[r * VECS + t] = _mm512_mul_ps(x, cr);
                        }
                    }
                    #[allow(clippy::needless_range_loop)] // j indexes the rows of probs and v
                    for j in 0..width {
                        let v_row = self.v[(tile_start + j) * self.v_rs + c0..].as_ptr();
                        // SAFETY: as above.
                        let v: [__m512; VECS] = std::array::from_fn(|t| unsafe {
                            _mm512_maskz_loadu_ps(masks[t], v_row.wrapping_add(16 * t))
                        });
                        for r in 0..ROWS {
                            let p = _mm512_set1_ps(probs[r][j]);
                            for t in 0..VECS {
                                acc[r * VECS + t] = _mm512_fmadd_ps(p, v[t], acc[r * VECS + t]);
                            }
                        }
                    }
                    for r in 0..live {
                        let o = out[(r0 + r) * dv + c0..].as_mut_ptr();
                        for t in 0..VECS {
                            // SAFETY: as above, for the stores.
                            unsafe {
                                _mm512_mask_storeu_ps(
                                    o.wrapping_add(16 * t),
                                    masks[t],
                                    acc[r * VECS + t],
                                )
                            };
                        }
                    }
                    c0 += VALUE_CHUNK;
                }
                r0 += live;
            }
            tile_start = tile_end;
        }
        Self::normalise(&mut out, dv, &row_sum);
        out
    }
}
