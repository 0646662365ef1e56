//! KV caches for autoregressive generation on burn: every cache type of transformers' KV cache
//! guide behind one [`Cache`] trait.
//!
//! A model calls [`Cache::update_view`] once per layer per forward with the keys and values of
//! the new tokens (`[batch, kv_heads, seq, head_dim]`) and attends through the [`KvView`] it
//! returns: [`KvView::scores`] and [`KvView::weighted_values`] do what is specific to the cache
//! (the quantized cache's old tokens are read in place, still quantized; the sink cache's RoPE
//! shift is applied to the query), and the view's [`MaskLayout`] says which absolute positions
//! the keys hold, so the model can build the mask. [`Cache::update`] returns plain tensors
//! instead, as transformers does.
//! Appending costs O(new tokens) (no per-step concatenation of the whole cache; growing stores
//! add whole blocks of [`GROWTH_BLOCK`] tokens), clones are cheap
//! (copy-on-write storage) for prefix reuse, and every misuse is a typed [`KvError`].
//!
//! [`MambaCache`] and [`EncoderDecoderCache`] have no consumer in cachet: they are containers for
//! models outside it (Mamba-style state-space models, encoder-decoders), mirroring transformers'
//! classes of the same names.

mod cache;
mod config;
mod dynamic;
mod encoder_decoder;
mod error;
mod mamba;
mod offloaded;
mod quantized;
mod rope;
mod sink;
mod sliding;
mod static_cache;
mod store;

pub use cache::{Cache, KvView, MaskLayout};
pub use config::{CacheConfig, CacheImplementation, ModelCacheInfo, build_cache};
pub use dynamic::DynamicCache;
pub use encoder_decoder::EncoderDecoderCache;
pub use error::{KvError, Result};
pub use mamba::{MambaCache, MambaCacheConfig};
pub use offloaded::{LayerStorage, OffloadStats, Offloaded, OffloadedCache, OffloadedStaticCache};
pub use quantized::{
    GroupQuantized, QuantAxis, QuantBackend, QuantizedCache, QuantizedCacheConfig, quantize_groups,
};
pub use sink::SinkCache;
pub use sliding::SlidingWindowCache;
pub use static_cache::StaticCache;
pub use store::GROWTH_BLOCK;
