//! The host tier of the offloaded caches: every layer's keys and values as bytes in host memory,
//! outside any device's allocator, one growable row per (batch, head) so appending a token and
//! reordering beams never move the other rows.

use burn::tensor::{DType, Device, Tensor, TensorData};
use cachet_tensor::HostTensor;

use crate::error::{KvError, Result};
use crate::store::{Budget, GROWTH_BLOCK, layer_bytes};

/// One layer in host memory: `batch × heads` rows of keys and of values, each row the layer's
/// tokens in order (`len × head_dim` elements).
#[derive(Debug, Clone)]
pub(crate) struct HostLayer {
    batch: usize,
    heads: usize,
    key_dim: usize,
    value_dim: usize,
    dtype: DType,
    len: usize,
    /// Tokens per row reserved up front (a static cache's whole capacity), else 0.
    reserved: usize,
    keys: Vec<Vec<u8>>,
    values: Vec<Vec<u8>>,
}

impl HostLayer {
    /// An empty layer shaped like `keys` / `values` (`[batch, heads, _, dim]`), with room for
    /// `reserve` tokens per row.
    pub fn new(keys: &Tensor<4>, values: &Tensor<4>, reserve: usize) -> Self {
        let [batch, heads, _, key_dim] = keys.dims();
        let value_dim = values.dims()[3];
        let dtype = keys.dtype();
        let size = dtype.size();
        let rows = |dim: usize| {
            (0..batch * heads)
                .map(|_| Vec::with_capacity(reserve * dim * size))
                .collect()
        };
        Self {
            batch,
            heads,
            key_dim,
            value_dim,
            dtype,
            len: 0,
            reserved: reserve,
            keys: rows(key_dim),
            values: rows(value_dim),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Checks that new keys/values fit this layer's batch, heads, widths and dtype.
    pub fn check(&self, layer: usize, keys: &Tensor<4>, values: &Tensor<4>) -> Result<()> {
        let [kb, kh, _, kd] = keys.dims();
        let vd = values.dims()[3];
        let (b, h, dk, dv) = (self.batch, self.heads, self.key_dim, self.value_dim);
        if (kb, kh, kd, vd) != (b, h, dk, dv) {
            return Err(KvError::Shape {
                layer,
                what: format!(
                    "new keys [{kb}, {kh}, _, {kd}] / values head_dim {vd} do not match the cached [{b}, {h}, _, {dk}] / {dv}"
                ),
            });
        }
        if keys.dtype() != self.dtype {
            return Err(KvError::DType {
                layer,
                expected: self.dtype,
                got: keys.dtype(),
            });
        }
        Ok(())
    }

    /// Appends host copies of new keys and values (`[batch, heads, n, dim]`, row-major).
    pub fn append(&mut self, keys: &HostTensor, values: &HostTensor) {
        let n = keys.shape()[2];
        let size = self.dtype.size();
        let grow = |rows: &mut Vec<Vec<u8>>, data: &TensorData, dim: usize, len: usize| {
            let row_bytes = n * dim * size;
            for (row, new) in rows.iter_mut().zip(data.as_bytes().chunks_exact(row_bytes)) {
                if row.capacity() < row.len() + new.len() {
                    // Whole blocks of tokens, like the device stores (no doubling past a block).
                    let tokens = (len + n).div_ceil(GROWTH_BLOCK) * GROWTH_BLOCK;
                    row.reserve_exact(tokens * dim * size - row.len());
                }
                row.extend_from_slice(new);
            }
        };
        grow(&mut self.keys, keys.data(), self.key_dim, self.len);
        grow(&mut self.values, values.data(), self.value_dim, self.len);
        self.len += n;
    }

    /// The stored keys and values as tensors `[batch, heads, len, dim]` on `device` (one copy of
    /// the rows into each tensor's buffer).
    pub fn upload(&self, device: &Device) -> (Tensor<4>, Tensor<4>) {
        let tensor = |rows: &[Vec<u8>], dim: usize| {
            let mut bytes = Vec::with_capacity(rows.len() * self.len * dim * self.dtype.size());
            for row in rows {
                bytes.extend_from_slice(row);
            }
            let shape = [self.batch, self.heads, self.len, dim];
            let data = TensorData::from_bytes_vec(bytes, shape, self.dtype);
            Tensor::<4>::from_data(data, (device, self.dtype))
        };
        (
            tensor(&self.keys, self.key_dim),
            tensor(&self.values, self.value_dim),
        )
    }

    /// Bytes of the stored tokens (what an upload moves).
    pub fn used_bytes(&self) -> usize {
        self.batch * self.heads * self.len * (self.key_dim + self.value_dim) * self.dtype.size()
    }

    /// Bytes held in host memory (reserved capacity included).
    pub fn held_bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(Vec::capacity)
            .sum()
    }

    /// Forgets tokens past `len`.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let size = self.dtype.size();
        for row in &mut self.keys {
            row.truncate(len * self.key_dim * size);
        }
        for row in &mut self.values {
            row.truncate(len * self.value_dim * size);
        }
        self.len = len;
    }

    /// Keeps batch rows `indices` in that order (beam reordering).
    pub fn select(&mut self, indices: &[usize]) -> Result<()> {
        if let Some(&index) = indices.iter().find(|&&i| i >= self.batch) {
            return Err(KvError::BatchIndex {
                index,
                batch: self.batch,
            });
        }
        let pick = |rows: &[Vec<u8>], reserve: usize| -> Vec<Vec<u8>> {
            indices
                .iter()
                .flat_map(|&b| &rows[b * self.heads..(b + 1) * self.heads])
                .map(|row| {
                    let mut copy = Vec::with_capacity(row.capacity().max(reserve));
                    copy.extend_from_slice(row);
                    copy
                })
                .collect()
        };
        let size = self.dtype.size();
        self.keys = pick(&self.keys, self.reserved * self.key_dim * size);
        self.values = pick(&self.values, self.reserved * self.value_dim * size);
        self.batch = indices.len();
        Ok(())
    }
}

/// Checks that the first allocation of `layer` (reserving `tokens` per row) keeps the whole
/// cache within `budget`, counting the bytes already `held`.
pub(crate) fn check_reserve(
    cache: &'static str,
    budget: &Budget,
    layer: usize,
    held: usize,
    keys: &Tensor<4>,
    values: &Tensor<4>,
    tokens: usize,
) -> Result<()> {
    let per_layer = layer_bytes(keys, values, tokens);
    budget.check(cache, layer, tokens, per_layer, held as u64)
}
