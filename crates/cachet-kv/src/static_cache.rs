//! [`StaticCache`]: preallocated `[batch, heads, max_cache_len, head_dim]` per layer, written at
//! `cache_position`; going past `max_cache_len` is an error, never a silent reallocation.

use burn::tensor::Tensor;
use cachet_tensor::MemoryFootprint;

use crate::cache::{Cache, MaskLayout};
use crate::error::{KvError, Result};
use crate::store::{LayerStore, check_layer_order, check_pair, check_positions};

/// A fixed-capacity cache, allocated once (on the first update of each layer).
#[derive(Debug, Clone)]
pub struct StaticCache {
    max_cache_len: usize,
    layers: Vec<LayerStore>,
}

impl StaticCache {
    /// A cache holding at most `max_cache_len` tokens per layer.
    pub fn new(max_cache_len: usize) -> Result<Self> {
        if max_cache_len == 0 {
            return Err(KvError::Config(
                "static cache needs max_cache_len > 0".into(),
            ));
        }
        Ok(Self {
            max_cache_len,
            layers: Vec::new(),
        })
    }

    /// Capacity per layer.
    pub fn max_cache_len(&self) -> usize {
        self.max_cache_len
    }

    /// Stored keys and values of `layer`, if any.
    pub fn layer(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>)> {
        self.layers.get(layer).map(LayerStore::view)
    }

    /// Number of layers allocated so far.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

impl Cache for StaticCache {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)> {
        check_layer_order(layer, self.layers.len())?;
        if layer == self.layers.len() {
            check_pair(layer, &keys, &values)?;
            self.layers.push(LayerStore::with_capacity(
                &keys,
                &values,
                self.max_cache_len,
            ));
        }
        let store = &mut self.layers[layer];
        store.check(layer, &keys, &values)?;
        let new = keys.dims()[2];
        check_positions(layer, store.len(), cache_position, new)?;
        if store.len() + new > self.max_cache_len {
            return Err(KvError::Full {
                cache: "static cache",
                layer,
                stored: store.len(),
                new,
                capacity: self.max_cache_len,
            });
        }
        let at = store.len();
        store.write_at(at, keys, values);
        let (k, v) = store.view();
        Ok((k, v, MaskLayout::contiguous(0, store.len())))
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, LayerStore::len)
    }

    fn max_length(&self) -> Option<usize> {
        Some(self.max_cache_len)
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        MaskLayout::contiguous(0, self.seq_length(layer) + query_length)
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        self.layers.iter_mut().for_each(|l| l.truncate(max_length));
        Ok(())
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|l| l.select(beam_indices))
    }

    fn batch_size(&self) -> Option<usize> {
        self.layers.first().map(LayerStore::batch)
    }

    fn reset(&mut self) {
        // Keep the allocation, forget the contents.
        self.layers.iter_mut().for_each(|l| l.truncate(0));
    }

    fn memory_bytes(&self) -> usize {
        self.layers.memory_bytes()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        "static"
    }
}
