//! The [`Cache`] trait every cache implements, and the [`MaskLayout`] it reports.

use std::sync::Arc;

use burn::tensor::{DType, Tensor};

use crate::error::{KvError, Result};
use crate::rope::rotate_by;

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
    /// must see them; [`KvView::scores`] rotates the query forward by `rope_shift` for those keys
    /// only (0: nothing to do; callers of [`Cache::update`] apply it themselves).
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

/// Leading keys and values a cache keeps in a compact form (quantized) that attention reads in
/// place, a small tile at a time, instead of as tensors.
pub(crate) trait PackedPrefix: std::fmt::Debug + Send + Sync {
    /// Tokens held.
    fn len(&self) -> usize;

    /// `query · keysᵀ`: `query` `[batch, kv_heads, rows, head_dim]` gives unscaled f32 scores
    /// `[batch, kv_heads, rows, len]` on the query's device.
    fn scores(&self, query: Tensor<4>) -> Result<Tensor<4>>;

    /// `probs · values`: weights `[batch, kv_heads, rows, len]` give f32
    /// `[batch, kv_heads, rows, v_dim]` on the weights' device.
    fn weighted_values(&self, probs: Tensor<4>) -> Result<Tensor<4>>;

    /// The keys and values as tensors `[batch, kv_heads, len, _]` in the cache dtype.
    fn dequantize(&self) -> (Tensor<4>, Tensor<4>);
}

/// What attention reads after an update, and the cache-specific part of reading it: a model
/// scores a query with [`KvView::scores`] and weighs the values with [`KvView::weighted_values`]
/// whatever cache produced the view.
///
/// Keys are an optional compact prefix (the quantized cache's old tokens, attended in place),
/// then the dense `keys`; the layout covers both. A sink cache's view also carries the RoPE
/// frequencies that rotate the query by [`MaskLayout::rope_shift`] for its recent keys.
#[derive(Debug, Clone)]
pub struct KvView {
    /// Dense keys after the prefix, `[batch, kv_heads, seq, head_dim]`.
    pub keys: Tensor<4>,
    /// Dense values after the prefix.
    pub values: Tensor<4>,
    /// Positions of all the keys, prefix included.
    pub layout: MaskLayout,
    /// Leading tokens still quantized ([`crate::QuantizedCache`] only).
    prefix: Option<Arc<dyn PackedPrefix>>,
    /// RoPE inverse frequencies of `layout.rope_shift` ([`crate::SinkCache`] only).
    rope_inv_freq: Option<Arc<[f32]>>,
}

impl KvView {
    /// Dense keys and values only.
    pub fn dense(keys: Tensor<4>, values: Tensor<4>, layout: MaskLayout) -> Self {
        Self {
            keys,
            values,
            layout,
            prefix: None,
            rope_inv_freq: None,
        }
    }

    /// The view with `prefix` ahead of its dense keys and values.
    pub(crate) fn with_prefix(self, prefix: Arc<dyn PackedPrefix>) -> Self {
        Self {
            prefix: Some(prefix),
            ..self
        }
    }

    /// The view with the RoPE frequencies that apply the layout's `rope_shift`.
    pub(crate) fn with_rope_frequencies(self, inv_freq: Arc<[f32]>) -> Self {
        Self {
            rope_inv_freq: Some(inv_freq),
            ..self
        }
    }

    /// The compact prefix, for the tests of the caches that make one.
    #[cfg(test)]
    pub(crate) fn prefix(&self) -> Option<&dyn PackedPrefix> {
        self.prefix.as_deref()
    }

