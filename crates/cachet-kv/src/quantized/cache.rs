//! [`QuantizedCache`] and its config: quantized blocks of the old tokens, a dense residual.

use std::sync::Arc;

use burn::tensor::{DType, Device, Tensor};
use cachet_tensor::MemoryFootprint;

use super::blocks::{Block, Layout, QuantAxis, block_bytes};
use super::codec::QuantBackend;
use super::kernels::QuantizedKv;
use crate::cache::{Cache, KvView, MaskLayout};
use crate::config::CacheConfig;
use crate::error::{KvError, Result};
use crate::store::{LayerStore, check_layer_order, check_pair, check_positions};

/// Settings of a [`QuantizedCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedCacheConfig {
    /// Quantizer.
    pub backend: QuantBackend,
    /// Bits per value: 2, 4 or 8.
    pub nbits: u8,
    /// Values per group (capped at `head_dim` for per-token groups).
    pub q_group_size: usize,
    /// Recent tokens kept in full precision before being quantized.
    pub residual_length: usize,
    /// Grouping of keys.
    pub key_axis: QuantAxis,
    /// Grouping of values.
    pub value_axis: QuantAxis,
}

impl Default for QuantizedCacheConfig {
    /// transformers' defaults (quanto, 4 bits, groups of 64, residual of 128) with KIVI's axes.
    fn default() -> Self {
        Self {
            backend: QuantBackend::Quanto,
            nbits: 4,
            q_group_size: 64,
            residual_length: 128,
            key_axis: QuantAxis::PerChannel,
            value_axis: QuantAxis::PerToken,
        }
    }
}

impl QuantizedCacheConfig {
    /// Reads the quantized-cache keys of a transformers `cache_config` (`backend`, `nbits`,
    /// `axis_key`, `axis_value` in the backend's numbering, `q_group_size`, `residual_length`).
    pub fn from_cache_config(config: &CacheConfig) -> Result<Self> {
        let mut out = Self::default();
        if let Some(backend) = config.backend.as_deref() {
            out.backend = match backend.trim() {
                "quanto" => QuantBackend::Quanto,
                "hqq" | "HQQ" => QuantBackend::Hqq,
                other => {
                    return Err(KvError::Config(format!(
                        "unknown quantized cache backend {other:?} (expected \"quanto\" or \"hqq\")"
                    )));
                }
            };
        }
        if let Some(nbits) = config.nbits {
            out.nbits = nbits;
        }
        if let Some(g) = config.q_group_size {
            out.q_group_size = g;
        }
        if let Some(r) = config.residual_length {
            out.residual_length = r;
        }
        let axis = |name: &str, value: Option<i64>, default: QuantAxis| -> Result<QuantAxis> {
            match value {
                None => Ok(default),
                Some(a) => QuantAxis::from_transformers(out.backend, a).ok_or_else(|| {
                    let allowed = match out.backend {
                        QuantBackend::Quanto => "0 (per token) or -1 (per channel)",
                        QuantBackend::Hqq => "1 (per token) or 0 (per channel)",
                    };
                    KvError::Config(format!(
                        "{name} = {a} is not valid for the {} backend: expected {allowed}",
                        out.backend.as_str()
                    ))
                }),
            }
        };
        out.key_axis = axis("axis_key", config.axis_key, out.key_axis)?;
        out.value_axis = axis("axis_value", config.axis_value, out.value_axis)?;
        out.validate()?;
        Ok(out)
    }

    /// Checks the bit width, group size and residual length.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.nbits, 2 | 4 | 8) {
            return Err(KvError::Config(format!(
                "quantized cache nbits must be 2, 4 or 8, got {}",
                self.nbits
            )));
        }
        if self.q_group_size == 0 {
            return Err(KvError::Config("q_group_size must be at least 1".into()));
        }
        if self.residual_length == 0 {
            return Err(KvError::Config("residual_length must be at least 1".into()));
        }
        Ok(())
    }

    fn any_per_channel(&self) -> bool {
        self.key_axis == QuantAxis::PerChannel || self.value_axis == QuantAxis::PerChannel
    }
}

