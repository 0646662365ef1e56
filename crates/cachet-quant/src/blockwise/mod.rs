//! Blockwise quantization, bit-exact with bitsandbytes 0.50.2 on CPU: 4-bit NF4/FP4
//! (`quantize_4bit`, with double quantization of the absmax) and 8-bit on the dynamic map
//! (`quantize_blockwise`).
//!
//! Both work on the flattened tensor in blocks of `blocksize` values with one f32 absmax per
//! block; a trailing partial block gets its own absmax. This module holds the 4-bit formats and
//! entry points; the kernels live by job: `quantize4` (4-bit codes), `dequantize4` (4-bit
//! decoding), `dynamic8` (8-bit on the dynamic map), `torch_sum` (torch's f32 mean).

use std::borrow::Cow;

use rayon::prelude::*;

use crate::codes::{DYNAMIC_MAP, QuantType};
use crate::error::{QuantError, Result};
use crate::simd::SimdLevel;

mod dequantize4;
mod dynamic8;
mod quantize4;
#[cfg(test)]
mod tests;
mod torch_sum;

pub use dequantize4::dequantize_4bit_into;
pub(crate) use dequantize4::dequantize_4bit_with;
#[cfg(target_arch = "x86_64")]
pub(crate) use dequantize4::{CodeAvx2, decode8_avx2, decode16_avx512};
pub use dynamic8::{Blockwise8bit, dequantize_blockwise_with, quantize_blockwise};
pub(crate) use quantize4::quantize_4bit_codes;
pub use torch_sum::{torch_mean_f32, torch_sum_f32};

/// Block sizes bnb accepts for 4-bit quantization.
pub const VALID_4BIT_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Block size of the nested (double) quantization of the absmax, fixed by bnb.
pub const NESTED_BLOCKSIZE: usize = 256;
/// Default block size of 8-bit blockwise quantization.
pub const DEFAULT_8BIT_BLOCKSIZE: usize = 4096;

/// Checks a 4-bit block size: a power of two in 32..=4096.
pub fn check_4bit_blocksize(blocksize: usize) -> Result<()> {
    if VALID_4BIT_BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(QuantError::InvalidBlocksize {
            blocksize,
            reason: "4-bit block sizes are powers of two from 32 to 4096".into(),
        })
    }
}

fn check_finite(what: &str, data: &[f32]) -> Result<()> {
    match data.par_iter().position_any(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            tensor: what.to_string(),
            index,
            value: data[index],
        }),
        None => Ok(()),
    }
}

/// The per-block scales of a 4-bit tensor: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum AbsMax {
    /// One f32 absmax per block.
    Plain(Vec<f32>),
    /// `absmax - offset` quantized to 8 bits on the dynamic map (bnb `compress_statistics`).
    Nested(NestedAbsMax),
}

/// Double-quantized absmax (`weight.absmax` u8, `weight.nested_absmax`, `nested_offset`).
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsMax {
    /// 8-bit codes of `absmax - offset`, one per 4-bit block.
    pub quantized: Vec<u8>,
    /// f32 absmax of each nested block of [`NESTED_BLOCKSIZE`] codes.
    pub absmax: Vec<f32>,
    /// The mean of the original absmax, added back after dequantization.
    pub offset: f32,
    /// Nested block size (always 256 for bnb).
    pub blocksize: usize,
    /// The 8-bit code (`nested_quant_map`).
    pub code: Vec<f32>,
}

impl AbsMax {
    /// Number of 4-bit blocks these scales cover.
    pub fn len(&self) -> usize {
        match self {
            Self::Plain(v) => v.len(),
            Self::Nested(n) => n.quantized.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 absmax of every block (dequantizing nested statistics as bnb does).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Self::Plain(v) => Cow::Borrowed(v),
            Self::Nested(n) => {
                let mut out =
                    dequantize_blockwise_with(&n.quantized, &n.absmax, &n.code, n.blocksize);
                for v in &mut out {
                    *v += n.offset;
                }
                Cow::Owned(out)
            }
        }
    }

    /// Bytes these statistics take in memory.
    pub fn memory_bytes(&self) -> usize {
        match self {
            Self::Plain(v) => v.len() * 4,
            Self::Nested(n) => n.quantized.len() + n.absmax.len() * 4 + n.code.len() * 4 + 4,
        }
    }
}

/// A tensor quantized to 4 bits (bnb `Params4bit` data + `QuantState`).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4bit {
    /// Two codes per byte, first element in the high nibble; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    /// Per-block scales.
    pub absmax: AbsMax,
    /// Shape of the original tensor (`[out, in]` for a weight).
    pub shape: Vec<usize>,
    /// Elements per block.
    pub blocksize: usize,
    /// NF4 or FP4.
    pub quant_type: QuantType,
}

/// The product of `shape`, or `None` where it overflows a `usize`.
fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

