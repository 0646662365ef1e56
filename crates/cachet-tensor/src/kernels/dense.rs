//! [`DenseMatrix`]: a weight in host memory times activations (gemv for few rows, gemm for many).

use half::{bf16, f16};
use rayon::prelude::*;

use super::dot::{CONVERT_CHUNK, Level, dot_bf16, dot_f16, dot_f32};

/// Activation rows up to which the gemv runs (each weight row read once, kept in L1 for all of
/// them); above it, the gemm.
pub(crate) const GEMV_MAX_ROWS: usize = 8;

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
                // One block of output columns per thread, each a single-threaded gemm: the
                // gemm crate's own threading leaves a core idle on some prompt shapes (a
                // 2048-row prompt ran at half the two-core rate).
                let threads = rayon::current_num_threads().max(1);
                let block = n.div_ceil(threads).next_multiple_of(16).min(n);
                let out_ptr = SendPtr(out.as_mut_ptr());
                (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
                    let c0 = b * block;
                    let width = block.min(n - c0);
                    // SAFETY: `x` is [m, k]; rows c0..c0 + width of `w` are [width, k], read
                    // as their transpose through strides; each block writes its own columns
                    // c0..c0 + width of the [m, n] output (row stride n), which no other block
                    // touches.
                    unsafe {
                        gemm_f32(
                            m,
                            width,
                            k,
                            x,
                            &w[c0 * k..(c0 + width) * k],
                            out_ptr.at(c0),
                            n,
                            gemm::Parallelism::None,
                        )
                    };
                });
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
                        // SAFETY: the tile is [r1 - r0, k] and `part` its [m, r1 - r0] output.
                        unsafe {
                            gemm_f32(
                                m,
                                r1 - r0,
                                k,
                                x,
                                &w,
                                part.as_mut_ptr(),
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

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` on the calling thread with the blocked gemm: for callers
/// that convert or dequantize a weight tile by tile and run the tiles in parallel themselves.
///
/// # Panics
/// If the slices are not `m * k`, `n * k` and `m * n` long.
pub fn matmul_t_tile(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, out: &mut [f32]) {
    assert!(
        x.len() == m * k && w.len() == n * k && out.len() == m * n,
        "matmul_t_tile: x is not [m, k], w not [n, k] or out not [m, n]"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: the lengths were checked above; `out` has row stride n.
    unsafe { gemm_f32(m, n, k, x, w, out.as_mut_ptr(), n, gemm::Parallelism::None) };
}

/// An output pointer shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: the tasks holding it write disjoint elements (see the users).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `offset` elements on.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, `out` with row stride `out_rs`.
///
/// # Safety
/// `x` holds `m * k` and `w` `n * k` values; `out` points at `m` rows of `n` writable values,
/// `out_rs` apart, that nothing else reads or writes during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    out: *mut f32,
    out_rs: usize,
    parallelism: gemm::Parallelism,
) {
    debug_assert!(x.len() >= m * k && w.len() >= n * k && out_rs >= n);
    // SAFETY: the caller guarantees the extents; gemm reads and writes only inside them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as values;

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
