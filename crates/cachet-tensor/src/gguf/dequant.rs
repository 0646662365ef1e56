//! Dequantizing ggml blocks to floats, bit for bit as gguf-py's `gguf.quants.dequantize`.
//!
//! Each kernel turns one block into its elements with the same f32 operations in the same order
//! as the reference (a product, then a sum or difference, each rounded), so results are equal to
//! the last bit. Blocks are spread over rayon's pool in chunks of a few thousand elements.

use half::{bf16, f16};
use rayon::prelude::*;

use super::error::DequantizeError;
use super::types::GgmlType;

/// Elements dequantized per parallel task: big enough to amortise scheduling, small enough to
/// balance a two-core machine on one mid-sized matrix.
const TASK_ELEMENTS: usize = 16 * 1024;

/// An output element type: f32 or a half type rounded to nearest-even from the f32 result.
trait Out: Copy + Send + Sync + 'static {
    /// Whether this is f32 itself (no scratch buffer needed).
    const IS_F32: bool;
    fn from_f32(x: f32) -> Self;
    fn as_f32_mut(out: &mut [Self]) -> Option<&mut [f32]>;
}

impl Out for f32 {
    const IS_F32: bool = true;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn as_f32_mut(out: &mut [Self]) -> Option<&mut [f32]> {
        Some(out)
    }
}

