//! [`SinkCache`] (StreamingLLM): keeps `num_sink_tokens` first tokens plus the most recent ones,
//! `window_length` in all. When tokens are evicted, the kept keys are re-rotated so their RoPE
//! positions stay consistent — the semantics of transformers' `SinkCache` (v4.52, its last
//! release). transformers re-rotates the whole window on every step; here recent tokens sit in a
//! ring buffer and the common shift is applied to the query instead ([`MaskLayout::rope_shift`],
//! done by [`KvView::scores`]), so an update costs O(new tokens) whatever the window.

use std::sync::Arc;

use burn::tensor::Tensor;
use cachet_tensor::MemoryFootprint;

use crate::cache::{Cache, KvView, MaskLayout};
use crate::error::{KvError, Result};
use crate::store::{Budget, LayerStore, check_layer_order, check_pair, check_positions};

use crate::rope::rotate_by;

#[derive(Debug, Clone)]
struct SinkLayer {
    /// `window_length` slots: sinks at `0..num_sink_tokens`, then a ring of the recent tokens.
    store: LayerStore,
    /// Ring index (after the sinks) of the oldest recent token.
    head: usize,
    seen: usize,
    /// Positions every recent key has been moved back by so far (transformers re-rotates the
    /// kept keys by the number of new tokens on each eviction step). Keys are stored rotated
    /// forward by the shift current when they arrived, and attention rotates the query forward
    /// by the current shift for the non-sink keys: the same scores, without touching the window.
    shift: usize,
}

/// Attention-sink cache with RoPE re-rotation of shifted keys, O(new tokens) per update.
#[derive(Debug, Clone)]
pub struct SinkCache {
    window_length: usize,
    num_sink_tokens: usize,
    /// RoPE inverse frequencies, shared with the views that rotate the query by the shift.
    inv_freq: Arc<[f32]>,
    budget: Budget,
    layers: Vec<SinkLayer>,
}

impl SinkCache {
    /// A sink cache of `window_length` tokens (sinks included) for a model whose RoPE inverse
    /// frequencies are `inv_freq` (`head_dim / 2` values, `rotate_half` layout).
    pub fn new(window_length: usize, num_sink_tokens: usize, inv_freq: Vec<f32>) -> Result<Self> {
        if num_sink_tokens >= window_length {
            return Err(KvError::Config(format!(
                "window_length ({window_length}) must be larger than num_sink_tokens ({num_sink_tokens})"
            )));
        }
        if inv_freq.is_empty() {
            return Err(KvError::Config(
                "sink cache needs the model's RoPE frequencies".into(),
            ));
        }
        Ok(Self {
            window_length,
            num_sink_tokens,
            inv_freq: inv_freq.into(),
            budget: Budget::default(),
            layers: Vec::new(),
        })
    }

    /// The number of layers the cache will hold: the first allocation then checks all of them
    /// together against the memory limit (a [`KvError::TooLarge`] before anything is allocated).
    pub fn with_num_layers(mut self, num_layers: usize) -> Self {
        self.budget.layers = num_layers;
        self
    }

    /// Bytes the whole cache may take (default: this machine's physical memory).
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.budget.limit = Some(bytes);
        self
    }

    fn ring(&self) -> usize {
        self.window_length - self.num_sink_tokens
    }

    /// The layout of a full window after the ring head moved to `head`.
    fn full_layout(&self, seen: usize, head: usize, shift: usize) -> MaskLayout {
        MaskLayout {
            kv_length: self.window_length,
            kv_offset: seen - self.ring(),
            sink_tokens: self.num_sink_tokens,
            valid_length: self.window_length,
            rotation: head,
            window: None,
            rope_shift: shift,
        }
    }
}

