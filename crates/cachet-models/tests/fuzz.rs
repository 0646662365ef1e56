//! Property-based fuzzing of cachet-models' parsers: `LlamaConfig::from_json` (config.json),
//! `generation_config.json` (`GenerationConfig` through serde, as the CLI reads it, then
//! `generate` on the embedded tiny Llama), and GGUF metadata to a config (`gguf_config`, then the
//! whole `Llama::from_gguf_file`).
//!
//! The property: a typed error or a value the library then uses without panicking, never more
//! than a small multiple of the input in memory; absurd sizes fail fast in dedicated cases.
//! Budget: `CACHET_FUZZ_CASES` (default 256) per property; `cargo xtask fuzz` runs more.

#[path = "../../../tests/fuzz_support.rs"]
mod fuzz_support;

use std::sync::OnceLock;
use std::time::Duration;

use cachet_models::{
    GenerationConfig, Llama, LlamaConfig, embedded, gguf_checkpoint, gguf_config,
    inverse_frequencies,
};
use cachet_tensor::gguf::{Array, GgmlType, GgufFile, GgufWriter, Value};
use cachet_tensor::{Device, Precision};
use fuzz_support::{any_json, any_text, bounded, fails_fast, mutated_bytes, mutated_json};
use proptest::prelude::*;
use serde_json::json;

const FAST: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

const LLAMA_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "eos_token_id",
    "bos_token_id",
    "torch_dtype",
    "dtype",
];

fn valid_llama() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0,
        "torch_dtype": "bfloat16", "max_position_embeddings": 64, "sliding_window": 16,
        "use_sliding_window": false, "max_window_layers": 1,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "eos_token_id": [1, 2], "bos_token_id": 0
    })
}

/// What the model code derives from an accepted config must not panic either.
fn exercise_llama_config(config: &LlamaConfig) {
    let head_dim = config.head_dim();
    assert!(head_dim > 0 && head_dim.is_multiple_of(2), "{config:?}");
    assert!(config.num_attention_heads.is_multiple_of(config.kv_heads()));
    let _ = (
        config.family(),
        config.qkv_bias(),
        config.o_bias(),
        config.eos_ids(),
    );
    for layer in 0..config.num_hidden_layers.min(4) {
        let _ = config.sliding_window_for(layer);
    }
    let rope = config.rope().expect("validated");
    let _ = inverse_frequencies(rope, head_dim);
}

fn check_llama(text: &str) -> Result<(), TestCaseError> {
    if let Ok(config) = bounded(text.len(), || LlamaConfig::from_json(text, "fuzz.json"))? {
        // Accepted text is one JSON document (nothing after it).
        prop_assert!(fuzz_support::one_json_document(text), "{text:?}");
        exercise_llama_config(&config);
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn llama_config_arbitrary(text in prop_oneof![
        any_text(),
        any_json(LLAMA_KEYS).prop_map(|v| v.to_string()),
    ]) {
        check_llama(&text)?;
    }

    #[test]
    fn llama_config_mutated(text in mutated_json(valid_llama(), LLAMA_KEYS)) {
        check_llama(&text)?;
    }
}

#[test]
fn llama_config_absurd_sizes_fail_fast() {
    for (key, value) in [
        ("vocab_size", json!(1u64 << 60)),
        ("hidden_size", json!(1u64 << 60)),
        ("num_hidden_layers", json!(u64::MAX)),
        ("num_attention_heads", json!(1u64 << 40)),
        ("head_dim", json!(1u64 << 62)),
    ] {
        let mut config = valid_llama();
        config[key] = value;
        let text = config.to_string();
        fails_fast(key, FAST, || LlamaConfig::from_json(&text, "absurd"));
    }
}

// ---------------------------------------------------------------------------------------------
// generation_config.json
// ---------------------------------------------------------------------------------------------

const GENERATION_KEYS: &[&str] = &[
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "num_beams",
    "num_return_sequences",
    "length_penalty",
    "early_stopping",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "seed",
    "max_cache_bytes",
    "max_cache_len",
    "window_length",
    "num_sink_tokens",
    "sliding_window",
    "nbits",
    "q_group_size",
    "residual_length",
    "axis_key",
    "axis_value",
    "backend",
    "quantized",
    "static",
    "sink",
    "offloaded_static",
];

fn valid_generation() -> serde_json::Value {
    json!({
        "max_new_tokens": 2, "do_sample": true, "temperature": 0.7, "top_k": 5, "top_p": 0.9,
        "num_beams": 1, "num_return_sequences": 1, "length_penalty": 1.0,
        "early_stopping": "never", "eos_token_id": [2, 3], "pad_token_id": 0, "use_cache": true,
        "cache_implementation": "static", "seed": 7, "max_cache_bytes": 1000000,
        "cache_config": {"max_cache_len": 16, "window_length": 8, "num_sink_tokens": 2,
            "sliding_window": 4, "nbits": 4, "q_group_size": 32, "residual_length": 2,
            "backend": "quanto"},
        "transformers_version": "5.23.0"
    })
}

fn valid_beam_search() -> serde_json::Value {
    json!({
        "max_new_tokens": 3, "num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.5,
        "early_stopping": true, "eos_token_id": 2, "cache_implementation": "sink",
        "max_cache_bytes": 0, "cache_config": {"window_length": 8, "num_sink_tokens": 2}
    })
}

fn tiny() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| embedded::tiny_llama(&Device::default(), Precision::F32).unwrap())
}

