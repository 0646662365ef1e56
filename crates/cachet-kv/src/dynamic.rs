//! [`DynamicCache`]: grows without bound, like transformers' default cache, but appends in
//! O(1) amortised instead of concatenating the whole cache every step.

use burn::tensor::Tensor;
use cachet_tensor::MemoryFootprint;

use crate::cache::{Cache, MaskLayout};
use crate::error::Result;
use crate::store::{LayerStore, check_layer_order, check_positions};

/// A cache that keeps every token; the default for generation.
#[derive(Debug, Clone, Default)]
pub struct DynamicCache {
    layers: Vec<LayerStore>,
}

impl DynamicCache {
    /// An empty cache; layers are created on their first update.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of layers stored so far.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Stored keys and values of `layer`, if any.
    pub fn layer(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>)> {
        self.layers.get(layer).map(LayerStore::view)
    }
}

impl Cache for DynamicCache {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)> {
        check_layer_order(layer, self.layers.len())?;
        let new = keys.dims()[2];
        if layer == self.layers.len() {
            crate::store::check_pair(layer, &keys, &values)?;
            check_positions(layer, 0, cache_position, new)?;
            self.layers
                .push(LayerStore::with_capacity(&keys, &values, new.max(16)));
        }
        let store = &mut self.layers[layer];
        store.check(layer, &keys, &values)?;
        check_positions(layer, store.len(), cache_position, new)?;
        store.append(keys, values);
        let (k, v) = store.view();
        Ok((k, v, MaskLayout::contiguous(0, store.len())))
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, LayerStore::len)
    }

    fn max_length(&self) -> Option<usize> {
        None
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
        self.layers.clear();
    }

    fn memory_bytes(&self) -> usize {
        self.layers.memory_bytes()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        "dynamic"
    }
}
