//! Device-resident quantized weights: on a compute device that is not the host (a wgpu GPU),
//! [`Linear4bit`](crate::Linear4bit) and [`Linear8bitLt`](crate::Linear8bitLt) keep their
//! weights on that device, still packed, and run their forward with burn tensor ops there.
//!
//! Layout (every integer tensor is `I32`, the one integer dtype all of cachet's backends share):
//! * 4-bit codes: 8 per element, element `8w + i` of the flattened `[out, in]` weight in bits
//!   `4i..4i + 4` of word `w` (half a byte per weight, as bnb's packed bytes);
//! * double-quant absmax codes and LLM.int8 `CB`: 4 bytes per element, byte `i` in bits
//!   `8i..8i + 8` (one byte per value, `CB` sign-extended when unpacked);
//! * absmax, nested absmax, `SCB`, the code tables and the bias: f32.
//!
//! The forward dequantizes a tile of output rows at a time (nibbles unpacked with shifts and
//! masks, mapped through the 16-entry code with `select`, scaled by the per-block absmax, itself
//! double-dequantized on the device) and multiplies the activations with it, so transient memory
//! stays under the tile budget (`DEFAULT_TILE_BYTES`) whatever the layer's size. Arithmetic
//! follows the host kernels step for step; only summation order differs.
//!
//! [`Resident4bit`] lives in `four_bit`, [`Resident8bit`] in `int8`; this module holds where
//! weights reside ([`WeightResidence`]) and the packing and tensor helpers both share.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use cachet_tensor::Precision;

use crate::error::{QuantError, Result};

mod four_bit;
mod int8;

pub use four_bit::Resident4bit;
pub use int8::Resident8bit;

/// Whether `device` is the host (cachet-tensor's notion, re-exported): there the host kernels
/// run (much faster than tensor ops on the CPU); any other device gets device-resident weights.
use cachet_tensor::is_host_device;

/// Default bound on the transient memory of one dequantized tile (64 MiB).
pub const DEFAULT_TILE_BYTES: usize = 64 << 20;

/// Transient bytes counted per weight of a tile: the unpacked codes (i32), the looked-up code
/// values, the expanded scales and the product (f32 each).
const TRANSIENT_BYTES_PER_WEIGHT: usize = 16;

/// Where a quantized layer keeps its weights; see [`is_host_device`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightResidence {
    /// Host memory on the host device, the compute device otherwise.
    #[default]
    Auto,
    /// Always host memory (host kernels; activations travel to the host and back).
    Host,
    /// Always the compute device, even the host one (tensor-op forward; mainly for tests).
    Device,
}

impl WeightResidence {
    /// Whether layers computing on `device` hold their weights there.
    pub fn on_device(self, device: &Device) -> bool {
        match self {
            Self::Auto => !is_host_device(device),
            Self::Host => false,
            Self::Device => true,
        }
    }
}

pub(super) fn transfer_error(what: &str, err: impl std::fmt::Display) -> QuantError {
    QuantError::Tensor(Box::new(cachet_tensor::TensorError::Transfer {
        what: what.to_string(),
        reason: err.to_string(),
    }))
}

pub(super) fn int_tensor(values: Vec<i32>, device: &Device) -> Tensor<1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), (device, DType::I32))
}

pub(super) fn f32_tensor(values: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [values.len()]),
        (device, DType::F32),
    )
}

pub(super) fn read_i32(t: &Tensor<1, Int>, what: &str) -> Result<Vec<i32>> {
    t.clone()
        .try_into_data()
        .map_err(|e| transfer_error(what, e))?
        .convert::<i32>()
        .try_into_vec::<i32>()
        .map_err(|e| transfer_error(what, format!("{e:?}")))
}

pub(super) fn read_f32(t: &Tensor<1>, what: &str) -> Result<Vec<f32>> {
    t.clone()
        .try_into_data()
        .map_err(|e| transfer_error(what, e))?
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| transfer_error(what, format!("{e:?}")))
}

