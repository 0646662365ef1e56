//! Host kernels of a decode step (one query per row): RMS norm, rotate-half RoPE, and
//! attention of the new queries over a KV cache read in place. Each computes in f32 what the
//! tensor path they replace computes (attention as flash decoding does: softmax partials per
//! chunk of keys, combined at the end).

use rayon::prelude::*;

use super::attention::exp_nonpositive;
use super::dot::{Level, dot_f32};
use crate::HostStrided;

/// Multiply-adds of a decode attention below which it runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// `out = weight * x / sqrt(mean(x²) + eps)` for each row of `x` (`[rows, width]`).
///
/// # Panics
/// If `weight` is not `width` long or `x`, `out` are not whole rows of the same count.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    assert!(width > 0 && x.len().is_multiple_of(width) && out.len() == x.len());
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean = xr.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = (v * inv) * w;
        }
    }
}

/// Rotates every head of `x` (`[rows, heads * head_dim]`) by RoPE in the rotate-half layout:
/// `x * cos + rotate_half(x) * sin`, with `cos`/`sin` `[rows, head_dim]` (one position per row).
///
/// # Panics
/// If the widths disagree.
pub fn rotate_half(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    assert!(head_dim > 0 && head_dim.is_multiple_of(2) && cos.len() == sin.len());
    let rows = cos.len() / head_dim;
    assert!(rows > 0 && x.len().is_multiple_of(rows) && (x.len() / rows).is_multiple_of(head_dim));
    let width = x.len() / rows;
    for (r, row) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (
            &cos[r * head_dim..(r + 1) * head_dim],
            &sin[r * head_dim..(r + 1) * head_dim],
        );
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * c[i] + (-x2) * s[i];
                head[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
}

/// Attention of one query per row over cached keys and values read in place.
///
/// `q` is `[batch, heads * head_dim]`; `keys` and `values` are `[batch, kv_heads, kv_len, d]`
/// views whose last dimension is contiguous; query head `h` reads kv head `h / (heads /
/// kv_heads)`. Every key is visible (no mask). Returns `[batch, heads * v_dim]`, or `None` when a
/// view's rows are not contiguous or the shapes disagree.
pub fn decode_attention(
    q: &[f32],
    heads: usize,
    keys: HostStrided<'_, 4>,
    values: HostStrided<'_, 4>,
    scale: f32,
) -> Option<Vec<f32>> {
    let [batch, kv_heads, kv_len, dim] = keys.shape;
    let [vb, vh, vl, v_dim] = values.shape;
    if (vb, vh, vl) != (batch, kv_heads, kv_len)
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || q.len() != batch * heads * dim
        || kv_len == 0
    {
        return None;
    }
    let contiguous = |v: &HostStrided<'_, 4>| v.strides[3] == 1 || v.shape[3] <= 1;
    if !contiguous(&keys) || !contiguous(&values) {
        return None;
    }
    let rep = heads / kv_heads;
    let level = Level::detect();
    let chunks = kv_len.div_ceil(KEY_CHUNK);
    // One task per (batch row, kv head, chunk of keys): the query heads sharing the kv head
    // read each key and value once (a cache larger than the L2 cache would otherwise stream
    // from memory once per query head), and long caches split over the pool by keys.
    let task = |t: usize| -> Vec<Partial> {
        let (bg, c) = (t / chunks, t % chunks);
        let (b, g) = (bg / kv_heads, bg % kv_heads);
        let job = ChunkJob {
            keys: &keys,
            values: &values,
            b,
            g,
            span: c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(kv_len),
            scale,
        };
        (0..rep)
            .map(|r| job.run(level, &q[(b * heads + g * rep + r) * dim..][..dim]))
            .collect()
    };
    let tasks = batch * kv_heads * chunks;
    // A short cache is less work than waking the pool's other threads.
    let parts: Vec<Vec<Partial>> = if batch * heads * kv_len * (dim + v_dim) < PARALLEL_MIN_MACS {
        (0..tasks).map(task).collect()
    } else {
        (0..tasks).into_par_iter().map(task).collect()
    };
    // Combine the chunks of each head: rescale to the largest maximum, then normalise.
    let mut out = vec![0.0f32; batch * heads * v_dim];
    for (bg, head_parts) in parts.chunks(chunks).enumerate() {
        let (b, g) = (bg / kv_heads, bg % kv_heads);
        for r in 0..rep {
            let h = g * rep + r;
            let o = &mut out[(b * heads + h) * v_dim..][..v_dim];
            let max = head_parts
                .iter()
                .map(|p| p[r].max)
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for part in head_parts {
                let p = &part[r];
                let w = exp_nonpositive(p.max - max);
                sum += p.sum * w;
                for (o, x) in o.iter_mut().zip(&p.out) {
                    *o += w * x;
                }
            }
            let inv = 1.0 / sum;
            for x in o.iter_mut() {
                *x *= inv;
            }
        }
    }
    Some(out)
}

/// One query head's attention over a chunk of one kv head's keys.
struct ChunkJob<'v, 'a> {
    keys: &'v HostStrided<'a, 4>,
    values: &'v HostStrided<'a, 4>,
    b: usize,
    g: usize,
    span: std::ops::Range<usize>,
    scale: f32,
}

impl ChunkJob<'_, '_> {
    fn row<'a>(&self, v: &HostStrided<'a, 4>, j: usize) -> &'a [f32] {
        let start = v.offset + self.b * v.strides[0] + self.g * v.strides[1] + j * v.strides[2];
        &v.storage[start..start + v.shape[3]]
    }

    fn run(&self, level: Level, q: &[f32]) -> Partial {
        match level {
            // SAFETY: the level was detected on this CPU.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { self.run_avx512(level, q) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { self.run_avx2(level, q) },
            Level::Portable => self.body(level, q),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    fn run_avx512(&self, level: Level, q: &[f32]) -> Partial {
        self.body(level, q)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_avx2(&self, level: Level, q: &[f32]) -> Partial {
        self.body(level, q)
    }

    /// Scores, their softmax partial and the weighted values (compiled per SIMD level, so the
    /// exponential and the value loop vectorise with FMA).
    #[inline(always)]
    fn body(&self, level: Level, q: &[f32]) -> Partial {
        let mut scores: Vec<f32> = self
            .span
            .clone()
            .map(|j| dot_f32(level, self.row(self.keys, j), q) * self.scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in &mut scores {
            *s = exp_nonpositive(*s - max);
        }
        let sum = scores.iter().sum::<f32>();
        let mut out = vec![0.0f32; self.values.shape[3]];
        for (j, p) in self.span.clone().zip(&scores) {
            for (o, v) in out.iter_mut().zip(self.row(self.values, j)) {
                *o += p * v;
            }
        }
        Partial { max, sum, out }
    }
}

/// Keys per task of [`decode_attention`] (and per softmax partial).
const KEY_CHUNK: usize = 512;

/// One chunk's share of a head's attention: its score maximum, the sum of `e^(s - max)` and the
/// unnormalised weighted values.
struct Partial {
    max: f32,
    sum: f32,
    out: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values;

    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        [batch, heads, kv_heads, kv_len, dim]: [usize; 5],
        scale: f32,
    ) -> Vec<f32> {
        let rep = heads / kv_heads;
        let mut out = vec![0.0; batch * heads * dim];
        for b in 0..batch {
            for h in 0..heads {
                let g = h / rep;
                let qh = &q[(b * heads + h) * dim..][..dim];
                let at = |j: usize| ((b * kv_heads + g) * kv_len + j) * dim;
                let s: Vec<f64> = (0..kv_len)
                    .map(|j| {
                        let kj = &k[at(j)..at(j) + dim];
                        qh.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for d in 0..dim {
                        out[(b * heads + h) * dim + d] += (p / sum * v[at(j) + d] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn decode_attention_matches_a_naive_grouped_query_attention_on_a_cache_view() {
        let device = crate::cpu_device().unwrap();
        // A short cache (one chunk of keys) and a long one (three chunks, combined).
        for (cap, len) in [(40, 33), (1200, 1100)] {
            let (batch, heads, kv_heads, dim) = (2, 6, 2, 64);
            let k_all = test_values(batch * kv_heads * cap * dim, 1);
            let v_all = test_values(batch * kv_heads * cap * dim, 2);
            let q = test_values(batch * heads * dim, 3);
            let tensor = |v: Vec<f32>| {
                crate::Tensor::<4>::from_data(
                    crate::TensorData::new(v, [batch, kv_heads, cap, dim]),
                    &device,
                )
                .slice([0..batch, 0..kv_heads, 0..len, 0..dim])
            };
            let (kt, vt) = (tensor(k_all), tensor(v_all));
            let compact = |t: &crate::Tensor<4>| {
                t.clone()
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap()
            };
            let scale = 1.0 / (dim as f32).sqrt();
            let expected = naive_attention(
                &q,
                &compact(&kt),
                &compact(&vt),
                [batch, heads, kv_heads, len, dim],
                scale,
            );
            let got = crate::read_host_f32(&kt, |k| {
                crate::read_host_f32(&vt, |v| decode_attention(&q, heads, k, v, scale))
            })
            .flatten()
            .flatten()
            .expect("host views");
            for (g, e) in got.iter().zip(&expected) {
                assert!((g - e).abs() < 1e-5, "{len} keys: {g} vs {e}");
            }
        }
    }

    #[test]
    fn rms_norm_and_rotate_half_compute_the_reference_formulas() {
        let x = test_values(2 * 8, 5);
        let w = test_values(8, 6);
        let mut out = vec![0.0; 16];
        rms_norm(&x, &w, 1e-5, &mut out);
        for r in 0..2 {
            let row = &x[r * 8..(r + 1) * 8];
            let ms = row.iter().map(|v| (v * v) as f64).sum::<f64>() / 8.0;
            for i in 0..8 {
                let e = row[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                assert!((out[r * 8 + i] as f64 - e).abs() < 1e-5);
            }
        }
        // One head of width 4 at angle pairs (a, b): rotate (x0, x2) by a and (x1, x3) by b.
        let (a, b) = (0.3f32, -1.1f32);
        let cos = [a.cos(), b.cos(), a.cos(), b.cos()];
        let sin = [a.sin(), b.sin(), a.sin(), b.sin()];
        let mut h = [1.0f32, 2.0, 3.0, 4.0];
        rotate_half(&mut h, 4, &cos, &sin);
        let rot = |x: f32, y: f32, t: f32| (x * t.cos() - y * t.sin(), y * t.cos() + x * t.sin());
        let (r0, r2) = rot(1.0, 3.0, a);
        let (r1, r3) = rot(2.0, 4.0, b);
        for (g, e) in h.iter().zip([r0, r1, r2, r3]) {
            assert!((g - e).abs() < 1e-6);
        }
    }

    #[test]
    fn decode_attention_refuses_mismatched_shapes() {
        let storage = vec![0.0f32; 64];
        let view = HostStrided {
            storage: &storage,
            offset: 0,
            strides: [32, 32, 4, 1],
            shape: [1, 1, 8, 4],
        };
        // 3 query heads cannot share 1 kv head's width-4 rows with a width-8 query.
        assert!(decode_attention(&[0.0; 8], 1, view, view, 1.0).is_none());
    }
}