impl Out for f16 {
    const IS_F32: bool = false;
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

impl Out for bf16 {
    const IS_F32: bool = false;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

/// Dequantizes `src` (whole blocks of `ty`) into `dst`, which must hold exactly the elements
/// those blocks encode.
pub fn dequantize_into(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), DequantizeError> {
    run(ty, src, dst)
}

/// Like [`dequantize_into`], rounding each f32 result to f16 (nearest-even).
pub(crate) fn dequantize_into_f16(
    ty: GgmlType,
    src: &[u8],
    dst: &mut [f16],
) -> Result<(), DequantizeError> {
    run(ty, src, dst)
}

/// Like [`dequantize_into`], rounding each f32 result to bf16 (nearest-even).
pub(crate) fn dequantize_into_bf16(
    ty: GgmlType,
    src: &[u8],
    dst: &mut [bf16],
) -> Result<(), DequantizeError> {
    run(ty, src, dst)
}

/// Dequantizes whole blocks of `ty` into a new vector (its length follows from `src.len()`).
pub fn dequantize(ty: GgmlType, src: &[u8]) -> Result<Vec<f32>, DequantizeError> {
    let elements = elements_in(ty, src.len())?;
    let mut out = vec![0f32; elements];
    run(ty, src, &mut out)?;
    Ok(out)
}

/// Elements encoded by `bytes` bytes of whole blocks of `ty`.
pub(crate) fn elements_in(ty: GgmlType, bytes: usize) -> Result<usize, DequantizeError> {
    let length = || DequantizeError::Length {
        ggml_type: ty,
        bytes,
        elements: 0,
        block: ty.block_size(),
        type_size: ty.type_size(),
    };
    if !bytes.is_multiple_of(ty.type_size()) {
        return Err(length());
    }
    (bytes / ty.type_size())
        .checked_mul(ty.block_size())
        .ok_or_else(length)
}

fn run<T: Out>(ty: GgmlType, src: &[u8], dst: &mut [T]) -> Result<(), DequantizeError> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let blocks = src.len() / ts;
    if !src.len().is_multiple_of(ts) || blocks.checked_mul(bs) != Some(dst.len()) {
        return Err(DequantizeError::Length {
            ggml_type: ty,
            bytes: src.len(),
            elements: dst.len(),
            block: bs,
            type_size: ts,
        });
    }
    match ty {
        GgmlType::F32 => blocks_par::<T, 4, 1>(src, dst, |b, o| o[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => blocks_par::<T, 2, 1>(src, dst, |b, o| o[0] = f16_le(*b)),
        GgmlType::BF16 => blocks_par::<T, 2, 1>(src, dst, |b, o| {
            o[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16)
        }),
        GgmlType::Q4_0 => blocks_par::<T, 18, 32>(src, dst, q4_0),
        GgmlType::Q4_1 => blocks_par::<T, 20, 32>(src, dst, q4_1),
        GgmlType::Q5_0 => blocks_par::<T, 22, 32>(src, dst, q5_0),
        GgmlType::Q5_1 => blocks_par::<T, 24, 32>(src, dst, q5_1),
        GgmlType::Q8_0 => blocks_par::<T, 34, 32>(src, dst, q8_0),
        GgmlType::Q2_K => blocks_par::<T, 84, 256>(src, dst, q2_k),
        GgmlType::Q3_K => blocks_par::<T, 110, 256>(src, dst, q3_k),
        GgmlType::Q4_K => blocks_par::<T, 144, 256>(src, dst, q4_k),
        GgmlType::Q5_K => blocks_par::<T, 176, 256>(src, dst, q5_k),
        GgmlType::Q6_K => blocks_par::<T, 210, 256>(src, dst, q6_k),
        GgmlType::Q8_K => blocks_par::<T, 292, 256>(src, dst, q8_k),
        other => return Err(DequantizeError::Unsupported(other)),
    }
    Ok(())
}

/// Runs `kernel` over every `TS`-byte block of `src`, writing `BS` elements each into `dst`
/// (whose length the caller has checked), in parallel chunks.
fn blocks_par<T: Out, const TS: usize, const BS: usize>(
    src: &[u8],
    dst: &mut [T],
    kernel: fn(&[u8; TS], &mut [f32; BS]),
) {
    let per_task = TASK_ELEMENTS.div_ceil(BS);
    let (src_blocks, _) = src.as_chunks::<TS>();
    let run_chunk = |src: &[[u8; TS]], out: &mut [f32]| {
        let (out_blocks, _) = out.as_chunks_mut::<BS>();
        for (block, out) in src.iter().zip(out_blocks) {
            kernel(block, out);
        }
    };
    if T::IS_F32 {
        let Some(dst) = T::as_f32_mut(dst) else {
            return;
        };
        src_blocks
            .par_chunks(per_task)
            .zip(dst.par_chunks_mut(per_task * BS))
            .for_each(|(src, out)| run_chunk(src, out));
    } else {
        src_blocks
            .par_chunks(per_task)
            .zip(dst.par_chunks_mut(per_task * BS))
            .for_each_init(Vec::new, |scratch: &mut Vec<f32>, (src, out)| {
                scratch.clear();
                scratch.resize(out.len(), 0.0);
                run_chunk(src, scratch);
                for (o, &x) in out.iter_mut().zip(scratch.iter()) {
                    *o = T::from_f32(x);
                }
            });
    }
}

#[inline(always)]
fn f16_le(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

#[inline(always)]
fn f16_at<const N: usize>(b: &[u8; N], i: usize) -> f32 {
    f16_le([b[i], b[i + 1]])
}

/// `d`, then 16 bytes of two 4-bit values each (low nibbles first half); value `d * (q - 8)`.
fn q4_0(b: &[u8; 18], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        o[j] = d * f32::from((q & 0x0F) as i8 - 8);
        o[j + 16] = d * f32::from((q >> 4) as i8 - 8);
    }
}

/// `d`, `m`, 16 bytes of nibbles; value `d * q + m`.
fn q4_1(b: &[u8; 20], o: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..16 {
        let q = b[4 + j];
        o[j] = d * f32::from(q & 0x0F) + m;
        o[j + 16] = d * f32::from(q >> 4) + m;
    }
}

/// Fifth bits of the 32 elements (bit i of a little-endian u32 is element i).
#[inline(always)]
fn high_bits(b: [u8; 4]) -> u32 {
    u32::from_le_bytes(b)
}

/// `d`, 32 high bits, 16 bytes of nibbles; value `d * (q - 16)`.
fn q5_0(b: &[u8; 22], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = high_bits([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let lo = (q & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
        o[j] = d * f32::from(lo as i8 - 16);
        o[j + 16] = d * f32::from(hi as i8 - 16);
    }
}

/// `d`, `m`, 32 high bits, 16 bytes of nibbles; value `d * q + m`.
fn q5_1(b: &[u8; 24], o: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = high_bits([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let lo = (q & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
        o[j] = d * f32::from(lo) + m;
        o[j + 16] = d * f32::from(hi) + m;
    }
}

/// `d`, 32 signed bytes; value `q * d`.
fn q8_0(b: &[u8; 34], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        o[j] = f32::from(b[2 + j] as i8) * d;
    }
}

/// f32 `d`, 256 signed bytes, 16 i16 block sums (unused here); value `d * q`.
fn q8_k(b: &[u8; 292], o: &mut [f32; 256]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..256 {
        o[j] = d * f32::from(b[4 + j] as i8);
    }
}

/// 16 scale bytes (low nibble scale, high nibble minimum), 64 bytes of 2-bit values, `d`,
/// `dmin`; value `(d * sc) * q - (dmin * m)` per 16-element sub-block.
fn q2_k(b: &[u8; 84], o: &mut [f32; 256]) {
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for half in 0..2 {
        for shift in 0..4 {
            for sub in 0..2 {
                let s = b[half * 8 + shift * 2 + sub];
                let dl = d * f32::from(s & 0x0F);
                let ml = dmin * f32::from(s >> 4);
                let base = half * 128 + shift * 32 + sub * 16;
                for l in 0..16 {
                    let q = (b[16 + half * 32 + sub * 16 + l] >> (2 * shift)) & 3;
                    o[base + l] = dl * f32::from(q) - ml;
                }
            }
        }
    }
}

/// 32 bytes of high-bit masks, 64 bytes of 2-bit values, 12 bytes of 6-bit scales, `d`;
/// value `(d * (sc - 32)) * (q - 4 * !hbit)` per 16-element sub-block.
fn q3_k(b: &[u8; 110], o: &mut [f32; 256]) {
    let d = f16_at(b, 108);
    let sc = |i: usize| -> f32 {
        let lo = (b[96 + i % 8] >> (4 * (i / 8))) & 0x0F;
        let hi = (b[104 + i % 4] >> (2 * (i / 4))) & 0x03;
        f32::from((lo | (hi << 4)) as i8 - 32)
    };
    for half in 0..2 {
        for shift in 0..4 {
            let plane = half * 4 + shift;
            for sub in 0..2 {
                let e0 = half * 128 + shift * 32 + sub * 16;
                let dl = d * sc(e0 / 16);
                for l in sub * 16..sub * 16 + 16 {
                    let low = ((b[32 + half * 32 + l] >> (2 * shift)) & 3) as i8;
                    let high = (b[l] >> plane) & 1;
                    let q = low - if high == 0 { 4 } else { 0 };
                    o[half * 128 + shift * 32 + l] = dl * f32::from(q);
                }
            }
        }
    }
}

/// The eight 6-bit scales and minimums packed in 12 bytes (K-quants with 32-element
/// sub-blocks).
#[inline(always)]
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// `d`, `dmin`, 12 scale bytes, 128 bytes of nibbles; value `(d * sc) * q - (dmin * m)`.
fn q4_k(b: &[u8; 144], o: &mut [f32; 256]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    for chunk in 0..4 {
        for nib in 0..2 {
            let s = chunk * 2 + nib;
            let ds = d * f32::from(sc[s]);
            let dm = dmin * f32::from(mn[s]);
            for l in 0..32 {
                let q = (b[16 + chunk * 32 + l] >> (4 * nib)) & 0x0F;
                o[chunk * 64 + nib * 32 + l] = ds * f32::from(q) - dm;
            }
        }
    }
}

/// `d`, `dmin`, 12 scale bytes, 32 bytes of fifth bits, 128 bytes of nibbles; value
/// `(d * sc) * q - (dmin * m)`.
fn q5_k(b: &[u8; 176], o: &mut [f32; 256]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    for chunk in 0..4 {
        for nib in 0..2 {
            let s = chunk * 2 + nib;
            let ds = d * f32::from(sc[s]);
            let dm = dmin * f32::from(mn[s]);
            for l in 0..32 {
                let low = (b[48 + chunk * 32 + l] >> (4 * nib)) & 0x0F;
                let high = (b[16 + l] >> s) & 1;
                o[chunk * 64 + nib * 32 + l] = ds * f32::from(low | (high << 4)) - dm;
            }
        }
    }
}

/// 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed scales, `d`; value
/// `(d * sc) * (q - 32)` per 16-element sub-block.
fn q6_k(b: &[u8; 210], o: &mut [f32; 256]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        for part in 0..4 {
            for sub in 0..2 {
                let e0 = half * 128 + part * 32 + sub * 16;
                let ds = d * f32::from(b[192 + e0 / 16] as i8);
                for l in sub * 16..sub * 16 + 16 {
                    let low = (b[half * 64 + (part % 2) * 32 + l] >> (4 * (part / 2))) & 0x0F;
                    let high = (b[128 + half * 32 + l] >> (2 * part)) & 3;
                    let q = (low | (high << 4)) as i8 - 32;
                    o[half * 128 + part * 32 + l] = ds * f32::from(q);
                }
            }
        }
    }
}
