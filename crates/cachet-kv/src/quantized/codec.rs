//! Group quantizers (quanto min-max, hqq half-quadratic), code packing and dequantization.
//!
//! Host side, in f32 arithmetic as transformers on CPU.

use burn::tensor::DType;
use half::{bf16, f16};
use rayon::prelude::*;

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

/// Scales and zero points, stored in the cache dtype (as transformers keeps them).
#[derive(Debug, Clone)]
pub(super) enum Params {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Params {
    pub(super) fn new(values: &[f32], dtype: DType) -> Self {
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
    pub(super) fn get(&self, i: usize) -> f32 {
        match self {
            Self::F32(v) => v[i],
            Self::F16(v) => v[i].to_f32(),
            Self::Bf16(v) => v[i].to_f32(),
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::Bf16(v) => v.len(),
        }
    }

    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::F32(v) => v.capacity() * 4,
            Self::F16(v) => v.capacity() * 2,
            Self::Bf16(v) => v.capacity() * 2,
        }
    }

    pub(super) fn to_f32(&self) -> Vec<f32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

/// Packs `nbits`-bit codes, `8 / nbits` per byte, value `j` of a byte at bits `j * nbits`.
pub(crate) fn pack_codes(codes: &[u8], nbits: u8) -> Vec<u8> {
    let per = 8 / nbits as usize;
    let mask = ((1u16 << nbits) - 1) as u8;
    let mut out = vec![0u8; codes.len().div_ceil(per)];
    for (i, &c) in codes.iter().enumerate() {
        out[i / per] |= (c & mask) << ((i % per) * nbits as usize);
    }
    out
}

/// Inverse of [`pack_codes`] for `len` codes.
pub(crate) fn unpack_codes(packed: &[u8], nbits: u8, len: usize) -> Vec<u8> {
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

/// [`decode_codes`] one code at a time (unaligned starts, short inputs); stops where `packed`
/// ends.
fn decode_codes_slowly(packed: &[u8], nbits: u8, first: usize, dst: &mut [f32]) {
    let per = 8 / nbits as usize;
    for (i, x) in dst.iter_mut().enumerate() {
        if (first + i) / per >= packed.len() {
            return;
        }
        *x = code_at(packed, nbits, first + i) as f32;
    }
}

/// Writes codes `first..first + dst.len()` of `packed` into `dst` as floats.
#[inline(always)]
pub(super) fn decode_codes(packed: &[u8], nbits: u8, first: usize, dst: &mut [f32]) {
    let per = 8 / nbits as usize;
    if !first.is_multiple_of(per) {
        return decode_codes_slowly(packed, nbits, first, dst);
    }
    let bytes = &packed[first / per..];
    match nbits {
        8 => {
            for (x, &b) in dst.iter_mut().zip(bytes) {
                *x = b as f32;
            }
        }
        4 => {
            // Whole 16-code groups, then the rest one pair at a time.
            if bytes.len() < dst.len().div_ceil(2) {
                return decode_codes_slowly(packed, nbits, first, dst);
            }
            let (groups, rest) = dst.as_chunks_mut::<16>();
            let (words, tail) = bytes.split_at(groups.len() * 8);
            let words = words.as_chunks::<8>().0;
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected on this CPU.
                unsafe { x86::decode4_avx512(words, groups) };
                return decode_pairs(rest, tail);
            }
            decode4_groups(words, groups);
            decode_pairs(rest, tail);
        }
        _ => {
            if bytes.len() < dst.len().div_ceil(4) {
                return decode_codes_slowly(packed, nbits, first, dst);
            }
            let (groups, rest) = dst.as_chunks_mut::<16>();
            let (words, tail) = bytes.split_at(groups.len() * 4);
            let words = words.as_chunks::<4>().0;
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected on this CPU.
                unsafe { x86::decode2_avx512(words, groups) };
                return decode_quads(rest, tail);
            }
            decode2_groups(words, groups);
            decode_quads(rest, tail);
        }
    }
}

/// Whole groups of 16 4-bit codes, portable: code m of a little-endian word sits at bits
/// 4m..4m + 4.
#[inline(always)]
fn decode4_groups(words: &[[u8; 8]], out: &mut [[f32; 16]]) {
    for (out, word) in out.iter_mut().zip(words) {
        let lo = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        let hi = u32::from_le_bytes([word[4], word[5], word[6], word[7]]);
        for m in 0..8 {
            out[m] = ((lo >> (4 * m)) & 0xF) as f32;
            out[m + 8] = ((hi >> (4 * m)) & 0xF) as f32;
        }
    }
}

/// Whole groups of 16 2-bit codes, portable: code m of a little-endian word sits at bits
/// 2m..2m + 2.
#[inline(always)]
fn decode2_groups(words: &[[u8; 4]], out: &mut [[f32; 16]]) {
    for (out, word) in out.iter_mut().zip(words) {
        let word = u32::from_le_bytes(*word);
        for (m, x) in out.iter_mut().enumerate() {
            *x = ((word >> (2 * m)) & 0x3) as f32;
        }
    }
}

/// 4-bit codes after the whole groups, one byte (two codes) at a time.
#[inline(always)]
fn decode_pairs(rest: &mut [f32], tail: &[u8]) {
    for (pair, &b) in rest.chunks_mut(2).zip(tail) {
        pair[0] = (b & 0xF) as f32;
        if let Some(x) = pair.get_mut(1) {
            *x = (b >> 4) as f32;
        }
    }
}

