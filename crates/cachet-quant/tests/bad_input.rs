//! Bad input gives clear typed errors that name the tensor, option or module.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use cachet_models::Llama;
use cachet_quant::serialize::{read_four_bit, read_int8};
use cachet_quant::{
    BnbQuantizationConfig, DeviceMap, LoadOptions, QuantError, QuantType, load_and_quantize_model,
    quantize_4bit, quantize_blockwise,
};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DeviceSpec, Precision};

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama")
}

fn nf4_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-nf4-dq")
}

fn options() -> LoadOptions {
    LoadOptions {
        torch_dtype: Some(Precision::F32),
        ..LoadOptions::default()
    }
}

#[test]
fn blocksizes_out_of_range_or_not_powers_of_two() {
    let x = vec![0.5f32; 256];
    for bs in [0, 16, 48, 100, 8192] {
        let err = quantize_4bit("w", &x, &[256], bs, QuantType::Nf4, false).unwrap_err();
        assert!(
            matches!(err, QuantError::InvalidBlocksize { blocksize, .. } if blocksize == bs),
            "{err}"
        );
    }
    assert!(matches!(
        quantize_blockwise("w", &x, 100),
        Err(QuantError::InvalidBlocksize { .. })
    ));
    let config = BnbQuantizationConfig {
        bnb_4bit_blocksize: 96,
        ..BnbQuantizationConfig::nf4(Precision::F32)
    };
    let err = config.validate("test").unwrap_err();
    assert!(err.to_string().contains("96"), "{err}");
}

#[test]
fn non_finite_values_are_refused_by_name() {
    let mut x = vec![0.1f32; 128];
    x[77] = f32::NAN;
    let err = quantize_4bit("layer.weight", &x, &[2, 64], 64, QuantType::Fp4, true).unwrap_err();
    assert!(
        matches!(&err, QuantError::NonFinite { tensor, index: 77, .. } if tensor == "layer.weight"),
        "{err}"
    );
}

#[test]
fn config_errors() {
    let both = BnbQuantizationConfig {
        load_in_4bit: true,
        load_in_8bit: true,
        ..Default::default()
    };
    assert!(
        both.validate("x")
            .unwrap_err()
            .to_string()
            .contains("both true")
    );
    assert!(
        BnbQuantizationConfig::default()
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("both false")
    );
    let bad_type = BnbQuantizationConfig {
        bnb_4bit_quant_type: "int4".into(),
        ..BnbQuantizationConfig::nf4(Precision::F32)
    };
    assert!(
        bad_type
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("int4")
    );
    let bad_dtype = BnbQuantizationConfig {
        bnb_4bit_compute_dtype: "fp8".into(),
        ..BnbQuantizationConfig::nf4(Precision::F32)
    };
    assert!(
        bad_dtype
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("fp8")
    );
    let json = serde_json::json!({"quant_method": "gptq", "bits": 4});
    assert!(
        BnbQuantizationConfig::from_transformers(&json, "cfg")
            .unwrap_err()
            .to_string()
            .contains("gptq")
    );
}

