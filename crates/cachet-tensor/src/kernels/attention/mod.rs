//! Causal attention for a prompt on the host, tiled like flash attention.
//!
//! Queries are the last `q_len` positions of the keys (a prompt over a cache). Work runs per
//! (batch, kv head, block of queries) on the rayon pool; the query heads sharing a kv head
//! (grouped-query attention) reuse each key tile. Key tiles wholly above the causal diagonal or
//! before the sliding window are skipped, not masked, so a causal prompt costs half of the full
//! score matrix, and no `q_len × kv_len` tensor is ever built: scratch is one tile per task.

use rayon::prelude::*;

use crate::HostStrided;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Query rows per task.
const QUERY_BLOCK: usize = 32;
/// Keys per tile (one score row of a tile fits a few vector registers).
const KEY_TILE: usize = 64;
/// Value columns accumulated in registers at a time.
const VALUE_CHUNK: usize = 64;

/// Maximum of a score row over 16 lanes.
#[inline(always)]
fn lane_max(v: &[f32; KEY_TILE]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    for c in v.chunks_exact(16) {
        for l in 0..16 {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    m.iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Sum of a score row over 16 lanes.
#[inline(always)]
fn lane_sum(v: &[f32; KEY_TILE]) -> f32 {
    let mut s = [0.0f32; 16];
    for c in v.chunks_exact(16) {
        for l in 0..16 {
            s[l] += c[l];
        }
    }
    s.iter().sum()
}

/// Shapes of [`causal_attention`]; tensors are row-major `[batch, heads, len, dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch rows.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple).
    pub kv_heads: usize,
    /// Queries: the last `q_len` of the `kv_len` positions.
    pub q_len: usize,
    /// Keys and values.
    pub kv_len: usize,
    /// Width of a query/key head.
    pub head_dim: usize,
    /// Width of a value head.
    pub v_dim: usize,
}

/// Why [`causal_attention`] refused its inputs.
#[derive(Debug, thiserror::Error)]
#[error("causal attention: {0}")]
pub struct AttentionShapeError(String);

impl AttentionShape {
    fn check(&self, q: usize, k: usize, v: usize) -> Result<(), AttentionShapeError> {
        let err = |m: String| Err(AttentionShapeError(m));
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return err(format!(
                "{} query heads do not group over {} kv heads",
                self.heads, self.kv_heads
            ));
        }
        if self.q_len > self.kv_len {
            return err(format!(
                "{} queries over {} keys (queries must be the last keys' positions)",
                self.q_len, self.kv_len
            ));
        }
        let n = |a: usize, b: usize, c: usize, d: usize| {
            a.checked_mul(b)
                .and_then(|x| x.checked_mul(c))
                .and_then(|x| x.checked_mul(d))
        };
        let want = [
            (
                "queries",
                n(self.batch, self.heads, self.q_len, self.head_dim),
                q,
            ),
            (
                "keys",
                n(self.batch, self.kv_heads, self.kv_len, self.head_dim),
                k,
            ),
            (
                "values",
                n(self.batch, self.kv_heads, self.kv_len, self.v_dim),
                v,
            ),
        ];
        for (what, expected, got) in want {
            if expected != Some(got) {
                return err(format!(
                    "{what} have {got} values, the shape {self:?} needs {expected:?}"
                ));
            }
        }
        Ok(())
    }
}

/// `softmax(q·kᵀ·scale + causal mask) · v`, `[batch, heads, q_len, v_dim]`: query `i` sees keys
/// `j ≤ i + kv_len - q_len` and, with `window = Some(w)`, only the last `w` of them.
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    window: Option<usize>,
    scale: f32,
) -> Result<Vec<f32>, AttentionShapeError> {
    shape.check(q.len(), k.len(), v.len())?;
    let contiguous = |data, width| Heads {
        data,
        base: 0,
        batch_stride: shape.kv_heads * shape.kv_len * width,
        head_stride: shape.kv_len * width,
        row_stride: width,
    };
    Ok(run(
        q,
        QueryLayout::HeadsFirst,
        contiguous(k, shape.head_dim),
        contiguous(v, shape.v_dim),
        shape,
        window,
        scale,
    ))
}

