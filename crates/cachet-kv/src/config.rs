//! Choosing a cache by name, as transformers' `cache_implementation` and `cache_config` do
//! (deserializable from `generation_config.json`).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::dynamic::DynamicCache;
use crate::error::{KvError, Result};
use crate::offloaded::{OffloadedCache, OffloadedStaticCache};
use crate::quantized::{QuantizedCache, QuantizedCacheConfig};
use crate::sink::SinkCache;
use crate::sliding::SlidingWindowCache;
use crate::static_cache::StaticCache;

/// Sink window when `cache_config.window_length` is not given (the guide's example value).
pub(crate) const DEFAULT_SINK_WINDOW: usize = 256;

/// transformers' `cache_implementation` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheImplementation {
    /// [`DynamicCache`].
    Dynamic,
    /// [`StaticCache`].
    Static,
    /// [`OffloadedCache`].
    Offloaded,
    /// [`OffloadedStaticCache`].
    OffloadedStatic,
    /// Quantized (KIVI) cache.
    Quantized,
    /// [`SlidingWindowCache`].
    SlidingWindow,
    /// [`SinkCache`].
    Sink,
}

impl CacheImplementation {
    /// Every implementation, in the order of transformers' guide.
    pub const ALL: [CacheImplementation; 7] = [
        Self::Dynamic,
        Self::Static,
        Self::Offloaded,
        Self::OffloadedStatic,
        Self::Quantized,
        Self::SlidingWindow,
        Self::Sink,
    ];

    /// The transformers name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dynamic => "dynamic",
            Self::Static => "static",
            Self::Offloaded => "offloaded",
            Self::OffloadedStatic => "offloaded_static",
            Self::Quantized => "quantized",
            Self::SlidingWindow => "sliding_window",
            Self::Sink => "sink",
        }
    }
}

impl fmt::Display for CacheImplementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CacheImplementation {
    type Err = KvError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s.trim())
            .ok_or_else(|| KvError::UnknownCache(s.to_string()))
    }
}

/// `cache_config`: options of the chosen cache, with transformers' key names. Unknown keys are
/// an error, so a typo never silently falls back to a default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// static / offloaded_static: tokens per layer (default: prompt + max_new_tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cache_len: Option<usize>,
    /// static: accepted for compatibility; the batch comes from the first update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<usize>,
    /// sink: tokens kept, sinks included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_length: Option<usize>,
    /// sink: leading tokens always kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_sink_tokens: Option<usize>,
    /// sliding_window: overrides the model's window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// offloaded: where layers are stored (default `cpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_device: Option<String>,
    /// quantized: `quanto` or `hqq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// quantized: bits per value (2, 4 or 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbits: Option<u8>,
    /// quantized: axis keys are grouped along, in the backend's numbering (quanto: 0 per token,
    /// -1 per channel; hqq: 1 per token, 0 per channel). Default: per channel (KIVI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub axis_key: Option<i64>,
    /// quantized: axis values are grouped along (numbering as `axis_key`). Default: per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub axis_value: Option<i64>,
    /// quantized: group size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q_group_size: Option<usize>,
    /// quantized: recent tokens kept in full precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_length: Option<usize>,
    /// quantized: compute dtype (accepted for compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_dtype: Option<String>,
    /// quantized/offloaded: device string (accepted for compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

impl CacheConfig {
    /// Parses a `cache_config` JSON object.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|err| KvError::Config(format!("cache_config: {err}")))
    }
}

/// What a cache needs to know about the model it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCacheInfo {
    /// Decoder layers.
    pub num_layers: usize,
    /// The model's attention window, if it has one.
    pub sliding_window: Option<usize>,
    /// RoPE inverse frequencies (`head_dim / 2`), for the sink cache's re-rotation.
    pub rope_inv_freq: Vec<f32>,
}

/// Builds the cache `implementation` with `config` for `model`; `max_len` is the longest
/// sequence generation will reach (the default size of static caches). A preallocating cache is
/// told the model's layer count, so its memory bound covers all layers at the first allocation.
pub fn build_cache(
    implementation: CacheImplementation,
    config: &CacheConfig,
    model: &ModelCacheInfo,
    compute: &Device,
    max_len: usize,
) -> Result<Box<dyn Cache>> {
    let host = || -> Result<Device> {
        let name = config.offload_device.as_deref().unwrap_or("cpu");
        let spec: cachet_tensor::DeviceSpec = name.parse()?;
        let device = spec.init()?;
        if !cachet_tensor::is_host_device(&device) {
            return Err(KvError::Config(format!(
                "offload_device {name:?}: offloaded layers are kept in host memory; use \"cpu\""
            )));
        }
        Ok(device)
    };
    Ok(match implementation {
        CacheImplementation::Dynamic => Box::new(DynamicCache::new()),
        CacheImplementation::Static => Box::new(
            StaticCache::new(config.max_cache_len.unwrap_or(max_len))?
                .with_num_layers(model.num_layers),
        ),
        CacheImplementation::Offloaded => Box::new(OffloadedCache::new(compute, &host()?)),
        CacheImplementation::OffloadedStatic => Box::new(
            OffloadedStaticCache::new(config.max_cache_len.unwrap_or(max_len), compute, &host()?)?
                .with_num_layers(model.num_layers),
        ),
        CacheImplementation::SlidingWindow => {
            let window = config.sliding_window.or(model.sliding_window).ok_or_else(|| {
                KvError::Config("sliding_window cache needs a model with a sliding_window (e.g. Mistral) or cache_config.sliding_window (which then limits the model's attention to that window)".into())
            })?;
            Box::new(SlidingWindowCache::new(window)?.with_num_layers(model.num_layers))
        }
        CacheImplementation::Sink => Box::new(
            SinkCache::new(
                config.window_length.unwrap_or(DEFAULT_SINK_WINDOW),
                config.num_sink_tokens.unwrap_or(4),
                model.rope_inv_freq.clone(),
            )?
            .with_num_layers(model.num_layers),
        ),
        CacheImplementation::Quantized => Box::new(QuantizedCache::new(
            QuantizedCacheConfig::from_cache_config(config)?,
        )?),
    })
}
