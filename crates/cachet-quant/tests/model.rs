//! Quantized tiny Llama against transformers + bitsandbytes 0.50.2 (goldens from
//! `xtask/goldens/bnb.py`): same quantized tensors, same greedy tokens, checkpoints exchanged
//! both ways.

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use cachet_models::Llama;
use cachet_nn::Pretrained;
use cachet_quant::{BnbQuantizationConfig, LoadOptions, load_and_quantize_model, load_pretrained};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{Device, DeviceSpec, Precision};

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
        let q = load_and_quantize_model::<Llama>(source(), &config, &options(), &device).unwrap();
        assert_eq!(
            q.layers.len(),
            14,
            "{name}: 2 layers x 7 projections (lm_head skipped)"
        );
        assert!(!q.layers.contains_key("lm_head"));
        let theirs = Checkpoint::open(fixtures().join(name)).unwrap();
        for (prefix, layer) in &q.layers {
            for (key, data) in layer.tensors(prefix).unwrap() {
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
        let theirs =
            load_pretrained::<Llama>(fixtures().join(name), &device, Precision::F32).unwrap();
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
        let ours =
            load_and_quantize_model::<Llama>(source(), &config, &options(), &device).unwrap();
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
        let q = load_and_quantize_model::<Llama>(source(), &config, &options(), &device).unwrap();
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
        let re = load_pretrained::<Llama>(&out, &device, Precision::F32).unwrap();
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
        let q = load_and_quantize_model::<Llama>(source(), &config, &options(), &device).unwrap();
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
    let plain = load_and_quantize_model::<Llama>(source(), &config, &options(), &device).unwrap();
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
    let offloaded = load_and_quantize_model::<Llama>(source(), &config, &opts, &device).unwrap();
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

/// What the one-shot writer (every output tensor built, then one `safetensors::save`) wrote
/// before saving was streamed: the streamed single file must be byte-identical to it.
fn one_shot_file(q: &cachet_quant::QuantizedModel<Llama>, path: &Path) {
    let ck = Checkpoint::open(&q.source).unwrap();
    let owned = |name: &str| {
        q.layers.keys().any(|p| {
            name.strip_prefix(p.as_str())
                .is_some_and(|rest| rest.starts_with(".weight") || rest == ".SCB")
        })
    };
    let mut tensors = Vec::new();
    for name in ck.names() {
        if !owned(name) {
            let data = ck.tensor_data(name).unwrap();
            let data = if data.dtype().is_float() && data.dtype() != q.torch_dtype.dtype() {
                data.convert_dtype(q.torch_dtype.dtype())
            } else {
                data
            };
            tensors.push((name.to_string(), data));
        }
    }
    for (prefix, layer) in &q.layers {
        tensors.extend(layer.tensors(prefix).unwrap());
    }
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    cachet_tensor::safetensors::save(path, &tensors, Some(&metadata)).unwrap();
}

#[test]
fn streamed_sharded_save_reloads_with_identical_logits() {
    let device = device();
    let tmp = tempfile::tempdir().unwrap();
    let ids = [5i64, 17, 99, 3, 200, 41];
    for (name, config) in variants() {
        let q = load_and_quantize_model::<Llama>(source(), &config, &options(), &device).unwrap();
        let want = logits(&q.model, &ids, 1);
        // Default 5GB: one file, byte for byte what the one-shot writer produced.
        let single = tmp.path().join(format!("{name}-single"));
        q.save_pretrained(&single).unwrap();
        one_shot_file(&q, &tmp.path().join(format!("{name}-oneshot.safetensors")));
        assert!(
            std::fs::read(single.join("model.safetensors")).unwrap()
                == std::fs::read(tmp.path().join(format!("{name}-oneshot.safetensors"))).unwrap(),
            "{name}: streamed single file differs from the one-shot writer"
        );
        assert!(!single.join("model.safetensors.index.json").exists());
        // 40 kB shards: several files + an index, as transformers names them.
        let sharded = tmp.path().join(format!("{name}-sharded"));
        let opts = cachet_quant::SaveOptions {
            max_shard_size: cachet_quant::parse_shard_size("40KB").unwrap(),
        };
        q.save_pretrained_with(&sharded, &opts).unwrap();
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let mut files: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
        files.sort_unstable();
        files.dedup();
        let n = files.len();
        assert!(n >= 3, "{name}: {files:?}");
        for (i, f) in files.iter().enumerate() {
            assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
            let size = std::fs::metadata(sharded.join(f)).unwrap().len();
            let shard = Checkpoint::open(sharded.join(f)).unwrap();
            // Over the limit only when a single tensor is (lm_head, embed_tokens: 64 kB f32).
            assert!(
                shard.total_bytes() <= 40_000 || shard.len() == 1,
                "{name} {f}: {size} bytes, {} tensors",
                shard.len()
            );
        }
        assert!(!sharded.join("model.safetensors").exists());
        let one = Checkpoint::open(&single).unwrap();
        let many = Checkpoint::open(&sharded).unwrap();
        assert_eq!(one.names(), many.names(), "{name}");
        assert_eq!(
            index["metadata"]["total_size"].as_u64().unwrap(),
            one.total_bytes()
        );
        for key in one.names() {
            assert!(
                one.tensor_data(key).unwrap().as_bytes()
                    == many.tensor_data(key).unwrap().as_bytes(),
                "{name} {key}"
            );
        }
        let re = load_pretrained::<Llama>(&sharded, &device, Precision::F32).unwrap();
        assert_eq!(logits(&re, &ids, 1), want, "{name}: sharded reload");
        // Saving again as one file over the sharded one leaves no stale shard or index behind.
        q.save_pretrained(&sharded).unwrap();
        let left: Vec<String> = std::fs::read_dir(&sharded)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".safetensors") || f.ends_with(".json"))
            .collect();
        assert!(
            !left
                .iter()
                .any(|f| f.starts_with("model-") || f.ends_with("index.json")),
            "{left:?}"
        );
        assert_eq!(
            logits(
                &load_pretrained::<Llama>(&sharded, &device, Precision::F32).unwrap(),
                &ids,
                1
            ),
            want
        );
    }
}

