//! [`QuantizedCache`]: the KIVI quantized KV cache of transformers (`cache_implementation =
//! "quantized"`), with its two backends: `quanto`-style asymmetric min-max and `hqq`-style
//! half-quadratic optimisation of the zero point.
//!
//! Storage per layer: the old tokens as packed 2/4/8-bit codes with a scale and a zero per group
//! (in the cache dtype), and the most recent tokens (the *residual*) in full precision.
//! [`Cache::update`] returns the dequantized old tokens, the residual and the new tokens, like
//! transformers; [`Cache::update_view`] (what attention calls) costs O(new tokens): its
//! [`KvView`] holds the quantized tokens as a [`QuantizedKv`] that [`KvView::scores`] and
//! [`KvView::weighted_values`] read in place, one small dequantized tile at a time, instead of
//! dequantizing the whole prefix into tensors every step.
//!
//! [`Cache::update`]: crate::Cache::update
//! [`Cache::update_view`]: crate::Cache::update_view
//! [`KvView`]: crate::KvView
//! [`KvView::scores`]: crate::KvView::scores
//! [`KvView::weighted_values`]: crate::KvView::weighted_values
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
//!
//! Files: `codec` (the quantizers), `blocks` (append-only block storage), `kernels` (attention
//! over the quantized prefix, tile by tile), `cache` (the cache and its config).

mod blocks;
mod cache;
mod codec;
mod kernels;

pub use blocks::QuantAxis;
pub use cache::{QuantizedCache, QuantizedCacheConfig};
pub use codec::{GroupQuantized, QuantBackend, quantize_groups};

/// Deterministic inputs and readbacks shared by the tests of the quantized cache.
#[cfg(test)]
mod testing {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use super::{QuantBackend, QuantizedCacheConfig};

    pub(crate) fn device() -> Device {
        Device::flex()
    }

    pub(crate) fn random(shape: [usize; 4], seed: u64, dtype: DType) -> Tensor<4> {
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

    pub(crate) fn host(t: Tensor<4>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    pub(crate) fn config(
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
}
