//! Quantized tiny Llama against transformers + bitsandbytes 0.50.2 (goldens from
//! `xtask/goldens/bnb.py`): same quantized tensors, same greedy tokens, checkpoints exchanged
//! both ways.

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use cachet_models::Llama;
use cachet_quant::{BnbQuantizationConfig, LoadOptions, load_and_quantize_model, load_pretrained};
use cachet_tensor::{Checkpoint, Device, DeviceSpec, Precision};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama")
}

fn device() -> Device {
    DeviceSpec::Cpu.init().unwrap()
}

/// The three variants the generator wrote, with the config that reproduces each.
fn variants() -> Vec<(&'static str, BnbQuantizationConfig)> {
    let fp32 = |mut c: BnbQuantizationConfig| {
        c.bnb_4bit_compute_dtype = "fp32".into();
        c.torch_dtype = Some("fp32".into());
        c
    };
    vec![
        (
            "llama-nf4-dq",
            fp32(BnbQuantizationConfig::nf4(Precision::F32)),
        ),
        (
            "llama-fp4",
            fp32(BnbQuantizationConfig {
                load_in_4bit: true,
                bnb_4bit_quant_type: "fp4".into(),
                ..BnbQuantizationConfig::default()
            }),
        ),
        ("llama-int8", fp32(BnbQuantizationConfig::int8())),
    ]
}

fn i64s(ck: &Checkpoint, name: &str) -> Vec<i64> {
    ck.tensor_data(name).unwrap().try_into_vec::<i64>().unwrap()
}

fn f32s(ck: &Checkpoint, name: &str) -> Vec<f32> {
    ck.tensor_data(name)
        .unwrap()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn ids_tensor(ids: &[i64], rows: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<2, Int>::from_data(
        TensorData::new(ids.to_vec(), [rows, ids.len() / rows]),
        device,
    )
}

fn greedy(model: &Llama, prompt: &[i64], n: usize) -> Vec<i64> {
    let device = model.device();
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = model
            .forward(ids_tensor(&ids, 1, &device), None, None)
            .unwrap();
        let [_, s, v] = logits.dims();
        let last: Vec<f32> = logits
            .slice([0..1, s - 1..s, 0..v])
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        let next = last
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0 as i64;
        out.push(next);
        ids.push(next);
    }
    out
}

