//! Compile cache for cachet: compile each configuration once, share the result.
//!
//! Compiling a large model takes tens of minutes; this crate keys compiled artifacts by a
//! canonical hash of everything that affects them ([`CacheEntry`], bit-exact with
//! optimum-neuron 0.4.5), keeps them in a crash-safe local cache shared by concurrent processes
//! ([`local::LocalCache`]), and shares them through a Hugging Face Hub repository laid out like
//! optimum-neuron's ([`hub::HubCache`]), so Rust users can also read existing Neuron cache repos.
//!
//! Lookup order is local → Hub → compile:
//!
//! ```no_run
//! use cachet_compile::{EntryBuilder, with_compile_cache};
//!
//! let config = serde_json::json!({"model_type": "llama", "hidden_size": 2048});
//! let entry = EntryBuilder::new("meta-llama/Llama-3.2-1B", config)
//!     .task("text-generation")
//!     .dtype("bfloat16")
//!     .batch_size(4)
//!     .sequence_length(4096)
//!     .compiler("neuronxcc", "2.19.8089.0+8ab9f450")
//!     .build()?;
//! let module = with_compile_cache(&entry, |out_dir| {
//!     // run the expensive compiler, writing into out_dir
//!     std::fs::write(out_dir.join("model.neff"), b"...")
//! })?;
//! println!("{:?} {}", module.source, module.dir.display());
//! # Ok::<(), cachet_compile::CompileCacheError>(())
//! ```
//!
//! Environment: `CACHET_COMPILE_CACHE` (local directory, default
//! `/var/tmp/cachet-compile-cache`), `CUSTOM_CACHE_REPO` (Hub repo), `HF_TOKEN` /
//! `HF_TOKEN_PATH` / `$HF_HOME/token` (auth), `HF_ENDPOINT` (self-hosted Hub),
//! `CACHET_DEFAULT_CACHE_REPO` (read-only fallback repo; empty disables it). External compilers
//! get the cache through [`WrapCommand`] (`cachet compile-cache wrap`), and burn's GPU kernel
//! cache is shared through [`kernels`].

mod cache;
mod entry;
mod error;
pub mod hub;
pub mod kernels;
mod layout;
pub mod local;
mod wrap;

/// Python's `json` module byte for byte: entry configs are [`pyjson::Value`]s.
pub use cachet_pyjson as pyjson;

pub use cache::{CompileCache, with_compile_cache};
pub use entry::{CacheEntry, EntryBuilder};
pub use error::CompileCacheError;
pub use layout::CacheLayout;
pub use wrap::WrapCommand;
