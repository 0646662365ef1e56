//! Every cache type plugged into the Llama-family model: feeding tokens through a cache gives
//! the logits of one forward over the whole sequence, and greedy decoding gives the same tokens.

use cachet_integration_tests::{fixture, max_abs_diff, test_device};
use cachet_kv::{
    Cache, CacheConfig, CacheImplementation, DynamicCache, OffloadedCache, build_cache,
};
use cachet_models::{GreedyOptions, Llama, greedy};
use cachet_nn::Pretrained;
use cachet_tensor::{Device, Int, Precision, Tensor, TensorData};

fn ids(rows: &[&[i64]], device: &Device) -> Tensor<2, Int> {
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), device)
}

fn to_vec(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

/// Prefill 3 tokens, then feed the rest one at a time; compare with the full forward.
fn incremental_matches_full(model: &Llama, cache: &mut dyn Cache, device: &Device) -> f32 {
    let tokens: &[i64] = &[5, 17, 42, 9, 100, 3, 77, 250, 11, 12];
    let full = to_vec(model.forward(ids(&[tokens], device), None, None).unwrap());
    let mut got = to_vec(
        model
            .forward_with_cache(ids(&[&tokens[..3]], device), None, None, Some(cache))
            .unwrap(),
    );
    for t in 3..tokens.len() {
        let step = model
            .forward_with_cache(ids(&[&tokens[t..t + 1]], device), None, None, Some(cache))
            .unwrap();
        got.extend(to_vec(step));
    }
    max_abs_diff(&got, &full)
}

#[test]
fn every_exact_cache_type_matches_the_uncached_forward() {
    let Some(device) = test_device() else { return };
    for name in ["llama", "mistral", "qwen2"] {
        let model = Llama::from_pretrained(fixture(name), &device, Precision::F32).unwrap();
        let info = model.cache_info();
        for implementation in [
            CacheImplementation::Dynamic,
            CacheImplementation::Static,
            CacheImplementation::Offloaded,
            CacheImplementation::OffloadedStatic,
            CacheImplementation::SlidingWindow,
        ] {
            if implementation == CacheImplementation::SlidingWindow && info.sliding_window.is_none()
            {
                continue;
            }
            let mut cache =
                build_cache(implementation, &CacheConfig::default(), &info, &device, 32).unwrap();
            let diff = incremental_matches_full(&model, cache.as_mut(), &device);
            assert!(
                diff <= 1e-4,
                "{name} with {implementation}: max |Δ| = {diff}"
            );
            assert_eq!(cache.seq_length(0), 10, "{name} {implementation}");
        }
    }
}

#[test]
fn sliding_window_cache_is_bounded_and_rejects_models_without_a_window() {
    let Some(device) = test_device() else { return };
    let mistral = Llama::from_pretrained(fixture("mistral"), &device, Precision::F32).unwrap();
    let info = mistral.cache_info();
    let mut cache = build_cache(
        CacheImplementation::SlidingWindow,
        &CacheConfig::default(),
        &info,
        &device,
        0,
    )
    .unwrap();
    let options = GreedyOptions {
        max_new_tokens: 20,
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    let with_window = greedy(&mistral, &[vec![3, 4, 5]], &options, Some(cache.as_mut())).unwrap();
    let mut dynamic = DynamicCache::new();
    let with_dynamic = greedy(&mistral, &[vec![3, 4, 5]], &options, Some(&mut dynamic)).unwrap();
    assert_eq!(with_window.tokens, with_dynamic.tokens);
    assert!(
        cache.memory_bytes() < dynamic.memory_bytes(),
        "window keeps fewer tokens"
    );

    let llama = Llama::from_pretrained(fixture("llama"), &device, Precision::F32).unwrap();
    let err = build_cache(
        CacheImplementation::SlidingWindow,
        &CacheConfig::default(),
        &llama.cache_info(),
        &device,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sliding_window"), "{err}");
}

#[test]
fn static_cache_overflow_is_a_clear_error() {
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(fixture("llama"), &device, Precision::F32).unwrap();
    let config = CacheConfig {
        max_cache_len: Some(6),
        ..Default::default()
    };
    let mut cache = build_cache(
        CacheImplementation::Static,
        &config,
        &model.cache_info(),
        &device,
        6,
    )
    .unwrap();
    let options = GreedyOptions {
        max_new_tokens: 10,
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    let err = greedy(&model, &[vec![1, 2, 3]], &options, Some(cache.as_mut()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("static cache is full") && err.contains("capacity 6"),
        "{err}"
    );
}

#[test]
fn batched_left_padded_greedy_is_the_same_with_every_cache() {
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(fixture("mistral"), &device, Precision::F32).unwrap();
    let prompts = vec![vec![3, 4, 5, 6, 7, 8], vec![9, 10]];
    let options = GreedyOptions {
        max_new_tokens: 6,
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    let plain = greedy(&model, &prompts, &options, None).unwrap();
    for implementation in [
        CacheImplementation::Dynamic,
        CacheImplementation::Static,
        CacheImplementation::SlidingWindow,
    ] {
        let mut cache = build_cache(
            implementation,
            &CacheConfig::default(),
            &model.cache_info(),
            &device,
            16,
        )
        .unwrap();
        let cached = greedy(&model, &prompts, &options, Some(cache.as_mut())).unwrap();
        assert_eq!(plain.tokens, cached.tokens, "{implementation}");
    }
    for (row, prompt) in prompts.iter().enumerate() {
        let alone = greedy(&model, std::slice::from_ref(prompt), &options, None).unwrap();
        assert_eq!(alone.tokens[0], plain.tokens[row], "row {row}");
    }
}

#[test]
fn prefix_cache_clones_are_independent() {
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(fixture("llama"), &device, Precision::F32).unwrap();
    let mut prefix = DynamicCache::new();
    model
        .forward_with_cache(
            ids(&[&[1, 2, 3, 4]], &device),
            None,
            None,
            Some(&mut prefix),
        )
        .unwrap();
    let mut a = prefix.clone();
    let mut b = prefix.clone();
    let la = to_vec(
        model
            .forward_with_cache(ids(&[&[7]], &device), None, None, Some(&mut a))
            .unwrap(),
    );
    let lb = to_vec(
        model
            .forward_with_cache(ids(&[&[8]], &device), None, None, Some(&mut b))
            .unwrap(),
    );
    let fa = to_vec(
        model
            .forward(ids(&[&[1, 2, 3, 4, 7]], &device), None, None)
            .unwrap(),
    );
    let fb = to_vec(
        model
            .forward(ids(&[&[1, 2, 3, 4, 8]], &device), None, None)
            .unwrap(),
    );
    let vocab = model.config.vocab_size;
    assert!(max_abs_diff(&la, &fa[4 * vocab..]) <= 1e-4);
    assert!(max_abs_diff(&lb, &fb[4 * vocab..]) <= 1e-4);
    assert_eq!(
        prefix.seq_length(0),
        4,
        "the prefix is untouched by its clones"
    );
}

#[test]
fn offloaded_cache_reports_its_transfers() {
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(fixture("llama"), &device, Precision::F32).unwrap();
    let host = cachet_tensor::DeviceSpec::Cpu.init().unwrap();
    let mut cache = OffloadedCache::new(&device, &host);
    let options = GreedyOptions {
        max_new_tokens: 5,
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    let out = greedy(&model, &[vec![1, 2, 3]], &options, Some(&mut cache)).unwrap();
    let mut dynamic = DynamicCache::new();
    let reference = greedy(&model, &[vec![1, 2, 3]], &options, Some(&mut dynamic)).unwrap();
    assert_eq!(out.tokens, reference.tokens);
    // On every backend, the CPU included: the layers live in the host tier and are uploaded,
    // prefetched, for each step; the compute side holds two layers at most.
    let stats = cache.stats();
    let layers = model.config.num_hidden_layers;
    assert!(stats.uploads >= layers * 4, "{stats:?}");
    assert!(stats.prefetched >= stats.uploads - 1, "{stats:?}");
    assert!(!stats.transfer_time.is_zero(), "{stats:?}");
    assert!(stats.uploaded_bytes > 0, "{stats:?}");
    let per_layer = cache.memory_bytes() / layers;
    assert!(
        stats.peak_compute_bytes <= 2 * per_layer + per_layer / 2,
        "{stats:?}"
    );
}

#[test]
fn a_bad_cache_position_surfaces_as_a_model_error() {
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(fixture("llama"), &device, Precision::F32).unwrap();
    let mut cache = DynamicCache::new();
    model
        .forward_with_cache(ids(&[&[1, 2]], &device), None, None, Some(&mut cache))
        .unwrap();
    let err = model
        .forward_with_cache(
            ids(&[&[3]], &device),
            Some(ids(&[&[1, 1]], &device)),
            None,
            Some(&mut cache),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("attention_mask"), "{err}");
}

/// A quantized cache seen through the plain `update` API: attention gets the dequantized
/// tensors instead of attending to the quantized prefix in place.
#[derive(Debug, Clone)]
struct Dequantizing(cachet_kv::QuantizedCache);

impl Cache for Dequantizing {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> cachet_kv::Result<(Tensor<4>, Tensor<4>, cachet_kv::MaskLayout)> {
        self.0.update(layer, keys, values, cache_position)
    }
    fn seq_length(&self, layer: usize) -> usize {
        self.0.seq_length(layer)
    }
    fn max_length(&self) -> Option<usize> {
        self.0.max_length()
    }
    fn mask_layout(&self, layer: usize, query_length: usize) -> cachet_kv::MaskLayout {
        self.0.mask_layout(layer, query_length)
    }
    fn crop(&mut self, max_length: usize) -> cachet_kv::Result<()> {
        self.0.crop(max_length)
    }
    fn reorder(&mut self, beam_indices: &[usize]) -> cachet_kv::Result<()> {
        self.0.reorder(beam_indices)
    }
    fn batch_size(&self) -> Option<usize> {
        self.0.batch_size()
    }
    fn reset(&mut self) {
        self.0.reset()
    }
    fn memory_bytes(&self) -> usize {
        self.0.memory_bytes()
    }
    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }
    fn name(&self) -> &'static str {
        "quantized"
    }
}

#[test]
fn quantized_prefix_attended_in_place_equals_dequantized_attention() {
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(fixture("llama"), &device, Precision::F32).unwrap();
    for json in [
        r#"{"backend": "quanto", "nbits": 4, "q_group_size": 16, "residual_length": 4}"#,
        r#"{"backend": "hqq", "nbits": 2, "q_group_size": 8, "residual_length": 2, "axis_key": 1, "axis_value": 1}"#,
    ] {
        let config = cachet_kv::QuantizedCacheConfig::from_cache_config(
            &CacheConfig::from_json(json).unwrap(),
        )
        .unwrap();
        let mut in_place = cachet_kv::QuantizedCache::new(config).unwrap();
        let mut dense = Dequantizing(cachet_kv::QuantizedCache::new(config).unwrap());
        // Batch 2, left padding on the second row, chunks of several tokens after the prefill
        // (multi-turn): every step attends to a quantized prefix under a causal + padding mask.
        let rows: [&[i64]; 2] = [
            &[
                5, 17, 42, 9, 100, 3, 77, 250, 11, 12, 13, 14, 15, 16, 17, 18,
            ],
            &[0, 0, 0, 9, 100, 3, 7, 25, 111, 12, 3, 4, 5, 6, 7, 8],
        ];
        let mut mask: Vec<i64> = rows
            .iter()
            .flat_map(|r| r.iter().map(|&t| (t != 0) as i64))
            .collect();
        mask[16..19].fill(0);
        let mut at = 0;
        for len in [5, 1, 1, 3, 1, 2, 1, 1, 1] {
            let chunk: Vec<&[i64]> = rows.iter().map(|r| &r[at..at + len]).collect();
            let attention: Vec<i64> = (0..2)
                .flat_map(|r| mask[r * 16..r * 16 + at + len].to_vec())
                .collect();
            let attention =
                Tensor::<2, Int>::from_data(TensorData::new(attention, [2, at + len]), &device);
            let a = model
                .forward_with_cache(
                    ids(&chunk, &device),
                    Some(attention.clone()),
                    None,
                    Some(&mut in_place),
                )
                .unwrap();
            let b = model
                .forward_with_cache(
                    ids(&chunk, &device),
                    Some(attention),
                    None,
                    Some(&mut dense),
                )
                .unwrap();
            let diff = max_abs_diff(&to_vec(a), &to_vec(b));
            assert!(diff <= 1e-4, "{json} at {at}+{len}: max |Δ| = {diff}");
            at += len;
        }
        assert!(
            in_place.quantized_length(0) >= 8,
            "{json}: the prefix was never quantized"
        );
    }
}