/// Parses like `cachet generate --generation-config` and runs what was accepted.
fn check_generation(text: &str) -> Result<(), TestCaseError> {
    let Ok(mut config) = bounded(text.len(), || {
        serde_json::from_str::<GenerationConfig>(text)
    })?
    else {
        return Ok(());
    };
    // Runs whose caches would legitimately take gigabytes are not worth a case: run what is
    // small, and what is bigger than this machine's memory in all (it must be refused before
    // anything is allocated, even when each layer alone would fit), skip the rest.
    let rows = 2usize.saturating_mul(config.num_beams);
    if rows > 16 && rows <= 1 << 16 {
        return Ok(());
    }
    let cache_config = config.cache_config.clone().unwrap_or_default();
    let reserved = match config.cache_implementation.as_deref().map(str::trim) {
        Some("static" | "offloaded_static") => Some(
            cache_config
                .max_cache_len
                .unwrap_or(3usize.saturating_add(config.max_new_tokens)),
        ),
        Some("sliding_window") => cache_config.sliding_window,
        Some("sink") => Some(cache_config.window_length.unwrap_or(256)),
        _ => None,
    };
    // Keys and values of the tiny model's 4 layers: 2 kv heads x 32 x 2 x 4 bytes per row.
    let cache_bytes =
        |tokens: usize| (tokens as u64).saturating_mul((rows as u64).saturating_mul(4 * 512));
    let host = cachet_tensor::host_memory_bytes().unwrap_or(u64::MAX / 2);
    let too_large = config.use_cache && reserved.is_some_and(|t| cache_bytes(t) > host);
    if reserved.is_some_and(|t| t > 4096) && !too_large {
        return Ok(());
    }
    // Beam search does not stream: keep its runs short. Greedy and sampling stop through the
    // streamer after two steps, so max_new_tokens keeps its fuzzed value (and the cache sizes
    // derived from it).
    if config.num_beams > 1 {
        config.max_new_tokens = config.max_new_tokens.min(2);
    }
    let prompts = [vec![1, 2, 3], vec![4, 5]];
    let mut steps = 0;
    let (out, peak, _) = fuzz_support::measured(|| {
        cachet_models::generate_streaming(tiny(), &prompts, &config, None, &mut |_| {
            steps += 1;
            steps < 2
        })
    });
    prop_assert!(
        peak < 256 << 20,
        "generation with {config:?} held {peak} bytes"
    );
    if too_large {
        prop_assert!(out.is_err(), "a cache beyond memory ran: {config:?}");
    }
    if let Ok(out) = out {
        prop_assert_eq!(
            out.sequences.len(),
            prompts.len() * config.num_return_sequences
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn generation_config_arbitrary(text in prop_oneof![
        any_text(),
        any_json(GENERATION_KEYS).prop_map(|v| v.to_string()),
    ]) {
        check_generation(&text)?;
    }

    #[test]
    fn generation_config_mutated(text in prop_oneof![
        mutated_json(valid_generation(), GENERATION_KEYS),
        mutated_json(valid_beam_search(), GENERATION_KEYS),
    ]) {
        check_generation(&text)?;
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF metadata -> config (and the whole model)
// ---------------------------------------------------------------------------------------------

/// The metadata of a tiny valid llama GGUF (vocab 16, width 8, 2 heads, 1 kv head, 1 layer).
fn tiny_metadata() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::from("llama")),
        ("general.name", Value::from("tiny")),
        ("llama.embedding_length", Value::U32(8)),
        ("llama.feed_forward_length", Value::U32(16)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.context_length", Value::U32(64)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.rope.dimension_count", Value::U32(4)),
        ("llama.vocab_size", Value::U32(16)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
    ]
}

/// Keys gguf_config reads that the valid file leaves out.
const EXTRA_GGUF_KEYS: &[&str] = &[
    "llama.attention.key_length",
    "llama.attention.value_length",
    "llama.attention.sliding_window",
    "llama.rope.scaling.type",
    "llama.rope.scaling.factor",
    "llama.rope.scale_linear",
    "llama.expert_count",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.padding_token_id",
    "general.alignment",
];

/// The tensors of the tiny model (row-major shapes), F32.
fn tiny_tensors() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("token_embd.weight", vec![16, 8]),
        ("output_norm.weight", vec![8]),
        ("blk.0.attn_norm.weight", vec![8]),
        ("blk.0.ffn_norm.weight", vec![8]),
        ("blk.0.attn_q.weight", vec![8, 8]),
        ("blk.0.attn_k.weight", vec![4, 8]),
        ("blk.0.attn_v.weight", vec![4, 8]),
        ("blk.0.attn_output.weight", vec![8, 8]),
        ("blk.0.ffn_gate.weight", vec![16, 8]),
        ("blk.0.ffn_up.weight", vec![16, 8]),
        ("blk.0.ffn_down.weight", vec![8, 16]),
    ]
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| ((i % 13) as f32 * 0.01 - 0.05).to_le_bytes())
        .collect()
}

