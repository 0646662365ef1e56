//! Generation features on the tiny checkpoints: multi-turn chat through one cache, prefix
//! caching, beam search invariants, seeded sampling and the memory-budget fallback.

use cachet_integration_tests::{fixture, test_device};
use cachet_kv::{Cache, DynamicCache};
use cachet_models::{GenerationConfig, Llama, generate};
use cachet_nn::Pretrained;
use cachet_tensor::Precision;

fn model(name: &str) -> Option<Llama> {
    let device = test_device()?;
    Some(Llama::from_pretrained(fixture(name), &device, Precision::F32).unwrap())
}

#[test]
fn multi_turn_chat_reusing_one_cache_equals_a_fresh_run() {
    let Some(model) = model("llama") else { return };
    let config = GenerationConfig::greedy(5);
    let mut cache = DynamicCache::new();
    let turn1 = vec![1, 5, 9, 14];
    let first = generate(
        &model,
        std::slice::from_ref(&turn1),
        &config,
        Some(&mut cache),
    )
    .unwrap();
    // Second turn: the whole conversation so far plus the new user tokens.
    let mut turn2 = turn1.clone();
    turn2.extend(&first.sequences[0]);
    turn2.extend([22, 23]);
    let cached_len = cache.seq_length(0);
    assert_eq!(
        cached_len,
        turn1.len() + first.sequences[0].len() - 1,
        "the last token is not fed yet"
    );
    let second = generate(&model, &[turn2.clone()], &config, Some(&mut cache)).unwrap();
    let fresh = generate(&model, &[turn2], &config, None).unwrap();
    assert_eq!(second.sequences, fresh.sequences);
}

#[test]
fn prefix_cache_is_filled_once_and_cloned_per_request() {
    let Some(model) = model("qwen2") else { return };
    let config = GenerationConfig::greedy(4);
    let prefix = vec![3, 1, 4, 1, 5];
    let mut shared = DynamicCache::new();
    let device = model.device();
    let ids = cachet_tensor::Tensor::<2, cachet_tensor::Int>::from_data(
        cachet_tensor::TensorData::new(
            prefix.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            [1, prefix.len()],
        ),
        &device,
    );
    model
        .forward_with_cache(ids, None, None, Some(&mut shared))
        .unwrap();
    for suffix in [[9u32, 2], [6, 5]] {
        let mut request = prefix.clone();
        request.extend(suffix);
        let mut cache = shared.clone();
        let reused = generate(&model, &[request.clone()], &config, Some(&mut cache)).unwrap();
        let fresh = generate(&model, &[request], &config, None).unwrap();
        assert_eq!(reused.sequences, fresh.sequences);
    }
    assert_eq!(shared.seq_length(0), prefix.len());
}

#[test]
fn beam_search_returns_sorted_distinct_beams_and_one_beam_is_greedy() {
    let Some(model) = model("mistral") else {
        return;
    };
    let prompts = vec![vec![7, 8, 9], vec![1, 2]];
    let beams = GenerationConfig {
        num_beams: 3,
        num_return_sequences: 3,
        ..GenerationConfig::greedy(6)
    };
    let out = generate(&model, &prompts, &beams, None).unwrap();
    let cached = generate(
        &model,
        &prompts,
        &GenerationConfig {
            use_cache: true,
            ..beams.clone()
        },
        Some(&mut DynamicCache::new()),
    )
    .unwrap();
    assert_eq!(
        out.sequences, cached.sequences,
        "reorder keeps the cache in step with the beams"
    );
    assert_eq!(out.sequences.len(), 6);
    let scores = out.sequence_scores.unwrap();
    for item in 0..2 {
        let s = &scores[item * 3..item * 3 + 3];
        assert!(s[0] >= s[1] && s[1] >= s[2], "{s:?}");
        let seqs = &out.sequences[item * 3..item * 3 + 3];
        assert!(seqs[0] != seqs[1] && seqs[1] != seqs[2]);
    }
    let one = GenerationConfig {
        num_beams: 1,
        ..GenerationConfig::greedy(6)
    };
    let greedy = generate(&model, &prompts, &one, None).unwrap();
    let single_beam = generate(
        &model,
        &prompts,
        &GenerationConfig {
            num_beams: 1,
            ..beams
        },
        None,
    );
    assert!(
        single_beam.is_err(),
        "num_return_sequences > num_beams is rejected"
    );
    assert_eq!(greedy.sequences.len(), 2);
}