#[test]
fn streamed_save_casts_dense_parts_to_torch_dtype_like_the_one_shot_writer() {
    // The f32 source saved as f16 / bf16: every float tensor goes through the cast path.
    let device = device();
    let tmp = tempfile::tempdir().unwrap();
    for precision in [Precision::F16, Precision::BF16] {
        let opts = LoadOptions {
            torch_dtype: Some(precision),
            ..LoadOptions::default()
        };
        let config = BnbQuantizationConfig::nf4(precision);
        let q = load_and_quantize_model::<Llama>(source(), &config, &opts, &device).unwrap();
        let out = tmp.path().join(format!("{precision:?}"));
        q.save_pretrained_with(
            &out,
            &cachet_quant::SaveOptions {
                max_shard_size: 1 << 30,
            },
        )
        .unwrap();
        let want = tmp.path().join(format!("{precision:?}.safetensors"));
        one_shot_file(&q, &want);
        assert!(
            std::fs::read(out.join("model.safetensors")).unwrap() == std::fs::read(&want).unwrap(),
            "{precision:?}"
        );
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(
            ck.info("lm_head.weight").unwrap().dtype.name(),
            if precision == Precision::F16 {
                "F16"
            } else {
                "BF16"
            }
        );
    }
}

#[test]
fn dense_projections_honour_cpu_and_disk_placements_with_identical_logits() {
    let device = device();
    // Attention stays dense (skip_modules), lm_head too (skipped by default): dense and
    // quantized projections on every placement.
    let config = BnbQuantizationConfig {
        skip_modules: Some(vec!["lm_head".into(), "self_attn".into()]),
        ..BnbQuantizationConfig::nf4(Precision::F32)
    };
    let plain = load_and_quantize_model::<Llama>(source(), &config, &options(), &device).unwrap();
    assert_eq!(plain.layers.len(), 6, "only the MLPs are quantized");
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("offload");
    let map = cachet_quant::DeviceMap::parse(
        r#"{"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.norm": "disk", "lm_head": "disk"}"#,
    )
    .unwrap();
    let opts = LoadOptions {
        device_map: Some(map),
        offload_folder: Some(folder.clone()),
        ..options()
    };
    let offloaded = load_and_quantize_model::<Llama>(source(), &config, &opts, &device).unwrap();
    let ids = [7i64, 3, 250, 31, 9, 100];
    assert_eq!(
        logits(&offloaded.model, &ids, 2),
        logits(&plain.model, &ids, 2),
        "offloaded dense projections change the logits"
    );
    // On disk: lm_head and layer 1's four attention projections (dense f32 weights, in the
    // checkpoint's names), and layer 1's three MLP projections (quantized).
    let mut files: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 8, "{files:?}");
    let head = Checkpoint::open(folder.join("lm_head.safetensors")).unwrap();
    assert_eq!(head.names(), ["lm_head.weight"]);
    assert_eq!(head.info("lm_head.weight").unwrap().shape, [256, 64]);
    let source_ck = Checkpoint::open(source()).unwrap();
    assert!(
        head.tensor_data("lm_head.weight").unwrap().as_bytes()
            == source_ck.tensor_data("lm_head.weight").unwrap().as_bytes()
    );
    assert!(
        Checkpoint::open(folder.join("model.layers.1.self_attn.q_proj.safetensors"))
            .unwrap()
            .contains("model.layers.1.self_attn.q_proj.weight")
    );
    // Disk-offloaded layers hold nothing resident; cpu ones hold their f32 weight on the host.
    use cachet_tensor::MemoryFootprint;
    let head_bytes = |m: &Llama| m.lm_head.as_ref().unwrap().memory_bytes();
    assert_eq!(head_bytes(&plain.model), 256 * 64 * 4);
    assert_eq!(head_bytes(&offloaded.model), 0);
    let q0 = |m: &Llama| m.layers[0].self_attn.q_proj.memory_bytes();
    assert_eq!(q0(&offloaded.model), q0(&plain.model));
    // Embeddings and norms cannot be offloaded: named, and left on the compute device.
    assert_eq!(
        offloaded.not_offloaded,
        [
            "model.embed_tokens",
            "model.layers.0.input_layernorm",
            "model.layers.0.post_attention_layernorm",
            "model.layers.1.input_layernorm",
            "model.layers.1.post_attention_layernorm",
            "model.norm",
        ]
    );
    assert!(plain.not_offloaded.is_empty());
    // Greedy decoding agrees too (the disk layers are read again on every step).
    let prompt = [1i64, 20, 30];
    assert_eq!(
        greedy(&offloaded.model, &prompt, 5),
        greedy(&plain.model, &prompt, 5)
    );
}

