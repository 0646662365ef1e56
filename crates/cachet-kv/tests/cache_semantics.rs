//! Cache semantics and bad input, for every cache type: what is stored, what is returned,
//! cheap clones, beam reordering, and a typed error for each misuse.

use burn::tensor::{DType, Device, Distribution, Tensor};
use cachet_kv::{
    Cache, CacheConfig, CacheImplementation, DynamicCache, KvError, OffloadedCache, SinkCache,
    SlidingWindowCache, StaticCache, build_cache,
};

fn kv(batch: usize, len: usize, device: &Device) -> Tensor<4> {
    Tensor::random([batch, 2, len, 4], Distribution::Default, device)
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

fn all_caches(device: &Device) -> Vec<Box<dyn Cache>> {
    vec![
        Box::new(DynamicCache::new()),
        Box::new(StaticCache::new(64).unwrap()),
        Box::new(SlidingWindowCache::new(8).unwrap()),
        Box::new(SinkCache::new(16, 2, vec![1.0, 0.1]).unwrap()),
        Box::new(OffloadedCache::new(device, device)),
    ]
}

#[test]
fn update_returns_past_and_new_tokens_in_order() {
    let device = Device::flex();
    for mut cache in all_caches(&device) {
        let a = kv(1, 3, &device);
        let b = kv(1, 1, &device);
        cache.update(0, a.clone(), a.clone(), &[0, 1, 2]).unwrap();
        let (k, v, layout) = cache.update(0, b.clone(), b.clone(), &[3]).unwrap();
        let name = cache.name();
        assert_eq!(k.dims()[2], 4, "{name}");
        assert_eq!(layout.kv_length, 4, "{name}");
        assert_eq!(layout.position(3), 3, "{name}");
        let expect: Vec<f32> = {
            let both = Tensor::cat(vec![a, b], 2);
            values(both)
        };
        assert_eq!(values(k), expect, "{name} keys");
        assert_eq!(values(v), expect, "{name} values");
        assert_eq!(cache.seq_length(0), 4, "{name}");
    }
}

#[test]
fn positions_may_not_skip_or_rewind() {
    let device = Device::flex();
    for mut cache in all_caches(&device) {
        let a = kv(1, 2, &device);
        cache.update(0, a.clone(), a.clone(), &[0, 1]).unwrap();
        for bad in [[3usize], [1]] {
            let err = cache
                .update(0, kv(1, 1, &device), kv(1, 1, &device), &bad)
                .unwrap_err();
            assert!(
                matches!(err, KvError::Position { expected: 2, .. }),
                "{}: {err}",
                cache.name()
            );
        }
        let err = cache.update(2, a.clone(), a, &[0, 1]).unwrap_err();
        assert!(
            matches!(
                err,
                KvError::LayerOrder {
                    layer: 2,
                    expected: 1
                }
            ),
            "{}: {err}",
            cache.name()
        );
    }
}

#[test]
fn shapes_and_dtypes_must_match_the_cache() {
    let device = Device::flex();
    for mut cache in all_caches(&device) {
        let a = kv(1, 2, &device);
        cache.update(0, a.clone(), a, &[0, 1]).unwrap();
        let wrong_heads = Tensor::<4>::zeros([1, 3, 1, 4], &device);
        let err = cache
            .update(0, wrong_heads.clone(), wrong_heads, &[2])
            .unwrap_err();
        assert!(
            matches!(err, KvError::Shape { .. }),
            "{}: {err}",
            cache.name()
        );
        let half = Tensor::<4>::zeros([1, 2, 1, 4], (&device, DType::F16));
        let err = cache.update(0, half.clone(), half, &[2]).unwrap_err();
        assert!(
            matches!(err, KvError::DType { .. }),
            "{}: {err}",
            cache.name()
        );
        let k = kv(1, 1, &device);
        let v = kv(1, 2, &device);
        let err = cache.update(0, k, v, &[2]).unwrap_err();
        assert!(
            matches!(err, KvError::Shape { .. }),
            "{}: keys/values disagree: {err}",
            cache.name()
        );
    }
}

#[test]
fn reorder_follows_beams_and_rejects_bad_indices() {
    let device = Device::flex();
    for mut cache in all_caches(&device) {
        let a = kv(3, 2, &device);
        cache.update(0, a.clone(), a.clone(), &[0, 1]).unwrap();
        cache.reorder(&[2, 2, 0]).unwrap();
        let (k, _, _) = cache
            .update(0, kv(3, 1, &device), kv(3, 1, &device), &[2])
            .unwrap();
        let rows = |t: Tensor<4>, r: usize| values(t.slice([r..r + 1, 0..2, 0..2, 0..4]));
        assert_eq!(rows(k.clone(), 0), rows(a.clone(), 2), "{}", cache.name());
        assert_eq!(rows(k.clone(), 1), rows(a.clone(), 2), "{}", cache.name());
        assert_eq!(rows(k, 2), rows(a, 0), "{}", cache.name());
        let err = cache.reorder(&[0, 3]).unwrap_err();
        assert!(
            matches!(err, KvError::BatchIndex { index: 3, batch: 3 }),
            "{}: {err}",
            cache.name()
        );
        cache.batch_repeat_interleave(2).unwrap();
        assert_eq!(cache.batch_size(), Some(6), "{}", cache.name());
        cache.batch_select(&[5, 0]).unwrap();
        assert_eq!(cache.batch_size(), Some(2), "{}", cache.name());
    }
}

#[test]
fn clones_do_not_see_each_others_writes() {
    let device = Device::flex();
    for mut cache in all_caches(&device) {
        let a = kv(1, 3, &device);
        cache.update(0, a.clone(), a, &[0, 1, 2]).unwrap();
        let mut copy = cache.clone();
        let x = kv(1, 1, &device);
        let y = kv(1, 1, &device);
        let (kx, _, _) = cache.update(0, x.clone(), x, &[3]).unwrap();
        let (ky, _, _) = copy.update(0, y.clone(), y.clone(), &[3]).unwrap();
        assert_ne!(values(kx.clone()), values(ky.clone()), "{}", cache.name());
        assert_eq!(
            values(ky.slice([0..1, 0..2, 3..4, 0..4])),
            values(y),
            "{}",
            cache.name()
        );
    }
}

#[test]
fn crop_rewinds_and_reset_empties() {
    let device = Device::flex();
    for implementation in [CacheImplementation::Dynamic, CacheImplementation::Static] {
        let info = cachet_kv::ModelCacheInfo {
            num_layers: 1,
            sliding_window: None,
            rope_inv_freq: vec![1.0, 0.1],
        };
        let mut cache =
            build_cache(implementation, &CacheConfig::default(), &info, &device, 16).unwrap();
        let a = kv(1, 5, &device);
        cache
            .update(0, a.clone(), a.clone(), &[0, 1, 2, 3, 4])
            .unwrap();
        cache.crop(2).unwrap();
        assert_eq!(cache.seq_length(0), 2);
        let (k, _, _) = cache
            .update(0, kv(1, 1, &device), kv(1, 1, &device), &[2])
            .unwrap();
        assert_eq!(
            values(k.slice([0..1, 0..2, 0..2, 0..4])),
            values(a.slice([0..1, 0..2, 0..2, 0..4]))
        );
        cache.reset();
        assert_eq!(cache.seq_length(0), 0);
    }
}

#[test]
fn static_cache_full_is_an_error_and_keeps_its_contents() {
    let device = Device::flex();
    let mut cache = StaticCache::new(4).unwrap();
    let a = kv(1, 3, &device);
    cache.update(0, a.clone(), a, &[0, 1, 2]).unwrap();
    let err = cache
        .update(0, kv(1, 2, &device), kv(1, 2, &device), &[3, 4])
        .unwrap_err();
    assert!(
        matches!(
            err,
            KvError::Full {
                capacity: 4,
                stored: 3,
                new: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cache.seq_length(0), 3, "a refused update loses nothing");
    assert_eq!(cache.max_length(), Some(4));
    let bytes = cache.memory_bytes();
    assert_eq!(
        bytes,
        2 * 4 * 2 * 4 * 4,
        "preallocated [1, 2, 4, 4] keys and values in f32"
    );
}

#[test]
fn dynamic_cache_grows_in_blocks_holding_at_most_one_spare_block() {
    let device = Device::flex();
    let mut cache = DynamicCache::new();
    let mut allocations = std::collections::BTreeSet::new();
    // kv(1, 1): [1, 2, 1, 4] f32 keys and values per token.
    let per_token = 2 * 2 * 4 * 4;
    let block = cachet_kv::GROWTH_BLOCK;
    for t in 0..(2 * block + 44) {
        let x = kv(1, 1, &device);
        cache.update(0, x.clone(), x, &[t]).unwrap();
        let bytes = cache.memory_bytes();
        assert!(
            bytes <= (t + 1 + block) * per_token,
            "{} tokens hold {bytes} bytes: more than one spare block",
            t + 1
        );
        assert!(bytes >= (t + 1) * per_token);
        allocations.insert(bytes);
    }
    // 16, 32, ..., 256 (doubling up to a block), then 512 and 768.
    assert_eq!(
        allocations.len(),
        7,
        "one growth per block past the first: {allocations:?}"
    );
}

#[test]
fn sliding_window_is_a_ring_of_window_tokens() {
    let device = Device::flex();
    let mut cache = SlidingWindowCache::new(4).unwrap();
    let a = kv(1, 6, &device);
    let (k, _, layout) = cache
        .update(0, a.clone(), a.clone(), &[0, 1, 2, 3, 4, 5])
        .unwrap();
    assert_eq!(k.dims()[2], 6, "a long prefill attends to all of itself");
    assert_eq!(layout.window, Some(4));
    let new = kv(1, 1, &device);
    let predicted = cache.mask_layout(0, 1);
    let (k, _, layout) = cache.update(0, new.clone(), new.clone(), &[6]).unwrap();
    assert_eq!(layout, predicted, "mask_layout predicts the update");
    assert_eq!(k.dims()[2], 4, "the last 4 tokens, new one included");
    // The new token overwrote the oldest slot: ring order [6, 3, 4, 5].
    assert_eq!(layout.rotation, 1);
    assert_eq!(
        (0..4).map(|j| layout.position(j)).collect::<Vec<_>>(),
        vec![6, 3, 4, 5]
    );
    let slot = |t: &Tensor<4>, j: usize| values(t.clone().slice([0..1, 0..2, j..j + 1, 0..4]));
    assert_eq!(slot(&k, 0), values(new));
    for j in 1..4 {
        assert_eq!(slot(&k, j), slot(&a, j + 2), "slot {j}");
    }
    assert_eq!(
        cache.memory_bytes(),
        2 * 4 * 2 * 4 * 4,
        "storage stays at the window"
    );
    for t in 7..20 {
        let x = kv(1, 1, &device);
        let (_, _, layout) = cache.update(0, x.clone(), x, &[t]).unwrap();
        let mut positions: Vec<usize> = (0..4).map(|j| layout.position(j)).collect();
        positions.sort();
        assert_eq!(positions, vec![t - 3, t - 2, t - 1, t]);
    }
}

#[test]
fn sink_cache_keeps_sinks_and_rerotates_the_rest() {
    let device = Device::flex();
    let mut cache = SinkCache::new(4, 1, vec![0.5, 0.05]).unwrap();
    let a = kv(1, 3, &device);
    cache.update(0, a.clone(), a.clone(), &[0, 1, 2]).unwrap();
    let (k, v, layout) = cache
        .update(0, kv(1, 1, &device), kv(1, 1, &device), &[3])
        .unwrap();
    assert_eq!(k.dims()[2], 4);
    assert_eq!(layout.sink_tokens, 1);
    assert_eq!(
        values(v.clone().slice([0..1, 0..2, 0..1, 0..4])),
        values(a.clone().slice([0..1, 0..2, 0..1, 0..4])),
        "sink kept"
    );
    // Values are never rotated: the kept window is the last two of the three stored.
    assert_eq!(
        values(v.slice([0..1, 0..2, 1..3, 0..4])),
        values(a.clone().slice([0..1, 0..2, 1..3, 0..4]))
    );
    // transformers moves the kept keys back by one position; here they stay as stored and the
    // query is moved forward by `rope_shift` for them, which gives the same scores.
    assert_eq!(layout.rope_shift, 1);
    let kept = values(k.clone().slice([0..1, 0..2, 1..3, 0..4]));
    let orig = values(a.clone().slice([0..1, 0..2, 1..3, 0..4]));
    assert_eq!(kept, orig, "recent keys are not rewritten");
    let inv = [0.5f32, 0.05];
    let rot = |x: &[f32], shift: f64| -> Vec<f32> {
        // x · cos + rotate_half(x) · sin for one head row of width 4.
        (0..4)
            .map(|j| {
                let theta = shift * inv[j % 2] as f64;
                let half = if j < 2 { -x[j + 2] } else { x[j - 2] };
                (x[j] as f64 * theta.cos() + half as f64 * theta.sin()) as f32
            })
            .collect()
    };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let q = [0.3f32, -1.2, 0.7, 0.25];
    for row in orig.chunks(4) {
        let transformers_score = dot(&q, &rot(row, -1.0));
        let ours = dot(&rot(&q, 1.0), row);
        assert!(
            (transformers_score - ours).abs() < 1e-5,
            "{transformers_score} vs {ours}"
        );
    }
    // The new key is stored rotated forward by the shift, so the shifted query sees it as is.
    let newest = values(k.slice([0..1, 0..2, 3..4, 0..4]));
    assert_eq!(layout.position(3), 3);
    assert_eq!(newest.len(), 8);
    let too_long = kv(1, 5, &device);
    let mut fresh = SinkCache::new(4, 1, vec![0.5, 0.05]).unwrap();
    let err = fresh
        .update(0, too_long.clone(), too_long, &[0, 1, 2, 3, 4])
        .unwrap_err()
        .to_string();
    assert!(err.contains("longer than the sink cache window"), "{err}");
}

#[test]
fn cache_names_and_configs_are_validated() {
    assert_eq!(
        "offloaded_static".parse::<CacheImplementation>().unwrap(),
        CacheImplementation::OffloadedStatic
    );
    let err = "hybrid"
        .parse::<CacheImplementation>()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown cache implementation \"hybrid\""),
        "{err}"
    );
    let err = CacheConfig::from_json(r#"{"window_lenght": 3}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("window_lenght"), "{err}");
    assert!(StaticCache::new(0).is_err());
    assert!(SlidingWindowCache::new(1).is_err());
    assert!(SinkCache::new(4, 4, vec![1.0]).is_err());
}

#[test]
fn preallocated_caches_larger_than_memory_are_errors_before_allocating() {
    let device = Device::flex();
    let huge = 1usize << 50;
    let mut caches: Vec<Box<dyn Cache>> = vec![
        Box::new(StaticCache::new(huge).unwrap()),
        Box::new(SlidingWindowCache::new(huge).unwrap()),
        Box::new(SinkCache::new(huge, 2, vec![1.0, 0.1]).unwrap()),
    ];
    for cache in &mut caches {
        let a = kv(1, 2, &device);
        let err = cache.update(0, a.clone(), a, &[0, 1]).unwrap_err();
        assert!(
            matches!(err, KvError::TooLarge { tokens, .. } if tokens == huge),
            "{err}"
        );
        assert!(err.to_string().contains("bytes"), "{err}");
        // Nothing was stored: the cache is still usable as empty.
        assert_eq!(cache.seq_length(0), 0);
    }
}

/// Static, sliding-window and sink caches of 64 tokens per layer, each limited to `limit` bytes
/// in all, told to expect `layers` layers (0: not told).
fn bounded_caches(limit: u64, layers: usize) -> Vec<Box<dyn Cache>> {
    let with = |layers: usize| layers > 0;
    let mut caches: Vec<Box<dyn Cache>> = Vec::new();
    let static_cache = StaticCache::new(64).unwrap().with_memory_limit(limit);
    let sliding = SlidingWindowCache::new(64)
        .unwrap()
        .with_memory_limit(limit);
    let sink = SinkCache::new(64, 2, vec![1.0, 0.1])
        .unwrap()
        .with_memory_limit(limit);
    if with(layers) {
        caches.push(Box::new(static_cache.with_num_layers(layers)));
        caches.push(Box::new(sliding.with_num_layers(layers)));
        caches.push(Box::new(sink.with_num_layers(layers)));
    } else {
        caches.push(Box::new(static_cache));
        caches.push(Box::new(sliding));
        caches.push(Box::new(sink));
    }
    caches
}

#[test]
fn the_memory_bound_covers_every_layer_of_a_preallocated_cache_together() {
    let device = Device::flex();
    // One layer: 1 row x 2 heads x 64 slots x (4 + 4) dims x 4 bytes = 4096 bytes.
    let layer_bytes = 4096u64;
    let limit = layer_bytes + layer_bytes / 2;
    let a = kv(1, 1, &device);
    // Told the layer count, the cache refuses at its first allocation, before allocating.
    for mut cache in bounded_caches(limit, 3) {
        let name = cache.name();
        let err = cache.update(0, a.clone(), a.clone(), &[0]).unwrap_err();
        match err {
            KvError::TooLarge {
                layer,
                layers,
                tokens,
                bytes,
                limit: l,
                ..
            } => {
                assert_eq!((layer, layers, tokens), (0, 3, 64), "{name}");
                assert_eq!((bytes, l), (3 * layer_bytes, limit), "{name}");
            }
            other => panic!("{name}: {other}"),
        }
        assert_eq!(cache.memory_bytes(), 0, "{name}: nothing allocated");
        let text = cache.update(0, a.clone(), a.clone(), &[0]).unwrap_err();
        assert!(text.to_string().contains("12288 bytes"), "{name}: {text}");
    }
    // Not told, each layer is checked with those already allocated: the second is refused.
    for mut cache in bounded_caches(limit, 0) {
        let name = cache.name();
        cache.update(0, a.clone(), a.clone(), &[0]).unwrap();
        let err = cache.update(1, a.clone(), a.clone(), &[0]).unwrap_err();
        assert!(
            matches!(err, KvError::TooLarge { layer: 1, bytes, .. } if bytes == 2 * layer_bytes),
            "{name}: {err}"
        );
        assert_eq!(cache.memory_bytes() as u64, layer_bytes, "{name}");
    }
    // Under the limit, every layer is allocated.
    for mut cache in bounded_caches(3 * layer_bytes, 3) {
        for layer in 0..3 {
            cache.update(layer, a.clone(), a.clone(), &[0]).unwrap();
        }
        assert_eq!(
            cache.memory_bytes() as u64,
            3 * layer_bytes,
            "{}",
            cache.name()
        );
    }
}

#[test]
fn build_cache_bounds_all_of_the_models_layers_by_this_machines_memory() {
    let Some(host) = cachet_tensor::host_memory_bytes() else {
        return;
    };
    let device = Device::flex();
    // Each layer takes a third of the machine's memory; four of them cannot fit.
    let per_token = (2 * 4 + 2 * 4) * 4; // 2 heads x (4 + 4) dims x 4 bytes
    let tokens = (host / 3 / per_token) as usize;
    let model = cachet_kv::ModelCacheInfo {
        num_layers: 4,
        sliding_window: None,
        rope_inv_freq: vec![1.0, 0.1],
    };
    for (implementation, config) in [
        (
            CacheImplementation::Static,
            format!(r#"{{"max_cache_len": {tokens}}}"#),
        ),
        (
            CacheImplementation::SlidingWindow,
            format!(r#"{{"sliding_window": {tokens}}}"#),
        ),
        (
            CacheImplementation::Sink,
            format!(r#"{{"window_length": {tokens}}}"#),
        ),
    ] {
        let config = CacheConfig::from_json(&config).unwrap();
        let mut cache = build_cache(implementation, &config, &model, &device, 16).unwrap();
        let a = kv(1, 1, &device);
        let err = cache.update(0, a.clone(), a, &[0]).unwrap_err();
        assert!(
            matches!(err, KvError::TooLarge { layers: 4, .. }),
            "{implementation}: {err}"
        );
        assert_eq!(cache.memory_bytes(), 0);
    }
}