#[test]
fn seeded_sampling_is_reproducible_and_varies_with_the_seed() {
    let Some(model) = model("llama") else { return };
    let sampling = |seed| GenerationConfig {
        do_sample: true,
        temperature: 1.5,
        top_k: 0,
        seed,
        ..GenerationConfig::greedy(12)
    };
    let a = generate(&model, &[vec![1, 2, 3]], &sampling(1), None).unwrap();
    let b = generate(&model, &[vec![1, 2, 3]], &sampling(1), None).unwrap();
    assert_eq!(a.sequences, b.sequences);
    let differs = (2..6).any(|seed| {
        generate(&model, &[vec![1, 2, 3]], &sampling(seed), None)
            .unwrap()
            .sequences
            != a.sequences
    });
    assert!(differs, "different seeds give different samples");
}

#[test]
fn a_memory_budget_falls_back_to_the_offloaded_cache() {
    let Some(model) = model("llama") else { return };
    let tight = GenerationConfig {
        max_cache_bytes: Some(1024),
        ..GenerationConfig::greedy(4)
    };
    let out = generate(&model, &[vec![1, 2, 3]], &tight, None).unwrap();
    assert_eq!(out.cache, "offloaded");
    let roomy = GenerationConfig {
        max_cache_bytes: Some(1 << 30),
        ..GenerationConfig::greedy(4)
    };
    let reference = generate(&model, &[vec![1, 2, 3]], &roomy, None).unwrap();
    assert_eq!(reference.cache, "dynamic");
    assert_eq!(out.sequences, reference.sequences);
}

#[test]
fn cache_implementation_by_name_and_bad_names() {
    let Some(model) = model("mistral") else {
        return;
    };
    for name in [
        "dynamic",
        "static",
        "offloaded",
        "offloaded_static",
        "sliding_window",
    ] {
        let config = GenerationConfig {
            cache_implementation: Some(name.into()),
            ..GenerationConfig::greedy(5)
        };
        let out = generate(&model, &[vec![4, 5, 6]], &config, None).unwrap();
        assert_eq!(out.cache, name);
        assert!(out.cache_bytes > 0);
    }
    let config = GenerationConfig {
        cache_implementation: Some("paged".into()),
        ..GenerationConfig::greedy(5)
    };
    let err = generate(&model, &[vec![4, 5, 6]], &config, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown cache implementation \"paged\""),
        "{err}"
    );
}

#[test]
fn degenerate_generation_requests_are_errors() {
    let Some(model) = model("mistral") else {
        return;
    };
    let run = |config: GenerationConfig| {
        generate(&model, &[vec![4, 5, 6]], &config, None)
            .unwrap_err()
            .to_string()
    };
    // Zero new tokens, with or without beams (transformers rejects it as well).
    for beams in [1, 3] {
        let err = run(GenerationConfig {
            num_beams: beams,
            num_return_sequences: 1,
            ..GenerationConfig::greedy(0)
        });
        assert!(err.contains("max_new_tokens must be at least 1"), "{err}");
    }
    // A length that overflows.
    let err = run(GenerationConfig::greedy(usize::MAX - 1));
    assert!(err.contains("overflows"), "{err}");
    // A pad id from a generation_config.json outside the vocabulary.
    let err = run(GenerationConfig {
        pad_token_id: Some(model.config.vocab_size as u32),
        ..GenerationConfig::greedy(2)
    });
    assert!(err.contains("pad_token_id"), "{err}");
}