#[derive(Debug, Clone)]
struct QuantLayer {
    batch: usize,
    key_layout: Layout,
    value_layout: Layout,
    /// Append-only block lists, shared with the [`QuantizedKv`] snapshots handed to attention.
    keys: Arc<Vec<Arc<Block>>>,
    values: Arc<Vec<Arc<Block>>>,
    quantized: usize,
    residual: LayerStore,
    dtype: DType,
    device: Device,
}

impl QuantLayer {
    fn seen(&self) -> usize {
        self.quantized + self.residual.len()
    }

    fn heads_and_dims(&self) -> (usize, usize, usize) {
        (
            self.key_layout.rows / self.batch,
            self.key_layout.dim,
            self.value_layout.dim,
        )
    }

    /// The quantized tokens as attention reads them (shares the blocks: O(1)).
    fn snapshot(&self, layer: usize) -> QuantizedKv {
        QuantizedKv {
            layer,
            batch: self.batch,
            tokens: self.quantized,
            key_layout: self.key_layout,
            value_layout: self.value_layout,
            keys: self.keys.clone(),
            values: self.values.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
        }
    }

    /// Quantizes the first `n` tokens of `keys`/`values` (`[batch, heads, >= n, dim]`).
    fn push_quantized(&mut self, keys: Tensor<4>, values: Tensor<4>, n: usize) {
        if n == 0 {
            return;
        }
        let host = |t: Tensor<4>| -> Vec<f32> {
            let [b, h, _, d] = t.dims();
            t.slice([0..b, 0..h, 0..n, 0..d])
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 data")
        };
        let (k, v) = (host(keys), host(values));
        let (kl, vl, dtype) = (self.key_layout, self.value_layout, self.dtype);
        let (kb, vb) = rayon::join(|| kl.quantize(&k, n, dtype), || vl.quantize(&v, n, dtype));
        // Copies the block list only when an attention snapshot of it is still alive.
        Arc::make_mut(&mut self.keys).push(Arc::new(kb));
        Arc::make_mut(&mut self.values).push(Arc::new(vb));
        self.quantized += n;
    }
}

/// Initial capacity (tokens) of a residual buffer; it doubles as needed up to the residual length.
const RESIDUAL_MIN: usize = 16;

/// KIVI quantized cache: old tokens in 2/4/8 bits, the last ones in full precision.
#[derive(Debug, Clone)]
pub struct QuantizedCache {
    config: QuantizedCacheConfig,
    layers: Vec<QuantLayer>,
}

impl QuantizedCache {
    /// An empty cache with `config` (validated).
    pub fn new(config: QuantizedCacheConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            layers: Vec::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &QuantizedCacheConfig {
        &self.config
    }

    /// Tokens of `layer` stored quantized (the rest are in the full-precision residual).
    pub fn quantized_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.quantized)
    }

    /// Tokens of `layer` in the full-precision residual.
    pub fn residual_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.residual.len())
    }

    /// How many of `available` residual tokens leave the residual when it is flushed.
    fn flush_count(&self, available: usize) -> usize {
        if self.config.any_per_channel() {
            available / self.config.q_group_size * self.config.q_group_size
        } else {
            available
        }
    }

    fn layout(&self, layer: usize, axis: QuantAxis, rows: usize, dim: usize) -> Result<Layout> {
        let group = match axis {
            // A group never spans tokens: cap it at the head dimension.
            QuantAxis::PerToken => self.config.q_group_size.min(dim),
            QuantAxis::PerChannel => self.config.q_group_size,
        };
        if axis == QuantAxis::PerToken && !dim.is_multiple_of(group) {
            return Err(KvError::Shape {
                layer,
                what: format!(
                    "head_dim {dim} is not a multiple of q_group_size {group} (per-token groups)"
                ),
            });
        }
        Ok(Layout {
            rows,
            dim,
            group,
            axis,
            nbits: self.config.nbits,
            backend: self.config.backend,
        })
    }

    fn new_layer(&self, layer: usize, keys: &Tensor<4>, values: &Tensor<4>) -> Result<QuantLayer> {
        let [b, h, _, dk] = keys.dims();
        let dv = values.dims()[3];
        if !matches!(keys.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(KvError::DType {
                layer,
                expected: DType::F32,
                got: keys.dtype(),
            });
        }
        Ok(QuantLayer {
            batch: b,
            key_layout: self.layout(layer, self.config.key_axis, b * h, dk)?,
            value_layout: self.layout(layer, self.config.value_axis, b * h, dv)?,
            keys: Arc::default(),
            values: Arc::default(),
            quantized: 0,
            residual: LayerStore::with_capacity(keys, values, RESIDUAL_MIN),
            dtype: keys.dtype(),
            device: keys.device(),
        })
    }
}

