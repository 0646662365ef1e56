//! KV caches for autoregressive generation on burn: every cache type of transformers' KV cache
//! guide behind one [`Cache`] trait.
//!
//! A model calls [`Cache::update`] once per layer per forward with the keys and values of the new
//! tokens (`[batch, kv_heads, seq, head_dim]`) and attends to what it returns; the returned
//! [`MaskLayout`] says which absolute positions the keys hold, so the model can build the mask.
//! Models that can attend to a quantized prefix in place call [`Cache::update_view`] instead:
//! the quantized cache then returns its old tokens still quantized ([`QuantizedKv`]).
//! Appending costs O(new tokens) (no per-step concatenation of the whole cache; growing stores
//! add whole blocks of [`GROWTH_BLOCK`] tokens), clones are cheap
//! (copy-on-write storage) for prefix reuse, and every misuse is a typed [`KvError`].

pub mod cache;
pub mod config;
pub mod dynamic;
pub mod encoder_decoder;
pub mod error;
pub mod mamba;
pub mod offloaded;
pub mod quantized;
pub mod sink;
pub mod sliding;
pub mod static_cache;
mod store;

pub use cache::{Cache, KvView, MaskLayout};
pub use config::{CacheConfig, CacheImplementation, ModelCacheInfo, build_cache};
pub use dynamic::DynamicCache;
pub use encoder_decoder::EncoderDecoderCache;
pub use error::{KvError, Result};
pub use mamba::{MambaCache, MambaCacheConfig};
pub use offloaded::{OffloadStats, OffloadedCache, OffloadedStaticCache};
pub use quantized::{QuantAxis, QuantBackend, QuantizedCache, QuantizedCacheConfig, QuantizedKv};
pub use sink::SinkCache;
pub use sliding::SlidingWindowCache;
pub use static_cache::StaticCache;
pub use store::GROWTH_BLOCK;
