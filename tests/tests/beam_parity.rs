//! Beam search parity with transformers 5.23.0 (`tests/fixtures/kv/beam.json`, made by
//! `xtask/goldens/kv.py`): the same sequences in the same order, and the same length-normalised
//! scores, with and without a KV cache.

use cachet_integration_tests::{fixture, test_device};
use cachet_kv::DynamicCache;
use cachet_models::{GenerationConfig, Llama, generate};
use cachet_nn::Pretrained;
use cachet_tensor::Precision;
use serde_json::Value;

fn ids(value: &Value) -> Vec<Vec<u32>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

#[test]
fn beam_search_matches_transformers() {
    let Some(device) = test_device() else { return };
    let text = std::fs::read_to_string(fixture("kv/beam.json")).unwrap();
    let goldens: Value = serde_json::from_str(&text).unwrap();
    let cases = goldens["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["model"].as_str().unwrap();
        let model = Llama::from_pretrained(fixture(name), &device, Precision::F32).unwrap();
        // Un-pad the prompts: our generate left-pads them again with the same mask.
        let masks = ids(&case["attention_mask"]);
        let prompts: Vec<Vec<u32>> = ids(&case["input_ids"])
            .into_iter()
            .zip(&masks)
            .map(|(row, mask)| {
                row.into_iter()
                    .zip(mask)
                    .filter(|(_, m)| **m == 1)
                    .map(|(t, _)| t)
                    .collect()
            })
            .collect();
        let want = ids(&case["tokens"]);
        let config = GenerationConfig {
            num_beams: case["num_beams"].as_u64().unwrap() as usize,
            num_return_sequences: case["num_return_sequences"].as_u64().unwrap() as usize,
            length_penalty: case["length_penalty"].as_f64().unwrap() as f32,
            max_new_tokens: want[0].len(),
            ..GenerationConfig::default()
        };
        let label = format!(
            "{name} {} beams={} return={}",
            case["prompts"], config.num_beams, config.num_return_sequences
        );
        for cached in [false, true] {
            let mut cache = DynamicCache::new();
            let out = if cached {
                generate(&model, &prompts, &config, Some(&mut cache)).unwrap()
            } else {
                generate(
                    &model,
                    &prompts,
                    &GenerationConfig {
                        use_cache: false,
                        ..config.clone()
                    },
                    None,
                )
                .unwrap()
            };
            assert_eq!(out.sequences, want, "{label} (cache: {cached})");
            let scores = out.sequence_scores.unwrap();
            for (ours, theirs) in scores
                .iter()
                .zip(case["sequences_scores"].as_array().unwrap())
            {
                let theirs = theirs.as_f64().unwrap() as f32;
                assert!(
                    (ours - theirs).abs() <= 1e-4,
                    "{label}: score {ours} vs {theirs}"
                );
            }
        }
    }
}