fn logits(model: &Llama, ids: &[i64], rows: usize) -> Vec<f32> {
    let device = model.device();
    model
        .forward(ids_tensor(ids, rows, &device), None, None)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn options() -> LoadOptions {
    LoadOptions {
        torch_dtype: Some(Precision::F32),
        ..LoadOptions::default()
    }
}

#[test]
fn quantizing_the_f32_llama_gives_transformers_tensors_bit_for_bit() {
    let device = device();
    for (name, config) in variants() {
        let q = load_and_quantize_model(source(), &config, &options(), &device).unwrap();
        assert_eq!(
            q.layers.len(),
            14,
            "{name}: 2 layers x 7 projections (lm_head skipped)"
        );
        assert!(!q.layers.contains_key("lm_head"));
        let theirs = Checkpoint::open(fixtures().join(name)).unwrap();
        for (prefix, layer) in &q.layers {
            for (key, data) in layer.tensors(prefix) {
                let want = theirs
                    .tensor_data(&key)
                    .unwrap_or_else(|e| panic!("{name}: transformers has no {key}: {e}"));
                assert_eq!(data.shape(), want.shape(), "{name} {key} shape");
                assert_eq!(data.dtype(), want.dtype(), "{name} {key} dtype");
                assert!(
                    data.as_bytes() == want.as_bytes(),
                    "{name} {key}: bytes differ from transformers + bitsandbytes"
                );
            }
        }
    }
}

#[test]
fn greedy_tokens_match_transformers_both_ways() {
    let device = device();
    for (name, config) in variants() {
        let reference =
            Checkpoint::open(fixtures().join(name).join("reference.safetensors")).unwrap();
        let prompt = i64s(&reference, "g.prompt_ids");
        let want = i64s(&reference, "g.tokens");
        let ids = i64s(&reference, "a.input_ids");
        let want_logits = f32s(&reference, "a.logits");
        // 1. The checkpoint transformers saved, loaded through config.json's quantization_config.
        let theirs = load_pretrained(fixtures().join(name), &device, Precision::F32).unwrap();
        let d = max_diff(&logits(&theirs, &ids, 2), &want_logits);
        assert!(
            d < 2e-3,
            "{name}: logits of transformers' checkpoint differ by {d}"
        );
        assert_eq!(
            greedy(&theirs, &prompt, want.len()),
            want,
            "{name}: greedy (their checkpoint)"
        );
        // 2. Quantized here from the f32 checkpoint.
        let ours = load_and_quantize_model(source(), &config, &options(), &device).unwrap();
        let d = max_diff(&logits(&ours.model, &ids, 2), &want_logits);
        assert!(d < 2e-3, "{name}: logits of our quantization differ by {d}");
        assert_eq!(
            greedy(&ours.model, &prompt, want.len()),
            want,
            "{name}: greedy (ours)"
        );
    }
}

#[test]
fn save_then_reload_is_identical_and_matches_transformers_layout() {
    let device = device();
    let tmp = tempfile::tempdir().unwrap();
    for (name, config) in variants() {
        let q = load_and_quantize_model(source(), &config, &options(), &device).unwrap();
        let out = tmp.path().join(name);
        q.save_pretrained(&out).unwrap();
        // Same key set, dtypes, shapes and bytes as transformers' save_pretrained.
        let ours = Checkpoint::open(&out).unwrap();
        let theirs = Checkpoint::open(fixtures().join(name)).unwrap();
        let mut a: Vec<&str> = ours.names();
        let mut b: Vec<&str> = theirs.names();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "{name}: key sets");
        for key in a {
            let (x, y) = (
                ours.tensor_data(key).unwrap(),
                theirs.tensor_data(key).unwrap(),
            );
            assert_eq!(
                (x.dtype(), x.shape()),
                (y.dtype(), y.shape()),
                "{name} {key}"
            );
            assert!(x.as_bytes() == y.as_bytes(), "{name} {key}: bytes differ");
        }
        let cfg = BnbQuantizationConfig::from_model_dir(&out)
            .unwrap()
            .expect("quantization_config");
        assert_eq!(cfg.load_in_4bit, config.load_in_4bit);
        assert_eq!(cfg.bnb_4bit_quant_type, config.bnb_4bit_quant_type);
        // Reload: identical logits.
        let re = load_pretrained(&out, &device, Precision::F32).unwrap();
        let ids = [5i64, 17, 99, 3, 200, 41];
        assert_eq!(
            logits(&re, &ids, 1),
            logits(&q.model, &ids, 1),
            "{name}: reload"
        );
        // No staging directory is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("cachet-tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}

#[test]
fn committed_cachet_checkpoints_are_what_cachet_writes_today() {
    // The generator loaded these in transformers (see cachet-saved/transformers-check.json);
    // this keeps that record valid: saving again gives the same tensors.
    let dir = fixtures().join("cachet-saved");
    let check: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("transformers-check.json")).expect("generator record"),
    )
    .unwrap();
    let device = device();
    let tmp = tempfile::tempdir().unwrap();
    for (name, config) in variants() {
        let entry = &check["checks"][name];
        assert_eq!(entry["loads"], true, "{name}: {entry}");
        assert_eq!(
            entry["greedy_matches_transformers_quantized"], true,
            "{name}: {entry}"
        );
        assert_eq!(entry["tensors_bit_identical"], true, "{name}: {entry}");
        let q = load_and_quantize_model(source(), &config, &options(), &device).unwrap();
        q.save_pretrained(tmp.path().join(name)).unwrap();
        let now = Checkpoint::open(tmp.path().join(name)).unwrap();
        let committed = Checkpoint::open(dir.join(name)).unwrap();
        for key in committed.names() {
            assert!(
                now.tensor_data(key).unwrap().as_bytes()
                    == committed.tensor_data(key).unwrap().as_bytes(),
                "{name} {key}"
            );
        }
    }
}

#[test]
fn disk_and_cpu_offload_keep_layers_quantized_with_identical_outputs() {
    let device = device();
    let config = BnbQuantizationConfig::nf4(Precision::F32);
    let plain = load_and_quantize_model(source(), &config, &options(), &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let map = cachet_quant::DeviceMap::parse(
        r#"{"model.embed_tokens": 0, "model.layers.0": "cpu", "model.layers.1": "disk", "lm_head": "cpu"}"#,
    )
    .unwrap();
    let opts = LoadOptions {
        device_map: Some(map),
        offload_folder: Some(tmp.path().join("offload")),
        ..options()
    };
    let offloaded = load_and_quantize_model(source(), &config, &opts, &device).unwrap();
    // Layer 1's seven projections are on disk, quantized, in transformers' 4-bit layout.
    let files: Vec<String> = std::fs::read_dir(tmp.path().join("offload"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 7, "{files:?}");
    let down = Checkpoint::open(
        tmp.path()
            .join("offload/model.layers.1.mlp.down_proj.safetensors"),
    )
    .unwrap();
    assert!(down.contains("model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"));
    assert_eq!(
        down.info("model.layers.1.mlp.down_proj.weight")
            .unwrap()
            .num_elements(),
        64 * 128 / 2
    );
    let ids = [7i64, 3, 250, 31, 9];
    assert_eq!(
        logits(&offloaded.model, &ids, 1),
        logits(&plain.model, &ids, 1)
    );
}