impl Cache for SinkCache {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)> {
        check_layer_order(layer, self.layers.len())?;
        check_pair(layer, &keys, &values)?;
        let new = keys.dims()[2];
        let (window, sinks, ring) = (self.window_length, self.num_sink_tokens, self.ring());
        if keys.dims()[3] != 2 * self.inv_freq.len() {
            return Err(KvError::Shape {
                layer,
                what: format!(
                    "head_dim {} does not match the RoPE frequencies ({})",
                    keys.dims()[3],
                    2 * self.inv_freq.len()
                ),
            });
        }
        if layer == self.layers.len() {
            check_positions(layer, 0, cache_position, new)?;
            if new > window {
                return Err(KvError::Config(format!(
                    "the first input ({new} tokens) is longer than the sink cache window ({window}); crop the prompt to its last {window} tokens"
                )));
            }
            let allocated = self.memory_bytes();
            let mut store = LayerStore::try_with_capacity(
                "sink cache",
                &self.budget,
                layer,
                allocated,
                &keys,
                &values,
                window,
            )?;
            store.write_at(0, keys.clone(), values.clone());
            self.layers.push(SinkLayer {
                store,
                head: 0,
                seen: new,
                shift: 0,
            });
            return Ok((keys, values, MaskLayout::contiguous(0, new)));
        }
        let entry = &mut self.layers[layer];
        check_positions(layer, entry.seen, cache_position, new)?;
        entry.store.check(layer, &keys, &values)?;
        let stored = entry.store.len();
        if new + stored < window {
            // Still filling: nothing is evicted or shifted yet.
            entry.store.write_at(stored, keys, values);
            entry.seen += new;
            let (k, v) = entry.store.view();
            return Ok((k, v, MaskLayout::contiguous(0, stored + new)));
        }
        if new >= ring {
            return Err(KvError::Config(format!(
                "{new} new tokens do not fit the sink cache window ({window} with {sinks} sink tokens)"
            )));
        }
        // transformers keeps the last `ring - new` recent keys and moves them back by `new`
        // positions; here the shift grows and the new keys are stored rotated forward by it.
        entry.shift += new;
        let keys = rotate_by(keys, &self.inv_freq, entry.shift);
        let count = stored - sinks;
        let first = (entry.head + count) % ring;
        let fits = new.min(ring - first);
        let [b, h, _, dk] = keys.dims();
        let dv = values.dims()[3];
        entry.store.write_at(
            sinks + first,
            keys.clone().slice([0..b, 0..h, 0..fits, 0..dk]),
            values.clone().slice([0..b, 0..h, 0..fits, 0..dv]),
        );
        if fits < new {
            entry.store.write_at(
                sinks,
                keys.slice([0..b, 0..h, fits..new, 0..dk]),
                values.slice([0..b, 0..h, fits..new, 0..dv]),
            );
        }
        entry.head = (entry.head + count + new - ring) % ring;
        entry.seen += new;
        let (head, seen, shift) = (entry.head, entry.seen, entry.shift);
        let (k, v) = entry.store.view_range(0, window);
        Ok((k, v, self.full_layout(seen, head, shift)))
    }

    /// [`Cache::update`], with the RoPE frequencies attention needs to rotate the query by the
    /// layout's `rope_shift` for the recent keys.
    fn update_view(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<KvView> {
        let (keys, values, layout) = self.update(layer, keys, values, cache_position)?;
        Ok(KvView::dense(keys, values, layout).with_rope_frequencies(self.inv_freq.clone()))
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.seen)
    }

    fn max_length(&self) -> Option<usize> {
        None
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        match self.layers.get(layer) {
            None => MaskLayout::contiguous(0, query_length),
            Some(l) => {
                let stored = l.store.len();
                if stored + query_length < self.window_length {
                    MaskLayout::contiguous(0, stored + query_length)
                } else {
                    let ring = self.ring();
                    let count = stored - self.num_sink_tokens;
                    let head = (l.head + count + query_length).saturating_sub(ring) % ring;
                    self.full_layout(l.seen + query_length, head, l.shift + query_length)
                }
            }
        }
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        for layer in &mut self.layers {
            if max_length >= layer.seen {
                continue;
            }
            if layer.shift > 0 {
                return Err(KvError::Unsupported {
                    cache: "sink cache",
                    op: "crop after tokens were evicted",
                });
            }
            layer.store.truncate(max_length);
            layer.seen = max_length;
        }
        Ok(())
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        for layer in &mut self.layers {
            layer.store.select(beam_indices)?;
        }
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.layers.first().map(|l| l.store.batch())
    }

    fn reset(&mut self) {
        self.layers.clear();
    }

    fn memory_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.store.memory_bytes()).sum()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        "sink"
    }
}
