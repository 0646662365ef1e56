//! [`OffloadedCache`] and [`OffloadedStaticCache`]: the cache lives on a secondary device (host
//! memory); only the layer being computed is on the compute device. While layer `l` computes,
//! layer `l + 1` is already being uploaded on a background thread; new tokens are written back
//! to the host store as they arrive, so nothing has to be sent back afterwards. The outputs are
//! exactly those of the non-offloaded cache; compute-device memory stays near two layers.

use std::time::Duration;

use burn::tensor::{Device, Tensor};
use cachet_tensor::{MemoryFootprint, Prefetch};

use crate::cache::{Cache, MaskLayout};
use crate::dynamic::DynamicCache;
use crate::error::Result;
use crate::static_cache::StaticCache;

/// A host-resident cache whose layers can be read back individually.
pub trait LayerStorage: Cache + Clone + 'static {
    /// Stored keys and values of `layer`.
    fn stored_layer(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>)>;
    /// Number of layers stored.
    fn stored_layers(&self) -> usize;
}

impl LayerStorage for DynamicCache {
    fn stored_layer(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>)> {
        self.layer(layer)
    }
    fn stored_layers(&self) -> usize {
        self.num_layers()
    }
}

impl LayerStorage for StaticCache {
    fn stored_layer(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>)> {
        self.layer(layer)
    }
    fn stored_layers(&self) -> usize {
        self.num_layers()
    }
}

/// What offloading cost and hid, accumulated over the cache's life.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OffloadStats {
    /// Layer uploads to the compute device.
    pub uploads: usize,
    /// Uploads that were prefetched (started before the layer was needed).
    pub prefetched: usize,
    /// Total time the uploads took on their threads.
    pub transfer_time: Duration,
    /// Time the compute thread waited for them.
    pub blocked_time: Duration,
    /// Most bytes of this cache on the compute device at once.
    pub peak_compute_bytes: usize,
}

impl OffloadStats {
    /// Fraction of transfer time hidden behind compute (1.0 = fully overlapped).
    pub fn overlap(&self) -> f64 {
        if self.transfer_time.is_zero() {
            return 1.0;
        }
        (1.0 - self.blocked_time.as_secs_f64() / self.transfer_time.as_secs_f64()).clamp(0.0, 1.0)
    }
}

type Upload = Prefetch<Option<(Tensor<4>, Tensor<4>)>>;

/// Offloading wrapper over a host-resident store `S`.
#[derive(Debug)]
pub struct Offloaded<S: LayerStorage> {
    store: S,
    compute: Device,
    host: Device,
    pending: Option<(usize, Upload)>,
    stats: OffloadStats,
}

/// Offloaded dynamic cache (transformers' `offloaded`).
pub type OffloadedCache = Offloaded<DynamicCache>;
/// Offloaded static cache (transformers' `offloaded_static`).
pub type OffloadedStaticCache = Offloaded<StaticCache>;

impl OffloadedCache {
    /// An offloaded dynamic cache computing on `compute`, storing on `host`.
    pub fn new(compute: &Device, host: &Device) -> Self {
        Offloaded::with_store(DynamicCache::new(), compute, host)
    }
}

impl OffloadedStaticCache {
    /// An offloaded static cache of `max_cache_len` tokens per layer.
    pub fn new(max_cache_len: usize, compute: &Device, host: &Device) -> Result<Self> {
        Ok(Offloaded::with_store(
            StaticCache::new(max_cache_len)?,
            compute,
            host,
        ))
    }
}

impl<S: LayerStorage> Offloaded<S> {
    /// Wraps `store` (which must live on `host`).
    pub fn with_store(store: S, compute: &Device, host: &Device) -> Self {
        Self {
            store,
            compute: compute.clone(),
            host: host.clone(),
            pending: None,
            stats: OffloadStats::default(),
        }
    }

    /// Offloading statistics so far.
    pub fn stats(&self) -> OffloadStats {
        self.stats
    }

    /// The host-side store.
    pub fn store(&self) -> &S {
        &self.store
    }

    fn start_upload(&self, layer: usize) -> Upload {
        let stored = self.store.stored_layer(layer);
        let compute = self.compute.clone();
        Prefetch::spawn("kv layer upload", move || {
            Ok(stored.map(|(k, v)| (k.to_device(&compute), v.to_device(&compute))))
        })
    }

    /// The stored content of `layer` on the compute device: the prefetched upload if it is
    /// the right one, else a synchronous upload.
    fn take_layer(&mut self, layer: usize) -> Result<Option<(Tensor<4>, Tensor<4>)>> {
        let upload = match self.pending.take() {
            Some((l, upload)) if l == layer => {
                self.stats.prefetched += 1;
                upload
            }
            other => {
                if let Some((_, stale)) = other {
                    stale.wait()?; // finish and drop a prefetch nobody asked for
                }
                self.start_upload(layer)
            }
        };
        let (layer_kv, timing) = upload.wait()?;
        self.stats.uploads += 1;
        self.stats.transfer_time += timing.transfer;
        self.stats.blocked_time += timing.blocked;
        Ok(layer_kv)
    }
}

impl<S: LayerStorage> Clone for Offloaded<S> {
    fn clone(&self) -> Self {
        // A prefetch in flight belongs to the original; the clone refetches on demand.
        Self::with_store(self.store.clone(), &self.compute, &self.host)
    }
}

impl<S: LayerStorage + Send> Cache for Offloaded<S> {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)> {
        let _span = tracing::trace_span!("offloaded_update", layer).entered();
        if self.compute == self.host {
            // Nothing to move: the store's own views are already on the compute device.
            self.pending = None;
            return self.store.update(layer, keys, values, cache_position);
        }
        let previous = self.take_layer(layer)?;
        // The host store validates shapes and positions and stays authoritative.
        let (_, _, layout) = self.store.update(
            layer,
            keys.clone().to_device(&self.host),
            values.clone().to_device(&self.host),
            cache_position,
        )?;
        let (k, v) = match previous {
            Some((pk, pv)) if pk.dims()[2] > 0 => (
                Tensor::cat(vec![pk, keys], 2),
                Tensor::cat(vec![pv, values], 2),
            ),
            _ => (keys, values),
        };
        // Prefetch the next layer (wrapping to layer 0 for the next forward).
        let layers = self.store.stored_layers();
        let next = if layer + 1 < layers { layer + 1 } else { 0 };
        let upload = self.start_upload(next);
        self.pending = Some((next, upload));
        let next_bytes = self
            .store
            .stored_layer(next)
            .map_or(0, |(nk, nv)| nk.memory_bytes() + nv.memory_bytes());
        let resident = k.memory_bytes() + v.memory_bytes() + next_bytes;
        self.stats.peak_compute_bytes = self.stats.peak_compute_bytes.max(resident);
        Ok((k, v, layout))
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.store.seq_length(layer)
    }

    fn max_length(&self) -> Option<usize> {
        self.store.max_length()
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        self.store.mask_layout(layer, query_length)
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        self.pending = None;
        self.store.crop(max_length)
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        self.pending = None;
        self.store.reorder(beam_indices)
    }

    fn batch_size(&self) -> Option<usize> {
        self.store.batch_size()
    }

    fn reset(&mut self) {
        self.pending = None;
        self.store.reset();
    }

    fn memory_bytes(&self) -> usize {
        self.store.memory_bytes()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        match self.store.name() {
            "static" => "offloaded_static",
            _ => "offloaded",
        }
    }
}