/// Writes a copy of the nf4 fixture with `edit` applied to its tensors.
fn tampered(edit: impl Fn(&str, TensorData) -> Option<TensorData>) -> tempfile::TempDir {
    let ck = Checkpoint::open(nf4_fixture()).unwrap();
    let tensors: Vec<(String, TensorData)> = ck
        .names()
        .into_iter()
        .filter_map(|n| edit(n, ck.tensor_data(n).unwrap()).map(|d| (n.to_string(), d)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    cachet_tensor::safetensors::save(dir.path().join("model.safetensors"), &tensors, None).unwrap();
    std::fs::copy(
        nf4_fixture().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

const Q: &str = "model.layers.0.self_attn.q_proj";

#[test]
fn quant_state_json_that_disagrees_with_shapes() {
    let dir = tampered(|name, data| {
        if name == format!("{Q}.weight.quant_state.bitsandbytes__nf4") {
            let text = String::from_utf8(data.as_bytes().to_vec())
                .unwrap()
                .replace("[64, 64]", "[64, 32]");
            let len = text.len();
            Some(TensorData::from_bytes_vec(
                text.into_bytes(),
                vec![len],
                DType::U8,
            ))
        } else {
            Some(data)
        }
    });
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = read_four_bit(&ck, Q, QuantType::Nf4, [64, 64]).unwrap_err();
    assert!(matches!(err, QuantError::InconsistentState { .. }), "{err}");
    assert!(err.to_string().contains("[64, 32]"), "{err}");
    // And through the model loader.
    let err = cachet_quant::load_pretrained::<Llama>(
        dir.path(),
        &DeviceSpec::Cpu.init().unwrap(),
        Precision::F32,
    )
    .unwrap_err();
    assert!(err.to_string().contains(Q), "{err}");
}

#[test]
fn truncated_nested_statistics() {
    let dir = tampered(|name, data| {
        if name == format!("{Q}.weight.absmax") {
            let bytes = data.as_bytes()[..10].to_vec();
            Some(TensorData::from_bytes_vec(bytes, vec![10], DType::U8))
        } else {
            Some(data)
        }
    });
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = read_four_bit(&ck, Q, QuantType::Nf4, [64, 64]).unwrap_err();
    assert!(err.to_string().contains("absmax"), "{err}");
    let dir = tampered(|name, data| (name != format!("{Q}.weight.nested_absmax")).then_some(data));
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = read_four_bit(&ck, Q, QuantType::Nf4, [64, 64]).unwrap_err();
    assert!(err.to_string().contains("nested_absmax"), "{err}");
}

#[test]
fn int8_weight_of_the_wrong_dtype_or_shape() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-int8");
    let ck = Checkpoint::open(&fixture).unwrap();
    let err = read_int8(&ck, Q, [64, 32]).unwrap_err();
    assert!(err.to_string().contains("[64, 32]"), "{err}");
    let err = read_int8(&ck, "model.layers.0.input_layernorm", [64, 64]).unwrap_err();
    assert!(err.to_string().contains("input_layernorm"), "{err}");
}

#[test]
fn unquantizable_dtype_is_refused() {
    // An integer tensor where a float weight should be.
    let ck = Checkpoint::open(source()).unwrap();
    let tensors: Vec<(String, TensorData)> = ck
        .names()
        .into_iter()
        .map(|n| {
            let data = ck.tensor_data(n).unwrap();
            if n == format!("{Q}.weight") {
                let ints: Vec<i32> = vec![1; 64 * 64];
                (n.to_string(), TensorData::new(ints, [64, 64]))
            } else {
                (n.to_string(), data)
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    cachet_tensor::safetensors::save(dir.path().join("model.safetensors"), &tensors, None).unwrap();
    std::fs::copy(source().join("config.json"), dir.path().join("config.json")).unwrap();
    let err = load_and_quantize_model::<Llama>(
        dir.path(),
        &BnbQuantizationConfig::nf4(Precision::F32),
        &options(),
        &DeviceSpec::Cpu.init().unwrap(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("{Q}.weight")) && text.contains("I32"),
        "{text}"
    );
}

#[test]
fn device_map_with_unknown_modules_or_bad_offload_folder() {
    let device = DeviceSpec::Cpu.init().unwrap();
    let config = BnbQuantizationConfig::nf4(Precision::F32);
    let map = DeviceMap::parse(r#"{"model.layers": "cpu", "transformer.h": "disk"}"#).unwrap();
    let opts = LoadOptions {
        device_map: Some(map),
        ..options()
    };
    let err = load_and_quantize_model::<Llama>(source(), &config, &opts, &device).unwrap_err();
    assert!(
        matches!(err, QuantError::DeviceMap { .. }) && err.to_string().contains("transformer.h"),
        "{err}"
    );
    assert!(DeviceMap::parse(r#"{"lm_head": "tpu-but-number", "x": []}"#).is_err());
    // A disk offload folder under a regular file cannot be created.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let opts = LoadOptions {
        device_map: Some(DeviceMap::parse(r#"{"model.layers.1": "disk"}"#).unwrap()),
        offload_folder: Some(file.join("offload")),
        ..options()
    };
    let err = load_and_quantize_model::<Llama>(source(), &config, &opts, &device).unwrap_err();
    assert!(matches!(err, QuantError::OffloadFolder { .. }), "{err}");
    // Disk without a folder.
    let opts = LoadOptions {
        device_map: Some(DeviceMap::parse(r#"{"model.layers.1": "disk"}"#).unwrap()),
        ..options()
    };
    assert!(matches!(
        load_and_quantize_model::<Llama>(source(), &config, &opts, &device),
        Err(QuantError::DeviceMap { .. })
    ));
}

#[test]
fn failed_save_leaves_nothing_behind() {
    let device = DeviceSpec::Cpu.init().unwrap();
    let q = load_and_quantize_model::<Llama>(
        source(),
        &BnbQuantizationConfig::nf4(Precision::F32),
        &options(),
        &device,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // The target exists as a file: creating the directory fails after staging.
    let entries = || -> Vec<String> {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let target = tmp.path().join("out");
    std::fs::write(&target, b"occupied").unwrap();
    assert!(q.save_pretrained(&target).is_err());
    let names = entries();
    assert_eq!(
        names,
        vec!["out".to_string()],
        "staging directory left behind"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"occupied");
    // The same with several shards being written.
    let opts = cachet_quant::SaveOptions {
        max_shard_size: 20_000,
    };
    assert!(q.save_pretrained_with(&target, &opts).is_err());
    let names = entries();
    assert_eq!(
        names,
        vec!["out".to_string()],
        "sharded staging left behind"
    );
    // A shard size that is not one.
    for bad in ["5 gigs", "1.5GB", "0"] {
        let err = cachet_quant::parse_shard_size(bad).unwrap_err();
        assert!(err.to_string().contains("max_shard_size"), "{err}");
    }
}

#[test]
fn a_quant_map_other_than_the_built_in_table_is_refused() {
    let dir = tampered(|name, data| {
        if name == format!("{Q}.weight.quant_map") {
            let mut values = data.try_to_vec::<f32>().unwrap();
            values[3] += 0.01;
            Some(TensorData::new(values, vec![16]))
        } else {
            Some(data)
        }
    });
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = read_four_bit(&ck, Q, QuantType::Nf4, [64, 64]).unwrap_err();
    assert!(matches!(err, QuantError::InconsistentState { .. }), "{err}");
    assert!(
        err.to_string().contains("quant_map") && err.to_string().contains("value 3"),
        "{err}"
    );
}

/// The tiny Llama quantized with `config`, the modules of `map` offloaded to a fresh folder
/// (returned with the model: the layers map their files from it).
fn offloaded(
    config: &BnbQuantizationConfig,
    map: &str,
) -> (cachet_quant::QuantizedModel<Llama>, tempfile::TempDir) {
    let device = DeviceSpec::Cpu.init().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        device_map: Some(DeviceMap::parse(map).unwrap()),
        offload_folder: Some(tmp.path().to_path_buf()),
        ..options()
    };
    let q = load_and_quantize_model::<Llama>(source(), config, &opts, &device).unwrap();
    (q, tmp)
}

#[test]
fn a_truncated_disk_offloaded_layer_is_a_typed_error_naming_its_file() {
    let layer = r#"{"model.layers.1": "disk"}"#;
    // 4-bit and int8 disk layers, and a dense one (lm_head is never quantized).
    for (config, map, module) in [
        (
            BnbQuantizationConfig::nf4(Precision::F32),
            layer,
            "model.layers.1.mlp.down_proj",
        ),
        (
            BnbQuantizationConfig::int8(),
            layer,
            "model.layers.1.self_attn.q_proj",
        ),
        (
            BnbQuantizationConfig::nf4(Precision::F32),
            r#"{"lm_head": "disk"}"#,
            "lm_head",
        ),
    ] {
        let (q, tmp) = offloaded(&config, map);
        let prompt = vec![vec![1u32, 20, 30]];
        let greedy = cachet_models::GenerationConfig::greedy(3);
        assert!(cachet_models::generate(&q.model, &prompt, &greedy, None).is_ok());
        // Truncated after load, while the model maps it.
        let file = tmp.path().join(format!("{module}.safetensors"));
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let err = cachet_models::generate(&q.model, &prompt, &greedy, None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&file.display().to_string()), "{text}");
        assert!(text.contains("truncated"), "{text}");
        // The layer's own typed error travelled through the model.
        assert!(
            matches!(
                QuantError::from(err),
                QuantError::OffloadedFile { module: m, path, .. } if m == module && path == file
            ),
            "{text}"
        );
        // Removed: accelerate reads the file again on every use, and so does the check.
        std::fs::remove_file(&file).unwrap();
        let err = cachet_models::generate(&q.model, &prompt, &greedy, None).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }
}

#[test]
fn a_damaged_disk_offloaded_layer_is_a_typed_error_naming_its_file() {
    let (q, tmp) = offloaded(
        &BnbQuantizationConfig::nf4(Precision::F32),
        r#"{"model.layers.1": "disk"}"#,
    );
    let module = "model.layers.1.mlp.up_proj";
    let file = tmp.path().join(format!("{module}.safetensors"));
    // Overwrite the quant-state JSON in place (same length, so only the bytes change).
    let state = format!("{module}.weight.quant_state.bitsandbytes__nf4");
    let (begin, end) = Checkpoint::open(&file)
        .unwrap()
        .info(&state)
        .unwrap()
        .data_offsets;
    let mut bytes = std::fs::read(&file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header + begin..8 + header + end].fill(b'!');
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&bytes).unwrap();
    }
    let device = q.model.device();
    let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
        TensorData::new(vec![7i64, 3, 250], [1, 3]),
        &device,
    );
    let err = q.model.forward(ids, None, None).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&file.display().to_string()), "{text}");
    assert!(text.contains(&state) && text.contains("not JSON"), "{text}");
    assert!(
        matches!(QuantError::from(err), QuantError::OffloadedFile { module: m, .. } if m == module),
        "{text}"
    );
}
