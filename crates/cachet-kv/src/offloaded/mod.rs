//! [`OffloadedCache`] and [`OffloadedStaticCache`]: every layer's keys and values live in host
//! memory as bytes (the host tier, [`host`]), outside the compute device's allocator; only the
//! layer being computed, and the next one, are tensors on the compute device. While layer `l`
//! computes, layer `l + 1` is uploaded by the cache's upload worker ([`worker`], one long-lived
//! thread); new tokens are copied to the host tier as they arrive. The outputs are exactly those
//! of the non-offloaded cache, and compute-side cache memory stays near two layers on every
//! backend, the CPU included (where compute and host share the RAM, the tier is still a second
//! store: the compute side holds two layers of tensors, the tier the rest as bytes).

mod host;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use burn::tensor::{Device, Tensor};
use cachet_tensor::{HostTensor, MemoryFootprint};

use crate::cache::{Cache, MaskLayout};
use crate::dynamic::DynamicCache;
use crate::error::{KvError, Result};
use crate::static_cache::StaticCache;
use crate::store::{Budget, check_layer_order, check_pair, check_positions};
use host::{HostLayer, check_reserve};
use worker::{Pending, UploadWorker};

/// A cache whose layers can be read back individually.
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
    /// Total time the uploads took on the worker, each until the device finished the copy.
    pub transfer_time: Duration,
    /// Time the compute thread waited for them.
    pub blocked_time: Duration,
    /// Most bytes of this cache on the compute device at once.
    pub peak_compute_bytes: usize,
    /// Bytes uploaded in all.
    pub uploaded_bytes: u64,
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

/// Offloading cache with the semantics of the cache kind `S` (unbounded like
/// [`DynamicCache`], or a fixed capacity per layer like [`StaticCache`]).
#[derive(Debug)]
pub struct Offloaded<S: LayerStorage> {
    /// The cache kind mirrored: its capacity and name (it holds no tokens).
    kind: S,
    /// The host tier, one layer each (shared copy-on-write with clones).
    layers: Vec<Arc<HostLayer>>,
    compute: Device,
    host: Device,
    budget: Budget,
    worker: Option<Arc<UploadWorker>>,
    pending: Option<(usize, Pending)>,
    stats: OffloadStats,
}

/// Offloaded dynamic cache (transformers' `offloaded`).
pub type OffloadedCache = Offloaded<DynamicCache>;
/// Offloaded static cache (transformers' `offloaded_static`).
pub type OffloadedStaticCache = Offloaded<StaticCache>;

impl OffloadedCache {
    /// An offloaded dynamic cache computing on `compute`, storing in host memory (`host` is
    /// the host device, where the cache's layers are kept).
    pub fn new(compute: &Device, host: &Device) -> Self {
        Self::empty(DynamicCache::new(), compute, host)
    }
}

impl OffloadedStaticCache {
    /// An offloaded static cache of `max_cache_len` tokens per layer.
    pub fn new(max_cache_len: usize, compute: &Device, host: &Device) -> Result<Self> {
        Ok(Self::empty(StaticCache::new(max_cache_len)?, compute, host))
    }
}

impl<S: LayerStorage> Offloaded<S> {
    /// An offloaded cache of the kind of `store`, which must be empty (its tokens are not
    /// carried over: the offloaded cache keeps its own host tier).
    pub fn with_store(store: S, compute: &Device, host: &Device) -> Result<Self> {
        if store.stored_layers() > 0 {
            return Err(KvError::Config(
                "an offloaded cache starts from an empty cache of its kind".into(),
            ));
        }
        Ok(Self::empty(store, compute, host))
    }

    fn empty(kind: S, compute: &Device, host: &Device) -> Self {
        Self {
            kind,
            layers: Vec::new(),
            compute: compute.clone(),
            host: host.clone(),
            budget: Budget::default(),
            worker: None,
            pending: None,
            stats: OffloadStats::default(),
        }
    }

    /// The number of layers the cache will hold: a static cache's first allocation then checks
    /// all of them together against the memory limit.
    pub fn with_num_layers(mut self, num_layers: usize) -> Self {
        self.budget.layers = num_layers;
        self
    }

