//! Host kernels for dense projections, the part of a decode step that reads every weight byte.
//!
//! A [`DenseMatrix`] keeps a weight in Hugging Face's row-major `[out, in]` layout in host
//! memory (f32, bf16 or f16) and multiplies activations by its transpose: for a few rows (decode,
//! beams) with a gemv that streams each weight row once from memory across the rayon pool and
//! reuses it from L1 for every activation row; for many rows (prefill) with a blocked gemm
//! (the `gemm` crate, the one burn's CPU backend uses) that reads the weight through strides,
//! so no transposed copy is ever made. [`causal_attention`] is the tiled causal attention of a
//! prompt, and [`silu_mul`] SwiGLU's elementwise part.

pub use attention::{AttentionShape, causal_attention, causal_attention_strided};
pub use decode::{decode_attention, rms_norm, rotate_half};
pub use dense::{DenseMatrix, WeightDType, matmul_t_tile};
pub use silu::{sigmoid, silu_mul};

use dot::Level;

mod attention;
mod decode;
mod dense;
mod dot;
mod silu;

/// Deterministic pseudo-random values in [-1, 1] for the kernels' tests.
#[cfg(test)]
fn test_values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}
