//! Growable per-layer key/value buffers shared by the cache types.
//!
//! Keys and values live in buffers `[batch, heads, capacity, head_dim]` written in place with
//! `slice_assign` (burn backends write in place when the buffer is not shared), so appending a
//! token costs O(new tokens). Capacity doubles up to [`GROWTH_BLOCK`] tokens and then grows a
//! block at a time, so a store holds at most one block more than it uses (doubling all the way
//! would hold up to twice); a growth copies the stored tokens once, a block's share per token.
//! Clones share the buffers; the first write after a clone copies (copy-on-write).

use burn::tensor::{DType, Int, Tensor, TensorData};
use cachet_tensor::MemoryFootprint;

use crate::error::{KvError, Result};

/// Tokens a growing store adds at a time once it holds a block (below that it doubles).
pub const GROWTH_BLOCK: usize = 256;

/// The memory bound of a preallocating cache, applied to the whole cache rather than to each
/// layer alone (layers that each fit can still exhaust the machine together): when a layer is
/// first allocated, the layers already allocated plus this one and every layer still expected
/// must fit under the limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Layers the cache expects (the model's decoder layers); 0 when unknown (then each layer
    /// is checked with those already allocated).
    pub layers: usize,
    /// Bytes the cache may take; `None`: this machine's physical memory.
    pub limit: Option<u64>,
}

impl Budget {
    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
            .unwrap_or_else(|| cachet_tensor::host_memory_bytes().unwrap_or(u64::MAX / 2))
    }

    /// Refuses allocating `layer` (`tokens` slots taking `per_layer` bytes) when it, the bytes
    /// already `allocated` and the layers still expected after it would exceed the limit.
    pub fn check(
        &self,
        cache: &'static str,
        layer: usize,
        tokens: usize,
        per_layer: u64,
        allocated: u64,
    ) -> Result<()> {
        let layers = self.layers.saturating_sub(layer).max(1);
        let bytes = per_layer
            .saturating_mul(layers as u64)
            .saturating_add(allocated);
        let limit = self.limit();
        if bytes > limit {
            return Err(KvError::TooLarge {
                cache,
                layer,
                layers: layer + layers,
                tokens,
                bytes,
                limit,
            });
        }
        Ok(())
    }
}

/// Bytes of one layer of `tokens` tokens for keys `[b, h, _, dk]` and values of width `dv`
/// (saturated at `u64::MAX`).
pub(crate) fn layer_bytes(keys: &Tensor<4>, values: &Tensor<4>, tokens: usize) -> u64 {
    let [b, h, _, dk] = keys.dims();
    let dv = values.dims()[3];
    [b, h, tokens, dk + dv, keys.dtype().size()]
        .into_iter()
        .try_fold(1u64, |acc, x| acc.checked_mul(x as u64))
        .unwrap_or(u64::MAX)
}

/// Keys and values of one layer with their fill level.
#[derive(Debug, Clone)]
pub(crate) struct LayerStore {
    keys: Tensor<4>,
    values: Tensor<4>,
    len: usize,
}

impl LayerStore {
    /// An empty store shaped like `keys`/`values` with room for `capacity` tokens.
    pub fn with_capacity(keys: &Tensor<4>, values: &Tensor<4>, capacity: usize) -> Self {
        let alloc = |t: &Tensor<4>| {
            let [b, h, _, d] = t.dims();
            Tensor::<4>::zeros([b, h, capacity, d], (&t.device(), t.dtype()))
        };
        Self {
            keys: alloc(keys),
            values: alloc(values),
            len: 0,
        }
    }

    /// [`LayerStore::with_capacity`] for a capacity from a user's config: checked by `budget`
    /// against the whole cache (the layers already `allocated`, this one and those still to
    /// come) before anything is allocated.
    pub fn try_with_capacity(
        cache: &'static str,
        budget: &Budget,
        layer: usize,
        allocated: usize,
        keys: &Tensor<4>,
        values: &Tensor<4>,
        capacity: usize,
    ) -> Result<Self> {
        let per_layer = layer_bytes(keys, values, capacity);
        budget.check(cache, layer, capacity, per_layer, allocated as u64)?;
        Ok(Self::with_capacity(keys, values, capacity))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.keys.dims()[2]
    }