/// 2-bit codes after the whole groups, one byte (four codes) at a time.
#[inline(always)]
fn decode_quads(rest: &mut [f32], tail: &[u8]) {
    for (quad, &b) in rest.chunks_mut(4).zip(tail) {
        for (j, x) in quad.iter_mut().enumerate() {
            *x = ((b >> (2 * j)) & 0x3) as f32;
        }
    }
}

/// Whole groups of 16 codes with AVX-512: each byte repeated to its codes' lanes, one variable
/// shift, a mask and a conversion per 16 codes. (Left to itself the compiler vectorises the
/// portable loops across groups, with scatter stores.)
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 4-bit codes: 8 bytes per 16 floats, code `2j` in the low nibble of byte `j`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn decode4_avx512(words: &[[u8; 8]], out: &mut [[f32; 16]]) {
        let shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
        let mask = _mm512_set1_epi32(0xF);
        for (word, out) in words.iter().zip(out) {
            // SAFETY: `word` holds 8 bytes and `out` 16 floats.
            unsafe {
                let bytes = _mm_loadl_epi64(word.as_ptr().cast());
                let lanes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
                let codes = _mm512_and_si512(_mm512_srlv_epi32(lanes, shifts), mask);
                _mm512_storeu_ps(out.as_mut_ptr(), _mm512_cvtepi32_ps(codes));
            }
        }
    }

    /// 2-bit codes: 4 bytes per 16 floats, code `4j + k` in bits `2k` of byte `j`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn decode2_avx512(words: &[[u8; 4]], out: &mut [[f32; 16]]) {
        let shifts = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
        let mask = _mm512_set1_epi32(0x3);
        for (word, out) in words.iter().zip(out) {
            // SAFETY: `word` holds 4 bytes and `out` 16 floats.
            unsafe {
                let bytes = _mm_cvtsi32_si128(i32::from_le_bytes(*word));
                let pairs = _mm_unpacklo_epi8(bytes, bytes);
                let lanes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi16(pairs, pairs));
                let codes = _mm512_and_si512(_mm512_srlv_epi32(lanes, shifts), mask);
                _mm512_storeu_ps(out.as_mut_ptr(), _mm512_cvtepi32_ps(codes));
            }
        }
    }
}

/// [`dequant`] of a code already converted to `f32` (same arithmetic).
#[inline(always)]
pub(super) fn dequant_code(backend: QuantBackend, code: f32, scale: f32, zero: f32) -> f32 {
    match backend {
        QuantBackend::Quanto => scale * code - zero,
        QuantBackend::Hqq => (code - zero) * scale,
    }
}

/// The value of `code` in a group of `scale` and `zero`.
#[inline]
pub(super) fn dequant(backend: QuantBackend, code: u8, scale: f32, zero: f32) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantized::testing::{host, random};

    /// The grouped decoders (16 codes at a time) against one code at a time, for every width,
    /// start and length, and a packed buffer that ends early.
    #[test]
    fn decode_codes_matches_code_at() {
        let packed: Vec<u8> = (0..40u32).map(|i| (i * 37 + 11) as u8).collect();
        for nbits in [2u8, 4, 8] {
            let per = 8 / nbits as usize;
            for first in 0..9 {
                for len in 0..=70 {
                    let mut got = vec![-1.0f32; len];
                    decode_codes(&packed, nbits, first, &mut got);
                    for (i, &g) in got.iter().enumerate() {
                        let want = if (first + i) / per < packed.len() {
                            f32::from(code_at(&packed, nbits, first + i))
                        } else {
                            -1.0
                        };
                        assert_eq!(g, want, "nbits {nbits} first {first} len {len} at {i}");
                    }
                }
            }
            // Shorter than the codes asked for: what exists is decoded, the rest untouched.
            let mut got = vec![-1.0f32; 64];
            decode_codes(&packed[..3], nbits, 0, &mut got);
            let have = (3 * per).min(64);
            assert!(got[have..].iter().all(|&v| v == -1.0), "nbits {nbits}");
            for (i, &g) in got[..have].iter().enumerate() {
                assert_eq!(g, f32::from(code_at(&packed, nbits, i)));
            }
        }
    }

    /// The AVX-512 group decoders against the portable ones.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_group_decoders_match_the_portable_ones() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let bytes: Vec<u8> = (0..64u32).map(|i| (i * 151 + 7) as u8).collect();
        let (w8, w4) = (bytes.as_chunks::<8>().0, bytes.as_chunks::<4>().0);
        let (mut a, mut b) = (vec![[0f32; 16]; w8.len()], vec![[1f32; 16]; w8.len()]);
        decode4_groups(w8, &mut a);
        // SAFETY: the feature was detected.
        unsafe { x86::decode4_avx512(w8, &mut b) };
        assert_eq!(a, b);
        let (mut a, mut b) = (vec![[0f32; 16]; w4.len()], vec![[1f32; 16]; w4.len()]);
        decode2_groups(w4, &mut a);
        // SAFETY: as above.
        unsafe { x86::decode2_avx512(w4, &mut b) };
        assert_eq!(a, b);
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
}
