//! Host kernels for dense projections, the part of a decode step that reads every weight byte.
//!
//! A [`DenseMatrix`] keeps a weight in Hugging Face's row-major `[out, in]` layout in host
//! memory (f32, bf16 or f16) and multiplies activations by its transpose: for a few rows (decode,
//! beams) with a gemv that streams each weight row once from memory across the rayon pool and
//! reuses it from L1 for every activation row; for many rows (prefill) with a blocked gemm
//! (the `gemm` crate, the one burn's CPU backend uses) that reads the weight through strides,
//! so no transposed copy is ever made. [`attention`] holds the tiled causal attention of a
//! prompt.

pub mod attention;

pub use attention::{AttentionShape, AttentionShapeError, causal_attention};

use half::{bf16, f16};
use rayon::prelude::*;

/// Activation rows up to which the gemv runs (each weight row read once, kept in L1 for all of
/// them); above it, the gemm.
pub const GEMV_MAX_ROWS: usize = 8;

/// Output rows per rayon task of the gemv: enough work to amortise the task (a few KiB of
/// weights), few enough that both cores get an even share of a 576-wide projection.
const GEMV_ROWS_PER_TASK: usize = 16;

/// Weight rows converted to f32 at a time when a half-precision weight meets the gemm.
const GEMM_TILE_ROWS: usize = 256;

/// The element type of a [`DenseMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

#[derive(Clone)]
enum Storage {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A row-major `[rows, cols]` weight in host memory, multiplied by its transpose
/// (`y = x · Wᵀ`) with the kernels above.
#[derive(Clone)]
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    storage: Storage,
}

impl std::fmt::Debug for DenseMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenseMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("dtype", &self.dtype())
            .finish()
    }
}

/// Why a [`DenseMatrix`] could not be built.
#[derive(Debug, thiserror::Error)]
#[error("a {rows}x{cols} matrix needs {expected} values, got {actual}")]
pub struct ShapeMismatch {
    rows: usize,
    cols: usize,
    expected: usize,
    actual: usize,
}

fn check(rows: usize, cols: usize, len: usize) -> Result<(), ShapeMismatch> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        n => Err(ShapeMismatch {
            rows,
            cols,
            expected: n.unwrap_or(usize::MAX),
            actual: len,
        }),
    }
}

impl DenseMatrix {
    /// An f32 matrix from row-major values.
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self, ShapeMismatch> {
        check(rows, cols, values.len())?;
        Ok(Self {
            rows,
            cols,
            storage: Storage::F32(values),
        })
    }

    /// A bf16 matrix from row-major values.
    pub fn from_bf16(rows: usize, cols: usize, values: Vec<bf16>) -> Result<Self, ShapeMismatch> {
        check(rows, cols, values.len())?;
        Ok(Self {
            rows,
            cols,
            storage: Storage::Bf16(values),
        })
    }

    /// An f16 matrix from row-major values.
    pub fn from_f16(rows: usize, cols: usize, values: Vec<f16>) -> Result<Self, ShapeMismatch> {
        check(rows, cols, values.len())?;
        Ok(Self {
            rows,
            cols,
            storage: Storage::F16(values),
        })
    }

    /// Output width (rows of the stored matrix).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width (columns of the stored matrix).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The element type.
    pub fn dtype(&self) -> WeightDType {
        match self.storage {
            Storage::F32(_) => WeightDType::F32,
            Storage::Bf16(_) => WeightDType::Bf16,
            Storage::F16(_) => WeightDType::F16,
        }
    }

    /// Bytes the values take.
    pub fn memory_bytes(&self) -> usize {
        let size = match self.storage {
            Storage::F32(_) => 4,
            Storage::Bf16(_) | Storage::F16(_) => 2,
        };
        self.rows * self.cols * size
    }

