//! [`QuantizedCache`]: the KIVI quantized KV cache of transformers (`cache_implementation =
//! "quantized"`), with its two backends: `quanto`-style asymmetric min-max and `hqq`-style
//! half-quadratic optimisation of the zero point.
//!
//! Storage per layer: the old tokens as packed 2/4/8-bit codes with a scale and a zero per group
//! (in the cache dtype), and the most recent tokens (the *residual*) in full precision.
//! [`Cache::update`] returns the dequantized old tokens, the residual and the new tokens, like
//! transformers; [`Cache::update_view`] (what the Llama attention calls) costs O(new tokens): it
//! hands over the quantized tokens as a [`QuantizedKv`] that attention reads in place, one small
//! dequantized tile at a time, instead of dequantizing the whole prefix into tensors every step.
//!
//! Differences from transformers, on purpose:
//! * transformers dequantizes and re-quantizes the *whole* cache each time the residual fills,
//!   compounding the error; here only the tokens leaving the residual are quantized, and the
//!   quantized blocks are append-only (never touched again, except by `reorder`/`crop`).
//! * `axis_key`/`axis_value` mean a grouping along a named direction (see [`QuantAxis`]):
//!   per-token groups of `q_group_size` consecutive channels of one token, or per-channel groups
//!   of `q_group_size` consecutive tokens of one channel (KIVI's key quantization). transformers
//!   groups the flattened `[batch, heads, seq, head_dim]` tensor, which is the same thing for
//!   per-token groups whenever `q_group_size` divides `head_dim` (quanto `axis=0`, hqq `axis=1`).
//! * The default axes are KIVI's: keys per channel, values per token (transformers defaults to
//!   `axis_key = axis_value = 0`, i.e. per token for quanto and strided groups for hqq).
//!
//! Like transformers, the first update (prefill) of a layer is quantized at once and returned in
//! full precision; later tokens wait in the residual until it holds `residual_length` tokens.
//! With per-channel groups, only whole groups of tokens are quantized and the rest stays in the
//! residual.

use std::sync::Arc;

use burn::tensor::{DType, Device, Tensor, TensorData};
use cachet_tensor::MemoryFootprint;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::cache::{Cache, KvView, MaskLayout};
use crate::config::CacheConfig;
use crate::error::{KvError, Result};
use crate::store::{LayerStore, check_layer_order, check_pair, check_positions};

/// How scales and zero points are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantBackend {
    /// optimum-quanto's `MaxOptimizer`: asymmetric min-max,
    /// `code = clamp(round((x + shift) / scale))`, `x ≈ scale * code - shift`.
    Quanto,
    /// HQQ's `Quantizer` with `optimize_weights_proximal` (half-quadratic, l_p = 0.7 shrinkage,
    /// 20 iterations with early stop): `x ≈ (code - zero) * scale`.
    Hqq,
}

impl QuantBackend {
    /// The transformers name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quanto => "quanto",
            Self::Hqq => "hqq",
        }
    }
}

/// Which values share a scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantAxis {
    /// Groups of `q_group_size` consecutive channels of one token (KIVI's value quantization;
    /// quanto `axis=0`, hqq `axis=1` in transformers' numbering).
    PerToken,
    /// Groups of `q_group_size` consecutive tokens of one channel (KIVI's key quantization;
    /// quanto `axis=-1`, hqq `axis=0`).
    PerChannel,
}

impl QuantAxis {
    /// Parses transformers' axis number for `backend`.
    pub fn from_transformers(backend: QuantBackend, axis: i64) -> Option<Self> {
        match (backend, axis) {
            (QuantBackend::Quanto, 0) | (QuantBackend::Hqq, 1) => Some(Self::PerToken),
            (QuantBackend::Quanto, -1) | (QuantBackend::Hqq, 0) => Some(Self::PerChannel),
            _ => None,
        }
    }
}

/// Settings of a [`QuantizedCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedCacheConfig {
    /// Quantizer.
    pub backend: QuantBackend,
    /// Bits per value: 2, 4 or 8.
    pub nbits: u8,
    /// Values per group (capped at `head_dim` for per-token groups).
    pub q_group_size: usize,
    /// Recent tokens kept in full precision before being quantized.
    pub residual_length: usize,
    /// Grouping of keys.
    pub key_axis: QuantAxis,
    /// Grouping of values.
    pub value_axis: QuantAxis,
}

impl Default for QuantizedCacheConfig {
    /// transformers' defaults (quanto, 4 bits, groups of 64, residual of 128) with KIVI's axes.
    fn default() -> Self {
        Self {
            backend: QuantBackend::Quanto,
            nbits: 4,
            q_group_size: 64,
            residual_length: 128,
            key_axis: QuantAxis::PerChannel,
            value_axis: QuantAxis::PerToken,
        }
    }
}

impl QuantizedCacheConfig {
    /// Reads the quantized-cache keys of a transformers `cache_config` (`backend`, `nbits`,
    /// `axis_key`, `axis_value` in the backend's numbering, `q_group_size`, `residual_length`).
    pub fn from_cache_config(config: &CacheConfig) -> Result<Self> {
        let mut out = Self::default();
        if let Some(backend) = config.backend.as_deref() {
            out.backend = match backend.trim() {
                "quanto" => QuantBackend::Quanto,
                "hqq" | "HQQ" => QuantBackend::Hqq,
                other => {
                    return Err(KvError::Config(format!(
                        "unknown quantized cache backend {other:?} (expected \"quanto\" or \"hqq\")"
                    )));
                }
            };
        }
        if let Some(nbits) = config.nbits {
            out.nbits = nbits;
        }
        if let Some(g) = config.q_group_size {
            out.q_group_size = g;
        }
        if let Some(r) = config.residual_length {
            out.residual_length = r;
        }
        let axis = |name: &str, value: Option<i64>, default: QuantAxis| -> Result<QuantAxis> {
            match value {
                None => Ok(default),
                Some(a) => QuantAxis::from_transformers(out.backend, a).ok_or_else(|| {
                    let allowed = match out.backend {
                        QuantBackend::Quanto => "0 (per token) or -1 (per channel)",
                        QuantBackend::Hqq => "1 (per token) or 0 (per channel)",
                    };
                    KvError::Config(format!(
                        "{name} = {a} is not valid for the {} backend: expected {allowed}",
                        out.backend.as_str()
                    ))
                }),
            }
        };
        out.key_axis = axis("axis_key", config.axis_key, out.key_axis)?;
        out.value_axis = axis("axis_value", config.axis_value, out.value_axis)?;
        out.validate()?;
        Ok(out)
    }