    pub fn batch(&self) -> usize {
        self.keys.dims()[0]
    }

    pub fn dtype(&self) -> DType {
        self.keys.dtype()
    }

    /// Checks that new keys/values fit this store's batch, heads, widths and dtype.
    pub fn check(&self, layer: usize, keys: &Tensor<4>, values: &Tensor<4>) -> Result<()> {
        check_pair(layer, keys, values)?;
        let [b, h, _, dk] = self.keys.dims();
        let [_, _, _, dv] = self.values.dims();
        let [kb, kh, _, kd] = keys.dims();
        let vd = values.dims()[3];
        if (kb, kh, kd, vd) != (b, h, dk, dv) {
            return Err(KvError::Shape {
                layer,
                what: format!(
                    "new keys [{kb}, {kh}, _, {kd}] / values head_dim {vd} do not match the cached [{b}, {h}, _, {dk}] / {dv}"
                ),
            });
        }
        if keys.dtype() != self.dtype() {
            return Err(KvError::DType {
                layer,
                expected: self.dtype(),
                got: keys.dtype(),
            });
        }
        Ok(())
    }

    /// Ensures room for `extra` more tokens (doubling below a [`GROWTH_BLOCK`], then whole blocks).
    pub fn reserve(&mut self, extra: usize) {
        let needed = self.len + extra;
        if needed <= self.capacity() {
            return;
        }
        // Small stores (a quantized cache's residual, short chats) double up to one block, which
        // keeps them tight; past a block they grow a block at a time.
        let capacity = if needed <= GROWTH_BLOCK {
            needed.next_power_of_two().max(16)
        } else {
            needed.div_ceil(GROWTH_BLOCK) * GROWTH_BLOCK
        };
        let mut grown = Self::with_capacity(&self.keys, &self.values, capacity);
        if self.len > 0 {
            let (k, v) = self.view();
            grown.write_at(0, k, v);
        }
        grown.len = self.len;
        *self = grown;
    }

    /// Writes `keys`/`values` at token offset `at` (the caller guarantees capacity).
    pub fn write_at(&mut self, at: usize, keys: Tensor<4>, values: Tensor<4>) {
        let n = keys.dims()[2];
        let [b, h, _, dk] = self.keys.dims();
        let dv = self.values.dims()[3];
        // Take the buffers out so they are uniquely owned and written in place.
        let k = std::mem::replace(&mut self.keys, keys.clone().slice([0..0, 0..0, 0..0, 0..0]));
        let v = std::mem::replace(
            &mut self.values,
            values.clone().slice([0..0, 0..0, 0..0, 0..0]),
        );
        self.keys = k.slice_assign([0..b, 0..h, at..at + n, 0..dk], keys);
        self.values = v.slice_assign([0..b, 0..h, at..at + n, 0..dv], values);
        self.len = self.len.max(at + n);
    }

    /// Appends after the stored tokens, growing if needed.
    pub fn append(&mut self, keys: Tensor<4>, values: Tensor<4>) {
        self.reserve(keys.dims()[2]);
        let at = self.len;
        self.write_at(at, keys, values);
    }

    /// The stored tokens (views of the buffers).
    pub fn view(&self) -> (Tensor<4>, Tensor<4>) {
        self.view_range(0, self.len)
    }

    /// Tokens `from..to` (views of the buffers).
    pub fn view_range(&self, from: usize, to: usize) -> (Tensor<4>, Tensor<4>) {
        let [b, h, _, dk] = self.keys.dims();
        let dv = self.values.dims()[3];
        (
            self.keys.clone().slice([0..b, 0..h, from..to, 0..dk]),
            self.values.clone().slice([0..b, 0..h, from..to, 0..dv]),
        )
    }

    /// Forgets tokens past `len`.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Keeps batch rows `indices` in that order.
    pub fn select(&mut self, indices: &[usize]) -> Result<()> {
        self.keys = select_rows(self.keys.clone(), indices)?;
        self.values = select_rows(self.values.clone(), indices)?;
        Ok(())
    }
}

impl MemoryFootprint for LayerStore {
    fn memory_bytes(&self) -> usize {
        self.keys.memory_bytes() + self.values.memory_bytes()
    }
}