#[test]
fn offloaded_dense_projections_keep_their_bias() {
    // Qwen2's q/k/v projections have biases; keep attention dense and offload it.
    let device = device();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2");
    let config = BnbQuantizationConfig {
        skip_modules: Some(vec!["lm_head".into(), "self_attn".into()]),
        ..BnbQuantizationConfig::nf4(Precision::F32)
    };
    let plain = load_and_quantize_model::<Llama>(&dir, &config, &options(), &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        device_map: Some(
            cachet_quant::DeviceMap::parse(
                r#"{"model.layers.0": "disk", "model.layers.1": "cpu"}"#,
            )
            .unwrap(),
        ),
        offload_folder: Some(tmp.path().to_path_buf()),
        ..options()
    };
    let offloaded = load_and_quantize_model::<Llama>(&dir, &config, &opts, &device).unwrap();
    let q = Checkpoint::open(
        tmp.path()
            .join("model.layers.0.self_attn.q_proj.safetensors"),
    )
    .unwrap();
    assert!(q.contains("model.layers.0.self_attn.q_proj.bias"));
    let ids = [4i64, 8, 15, 16, 23, 42];
    assert_eq!(
        logits(&offloaded.model, &ids, 2),
        logits(&plain.model, &ids, 2)
    );
}

/// The reference for a `keep_in_fp32_modules` projection, written out by hand: the f32 weight
/// in host memory, the activations read as f32, `x · Wᵀ` summed in f32, the result rounded to
/// the activations' dtype.
#[derive(Debug)]
struct HostF32Linear {
    weight: Vec<f32>,
    out: usize,
    inp: usize,
}

impl cachet_nn::LinearOp for HostF32Linear {
    fn forward(&self, x: Tensor<3>) -> cachet_nn::Result<Tensor<3>> {
        let (device, dtype) = (x.device(), x.dtype());
        let [b, s, _] = x.dims();
        let x: Vec<f32> = x.into_data().convert::<f32>().try_into_vec().unwrap();
        let mut y = vec![0.0f32; b * s * self.out];
        for (xr, yr) in x.chunks(self.inp).zip(y.chunks_mut(self.out)) {
            for (o, y) in yr.iter_mut().enumerate() {
                let w = &self.weight[o * self.inp..(o + 1) * self.inp];
                *y = w.iter().zip(xr).map(|(a, b)| a * b).sum();
            }
        }
        Ok(Tensor::<3>::from_data(
            TensorData::new(y, [b, s, self.out]),
            (&device, dtype),
        ))
    }
    fn in_features(&self) -> usize {
        self.inp
    }
    fn out_features(&self) -> usize {
        self.out
    }
    fn memory_bytes(&self) -> usize {
        self.weight.len() * 4
    }
}

