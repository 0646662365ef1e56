//! Parity of every KV cache with transformers (goldens in `tests/fixtures/kv/`, written by
//! `xtask/goldens/kv.py`): greedy tokens of dynamic / static / sliding_window / quantized (quanto
//! and hqq, 4-bit) caches equal transformers 5.23's token for token, the sink cache equals
//! transformers 4.52's, 2-bit quantization reports its agreement length, and the quantizers
//! reproduce optimum-quanto's and HQQ's codes, scales and zero points on a fixed tensor.

use std::collections::HashMap;
use std::path::Path;

use cachet_integration_tests::{fixture, test_device};
use cachet_kv::{
    CacheConfig, CacheImplementation, GroupQuantized, QuantBackend, build_cache, quantize_groups,
};
use cachet_models::{GreedyOptions, Llama, greedy};
use cachet_nn::Pretrained;
use cachet_tensor::{DType, Device, Precision};
use serde_json::Value;

fn goldens(file: &str) -> Vec<Value> {
    let path = fixture("kv").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let json: Value = serde_json::from_str(&text).unwrap();
    json["cases"].as_array().unwrap().clone()
}

fn rows(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// The prompts of a case without their left padding (our generate pads them again).
fn prompts(case: &Value) -> Vec<Vec<u32>> {
    let ids = rows(&case["input_ids"]);
    let mask = rows(&case["attention_mask"]);
    ids.iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, m)| **m == 1)
                .map(|(t, _)| *t as u32)
                .collect()
        })
        .collect()
}

fn expected(case: &Value) -> Vec<Vec<u32>> {
    rows(&case["tokens"])
        .into_iter()
        .map(|r| r.into_iter().map(|t| t as u32).collect())
        .collect()
}

struct Models {
    device: Device,
    loaded: HashMap<String, Llama>,
}

impl Models {
    fn get(&mut self, name: &str) -> &Llama {
        let device = self.device.clone();
        self.loaded.entry(name.to_string()).or_insert_with(|| {
            Llama::from_pretrained(fixture(name), &device, Precision::F32).unwrap()
        })
    }

    /// Greedy tokens of `case` with the cache `implementation` and the case's `cache_config`.
    fn run(&mut self, case: &Value, implementation: CacheImplementation) -> Vec<Vec<u32>> {
        let device = self.device.clone();
        let model = self.get(case["model"].as_str().unwrap());
        let prompts = prompts(case);
        let new = expected(case)[0].len();
        let config = match &case["cache_config"] {
            Value::Null => CacheConfig::default(),
            c => CacheConfig::from_json(&c.to_string()).unwrap(),
        };
        let max_len = prompts.iter().map(Vec::len).max().unwrap() + new;
        let mut cache = build_cache(
            implementation,
            &config,
            &model.cache_info(),
            &device,
            max_len,
        )
        .unwrap();
        let options = GreedyOptions {
            max_new_tokens: new,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
        };
        greedy(model, &prompts, &options, Some(cache.as_mut()))
            .unwrap()
            .tokens
    }
}

fn models() -> Option<Models> {
    Some(Models {
        device: test_device()?,
        loaded: HashMap::new(),
    })
}

fn describe(case: &Value) -> String {
    format!(
        "{} {} {} {}",
        case["model"].as_str().unwrap(),
        case["prompts"].as_str().unwrap_or("single"),
        case["cache_implementation"].as_str().unwrap(),
        case["cache_config"]
    )
}

