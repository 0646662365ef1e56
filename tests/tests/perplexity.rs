//! Perplexity equals transformers' on the committed public-domain text (goldens in
//! `tests/fixtures/perplexity/`, written by `xtask/goldens/perplexity.py`): the embedded tiny
//! Llama with its embedded tokenizer here (no download); SmolLM2 in `real_model.rs`.

use cachet_integration_tests::{fixture, json_ids as ids, read_json, test_device};
use cachet_models::{PerplexityConfig, embedded, perplexity};
use cachet_tensor::Precision;
use cachet_text::TextModel;
use serde_json::Value;

fn goldens() -> Vec<Value> {
    read_json(&fixture("perplexity").join("goldens.json"))["cases"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn embedded_tokenizer_encodes_the_text_as_transformers() {
    let text = TextModel::from_json_strs(
        embedded::TOKENIZER_JSON,
        Some(embedded::TOKENIZER_CONFIG_JSON),
        embedded::NAME,
    )
    .unwrap();
    let source = std::fs::read_to_string(fixture("text").join("alice.txt")).unwrap();
    let all = text.tokenizer.encode(&source, true).unwrap();
    let case = &goldens()[0];
    let want = ids(&case["input_ids"]);
    assert_eq!(&all[..want.len()], &want[..]);
}

#[test]
fn embedded_perplexity_equals_transformers() {
    let Some(device) = test_device() else { return };
    let model = embedded::tiny_llama(&device, Precision::F32).unwrap();
    for case in goldens()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("embedded"))
    {
        let ids = ids(&case["input_ids"]);
        let mut config = PerplexityConfig {
            context: case["context"].as_u64().unwrap() as usize,
            stride: case["stride"].as_u64().unwrap() as usize,
            ..PerplexityConfig::default()
        };
        let want = case["perplexity"].as_f64().unwrap();
        for chunk in [0, 48] {
            config.chunk = chunk;
            let got = perplexity(&model, &ids, &config).unwrap();
            assert_eq!(
                got.tokens_scored,
                case["tokens_scored"].as_u64().unwrap() as usize
            );
            let rel = (got.perplexity / want - 1.0).abs();
            assert!(
                rel < 1e-4,
                "{} (chunk {chunk}): cachet {} vs transformers {want} ({rel:e})",
                case["name"],
                got.perplexity
            );
        }
    }
}

#[test]
fn perplexity_rejects_bad_input() {
    let Some(device) = test_device() else { return };
    let model = embedded::tiny_llama(&device, Precision::F32).unwrap();
    let bad = |ids: &[u32], context: usize, stride: usize| {
        let config = PerplexityConfig {
            context,
            stride,
            ..PerplexityConfig::default()
        };
        perplexity(&model, ids, &config).unwrap_err().to_string()
    };
    assert!(bad(&[1], 8, 4).contains("at least 2"));
    assert!(bad(&[1, 2, 3], 8, 0).contains("stride"));
    assert!(bad(&[1, 2, 3], 8, 9).contains("stride"));
    assert!(bad(&[1, 2, 3], 1, 1).contains("context"));
    assert!(bad(&[1, 9999, 3], 8, 4).contains("vocabulary"));
}