fn tiny_gguf(metadata: &[(&str, Value)], extra_tensors: &[(&str, Vec<usize>)]) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (key, value) in metadata {
        // The writer refuses what the reader would (a bad alignment): skip those keys.
        let _ = w.add_metadata(key, value.clone());
    }
    for (name, shape) in tiny_tensors().iter().chain(extra_tensors) {
        let n = shape.iter().product();
        let _ = w.add_tensor(name, shape, GgmlType::F32, f32_bytes(n));
    }
    w.to_bytes()
}

/// Metadata values of every type, sizes and signs that do not belong.
fn odd_gguf_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            Value::U32(0),
            Value::U32(1),
            Value::U32(3),
            Value::U32(u32::MAX),
            Value::U64(1 << 40),
            Value::U64(u64::MAX),
            Value::I32(-1),
            Value::I64(i64::MIN),
            Value::U8(2),
            Value::F32(f32::NAN),
            Value::F32(f32::INFINITY),
            Value::F32(-1.0),
            Value::F32(0.0),
            Value::F64(1e300),
            Value::F64(2.0),
            Value::Bool(true),
            Value::from(""),
            Value::from("linear"),
            Value::from("yarn"),
            Value::from("mistral"),
            Value::from("qwen2"),
            Value::Array(Array::String(vec!["a".into(); 3])),
            Value::Array(Array::U32(vec![])),
        ]),
        (0u32..64).prop_map(Value::U32),
    ]
}