/// Builds the reference model: the quantized layers of `q` as they are, `keep` projections as
/// [`HostF32Linear`] from the f32 source, everything else dense in the model's dtype.
struct ReferenceFactory<'a> {
    q: &'a cachet_quant::QuantizedModel<Llama>,
    keep: &'a str,
}

impl cachet_nn::LinearFactory for ReferenceFactory<'_> {
    fn build(
        &self,
        spec: &cachet_nn::LinearSpec,
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: burn::tensor::DType,
    ) -> cachet_nn::Result<cachet_nn::LinearLayer> {
        use cachet_nn::LinearLayer;
        use cachet_quant::QuantizedLinear;
        if spec.name.contains(self.keep) {
            return Ok(LinearLayer::custom(std::sync::Arc::new(HostF32Linear {
                weight: f32s(checkpoint, &format!("{}.weight", spec.name)),
                out: spec.out_features,
                inp: spec.in_features,
            })));
        }
        Ok(match self.q.layers.get(&spec.name) {
            Some(QuantizedLinear::FourBit(l, _)) => LinearLayer::custom(l.clone()),
            Some(QuantizedLinear::Int8(l)) => LinearLayer::custom(l.clone()),
            None => cachet_nn::DenseFactory.build(spec, checkpoint, device, dtype)?,
        })
    }
}

#[test]
fn keep_in_fp32_modules_are_f32_in_memory_in_the_saved_file_and_after_reload() {
    use burn::tensor::DType;
    let device = device();
    let tmp = tempfile::tempdir().unwrap();
    let ids = [5i64, 17, 99, 3, 200, 41];
    let bf16 = LoadOptions {
        torch_dtype: Some(Precision::BF16),
        ..LoadOptions::default()
    };
    let config = BnbQuantizationConfig {
        keep_in_fp32_modules: Some(vec!["down_proj".into()]),
        ..BnbQuantizationConfig::nf4(Precision::BF16)
    };
    let q = load_and_quantize_model::<Llama>(source(), &config, &bf16, &device).unwrap();
    let layers = q.model.layers.len();

    // In memory: every down_proj is an f32 layer, nothing else is.
    assert_eq!(q.fp32_modules.len(), layers);
    for (name, kept) in &q.fp32_modules {
        assert!(name.ends_with("mlp.down_proj"), "{name}");
        assert_eq!(kept.weight_dtype(), Some(DType::F32), "{name}");
        assert!(!q.layers.contains_key(name), "{name} is not quantized");
    }
    assert_eq!(
        q.layers.len(),
        layers * 6,
        "the other projections are 4-bit"
    );
    let embed = q.model.embed_tokens.dtype();
    assert_eq!(embed, DType::BF16, "the rest stays in torch_dtype");

    // Logits against the hand-written reference: close, and much closer than the same model
    // with down_proj in bf16 (so the f32 path is what runs).
    let source_ck = Checkpoint::open(source()).unwrap();
    let model_config = cachet_models::LlamaConfig::from_file(source().join("config.json")).unwrap();
    let reference = Llama::load_with(
        model_config.clone(),
        &source_ck,
        &device,
        Precision::BF16,
        &ReferenceFactory {
            q: &q,
            keep: "down_proj",
        },
    )
    .unwrap();
    let want = logits(&reference, &ids, 1);
    let got = logits(&q.model, &ids, 1);
    let in_bf16 = BnbQuantizationConfig {
        skip_modules: Some(vec!["lm_head".into(), "down_proj".into()]),
        ..BnbQuantizationConfig::nf4(Precision::BF16)
    };
    let q16 = load_and_quantize_model::<Llama>(source(), &in_bf16, &bf16, &device).unwrap();
    assert!(q16.fp32_modules.is_empty());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (d_kept, d_bf16) = (
        max_diff(&got, &want),
        max_diff(&logits(&q16.model, &ids, 1), &want),
    );
    eprintln!(
        "max |logit| {scale}: kept-in-f32 vs reference {d_kept}, down_proj in bf16 vs reference {d_bf16}"
    );
    assert!(d_kept <= 0.02 * scale, "{d_kept} vs scale {scale}");
    assert!(d_kept * 4.0 < d_bf16, "{d_kept} vs {d_bf16}");

    // Saved: the kept weights are f32 (the source's values bit for bit), the rest bf16, and
    // the config records the modules (and keeps transformers from quantizing them).
    let out = tmp.path().join("kept");
    q.save_pretrained(&out).unwrap();
    let saved = Checkpoint::open(&out).unwrap();
    for i in 0..layers {
        let name = format!("model.layers.{i}.mlp.down_proj.weight");
        assert_eq!(saved.info(&name).unwrap().dtype.name(), "F32", "{name}");
        assert!(
            saved.tensor_data(&name).unwrap().as_bytes()
                == source_ck.tensor_data(&name).unwrap().as_bytes(),
            "{name}"
        );
        let norm = format!("model.layers.{i}.input_layernorm.weight");
        assert_eq!(saved.info(&norm).unwrap().dtype.name(), "BF16");
    }
    let cfg = BnbQuantizationConfig::from_model_dir(&out)
        .unwrap()
        .expect("quantization_config");
    assert_eq!(
        cfg.keep_in_fp32_modules,
        Some(vec!["down_proj".to_string()])
    );
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let skip = &json["quantization_config"]["llm_int8_skip_modules"];
    assert_eq!(skip, &serde_json::json!(["lm_head", "down_proj"]));

    // Reloaded: f32 again, identical logits.
    let re = load_and_quantize_model::<Llama>(&out, &cfg, &bf16, &device).unwrap();
    assert_eq!(re.fp32_modules.len(), layers);
    for kept in re.fp32_modules.values() {
        assert_eq!(kept.weight_dtype(), Some(DType::F32));
    }
    assert_eq!(logits(&re.model, &ids, 1), got, "reload");
    let plain = load_pretrained::<Llama>(&out, &device, Precision::BF16).unwrap();
    assert_eq!(logits(&plain, &ids, 1), got, "load_pretrained");

    // Offloaded kept modules stay f32 too: on cpu, and on disk (written in f32).
    let folder = tmp.path().join("offload");
    let map = cachet_quant::DeviceMap::parse(
        r#"{"model.layers.0.mlp.down_proj": "cpu", "model.layers.1.mlp.down_proj": "disk"}"#,
    )
    .unwrap();
    let opts = LoadOptions {
        device_map: Some(map),
        offload_folder: Some(folder.clone()),
        ..bf16
    };
    let offloaded = load_and_quantize_model::<Llama>(source(), &config, &opts, &device).unwrap();
    assert_eq!(offloaded.fp32_modules.len(), layers);
    assert_eq!(logits(&offloaded.model, &ids, 1), got, "offloaded");
    let on_disk =
        Checkpoint::open(folder.join("model.layers.1.mlp.down_proj.safetensors")).unwrap();
    assert_eq!(
        on_disk
            .info("model.layers.1.mlp.down_proj.weight")
            .unwrap()
            .dtype
            .name(),
        "F32"
    );
}