/// [`causal_attention`] for queries laid out token-first, `[batch, q_len, heads * head_dim]`
/// (as a projection leaves them), over keys and values read in place from strided
/// `[batch, kv_heads, kv_len, dim]` views (a KV cache's buffers). Returns `[batch, q_len, heads *
/// v_dim]`, ready for the output projection.
pub fn causal_attention_strided<'a>(
    q: &[f32],
    heads: usize,
    keys: HostStrided<'a, 4>,
    values: HostStrided<'a, 4>,
    window: Option<usize>,
    scale: f32,
) -> Result<Vec<f32>, AttentionShapeError> {
    let [batch, kv_heads, kv_len, head_dim] = keys.shape;
    let [vb, vh, vl, v_dim] = values.shape;
    if (vb, vh, vl) != (batch, kv_heads, kv_len) {
        return fail(format!(
            "keys {:?} and values {:?} disagree",
            keys.shape, values.shape
        ));
    }
    let per_token = batch * heads * head_dim;
    if per_token == 0 || !q.len().is_multiple_of(per_token) {
        return fail(format!(
            "{} query values are not [batch {batch}, q_len, {heads} heads x {head_dim}]",
            q.len()
        ));
    }
    let shape = AttentionShape {
        batch,
        heads,
        kv_heads,
        q_len: q.len() / per_token,
        kv_len,
        head_dim,
        v_dim,
    };
    shape.check(
        q.len(),
        batch * kv_heads * kv_len * head_dim,
        batch * kv_heads * kv_len * v_dim,
    )?;
    let heads_of = |view: HostStrided<'a, 4>, what: &str| {
        let [bs, hs, rs, cs] = view.strides;
        let width = view.shape[3];
        if cs != 1 && width > 1 {
            return fail(format!(
                "{what} rows are not contiguous (strides {:?})",
                view.strides
            ));
        }
        // The last element any head reads must lie inside the storage.
        let last = (batch - 1) * bs + (kv_heads - 1) * hs + kv_len.saturating_sub(1) * rs + width;
        if kv_len > 0
            && view
                .offset
                .checked_add(last)
                .is_none_or(|end| end > view.storage.len())
        {
            return fail(format!("{what} view reaches past its storage"));
        }
        Ok(Heads {
            data: view.storage,
            base: view.offset,
            batch_stride: bs,
            head_stride: hs,
            row_stride: rs,
        })
    };
    let (k, v) = (heads_of(keys, "key")?, heads_of(values, "value")?);
    Ok(run(q, QueryLayout::TokensFirst, k, v, shape, window, scale))
}

fn fail<T>(message: String) -> Result<T, AttentionShapeError> {
    Err(AttentionShapeError(message))
}

/// How queries (and the output) are laid out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QueryLayout {
    /// `[batch, heads, q_len, dim]`.
    HeadsFirst,
    /// `[batch, q_len, heads, dim]`.
    TokensFirst,
}

impl QueryLayout {
    /// Index of row `(b, h, i)` of width `width` in a `[batch, heads, len]` set of rows.
    fn row(
        self,
        (b, h, i): (usize, usize, usize),
        heads: usize,
        len: usize,
        width: usize,
    ) -> usize {
        match self {
            Self::HeadsFirst => ((b * heads + h) * len + i) * width,
            Self::TokensFirst => ((b * len + i) * heads + h) * width,
        }
    }
}

/// Keys or values of every (batch, kv head): rows `row_stride` apart, head `(b, g)` starting
/// at `base + b * batch_stride + g * head_stride` (bounds checked by the callers).
#[derive(Clone, Copy)]
struct Heads<'a> {
    data: &'a [f32],
    base: usize,
    batch_stride: usize,
    head_stride: usize,
    row_stride: usize,
}

