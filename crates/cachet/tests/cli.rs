//! End-to-end tests of the `cachet` binary.

use std::path::Path;
use std::process::{Command, Output};

fn cachet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cachet"))
        .args(args)
        .output()
        .expect("cachet binary runs")
}

fn stdout_json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "cachet failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON object")
}

/// Runs each command and checks it fails with a message containing its needle.
fn assert_each_fails_with(cases: &[(&[&str], &str)]) {
    for (args, needle) in cases {
        let output = cachet(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // A clean failure: 1 (an error the command reports) or 2 (clap's usage error), never a
        // panic (101) that happens to mention the right words.
        assert!(
            matches!(output.status.code(), Some(1 | 2)),
            "{args:?} should fail with exit code 1 or 2, got {:?}: {stderr}",
            output.status.code()
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// Integer tensor `key` of a reference safetensors file, as u64 token ids.
fn reference_ids(path: &Path, key: &str) -> Vec<u64> {
    let checkpoint = cachet::tensor::safetensors::Checkpoint::open(path).unwrap();
    let data = checkpoint.tensor_data(key).unwrap();
    let data = data.try_cast(cachet::tensor::DType::I64).unwrap();
    data.try_into_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u64)
        .collect()
}

/// The embedded model's greedy tokens, as transformers' generate produced them.
fn embedded_reference_tokens() -> Vec<u64> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cachet-models/assets/tiny-llama/reference.safetensors");
    reference_ids(&path, "g.tokens")
}

#[test]
fn generate_on_the_embedded_default_matches_transformers() {
    let want = embedded_reference_tokens();
    let max = want.len().to_string();
    let output = cachet(&[
        "generate",
        "--json",
        "--prompt-ids",
        "1,2,3,4,5",
        "--max-new-tokens",
        &max,
        "--ignore-eos",
    ]);
    let json = stdout_json(&output);
    let tokens: Vec<u64> = json["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(tokens, want);
    assert!(json["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(json["model"], "embedded:tiny-llama");
}

#[test]
fn every_cache_type_runs_on_the_embedded_default_and_reports_its_bytes() {
    let reference = embedded_reference_tokens();
    for cache in [
        "dynamic",
        "static",
        "offloaded",
        "offloaded_static",
        "sliding_window",
        "sink",
    ] {
        let output = cachet(&[
            "generate",
            "--json",
            "--cache",
            cache,
            "--max-new-tokens",
            "16",
            "--ignore-eos",
        ]);
        let json = stdout_json(&output);
        let tokens: Vec<u64> = json["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert_eq!(
            tokens, reference,
            "{cache}: the window (64/256) is longer than the sequence, so tokens are exact"
        );
        assert_eq!(json["cache"], cache);
        assert!(json["cache_bytes"].as_u64().unwrap() > 0, "{cache}");
    }
    let output = cachet(&[
        "generate",
        "--json",
        "--cache",
        "none",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(stdout_json(&output)["cache_bytes"], 0);
}

#[test]
fn beams_and_batches_print_lists_of_lists() {
    let output = cachet(&[
        "generate",
        "--json",
        "--num-beams",
        "3",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
    ]);
    let json = stdout_json(&output);
    let tokens = json["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3);
    assert!(tokens.iter().all(|t| t.as_array().unwrap().len() == 4));
    assert_eq!(json["sequence_scores"].as_array().unwrap().len(), 3);
    let output = cachet(&[
        "generate",
        "--json",
        "--prompt-ids",
        "1,2,3",
        "--prompt-ids",
        "4",
        "--max-new-tokens",
        "2",
    ]);
    let json = stdout_json(&output);
    assert_eq!(json["tokens"].as_array().unwrap().len(), 2);
}

#[test]
fn static_cache_overflow_and_bad_cache_config_fail_clearly() {
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "generate",
                "--cache",
                "static",
                "--cache-config",
                r#"{"max_cache_len": 6}"#,
                "--max-new-tokens",
                "8",
                "--ignore-eos",
            ],
            "static cache is full",
        ),
        (
            &["generate", "--cache-config", r#"{"max_cache_lenn": 6}"#],
            "unknown field `max_cache_lenn`",
        ),
        (
            &["generate", "--cache", "paged"],
            "unknown cache implementation",
        ),
    ];
    assert_each_fails_with(&cases);
}

#[test]
fn generate_reads_a_checkpoint_directory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2");
    let output = cachet(&[
        "generate",
        "--json",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "7,8",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
    ]);
    let json = stdout_json(&output);
    assert_eq!(json["tokens"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_input_fails_with_a_message_naming_the_problem() {
    let cases: [(&[&str], &str); 11] = [
        (&["generate", "--device", "tpu"], "unknown backend"),
        (
            &["generate", "--max-new-tokens", "0", "--num-beams", "2"],
            "max_new_tokens must be at least 1",
        ),
        (
            &["generate", "--max-new-tokens", "18446744073709551610"],
            "overflows",
        ),
        (
            &[
                "generate",
                "--cache",
                "static",
                "--cache-config",
                r#"{"max_cache_len": 1125899906842624}"#,
            ],
            "bytes it may take (this machine's memory",
        ),
        (
            &[
                "generate",
                "--cache",
                "sliding_window",
                "--cache-config",
                r#"{"sliding_window": 1125899906842624}"#,
            ],
            "bytes it may take (this machine's memory",
        ),
        (
            &["denoise", "--steps", "2", "--height", "0"],
            "--height must be at least 1",
        ),
        (
            &["denoise", "--steps", "2", "--frames", "0"],
            "--frames must be at least 1",
        ),
        (
            &[
                "denoise", "--steps", "2", "--height", "4000000", "--width", "4000000",
            ],
            "latent positions",
        ),
        (&["generate", "--dtype", "f8"], "unknown dtype"),
        (
            &["generate", "--model", "/nonexistent/model"],
            "config.json",
        ),
        (
            &["generate", "--prompt-ids", "999999"],
            "outside the vocabulary",
        ),
    ];
    assert_each_fails_with(&cases);
}

#[test]
fn malformed_checkpoint_is_reported_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    let output = cachet(&["generate", "--model", dir.path().to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("model.safetensors"), "{stderr}");
}

#[test]
fn info_lists_the_cpu_backend() {
    let output = cachet(&["info", "--json"]);
    let json = stdout_json(&output);
    let flex = json["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "flex")
        .unwrap();
    assert_eq!(flex["compiled"], true);
}

#[test]
fn kv_memory_plots_measured_memory_of_every_cache_type() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.png");
    let output = cachet(&[
        "kv-memory",
        "--out",
        out.to_str().unwrap(),
        "--max-context",
        "1024",
        "--points",
        "4",
        "--window",
        "256",
        "--json",
    ]);
    let json = stdout_json(&output);

    // A PNG whose IHDR gives the dimensions reported.
    let png = std::fs::read(&out).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    let be32 = |at: usize| u64::from(u32::from_be_bytes(png[at..at + 4].try_into().unwrap()));
    assert_eq!(be32(16), json["width"].as_u64().unwrap());
    assert_eq!(be32(20), json["height"].as_u64().unwrap());
    assert!(be32(16) >= 640 && be32(20) >= 400);

    let context: Vec<u64> = serde_json::from_value(json["context"].clone()).unwrap();
    assert_eq!(context, [256, 512, 768, 1024]);
    let layers = json["layers"].as_u64().unwrap();
    assert_eq!(layers, 32);
    let series = |name: &str| -> Vec<u64> {
        let entry = json["series"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["cache"] == name)
            .unwrap_or_else(|| panic!("no {name} series in {json}"));
        let bytes: Vec<u64> = serde_json::from_value(entry["bytes"].clone()).unwrap();
        let layer: Vec<u64> = serde_json::from_value(entry["layer_bytes"].clone()).unwrap();
        assert_eq!(bytes.len(), context.len(), "{name}");
        assert!(bytes.iter().zip(&layer).all(|(b, l)| *b == l * layers));
        bytes
    };

    // Dynamic grows with the context and ends at least as big as the keys and values themselves
    // (8 kv heads x head_dim 128 x f32, keys and values).
    let dynamic = series("dynamic");
    assert!(dynamic.windows(2).all(|w| w[0] <= w[1]), "{dynamic:?}");
    assert!(dynamic[3] > dynamic[0], "{dynamic:?}");
    assert!(dynamic[3] >= 1024 * 8 * 128 * 4 * 2 * layers, "{dynamic:?}");
    // Static holds its full length from the first token on.
    let stat = series("static");
    assert!(stat.iter().all(|&b| b == stat[0] && b > 0), "{stat:?}");
    assert_eq!(series("offloaded_static"), stat);
    assert_eq!(series("offloaded"), dynamic);
    // Sliding window and sink stop growing past their 256-token window.
    let sliding = series("sliding_window");
    assert!(sliding.iter().all(|&b| b == sliding[0]), "{sliding:?}");
    assert!(sliding[0] < stat[0], "{sliding:?} vs {stat:?}");
    let sink = series("sink");
    assert!(sink.iter().all(|&b| b == sink[0]), "{sink:?}");
}

#[test]
fn generate_runs_bitsandbytes_checkpoints_saved_by_transformers() {
    for name in ["llama-nf4-dq", "llama-fp4", "llama-int8"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../cachet-quant/tests/fixtures")
            .join(name);
        let reference = dir.join("reference.safetensors");
        let read = |key: &str| reference_ids(&reference, key);
        let prompt: Vec<String> = read("g.prompt_ids").iter().map(u64::to_string).collect();
        let want = read("g.tokens");
        let max = want.len().to_string();
        let output = cachet(&[
            "generate",
            "--json",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &prompt.join(","),
            "--max-new-tokens",
            &max,
            "--ignore-eos",
        ]);
        let json = stdout_json(&output);
        let tokens: Vec<u64> = json["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert_eq!(
            tokens, want,
            "{name}: greedy tokens equal transformers + bitsandbytes"
        );
    }
}

#[test]
fn denoise_reports_cached_steps_speedup_and_quality_with_plots() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("steps.png");
    let image = dir.path().join("latent.png");
    let config = r#"{"cache_config": {"Fn_compute_blocks": 2, "residual_diff_threshold": 0.3, "max_warmup_steps": 3}}"#;
    let output = cachet(&[
        "denoise",
        "--json",
        "--steps",
        "10",
        "--cache",
        "dbcache",
        "--cache-config",
        config,
        "--reference",
        "--plot",
        plot.to_str().unwrap(),
        "--out",
        image.to_str().unwrap(),
    ]);
    let json = stdout_json(&output);
    assert_eq!(json["method"], "dbcache");
    assert_eq!(json["steps"], 10);
    let cached = json["cached_steps"].as_u64().unwrap();
    let computed = json["computed_steps"].as_u64().unwrap();
    assert_eq!(cached + computed, 10);
    // Warm-up steps 0..3 always compute; with a 0.3 threshold on the embedded model some of
    // the rest are cached, so the result differs from the uncached loop but stays close.
    assert!(cached >= 1 && computed >= 3, "{json}");
    assert!(json["seconds"].as_f64().unwrap() > 0.0);
    assert!(json["speedup"].as_f64().unwrap() > 0.0);
    let psnr = json["psnr_db"].as_f64().unwrap();
    assert!(psnr.is_finite() && psnr > 10.0, "{json}");
    assert!(json["max_abs_error"].as_f64().unwrap() > 0.0);
    for png in [&plot, &image] {
        let bytes = std::fs::read(png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{}", png.display());
    }
}

#[test]
fn denoise_draws_the_digit_asked_for_with_the_default_cache() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("three.png");
    let output = cachet(&[
        "denoise",
        "--json",
        "--label",
        "3",
        "--out",
        image.to_str().unwrap(),
    ]);
    let json = stdout_json(&output);
    assert_eq!(json["method"], "dbcache");
    assert_eq!(json["steps"], 28);
    assert_eq!(json["label"], 3);
    // The embedded digits model draws a 3, cached and uncached, and cache-dit's defaults cache
    // some of the steps after the 8 warm-up steps without changing what the image shows.
    assert_eq!(json["predicted"], 3, "{json}");
    assert_eq!(json["reference_predicted"], 3, "{json}");
    assert!(json["cached_steps"].as_u64().unwrap() >= 1, "{json}");
    assert!(json["image_ssim"].as_f64().unwrap() > 0.9, "{json}");
    assert!(json["image_psnr_db"].as_f64().unwrap() > 25.0, "{json}");
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
}

#[test]
fn denoise_label_and_size_flags_are_checked_against_the_model() {
    let flux = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/flux");
    assert_each_fails_with(&[
        (
            &["denoise", "--steps", "2", "--label", "12"],
            "label 12 is out of range: the model draws labels 0 to 9",
        ),
        (
            &["denoise", "--steps", "2", "--height", "12"],
            "the digits model draws 16x16 images",
        ),
        (
            &["denoise", "--steps", "2", "--text-tokens", "4"],
            "conditioned on --label",
        ),
        (
            &[
                "denoise",
                "--steps",
                "2",
                "--model",
                flux.to_str().unwrap(),
                "--label",
                "1",
            ],
            "no label table",
        ),
    ]);
}

#[test]
fn denoise_without_caching_matches_the_uncached_loop_exactly() {
    let output = cachet(&[
        "denoise",
        "--json",
        "--steps",
        "4",
        "--cache",
        "none",
        "--reference",
    ]);
    let json = stdout_json(&output);
    assert_eq!(json["cached_steps"], 0);
    assert_eq!(json["max_abs_error"].as_f64().unwrap(), 0.0);
    assert!(
        json["psnr_db"].is_null(),
        "identical latents have infinite PSNR: {json}"
    );
}

#[test]
fn denoise_bad_cache_options_fail_clearly() {
    assert_each_fails_with(&[
        (
            &["denoise", "--steps", "2", "--cache", "warp"],
            "unknown variant `warp`",
        ),
        (
            &[
                "denoise",
                "--steps",
                "2",
                "--cache",
                "dbcache",
                "--cache-config",
                r#"{"cache_config": {"Fn_compute_blocks": 12, "Bn_compute_blocks": 8}}"#,
            ],
            "exceed the 18 blocks",
        ),
        (
            &[
                "denoise",
                "--steps",
                "2",
                "--cache",
                "fbcache",
                "--cache-config",
                r#"{"threshold": -0.1}"#,
            ],
            "threshold = -0.1: must not be negative",
        ),
        (
            &[
                "denoise",
                "--steps",
                "2",
                "--cache",
                "pab",
                "--cache-config",
                r#"{"spatial_attention_timestep_skip_range": [800, 100]}"#,
            ],
            "lower bound is greater",
        ),
        (
            &[
                "denoise",
                "--steps",
                "2",
                "--cache",
                "pab",
                "--cache-config",
                r#"{"spatial_attention_block_skip_range": 2, "spatial_attention_block_identifiers": ["^temporal_blocks"]}"#,
            ],
            "matches no attention module",
        ),
        (
            &[
                "denoise",
                "--steps",
                "2",
                "--cache",
                "fastercache",
                "--cfg",
                "3",
            ],
            "needs a rank-5 output",
        ),
        (
            &[
                "denoise",
                "--steps",
                "2",
                "--cache",
                "dbcache",
                "--cache-config",
                "{not json",
            ],
            "invalid cache config",
        ),
    ]);
}

#[test]
fn quantize_shards_with_max_shard_size_and_generate_reads_the_shards() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let tmp = tempfile::tempdir().unwrap();
    let mut tokens = Vec::new();
    for (name, size) in [("single", "5GB"), ("sharded", "40KB")] {
        let out = tmp.path().join(name);
        let json = stdout_json(&cachet(&[
            "quantize",
            "--json",
            "--model",
            source.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--bits",
            "4",
            "--double-quant",
            "--max-shard-size",
            size,
        ]));
        let shards = json["shards"].as_u64().unwrap();
        if name == "single" {
            assert_eq!(shards, 1, "{json}");
            assert!(out.join("model.safetensors").exists());
        } else {
            assert!(shards >= 3, "{json}");
            assert!(out.join("model.safetensors.index.json").exists());
            assert!(
                out.join(format!("model-00001-of-{shards:05}.safetensors"))
                    .exists()
            );
        }
        assert!(json["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0));
        let generated = stdout_json(&cachet(&[
            "generate",
            "--json",
            "--model",
            out.to_str().unwrap(),
            "--prompt-ids",
            "5,17,99",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
        ]));
        tokens.push(generated["tokens"].clone());
    }
    assert_eq!(tokens[0], tokens[1], "sharded and single-file checkpoints");
    let out = tmp.path().join("bad");
    assert_each_fails_with(&[(
        &[
            "quantize",
            "--model",
            source.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-shard-size",
            "5 gigs",
        ],
        "max_shard_size",
    )]);
    assert!(!out.exists());
}
