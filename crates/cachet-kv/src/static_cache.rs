//! [`StaticCache`]: preallocated `[batch, heads, max_cache_len, head_dim]` per layer, written at
//! `cache_position`; going past `max_cache_len` is an error, never a silent reallocation.

use crate::cache::{Cache, MaskLayout};
use crate::error::{KvError, Result};
use crate::store::{Budget, Layers};
use burn::tensor::Tensor;

/// A fixed-capacity cache, allocated once (on the first update of each layer).
#[derive(Debug, Clone)]
pub struct StaticCache {
    max_cache_len: usize,
    budget: Budget,
    layers: Layers,
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
            budget: Budget::default(),
            layers: Layers::default(),
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

    /// Capacity per layer.
    pub fn max_cache_len(&self) -> usize {
        self.max_cache_len
    }

    /// Stored keys and values of `layer`, if any.
    pub fn layer(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>)> {
        self.layers.view(layer)
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
        let capacity = Some((self.max_cache_len, &self.budget));
        self.layers.append(
            "static cache",
            capacity,
            layer,
            keys,
            values,
            cache_position,
        )
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.seq_length(layer)
    }

    fn max_length(&self) -> Option<usize> {
        Some(self.max_cache_len)
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
        // Keep the allocation, forget the contents.
        self.layers.crop(0);
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