/// Rows `indices` of `tensor` along the batch dimension, in that order (beam reordering).
pub(crate) fn select_rows<const D: usize>(
    tensor: Tensor<D>,
    indices: &[usize],
) -> Result<Tensor<D>> {
    let batch = tensor.dims()[0];
    if let Some(&index) = indices.iter().find(|&&i| i >= batch) {
        return Err(KvError::BatchIndex { index, batch });
    }
    let ids: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [indices.len()]), &tensor.device());
    Ok(tensor.select(0, ids))
}

/// Checks that keys and values agree on batch, heads and sequence length.
pub(crate) fn check_pair(layer: usize, keys: &Tensor<4>, values: &Tensor<4>) -> Result<()> {
    let [kb, kh, ks, _] = keys.dims();
    let [vb, vh, vs, _] = values.dims();
    if (kb, kh, ks) != (vb, vh, vs) {
        return Err(KvError::Shape {
            layer,
            what: format!(
                "keys {:?} and values {:?} disagree on batch, heads or length",
                keys.dims(),
                values.dims()
            ),
        });
    }
    if keys.dtype() != values.dtype() {
        return Err(KvError::DType {
            layer,
            expected: keys.dtype(),
            got: values.dtype(),
        });
    }
    Ok(())
}

/// Checks that `positions` are `expected, expected + 1, ...` for `new` tokens.
pub(crate) fn check_positions(
    layer: usize,
    expected: usize,
    positions: &[usize],
    new: usize,
) -> Result<()> {
    let contiguous = positions.len() == new
        && positions
            .iter()
            .enumerate()
            .all(|(i, &p)| p == expected + i);
    if contiguous {
        Ok(())
    } else {
        Err(KvError::Position {
            layer,
            expected,
            got: positions.iter().take(8).copied().collect(),
        })
    }
}

/// Checks that layers are created in order.
pub(crate) fn check_layer_order(layer: usize, existing: usize) -> Result<()> {
    if layer > existing {
        Err(KvError::LayerOrder {
            layer,
            expected: existing,
        })
    } else {
        Ok(())
    }
}

/// Per-layer stores appended in order: what dynamic and static caches share.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layers(Vec<LayerStore>);

impl Layers {
    /// Appends the new tokens of `layer`; with `capacity`, a layer is allocated at exactly that
    /// size once and overflowing it is [`KvError::Full`] (nothing stored), else it grows.
    pub fn append(
        &mut self,
        cache: &'static str,
        capacity: Option<(usize, &Budget)>,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, crate::cache::MaskLayout)> {
        check_layer_order(layer, self.0.len())?;
        let new = keys.dims()[2];
        if layer == self.0.len() {
            check_pair(layer, &keys, &values)?;
            let store = match capacity {
                Some((capacity, budget)) => LayerStore::try_with_capacity(
                    cache,
                    budget,
                    layer,
                    self.memory_bytes(),
                    &keys,
                    &values,
                    capacity,
                )?,
                None => LayerStore::with_capacity(&keys, &values, new.max(16)),
            };
            self.0.push(store);
        }
        let store = &mut self.0[layer];
        store.check(layer, &keys, &values)?;
        check_positions(layer, store.len(), cache_position, new)?;
        if let Some((capacity, _)) = capacity
            && store.len() + new > capacity
        {
            return Err(KvError::Full {
                cache,
                layer,
                stored: store.len(),
                new,
                capacity,
            });
        }
        store.append(keys, values);
        let (k, v) = store.view();
        Ok((k, v, crate::cache::MaskLayout::contiguous(0, store.len())))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn view(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>)> {
        self.0.get(layer).map(LayerStore::view)
    }

    pub fn seq_length(&self, layer: usize) -> usize {
        self.0.get(layer).map_or(0, LayerStore::len)
    }

    pub fn crop(&mut self, max_length: usize) {
        self.0.iter_mut().for_each(|l| l.truncate(max_length));
    }

    pub fn reorder(&mut self, indices: &[usize]) -> Result<()> {
        self.0.iter_mut().try_for_each(|l| l.select(indices))
    }

    pub fn batch_size(&self) -> Option<usize> {
        self.0.first().map(LayerStore::batch)
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn memory_bytes(&self) -> usize {
        self.0.memory_bytes()
    }
}
