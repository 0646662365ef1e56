//! The [`Cache`] trait every cache implements, and the [`MaskLayout`] it reports.

use burn::tensor::Tensor;

use crate::error::Result;
use crate::quantized::QuantizedKv;

/// How the keys a cache returns map to absolute token positions, so the model can mask them.
///
/// Key `j` sits at absolute position `j` if `j < sink_tokens`, else at
/// `kv_offset + (j - sink_tokens)`; keys at or past `valid_length` are unused slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskLayout {
    /// Keys in the returned tensors (their `seq` dimension).
    pub kv_length: usize,
    /// Absolute position of the first non-sink key.
    pub kv_offset: usize,
    /// Leading keys that hold positions `0..sink_tokens` (attention sinks); 0 for most caches.
    pub sink_tokens: usize,
    /// Keys `>= valid_length` are padding slots of a preallocated cache and never attended.
    pub valid_length: usize,
    /// Ring buffers: the non-sink keys are the contiguous run starting at `kv_offset`, rotated so
    /// that the oldest sits at index `sink_tokens + rotation` (0 = in order).
    pub rotation: usize,
    /// An attention window the cache imposes (a sliding-window cache on a model without one):
    /// a query at position `p` only sees keys at positions `> p - window`.
    pub window: Option<usize>,
    /// Sink cache: the non-sink keys are stored this many RoPE positions ahead of where attention
    /// must see them; the model rotates the query forward by `rope_shift` for those keys only
    /// (0: nothing to do). See [`crate::sink::rotate_by`].
    pub rope_shift: usize,
}

impl MaskLayout {
    /// `len` keys at positions `offset..offset + len`, all valid.
    pub fn contiguous(offset: usize, len: usize) -> Self {
        Self {
            kv_length: len,
            kv_offset: offset,
            sink_tokens: 0,
            valid_length: len,
            rotation: 0,
            window: None,
            rope_shift: 0,
        }
    }

    /// Absolute position of key `j`.
    pub fn position(&self, j: usize) -> usize {
        if j < self.sink_tokens {
            return j;
        }
        let n = self.kv_length - self.sink_tokens;
        let index = j - self.sink_tokens;
        self.kv_offset + (index + n - self.rotation % n.max(1)) % n.max(1)
    }
}

/// What attention reads after an update: optionally a quantized prefix (attended to in place by
/// [`QuantizedKv::scores`] and [`QuantizedKv::weighted_values`]), then dense keys and values.
///
/// The layout covers both: keys `0..prefix.len()` are the prefix, the rest are `keys`.
#[derive(Debug, Clone)]
pub struct KvView {
    /// Leading tokens still quantized ([`crate::QuantizedCache`] only).
    pub prefix: Option<QuantizedKv>,
    /// Dense keys after the prefix, `[batch, kv_heads, seq, head_dim]`.
    pub keys: Tensor<4>,
    /// Dense values after the prefix.
    pub values: Tensor<4>,
    /// Positions of all the keys, prefix included.
    pub layout: MaskLayout,
}

impl KvView {
    /// Dense keys and values only.
    pub fn dense(keys: Tensor<4>, values: Tensor<4>, layout: MaskLayout) -> Self {
        Self {
            prefix: None,
            keys,
            values,
            layout,
        }
    }

    /// Tokens in the quantized prefix.
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, QuantizedKv::len)
    }

    /// Plain tensors: the prefix dequantized and concatenated before the dense part.
    pub fn into_dense(self) -> (Tensor<4>, Tensor<4>, MaskLayout) {
        match self.prefix {
            Some(prefix) if !prefix.is_empty() => {
                let (k, v) = prefix.dequantize();
                (
                    Tensor::cat(vec![k, self.keys], 2),
                    Tensor::cat(vec![v, self.values], 2),
                    self.layout,
                )
            }
            _ => (self.keys, self.values, self.layout),
        }
    }
}

/// Per-layer key/value storage, shapes `[batch, kv_heads, seq, head_dim]`.
///
/// Positions: `cache_position` lists the absolute positions of the new tokens (not affected by
/// padding, one more per token). They must continue exactly where the cache stopped
/// ([`Cache::seq_length`]); rewind with [`Cache::crop`].
pub trait Cache: Send + std::fmt::Debug {
    /// Stores the new keys and values of `layer` and returns what attention should use.
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)>;

    /// [`Cache::update`] for models that can attend to a quantized prefix in place: the quantized
    /// cache then skips dequantizing its old tokens into tensors. Other caches return dense views.
    fn update_view(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<KvView> {
        let (keys, values, layout) = self.update(layer, keys, values, cache_position)?;
        Ok(KvView::dense(keys, values, layout))
    }

    /// Tokens `layer` has seen: the absolute position of the next token.
    fn seq_length(&self, layer: usize) -> usize;

    /// Most tokens the cache can hold, `None` when unbounded (or when it evicts instead).
    fn max_length(&self) -> Option<usize>;

    /// The mask layout a query of `query_length` new tokens will get at `layer`, before updating
    /// (the kv length and offset a model needs to build its mask ahead of the forward).
    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout;

    /// Keeps only the first `max_length` tokens (rewinds the cache).
    fn crop(&mut self, max_length: usize) -> Result<()>;

    /// Reorders the batch for beam search: row `i` becomes old row `beam_indices[i]`.
    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()>;

    /// Repeats every batch row `n` times in place (`[a, b]` → `[a, a, b, b]` for n = 2).
    fn batch_repeat_interleave(&mut self, n: usize) -> Result<()> {
        let batch = self.batch_size().unwrap_or(0);
        let indices: Vec<usize> = (0..batch).flat_map(|i| std::iter::repeat_n(i, n)).collect();
        self.reorder(&indices)
    }

    /// Keeps only the batch rows in `indices`, in that order.
    fn batch_select(&mut self, indices: &[usize]) -> Result<()> {
        self.reorder(indices)
    }

    /// Batch size of the stored tensors, once something is stored.
    fn batch_size(&self) -> Option<usize>;

    /// Empties the cache, keeping its configuration (and preallocated memory where it has any).
    fn reset(&mut self);

    /// Bytes the cache holds (allocated capacity, including quantization scales and residuals).
    fn memory_bytes(&self) -> usize;

    /// A copy sharing storage until either side writes (for prefix caching).
    fn boxed_clone(&self) -> Box<dyn Cache>;

    /// Short name, as transformers' `cache_implementation` spells it.
    fn name(&self) -> &'static str;
}

impl Clone for Box<dyn Cache> {
    fn clone(&self) -> Self {
        self.boxed_clone()
    }
}
