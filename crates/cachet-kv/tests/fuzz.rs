//! Property-based fuzzing of the cache configuration: `CacheConfig::from_json` (transformers'
//! `cache_config` keys), then `build_cache` with every implementation, fuzzed model facts and
//! sizes, and a few updates through the cache it built.
//!
//! The property: a typed error or a cache that then stores, crops and reorders without
//! panicking; a capacity no machine could hold is refused (on build or on the first update)
//! quickly and without allocating it. Budget: `CACHET_FUZZ_CASES` (default 256) per property;
//! `cargo xtask fuzz` runs more.

#[path = "../../../tests/fuzz_support.rs"]
mod fuzz_support;

use std::time::Duration;

use burn::tensor::{Device, Distribution, Tensor};
use cachet_kv::{Cache, CacheConfig, CacheImplementation, ModelCacheInfo, build_cache};
use fuzz_support::{any_json, any_text, bounded, fails_fast, mutated_json};
use proptest::prelude::*;
use serde_json::json;

const FAST: Duration = Duration::from_secs(2);
/// Keys per head in the updates below; RoPE frequencies are half of it.
const HEAD_DIM: usize = 4;
const HEADS: usize = 2;
/// Caches of at most this many tokens get updates in every case.
const SMALL: usize = 1 << 12;

const KEYS: &[&str] = &[
    "max_cache_len",
    "max_batch_size",
    "window_length",
    "num_sink_tokens",
    "sliding_window",
    "offload_device",
    "backend",
    "nbits",
    "axis_key",
    "axis_value",
    "q_group_size",
    "residual_length",
    "compute_dtype",
    "device",
];

fn valid() -> serde_json::Value {
    json!({
        "max_cache_len": 32, "max_batch_size": 2, "window_length": 8, "num_sink_tokens": 2,
        "sliding_window": 4, "offload_device": "cpu", "backend": "quanto", "nbits": 4,
        "axis_key": 0, "axis_value": 0, "q_group_size": 2, "residual_length": 2,
        "compute_dtype": "float32", "device": "cpu"
    })
}

/// A config of known keys with values of the right type, from small to absurd.
fn typed_config() -> impl Strategy<Value = String> {
    let size = || {
        prop::option::of(prop_oneof![
            4 => 0u64..40,
            1 => prop::sample::select(vec![1u64 << 20, 1 << 40, 1 << 60, u64::MAX]),
        ])
    };
    (
        (size(), size(), size(), size(), size(), size(), size()),
        prop::option::of(prop::sample::select(vec![0u8, 1, 2, 3, 4, 8, 16, 255])),
        prop::option::of(-2i64..3),
        prop::option::of(-2i64..3),
        prop::option::of(prop::sample::select(vec![
            "quanto", "hqq", "HQQ", " quanto ", "x",
        ])),
        prop::option::of(prop::sample::select(vec![
            "cpu", "wgpu", "wgpu:0", "wgpu:99", "wgpu:cpu", "auto", "", "cuda:0",
        ])),
    )
        .prop_map(
            |(
                (cache_len, batch, window, sinks, sliding, group, residual),
                nbits,
                ak,
                av,
                backend,
                dev,
            )| {
                let mut m = serde_json::Map::new();
                let mut put = |k: &str, v: Option<serde_json::Value>| {
                    if let Some(v) = v {
                        m.insert(k.to_owned(), v);
                    }
                };
                put("max_cache_len", cache_len.map(Into::into));
                put("max_batch_size", batch.map(Into::into));
                put("window_length", window.map(Into::into));
                put("num_sink_tokens", sinks.map(Into::into));
                put("sliding_window", sliding.map(Into::into));
                put("q_group_size", group.map(Into::into));
                put("residual_length", residual.map(Into::into));
                put("nbits", nbits.map(Into::into));
                put("axis_key", ak.map(Into::into));
                put("axis_value", av.map(Into::into));
                put("backend", backend.map(Into::into));
                put("offload_device", dev.map(Into::into));
                serde_json::Value::Object(m).to_string()
            },
        )
}

fn kv(batch: usize, len: usize, device: &Device) -> Tensor<4> {
    Tensor::random([batch, HEADS, len, HEAD_DIM], Distribution::Default, device)
}

/// The tokens the cache reserves up front, if any (from the same rules `build_cache` applies).
fn capacity(
    implementation: CacheImplementation,
    config: &CacheConfig,
    model: &ModelCacheInfo,
    max_len: usize,
) -> Option<usize> {
    match implementation {
        CacheImplementation::Static | CacheImplementation::OffloadedStatic => {
            Some(config.max_cache_len.unwrap_or(max_len))
        }
        CacheImplementation::SlidingWindow => config.sliding_window.or(model.sliding_window),
        CacheImplementation::Sink => Some(config.window_length.unwrap_or(256)),
        _ => None,
    }
}