    /// Checks the bit width, group size and residual length.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.nbits, 2 | 4 | 8) {
            return Err(KvError::Config(format!(
                "quantized cache nbits must be 2, 4 or 8, got {}",
                self.nbits
            )));
        }
        if self.q_group_size == 0 {
            return Err(KvError::Config("q_group_size must be at least 1".into()));
        }
        if self.residual_length == 0 {
            return Err(KvError::Config("residual_length must be at least 1".into()));
        }
        Ok(())
    }

    fn any_per_channel(&self) -> bool {
        self.key_axis == QuantAxis::PerChannel || self.value_axis == QuantAxis::PerChannel
    }
}

// ------------------------------------------------------------------------------------------------
// Quantizers (host side, f32 arithmetic as transformers on CPU)
// ------------------------------------------------------------------------------------------------

/// Scales and zero points, stored in the cache dtype (as transformers keeps them).
#[derive(Debug, Clone)]
enum Params {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Params {
    fn new(values: &[f32], dtype: DType) -> Self {
        match dtype {
            DType::F16 => Self::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            DType::BF16 => Self::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
            _ => Self::F32(values.to_vec()),
        }
    }

    /// The values after rounding to the storage dtype.
    fn rounded(values: &[f32], dtype: DType) -> Vec<f32> {
        let p = Self::new(values, dtype);
        (0..values.len()).map(|i| p.get(i)).collect()
    }

    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            Self::F32(v) => v[i],
            Self::F16(v) => v[i].to_f32(),
            Self::Bf16(v) => v[i].to_f32(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::Bf16(v) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::F32(v) => v.capacity() * 4,
            Self::F16(v) => v.capacity() * 2,
            Self::Bf16(v) => v.capacity() * 2,
        }
    }

    fn to_f32(&self) -> Vec<f32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

/// Packs `nbits`-bit codes, `8 / nbits` per byte, value `j` of a byte at bits `j * nbits`.
pub fn pack_codes(codes: &[u8], nbits: u8) -> Vec<u8> {
    let per = 8 / nbits as usize;
    let mask = ((1u16 << nbits) - 1) as u8;
    let mut out = vec![0u8; codes.len().div_ceil(per)];
    for (i, &c) in codes.iter().enumerate() {
        out[i / per] |= (c & mask) << ((i % per) * nbits as usize);
    }
    out
}

/// Inverse of [`pack_codes`] for `len` codes.
pub fn unpack_codes(packed: &[u8], nbits: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| code_at(packed, nbits, i)).collect()
}

#[inline]
fn code_at(packed: &[u8], nbits: u8, i: usize) -> u8 {
    let per = 8 / nbits as usize;
    let mask = ((1u16 << nbits) - 1) as u8;
    (packed[i / per] >> ((i % per) * nbits as usize)) & mask
}

/// One quantized tensor: codes in `[groups, group]` order plus one scale and zero per group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupQuantized {
    /// Codes, `group` per group, groups in order.
    pub codes: Vec<u8>,
    /// Quanto: the scale; hqq: the dequantization scale (`1 / scale` of the optimisation).
    pub scale: Vec<f32>,
    /// Quanto: the shift (`-min`); hqq: the zero point.
    pub zero: Vec<f32>,
}

impl GroupQuantized {
    /// Dequantized values, in the order of `codes`.
    pub fn dequantize(&self, backend: QuantBackend, group: usize) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| dequant(backend, c, self.scale[i / group], self.zero[i / group]))
            .collect()
    }
}

/// Writes codes `first..first + dst.len()` of `packed` into `dst` as floats.
fn decode_codes(packed: &[u8], nbits: u8, first: usize, dst: &mut [f32]) {
    let per = 8 / nbits as usize;
    if !first.is_multiple_of(per) {
        for (i, x) in dst.iter_mut().enumerate() {
            *x = code_at(packed, nbits, first + i) as f32;
        }
        return;
    }
    let bytes = &packed[first / per..];
    match nbits {
        8 => {
            for (x, &b) in dst.iter_mut().zip(bytes) {
                *x = b as f32;
            }
        }
        4 => {
            for (pair, &b) in dst.chunks_mut(2).zip(bytes) {
                pair[0] = (b & 0xF) as f32;
                if let Some(x) = pair.get_mut(1) {
                    *x = (b >> 4) as f32;
                }
            }
        }
        _ => {
            for (quad, &b) in dst.chunks_mut(4).zip(bytes) {
                for (j, x) in quad.iter_mut().enumerate() {
                    *x = ((b >> (2 * j)) & 0x3) as f32;
                }
            }
        }
    }
}

/// [`dequant`] of a code already converted to `f32` (same arithmetic).
#[inline(always)]
fn dequant_code(backend: QuantBackend, code: f32, scale: f32, zero: f32) -> f32 {
    match backend {
        QuantBackend::Quanto => scale * code - zero,
        QuantBackend::Hqq => (code - zero) * scale,
    }
}

#[inline]
fn dequant(backend: QuantBackend, code: u8, scale: f32, zero: f32) -> f32 {
    match backend {
        QuantBackend::Quanto => scale * code as f32 - zero,
        QuantBackend::Hqq => (code as f32 - zero) * scale,
    }
}

/// Quantizes `values` (groups of `group` consecutive values) with `backend`; scales and zeros are
/// rounded to `param_dtype` before the codes are chosen (quanto) or after (hqq, as transformers).
pub fn quantize_groups(
    backend: QuantBackend,
    values: &[f32],
    group: usize,
    nbits: u8,
    param_dtype: DType,
) -> GroupQuantized {
    assert!(
        group > 0 && values.len().is_multiple_of(group),
        "values must be whole groups"
    );
    match backend {
        QuantBackend::Quanto => quanto_groups(values, group, nbits, param_dtype),
        QuantBackend::Hqq => hqq_groups(values, group, nbits, param_dtype),
    }
}