impl<'a> Heads<'a> {
    /// The rows of head `(b, g)`, `len` rows of `width` values.
    fn head(&self, b: usize, g: usize, len: usize, width: usize) -> &'a [f32] {
        let start = self.base + b * self.batch_stride + g * self.head_stride;
        let span = if len == 0 {
            0
        } else {
            (len - 1) * self.row_stride + width
        };
        &self.data[start..start + span]
    }
}

fn run(
    q: &[f32],
    layout: QueryLayout,
    k: Heads<'_>,
    v: Heads<'_>,
    shape: AttentionShape,
    window: Option<usize>,
    scale: f32,
) -> Vec<f32> {
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim: d,
        v_dim: dv,
    } = shape;
    let rep = heads / kv_heads;
    let blocks = q_len.div_ceil(QUERY_BLOCK);
    let mut out = vec![0.0f32; batch * heads * q_len * dv];
    if out.is_empty() {
        return out;
    }
    // One task per (batch, kv head, query block); its output rows are scattered over the rep
    // query heads, so tasks return their rows and the copy into place follows.
    let tasks: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|b| (0..kv_heads).flat_map(move |g| (0..blocks).map(move |qb| (b, g, qb))))
        .collect();
    let level = super::Level::detect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(b, g, qb)| {
            let i0 = qb * QUERY_BLOCK;
            let i1 = (i0 + QUERY_BLOCK).min(q_len);
            let queries: Vec<&[f32]> = (0..rep)
                .flat_map(|r| {
                    let h = g * rep + r;
                    (i0..i1).map(move |i| &q[layout.row((b, h, i), heads, q_len, d)..][..d])
                })
                .collect();
            let task = Task {
                k: k.head(b, g, kv_len, d),
                v: v.head(b, g, kv_len, dv),
                k_rs: k.row_stride,
                v_rs: v.row_stride,
                d,
                dv,
                kv_len,
                offset: kv_len - q_len,
                window,
                scale,
                rows: i1 - i0,
                i0,
            };
            task.run(level, &queries)
        })
        .collect();
    for (&(b, g, qb), part) in tasks.iter().zip(parts) {
        let i0 = qb * QUERY_BLOCK;
        let rows = (i0 + QUERY_BLOCK).min(q_len) - i0;
        for r in 0..rep {
            let h = g * rep + r;
            for i in 0..rows {
                let dst = layout.row((b, h, i0 + i), heads, q_len, dv);
                out[dst..dst + dv].copy_from_slice(&part[(r * rows + i) * dv..][..dv]);
            }
        }
    }
    out
}

/// One (batch, kv head, query block) of work.
struct Task<'a> {
    /// Rows of one kv head, `k_rs` / `v_rs` apart.
    k: &'a [f32],
    v: &'a [f32],
    k_rs: usize,
    v_rs: usize,
    d: usize,
    dv: usize,
    kv_len: usize,
    offset: usize,
    window: Option<usize>,
    scale: f32,
    /// Query rows of the block per head, starting at query `i0`.
    rows: usize,
    i0: usize,
}