/// Prefill, decode, crop, reorder and clone through a cache built from a fuzzed config.
fn exercise(cache: &mut dyn Cache, batch: usize, device: &Device) {
    let mut position = 0;
    for step_len in [3, 1, 1] {
        let positions: Vec<usize> = (position..position + step_len).collect();
        for layer in 0..2 {
            let k = kv(batch, step_len, device);
            let Ok(view) = cache.update_view(layer, k.clone(), k, &positions) else {
                return;
            };
            let query = kv(batch, step_len, device);
            if let Ok(scores) = view.scores(query) {
                let probs = burn::tensor::activation::softmax(scores, 3);
                let _ = view.weighted_values(probs);
            }
        }
        position += step_len;
    }
    let _ = (
        cache.seq_length(0),
        cache.memory_bytes(),
        cache.batch_size(),
    );
    let mut clone = cache.boxed_clone();
    let _ = clone.reorder(&vec![0; batch]);
    let _ = clone.crop(2);
    let _ = clone.batch_select(&[0]);
    cache.reset();
}

fn check(
    text: &str,
    implementation: CacheImplementation,
    model: &ModelCacheInfo,
    max_len: usize,
    batch: usize,
) -> Result<(), TestCaseError> {
    let Ok(config) = bounded(text.len(), || CacheConfig::from_json(text))? else {
        return Ok(());
    };
    let device = Device::default();
    let built = bounded(text.len(), || {
        build_cache(implementation, &config, model, &device, max_len)
    })?;
    let Ok(mut cache) = built else {
        return Ok(());
    };
    let per_token = (batch * HEADS * 2 * HEAD_DIM * 4) as u64;
    let host = cachet_tensor::host_memory_bytes().unwrap_or(u64::MAX / 2);
    match capacity(implementation, &config, model, max_len) {
        None => exercise(cache.as_mut(), batch, &device),
        Some(tokens) if tokens <= SMALL => exercise(cache.as_mut(), batch, &device),
        Some(tokens)
            if (tokens as u64)
                .saturating_mul(per_token)
                .saturating_mul(model.num_layers.max(1) as u64)
                > host =>
        {
            // More than this machine holds, all layers together: the first update refuses it,
            // fast, even where one layer alone would fit.
            let (out, peak, took) = fuzz_support::measured(|| {
                let k = kv(batch, 1, &device);
                cache.update(0, k.clone(), k, &[0])
            });
            prop_assert!(
                out.is_err(),
                "{implementation} with {tokens} tokens was allocated"
            );
            prop_assert!(took < FAST && peak < 64 << 20, "{took:?}, {peak} bytes");
        }
        // Big but possible: allocating it is the cache's job, not worth a fuzz case.
        Some(_) => {}
    }
    Ok(())
}

fn implementation() -> impl Strategy<Value = CacheImplementation> {
    prop::sample::select(CacheImplementation::ALL.to_vec())
}

fn model_info() -> impl Strategy<Value = ModelCacheInfo> {
    (
        prop::option::of(prop_oneof![0usize..8, Just(1 << 20), Just(usize::MAX)]),
        prop::sample::select(vec![vec![], vec![1.0, 0.01], vec![f32::NAN, f32::INFINITY]]),
        0usize..4,
    )
        .prop_map(
            |(sliding_window, rope_inv_freq, num_layers)| ModelCacheInfo {
                num_layers,
                sliding_window,
                rope_inv_freq,
            },
        )
}

fn max_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..64,
        Just(1 << 40),
        Just(1 << 60),
        Just(usize::MAX),
        any::<usize>()
    ]
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn cache_config_arbitrary(
        text in prop_oneof![any_text(), any_json(KEYS).prop_map(|v| v.to_string())],
        implementation in implementation(),
        model in model_info(),
        max_len in max_len(),
        batch in 1usize..3,
    ) {
        check(&text, implementation, &model, max_len, batch)?;
    }

    #[test]
    fn cache_config_mutated(
        text in prop_oneof![mutated_json(valid(), KEYS), typed_config()],
        implementation in implementation(),
        model in model_info(),
        max_len in max_len(),
        batch in 1usize..3,
    ) {
        check(&text, implementation, &model, max_len, batch)?;
    }
}

#[test]
fn valid_base_builds_every_cache() {
    let config = CacheConfig::from_json(&valid().to_string()).unwrap();
    let model = ModelCacheInfo {
        num_layers: 2,
        sliding_window: Some(4),
        rope_inv_freq: vec![1.0, 0.01],
    };
    let device = Device::default();
    for implementation in CacheImplementation::ALL {
        let mut cache = build_cache(implementation, &config, &model, &device, 16)
            .unwrap_or_else(|e| panic!("{implementation}: {e}"));
        exercise(cache.as_mut(), 1, &device);
    }
}

#[test]
fn absurd_capacities_fail_fast() {
    let device = Device::default();
    let model = ModelCacheInfo {
        num_layers: 2,
        sliding_window: None,
        rope_inv_freq: vec![1.0, 0.01],
    };
    for (implementation, config) in [
        (
            CacheImplementation::Static,
            json!({"max_cache_len": 1u64 << 60}),
        ),
        (
            CacheImplementation::OffloadedStatic,
            json!({"max_cache_len": usize::MAX}),
        ),
        (
            CacheImplementation::SlidingWindow,
            json!({"sliding_window": 1u64 << 60}),
        ),
        (
            CacheImplementation::Sink,
            json!({"window_length": 1u64 << 60}),
        ),
    ] {
        let config = CacheConfig::from_json(&config.to_string()).unwrap();
        fails_fast(&format!("{implementation} {config:?}"), FAST, || {
            let mut cache = build_cache(implementation, &config, &model, &device, 16)?;
            let k = kv(1, 1, &device);
            cache.update(0, k.clone(), k, &[0])
        });
    }
}