fn min_max(g: &[f32]) -> (f32, f32) {
    g.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// optimum-quanto `MaxOptimizer` + `quantize_affine`.
fn quanto_groups(values: &[f32], group: usize, nbits: u8, dtype: DType) -> GroupQuantized {
    let qmax = ((1u32 << nbits) - 1) as f32; // qmax - qmin of the signed type
    let (scale, shift): (Vec<f32>, Vec<f32>) = values
        .chunks(group)
        .map(|g| {
            let (lo, hi) = min_max(g);
            ((hi - lo) / qmax, -lo)
        })
        .unzip();
    let (scale, shift) = (
        Params::rounded(&scale, dtype),
        Params::rounded(&shift, dtype),
    );
    let codes = values
        .par_chunks(group)
        .zip(scale.par_iter().zip(shift.par_iter()))
        .flat_map_iter(|(g, (&s, &z))| {
            g.iter().map(move |&x| {
                let q = ((x + z) / s).round_ties_even();
                // A constant group has scale 0: every value is the minimum, code 0.
                if q.is_nan() {
                    0
                } else {
                    q.clamp(0.0, qmax) as u8
                }
            })
        })
        .collect();
    GroupQuantized {
        codes,
        scale,
        zero: shift,
    }
}

/// HQQ `Quantizer.quantize(optimize=True)` with `optimize_weights_proximal_legacy`.
fn hqq_groups(values: &[f32], group: usize, nbits: u8, dtype: DType) -> GroupQuantized {
    const LP_NORM: f32 = 0.7;
    const BETA: f32 = 10.0; // the legacy solver never updates beta (kappa is unused)
    const ITERS: usize = 20;
    let max_v = ((1u32 << nbits) - 1) as f32;
    let groups = values.len() / group;
    let mut scale = Vec::with_capacity(groups);
    let mut zero = Vec::with_capacity(groups);
    for g in values.chunks(group) {
        let (lo, hi) = min_max(g);
        let denom = hi - lo;
        // torch evaluates `scalar / tensor` as `tensor.reciprocal() * scalar`: same rounding here.
        let mut s = (1.0 / denom) * max_v;
        if denom.abs() <= 1e-4 {
            s = 1.0;
        }
        let s = s.min(2e4);
        scale.push(s);
        zero.push(-lo * s);
    }
    let inv_beta = 1.0f32 / BETA;
    let shrink = |x: f32| -> f32 {
        let a = x.abs();
        let out = (a - inv_beta * a.powf(LP_NORM - 1.0)).max(0.0);
        if x > 0.0 {
            out
        } else if x < 0.0 {
            -out
        } else {
            0.0
        }
    };
    let mut best = f32::INFINITY;
    for _ in 0..ITERS {
        // One proximal step per group: error of the current zero, and the next zero.
        let steps: Vec<(f64, f32)> = values
            .par_chunks(group)
            .zip(scale.par_iter().zip(zero.par_iter()))
            .map(|(g, (&s, &z))| {
                let mut err = 0f64;
                let mut acc = 0f64;
                for &w in g {
                    let wq = (w * s + z).round_ties_even().clamp(0.0, max_v);
                    let wr = (wq - z) / s;
                    let d = w - wr;
                    err += d.abs() as f64;
                    acc += (wq - (w - shrink(d)) * s) as f64;
                }
                (err, (acc / group as f64) as f32)
            })
            .collect();
        let error = (steps.iter().map(|s| s.0).sum::<f64>() / values.len() as f64) as f32;
        for (z, s) in zero.iter_mut().zip(&steps) {
            *z = s.1;
        }
        if error < best {
            best = error;
        } else {
            break;
        }
    }
    let codes = values
        .par_chunks(group)
        .zip(scale.par_iter().zip(zero.par_iter()))
        .flat_map_iter(|(g, (&s, &z))| {
            g.iter()
                .map(move |&w| (w * s + z).round_ties_even().clamp(0.0, max_v) as u8)
        })
        .collect();
    let inv: Vec<f32> = scale.iter().map(|s| 1.0 / s).collect();
    GroupQuantized {
        codes,
        scale: Params::rounded(&inv, dtype),
        zero: Params::rounded(&zero, dtype),
    }
}

// ------------------------------------------------------------------------------------------------
// Quantized blocks
// ------------------------------------------------------------------------------------------------

/// `tokens` consecutive tokens of one tensor (keys or values), all batch rows and heads.
#[derive(Debug, Clone)]
struct Block {
    tokens: usize,
    /// Packed codes in `[batch, heads, tokens, head_dim]` order.
    codes: Vec<u8>,
    scale: Params,
    zero: Params,
}

/// Geometry shared by the blocks of one tensor.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rows: usize, // batch * heads
    dim: usize,  // head_dim
    group: usize,
    axis: QuantAxis,
    nbits: u8,
    backend: QuantBackend,
}

impl Layout {
    /// Quantizes `n` tokens given as `[rows, n, dim]` f32.
    fn quantize(&self, data: &[f32], n: usize, dtype: DType) -> Block {
        debug_assert_eq!(data.len(), self.rows * n * self.dim);
        // Gather the groups contiguously, quantize, and scatter the codes back.
        let grouped: Vec<f32> = match self.axis {
            QuantAxis::PerToken => data.to_vec(),
            QuantAxis::PerChannel => {
                let mut out = Vec::with_capacity(data.len());
                for row in 0..self.rows {
                    for tg in 0..n / self.group {
                        for d in 0..self.dim {
                            for i in 0..self.group {
                                let t = tg * self.group + i;
                                out.push(data[(row * n + t) * self.dim + d]);
                            }
                        }
                    }
                }
                out
            }
        };
        let q = quantize_groups(self.backend, &grouped, self.group, self.nbits, dtype);
        let codes = match self.axis {
            QuantAxis::PerToken => q.codes,
            QuantAxis::PerChannel => {
                let mut codes = vec![0u8; data.len()];
                let mut k = 0;
                for row in 0..self.rows {
                    for tg in 0..n / self.group {
                        for d in 0..self.dim {
                            for i in 0..self.group {
                                let t = tg * self.group + i;
                                codes[(row * n + t) * self.dim + d] = q.codes[k];
                                k += 1;
                            }
                        }
                    }
                }
                codes
            }
        };
        Block {
            tokens: n,
            codes: pack_codes(&codes, self.nbits),
            scale: Params::new(&q.scale, dtype),
            zero: Params::new(&q.zero, dtype),
        }
    }

    /// Dequantizes `blocks` into `[rows, total, dim]` f32.
    fn dequantize(&self, blocks: &[Arc<Block>]) -> Vec<f32> {
        let total: usize = blocks.iter().map(|b| b.tokens).sum();
        let mut out = vec![0f32; self.rows * total * self.dim];
        if total == 0 {
            return out;
        }
        out.par_chunks_mut(total * self.dim)
            .enumerate()
            .for_each(|(row, dst)| {
                let mut at = 0;
                for block in blocks {
                    let len = block.tokens * self.dim;
                    self.dequantize_row(block, row, &mut dst[at..at + len]);
                    at += len;
                }
            });
        out
    }