impl Cache for QuantizedCache {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)> {
        Ok(self
            .update_view(layer, keys, values, cache_position)?
            .into_dense())
    }

    /// O(new tokens): the quantized prefix is handed to attention as shared blocks (attended to
    /// tile by tile through [`KvView::scores`] / [`KvView::weighted_values`]), never dequantized
    /// into a tensor; only the residual and the new tokens are dense.
    fn update_view(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<KvView> {
        check_layer_order(layer, self.layers.len())?;
        check_pair(layer, &keys, &values)?;
        let new = keys.dims()[2];
        if layer == self.layers.len() {
            check_positions(layer, 0, cache_position, new)?;
            let entry = self.new_layer(layer, &keys, &values)?;
            self.layers.push(entry);
        }
        let flush_prefill = self.flush_count(new);
        let residual_length = self.config.residual_length;
        let (per_channel, group) = (self.config.any_per_channel(), self.config.q_group_size);
        let entry = &mut self.layers[layer];
        entry.residual.check(layer, &keys, &values)?;
        check_positions(layer, entry.seen(), cache_position, new)?;

        if entry.seen() == 0 {
            // Prefill, as transformers: quantize it now, attend to it in full precision.
            let [b, h, _, dk] = keys.dims();
            let dv = values.dims()[3];
            entry.push_quantized(keys.clone(), values.clone(), flush_prefill);
            if flush_prefill < new {
                entry.residual.append(
                    keys.clone().slice([0..b, 0..h, flush_prefill..new, 0..dk]),
                    values
                        .clone()
                        .slice([0..b, 0..h, flush_prefill..new, 0..dv]),
                );
            }
            return Ok(KvView::dense(keys, values, MaskLayout::contiguous(0, new)));
        }

        let prefix = (entry.quantized > 0).then(|| entry.snapshot(layer));
        entry.residual.append(keys, values);
        let (out_k, out_v) = entry.residual.view();
        let total = entry.seen();

        // The residual is full: its oldest tokens (all of them, or whole groups of tokens when
        // some tensor is grouped per channel) are quantized and appended to the blocks.
        let stored = entry.residual.len();
        if stored >= residual_length {
            let n = if per_channel {
                stored / group * group
            } else {
                stored
            };
            if n > 0 {
                let (rk, rv) = entry.residual.view();
                entry.push_quantized(rk, rv, n);
                let (tail_k, tail_v) = entry.residual.view_range(n, stored);
                // A fresh, small residual buffer: memory stays proportional to what it holds.
                let mut fresh =
                    LayerStore::with_capacity(&tail_k, &tail_v, (stored - n).max(RESIDUAL_MIN));
                if n < stored {
                    fresh.append(tail_k, tail_v);
                }
                entry.residual = fresh;
            }
        }
        let view = KvView::dense(out_k, out_v, MaskLayout::contiguous(0, total));
        Ok(match prefix {
            Some(prefix) => view.with_prefix(Arc::new(prefix)),
            None => view,
        })
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, QuantLayer::seen)
    }

    fn max_length(&self) -> Option<usize> {
        None
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        MaskLayout::contiguous(0, self.seq_length(layer) + query_length)
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        for entry in &mut self.layers {
            if max_length >= entry.seen() {
                continue;
            }
            if max_length >= entry.quantized {
                entry.residual.truncate(max_length - entry.quantized);
                continue;
            }
            // The cut falls in the quantized tokens: keep whole blocks before it, and move the
            // kept tokens of the cut block to the residual as their dequantized values (exactly
            // what attention saw of them).
            let (mut kept, mut at) = (0, 0);
            while kept < entry.keys.len() && at + entry.keys[kept].tokens <= max_length {
                at += entry.keys[kept].tokens;
                kept += 1;
            }
            let partial = (kept < entry.keys.len() && at < max_length).then(|| {
                QuantizedKv {
                    tokens: entry.keys[kept].tokens,
                    keys: Arc::new(vec![entry.keys[kept].clone()]),
                    values: Arc::new(vec![entry.values[kept].clone()]),
                    ..entry.snapshot(0)
                }
                .dequantize()
            });
            Arc::make_mut(&mut entry.keys).truncate(kept);
            Arc::make_mut(&mut entry.values).truncate(kept);
            entry.quantized = at;
            entry.residual.truncate(0);
            if let Some((k, v)) = partial {
                let (h, dk, dv) = entry.heads_and_dims();
                let keep = max_length - at;
                let b = entry.batch;
                entry.residual.append(
                    k.slice([0..b, 0..h, 0..keep, 0..dk]),
                    v.slice([0..b, 0..h, 0..keep, 0..dv]),
                );
            }
        }
        Ok(())
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        for entry in &mut self.layers {
            let batch = entry.batch;
            if let Some(&index) = beam_indices.iter().find(|&&i| i >= batch) {
                return Err(KvError::BatchIndex { index, batch });
            }
        }
        for entry in &mut self.layers {
            let batch = entry.batch;
            entry.residual.select(beam_indices)?;
            let (kl, vl) = (entry.key_layout, entry.value_layout);
            let rows_per = kl.rows / batch;
            entry.keys = Arc::new(
                entry
                    .keys
                    .iter()
                    .map(|b| Arc::new(kl.select(b, batch, beam_indices)))
                    .collect(),
            );
            entry.values = Arc::new(
                entry
                    .values
                    .iter()
                    .map(|b| Arc::new(vl.select(b, batch, beam_indices)))
                    .collect(),
            );
            entry.batch = beam_indices.len();
            entry.key_layout.rows = rows_per * entry.batch;
            entry.value_layout.rows = rows_per * entry.batch;
        }
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.layers.first().map(|l| l.batch)
    }

    fn reset(&mut self) {
        self.layers.clear();
    }

    fn memory_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| block_bytes(&l.keys) + block_bytes(&l.values) + l.residual.memory_bytes())
            .sum()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        "quantized"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantized::testing::{config, device, host, random};

    #[test]
    fn residual_fills_then_only_the_leaving_tokens_are_quantized() {
        for (key_axis, prefill_quantized, flush_at) in
            [(QuantAxis::PerToken, 5, 4), (QuantAxis::PerChannel, 4, 4)]
        {
            let cfg = QuantizedCacheConfig {
                key_axis,
                value_axis: QuantAxis::PerToken,
                ..config(QuantBackend::Quanto, 4, 4, 4)
            };
            let mut cache = QuantizedCache::new(cfg).unwrap();
            let k = random([1, 2, 5, 8], 1, DType::F32);
            let v = random([1, 2, 5, 8], 2, DType::F32);
            let (rk, _, layout) = cache.update(0, k.clone(), v, &[0, 1, 2, 3, 4]).unwrap();
            // The prefill is attended in full precision (as transformers) and quantized now.
            assert_eq!(host(rk), host(k.clone()));
            assert_eq!(layout, MaskLayout::contiguous(0, 5));
            assert_eq!(cache.quantized_length(0), prefill_quantized);
            let mut seen_prefix: Option<Vec<f32>> = None;
            for step in 0..9 {
                let pos = 5 + step;
                let nk = random([1, 2, 1, 8], 10 + step as u64, DType::F32);
                let nv = random([1, 2, 1, 8], 50 + step as u64, DType::F32);
                let (ok, ov, layout) = cache.update(0, nk.clone(), nv, &[pos]).unwrap();
                assert_eq!(ok.dims(), [1, 2, pos + 1, 8]);
                assert_eq!(ov.dims(), [1, 2, pos + 1, 8]);
                assert_eq!(layout, MaskLayout::contiguous(0, pos + 1));
                // The new token is returned exactly; the old ones within a quantization step.
                let got = host(ok.clone().slice([0..1, 0..2, pos..pos + 1, 0..8]));
                assert_eq!(got, host(nk));
                // The 4 tokens quantized at prefill (both layouts).
                let prefix = host(ok.clone().slice([0..1, 0..2, 0..4, 0..8]));
                let max = prefix
                    .iter()
                    .zip(host(k.clone().slice([0..1, 0..2, 0..4, 0..8])))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(max < 0.3, "prefix error {max}");
                // Append-only: the prompt's dequantized values never change again.
                if let Some(p) = &seen_prefix {
                    assert_eq!(
                        &prefix, p,
                        "step {step}: quantized tokens were re-quantized"
                    );
                }
                seen_prefix = Some(prefix);
                assert_eq!(cache.seq_length(0), pos + 1);
                assert!(cache.residual_length(0) < flush_at.max(4));
            }
            assert_eq!(
                cache.quantized_length(0) + cache.residual_length(0),
                14,
                "{key_axis:?}"
            );
        }
    }

    #[test]
    fn memory_at_8k_context_is_a_fraction_of_f16() {
        // Llama-3-8B layer shapes per kv head (head_dim 128); the ratio does not depend on the
        // number of heads. Defaults: groups of 64, residual 128, KIVI axes, f16 scales.
        let ctx = 8192;
        let f16_bytes = 2 * ctx * 128 * 2;
        for (nbits, goal) in [(4u8, 3.5f64), (2, 6.0)] {
            let mut cache =
                QuantizedCache::new(config(QuantBackend::Quanto, nbits, 64, 128)).unwrap();
            let k = random([1, 1, ctx, 128], 5, DType::F16);
            let v = random([1, 1, ctx, 128], 6, DType::F16);
            let positions: Vec<usize> = (0..ctx).collect();
            cache.update(0, k, v, &positions).unwrap();
            let ratio = f16_bytes as f64 / cache.memory_bytes() as f64;
            println!(
                "{nbits}-bit at {ctx} tokens: {} bytes, {ratio:.2}x smaller than f16",
                cache.memory_bytes()
            );
            assert!(ratio >= goal, "{nbits}-bit: only {ratio:.2}x");
            // Worst case: a residual just short of being flushed (127 full-precision tokens).
            for p in ctx..ctx + 127 {
                let nk = random([1, 1, 1, 128], p as u64, DType::F16);
                cache.update(0, nk.clone(), nk, &[p]).unwrap();
            }
            assert_eq!(cache.residual_length(0), 127);
            let worst = (2 * (ctx + 127) * 128 * 2) as f64 / cache.memory_bytes() as f64;
            println!("{nbits}-bit with a full residual: {worst:.2}x");
            assert!(
                worst >= goal * 0.93,
                "{nbits}-bit worst case only {worst:.2}x"
            );
        }
    }

    #[test]
    fn reorder_and_crop_match_the_returned_tensors() {
        let d = device();
        let cfg = config(QuantBackend::Hqq, 4, 4, 4);
        let mut cache = QuantizedCache::new(cfg).unwrap();
        let k = random([3, 2, 6, 8], 1, DType::F32);
        let v = random([3, 2, 6, 8], 2, DType::F32);
        cache.update(0, k, v, &(0..6).collect::<Vec<_>>()).unwrap();
        for p in 6..11 {
            let nk = random([3, 2, 1, 8], p as u64, DType::F32);
            cache.update(0, nk.clone(), nk, &[p]).unwrap();
        }
        let probe = |c: &mut QuantizedCache, pos: usize| {
            let mut c = c.clone();
            let z = Tensor::<4>::zeros([c.batch_size().unwrap(), 2, 1, 8], (&d, DType::F32));
            let (k, v, _) = c.update(0, z.clone(), z, &[pos]).unwrap();
            (host(k), host(v))
        };
        let (before_k, _) = probe(&mut cache, 11);
        cache.reorder(&[2, 0, 0, 1]).unwrap();
        assert_eq!(cache.batch_size(), Some(4));
        let (after_k, _) = probe(&mut cache, 11);
        let row = 2 * 12 * 8;
        for (new, old) in [(0, 2), (1, 0), (2, 0), (3, 1)] {
            assert_eq!(
                after_k[new * row..(new + 1) * row],
                before_k[old * row..(old + 1) * row]
            );
        }
        assert!(matches!(
            cache.reorder(&[4]),
            Err(KvError::BatchIndex { index: 4, batch: 4 })
        ));
        // Crop into the quantized tokens: the kept ones keep their values.
        let (full_k, _) = probe(&mut cache, 11);
        cache.crop(7).unwrap();
        assert_eq!(cache.seq_length(0), 7);
        let (cropped_k, _) = probe(&mut cache, 7);
        for r in 0..8 {
            assert_eq!(
                cropped_k[r * 8 * 8..r * 8 * 8 + 7 * 8],
                full_k[r * 12 * 8..r * 12 * 8 + 7 * 8]
            );
        }
    }

    #[test]
    fn a_view_outlives_later_updates_unchanged() {
        // Attention snapshots share the blocks; later flushes, crops and reorders must not
        // change what an earlier view reads.
        let mut cache = QuantizedCache::new(config(QuantBackend::Quanto, 4, 4, 4)).unwrap();
        let k = random([2, 2, 8, 8], 1, DType::F32);
        cache
            .update(0, k.clone(), k, &(0..8).collect::<Vec<_>>())
            .unwrap();
        let z = random([2, 2, 1, 8], 3, DType::F32);
        let view = cache.update_view(0, z.clone(), z.clone(), &[8]).unwrap();
        let before = host(view.prefix().unwrap().dequantize().0);
        for p in 9..20 {
            cache.update(0, z.clone(), z.clone(), &[p]).unwrap();
        }
        cache.crop(6).unwrap();
        cache.reorder(&[1, 0]).unwrap();
        assert_eq!(host(view.prefix().unwrap().dequantize().0), before);
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let parse = |json: &str| {
            QuantizedCacheConfig::from_cache_config(&CacheConfig::from_json(json).unwrap())
        };
        assert!(matches!(parse(r#"{"nbits": 3}"#), Err(KvError::Config(_))));
        assert!(matches!(
            parse(r#"{"backend": "awq"}"#),
            Err(KvError::Config(_))
        ));
        assert!(matches!(
            parse(r#"{"backend": "quanto", "axis_key": 1}"#),
            Err(KvError::Config(_))
        ));
        assert!(matches!(
            parse(r#"{"backend": "hqq", "axis_value": -1}"#),
            Err(KvError::Config(_))
        ));
        let c = parse(r#"{"backend": "hqq", "axis_key": 1, "axis_value": 0, "nbits": 2}"#).unwrap();
        assert_eq!(
            (c.key_axis, c.value_axis, c.nbits),
            (QuantAxis::PerToken, QuantAxis::PerChannel, 2)
        );
        let c = parse("{}").unwrap();
        assert_eq!(c, QuantizedCacheConfig::default());

        let mut cache = QuantizedCache::new(config(QuantBackend::Quanto, 4, 4, 4)).unwrap();
        let k = random([1, 2, 3, 8], 1, DType::F32);
        assert!(matches!(
            cache.update(1, k.clone(), k.clone(), &[0, 1, 2]),
            Err(KvError::LayerOrder { .. })
        ));
        assert!(matches!(
            cache.update(0, k.clone(), k.clone(), &[1, 2, 3]),
            Err(KvError::Position { .. })
        ));
        cache.update(0, k.clone(), k.clone(), &[0, 1, 2]).unwrap();
        let wide = random([1, 2, 1, 16], 1, DType::F32);
        assert!(matches!(
            cache.update(0, wide.clone(), wide, &[3]),
            Err(KvError::Shape { .. })
        ));
        let one = random([1, 2, 1, 8], 1, DType::F32);
        assert!(matches!(
            cache.update(0, one.clone(), one.clone(), &[5]),
            Err(KvError::Position { .. })
        ));
        let half = one.clone().cast(DType::F16);
        assert!(matches!(
            cache.update(0, half.clone(), half, &[3]),
            Err(KvError::DType { .. })
        ));
        // Per-token groups must tile head_dim.
        let mut odd = QuantizedCache::new(QuantizedCacheConfig {
            key_axis: QuantAxis::PerToken,
            ..config(QuantBackend::Quanto, 4, 6, 4)
        })
        .unwrap();
        assert!(matches!(
            odd.update(0, k.clone(), k, &[0, 1, 2]),
            Err(KvError::Shape { .. })
        ));
    }
}
