//! 8-bit blockwise quantization on the dynamic map (bnb `quantize_blockwise`), with its
//! 65536-bin lookup table.

use rayon::prelude::*;

use super::check_finite;
use crate::codes::DYNAMIC_MAP;
use crate::error::{QuantError, Result};

fn check_8bit_blocksize(blocksize: usize) -> Result<()> {
    if blocksize >= 2 && blocksize.is_power_of_two() && blocksize <= 1 << 20 {
        Ok(())
    } else {
        Err(QuantError::InvalidBlocksize {
            blocksize,
            reason: "8-bit block sizes are powers of two from 2 to 2^20".into(),
        })
    }
}

/// A tensor quantized blockwise to 8 bits on the dynamic map (bnb `quantize_blockwise`).
#[derive(Debug, Clone, PartialEq)]
pub struct Blockwise8bit {
    /// One code per value.
    pub quantized: Vec<u8>,
    /// f32 absmax per block.
    pub absmax: Vec<f32>,
    /// Elements per block.
    pub blocksize: usize,
}

impl Blockwise8bit {
    /// Dequantizes with the dynamic map.
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_blockwise_with(&self.quantized, &self.absmax, &DYNAMIC_MAP, self.blocksize)
    }
}

/// Entries of bnb's quantization lookup table over [-1, 1].
const LUT_SIZE: usize = 65536;

/// bnb 0.50.2's CPU 8-bit quantizer does not search the code: it maps the normalised value to
/// one of 65536 evenly spaced bins and reads the code index the bin was assigned (nearest code
/// to the bin's value, by f32 midpoints). Reproduced exactly, bins included.
fn dynamic_lut() -> &'static [u8; LUT_SIZE] {
    static LUT: std::sync::OnceLock<Box<[u8; LUT_SIZE]>> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let code = &DYNAMIC_MAP;
        let mids: [f32; 255] = std::array::from_fn(|i| 0.5f32 * (code[i] + code[i + 1]));
        let mut lut = Box::new([0u8; LUT_SIZE]);
        let mut idx = 0usize;
        for (i, entry) in lut.iter_mut().enumerate() {
            let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            while idx < 255 && mids[idx] < val {
                idx += 1;
            }
            *entry = idx as u8;
        }
        lut
    })
}

/// The bin of a normalised value: `((v + 1) * 0.5) * 65535 + 0.5`, truncated, in f32.
#[inline]
fn lut_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    ((v + 1.0f32) * 0.5f32 * (LUT_SIZE - 1) as f32 + 0.5f32) as u16 as usize
}

/// Quantizes `data` blockwise to 8 bits on the dynamic map exactly like bnb 0.50.2's CPU kernel
/// (`x * (1 / absmax)`, then its 65536-bin lookup table; an all-zero block stores code 0).
pub fn quantize_blockwise(tensor: &str, data: &[f32], blocksize: usize) -> Result<Blockwise8bit> {
    check_8bit_blocksize(blocksize)?;
    check_finite(tensor, data)?;
    let lut = dynamic_lut();
    let mut quantized = vec![0u8; data.len()];
    let mut absmax = vec![0.0f32; data.len().div_ceil(blocksize)];
    quantized
        .par_chunks_mut(blocksize)
        .zip(absmax.par_iter_mut())
        .zip(data.par_chunks(blocksize))
        .for_each(|((out, am), block)| {
            let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            *am = max;
            if max == 0.0 {
                out.fill(0);
                return;
            }
            let inv = 1.0f32 / max;
            for (o, &v) in out.iter_mut().zip(block) {
                *o = lut[lut_index(v * inv)];
            }
        });
    Ok(Blockwise8bit {
        quantized,
        absmax,
        blocksize,
    })
}

/// `code[q] * absmax[block]` for every value.
pub fn dequantize_blockwise_with(
    quantized: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; quantized.len()];
    out.par_chunks_mut(blocksize)
        .zip(quantized.par_chunks(blocksize))
        .zip(absmax.par_iter())
        .for_each(|((o, q), &scale)| {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = code[q as usize] * scale;
            }
        });
    out
}