    /// Copies row `r` into `out` as f32 (an embedding lookup).
    ///
    /// # Panics
    /// If `r` is out of range or `out` is not `cols` long (callers check ids first).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let span = r * self.cols..(r + 1) * self.cols;
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[span]),
            Storage::Bf16(v) => {
                for (o, w) in out.iter_mut().zip(&v[span]) {
                    *o = w.to_f32();
                }
            }
            Storage::F16(v) => {
                for (o, w) in out.iter_mut().zip(&v[span]) {
                    *o = w.to_f32();
                }
            }
        }
    }

    /// The values as f32, row-major (for read-back and saving).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        out.par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(r, row)| self.row_into(r, row));
        out
    }

    /// `y = x · Wᵀ`: `x` is row-major `[m, cols]`, the result `[m, rows]` (f32 accumulation).
    ///
    /// # Panics
    /// If `x.len()` is not `m * cols`.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activations are not [m, cols]");
        let mut out = vec![0.0f32; m * self.rows];
        if m == 0 || self.rows == 0 {
            return out;
        }
        if self.cols == 0 {
            return out;
        }
        if m <= GEMV_MAX_ROWS {
            self.gemv(x, m, &mut out);
        } else {
            self.gemm(x, m, &mut out);
        }
        out
    }

    fn gemv(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.rows, self.cols);
        let level = Level::detect();
        // Output rows in task order, each holding its m results: [n, m], transposed after.
        let mut by_row = if m == 1 {
            Vec::new()
        } else {
            vec![0.0f32; n * m]
        };
        let target: &mut [f32] = if m == 1 { out } else { &mut by_row };
        target
            .par_chunks_mut(GEMV_ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first = task * GEMV_ROWS_PER_TASK;
                let mut buf = [0.0f32; CONVERT_CHUNK];
                for (i, ys) in chunk.chunks_mut(m).enumerate() {
                    let o = first + i;
                    let span = o * k..(o + 1) * k;
                    match &self.storage {
                        Storage::F32(w) => {
                            let w = &w[span];
                            for (r, y) in ys.iter_mut().enumerate() {
                                *y = dot_f32(level, w, &x[r * k..(r + 1) * k]);
                            }
                        }
                        Storage::Bf16(w) => {
                            let w = &w[span];
                            for (r, y) in ys.iter_mut().enumerate() {
                                *y = dot_bf16(level, w, &x[r * k..(r + 1) * k]);
                            }
                        }
                        Storage::F16(w) => {
                            let w = &w[span];
                            for (r, y) in ys.iter_mut().enumerate() {
                                *y = dot_f16(level, w, &x[r * k..(r + 1) * k], &mut buf);
                            }
                        }
                    }
                }
            });
        if m > 1 {
            for (o, ys) in by_row.chunks(m).enumerate() {
                for (r, y) in ys.iter().enumerate() {
                    out[r * n + o] = *y;
                }
            }
        }
    }

    fn gemm(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.rows, self.cols);
        match &self.storage {
            Storage::F32(w) => {
                // SAFETY: `x` is [m, k], `w` is [n, k] read as its transpose [k, n] through
                // strides (column stride k, row stride 1), `out` is [m, n]; all in bounds.
                unsafe { gemm_f32(m, n, k, x, w, out, n, gemm::Parallelism::Rayon(0)) };
            }
            Storage::Bf16(_) | Storage::F16(_) => {
                // Convert tiles of weight rows to f32 and multiply each into its output columns.
                let tiles = n.div_ceil(GEMM_TILE_ROWS);
                let parts: Vec<(usize, Vec<f32>)> = (0..tiles)
                    .into_par_iter()
                    .map(|t| {
                        let r0 = t * GEMM_TILE_ROWS;
                        let r1 = (r0 + GEMM_TILE_ROWS).min(n);
                        let mut w = vec![0.0f32; (r1 - r0) * k];
                        for (i, row) in w.chunks_mut(k).enumerate() {
                            self.row_into(r0 + i, row);
                        }
                        let mut part = vec![0.0f32; m * (r1 - r0)];
                        // SAFETY: as above, with the tile [r1 - r0, k] and a [m, r1 - r0] output.
                        unsafe {
                            gemm_f32(
                                m,
                                r1 - r0,
                                k,
                                x,
                                &w,
                                &mut part,
                                r1 - r0,
                                gemm::Parallelism::None,
                            )
                        };
                        (r0, part)
                    })
                    .collect();
                for (r0, part) in parts {
                    let width = part.len() / m;
                    for r in 0..m {
                        out[r * n + r0..r * n + r0 + width]
                            .copy_from_slice(&part[r * width..(r + 1) * width]);
                    }
                }
            }
        }
    }
}

