//! LLM.int8 (bitsandbytes `Int8Params` + `MatMul8bitLt`): row-wise int8 weights `CB` with
//! `SCB = rowabsmax`, vector-wise int8 activations and the outlier decomposition.

use cachet_tensor::kernels::matmul_t_tile;
use half::f16;
use rayon::prelude::*;

use crate::error::{QuantError, Result};

/// `1 / 127²` as bnb's `int8_mm_dequant` writes it.
const MM_DEQUANT_SCALE: f32 = 6.200124e-05;
/// `1 / 127` as bnb's `int8_vectorwise_dequant` writes it.
#[allow(clippy::excessive_precision)]
const VECTORWISE_DEQUANT_SCALE: f32 = 7.874015718698502e-3;

/// Rounds to f16 and back, as bnb casts weights and activations to float16 before quantizing.
fn through_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// `torch.round(v).to(int8)`: half to even; NaN (an all-zero row) becomes 0.
fn round_i8(v: f32) -> i8 {
    if v.is_nan() {
        0
    } else {
        v.round_ties_even() as i8
    }
}

/// An LLM.int8 weight: `CB` int8 `[out, in]` (row-major) and `SCB` f32 `[out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Weight {
    /// Quantized rows, `round(W · 127 / rowabsmax)`.
    pub cb: Vec<i8>,
    /// Row absmax of the f16-rounded weight.
    pub scb: Vec<f32>,
    /// Output features (rows).
    pub rows: usize,
    /// Input features (columns).
    pub cols: usize,
}

impl Int8Weight {
    /// Quantizes a row-major `[rows, cols]` weight like bnb's `Int8Params._quantize`.
    pub fn quantize(tensor: &str, data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(QuantError::InconsistentState {
                tensor: tensor.to_string(),
                reason: format!("{} values for shape [{rows}, {cols}]", data.len()),
            });
        }
        if let Some(index) = data.par_iter().position_any(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite {
                tensor: tensor.to_string(),
                index,
                value: data[index],
            });
        }
        let mut cb = vec![0i8; rows * cols];
        let mut scb = vec![0.0f32; rows];
        cb.par_chunks_mut(cols.max(1))
            .zip(scb.par_iter_mut())
            .zip(data.par_chunks(cols.max(1)))
            .for_each(|((out, s), row)| {
                let max = row.iter().fold(0.0f32, |m, &v| m.max(through_f16(v).abs()));
                *s = max;
                // torch evaluates `127.0 / t` as `t.reciprocal() * 127.0`.
                let scale = (1.0f32 / max) * 127.0f32;
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = round_i8(through_f16(v) * scale);
                }
            });
        Ok(Self {
            cb,
            scb,
            rows,
            cols,
        })
    }

    /// Checks `CB`/`SCB` against the layer shape (after loading from a file).
    pub fn validate(&self, tensor: &str) -> Result<()> {
        if self.cb.len() != self.rows * self.cols || self.scb.len() != self.rows {
            return Err(QuantError::InconsistentState {
                tensor: tensor.to_string(),
                reason: format!(
                    "CB has {} values and SCB {} for a [{}, {}] weight",
                    self.cb.len(),
                    self.scb.len(),
                    self.rows,
                    self.cols
                ),
            });
        }
        Ok(())
    }

    /// Dequantizes column `col` of row `row` (`CB · SCB / 127`, as bnb).
    #[inline]
    pub fn dequant_at(&self, row: usize, col: usize) -> f32 {
        f32::from(self.cb[row * self.cols + col]) * self.scb[row] * VECTORWISE_DEQUANT_SCALE
    }

    /// The dequantized weight, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows * self.cols)
            .map(|i| self.dequant_at(i / self.cols, i % self.cols))
            .collect()
    }

    /// Bytes the weight takes in memory.
    pub fn memory_bytes(&self) -> usize {
        self.cb.len() + self.scb.len() * 4
    }
}

/// Activations quantized vector-wise (bnb `int8_vectorwise_quant` of `x.half()`).
#[derive(Debug, Clone)]
pub struct Int8Activations {
    /// Quantized rows `[rows, cols]`, zero in outlier columns.
    pub ca: Vec<i8>,
    /// Row absmax (outliers excluded).
    pub sca: Vec<f32>,
    /// Input columns holding any |x| ≥ threshold, ascending.
    pub outlier_cols: Vec<usize>,
}

/// Quantizes `[rows, cols]` activations; with `threshold > 0`, values with |x| ≥ threshold are
/// left out of the row absmax and their columns are zeroed (they go through floating point).
pub fn quantize_activations(
    x: &[f32],
    rows: usize,
    cols: usize,
    threshold: f32,
) -> Int8Activations {
    let half: Vec<f32> = x.iter().map(|&v| through_f16(v)).collect();
    let is_outlier = |v: f32| threshold > 0.0 && v.abs() >= threshold;
    let mut outlier = vec![false; cols];
    if threshold > 0.0 {
        for row in half.chunks(cols) {
            for (flag, &v) in outlier.iter_mut().zip(row) {
                *flag |= is_outlier(v);
            }
        }
    }
    let mut ca = vec![0i8; rows * cols];
    let mut sca = vec![0.0f32; rows];
    for ((out, s), row) in ca.chunks_mut(cols).zip(&mut sca).zip(half.chunks(cols)) {
        let max = row.iter().fold(
            0.0f32,
            |m, &v| {
                if is_outlier(v) { m } else { m.max(v.abs()) }
            },
        );
        *s = max;
        // torch evaluates `127.0 / t` as `t.reciprocal() * 127.0`.
        let scale = (1.0f32 / max) * 127.0f32;
        for ((o, &v), &col_out) in out.iter_mut().zip(row).zip(&outlier) {
            *o = if col_out || is_outlier(v) {
                0
            } else {
                round_i8(v * scale)
            };
        }
    }
    Int8Activations {
        ca,
        sca,
        outlier_cols: outlier
            .iter()
            .enumerate()
            .filter_map(|(i, &o)| o.then_some(i))
            .collect(),
    }
}

