//! The seam between attention and a KV cache.
//!
//! A model calls [`KvCache::update`] once per layer per forward with the keys and values of the
//! new tokens, and attends to what it returns. `cachet-kv` implements every cache type of
//! transformers' guide on this trait; a forward without a cache attends to the new tokens only.

use burn::tensor::Tensor;

/// Boxed error a cache may return; the model wraps it in [`crate::ModelError::Cache`].
pub type CacheError = Box<dyn std::error::Error + Send + Sync>;

/// How the keys a cache returns map to absolute token positions, for building the attention mask.
///
/// Key `j` of the returned tensors sits at absolute position `kv_offset + j`; keys at or past
/// `valid_length` are unused slots of a preallocated cache and are masked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskLayout {
    /// Number of keys the returned tensors hold (their `seq` dimension).
    pub kv_length: usize,
    /// Absolute position of key 0.
    pub kv_offset: usize,
    /// Keys `>= valid_length` are padding slots, never attended.
    pub valid_length: usize,
}

/// Per-layer key/value storage, shapes `[batch, kv_heads, seq, head_dim]`.
pub trait KvCache {
    /// Stores the new tokens' keys and values of `layer` at `cache_position` (absolute positions
    /// of the new tokens, one more per token, unaffected by padding) and returns the keys and
    /// values attention should use, with their [`MaskLayout`].
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout), CacheError>;

    /// Tokens already stored for `layer` (the next token's cache position).
    fn seq_length(&self, layer: usize) -> usize;
}