    /// Dequantizes the tokens of batch-head `row` of `block` into `dst` (`tokens * dim`).
    fn dequantize_row(&self, block: &Block, row: usize, dst: &mut [f32]) {
        self.dequantize_tokens(block, row, 0, block.tokens, dst);
    }

    /// Dequantizes tokens `t0..t1` of batch-head `row` of `block` into `dst` (`(t1 - t0) * dim`);
    /// with per-channel groups `t0` must start a group.
    fn dequantize_tokens(&self, block: &Block, row: usize, t0: usize, t1: usize, dst: &mut [f32]) {
        let (n, dim, group) = (block.tokens, self.dim, self.group);
        debug_assert_eq!(dst.len(), (t1 - t0) * dim);
        decode_codes(&block.codes, self.nbits, (row * n + t0) * dim, dst);
        let backend = self.backend;
        match self.axis {
            QuantAxis::PerToken => {
                let per_token = dim / group;
                for (i, token) in dst.chunks_mut(dim).enumerate() {
                    let first = (row * n + t0 + i) * per_token;
                    for (g, values) in token.chunks_mut(group).enumerate() {
                        let (s, z) = (block.scale.get(first + g), block.zero.get(first + g));
                        for x in values {
                            *x = dequant_code(backend, *x, s, z);
                        }
                    }
                }
            }
            QuantAxis::PerChannel => {
                debug_assert!(t0.is_multiple_of(group));
                let (mut scales, mut zeros) = (vec![0f32; dim], vec![0f32; dim]);
                for (i, tokens) in dst.chunks_mut(group * dim).enumerate() {
                    let first = (row * (n / group) + t0 / group + i) * dim;
                    for d in 0..dim {
                        scales[d] = block.scale.get(first + d);
                        zeros[d] = block.zero.get(first + d);
                    }
                    for token in tokens.chunks_mut(dim) {
                        for ((x, &s), &z) in token.iter_mut().zip(&scales).zip(&zeros) {
                            *x = dequant_code(backend, *x, s, z);
                        }
                    }
                }
            }
        }
    }

    /// Tokens per tile of the attention kernels: about 64, whole groups when grouped per channel.
    fn tile_tokens(&self) -> usize {
        match self.axis {
            QuantAxis::PerToken => ATTEND_TILE,
            QuantAxis::PerChannel => self.group * (ATTEND_TILE / self.group).max(1),
        }
    }

    /// Calls `f(first_token, tile)` for every tile of dequantized tokens of batch-head `row`,
    /// in order; `tile` holds whole tokens (`dim` values each) and is reused between calls.
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

    /// Keeps batch rows `indices` (each `rows / batch` heads) of a block, in that order.
    fn select(&self, block: &Block, batch: usize, indices: &[usize]) -> Block {
        let heads = self.rows / batch;
        let n = block.tokens;
        let per_row = heads * n * self.dim;
        let codes = unpack_codes(&block.codes, self.nbits, self.rows * n * self.dim);
        let new_codes: Vec<u8> = indices
            .iter()
            .flat_map(|&i| codes[i * per_row..(i + 1) * per_row].iter().copied())
            .collect();
        let per_params = block.scale.len() / batch;
        let pick = |p: &Params| -> Vec<f32> {
            let v = p.to_f32();
            indices
                .iter()
                .flat_map(|&i| v[i * per_params..(i + 1) * per_params].iter().copied())
                .collect()
        };
        let dtype = match block.scale {
            Params::F32(_) => DType::F32,
            Params::F16(_) => DType::F16,
            Params::Bf16(_) => DType::BF16,
        };
        Block {
            tokens: n,
            codes: pack_codes(&new_codes, self.nbits),
            scale: Params::new(&pick(&block.scale), dtype),
            zero: Params::new(&pick(&block.zero), dtype),
        }
    }
}

fn block_bytes(blocks: &[Arc<Block>]) -> usize {
    blocks
        .iter()
        .map(|b| b.codes.capacity() + b.scale.bytes() + b.zero.bytes())
        .sum()
}

// ------------------------------------------------------------------------------------------------
// The cache
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct QuantLayer {
    batch: usize,
    key_layout: Layout,
    value_layout: Layout,
    /// Append-only block lists, shared with the [`QuantizedKv`] snapshots handed to attention.
    keys: Arc<Vec<Arc<Block>>>,
    values: Arc<Vec<Arc<Block>>>,
    quantized: usize,
    residual: LayerStore,
    dtype: DType,
    device: Device,
}

impl QuantLayer {
    fn seen(&self) -> usize {
        self.quantized + self.residual.len()
    }

    fn heads_and_dims(&self) -> (usize, usize, usize) {
        (
            self.key_layout.rows / self.batch,
            self.key_layout.dim,
            self.value_layout.dim,
        )
    }

    /// The quantized tokens as attention reads them (shares the blocks: O(1)).
    fn snapshot(&self, layer: usize) -> QuantizedKv {
        QuantizedKv {
            layer,
            batch: self.batch,
            tokens: self.quantized,
            key_layout: self.key_layout,
            value_layout: self.value_layout,
            keys: self.keys.clone(),
            values: self.values.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
        }
    }

    /// Quantizes the first `n` tokens of `keys`/`values` (`[batch, heads, >= n, dim]`).
    fn push_quantized(&mut self, keys: Tensor<4>, values: Tensor<4>, n: usize) {
        if n == 0 {
            return;
        }
        let host = |t: Tensor<4>| -> Vec<f32> {
            let [b, h, _, d] = t.dims();
            t.slice([0..b, 0..h, 0..n, 0..d])
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 data")
        };
        let (k, v) = (host(keys), host(values));
        let (kl, vl, dtype) = (self.key_layout, self.value_layout, self.dtype);
        let (kb, vb) = rayon::join(|| kl.quantize(&k, n, dtype), || vl.quantize(&v, n, dtype));
        // Copies the block list only when an attention snapshot of it is still alive.
        Arc::make_mut(&mut self.keys).push(Arc::new(kb));
        Arc::make_mut(&mut self.values).push(Arc::new(vb));
        self.quantized += n;
    }
}

/// Initial capacity (tokens) of a residual buffer; it doubles as needed up to the residual length.
const RESIDUAL_MIN: usize = 16;

/// Tokens dequantized at a time by the attention kernels (a tile stays in L1/L2).
const ATTEND_TILE: usize = 64;