/// Tokens generated identically before the first difference, over all rows.
fn agreement(got: &[Vec<u32>], want: &[Vec<u32>]) -> usize {
    got.iter()
        .zip(want)
        .map(|(g, w)| g.iter().zip(w).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(0)
}

#[test]
fn dynamic_static_and_sliding_window_match_transformers_greedy() {
    let Some(mut models) = models() else { return };
    let mut checked = 0;
    let mut checked_offloaded = 0;
    for case in goldens("greedy.json") {
        let name = case["cache_implementation"].as_str().unwrap();
        let implementation: CacheImplementation = name.parse().unwrap();
        let implementation = match implementation {
            CacheImplementation::Quantized => continue,
            // transformers 5.23 runs the deprecated `sliding_window` as a static cache whose
            // layers follow the model config: a plain static cache for models without a window.
            CacheImplementation::SlidingWindow
                if models
                    .get(case["model"].as_str().unwrap())
                    .cache_info()
                    .sliding_window
                    .is_none() =>
            {
                CacheImplementation::Static
            }
            other => other,
        };
        let got = models.run(&case, implementation);
        assert_eq!(got, expected(&case), "{}", describe(&case));
        checked += 1;
        // transformers' offloaded caches give their base cache's tokens: so must cachet's
        // (layers through the host tier and the upload worker, on every backend).
        let offloaded = match name {
            "dynamic" => Some(CacheImplementation::Offloaded),
            "static" => Some(CacheImplementation::OffloadedStatic),
            _ => None,
        };
        if let Some(offloaded) = offloaded {
            let got = models.run(&case, offloaded);
            assert_eq!(got, expected(&case), "{offloaded}: {}", describe(&case));
            checked_offloaded += 1;
        }
    }
    assert_eq!(checked, 3 * 2 * 3, "every model x prompt set x cache");
    assert_eq!(
        checked_offloaded,
        3 * 2 * 2,
        "every model x prompt set x base cache"
    );
}

#[test]
fn quantized_4bit_matches_transformers_greedy() {
    let Some(mut models) = models() else { return };
    let mut checked = 0;
    for case in goldens("greedy.json") {
        if case["cache_implementation"] != "quantized" || case["cache_config"]["nbits"] != 4 {
            continue;
        }
        let got = models.run(&case, CacheImplementation::Quantized);
        assert_eq!(
            got,
            expected(&case),
            "{} (golden min top-2 margin {})",
            describe(&case),
            case["min_margin"]
        );
        checked += 1;
    }
    // llama and qwen2 (transformers has no quantized cache for Mistral's sliding layers),
    // 2 prompt sets, quanto and hqq, residual 4 and 128.
    assert_eq!(checked, 2 * 2 * 2 * 2);
}

#[test]
fn quantized_2bit_agreement_with_transformers() {
    let Some(mut models) = models() else { return };
    let mut lengths = Vec::new();
    for case in goldens("greedy.json") {
        if case["cache_implementation"] != "quantized" || case["cache_config"]["nbits"] != 2 {
            continue;
        }
        let got = models.run(&case, CacheImplementation::Quantized);
        let want = expected(&case);
        let agree = agreement(&got, &want);
        println!(
            "2-bit agreement {agree}/{}: {}",
            want[0].len(),
            describe(&case)
        );
        lengths.push(agree);
    }
    assert_eq!(lengths.len(), 16);
    let min = *lengths.iter().min().unwrap();
    let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
    println!("2-bit agreement: min {min}, mean {mean:.2} of 12 tokens");
    // 2-bit noise is large, so exact equality is not required of every run; the bound is what
    // this implementation reaches today (all 16 runs agree on all 12 tokens), less a margin for
    // float noise, so a regression in either backend fails here.
    assert!(min >= 10, "2-bit agreement fell to {min} tokens");
    assert!(
        mean >= 11.5,
        "2-bit mean agreement fell to {mean:.2} tokens"
    );
}

#[test]
fn kivi_axes_stay_close_to_full_precision() {
    // transformers has no per-channel grouping over tokens of one head (its quanto axis -1 groups
    // straddle heads, its hqq axis 0 is strided), so KIVI's layout (keys per channel, values per
    // token) is checked against the full-precision goldens: with groups of 4 tokens and a
    // residual of 4, every key group is flushed and quantized along the tokens.
    let Some(mut models) = models() else { return };
    let mut lengths = Vec::new();
    for case in goldens("greedy.json") {
        if case["cache_implementation"] != "dynamic" || case["model"] == "mistral" {
            continue;
        }
        for (backend, key_axis, value_axis, nbits) in [
            ("quanto", -1, 0, 4),
            ("hqq", 0, 1, 4),
            ("quanto", -1, 0, 8),
            ("hqq", 0, 1, 8),
        ] {
            let mut case = case.clone();
            case["cache_config"] = serde_json::json!({
                "backend": backend, "nbits": nbits, "axis_key": key_axis, "axis_value": value_axis,
                "q_group_size": 4, "residual_length": 4,
            });
            let got = models.run(&case, CacheImplementation::Quantized);
            let agree = agreement(&got, &expected(&case));
            println!(
                "KIVI axes agreement with full precision {agree}/12: {}",
                describe(&case)
            );
            lengths.push((nbits, agree));
        }
    }
    assert_eq!(lengths.len(), 2 * 2 * 4);
    for (nbits, min) in [(8, 12), (4, 8)] {
        let worst = lengths
            .iter()
            .filter(|l| l.0 == nbits)
            .map(|l| l.1)
            .min()
            .unwrap();
        assert!(worst >= min, "{nbits}-bit KIVI agreement fell to {worst}");
    }
}

#[test]
fn sink_cache_matches_transformers_4_52() {
    let Some(mut models) = models() else { return };
    let cases = goldens("sink.json");
    assert_eq!(cases.len(), 4);
    for case in cases {
        let got = models.run(&case, CacheImplementation::Sink);
        assert_eq!(
            got,
            expected(&case),
            "{} (golden min top-2 margin {})",
            describe(&case),
            case["min_margin"]
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Quantizer vectors
// ------------------------------------------------------------------------------------------------

/// A minimal safetensors reader (F32 and I64 tensors) for the golden vectors.
fn read_safetensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = HashMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let off = info["data_offsets"].as_array().unwrap();
        let raw = &data[off[0].as_u64().unwrap() as usize..off[1].as_u64().unwrap() as usize];
        let values: Vec<f64> = match info["dtype"].as_str().unwrap() {
            "F32" => raw
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            "I64" => raw
                .chunks(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{name}: unexpected dtype {other}"),
        };
        out.insert(name.clone(), (shape, values));
    }
    out
}

struct Vectors(HashMap<String, (Vec<usize>, Vec<f64>)>);

impl Vectors {
    fn f32(&self, name: &str) -> Vec<f32> {
        self.0[name].1.iter().map(|&x| x as f32).collect()
    }

    fn codes(&self, name: &str) -> Vec<u8> {
        self.0[name].1.iter().map(|&x| x as u8).collect()
    }
}

/// Input `[1, 2, 8, 16]` regrouped per channel: group (head, channel) = the 8 tokens, in
/// transformers' quanto `axis=-1` group order (channel-major: group index `d * 2 + head`).
fn per_channel_groups(input: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(input.len());
    for d in 0..16 {
        for h in 0..2 {
            for t in 0..8 {
                out.push(input[(h * 8 + t) * 16 + d]);
            }
        }
    }
    out
}

fn check_exact(name: &str, got: &GroupQuantized, v: &Vectors, deq: &[f32], want_deq: &[f32]) {
    assert_eq!(
        got.codes,
        v.codes(&format!("{name}.codes")),
        "{name}: codes"
    );
    assert_eq!(got.scale, v.f32(&format!("{name}.scale")), "{name}: scales");
    assert_eq!(got.zero, v.f32(&format!("{name}.zero")), "{name}: shifts");
    assert_eq!(deq, want_deq, "{name}: dequantized values");
}

#[test]
fn quanto_quantizer_is_bit_exact_with_optimum_quanto() {
    let v = Vectors(read_safetensors(
        &fixture("kv").join("quant_vectors.safetensors"),
    ));
    let input = v.f32("input");
    // Per-token groups (transformers' quanto axis 0): contiguous groups of the flat tensor.
    for (name, nbits, group) in [
        ("quanto4_axis0_g16", 4, 16),
        ("quanto2_axis0_g16", 2, 16),
        ("quanto4_axis0_g8", 4, 8),
    ] {
        let q = quantize_groups(QuantBackend::Quanto, &input, group, nbits, DType::F32);
        let deq = q.dequantize(QuantBackend::Quanto, group);
        check_exact(name, &q, &v, &deq, &v.f32(&format!("{name}.dequantized")));
    }
    // Per-channel groups (axis -1): the 8 tokens of one head and channel.
    for (name, nbits) in [("quanto4_axism1_g8", 4), ("quanto2_axism1_g8", 2)] {
        let grouped = per_channel_groups(&input);
        let q = quantize_groups(QuantBackend::Quanto, &grouped, 8, nbits, DType::F32);
        let deq = q.dequantize(QuantBackend::Quanto, 8);
        // Back to [1, 2, 8, 16] order to compare with transformers' dequantized tensor.
        let mut flat = vec![0f32; deq.len()];
        for (i, x) in deq.iter().enumerate() {
            let (g, t) = (i / 8, i % 8);
            let (d, h) = (g / 2, g % 2);
            flat[(h * 8 + t) * 16 + d] = *x;
        }
        check_exact(name, &q, &v, &flat, &v.f32(&format!("{name}.dequantized")));
    }
}

#[test]
fn hqq_quantizer_matches_hqq() {
    let v = Vectors(read_safetensors(
        &fixture("kv").join("quant_vectors.safetensors"),
    ));
    let input = v.f32("input");
    for (name, nbits, group) in [
        ("hqq4_axis1_g16", 4, 16),
        ("hqq2_axis1_g8", 2, 8),
        ("hqq4_axis1_g8", 4, 8),
        ("hqq8_axis1_g16", 8, 16),
    ] {
        let q = quantize_groups(QuantBackend::Hqq, &input, group, nbits, DType::F32);
        let deq = q.dequantize(QuantBackend::Hqq, group);
        let want_codes = v.codes(&format!("{name}.codes"));
        let (want_scale, want_zero) = (
            v.f32(&format!("{name}.scale")),
            v.f32(&format!("{name}.zero")),
        );
        let want_deq = v.f32(&format!("{name}.dequantized"));
        let code_diffs = q
            .codes
            .iter()
            .zip(&want_codes)
            .filter(|(a, b)| a != b)
            .count();
        let rel = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
                .fold(0.0, f32::max)
        };
        let (scale_err, zero_err) = (rel(&q.scale, &want_scale), rel(&q.zero, &want_zero));
        let deq_err = deq
            .iter()
            .zip(&want_deq)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        println!(
            "{name}: {code_diffs}/{} codes differ, scale rel {scale_err:.1e}, zero rel {zero_err:.1e}, dequantized max |Δ| {deq_err:.1e}",
            q.codes.len()
        );
        // HQQ's reductions (torch.mean) sum in another order, so zero points may differ in the
        // last bits; the solver itself (iterations, early stop, shrinkage) must be the same.
        assert_eq!(
            scale_err, 0.0,
            "{name}: scales (1 / min-max scale) must be exact"
        );
        assert!(zero_err <= 1e-5, "{name}: zero points differ by {zero_err}");
        assert_eq!(code_diffs, 0, "{name}: codes differ");
        assert!(
            deq_err <= 1e-5,
            "{name}: dequantized values differ by {deq_err}"
        );
    }
}