/// Elements per rayon task of [`silu_mul`].
const SILU_CHUNK: usize = 16 * 1024;

/// `gate[i] = silu(gate[i]) · up[i]` (SwiGLU's elementwise part), split over the rayon pool
/// for prompt-sized inputs. Bit-identical to burn's CPU `silu(gate) * up` (`x · sigmoid(x)`
/// with the C library's `expf`), so a model gives the same numbers whichever path it takes.
///
/// # Panics
/// If the slices differ in length.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate and up differ in length"
    );
    if gate.len() <= SILU_CHUNK {
        silu_mul_body(gate, up);
    } else {
        gate.par_chunks_mut(SILU_CHUNK)
            .zip(up.par_chunks(SILU_CHUNK))
            .for_each(|(g, u)| silu_mul_body(g, u));
    }
}

/// The logistic function as burn's CPU backend computes it (never overflows).
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = (x * sigmoid(x)) * u;
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, `out` with row stride `out_rs`.
///
/// # Safety
/// `x` holds `m * k`, `w` `n * k` and `out` `m * out_rs` values, `out_rs >= n`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    out_rs: usize,
    parallelism: gemm::Parallelism,
) {
    debug_assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * out_rs);
    // SAFETY: the caller guarantees the extents; gemm reads and writes only inside them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Values converted from f16 per step of the f16 dot product.
const CONVERT_CHUNK: usize = 256;

/// The SIMD level the dot products run at, detected once per call site (std caches it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Level {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Self::Avx2;
            }
        }
        Self::Portable
    }
}

/// Lanes of the accumulators: 32 f32 = two AVX-512 or four AVX2 registers, enough independent
/// sums to hide the FMA latency.
const LANES: usize = 32;

#[inline(always)]
fn dot_lanes<W: Copy>(w: &[W], x: &[f32], load: impl Fn(W) -> f32, fused: bool) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut wc = w.chunks_exact(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (wb, xb) in (&mut wc).zip(&mut xc) {
        for l in 0..LANES {
            acc[l] = if fused {
                load(wb[l]).mul_add(xb[l], acc[l])
            } else {
                acc[l] + load(wb[l]) * xb[l]
            };
        }
    }
    let mut tail = 0.0f32;
    for (a, b) in wc.remainder().iter().zip(xc.remainder()) {
        tail += load(*a) * b;
    }
    // Pairwise reduction of the lanes.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + tail
}