/// Valid metadata with keys replaced, removed or added, and maybe a `rope_freqs.weight`.
fn mutated_gguf_model() -> impl Strategy<Value = Vec<u8>> {
    let all_keys: Vec<&'static str> = tiny_metadata()
        .iter()
        .map(|(k, _)| *k)
        .chain(EXTRA_GGUF_KEYS.iter().copied())
        .collect();
    let edits = prop::collection::vec(
        (
            prop::sample::select(all_keys),
            prop::option::weighted(0.8, odd_gguf_value()),
        ),
        1..5,
    );
    let extra = prop::sample::select(vec![
        vec![],
        vec![("rope_freqs.weight", vec![2])],
        vec![("rope_freqs.weight", vec![3])],
        vec![("output.weight", vec![16, 8])],
        vec![("blk.0.attn_q.bias", vec![8])],
        vec![("blk.0.ffn_up.bias", vec![16])],
    ]);
    (edits, extra).prop_map(|(edits, extra)| {
        let mut metadata = tiny_metadata();
        for (key, value) in edits {
            metadata.retain(|(k, _)| *k != key);
            if let Some(value) = value {
                metadata.push((key, value));
            }
        }
        tiny_gguf(&metadata, &extra)
    })
}

fn check_gguf_model(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let len = bytes.len();
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", bytes) else {
        return Ok(());
    };
    let Ok(config) = bounded(len, || gguf_config(&file))? else {
        return Ok(());
    };
    exercise_llama_config(&config);
    bounded(len, || {
        let checkpoint = gguf_checkpoint(&file, &config, Precision::F32);
        if checkpoint.is_ok() {
            let _ = Llama::from_gguf_file(&file, &Device::default(), Precision::F32);
        }
    })?;
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn gguf_config_arbitrary(bytes in prop_oneof![
        fuzz_support::any_bytes(),
        // Arbitrary metadata maps over the keys gguf_config reads.
        prop::collection::vec(
            (
                prop::sample::select(
                    tiny_metadata().iter().map(|(k, _)| *k)
                        .chain(EXTRA_GGUF_KEYS.iter().copied()).collect::<Vec<_>>()
                ),
                odd_gguf_value(),
            ),
            0..16,
        )
        .prop_map(|kv| tiny_gguf(&kv, &[])),
    ]) {
        check_gguf_model(bytes)?;
    }

    #[test]
    fn gguf_config_mutated(bytes in prop_oneof![
        3 => mutated_gguf_model(),
        1 => mutated_bytes(tiny_gguf(&tiny_metadata(), &[])),
    ]) {
        check_gguf_model(bytes)?;
    }
}

#[test]
fn valid_bases_parse_and_run() {
    let config = LlamaConfig::from_json(&valid_llama().to_string(), "valid").unwrap();
    exercise_llama_config(&config);
    let generation: GenerationConfig =
        serde_json::from_str(&valid_generation().to_string()).unwrap();
    let out = cachet_models::generate(tiny(), &[vec![1, 2]], &generation, None).unwrap();
    assert_eq!(out.sequences.len(), 1);
    let beams: GenerationConfig = serde_json::from_str(&valid_beam_search().to_string()).unwrap();
    let out = cachet_models::generate(tiny(), &[vec![1, 2]], &beams, None).unwrap();
    assert_eq!(out.sequences.len(), 2);
    let file = GgufFile::from_bytes("tiny.gguf", tiny_gguf(&tiny_metadata(), &[])).unwrap();
    let model = Llama::from_gguf_file(&file, &Device::default(), Precision::F32).unwrap();
    assert_eq!(model.config.vocab_size, 16);
}

