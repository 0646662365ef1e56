//! [`DynamicCache`]: grows without bound, like transformers' default cache, but appends in
//! O(1) amortised instead of concatenating the whole cache every step.

use crate::cache::{Cache, MaskLayout};
use crate::error::Result;
use crate::store::Layers;
use burn::tensor::Tensor;

/// A cache that keeps every token; the default for generation.
#[derive(Debug, Clone, Default)]
pub struct DynamicCache {
    layers: Layers,
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
        self.layers.view(layer)
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
        self.layers
            .append("dynamic cache", None, layer, keys, values, cache_position)
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.seq_length(layer)
    }

    fn max_length(&self) -> Option<usize> {
        None
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        MaskLayout::contiguous(0, self.seq_length(layer) + query_length)
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        self.layers.crop(max_length);
        Ok(())
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        self.layers.reorder(beam_indices)
    }

    fn batch_size(&self) -> Option<usize> {
        self.layers.batch_size()
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