#[test]
fn a_tied_lm_head_is_saved_once() {
    // A tied checkpoint that also stores lm_head.weight (some do): the saved checkpoint holds
    // the embeddings once, as transformers writes it, and reloads with the same logits.
    let device = device();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("tied");
    std::fs::create_dir_all(&src).unwrap();
    let text = std::fs::read_to_string(source().join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["tie_word_embeddings"] = serde_json::json!(true);
    std::fs::write(src.join("config.json"), json.to_string()).unwrap();
    let ck = Checkpoint::open(source()).unwrap();
    let mut tensors: Vec<(String, TensorData)> = ck
        .names()
        .into_iter()
        .map(|n| (n.to_string(), ck.tensor_data(n).unwrap()))
        .collect();
    if !ck.contains("lm_head.weight") {
        let embed = ck.tensor_data("model.embed_tokens.weight").unwrap();
        tensors.push(("lm_head.weight".into(), embed));
    }
    cachet_tensor::safetensors::save(src.join("model.safetensors"), &tensors, None).unwrap();
    for config in [
        BnbQuantizationConfig::int8(),
        BnbQuantizationConfig::nf4(Precision::F32),
    ] {
        let q = load_and_quantize_model::<Llama>(&src, &config, &options(), &device).unwrap();
        let out = tmp.path().join(format!("out-{}", config.load_in_8bit));
        q.save_pretrained(&out).unwrap();
        let saved = Checkpoint::open(&out).unwrap();
        assert!(!saved.contains("lm_head.weight"));
        assert!(saved.contains("model.embed_tokens.weight"));
        let ids = [5i64, 17, 99, 3];
        let re = load_pretrained::<Llama>(&out, &device, Precision::F32).unwrap();
        assert_eq!(logits(&re, &ids, 1), logits(&q.model, &ids, 1));
    }
}