#[inline(always)]
fn bf16_to_f32(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// The x86 dot products, written with intrinsics: the compiler's auto-vectoriser turns the
/// portable lane loop into two-wide operations here, which halves what a core can stream.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    /// Sum of the 8 lanes.
    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        // SAFETY: the callers run with AVX enabled.
        unsafe {
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
            _mm_cvtss_f32(s)
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_f32_avx512(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads indices below n (whole vectors, then a masked tail).
        unsafe {
            while i + 64 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    let o = i + 16 * a;
                    *acc = _mm512_fmadd_ps(
                        _mm512_loadu_ps(wp.add(o)),
                        _mm512_loadu_ps(xp.add(o)),
                        *acc,
                    );
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(wp.add(i)),
                    _mm512_loadu_ps(xp.add(i)),
                    acc[0],
                );
                i += 16;
            }
            if i < n {
                let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
                acc[1] = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(mask, wp.add(i)),
                    _mm512_maskz_loadu_ps(mask, xp.add(i)),
                    acc[1],
                );
            }
            let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            _mm512_reduce_add_ps(s)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_f32_avx2(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every vector load reads indices below n; the tail is scalar.
        unsafe {
            while i + 32 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    let o = i + 8 * a;
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(wp.add(o)),
                        _mm256_loadu_ps(xp.add(o)),
                        *acc,
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(wp.add(i)),
                    _mm256_loadu_ps(xp.add(i)),
                    acc[0],
                );
                i += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut sum = hsum256(s);
            while i < n {
                sum += *wp.add(i) * *xp.add(i);
                i += 1;
            }
            sum
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_bf16_avx512(w: &[bf16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // bf16 → f32 is the 16 bits moved to the top of the word.
        let widen = |p: *const u16| -> __m512 {
            // SAFETY: the caller passes a pointer with 16 readable u16.
            unsafe {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
        };
        // SAFETY: every load reads indices below n; the tail is scalar.
        unsafe {
            while i + 64 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    let o = i + 16 * a;
                    *acc = _mm512_fmadd_ps(widen(wp.add(o)), _mm512_loadu_ps(xp.add(o)), *acc);
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = _mm512_fmadd_ps(widen(wp.add(i)), _mm512_loadu_ps(xp.add(i)), acc[0]);
                i += 16;
            }
            let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            let mut sum = _mm512_reduce_add_ps(s);
            while i < n {
                sum += f32::from_bits((*wp.add(i) as u32) << 16) * *xp.add(i);
                i += 1;
            }
            sum
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_bf16_avx2(w: &[bf16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        let widen = |p: *const u16| -> __m256 {
            // SAFETY: the caller passes a pointer with 8 readable u16.
            unsafe {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
        };
        // SAFETY: every load reads indices below n; the tail is scalar.
        unsafe {
            while i + 32 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    let o = i + 8 * a;
                    *acc = _mm256_fmadd_ps(widen(wp.add(o)), _mm256_loadu_ps(xp.add(o)), *acc);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(widen(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut sum = hsum256(s);
            while i < n {
                sum += f32::from_bits((*wp.add(i) as u32) << 16) * *xp.add(i);
                i += 1;
            }
            sum
        }
    }
}

#[cfg(target_arch = "x86_64")]
use x86::{dot_bf16_avx2, dot_bf16_avx512, dot_f32_avx2, dot_f32_avx512};

/// f16 → f32 for 8 values with F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn convert_f16_avx2(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, so 8 u16 are readable at src[i] and 8 f32 writable at dst[i].
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f16_avx2(w: &[f16], x: &[f32], buf: &mut [f32; CONVERT_CHUNK]) -> f32 {
    let mut sum = 0.0;
    for (wc, xc) in w.chunks(CONVERT_CHUNK).zip(x.chunks(CONVERT_CHUNK)) {
        convert_f16_avx2(wc, &mut buf[..wc.len()]);
        sum += dot_lanes(&buf[..wc.len()], xc, |v| v, true);
    }
    sum
}

fn dot_f32(level: Level, w: &[f32], x: &[f32]) -> f32 {
    match level {
        // SAFETY: the level was detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { dot_f32_avx512(w, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { dot_f32_avx2(w, x) },
        Level::Portable => dot_lanes(w, x, |v| v, false),
    }
}

fn dot_bf16(level: Level, w: &[bf16], x: &[f32]) -> f32 {
    match level {
        // SAFETY: the level was detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { dot_bf16_avx512(w, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { dot_bf16_avx2(w, x) },
        Level::Portable => dot_lanes(w, x, bf16_to_f32, false),
    }
}

fn dot_f16(level: Level, w: &[f16], x: &[f32], buf: &mut [f32; CONVERT_CHUNK]) -> f32 {
    match level {
        // SAFETY: the level was detected on this CPU (AVX-512 CPUs have F16C).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 if std::is_x86_feature_detected!("f16c") => unsafe {
            dot_f16_avx2(w, x, buf)
        },
        _ => {
            let mut sum = 0.0;
            for (wc, xc) in w.chunks(CONVERT_CHUNK).zip(x.chunks(CONVERT_CHUNK)) {
                for (b, v) in buf.iter_mut().zip(wc) {
                    *b = v.to_f32();
                }
                sum += dot_lanes(&buf[..wc.len()], xc, |v| v, false);
            }
            sum
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for r in 0..m {
            for o in 0..n {
                out[r * n + o] = (0..k)
                    .map(|c| w[o * k + c] as f64 * x[r * k + c] as f64)
                    .sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f64], k: usize) {
        let tol = 1e-5 * (k as f64).sqrt() * 4.0;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= tol,
                "element {i}: {g} vs {w} (tol {tol})"
            );
        }
    }

    #[test]
    fn every_dtype_and_row_count_matches_f64() {
        // Odd sizes exercise the lane tails and the last, partial task.
        for &(n, k) in &[(1, 1), (7, 33), (37, 257), (300, 96)] {
            let w = values(n * k, 1);
            let bf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let hf: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
            let wh: Vec<f32> = hf.iter().map(|v| v.to_f32()).collect();
            for m in [1, 2, 3, 8, 9, 20] {
                let x = values(m * k, 2 + m as u32);
                let f = DenseMatrix::from_f32(n, k, w.clone()).unwrap();
                assert_close(&f.matmul_t(&x, m), &reference(&w, &x, m, n, k), k);
                let b = DenseMatrix::from_bf16(n, k, bf.clone()).unwrap();
                assert_close(&b.matmul_t(&x, m), &reference(&wb, &x, m, n, k), k);
                let h = DenseMatrix::from_f16(n, k, hf.clone()).unwrap();
                assert_close(&h.matmul_t(&x, m), &reference(&wh, &x, m, n, k), k);
            }
        }
    }

    #[test]
    fn every_simd_level_agrees_with_portable() {
        let mut levels = vec![Level::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                levels.push(Level::Avx512);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                levels.push(Level::Avx2);
            }
        }
        for k in [1, 7, 16, 40, 63, 64, 65, 1000, 1001] {
            let w = values(k, 5);
            let x = values(k, 6);
            let bf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let exact_bf: f64 = bf
                .iter()
                .zip(&x)
                .map(|(a, b)| a.to_f32() as f64 * *b as f64)
                .sum();
            for &level in &levels {
                let f = dot_f32(level, &w, &x) as f64;
                let b = dot_bf16(level, &bf, &x) as f64;
                assert!((f - exact).abs() < 1e-4, "{level:?} k={k}: {f} vs {exact}");
                assert!(
                    (b - exact_bf).abs() < 1e-4,
                    "{level:?} k={k}: {b} vs {exact_bf}"
                );
            }
        }
    }

    #[test]
    fn silu_mul_matches_the_definition() {
        let g: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) / 500.0).collect();
        let u = values(g.len(), 9);
        let mut got = g.clone();
        silu_mul(&mut got, &u);
        for ((x, y), got) in g.iter().zip(&u).zip(&got) {
            let want = (*x as f64) / (1.0 + (-(*x as f64)).exp()) * *y as f64;
            assert!(
                (*got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert!(DenseMatrix::from_f32(2, 3, vec![0.0; 5]).is_err());
        assert!(DenseMatrix::from_f32(usize::MAX, 3, vec![]).is_err());
        let m = DenseMatrix::from_f32(2, 3, (0..6).map(|v| v as f32).collect()).unwrap();
        let mut row = [0.0; 3];
        m.row_into(1, &mut row);
        assert_eq!(row, [3.0, 4.0, 5.0]);
        assert_eq!(m.to_f32_vec().len(), 6);
    }
}