/// The quantized tokens of one layer as attention reads them: a snapshot sharing the cache's
/// blocks, with host kernels that attend to them one small dequantized tile at a time, so a
/// decode step never materialises (or uploads) the dequantized prefix.
#[derive(Debug, Clone)]
pub struct QuantizedKv {
    layer: usize,
    batch: usize,
    tokens: usize,
    key_layout: Layout,
    value_layout: Layout,
    keys: Arc<Vec<Arc<Block>>>,
    values: Arc<Vec<Arc<Block>>>,
    dtype: DType,
    device: Device,
}

impl QuantizedKv {
    /// Tokens in the prefix.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// Whether the prefix holds no token.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Batch rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

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
                    self.key_layout
                        .for_each_tile(&self.keys, row, |first, tile| {
                            for (i, qi) in q.chunks_exact(d).enumerate() {
                                let dst = &mut dst[i * t + first..];
                                for (j, key) in tile.chunks_exact(d).enumerate() {
                                    dst[j] = dot(qi, key);
                                }
                            }
                        });
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
                });
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [b, h, rows, dv]),
            (&device, DType::F32),
        ))
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
#[inline]
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

/// KIVI quantized cache: old tokens in 2/4/8 bits, the last ones in full precision.
#[derive(Debug, Clone)]
pub struct QuantizedCache {
    config: QuantizedCacheConfig,
    layers: Vec<QuantLayer>,
}

impl QuantizedCache {
    /// An empty cache with `config` (validated).
    pub fn new(config: QuantizedCacheConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            layers: Vec::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &QuantizedCacheConfig {
        &self.config
    }

    /// Tokens of `layer` stored quantized (the rest are in the full-precision residual).
    pub fn quantized_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.quantized)
    }

    /// Tokens of `layer` in the full-precision residual.
    pub fn residual_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.residual.len())
    }

    /// How many of `available` residual tokens leave the residual when it is flushed.
    fn flush_count(&self, available: usize) -> usize {
        if self.config.any_per_channel() {
            available / self.config.q_group_size * self.config.q_group_size
        } else {
            available
        }
    }

    fn layout(&self, layer: usize, axis: QuantAxis, rows: usize, dim: usize) -> Result<Layout> {
        let group = match axis {
            // A group never spans tokens: cap it at the head dimension.
            QuantAxis::PerToken => self.config.q_group_size.min(dim),
            QuantAxis::PerChannel => self.config.q_group_size,
        };
        if axis == QuantAxis::PerToken && !dim.is_multiple_of(group) {
            return Err(KvError::Shape {
                layer,
                what: format!(
                    "head_dim {dim} is not a multiple of q_group_size {group} (per-token groups)"
                ),
            });
        }
        Ok(Layout {
            rows,
            dim,
            group,
            axis,
            nbits: self.config.nbits,
            backend: self.config.backend,
        })
    }

    fn new_layer(&self, layer: usize, keys: &Tensor<4>, values: &Tensor<4>) -> Result<QuantLayer> {
        let [b, h, _, dk] = keys.dims();
        let dv = values.dims()[3];
        if !matches!(keys.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(KvError::DType {
                layer,
                expected: DType::F32,
                got: keys.dtype(),
            });
        }
        Ok(QuantLayer {
            batch: b,
            key_layout: self.layout(layer, self.config.key_axis, b * h, dk)?,
            value_layout: self.layout(layer, self.config.value_axis, b * h, dv)?,
            keys: Arc::default(),
            values: Arc::default(),
            quantized: 0,
            residual: LayerStore::with_capacity(keys, values, RESIDUAL_MIN),
            dtype: keys.dtype(),
            device: keys.device(),
        })
    }
}