/// Packs bnb's 4-bit bytes (two codes per byte, first in the high nibble) 8 codes per i32.
pub(crate) fn pack_nibbles(packed: &[u8]) -> Vec<i32> {
    packed
        .chunks(4)
        .map(|bytes| {
            let mut word = 0u32;
            for (j, &b) in bytes.iter().enumerate() {
                let b = u32::from(b);
                word |= (b >> 4) << (8 * j);
                word |= (b & 0x0f) << (8 * j + 4);
            }
            word as i32
        })
        .collect()
}

/// Inverse of [`pack_nibbles`]: the first `len` bytes in bnb's layout.
pub(crate) fn unpack_nibbles(words: &[i32], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 4);
    for &w in words {
        let w = w as u32;
        for j in 0..4 {
            let hi = (w >> (8 * j)) & 0x0f;
            let lo = (w >> (8 * j + 4)) & 0x0f;
            out.push(((hi << 4) | lo) as u8);
        }
    }
    out.truncate(len);
    out
}

/// Packs bytes 4 per i32, byte `i` in bits `8i..8i + 8`.
pub(crate) fn pack_bytes(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            i32::from_le_bytes(b)
        })
        .collect()
}

/// Inverse of [`pack_bytes`]: the first `len` bytes.
pub(crate) fn unpack_bytes(words: &[i32], len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.truncate(len);
    out
}

/// Fields of `bits` bits (4 or 8) of `words`, low bits first: `[words · 32/bits]`, unsigned.
pub(super) fn unpack_fields(words: Tensor<1, Int>, bits: usize) -> Tensor<1, Int> {
    let per = 32 / bits;
    let [n] = words.dims();
    let device = words.device();
    let shifts = Tensor::<1, Int>::arange(0..per as i64, &device)
        .mul_scalar(bits as i64)
        .cast(DType::I32)
        .reshape([1, per])
        .expand([n, per]);
    words
        .reshape([n, 1])
        .expand([n, per])
        .bitwise_right_shift(shifts)
        .bitwise_and_scalar(((1u32 << bits) - 1) as i64)
        .reshape([n * per])
}

/// Values `start..start + len` of a per-group tensor `groups` (group `g` covering elements
/// `g·size .. (g+1)·size`), given its groups from `g0` on: each group repeated `size` times.
pub(super) fn expand_groups(
    groups: Tensor<1>,
    g0: usize,
    size: usize,
    start: usize,
    len: usize,
) -> Tensor<1> {
    let [n] = groups.dims();
    let offset = start - g0 * size;
    groups
        .reshape([n, 1])
        .expand([n, size])
        .reshape([n * size])
        .slice(offset..offset + len)
}

/// Rounds to `p` and back to f32 (the host kernels' `round_to`).
pub(super) fn round_tensor<const D: usize>(x: Tensor<D>, p: Precision) -> Tensor<D> {
    match p {
        Precision::F32 => x,
        _ => x.cast(p.dtype()).cast(DType::F32),
    }
}

/// Output rows per tile for `k` inputs under `tile_bytes`.
pub(super) fn rows_per_tile(n: usize, k: usize, tile_bytes: usize) -> usize {
    (tile_bytes / (k.max(1) * TRANSIENT_BYTES_PER_WEIGHT)).clamp(1, n.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibble_and_byte_packing_round_trip() {
        for len in [0usize, 1, 3, 4, 5, 9, 17] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(unpack_nibbles(&pack_nibbles(&bytes), len), bytes);
            assert_eq!(unpack_bytes(&pack_bytes(&bytes), len), bytes);
        }
        // Element 8w + i in bits 4i: byte 0x12 holds elements 0 (1) and 1 (2).
        assert_eq!(pack_nibbles(&[0x12, 0x34]), vec![0x4321]);
    }
}
