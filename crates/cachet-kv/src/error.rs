//! Typed errors of the KV caches.

/// Result alias of cachet-kv.
pub type Result<T, E = KvError> = std::result::Result<T, E>;

/// Every way a cache can be misused; each message names the layer and the numbers involved.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A preallocated cache has no room for the new tokens.
    #[error(
        "{cache} is full at layer {layer}: {stored} tokens stored, {new} more requested, capacity {capacity}"
    )]
    Full {
        /// Cache type.
        cache: &'static str,
        /// Layer index.
        layer: usize,
        /// Tokens already stored.
        stored: usize,
        /// Tokens being added.
        new: usize,
        /// Capacity.
        capacity: usize,
    },
    /// `cache_position` does not continue where the cache stopped.
    #[error(
        "layer {layer}: cache_position {got:?} does not continue the cache, which expects position {expected} next (positions may not skip or rewind; use crop to rewind)"
    )]
    Position {
        /// Layer index.
        layer: usize,
        /// Next position the cache expects.
        expected: usize,
        /// Positions given (first few).
        got: Vec<usize>,
    },
    /// Keys/values disagree with each other or with what the cache holds.
    #[error("layer {layer}: {what}")]
    Shape {
        /// Layer index.
        layer: usize,
        /// What disagrees.
        what: String,
    },
    /// Keys/values dtype differs from the cache's.
    #[error("layer {layer}: keys are {got:?} but the cache holds {expected:?}")]
    DType {
        /// Layer index.
        layer: usize,
        /// Cache dtype.
        expected: burn::tensor::DType,
        /// Given dtype.
        got: burn::tensor::DType,
    },
    /// A beam or batch index is out of range.
    #[error("batch index {index} is out of range for a cache of batch size {batch}")]
    BatchIndex {
        /// The bad index.
        index: usize,
        /// Batch size of the cache.
        batch: usize,
    },
    /// Layers were updated out of order.
    #[error(
        "layer {layer} updated before layer {expected} (layers must be updated in order, starting at 0)"
    )]
    LayerOrder {
        /// Layer given.
        layer: usize,
        /// Layer expected.
        expected: usize,
    },
    /// A cache name that is not one of transformers' `cache_implementation` values.
    #[error(
        "unknown cache implementation {0:?} (expected one of: dynamic, static, offloaded, offloaded_static, quantized, sliding_window, sink)"
    )]
    UnknownCache(String),
    /// A cache config that is invalid for the chosen cache or model.
    #[error("invalid cache config: {0}")]
    Config(String),
    /// A preallocated cache would not fit in the memory it may take (this machine's physical
    /// memory unless set lower), counting every layer it expects: checked before allocating.
    #[error(
        "{cache} at layer {layer}: {layers} layers of {tokens} tokens of keys and values need {bytes} bytes in all, more than the {limit} bytes it may take (this machine's memory unless set lower); lower max_cache_len / the window"
    )]
    TooLarge {
        /// Cache type.
        cache: &'static str,
        /// Layer being allocated when the bound was hit.
        layer: usize,
        /// Layers counted: those allocated, this one and those the cache still expects.
        layers: usize,
        /// Tokens per layer asked for.
        tokens: usize,
        /// Bytes the keys and values of those layers would take (saturated at `u64::MAX`).
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// A [`crate::KvView`] whose parts disagree (its keys, values, layout and RoPE shift), or
    /// a query or attention weights that do not fit it.
    #[error("cache view: {0}")]
    View(String),
    /// The cache cannot do this operation.
    #[error("{cache} does not support {op}")]
    Unsupported {
        /// Cache type.
        cache: &'static str,
        /// Operation.
        op: &'static str,
    },
    /// Moving a layer between devices failed.
    #[error(transparent)]
    Transfer(#[from] cachet_tensor::TensorError),
}
