//! LLM.int8 (bitsandbytes `Int8Params` + `MatMul8bitLt`): row-wise int8 weights `CB` with
//! `SCB = rowabsmax`, vector-wise int8 activations and the outlier decomposition.

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
    // Parallel over output features (batch-1 decode has a single row).
    let columns: Vec<Vec<f32>> = (0..out_f)
        .into_par_iter()
        .with_min_len(16)
        .map(|o| {
            let cb = &weight.cb[o * cols..(o + 1) * cols];
            (0..rows)
                .map(|r| {
                    let ca = &act.ca[r * cols..(r + 1) * cols];
                    let acc: i32 = ca
                        .iter()
                        .zip(cb)
                        .map(|(&a, &b)| i32::from(a) * i32::from(b))
                        .sum();
                    let mut v = acc as f32 * (act.sca[r] * weight.scb[o]) * MM_DEQUANT_SCALE;
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
                })
                .collect()
        })
        .collect();
    for (o, col) in columns.iter().enumerate() {
        for (r, &v) in col.iter().enumerate() {
            out[r * out_f + o] = v;
        }
    }
    out
}
