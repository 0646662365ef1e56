//! [`SlidingWindowCache`]: Mistral's sliding-window attention with static-shaped storage: each
//! layer keeps only the last `sliding_window` tokens, all a future query can still see.
//!
//! Decoding one token writes it over the oldest slot of a ring buffer (O(1), no shifting) and
//! returns the buffer in ring order with a rotated [`MaskLayout`]; multi-token updates (prefill,
//! chunks) attend to the stored tail plus all new tokens, then keep the last window.

use burn::tensor::Tensor;
use cachet_tensor::MemoryFootprint;

use crate::cache::{Cache, MaskLayout};
use crate::error::{KvError, Result};
use crate::store::{Budget, LayerStore, check_layer_order, check_pair, check_positions};

#[derive(Debug, Clone)]
struct WindowLayer {
    /// `window` slots; logical token `i` of the stored run is at slot `(head + i) % window`.
    store: LayerStore,
    head: usize,
    seen: usize,
}

/// A cache bounded by the model's attention window; generation length is unbounded.
#[derive(Debug, Clone)]
pub struct SlidingWindowCache {
    window: usize,
    budget: Budget,
    layers: Vec<WindowLayer>,
}

/// The stored run in logical order (oldest first).
fn ordered(store: &LayerStore, head: usize, stored: usize) -> (Tensor<4>, Tensor<4>) {
    if head == 0 {
        return store.view_range(0, stored);
    }
    let (k1, v1) = store.view_range(head, stored);
    let (k0, v0) = store.view_range(0, head);
    (Tensor::cat(vec![k1, k0], 2), Tensor::cat(vec![v1, v0], 2))
}

impl WindowLayer {
    /// Rewrites the ring in logical order (head 0).
    fn linearize(&mut self) {
        if self.head == 0 {
            return;
        }
        let stored = self.store.len();
        let (k, v) = ordered(&self.store, self.head, stored);
        self.store.truncate(0);
        self.store.write_at(0, k, v);
        self.store.truncate(stored);
        self.head = 0;
    }
}

impl SlidingWindowCache {
    /// A cache for a model whose queries see the last `sliding_window` positions (itself included).
    pub fn new(sliding_window: usize) -> Result<Self> {
        if sliding_window < 2 {
            return Err(KvError::Config(format!(
                "sliding_window must be at least 2, got {sliding_window}"
            )));
        }
        Ok(Self {
            window: sliding_window,
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

    /// The attention window.
    pub fn sliding_window(&self) -> usize {
        self.window
    }
}

impl Cache for SlidingWindowCache {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)> {
        check_layer_order(layer, self.layers.len())?;
        let window = self.window;
        if layer == self.layers.len() {
            check_pair(layer, &keys, &values)?;
            let allocated = self.memory_bytes();
            self.layers.push(WindowLayer {
                store: LayerStore::try_with_capacity(
                    "sliding_window cache",
                    &self.budget,
                    layer,
                    allocated,
                    &keys,
                    &values,
                    window,
                )?,
                head: 0,
                seen: 0,
            });
        }
        let entry = &mut self.layers[layer];
        entry.store.check(layer, &keys, &values)?;
        let new = keys.dims()[2];
        check_positions(layer, entry.seen, cache_position, new)?;
        let stored = entry.store.len();
        let windowed = |layout: MaskLayout| MaskLayout {
            window: Some(window),
            ..layout
        };
        if new == 1 {
            // Ring write: the new token takes the slot after the newest (the oldest, once full).
            let slot = (entry.head + stored) % window;
            let len_before = entry.store.len();
            entry.store.write_at(slot, keys, values);
            let filled = (stored + 1).min(window);
            entry.store.truncate(len_before.max(filled));
            if stored == window {
                entry.head = (entry.head + 1) % window;
            }
            entry.seen += 1;
            let (k, v) = entry.store.view_range(0, filled);
            let layout = MaskLayout {
                rotation: entry.head,
                ..MaskLayout::contiguous(entry.seen - filled, filled)
            };
            return Ok((k, v, windowed(layout)));
        }
        // Several tokens: attend to the stored run (in order) plus all new tokens.
        let (full_k, full_v) = if stored == 0 {
            (keys, values)
        } else {
            let (k, v) = ordered(&entry.store, entry.head, stored);
            (
                Tensor::cat(vec![k, keys], 2),
                Tensor::cat(vec![v, values], 2),
            )
        };
        let total = stored + new;
        let layout = windowed(MaskLayout::contiguous(entry.seen - stored, total));
        let keep = total.min(window);
        let [b, h, _, dk] = full_k.dims();
        let dv = full_v.dims()[3];
        let tail_k = full_k
            .clone()
            .slice([0..b, 0..h, total - keep..total, 0..dk]);
        let tail_v = full_v
            .clone()
            .slice([0..b, 0..h, total - keep..total, 0..dv]);
        entry.store.truncate(0);
        entry.store.write_at(0, tail_k, tail_v);
        entry.store.truncate(keep);
        entry.head = 0;
        entry.seen += new;
        Ok((full_k, full_v, layout))
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.seen)
    }

    fn max_length(&self) -> Option<usize> {
        None
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        let (seen, stored) = self
            .layers
            .get(layer)
            .map_or((0, 0), |l| (l.seen, l.store.len()));
        if query_length == 1 {
            let filled = (stored + 1).min(self.window);
            let head = self.layers.get(layer).map_or(0, |l| {
                if stored == self.window {
                    (l.head + 1) % self.window
                } else {
                    l.head
                }
            });
            return MaskLayout {
                rotation: head,
                window: Some(self.window),
                ..MaskLayout::contiguous(seen + 1 - filled, filled)
            };
        }
        MaskLayout {
            window: Some(self.window),
            ..MaskLayout::contiguous(seen - stored, stored + query_length)
        }
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        for layer in &mut self.layers {
            layer.linearize();
            if max_length >= layer.seen {
                continue;
            }
            let dropped = layer.seen - max_length;
            if dropped > 0 && layer.seen - layer.store.len() < max_length {
                let stored = layer.store.len();
                layer.store.truncate(stored.saturating_sub(dropped));
                layer.seen = max_length;
            } else {
                // The tokens before the window are gone: cropping into them cannot be undone.
                return Err(KvError::Unsupported {
                    cache: "sliding_window cache",
                    op: "crop to a length before the stored window",
                });
            }
        }
        Ok(())
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|l| l.store.select(beam_indices))
    }

    fn batch_size(&self) -> Option<usize> {
        self.layers.first().map(|l| l.store.batch())
    }

    fn reset(&mut self) {
        for layer in &mut self.layers {
            layer.store.truncate(0);
            layer.head = 0;
            layer.seen = 0;
        }
    }

    fn memory_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.store.memory_bytes()).sum()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        "sliding_window"
    }
}