/// Input rows from which [`int8_matmul`] runs the blocked gemm.
const GEMM_MIN_ROWS: usize = 16;

/// Output features per gemm tile of [`int8_matmul`].
const GEMM_TILE_COLS: usize = 64;

/// LLM.int8 matmul `x [rows, in] · Wᵀ + bias` like bnb's `MatMul8bitLt` forward in f32:
/// int8×int8→i32, dequantized by `SCA·SCB/127²`, plus the outlier columns in floating point.
pub fn int8_matmul(
    x: &[f32],
    rows: usize,
    weight: &Int8Weight,
    bias: Option<&[f32]>,
    threshold: f32,
) -> Vec<f32> {
    let cols = weight.cols;
    let act = quantize_activations(x, rows, cols, threshold);
    let out_f = weight.rows;
    let mut out = vec![0.0f32; rows * out_f];
    // Outlier weight columns, dequantized once: [n_outliers, out].
    let sub_b: Vec<f32> = act
        .outlier_cols
        .iter()
        .flat_map(|&c| (0..out_f).map(move |o| weight.dequant_at(o, c)))
        .collect();
    let n_out = act.outlier_cols.len();
    let sub_a: Vec<f32> = (0..rows)
        .flat_map(|r| act.outlier_cols.iter().map(move |&c| x[r * cols + c]))
        .collect();
    // Row r, output o: the i32 accumulator (exact in f32 for the gemm path: |Σ| ≤ 127² · in,
    // rounded only past 2^24, far below the quantization error), then dequantized as bnb does.
    let finish = |r: usize, o: usize, acc: f32| -> f32 {
        let mut v = acc * (act.sca[r] * weight.scb[o]) * MM_DEQUANT_SCALE;
        if let Some(bias) = bias {
            v += bias[o];
        }
        if n_out > 0 {
            let mut extra = 0.0f32;
            for (k, &a) in sub_a[r * n_out..(r + 1) * n_out].iter().enumerate() {
                extra += a * sub_b[k * out_f + o];
            }
            v += extra;
        }
        v
    };
    if rows >= GEMM_MIN_ROWS {
        // A prompt: tiles of output features through the blocked f32 gemm (i8 values are exact
        // in f32), each tile converted once and met by every row.
        let ca: Vec<f32> = act.ca.iter().map(|&v| f32::from(v)).collect();
        let tiles: Vec<(usize, Vec<f32>)> = (0..out_f.div_ceil(GEMM_TILE_COLS))
            .into_par_iter()
            .map(|t| {
                let (o0, o1) = (t * GEMM_TILE_COLS, ((t + 1) * GEMM_TILE_COLS).min(out_f));
                let w: Vec<f32> = weight.cb[o0 * cols..o1 * cols]
                    .iter()
                    .map(|&v| f32::from(v))
                    .collect();
                let mut part = vec![0.0f32; rows * (o1 - o0)];
                matmul_t_tile(&ca, rows, &w, o1 - o0, cols, &mut part);
                for (r, row) in part.chunks_mut(o1 - o0).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = finish(r, o0 + j, *v);
                    }
                }
                (o0, part)
            })
            .collect();
        for (o0, part) in tiles {
            let width = part.len() / rows;
            for r in 0..rows {
                out[r * out_f + o0..r * out_f + o0 + width]
                    .copy_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        return out;
    }
    // Few rows (decode): integer dot products, parallel over output features, written in place
    // ([out, rows] order, transposed after when there are several rows).
    let dot = |o: usize, r: usize| -> f32 {
        let cb = &weight.cb[o * cols..(o + 1) * cols];
        let ca = &act.ca[r * cols..(r + 1) * cols];
        let acc: i32 = ca
            .iter()
            .zip(cb)
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        finish(r, o, acc as f32)
    };
    if rows == 1 {
        out.par_iter_mut()
            .enumerate()
            .with_min_len(16)
            .for_each(|(o, y)| *y = dot(o, 0));
        return out;
    }
    let mut by_out = vec![0.0f32; out_f * rows];
    by_out
        .par_chunks_mut(rows)
        .enumerate()
        .with_min_len(16)
        .for_each(|(o, ys)| {
            for (r, y) in ys.iter_mut().enumerate() {
                *y = dot(o, r);
            }
        });
    for (o, ys) in by_out.chunks(rows).enumerate() {
        for (r, &v) in ys.iter().enumerate() {
            out[r * out_f + o] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_gemm_path_equals_row_by_row_integer_dots() {
        let (rows, out_f, cols) = (GEMM_MIN_ROWS + 5, GEMM_TILE_COLS + 7, 96);
        let mut s = 7u32;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 500.0 - 2.0
        };
        let w: Vec<f32> = (0..out_f * cols).map(|_| next()).collect();
        let x: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let bias: Vec<f32> = (0..out_f).map(|_| next()).collect();
        let weight = Int8Weight::quantize("w", &w, out_f, cols).unwrap();
        // Threshold 0 quantizes each row on its own, so single rows (the dot path) must give
        // the batch's (the gemm path's) values exactly: every sum is far below 2^24.
        let batch = int8_matmul(&x, rows, &weight, Some(&bias), 0.0);
        for r in 0..rows {
            let one = int8_matmul(&x[r * cols..(r + 1) * cols], 1, &weight, Some(&bias), 0.0);
            assert_eq!(&batch[r * out_f..(r + 1) * out_f], &one[..], "row {r}");
        }
    }
}
