//! [`QuantizedKv`]: the quantized prefix that attention scores and weighs in place, tile by tile.

use std::sync::Arc;

use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

use super::blocks::{Block, Layout, QuantAxis};
use crate::cache::PackedPrefix;
use crate::error::{KvError, Result};

/// Tokens dequantized at a time by the attention kernels (a tile stays in L1/L2).
const ATTEND_TILE: usize = 64;

/// Tokens per task of the attention kernels: a long prefix is split over the pool by tokens
/// as well as by batch-head (a model with 3 kv heads would otherwise keep 2 cores busy for
/// only 2/3 of the step).
const TASK_TOKENS: usize = 1024;

/// A stretch of about [`TASK_TOKENS`] consecutive tokens of the prefix, one task's share:
/// its first token, its length and its tiles.
#[derive(Debug)]
struct Run {
    first: usize,
    tokens: usize,
    tiles: Vec<Tile>,
}

/// Tokens `t0..t1` of block `block`, the `at`-th token on of their [`Run`]; at most one
/// tile of the kernels ([`Layout::tile_tokens`]), starting on a tile boundary of the block.
#[derive(Debug, Clone, Copy)]
struct Tile {
    at: usize,
    block: usize,
    t0: usize,
    t1: usize,
}

impl Layout {
    /// Tokens per tile of the attention kernels: about 64, whole groups when grouped per channel.
    fn tile_tokens(&self) -> usize {
        match self.axis {
            QuantAxis::PerToken => ATTEND_TILE,
            QuantAxis::PerChannel => self.group * (ATTEND_TILE / self.group).max(1),
        }
    }

    /// `blocks` cut into [`Run`]s of at least [`TASK_TOKENS`] tokens (the last may be
    /// shorter) made of whole tiles of their blocks, so per-channel groups stay whole.
    fn runs(&self, blocks: &[Arc<Block>]) -> Vec<Run> {
        let step = self.tile_tokens();
        let fresh = |first| Run {
            first,
            tokens: 0,
            tiles: Vec::new(),
        };
        let mut runs = Vec::new();
        let mut run = fresh(0);
        for (block, b) in blocks.iter().enumerate() {
            let mut t0 = 0;
            while t0 < b.tokens {
                let t1 = (t0 + step).min(b.tokens);
                run.tiles.push(Tile {
                    at: run.tokens,
                    block,
                    t0,
                    t1,
                });
                run.tokens += t1 - t0;
                if run.tokens >= TASK_TOKENS {
                    let next = fresh(run.first + run.tokens);
                    runs.push(std::mem::replace(&mut run, next));
                }
                t0 = t1;
            }
        }
        if run.tokens > 0 || runs.is_empty() {
            runs.push(run);
        }
        runs
    }
}

