//! [`QuantizedKv`]: the quantized prefix that attention scores and weighs in place, tile by tile.

use std::sync::Arc;

use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

use super::blocks::{Block, Layout, QuantAxis};
use crate::cache::PackedPrefix;
use crate::error::{KvError, Result};

/// Tokens dequantized at a time by the attention kernels (a tile stays in L1/L2).
const ATTEND_TILE: usize = 64;

impl Layout {
    /// Tokens per tile of the attention kernels: about 64, whole groups when grouped per channel.
    fn tile_tokens(&self) -> usize {
        match self.axis {
            QuantAxis::PerToken => ATTEND_TILE,
            QuantAxis::PerChannel => self.group * (ATTEND_TILE / self.group).max(1),
        }
    }

    /// Calls `f(first_token, tile)` for every tile of dequantized tokens of batch-head `row`,
    /// in order; `tile` holds whole tokens (`dim` values each) and is reused between calls.
    #[inline(always)]
    fn for_each_tile(&self, blocks: &[Arc<Block>], row: usize, mut f: impl FnMut(usize, &[f32])) {
        let step = self.tile_tokens();
        let mut buf = vec![0f32; step * self.dim];
        let mut at = 0;
        for block in blocks {
            let mut t0 = 0;
            while t0 < block.tokens {
                let t1 = (t0 + step).min(block.tokens);
                let tile = &mut buf[..(t1 - t0) * self.dim];
                self.dequantize_tokens(block, row, t0, t1, tile);
                f(at + t0, tile);
                t0 = t1;
            }
            at += block.tokens;
        }
    }
}

/// The quantized tokens of one layer as attention reads them: a snapshot sharing the cache's
/// blocks, with host kernels that attend to them one small dequantized tile at a time, so a
/// decode step never materialises (or uploads) the dequantized prefix.
#[derive(Debug, Clone)]
pub(crate) struct QuantizedKv {
    pub(super) layer: usize,
    pub(super) batch: usize,
    pub(super) tokens: usize,
    pub(super) key_layout: Layout,
    pub(super) value_layout: Layout,
    pub(super) keys: Arc<Vec<Arc<Block>>>,
    pub(super) values: Arc<Vec<Arc<Block>>>,
    pub(super) dtype: DType,
    pub(super) device: Device,
}

impl QuantizedKv {
    /// Key/value heads.
    pub fn heads(&self) -> usize {
        self.key_layout.rows / self.batch
    }

    /// The dequantized keys and values, `[batch, heads, len, head_dim]` in the cache dtype
    /// (what attention attends to; for callers that want plain tensors).
    pub fn dequantize(&self) -> (Tensor<4>, Tensor<4>) {
        let h = self.heads();
        let make = |data: Vec<f32>, d: usize| {
            Tensor::<4>::from_data(
                TensorData::new(data, [self.batch, h, self.tokens, d]),
                (&self.device, DType::F32),
            )
            .cast(self.dtype)
        };
        (
            make(self.key_layout.dequantize(&self.keys), self.key_layout.dim),
            make(
                self.value_layout.dequantize(&self.values),
                self.value_layout.dim,
            ),
        )
    }

    /// Checks that `t` is `[batch, heads, _, last]`.
    fn check(&self, what: &str, t: &Tensor<4>, last: usize) -> Result<()> {
        let [b, h, _, d] = t.dims();
        if (b, h, d) != (self.batch, self.heads(), last) {
            return Err(KvError::Shape {
                layer: self.layer,
                what: format!(
                    "{what} [{b}, {h}, _, {d}] does not match the quantized prefix [{}, {}, _, {last}]",
                    self.batch,
                    self.heads()
                ),
            });
        }
        Ok(())
    }

