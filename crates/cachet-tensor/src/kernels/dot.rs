//! The dot products under the gemv: portable lanes, or AVX2 / AVX-512 picked at run time.

use half::{bf16, f16};

/// Values converted from f16 per step of the f16 dot product.
pub(super) const CONVERT_CHUNK: usize = 256;

/// The SIMD level the dot products run at, detected once per call site (std caches it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Level {
    pub(super) fn detect() -> Self {
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

    use half::{bf16, f16};

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

    /// Σ widen(w)·x over 16-bit weights in 512-bit steps; `widen` turns 16 weights at a pointer
    /// into f32 lanes, `scalar` one weight of the tail.
    ///
    /// # Safety
    /// The caller has AVX-512F, `wp` and `xp` hold `n` values.
    #[inline(always)]
    unsafe fn dot_half_512(
        wp: *const u16,
        xp: *const f32,
        n: usize,
        widen: impl Fn(*const u16) -> __m512,
        scalar: impl Fn(usize) -> f32,
    ) -> f32 {
        let mut i = 0;
        // SAFETY: the caller has the features; every load reads indices below n; the tail is
        // scalar.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); 4];
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
                sum += scalar(i) * *xp.add(i);
                i += 1;
            }
            sum
        }
    }

    /// [`dot_half_512`] in 256-bit steps (`widen` turns 8 weights into f32 lanes).
    ///
    /// # Safety
    /// The caller has AVX2 and FMA (and what `widen` uses), `wp` and `xp` hold `n` values.
    #[inline(always)]
    unsafe fn dot_half_256(
        wp: *const u16,
        xp: *const f32,
        n: usize,
        widen: impl Fn(*const u16) -> __m256,
        scalar: impl Fn(usize) -> f32,
    ) -> f32 {
        let mut i = 0;
        // SAFETY: the caller has the features; every load reads indices below n; the tail is
        // scalar.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
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
                sum += scalar(i) * *xp.add(i);
                i += 1;
            }
            sum
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_bf16_avx512(w: &[bf16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        // bf16 → f32 is the 16 bits moved to the top of the word.
        // SAFETY: AVX-512F is enabled here; `dot_half_512` passes pointers with 16 readable u16.
        unsafe {
            dot_half_512(
                w.as_ptr() as *const u16,
                x.as_ptr(),
                n,
                |p| {
                    let h = _mm256_loadu_si256(p as *const __m256i);
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                },
                |i| w[i].to_f32(),
            )
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_bf16_avx2(w: &[bf16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        // SAFETY: AVX2 and FMA are enabled here; `dot_half_256` passes pointers with 8 readable u16.
        unsafe {
            dot_half_256(
                w.as_ptr() as *const u16,
                x.as_ptr(),
                n,
                |p| {
                    let h = _mm_loadu_si128(p as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                },
                |i| w[i].to_f32(),
            )
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_f16_avx512(w: &[f16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        // SAFETY: AVX-512F (which converts halves) is enabled here; 16 readable u16 per call.
        unsafe {
            dot_half_512(
                w.as_ptr() as *const u16,
                x.as_ptr(),
                n,
                |p| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                |i| w[i].to_f32(),
            )
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_f16_f16c(w: &[f16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        // SAFETY: AVX2, FMA and F16C are enabled here; 8 readable u16 per call.
        unsafe {
            dot_half_256(
                w.as_ptr() as *const u16,
                x.as_ptr(),
                n,
                |p| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                |i| w[i].to_f32(),
            )
        }
    }
}

#[cfg(target_arch = "x86_64")]
use x86::{
    dot_bf16_avx2, dot_bf16_avx512, dot_f16_avx512, dot_f16_f16c, dot_f32_avx2, dot_f32_avx512,
};

pub(super) fn dot_f32(level: Level, w: &[f32], x: &[f32]) -> f32 {
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

pub(super) fn dot_bf16(level: Level, w: &[bf16], x: &[f32]) -> f32 {
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

pub(super) fn dot_f16(level: Level, w: &[f16], x: &[f32], buf: &mut [f32; CONVERT_CHUNK]) -> f32 {
    match level {
        // SAFETY: the level was detected on this CPU (AVX-512F converts halves itself).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { dot_f16_avx512(w, x) },
        // SAFETY: the Avx2 level requires F16C (see `Level::detect`).
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { dot_f16_f16c(w, x) },
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
    use crate::kernels::test_values as values;

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
            let hf: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let exact_hf: f64 = hf
                .iter()
                .zip(&x)
                .map(|(a, b)| a.to_f32() as f64 * *b as f64)
                .sum();
            let mut buf = [0.0f32; CONVERT_CHUNK];
            let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let exact_bf: f64 = bf
                .iter()
                .zip(&x)
                .map(|(a, b)| a.to_f32() as f64 * *b as f64)
                .sum();
            for &level in &levels {
                let f = dot_f32(level, &w, &x) as f64;
                let b = dot_bf16(level, &bf, &x) as f64;
                let h = dot_f16(level, &hf, &x, &mut buf) as f64;
                assert!(
                    (h - exact_hf).abs() < 1e-4,
                    "{level:?} k={k}: {h} vs {exact_hf}"
                );
                assert!((f - exact).abs() < 1e-4, "{level:?} k={k}: {f} vs {exact}");
                assert!(
                    (b - exact_bf).abs() < 1e-4,
                    "{level:?} k={k}: {b} vs {exact_bf}"
                );
            }
        }
    }
}