#[test]
fn gguf_absurd_sizes_fail_fast() {
    for (key, value) in [
        ("llama.vocab_size", Value::U64(1 << 60)),
        ("llama.embedding_length", Value::U64(1 << 60)),
        ("llama.block_count", Value::U64(u64::MAX)),
        ("llama.attention.head_count", Value::U64(1 << 40)),
        ("llama.attention.key_length", Value::U64(1 << 62)),
    ] {
        let mut metadata = tiny_metadata();
        metadata.retain(|(k, _)| *k != key);
        metadata.push((key, value));
        let file = GgufFile::from_bytes("absurd.gguf", tiny_gguf(&metadata, &[])).unwrap();
        fails_fast(key, FAST, || gguf_config(&file));
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: crashes the fuzzer found, kept as named cases
// ---------------------------------------------------------------------------------------------

/// `generation_config_mutated` found it: `num_beams` sized the row buffers before anything
/// checked it, so 2^57 beams aborted the process ("memory allocation of 5697398332051131120
/// bytes failed"). Now prompts × beams is capped and refused with a typed error.
#[test]
fn regression_huge_num_beams_is_refused_not_allocated() {
    let text =
        r#"{"num_beams": 144115188075855872, "num_return_sequences": 1, "max_new_tokens": 2}"#;
    let config: GenerationConfig = serde_json::from_str(text).unwrap();
    let err = fails_fast("num_beams 2^57", FAST, || {
        cachet_models::generate(tiny(), &[vec![1, 2, 3], vec![4, 5]], &config, None)
    });
    assert!(err.contains("num_beams"), "{err}");
}

/// The memory-budget estimate (`max_cache_bytes`) multiplied the fuzzed `max_new_tokens` into
/// an overflow (a panic in debug builds, a wrong decision in release): it saturates now, and the
/// static cache falls back to the offloaded one, which refuses the size.
#[test]
fn regression_cache_budget_estimate_does_not_overflow() {
    let text = r#"{"max_new_tokens": 1152921504606846976, "max_cache_bytes": 1000000,
        "cache_implementation": "static"}"#;
    let config: GenerationConfig = serde_json::from_str(text).unwrap();
    fails_fast("max_new_tokens 2^60 with a cache budget", FAST, || {
        cachet_models::generate(tiny(), &[vec![1, 2, 3]], &config, None)
    });
}

/// A long `generation_config_mutated` run was killed for memory: the static cache checked each
/// layer against the machine's memory, so four layers of just over a third of it each passed
/// together. The bound covers all of the model's layers now, before the first allocation.
#[test]
fn regression_cache_layers_together_beyond_memory_are_refused() {
    let Some(host) = cachet_tensor::host_memory_bytes() else {
        return;
    };
    // One layer of the tiny model takes 512 bytes per token of a single prompt.
    let tokens = host / 3 / 512;
    let text = format!(
        r#"{{"max_new_tokens": 2, "cache_implementation": "static",
            "cache_config": {{"max_cache_len": {tokens}}}}}"#
    );
    let config: GenerationConfig = serde_json::from_str(&text).unwrap();
    let err = fails_fast("4 layers of a third of memory", FAST, || {
        cachet_models::generate(tiny(), &[vec![1, 2, 3]], &config, None)
    });
    assert!(err.contains("4 layers"), "{err}");
}

/// `llama_config_mutated`: text after the JSON document was ignored (`{...} x` read as a
/// config), unlike `json.loads` and transformers; it is a typed error now.
#[test]
fn regression_trailing_text_after_config_is_refused() {
    let text = format!("{} x", valid_llama());
    let err = LlamaConfig::from_json(&text, "trailing.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("trailing"), "{err}");
}

/// `gguf_config_mutated` (in `cargo xtask fuzz`): an empty tensor with a huge dimension (row-major
/// `[0, 2^62]`, valid GGUF: no bytes) made the dequantized checkpoint's row width `cols x 4`
/// overflow ("attempt to multiply with overflow") while it was filled; empty tensors write
/// nothing now, and the model load refuses the shape with a typed error.
#[test]
fn regression_empty_tensor_with_huge_dimension() {
    let bytes = tiny_gguf(&tiny_metadata(), &[("blk.0.ffn_up.bias", vec![0, 1 << 62])]);
    let file = GgufFile::from_bytes("empty-huge.gguf", bytes).unwrap();
    assert!(file.contains("blk.0.ffn_up.bias"));
    let config = gguf_config(&file).unwrap();
    gguf_checkpoint(&file, &config, Precision::F32).unwrap();
    fails_fast("load with a [0, 2^62] bias", FAST, || {
        Llama::from_gguf_file(&file, &Device::default(), Precision::F32)
    });
}