    /// `query · keysᵀ` against the prefix: `query` `[batch, heads, rows, head_dim]` (the query
    /// heads sharing a kv head folded into `rows`) gives f32 scores `[batch, heads, rows, len]`
    /// on the query's device (unscaled, unmasked).
    pub fn scores(&self, query: Tensor<4>) -> Result<Tensor<4>> {
        self.check("query", &query, self.key_layout.dim)?;
        let [b, h, rows, d] = query.dims();
        let device = query.device();
        let q = host_f32(query);
        let t = self.tokens;
        let mut out = vec![0f32; b * h * rows * t];
        if t > 0 && rows > 0 {
            out.par_chunks_mut(rows * t)
                .enumerate()
                .for_each(|(row, dst)| {
                    let q = &q[row * rows * d..(row + 1) * rows * d];
                    simd::dispatch(|| self.scores_row(row, q, d, t, dst));
                });
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [b, h, rows, t]),
            (&device, DType::F32),
        ))
    }

    /// `probs · values` over the prefix: attention weights `[batch, heads, rows, len]` give
    /// `[batch, heads, rows, head_dim]` in f32 on the weights' device.
    pub fn weighted_values(&self, probs: Tensor<4>) -> Result<Tensor<4>> {
        self.check("attention weights", &probs, self.tokens)?;
        let [b, h, rows, t] = probs.dims();
        let dv = self.value_layout.dim;
        let device = probs.device();
        let p = host_f32(probs);
        let mut out = vec![0f32; b * h * rows * dv];
        if t > 0 && rows > 0 {
            out.par_chunks_mut(rows * dv)
                .enumerate()
                .for_each(|(row, dst)| {
                    let p = &p[row * rows * t..(row + 1) * rows * t];
                    simd::dispatch(|| self.weighted_values_row(row, p, t, dv, dst));
                });
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [b, h, rows, dv]),
            (&device, DType::F32),
        ))
    }
}

impl QuantizedKv {
    /// Scores of the `rows` queries `q` of batch-head `row` against its keys, into `dst`.
    #[inline(always)]
    fn scores_row(&self, row: usize, q: &[f32], d: usize, t: usize, dst: &mut [f32]) {
        self.key_layout
            .for_each_tile(&self.keys, row, |first, tile| {
                for (i, qi) in q.chunks_exact(d).enumerate() {
                    let dst = &mut dst[i * t + first..];
                    for (j, key) in tile.chunks_exact(d).enumerate() {
                        dst[j] = dot(qi, key);
                    }
                }
            });
    }

    /// `probs · values` for the `rows` weight rows `p` of batch-head `row`, into `dst`.
    #[inline(always)]
    fn weighted_values_row(&self, row: usize, p: &[f32], t: usize, dv: usize, dst: &mut [f32]) {
        self.value_layout
            .for_each_tile(&self.values, row, |first, tile| {
                for (pi, acc) in p.chunks_exact(t).zip(dst.chunks_exact_mut(dv)) {
                    for (&w, value) in pi[first..].iter().zip(tile.chunks_exact(dv)) {
                        if w != 0.0 {
                            for (a, &v) in acc.iter_mut().zip(value) {
                                *a += w * v;
                            }
                        }
                    }
                }
            });
    }
}

/// Runs a kernel compiled for the widest vector extension the CPU has: the tile dequantization
/// and the dot products are plain loops that the compiler vectorises to the target's width.
mod simd {
    /// Calls `f` inside a function compiled with AVX-512 or AVX2 + FMA where the CPU has them.
    #[inline(always)]
    pub(super) fn dispatch<R>(f: impl FnOnce() -> R) -> R {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected on this CPU.
                return unsafe { avx512(f) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                return unsafe { avx2(f) };
            }
        }
        f()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

impl PackedPrefix for QuantizedKv {
    fn len(&self) -> usize {
        self.tokens
    }

    fn scores(&self, query: Tensor<4>) -> Result<Tensor<4>> {
        QuantizedKv::scores(self, query)
    }

    fn weighted_values(&self, probs: Tensor<4>) -> Result<Tensor<4>> {
        QuantizedKv::weighted_values(self, probs)
    }