impl Task<'_> {
    fn run(&self, level: super::Level, queries: &[&[f32]]) -> Vec<f32> {
        match level {
            // SAFETY: the level was detected on this CPU.
            #[cfg(target_arch = "x86_64")]
            super::Level::Avx512 => unsafe { self.run_avx512(queries) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            super::Level::Avx2 => unsafe { self.run_avx2(queries) },
            super::Level::Portable => self.run_body(queries),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_avx2(&self, queries: &[&[f32]]) -> Vec<f32> {
        self.run_body(queries)
    }

    /// Keys any query of the block can see, `lo..hi`: up to the last query's diagonal, from
    /// the first query's window start.
    fn visible_keys(&self) -> (usize, usize) {
        let last_query = self.i0 + self.rows - 1;
        let hi = (last_query + self.offset + 1).min(self.kv_len);
        let lo = self
            .window
            .map_or(0, |w| (self.i0 + self.offset + 1).saturating_sub(w));
        (lo, hi)
    }

    /// Writes keys `tile_start..tile_start + width` transposed into `kt` (`[d][KEY_TILE]`), so
    /// a score row is a sum of scaled rows of it.
    #[inline(always)]
    fn transpose_tile(&self, kt: &mut [f32], tile_start: usize, width: usize) {
        for j in 0..width {
            let key = &self.k[(tile_start + j) * self.k_rs..][..self.d];
            for (c, &x) in key.iter().enumerate() {
                kt[c * KEY_TILE + j] = x;
            }
        }
    }

    /// Divides each output row by its softmax denominator.
    fn normalise(out: &mut [f32], dv: usize, row_sum: &[f32]) {
        for (row, o) in out.chunks_mut(dv.max(1)).enumerate() {
            let sum = row_sum[row];
            if sum > 0.0 {
                let inv = 1.0 / sum;
                for x in o.iter_mut() {
                    *x *= inv;
                }
            }
        }
    }

    #[inline(always)]
    fn run_body(&self, queries: &[&[f32]]) -> Vec<f32> {
        let (d, dv) = (self.d, self.dv);
        let n = queries.len();
        let mut out = vec![0.0f32; n * dv];
        let mut row_max = vec![f32::NEG_INFINITY; n];
        let mut row_sum = vec![0.0f32; n];
        let mut kt = vec![0.0f32; d * KEY_TILE];
        let (lo, hi) = self.visible_keys();
        let mut tile_start = lo - lo % KEY_TILE;
        while tile_start < hi {
            let tile_end = (tile_start + KEY_TILE).min(self.kv_len);
            let width = tile_end - tile_start;
            self.transpose_tile(&mut kt, tile_start, width);
            for (row, query) in queries.iter().enumerate() {
                let i = self.i0 + row % self.rows;
                let pos = i + self.offset;
                // Visible keys of this query within the tile: [first, last].
                let first = self
                    .window
                    .map_or(0, |w| (pos + 1).saturating_sub(w))
                    .max(tile_start);
                let last = pos.min(tile_end - 1);
                if first > last {
                    continue;
                }
                // A local accumulator with fixed bounds stays in vector registers.
                let mut acc = [0.0f32; KEY_TILE];
                for (&qc, kt_row) in query.iter().zip(kt.chunks_exact(KEY_TILE)) {
                    let kt_row: &[f32; KEY_TILE] = kt_row.try_into().unwrap_or(&[0.0; KEY_TILE]);
                    for j in 0..KEY_TILE {
                        acc[j] = qc.mul_add(kt_row[j], acc[j]);
                    }
                }
                let mut scores = acc;
                // Scale and mask (a select per key, vectorised), then the tile's maximum over
                // 16 lanes (a float reduction in one chain would not vectorise).
                for (j, s) in scores.iter_mut().enumerate() {
                    let key = tile_start + j;
                    let visible = key >= first && key <= last && j < width;
                    *s = if visible {
                        *s * self.scale
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                let tile_max = lane_max(&scores);
                let new_max = row_max[row].max(tile_max);
                for s in scores.iter_mut() {
                    *s = exp_nonpositive(*s - new_max);
                }
                let tile_sum = lane_sum(&scores);
                let correction = if row_max[row] == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp_nonpositive(row_max[row] - new_max)
                };
                row_max[row] = new_max;
                row_sum[row] = row_sum[row] * correction + tile_sum;
                // o = o · correction + Σ_j p_j · v_j, 64 output columns at a time held in
                // registers across the keys.
                let o = &mut out[row * dv..(row + 1) * dv];
                for (ci, chunk) in o.chunks_mut(VALUE_CHUNK).enumerate() {
                    let c0 = ci * VALUE_CHUNK;
                    let mut acc = [0.0f32; VALUE_CHUNK];
                    let w = chunk.len();
                    for (a, x) in acc.iter_mut().zip(chunk.iter()) {
                        *a = x * correction;
                    }
                    if w == VALUE_CHUNK {
                        for (j, &p) in scores[..width].iter().enumerate() {
                            let start = (tile_start + j) * self.v_rs + c0;
                            let value: &[f32; VALUE_CHUNK] = self.v[start..start + VALUE_CHUNK]
                                .try_into()
                                .unwrap_or(&[0.0; VALUE_CHUNK]);
                            for l in 0..VALUE_CHUNK {
                                acc[l] = p.mul_add(value[l], acc[l]);
                            }
                        }
                    } else {
                        for (j, &p) in scores[..width].iter().enumerate() {
                            let value = &self.v[(tile_start + j) * self.v_rs + c0..][..w];
                            for (a, &vv) in acc.iter_mut().zip(value) {
                                *a = p.mul_add(vv, *a);
                            }
                        }
                    }
                    chunk.copy_from_slice(&acc[..w]);
                }
            }
            tile_start = tile_end;
        }
        Self::normalise(&mut out, dv, &row_sum);
        out
    }
}

/// `e^x` for `x ≤ 0` (`-inf` gives 0), to about 1 ulp: a branch-free polynomial that the
/// compiler vectorises, unlike the C library's `expf`.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and the rest (Cody–Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest by the 1.5·2²³ trick (one add and one subtract, vectorised; `round`
    // becomes a library call per element).
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let n = (x * LOG2E + SHIFTER) - SHIFTER;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    // e^r on |r| ≤ ln2/2: degree-6 Taylor polynomial in Horner form.
    let mut p = 1.0 / 720.0f32;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // 2^n by building the exponent bits; n ≥ -126 here, so the result is a normal float.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = p * scale;
    if x <= -87.0 { 0.0 } else { y }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as values;

    /// Softmax attention in f64 with an explicit mask.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttentionShape,
        window: Option<usize>,
        scale: f64,
    ) -> Vec<f64> {
        let rep = s.heads / s.kv_heads;
        let mut out = vec![0.0f64; s.batch * s.heads * s.q_len * s.v_dim];
        let off = s.kv_len - s.q_len;
        for b in 0..s.batch {
            for h in 0..s.heads {
                let g = h / rep;
                for i in 0..s.q_len {
                    let qi = &q[((b * s.heads + h) * s.q_len + i) * s.head_dim..][..s.head_dim];
                    let pos = i + off;
                    let visible: Vec<usize> = (0..s.kv_len)
                        .filter(|&j| j <= pos && window.is_none_or(|w| pos - j < w))
                        .collect();
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&j| {
                            let kj = &k[((b * s.kv_heads + g) * s.kv_len + j) * s.head_dim..]
                                [..s.head_dim];
                            qi.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let o = &mut out[((b * s.heads + h) * s.q_len + i) * s.v_dim..][..s.v_dim];
                    for (p, &j) in e.iter().zip(&visible) {
                        let vj = &v[((b * s.kv_heads + g) * s.kv_len + j) * s.v_dim..][..s.v_dim];
                        for (x, y) in o.iter_mut().zip(vj) {
                            *x += p / z * *y as f64;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_f64_softmax_for_causal_windowed_and_grouped_heads() {
        let cases = [
            (1, 2, 2, 5, 5, 8, 8, None),
            (2, 6, 2, 70, 70, 16, 12, None),
            (1, 4, 1, 40, 100, 8, 8, None),
            (1, 3, 3, 130, 130, 32, 32, Some(50)),
            (2, 4, 2, 33, 90, 8, 16, Some(7)),
            (1, 2, 1, 1, 65, 8, 8, Some(64)),
            (1, 9, 3, 200, 260, 64, 80, None),
            (1, 2, 1, 150, 150, 64, 128, Some(70)),
            (1, 5, 5, 7, 300, 24, 40, Some(100)),
        ];
        for (batch, heads, kv_heads, q_len, kv_len, head_dim, v_dim, window) in cases {
            let shape = AttentionShape {
                batch,
                heads,
                kv_heads,
                q_len,
                kv_len,
                head_dim,
                v_dim,
            };
            let q = values(batch * heads * q_len * head_dim, 1);
            let k = values(batch * kv_heads * kv_len * head_dim, 2);
            let v = values(batch * kv_heads * kv_len * v_dim, 3);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let got = causal_attention(&q, &k, &v, shape, window, scale).unwrap();
            let want = reference(&q, &k, &v, shape, window, scale as f64);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() < 2e-5,
                    "{shape:?} {window:?} [{i}]: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn strided_views_and_token_first_queries_give_the_same_attention() {
        // Keys and values inside a cache buffer of capacity 96 (rows of a head 1 apart, heads
        // `cap * d` apart), queries and output token-first.
        let (batch, heads, kv_heads, q_len, kv_len, d, dv, cap) = (2, 6, 2, 37, 70, 16, 24, 96);
        let shape = AttentionShape {
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            head_dim: d,
            v_dim: dv,
        };
        let q = values(batch * heads * q_len * d, 11);
        let k = values(batch * kv_heads * kv_len * d, 12);
        let v = values(batch * kv_heads * kv_len * dv, 13);
        for window in [None, Some(20)] {
            let want = causal_attention(&q, &k, &v, shape, window, 0.3).unwrap();
            let pad = |x: &[f32], w: usize| {
                let mut buf = vec![f32::NAN; 3 + batch * kv_heads * cap * w];
                for (head, rows) in x.chunks(kv_len * w).enumerate() {
                    buf[3 + head * cap * w..][..kv_len * w].copy_from_slice(rows);
                }
                buf
            };
            let (kb, vb) = (pad(&k, d), pad(&v, dv));
            let view = |buf, w| HostStrided::<'_, 4> {
                storage: buf,
                offset: 3,
                strides: [kv_heads * cap * w, cap * w, w, 1],
                shape: [batch, kv_heads, kv_len, w],
            };
            let (kb, vb): (&[f32], &[f32]) = (&kb, &vb);
            let mut qt = vec![0.0; q.len()];
            for b in 0..batch {
                for h in 0..heads {
                    for i in 0..q_len {
                        let src = ((b * heads + h) * q_len + i) * d;
                        let dst = ((b * q_len + i) * heads + h) * d;
                        qt[dst..dst + d].copy_from_slice(&q[src..src + d]);
                    }
                }
            }
            let got = causal_attention_strided(&qt, heads, view(kb, d), view(vb, dv), window, 0.3)
                .unwrap();
            for b in 0..batch {
                for h in 0..heads {
                    for i in 0..q_len {
                        let w = &want[((b * heads + h) * q_len + i) * dv..][..dv];
                        let g = &got[((b * q_len + i) * heads + h) * dv..][..dv];
                        assert_eq!(w, g, "{window:?} b{b} h{h} i{i}");
                    }
                }
            }
            // A view reaching past its storage is refused, not read.
            let short = HostStrided {
                storage: &kb[..3 + (batch * kv_heads - 1) * cap * d + kv_len * d - 1],
                ..view(kb, d)
            };
            assert!(
                causal_attention_strided(&qt, heads, short, view(vb, dv), window, 0.3).is_err()
            );
        }
    }

    #[test]
    fn exp_is_accurate_on_its_domain() {
        let mut worst = 0.0f64;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            if want > 1e-37 {
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.001;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let s = AttentionShape {
            batch: 1,
            heads: 3,
            kv_heads: 2,
            q_len: 1,
            kv_len: 1,
            head_dim: 1,
            v_dim: 1,
        };
        assert!(causal_attention(&[0.0; 3], &[0.0; 2], &[0.0; 2], s, None, 1.0).is_err());
        let s = AttentionShape {
            heads: 2,
            q_len: 2,
            ..s
        };
        assert!(causal_attention(&[0.0; 4], &[0.0; 2], &[0.0; 2], s, None, 1.0).is_err());
    }
}