impl Quantized4bit {
    /// Number of elements of the original tensor (of a [validated](Self::validate) state).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Dequantizes to f32 (`code[q] * absmax[block]`, exactly as bnb).
    ///
    /// FP4 code 8 (which bnb's quantizer emits for tiny positive values) decodes to +0.0 as in
    /// `get_4bit_type`; bnb's own CPU kernels give -0.0 or +0.0 for it depending on the SIMD path
    /// the shape selects (AVX2 and scalar: -0.0; AVX-512 and the torch fallback: +0.0).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.numel()];
        self.dequantize_into(&mut out);
        out
    }

    /// Dequantizes into `out` (`numel()` values), e.g. a reused buffer.
    ///
    /// # Panics
    /// If `out` does not hold exactly `numel()` values.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.numel(), "dequantize_into: output length");
        let absmax = self.absmax.to_f32();
        // Chunks of whole blocks (block sizes are even, so chunks start on a byte).
        let chunk = self.blocksize * 64;
        let code = self.quant_type.code();
        let level = SimdLevel::current();
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
            let (packed, blocksize) = (&self.packed, self.blocksize);
            dequantize_4bit_with(packed, &absmax, blocksize, code, i * chunk, o, level);
        });
    }

    /// Bytes the quantized tensor takes in memory.
    pub fn memory_bytes(&self) -> usize {
        self.packed.len() + self.absmax.memory_bytes()
    }

    /// Checks that the parts agree with each other (after loading from a file).
    pub fn validate(&self, tensor: &str) -> Result<()> {
        check_4bit_blocksize(self.blocksize)?;
        let bad = |reason: String| QuantError::InconsistentState {
            tensor: tensor.to_string(),
            reason,
        };
        let n = checked_numel(&self.shape).ok_or_else(|| {
            bad(format!(
                "shape {:?} has more elements than this machine can address",
                self.shape
            ))
        })?;
        if self.packed.len() != n.div_ceil(2) {
            return Err(bad(format!(
                "{} packed bytes for shape {:?} ({} values need {})",
                self.packed.len(),
                self.shape,
                n,
                n.div_ceil(2)
            )));
        }
        let blocks = n.div_ceil(self.blocksize);
        if self.absmax.len() != blocks {
            return Err(bad(format!(
                "{} absmax values for {} blocks of {} (shape {:?})",
                self.absmax.len(),
                blocks,
                self.blocksize,
                self.shape
            )));
        }
        if let AbsMax::Nested(nested) = &self.absmax {
            if nested.blocksize != NESTED_BLOCKSIZE {
                return Err(bad(format!(
                    "nested blocksize {} (bnb only supports {NESTED_BLOCKSIZE})",
                    nested.blocksize
                )));
            }
            let nested_blocks = blocks.div_ceil(nested.blocksize);
            if nested.absmax.len() != nested_blocks {
                return Err(bad(format!(
                    "{} nested absmax values, {} blocks of absmax need {}",
                    nested.absmax.len(),
                    blocks,
                    nested_blocks
                )));
            }
            if nested.code.len() != 256 {
                return Err(bad(format!(
                    "nested quant map has {} values, expected 256",
                    nested.code.len()
                )));
            }
        }
        Ok(())
    }
}

/// Quantizes `data` (a tensor of `shape`, flattened row-major) to 4 bits like bnb's
/// `quantize_4bit(A, blocksize, compress_statistics=double_quant, quant_type)`.
pub fn quantize_4bit(
    tensor: &str,
    data: &[f32],
    shape: &[usize],
    blocksize: usize,
    quant_type: QuantType,
    double_quant: bool,
) -> Result<Quantized4bit> {
    check_4bit_blocksize(blocksize)?;
    if checked_numel(shape) != Some(data.len()) {
        return Err(QuantError::InconsistentState {
            tensor: tensor.to_string(),
            reason: format!("{} values for shape {shape:?}", data.len()),
        });
    }
    let n = data.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0.0f32; n.div_ceil(blocksize)];
    if !quantize_4bit_codes(
        data,
        blocksize,
        quant_type,
        SimdLevel::current(),
        &mut packed,
        &mut absmax,
    ) {
        check_finite(tensor, data)?;
    }
    let absmax = if double_quant {
        AbsMax::Nested(double_quantize(tensor, &absmax)?)
    } else {
        AbsMax::Plain(absmax)
    };
    Ok(Quantized4bit {
        packed,
        absmax,
        shape: shape.to_vec(),
        blocksize,
        quant_type,
    })
}

/// bnb's `compress_statistics`: the absmax centred on its torch mean, then quantized blockwise
/// to 8 bits on the dynamic map.
fn double_quantize(tensor: &str, absmax: &[f32]) -> Result<NestedAbsMax> {
    let offset = torch_mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let q = quantize_blockwise(tensor, &centered, NESTED_BLOCKSIZE)?;
    Ok(NestedAbsMax {
        quantized: q.quantized,
        absmax: q.absmax,
        offset,
        blocksize: NESTED_BLOCKSIZE,
        code: DYNAMIC_MAP.to_vec(),
    })
}