    fn dequantize(&self) -> (Tensor<4>, Tensor<4>) {
        QuantizedKv::dequantize(self)
    }
}

/// A tensor's values on the host as f32.
fn host_f32(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

/// Dot product with 8 independent lanes (auto-vectorised).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Cache, MaskLayout};
    use crate::quantized::testing::{config, host, random};
    use crate::quantized::{QuantBackend, QuantizedCache, QuantizedCacheConfig};

    #[test]
    fn the_view_attends_to_the_prefix_like_its_dequantized_tensors() {
        // Every layout: per-channel / per-token keys and values, both backends, 2/4/8 bits,
        // several blocks (prefill + flushes + a partial last tile), batch 2, f32 and bf16.
        let cases = [
            (
                QuantBackend::Quanto,
                4,
                QuantAxis::PerChannel,
                QuantAxis::PerToken,
                DType::F32,
            ),
            (
                QuantBackend::Hqq,
                2,
                QuantAxis::PerToken,
                QuantAxis::PerChannel,
                DType::F32,
            ),
            (
                QuantBackend::Quanto,
                8,
                QuantAxis::PerToken,
                QuantAxis::PerToken,
                DType::BF16,
            ),
            (
                QuantBackend::Hqq,
                4,
                QuantAxis::PerChannel,
                QuantAxis::PerChannel,
                DType::F16,
            ),
        ];
        for (i, (backend, nbits, key_axis, value_axis, dtype)) in cases.into_iter().enumerate() {
            let cfg = QuantizedCacheConfig {
                key_axis,
                value_axis,
                ..config(backend, nbits, 8, 16)
            };
            let mut cache = QuantizedCache::new(cfg).unwrap();
            let seed = 100 * i as u64;
            let (k, v) = (
                random([2, 3, 150, 16], seed, dtype),
                random([2, 3, 150, 16], seed + 1, dtype),
            );
            cache
                .update(0, k, v, &(0..150).collect::<Vec<_>>())
                .unwrap();
            let mut view = None;
            for p in 150..190 {
                let nk = random([2, 3, 1, 16], seed + p as u64, dtype);
                let nv = random([2, 3, 1, 16], seed + 7 * p as u64, dtype);
                view = Some(cache.update_view(0, nk, nv, &[p]).unwrap());
            }
            let view = view.unwrap();
            let prefix = view.prefix().expect("a quantized prefix");
            assert!(prefix.len() >= 160, "{}", prefix.len());
            assert_eq!(view.layout, MaskLayout::contiguous(0, 190));
            assert_eq!(prefix.len() + view.keys.dims()[2], 190);
            let (dk, dv) = prefix.dequantize();
            // Three query rows per kv head (folded query heads).
            let q = random([2, 3, 3, 16], seed + 999, DType::F32);
            let want = host(q.clone().matmul(dk.cast(DType::F32).swap_dims(2, 3)));
            let got = host(prefix.scores(q.clone().cast(dtype)).unwrap());
            // Half dtypes: the reference's keys went through the cache dtype, ours stay f32.
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 } * scale;
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= tol, "{i}: {a} vs {b}");
            }
            let probs = burn::tensor::activation::softmax(
                random([2, 3, 3, prefix.len()], seed + 5, DType::F32),
                3,
            );
            let want = host(probs.clone().matmul(dv.cast(DType::F32)));
            let got = host(prefix.weighted_values(probs).unwrap());
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 } * scale;
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= tol, "{i}: {a} vs {b}");
            }
            // The dense form is the prefix then the recent tokens, as `update` returns.
            let (all_k, _, _) = view.clone().into_dense();
            assert_eq!(all_k.dims(), [2, 3, 190, 16]);
            // Shapes that do not fit are typed errors.
            assert!(matches!(
                prefix.scores(random([2, 3, 1, 8], 1, dtype)),
                Err(KvError::Shape { .. })
            ));
            assert!(matches!(
                prefix.weighted_values(random([2, 3, 1, 5], 1, DType::F32)),
                Err(KvError::Shape { .. })
            ));
        }
    }
}
