//! [`EncoderDecoderCache`]: a self-attention cache of any type for the decoder, plus the
//! cross-attention keys/values of the encoder output, computed once per layer and reused.
//!
//! No cachet model uses it: it is a container for encoder-decoder models built outside cachet,
//! mirroring transformers' class.

use burn::tensor::Tensor;
use cachet_tensor::MemoryFootprint;

use crate::cache::{Cache, KvView, MaskLayout};
use crate::error::{KvError, Result};
use crate::store::{check_pair, select_rows};

/// Decoder self-attention cache + per-layer cross-attention keys/values.
#[derive(Debug, Clone)]
pub struct EncoderDecoderCache {
    self_attention: Box<dyn Cache>,
    cross_attention: Vec<Option<(Tensor<4>, Tensor<4>)>>,
}

impl EncoderDecoderCache {
    /// Wraps a self-attention cache (any type); cross-attention starts empty.
    pub fn new(self_attention: Box<dyn Cache>) -> Self {
        Self {
            self_attention,
            cross_attention: Vec::new(),
        }
    }

    /// The decoder's self-attention cache.
    pub fn self_attention(&mut self) -> &mut dyn Cache {
        self.self_attention.as_mut()
    }

    /// Cross-attention keys/values of `layer`, if already computed.
    pub fn cross_attention(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>)> {
        self.cross_attention.get(layer).cloned().flatten()
    }

    /// Whether `layer`'s cross-attention keys/values are stored (then the model skips computing them).
    pub fn is_cross_attention_cached(&self, layer: usize) -> bool {
        self.cross_attention.get(layer).is_some_and(Option::is_some)
    }

    /// Stores `layer`'s cross-attention keys/values (computed from the encoder output once).
    pub fn set_cross_attention(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
    ) -> Result<()> {
        check_pair(layer, &keys, &values)?;
        if let Some(batch) = self.self_attention.batch_size()
            && keys.dims()[0] != batch
        {
            return Err(KvError::Shape {
                layer,
                what: format!(
                    "cross-attention batch {} differs from the self-attention cache's {batch}",
                    keys.dims()[0]
                ),
            });
        }
        if self.cross_attention.len() <= layer {
            self.cross_attention.resize(layer + 1, None);
        }
        self.cross_attention[layer] = Some((keys, values));
        Ok(())
    }

    /// Returns `layer`'s cross-attention keys/values, computing and storing them with `compute`
    /// the first time.
    pub fn cross_attention_or_insert(
        &mut self,
        layer: usize,
        compute: impl FnOnce() -> (Tensor<4>, Tensor<4>),
    ) -> Result<(Tensor<4>, Tensor<4>)> {
        if let Some(kv) = self.cross_attention(layer) {
            return Ok(kv);
        }
        let (k, v) = compute();
        self.set_cross_attention(layer, k.clone(), v.clone())?;
        Ok((k, v))
    }
}

impl Cache for EncoderDecoderCache {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)> {
        self.self_attention
            .update(layer, keys, values, cache_position)
    }

    fn update_view(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<KvView> {
        self.self_attention
            .update_view(layer, keys, values, cache_position)
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.self_attention.seq_length(layer)
    }

    fn max_length(&self) -> Option<usize> {
        self.self_attention.max_length()
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        self.self_attention.mask_layout(layer, query_length)
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        // Cross-attention covers the whole encoder output and is never cropped.
        self.self_attention.crop(max_length)
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        self.self_attention.reorder(beam_indices)?;
        for (k, v) in self.cross_attention.iter_mut().flatten() {
            *k = select_rows(k.clone(), beam_indices)?;
            *v = select_rows(v.clone(), beam_indices)?;
        }
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.self_attention.batch_size().or_else(|| {
            self.cross_attention
                .iter()
                .flatten()
                .next()
                .map(|(k, _)| k.dims()[0])
        })
    }

    fn reset(&mut self) {
        self.self_attention.reset();
        self.cross_attention.clear();
    }

    fn memory_bytes(&self) -> usize {
        self.self_attention.memory_bytes()
            + self
                .cross_attention
                .iter()
                .flatten()
                .map(|p| p.memory_bytes())
                .sum::<usize>()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        "encoder_decoder"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamic::DynamicCache;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn cross_attention_is_computed_once_and_follows_beams() {
        let device = Device::flex();
        let mut cache = EncoderDecoderCache::new(Box::new(DynamicCache::new()));
        let enc = Tensor::<4>::random([2, 2, 5, 4], Distribution::Default, &device);
        let mut calls = 0;
        for _ in 0..3 {
            cache
                .cross_attention_or_insert(0, || {
                    calls += 1;
                    (enc.clone(), enc.clone())
                })
                .unwrap();
        }
        assert_eq!(calls, 1);
        let k = Tensor::<4>::random([2, 2, 3, 4], Distribution::Default, &device);
        cache.update(0, k.clone(), k, &[0, 1, 2]).unwrap();
        cache.crop(1).unwrap();
        assert_eq!(cache.seq_length(0), 1);
        assert_eq!(
            cache.cross_attention(0).unwrap().0.dims()[2],
            5,
            "cross-attention is never cropped"
        );
        cache.reorder(&[1, 1]).unwrap();
        let (ck, _) = cache.cross_attention(0).unwrap();
        let rows = ck.into_data().try_into_vec::<f32>().unwrap();
        let half = rows.len() / 2;
        assert_eq!(rows[..half], rows[half..], "both rows are old row 1");
        assert!(cache.memory_bytes() > 0);
        let bad = Tensor::<4>::zeros([3, 2, 5, 4], &device);
        assert!(
            cache.set_cross_attention(1, bad.clone(), bad).is_err(),
            "batch mismatch"
        );
        assert!(cache.reorder(&[2]).is_err());
    }
}