impl Cache for QuantizedCache {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)> {
        Ok(self
            .update_view(layer, keys, values, cache_position)?
            .into_dense())
    }

    /// O(new tokens): the quantized prefix is handed to attention as shared blocks (attended to
    /// tile by tile by [`QuantizedKv::scores`] / [`QuantizedKv::weighted_values`]), never
    /// dequantized into a tensor; only the residual and the new tokens are dense.
    fn update_view(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<KvView> {
        check_layer_order(layer, self.layers.len())?;
        check_pair(layer, &keys, &values)?;
        let new = keys.dims()[2];
        if layer == self.layers.len() {
            check_positions(layer, 0, cache_position, new)?;
            let entry = self.new_layer(layer, &keys, &values)?;
            self.layers.push(entry);
        }
        let flush_prefill = self.flush_count(new);
        let residual_length = self.config.residual_length;
        let (per_channel, group) = (self.config.any_per_channel(), self.config.q_group_size);
        let entry = &mut self.layers[layer];
        entry.residual.check(layer, &keys, &values)?;
        check_positions(layer, entry.seen(), cache_position, new)?;

        if entry.seen() == 0 {
            // Prefill, as transformers: quantize it now, attend to it in full precision.
            let [b, h, _, dk] = keys.dims();
            let dv = values.dims()[3];
            entry.push_quantized(keys.clone(), values.clone(), flush_prefill);
            if flush_prefill < new {
                entry.residual.append(
                    keys.clone().slice([0..b, 0..h, flush_prefill..new, 0..dk]),
                    values
                        .clone()
                        .slice([0..b, 0..h, flush_prefill..new, 0..dv]),
                );
            }
            return Ok(KvView::dense(keys, values, MaskLayout::contiguous(0, new)));
        }

        let prefix = (entry.quantized > 0).then(|| entry.snapshot(layer));
        entry.residual.append(keys, values);
        let (out_k, out_v) = entry.residual.view();
        let total = entry.seen();

        // The residual is full: its oldest tokens (all of them, or whole groups of tokens when
        // some tensor is grouped per channel) are quantized and appended to the blocks.
        let stored = entry.residual.len();
        if stored >= residual_length {
            let n = if per_channel {
                stored / group * group
            } else {
                stored
            };
            if n > 0 {
                let (rk, rv) = entry.residual.view();
                entry.push_quantized(rk, rv, n);
                let (tail_k, tail_v) = entry.residual.view_range(n, stored);
                // A fresh, small residual buffer: memory stays proportional to what it holds.
                let mut fresh =
                    LayerStore::with_capacity(&tail_k, &tail_v, (stored - n).max(RESIDUAL_MIN));
                if n < stored {
                    fresh.append(tail_k, tail_v);
                }
                entry.residual = fresh;
            }
        }
        Ok(KvView {
            prefix,
            keys: out_k,
            values: out_v,
            layout: MaskLayout::contiguous(0, total),
        })
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, QuantLayer::seen)
    }

    fn max_length(&self) -> Option<usize> {
        None
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        MaskLayout::contiguous(0, self.seq_length(layer) + query_length)
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        for entry in &mut self.layers {
            if max_length >= entry.seen() {
                continue;
            }
            if max_length >= entry.quantized {
                entry.residual.truncate(max_length - entry.quantized);
                continue;
            }
            // The cut falls in the quantized tokens: keep whole blocks before it, and move the
            // kept tokens of the cut block to the residual as their dequantized values (exactly
            // what attention saw of them).
            let (mut kept, mut at) = (0, 0);
            while kept < entry.keys.len() && at + entry.keys[kept].tokens <= max_length {
                at += entry.keys[kept].tokens;
                kept += 1;
            }
            let partial = (kept < entry.keys.len() && at < max_length).then(|| {
                QuantizedKv {
                    tokens: entry.keys[kept].tokens,
                    keys: Arc::new(vec![entry.keys[kept].clone()]),
                    values: Arc::new(vec![entry.values[kept].clone()]),
                    ..entry.snapshot(0)
                }
                .dequantize()
            });
            Arc::make_mut(&mut entry.keys).truncate(kept);
            Arc::make_mut(&mut entry.values).truncate(kept);
            entry.quantized = at;
            entry.residual.truncate(0);
            if let Some((k, v)) = partial {
                let (h, dk, dv) = entry.heads_and_dims();
                let keep = max_length - at;
                let b = entry.batch;
                entry.residual.append(
                    k.slice([0..b, 0..h, 0..keep, 0..dk]),
                    v.slice([0..b, 0..h, 0..keep, 0..dv]),
                );
            }
        }
        Ok(())
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        for entry in &mut self.layers {
            let batch = entry.batch;
            if let Some(&index) = beam_indices.iter().find(|&&i| i >= batch) {
                return Err(KvError::BatchIndex { index, batch });
            }
        }
        for entry in &mut self.layers {
            let batch = entry.batch;
            entry.residual.select(beam_indices)?;
            let (kl, vl) = (entry.key_layout, entry.value_layout);
            let rows_per = kl.rows / batch;
            entry.keys = Arc::new(
                entry
                    .keys
                    .iter()
                    .map(|b| Arc::new(kl.select(b, batch, beam_indices)))
                    .collect(),
            );
            entry.values = Arc::new(
                entry
                    .values
                    .iter()
                    .map(|b| Arc::new(vl.select(b, batch, beam_indices)))
                    .collect(),
            );
            entry.batch = beam_indices.len();
            entry.key_layout.rows = rows_per * entry.batch;
            entry.value_layout.rows = rows_per * entry.batch;
        }
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.layers.first().map(|l| l.batch)
    }

    fn reset(&mut self) {
        self.layers.clear();
    }

    fn memory_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| block_bytes(&l.keys) + block_bytes(&l.values) + l.residual.memory_bytes())
            .sum()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        "quantized"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device::flex()
    }

    fn random(shape: [usize; 4], seed: u64, dtype: DType) -> Tensor<4> {
        // Deterministic pseudo-random data without a global RNG.
        let n: usize = shape.iter().product();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::<4>::from_data(TensorData::new(data, shape), (&device(), DType::F32)).cast(dtype)
    }

    fn host(t: Tensor<4>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    fn config(
        backend: QuantBackend,
        nbits: u8,
        group: usize,
        residual: usize,
    ) -> QuantizedCacheConfig {
        QuantizedCacheConfig {
            backend,
            nbits,
            q_group_size: group,
            residual_length: residual,
            ..QuantizedCacheConfig::default()
        }
    }

    #[test]
    fn pack_unpack_round_trips_every_width() {
        for nbits in [2u8, 4, 8] {
            let max = (1u16 << nbits) as usize;
            let codes: Vec<u8> = (0..1001).map(|i| ((i * 7 + i / 3) % max) as u8).collect();
            let packed = pack_codes(&codes, nbits);
            assert_eq!(packed.len(), (codes.len() * nbits as usize).div_ceil(8));
            assert_eq!(
                unpack_codes(&packed, nbits, codes.len()),
                codes,
                "{nbits} bits"
            );
        }
        // Bit order: value j of a byte sits at bits j * nbits (quanto's and hqq's convention).
        assert_eq!(pack_codes(&[0, 1, 2, 3], 2), vec![0b1110_0100]);
        assert_eq!(pack_codes(&[0xA, 0x5], 4), vec![0x5A]);
    }

    #[test]
    fn block_dequantization_matches_the_group_reference() {
        // Odd sizes so that rows start in the middle of a byte (the slow decoding path) too.
        for (rows, n, dim, group) in [(3, 8, 16, 4), (3, 6, 6, 3), (2, 4, 10, 2)] {
            let data = host(random([1, rows, n, dim], 9, DType::F32));
            for backend in [QuantBackend::Quanto, QuantBackend::Hqq] {
                for nbits in [2u8, 4, 8] {
                    for axis in [QuantAxis::PerToken, QuantAxis::PerChannel] {
                        let layout = Layout {
                            rows,
                            dim,
                            group,
                            axis,
                            nbits,
                            backend,
                        };
                        let block = Arc::new(layout.quantize(&data, n, DType::F32));
                        let got = layout.dequantize(&[block.clone(), block]);
                        // Reference: the element-wise formula on unpacked codes.
                        let b = layout.quantize(&data, n, DType::F32);
                        let codes = unpack_codes(&b.codes, nbits, data.len());
                        for row in 0..rows {
                            for copy in 0..2 {
                                for t in 0..n {
                                    for d in 0..dim {
                                        let p = match axis {
                                            QuantAxis::PerToken => {
                                                (row * n + t) * (dim / group) + d / group
                                            }
                                            QuantAxis::PerChannel => {
                                                (row * (n / group) + t / group) * dim + d
                                            }
                                        };
                                        let e = (row * n + t) * dim + d;
                                        let want = dequant(
                                            backend,
                                            codes[e],
                                            b.scale.get(p),
                                            b.zero.get(p),
                                        );
                                        let at = (row * 2 * n + copy * n + t) * dim + d;
                                        assert_eq!(
                                            got[at], want,
                                            "{backend:?} {nbits} {axis:?} {rows}x{n}x{dim}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quantizers_stay_within_their_step() {
        let values = host(random([1, 4, 32, 16], 7, DType::F32));
        for backend in [QuantBackend::Quanto, QuantBackend::Hqq] {
            for nbits in [2u8, 4, 8] {
                let q = quantize_groups(backend, &values, 16, nbits, DType::F32);
                let deq = q.dequantize(backend, 16);
                let levels = ((1u32 << nbits) - 1) as f32;
                let mut mean = 0f64;
                for (g, (x, y)) in values.chunks(16).zip(deq.chunks(16)).enumerate() {
                    let (lo, hi) = min_max(x);
                    let step = (hi - lo) / levels;
                    for (a, b) in x.iter().zip(y) {
                        mean += (a - b).abs() as f64;
                        // Min-max rounds to the nearest level; HQQ may move the zero point, but
                        // never by more than a step.
                        let bound = match backend {
                            QuantBackend::Quanto => 0.5 * step + 1e-5,
                            QuantBackend::Hqq => 1.5 * step + 1e-5,
                        };
                        assert!(
                            (a - b).abs() <= bound,
                            "{backend:?} {nbits} bits, group {g}: |{a} - {b}| > {bound}"
                        );
                    }
                }
                mean /= values.len() as f64;
                // Uniform data in [-2, 2): the mean error is about a quarter of a step.
                let step = 4.0 / ((1u32 << nbits) - 1) as f64;
                assert!(
                    mean < 0.4 * step,
                    "{backend:?} {nbits} bits: mean error {mean}"
                );
                assert!(q.codes.iter().all(|&c| (c as u32) < (1 << nbits)));
            }
        }
    }

    #[test]
    fn hqq_moves_the_zero_point_and_lowers_the_lp_error() {
        // Heavy-tailed groups: the half-quadratic solver trades the outliers for the bulk.
        let mut values = host(random([1, 1, 64, 16], 3, DType::F32));
        for (i, v) in values.iter_mut().enumerate() {
            if i % 16 == 3 {
                *v *= 6.0;
            }
        }
        let minmax = quantize_groups(QuantBackend::Quanto, &values, 16, 2, DType::F32);
        let hqq = quantize_groups(QuantBackend::Hqq, &values, 16, 2, DType::F32);
        let lp = |q: &GroupQuantized, b| -> f64 {
            q.dequantize(b, 16)
                .iter()
                .zip(&values)
                .map(|(x, y)| ((x - y).abs() as f64).powf(0.7))
                .sum()
        };
        let (e_minmax, e_hqq) = (
            lp(&minmax, QuantBackend::Quanto),
            lp(&hqq, QuantBackend::Hqq),
        );
        assert!(
            e_hqq < e_minmax,
            "hqq l0.7 error {e_hqq} >= min-max {e_minmax}"
        );
        // Its zero points are not the min-max ones (zero = -min / scale there).
        let moved = (0..hqq.zero.len())
            .filter(|&g| {
                let (lo, _) = min_max(&values[g * 16..(g + 1) * 16]);
                (hqq.zero[g] - (-lo / hqq.scale[g])).abs() > 1e-3
            })
            .count();
        assert!(moved > hqq.zero.len() / 2, "only {moved} zero points moved");
    }

    #[test]
    fn residual_fills_then_only_the_leaving_tokens_are_quantized() {
        for (key_axis, prefill_quantized, flush_at) in
            [(QuantAxis::PerToken, 5, 4), (QuantAxis::PerChannel, 4, 4)]
        {
            let cfg = QuantizedCacheConfig {
                key_axis,
                value_axis: QuantAxis::PerToken,
                ..config(QuantBackend::Quanto, 4, 4, 4)
            };
            let mut cache = QuantizedCache::new(cfg).unwrap();
            let k = random([1, 2, 5, 8], 1, DType::F32);
            let v = random([1, 2, 5, 8], 2, DType::F32);
            let (rk, _, layout) = cache.update(0, k.clone(), v, &[0, 1, 2, 3, 4]).unwrap();
            // The prefill is attended in full precision (as transformers) and quantized now.
            assert_eq!(host(rk), host(k.clone()));
            assert_eq!(layout, MaskLayout::contiguous(0, 5));
            assert_eq!(cache.quantized_length(0), prefill_quantized);
            let mut seen_prefix: Option<Vec<f32>> = None;
            for step in 0..9 {
                let pos = 5 + step;
                let nk = random([1, 2, 1, 8], 10 + step as u64, DType::F32);
                let nv = random([1, 2, 1, 8], 50 + step as u64, DType::F32);
                let (ok, ov, layout) = cache.update(0, nk.clone(), nv, &[pos]).unwrap();
                assert_eq!(ok.dims(), [1, 2, pos + 1, 8]);
                assert_eq!(ov.dims(), [1, 2, pos + 1, 8]);
                assert_eq!(layout, MaskLayout::contiguous(0, pos + 1));
                // The new token is returned exactly; the old ones within a quantization step.
                let got = host(ok.clone().slice([0..1, 0..2, pos..pos + 1, 0..8]));
                assert_eq!(got, host(nk));
                // The 4 tokens quantized at prefill (both layouts).
                let prefix = host(ok.clone().slice([0..1, 0..2, 0..4, 0..8]));
                let max = prefix
                    .iter()
                    .zip(host(k.clone().slice([0..1, 0..2, 0..4, 0..8])))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(max < 0.3, "prefix error {max}");
                // Append-only: the prompt's dequantized values never change again.
                if let Some(p) = &seen_prefix {
                    assert_eq!(
                        &prefix, p,
                        "step {step}: quantized tokens were re-quantized"
                    );
                }
                seen_prefix = Some(prefix);
                assert_eq!(cache.seq_length(0), pos + 1);
                assert!(cache.residual_length(0) < flush_at.max(4));
            }
            assert_eq!(
                cache.quantized_length(0) + cache.residual_length(0),
                14,
                "{key_axis:?}"
            );
        }
    }

    #[test]
    fn memory_at_8k_context_is_a_fraction_of_f16() {
        // Llama-3-8B layer shapes per kv head (head_dim 128); the ratio does not depend on the
        // number of heads. Defaults: groups of 64, residual 128, KIVI axes, f16 scales.
        let ctx = 8192;
        let f16_bytes = 2 * ctx * 128 * 2;
        for (nbits, goal) in [(4u8, 3.5f64), (2, 6.0)] {
            let mut cache =
                QuantizedCache::new(config(QuantBackend::Quanto, nbits, 64, 128)).unwrap();
            let k = random([1, 1, ctx, 128], 5, DType::F16);
            let v = random([1, 1, ctx, 128], 6, DType::F16);
            let positions: Vec<usize> = (0..ctx).collect();
            cache.update(0, k, v, &positions).unwrap();
            let ratio = f16_bytes as f64 / cache.memory_bytes() as f64;
            println!(
                "{nbits}-bit at {ctx} tokens: {} bytes, {ratio:.2}x smaller than f16",
                cache.memory_bytes()
            );
            assert!(ratio >= goal, "{nbits}-bit: only {ratio:.2}x");
            // Worst case: a residual just short of being flushed (127 full-precision tokens).
            for p in ctx..ctx + 127 {
                let nk = random([1, 1, 1, 128], p as u64, DType::F16);
                cache.update(0, nk.clone(), nk, &[p]).unwrap();
            }
            assert_eq!(cache.residual_length(0), 127);
            let worst = (2 * (ctx + 127) * 128 * 2) as f64 / cache.memory_bytes() as f64;
            println!("{nbits}-bit with a full residual: {worst:.2}x");
            assert!(
                worst >= goal * 0.93,
                "{nbits}-bit worst case only {worst:.2}x"
            );
        }
    }

    #[test]
    fn reorder_and_crop_match_the_returned_tensors() {
        let d = device();
        let cfg = config(QuantBackend::Hqq, 4, 4, 4);
        let mut cache = QuantizedCache::new(cfg).unwrap();
        let k = random([3, 2, 6, 8], 1, DType::F32);
        let v = random([3, 2, 6, 8], 2, DType::F32);
        cache.update(0, k, v, &(0..6).collect::<Vec<_>>()).unwrap();
        for p in 6..11 {
            let nk = random([3, 2, 1, 8], p as u64, DType::F32);
            cache.update(0, nk.clone(), nk, &[p]).unwrap();
        }
        let probe = |c: &mut QuantizedCache, pos: usize| {
            let mut c = c.clone();
            let z = Tensor::<4>::zeros([c.batch_size().unwrap(), 2, 1, 8], (&d, DType::F32));
            let (k, v, _) = c.update(0, z.clone(), z, &[pos]).unwrap();
            (host(k), host(v))
        };
        let (before_k, _) = probe(&mut cache, 11);
        cache.reorder(&[2, 0, 0, 1]).unwrap();
        assert_eq!(cache.batch_size(), Some(4));
        let (after_k, _) = probe(&mut cache, 11);
        let row = 2 * 12 * 8;
        for (new, old) in [(0, 2), (1, 0), (2, 0), (3, 1)] {
            assert_eq!(
                after_k[new * row..(new + 1) * row],
                before_k[old * row..(old + 1) * row]
            );
        }
        assert!(matches!(
            cache.reorder(&[4]),
            Err(KvError::BatchIndex { index: 4, batch: 4 })
        ));
        // Crop into the quantized tokens: the kept ones keep their values.
        let (full_k, _) = probe(&mut cache, 11);
        cache.crop(7).unwrap();
        assert_eq!(cache.seq_length(0), 7);
        let (cropped_k, _) = probe(&mut cache, 7);
        for r in 0..8 {
            assert_eq!(
                cropped_k[r * 8 * 8..r * 8 * 8 + 7 * 8],
                full_k[r * 12 * 8..r * 12 * 8 + 7 * 8]
            );
        }
    }

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
            let prefix = view.prefix.clone().expect("a quantized prefix");
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

    #[test]
    fn a_view_outlives_later_updates_unchanged() {
        // Attention snapshots share the blocks; later flushes, crops and reorders must not
        // change what an earlier view reads.
        let mut cache = QuantizedCache::new(config(QuantBackend::Quanto, 4, 4, 4)).unwrap();
        let k = random([2, 2, 8, 8], 1, DType::F32);
        cache
            .update(0, k.clone(), k, &(0..8).collect::<Vec<_>>())
            .unwrap();
        let z = random([2, 2, 1, 8], 3, DType::F32);
        let view = cache.update_view(0, z.clone(), z.clone(), &[8]).unwrap();
        let before = host(view.prefix.as_ref().unwrap().dequantize().0);
        for p in 9..20 {
            cache.update(0, z.clone(), z.clone(), &[p]).unwrap();
        }
        cache.crop(6).unwrap();
        cache.reorder(&[1, 0]).unwrap();
        assert_eq!(host(view.prefix.as_ref().unwrap().dequantize().0), before);
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let parse = |json: &str| {
            QuantizedCacheConfig::from_cache_config(&CacheConfig::from_json(json).unwrap())
        };
        assert!(matches!(parse(r#"{"nbits": 3}"#), Err(KvError::Config(_))));
        assert!(matches!(
            parse(r#"{"backend": "awq"}"#),
            Err(KvError::Config(_))
        ));
        assert!(matches!(
            parse(r#"{"backend": "quanto", "axis_key": 1}"#),
            Err(KvError::Config(_))
        ));
        assert!(matches!(
            parse(r#"{"backend": "hqq", "axis_value": -1}"#),
            Err(KvError::Config(_))
        ));
        let c = parse(r#"{"backend": "hqq", "axis_key": 1, "axis_value": 0, "nbits": 2}"#).unwrap();
        assert_eq!(
            (c.key_axis, c.value_axis, c.nbits),
            (QuantAxis::PerToken, QuantAxis::PerChannel, 2)
        );
        let c = parse("{}").unwrap();
        assert_eq!(c, QuantizedCacheConfig::default());

        let mut cache = QuantizedCache::new(config(QuantBackend::Quanto, 4, 4, 4)).unwrap();
        let k = random([1, 2, 3, 8], 1, DType::F32);
        assert!(matches!(
            cache.update(1, k.clone(), k.clone(), &[0, 1, 2]),
            Err(KvError::LayerOrder { .. })
        ));
        assert!(matches!(
            cache.update(0, k.clone(), k.clone(), &[1, 2, 3]),
            Err(KvError::Position { .. })
        ));
        cache.update(0, k.clone(), k.clone(), &[0, 1, 2]).unwrap();
        let wide = random([1, 2, 1, 16], 1, DType::F32);
        assert!(matches!(
            cache.update(0, wide.clone(), wide, &[3]),
            Err(KvError::Shape { .. })
        ));
        let one = random([1, 2, 1, 8], 1, DType::F32);
        assert!(matches!(
            cache.update(0, one.clone(), one.clone(), &[5]),
            Err(KvError::Position { .. })
        ));
        let half = one.clone().cast(DType::F16);
        assert!(matches!(
            cache.update(0, half.clone(), half, &[3]),
            Err(KvError::DType { .. })
        ));
        // Per-token groups must tile head_dim.
        let mut odd = QuantizedCache::new(QuantizedCacheConfig {
            key_axis: QuantAxis::PerToken,
            ..config(QuantBackend::Quanto, 4, 6, 4)
        })
        .unwrap();
        assert!(matches!(
            odd.update(0, k.clone(), k, &[0, 1, 2]),
            Err(KvError::Shape { .. })
        ));
    }
}