/// A method `$simd` that runs `$body` (an `#[inline(always)]` method of plain loops) as compiled
/// for the widest vector extension of this CPU: `$avx512` and `$avx2` are copies of it built
/// with those target features, so the compiler vectorises all of the loop for them.
macro_rules! simd_copies {
    (
        $(#[$doc:meta])*
        $simd:ident, $avx512:ident, $avx2:ident => $body:ident($($arg:ident: $ty:ty),* $(,)?)
    ) => {
        $(#[$doc])*
        fn $simd(&self, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            match simd::level() {
                // SAFETY: the level's features were detected on this CPU.
                simd::Level::Avx512 => return unsafe { self.$avx512($($arg),*) },
                // SAFETY: as above.
                simd::Level::Avx2 => return unsafe { self.$avx2($($arg),*) },
                simd::Level::Plain => {}
            }
            self.$body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn $avx512(&self, $($arg: $ty),*) {
            self.$body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2(&self, $($arg: $ty),*) {
            self.$body($($arg),*)
        }
    };
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
            let runs = self.key_layout.runs(&self.keys);
            // One task per (batch-head, run of tokens), each scoring into its own buffer.
            let parts: Vec<Vec<f32>> = (0..b * h * runs.len())
                .into_par_iter()
                .map(|task| {
                    let (row, r) = (task / runs.len(), task % runs.len());
                    let (run, n) = (&runs[r], runs[r].tokens);
                    let q = &q[row * rows * d..(row + 1) * rows * d];
                    let mut dst = vec![0f32; rows * n];
                    self.scores_row_simd(run, row, q, d, &mut dst);
                    dst
                })
                .collect();
            for (task, part) in parts.iter().enumerate() {
                let (row, r) = (task / runs.len(), task % runs.len());
                let (first, n) = (runs[r].first, runs[r].tokens);
                for (i, src) in part.chunks_exact(n).enumerate() {
                    out[(row * rows + i) * t + first..][..n].copy_from_slice(src);
                }
            }
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
            let runs = self.value_layout.runs(&self.values);
            // One task per (batch-head, run of tokens), each summing its tokens into its own
            // accumulators; the runs' sums are added in token order.
            let parts: Vec<Vec<f32>> = (0..b * h * runs.len())
                .into_par_iter()
                .map(|task| {
                    let (row, r) = (task / runs.len(), task % runs.len());
                    let p = &p[row * rows * t..(row + 1) * rows * t];
                    let mut dst = vec![0f32; rows * dv];
                    self.weighted_values_row_simd(&runs[r], row, p, t, dv, &mut dst);
                    dst
                })
                .collect();
            for (row, out) in out.chunks_exact_mut(rows * dv).enumerate() {
                for part in &parts[row * runs.len()..(row + 1) * runs.len()] {
                    out.iter_mut().zip(part).for_each(|(o, v)| *o += v);
                }
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [b, h, rows, dv]),
            (&device, DType::F32),
        ))
    }
}

impl QuantizedKv {
    /// Scores of the `rows` queries `q` of batch-head `row` against the keys of `run`, into
    /// `dst` (`[rows, run.tokens]`). Plain loops over inlined helpers (no closures), so the
    /// per-SIMD-level copies below compile all of it for their extension.
    #[inline(always)]
    fn scores_row(&self, run: &Run, row: usize, q: &[f32], d: usize, dst: &mut [f32]) {
        let layout = &self.key_layout;
        let t = run.tokens;
        let mut buf = vec![0f32; layout.tile_tokens() * layout.dim];
        for tile in &run.tiles {
            let keys = &mut buf[..(tile.t1 - tile.t0) * layout.dim];
            layout.dequantize_tokens(&self.keys[tile.block], row, tile.t0, tile.t1, keys);
            #[cfg(target_arch = "x86_64")]
            if d.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
                for (i, qi) in q.chunks_exact(d).enumerate() {
                    let dst = &mut dst[i * t + tile.at..][..keys.len() / d];
                    // SAFETY: the feature was detected on this CPU.
                    unsafe { x86::dots_avx512(qi, keys, dst) };
                }
                continue;
            }
            for (i, qi) in q.chunks_exact(d).enumerate() {
                let dst = &mut dst[i * t + tile.at..];
                for (j, key) in keys.chunks_exact(d).enumerate() {
                    dst[j] = dot(qi, key);
                }
            }
        }
    }

    /// `probs · values` over the values of `run` for the `rows` weight rows `p` (`[rows, t]`,
    /// the whole prefix) of batch-head `row`, added into `dst` (`[rows, dv]`).
    #[inline(always)]
    fn weighted_values_row(
        &self,
        run: &Run,
        row: usize,
        p: &[f32],
        t: usize,
        dv: usize,
        dst: &mut [f32],
    ) {
        let layout = &self.value_layout;
        let mut buf = vec![0f32; layout.tile_tokens() * layout.dim];
        for tile in &run.tiles {
            let values = &mut buf[..(tile.t1 - tile.t0) * layout.dim];
            layout.dequantize_tokens(&self.values[tile.block], row, tile.t0, tile.t1, values);
            let first = run.first + tile.at;
            for (pi, out) in p.chunks_exact(t).zip(dst.chunks_exact_mut(dv)) {
                let w = &pi[first..];
                match dv {
                    64 => accumulate::<64>(w, values, out),
                    128 => accumulate::<128>(w, values, out),
                    _ => {
                        for (&w, value) in w.iter().zip(values.chunks_exact(dv)) {
                            if w != 0.0 {
                                for (a, &v) in out.iter_mut().zip(value) {
                                    *a += w * v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    simd_copies!(
        /// [`Self::scores_row`] compiled for the widest vector extension the CPU has.
        scores_row_simd, scores_row_avx512, scores_row_avx2 => scores_row(
            run: &Run, row: usize, q: &[f32], d: usize, dst: &mut [f32]
        )
    );

    simd_copies!(
        /// [`Self::weighted_values_row`] compiled for the widest vector extension the CPU has.
        weighted_values_row_simd, weighted_values_row_avx512, weighted_values_row_avx2 =>
            weighted_values_row(
                run: &Run, row: usize, p: &[f32], t: usize, dv: usize, dst: &mut [f32]
            )
    );
}

/// AVX-512 scores: sixteen keys at a time, their sums reduced together.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `out[j] = q · keys[j]` for the `out.len()` keys of `keys` (`q.len()` values each, a
    /// multiple of 16). Each key's products collect in one vector; sixteen such vectors are
    /// summed lane-wise by a transpose tree (45 shuffles and adds for 16 keys, where reducing
    /// each key alone takes 8 dependent operations).
    #[target_feature(enable = "avx512f")]
    pub(super) fn dots_avx512(q: &[f32], keys: &[f32], out: &mut [f32]) {
        let d = q.len();
        assert!(d.is_multiple_of(16) && keys.len() >= out.len() * d);
        let mut j = 0;
        while j + 16 <= out.len() {
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in (0..d).step_by(16) {
                // SAFETY: `c + 16 <= d`, and key `j + k < out.len()` lies in `keys`.
                unsafe {
                    let qv = _mm512_loadu_ps(q.as_ptr().add(c));
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let kv = _mm512_loadu_ps(keys.as_ptr().add((j + k) * d + c));
                        *acc = _mm512_fmadd_ps(qv, kv, *acc);
                    }
                }
            }
            let sums = reduce16(acc);
            // SAFETY: `j + 16 <= out.len()`.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(j), sums) };
            j += 16;
        }
        for (j, o) in out.iter_mut().enumerate().skip(j) {
            let key = &keys[j * d..(j + 1) * d];
            let mut acc = _mm512_setzero_ps();
            for c in (0..d).step_by(16) {
                // SAFETY: `c + 16 <= d` for both slices.
                unsafe {
                    acc = _mm512_fmadd_ps(
                        _mm512_loadu_ps(q.as_ptr().add(c)),
                        _mm512_loadu_ps(key.as_ptr().add(c)),
                        acc,
                    );
                }
            }
            *o = _mm512_reduce_add_ps(acc);
        }
    }

    /// Lane `k` of the result is the sum of the 16 lanes of `v[k]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn reduce16(v: [__m512; 16]) -> __m512 {
        // Pairs: in every 128-bit block, [a0+a2, b0+b2, a1+a3, b1+b3].
        let p: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Quads: every 128-bit block holds its 4 keys' partial sums, in order.
        let q: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (p[2 * i], p[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        });
        // Add the four 128-bit blocks of each quad: two rounds of block shuffles.
        let fold = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        };
        fold(fold(q[0], q[1]), fold(q[2], q[3]))
    }
}

/// The widest vector extension of this CPU that the kernels have a copy for.
#[cfg(target_arch = "x86_64")]
mod simd {
    #[derive(Clone, Copy)]
    pub(super) enum Level {
        Avx512,
        Avx2,
        Plain,
    }

    pub(super) fn level() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx512f") {
                Level::Avx512
            } else if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                Level::Avx2
            } else {
                Level::Plain
            }
        })
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

/// `out += Σ_j w[j] · values[j]` over the tile's tokens for a head width the compiler knows,
/// so the sum stays in registers for the whole tile instead of going through `out` per token.
#[inline(always)]
fn accumulate<const DV: usize>(w: &[f32], values: &[f32], out: &mut [f32]) {
    let mut acc = [0f32; DV];
    for (&w, value) in w.iter().zip(values.as_chunks::<DV>().0) {
        if w != 0.0 {
            for (a, &v) in acc.iter_mut().zip(value) {
                *a += w * v;
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o += a;
    }
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

    /// The AVX-512 scores (16 keys reduced together, then the rest one by one) against the
    /// portable dot product.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_scores_match_the_portable_dot() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for d in [16, 64, 128] {
            for n in [1, 15, 16, 17, 40, 64] {
                let value = |i: usize| ((i * 37 + 11) % 101) as f32 / 50.0 - 1.0;
                let q: Vec<f32> = (0..d).map(value).collect();
                let keys: Vec<f32> = (0..n * d).map(|i| value(i + 7)).collect();
                let mut got = vec![f32::NAN; n];
                // SAFETY: the feature was detected.
                unsafe { x86::dots_avx512(&q, &keys, &mut got) };
                for (j, g) in got.iter().enumerate() {
                    let want = dot(&q, &keys[j * d..(j + 1) * d]);
                    assert!((g - want).abs() <= 1e-4 * d as f32, "d {d} n {n} key {j}");
                }
            }
        }
    }

    #[test]
    fn the_view_attends_to_the_prefix_like_its_dequantized_tensors() {
        // Every layout: per-channel / per-token keys and values, both backends, 2/4/8 bits,
        // several blocks (prefill + flushes + a partial last tile), batch 2, f32 and bf16, head
        // widths the kernels specialise (64, 128) and others.
        let cases = [
            (
                QuantBackend::Quanto,
                4,
                QuantAxis::PerChannel,
                QuantAxis::PerToken,
                DType::F32,
                16,
            ),
            (
                QuantBackend::Hqq,
                2,
                QuantAxis::PerToken,
                QuantAxis::PerChannel,
                DType::F32,
                64,
            ),
            (
                QuantBackend::Quanto,
                8,
                QuantAxis::PerToken,
                QuantAxis::PerToken,
                DType::BF16,
                16,
            ),
            (
                QuantBackend::Hqq,
                4,
                QuantAxis::PerChannel,
                QuantAxis::PerChannel,
                DType::F16,
                128,
            ),
        ];
        for (i, (backend, nbits, key_axis, value_axis, dtype, dim)) in cases.into_iter().enumerate()
        {
            let cfg = QuantizedCacheConfig {
                key_axis,
                value_axis,
                ..config(backend, nbits, 8, 16)
            };
            let mut cache = QuantizedCache::new(cfg).unwrap();
            let seed = 100 * i as u64;
            // Odd cases hold a prefix longer than two of the kernels' token runs, so scores and
            // weighted values are split over tasks by tokens as well as by head.
            let prefill = if i % 2 == 1 {
                2 * TASK_TOKENS + 300
            } else {
                150
            };
            let total = prefill + 40;
            let (k, v) = (
                random([2, 3, prefill, dim], seed, dtype),
                random([2, 3, prefill, dim], seed + 1, dtype),
            );
            cache
                .update(0, k, v, &(0..prefill).collect::<Vec<_>>())
                .unwrap();
            let mut view = None;
            for p in prefill..total {
                let nk = random([2, 3, 1, dim], seed + p as u64, dtype);
                let nv = random([2, 3, 1, dim], seed + 7 * p as u64, dtype);
                view = Some(cache.update_view(0, nk, nv, &[p]).unwrap());
            }
            let view = view.unwrap();
            let prefix = view.prefix().expect("a quantized prefix");
            assert!(prefix.len() >= prefill + 10, "{}", prefix.len());
            assert_eq!(view.layout, MaskLayout::contiguous(0, total));
            assert_eq!(prefix.len() + view.keys.dims()[2], total);
            let (dk, dv) = prefix.dequantize();
            // Three query rows per kv head (folded query heads).
            let q = random([2, 3, 3, dim], seed + 999, DType::F32);
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
            assert_eq!(all_k.dims(), [2, 3, total, dim]);
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