    /// Tokens in the quantized prefix.
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.len())
    }

    /// Whether `keys` and `values` are all there is to attend to, as they are (no compact prefix,
    /// no RoPE shift): then any attention kernel may read them directly.
    pub fn is_plain(&self) -> bool {
        self.prefix.is_none() && self.layout.rope_shift == 0
    }

    /// The view checked against its layout, with the unused slots of a preallocated cache
    /// dropped (attention then needs no mask for them).
    pub fn for_attention(self) -> Result<Self> {
        let layout = self.layout;
        let view = if self.prefix.is_none()
            && layout.sink_tokens == 0
            && layout.rotation == 0
            && layout.valid_length < layout.kv_length
        {
            let [b, h, _, dk] = self.keys.dims();
            let dv = self.values.dims()[3];
            let n = layout.valid_length;
            Self {
                keys: self.keys.slice([0..b, 0..h, 0..n, 0..dk]),
                values: self.values.slice([0..b, 0..h, 0..n, 0..dv]),
                layout: MaskLayout {
                    kv_length: n,
                    ..layout
                },
                ..self
            }
        } else {
            self
        };
        view.check()?;
        Ok(view)
    }

    /// Errors unless the prefix and the dense keys and values add up to the layout, and a RoPE
    /// shift comes with its frequencies (and no prefix).
    fn check(&self) -> Result<()> {
        let (prefix, layout) = (self.prefix_len(), &self.layout);
        let (keys, values) = (self.keys.dims()[2], self.values.dims()[2]);
        if prefix + keys != layout.kv_length || keys != values {
            return Err(KvError::View(format!(
                "{prefix} quantized + {keys} dense keys and {values} dense values, but a mask \
                 layout of {} keys",
                layout.kv_length
            )));
        }
        if layout.rope_shift > 0 && (prefix > 0 || self.rope_inv_freq.is_none()) {
            return Err(KvError::View(format!(
                "a RoPE shift of {} needs the RoPE frequencies and no quantized prefix",
                layout.rope_shift
            )));
        }
        Ok(())
    }

    /// Unscaled, unmasked f32 scores `query · keysᵀ` over every key of the view:
    /// `query` `[batch, kv_heads, rows, head_dim]` (the query heads sharing a kv head folded into
    /// `rows`) gives `[batch, kv_heads, rows, layout.kv_length]`. The quantized prefix is read in
    /// place; a sink cache's recent keys see the query rotated by the layout's `rope_shift`.
    pub fn scores(&self, query: Tensor<4>) -> Result<Tensor<4>> {
        self.check()?;
        let [b, h, _, d] = self.keys.dims();
        let [qb, qh, _, qd] = query.dims();
        if (qb, qh, qd) != (b, h, d) {
            return Err(KvError::View(format!(
                "query [{qb}, {qh}, _, {qd}] does not match keys [{b}, {h}, _, {d}]"
            )));
        }
        let dot = |q: Tensor<4>, k: Tensor<4>| q.matmul(k.swap_dims(2, 3));
        let keys = self.keys.clone();
        if let (shift @ 1.., Some(inv_freq)) = (self.layout.rope_shift, &self.rope_inv_freq) {
            // The recent keys are stored `shift` positions ahead: rotate the query forward by as
            // much for them, and score the sinks with the plain query.
            let kv_len = keys.dims()[2];
            let sinks = self.layout.sink_tokens.min(kv_len);
            let shifted = rotate_by(query.clone(), inv_freq, shift);
            let k_sinks = keys.clone().slice([0..b, 0..h, 0..sinks, 0..d]);
            let k_rest = keys.slice([0..b, 0..h, sinks..kv_len, 0..d]);
            return Ok(
                Tensor::cat(vec![dot(query, k_sinks), dot(shifted, k_rest)], 3).cast(DType::F32),
            );
        }
        Ok(match &self.prefix {
            Some(prefix) => Tensor::cat(
                vec![
                    prefix.scores(query.clone())?,
                    dot(query, keys).cast(DType::F32),
                ],
                3,
            ),
            None => dot(query, keys).cast(DType::F32),
        })
    }

    /// `probs · values` over every key of the view: attention weights
    /// `[batch, kv_heads, rows, layout.kv_length]` give `[batch, kv_heads, rows, v_dim]` in the
    /// values' dtype (the quantized prefix read in place).
    pub fn weighted_values(&self, probs: Tensor<4>) -> Result<Tensor<4>> {
        let [b, h, rows, kv_len] = probs.dims();
        let [vb, vh, dense, _] = self.values.dims();
        let prefix_len = self.prefix_len();
        if (b, h, kv_len) != (vb, vh, prefix_len + dense) {
            return Err(KvError::View(format!(
                "attention weights [{b}, {h}, _, {kv_len}] do not match {prefix_len} quantized + \
                 {dense} dense values [{vb}, {vh}, _, _]"
            )));
        }
        let values = self.values.clone();
        let dtype = values.dtype();
        Ok(match &self.prefix {
            Some(prefix) => {
                let old = probs.clone().slice([0..b, 0..h, 0..rows, 0..prefix_len]);
                let recent = probs.slice([0..b, 0..h, 0..rows, prefix_len..kv_len]);
                prefix.weighted_values(old)?.cast(dtype) + recent.cast(dtype).matmul(values)
            }
            None => probs.cast(dtype).matmul(values),
        })
    }

    /// Plain tensors: the prefix dequantized and concatenated before the dense part (keys as
    /// stored: a RoPE shift stays for the caller to apply, as with [`Cache::update`]).
    pub fn into_dense(self) -> (Tensor<4>, Tensor<4>, MaskLayout) {
        match self.prefix {
            Some(prefix) if prefix.len() > 0 => {
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

    /// [`Cache::update`] as a [`KvView`], which attention reads through [`KvView::scores`] and
    /// [`KvView::weighted_values`]: the quantized cache then skips dequantizing its old tokens
    /// into tensors, the sink cache hands over its RoPE shift. Other caches return dense views.
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

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution};

    use super::*;
    use crate::{QuantizedCache, QuantizedCacheConfig, SinkCache};

    fn random(shape: [usize; 4], device: &Device) -> Tensor<4> {
        Tensor::random(shape, Distribution::Default, device)
    }

    fn host(t: Tensor<4>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    fn assert_close(got: Tensor<4>, want: Tensor<4>, tol: f32) {
        assert_eq!(got.dims(), want.dims());
        for (a, b) in host(got).iter().zip(host(want)) {
            assert!((a - b).abs() <= tol, "{a} vs {b}");
        }
    }

    #[test]
    fn a_dense_view_scores_and_weighs_its_tensors() {
        let device = Device::flex();
        // Three filled slots of eight, as a preallocated cache may hand them over.
        let (k, v) = (random([2, 2, 3, 4], &device), random([2, 2, 3, 4], &device));
        let unused = Tensor::<4>::zeros([2, 2, 5, 4], &device);
        let layout = MaskLayout {
            valid_length: 3,
            ..MaskLayout::contiguous(0, 8)
        };
        let view = KvView::dense(
            Tensor::cat(vec![k.clone(), unused.clone()], 2),
            Tensor::cat(vec![v.clone(), unused], 2),
            layout,
        );
        // The unused slots are dropped, with the layout.
        let view = view.for_attention().unwrap();
        assert_eq!(view.layout, MaskLayout::contiguous(0, 3));
        assert!(view.is_plain());
        let q = random([2, 2, 5, 4], &device);
        let scores = view.scores(q.clone()).unwrap();
        assert_close(scores.clone(), q.matmul(k.swap_dims(2, 3)), 0.0);
        let probs = burn::tensor::activation::softmax(scores, 3);
        let out = view.weighted_values(probs.clone()).unwrap();
        assert_close(out, probs.matmul(v), 0.0);
        // What does not fit the view is a typed error, not a panic.
        assert!(matches!(
            view.scores(random([2, 2, 1, 6], &device)),
            Err(KvError::View(_))
        ));
        assert!(matches!(
            view.weighted_values(random([2, 2, 1, 4], &device)),
            Err(KvError::View(_))
        ));
        let mut bad = view.clone();
        bad.layout = MaskLayout::contiguous(0, 2);
        assert!(matches!(bad.for_attention(), Err(KvError::View(_))));
    }

    #[test]
    fn a_sink_view_rotates_the_query_for_its_shifted_keys() {
        let device = Device::flex();
        let inv_freq = vec![0.5, 0.05];
        let mut cache = SinkCache::new(4, 1, inv_freq).unwrap();
        let (a, newest) = (random([1, 2, 3, 4], &device), random([1, 2, 1, 4], &device));
        cache
            .update_view(0, a.clone(), a.clone(), &[0, 1, 2])
            .unwrap();
        let view = cache
            .update_view(0, newest.clone(), newest.clone(), &[3])
            .unwrap()
            .for_attention()
            .unwrap();
        assert_eq!(view.layout.rope_shift, 1);
        assert!(!view.is_plain());
        let q = random([1, 2, 3, 4], &device);
        let scores = view.scores(q.clone()).unwrap();
        // The sink sees the plain query; the newest key, stored rotated forward by the shift,
        // sees the query rotated by as much: the plain dot product (rotations keep it).
        let dot = |k: Tensor<4>| q.clone().matmul(k.swap_dims(2, 3));
        let sink = a.slice([0..1, 0..2, 0..1, 0..4]);
        let slot = (view.layout.rotation + 2) % 3 + 1;
        assert_close(
            scores.clone().slice([0..1, 0..2, 0..3, 0..1]),
            dot(sink),
            1e-5,
        );
        assert_close(
            scores.slice([0..1, 0..2, 0..3, slot..slot + 1]),
            dot(newest),
            1e-5,
        );
        // The same layout without the RoPE frequencies cannot be attended.
        let bare = KvView::dense(view.keys.clone(), view.values.clone(), view.layout);
        assert!(matches!(bare.scores(q), Err(KvError::View(_))));
    }

    #[test]
    fn a_quantized_view_attends_like_its_dense_form() {
        let device = Device::flex();
        let config = QuantizedCacheConfig {
            residual_length: 4,
            q_group_size: 4,
            ..QuantizedCacheConfig::default()
        };
        let mut cache = QuantizedCache::new(config).unwrap();
        let k = random([1, 2, 8, 8], &device);
        cache
            .update(0, k.clone(), k, &(0..8).collect::<Vec<_>>())
            .unwrap();
        let new = random([1, 2, 1, 8], &device);
        let view = cache.update_view(0, new.clone(), new, &[8]).unwrap();
        let view = view.for_attention().unwrap();
        assert!(view.prefix_len() > 0 && !view.is_plain());
        let (keys, values, layout) = view.clone().into_dense();
        assert_eq!(layout, view.layout);
        let q = random([1, 2, 3, 8], &device);
        let scores = view.scores(q.clone()).unwrap();
        assert_close(scores.clone(), q.matmul(keys.swap_dims(2, 3)), 1e-5);
        let probs = burn::tensor::activation::softmax(scores, 3);
        let out = view.weighted_values(probs.clone()).unwrap();
        assert_close(out, probs.matmul(values), 1e-5);
    }
}