    /// Bytes a static cache's host tier may take in all (default: this machine's memory).
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.budget.limit = Some(bytes);
        self
    }

    /// Offloading statistics so far.
    pub fn stats(&self) -> OffloadStats {
        self.stats
    }

    /// Bytes the cache's layers take in host memory.
    pub fn host_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.held_bytes()).sum()
    }

    /// The worker, started on first use and shared with clones.
    fn worker(&mut self) -> Result<Arc<UploadWorker>> {
        if let Some(worker) = &self.worker {
            return Ok(worker.clone());
        }
        let worker = Arc::new(UploadWorker::start()?);
        self.worker = Some(worker.clone());
        Ok(worker)
    }

    /// Forgets a prefetch in flight (the layers changed under it).
    fn drop_pending(&mut self) {
        if let Some((_, pending)) = self.pending.take() {
            let _ = pending.wait();
        }
    }

    /// The stored tokens of `layer` on the compute device: the prefetched upload if it is the
    /// right one, else one queued now and waited for.
    fn take_layer(&mut self, layer: usize) -> Result<Option<(Tensor<4>, Tensor<4>)>> {
        if self.layers[layer].len() == 0 {
            self.drop_pending();
            return Ok(None);
        }
        let pending = match self.pending.take() {
            Some((l, pending)) if l == layer => {
                self.stats.prefetched += 1;
                pending
            }
            other => {
                if let Some((_, stale)) = other {
                    let _ = stale.wait();
                }
                let stored = self.layers[layer].clone();
                self.worker()?.submit(stored, &self.compute)
            }
        };
        let (uploaded, blocked) = pending.wait();
        let (keys, values, transfer) = uploaded?;
        self.stats.uploads += 1;
        self.stats.uploaded_bytes += self.layers[layer].used_bytes() as u64;
        self.stats.transfer_time += transfer;
        self.stats.blocked_time += blocked;
        Ok(Some((keys, values)))
    }

    /// Validates an update and creates the layer on its first one.
    fn admit(
        &mut self,
        layer: usize,
        keys: &Tensor<4>,
        values: &Tensor<4>,
        cache_position: &[usize],
    ) -> Result<()> {
        check_layer_order(layer, self.layers.len())?;
        check_pair(layer, keys, values)?;
        let capacity = self.kind.max_length();
        if layer == self.layers.len() {
            let reserve = capacity.unwrap_or(0);
            if let Some(tokens) = capacity {
                check_reserve(
                    cache_label(self.kind.name()),
                    &self.budget,
                    layer,
                    self.host_bytes(),
                    keys,
                    values,
                    tokens,
                )?;
            }
            self.layers
                .push(Arc::new(HostLayer::new(keys, values, reserve)));
        }
        let stored = &self.layers[layer];
        stored.check(layer, keys, values)?;
        let new = keys.dims()[2];
        check_positions(layer, stored.len(), cache_position, new)?;
        if let Some(capacity) = capacity
            && stored.len() + new > capacity
        {
            return Err(KvError::Full {
                cache: cache_label(self.kind.name()),
                layer,
                stored: stored.len(),
                new,
                capacity,
            });
        }
        Ok(())
    }
}

/// The cache's name in messages.
fn cache_label(kind: &str) -> &'static str {
    match kind {
        "static" => "offloaded_static cache",
        _ => "offloaded cache",
    }
}

impl<S: LayerStorage> Clone for Offloaded<S> {
    fn clone(&self) -> Self {
        // A prefetch in flight belongs to the original; the clone refetches on demand.
        Self {
            kind: self.kind.clone(),
            layers: self.layers.clone(),
            compute: self.compute.clone(),
            host: self.host.clone(),
            budget: self.budget,
            worker: self.worker.clone(),
            pending: None,
            stats: OffloadStats::default(),
        }
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
        self.admit(layer, &keys, &values, cache_position)?;
        // Host copies of the new tokens (read back from the compute device).
        let host_keys = HostTensor::from_tensor(keys.clone())?;
        let host_values = HostTensor::from_tensor(values.clone())?;
        let previous = self.take_layer(layer)?;
        Arc::make_mut(&mut self.layers[layer]).append(&host_keys, &host_values);
        let (k, v) = match previous {
            Some((pk, pv)) => (
                Tensor::cat(vec![pk, keys], 2),
                Tensor::cat(vec![pv, values], 2),
            ),
            None => (keys, values),
        };
        // Prefetch the next layer (wrapping to layer 0 for the next forward; a one-layer cache
        // prefetches itself, new tokens included).
        let next = if layer + 1 < self.layers.len() {
            layer + 1
        } else {
            0
        };
        let next_bytes = if self.layers[next].len() > 0 {
            let stored = self.layers[next].clone();
            let bytes = stored.used_bytes();
            let pending = self.worker()?.submit(stored, &self.compute);
            self.pending = Some((next, pending));
            bytes
        } else {
            0
        };
        let resident = k.memory_bytes() + v.memory_bytes() + next_bytes;
        self.stats.peak_compute_bytes = self.stats.peak_compute_bytes.max(resident);
        let len = self.layers[layer].len();
        Ok((k, v, MaskLayout::contiguous(0, len)))
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.len())
    }

    fn max_length(&self) -> Option<usize> {
        self.kind.max_length()
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        MaskLayout::contiguous(0, self.seq_length(layer) + query_length)
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        self.drop_pending();
        for layer in &mut self.layers {
            if layer.len() > max_length {
                Arc::make_mut(layer).truncate(max_length);
            }
        }
        Ok(())
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        self.drop_pending();
        // Check every index first, so a bad one changes no layer.
        if let Some(batch) = self.batch_size()
            && let Some(&index) = beam_indices.iter().find(|&&i| i >= batch)
        {
            return Err(KvError::BatchIndex { index, batch });
        }
        for layer in &mut self.layers {
            Arc::make_mut(layer).select(beam_indices)?;
        }
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.layers.first().map(|l| l.batch())
    }

    fn reset(&mut self) {
        self.drop_pending();
        if self.kind.max_length().is_some() {
            // A static cache keeps its allocation, like StaticCache.
            for layer in &mut self.layers {
                Arc::make_mut(layer).truncate(0);
            }
        } else {
            self.layers.clear();
        }
    }

    fn memory_bytes(&self) -> usize {
        self.host_bytes()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        match self.kind.name() {
            "static" => "offloaded_static",
            _ => "offloaded",
        }
    }
}
