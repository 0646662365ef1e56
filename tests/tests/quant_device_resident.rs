//! The device-resident form of `Linear4bit` / `Linear8bitLt` (weights packed on the compute
//! device, forward by tensor ops) against the host form (host kernels). On `flex` the
//! device-resident form is forced onto the CPU device; built with `--features wgpu` the same
//! tests run on the wgpu device (`SKIPPED:` when no adapter initialises), where it is the form
//! the loaders pick by themselves.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Int, Tensor, TensorData};
use cachet_integration_tests::test_device;
use cachet_models::Llama;
use cachet_nn::LinearOp;
use cachet_quant::{
    AbsMax, BnbQuantizationConfig, DeviceMap, Int8Weight, Linear4bit, Linear8bitLt, LoadOptions,
    QuantType, QuantizedLinear, WeightResidence, load_and_quantize_model_with, quantize_4bit,
};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{Device, MemoryFootprint, Precision, is_host_device};

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn read(t: Tensor<3>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// max |a - b| over max |b|.
fn relative(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// Compares `got` with `want` (both rounded to `p`): within 1e-5 relative, except that an
/// output whose f32 sum sits on a rounding boundary of a half type may land one unit in the
/// last place of `p` away (the f32 sums agree within 1e-5; a few outputs may round apart).
fn assert_close(got: &[f32], want: &[f32], p: Precision, what: &str) {
    let rel = relative(got, want);
    if p == Precision::F32 {
        assert!(rel <= 1e-5, "{what}: relative difference {rel}");
        return;
    }
    let ulp = if p == Precision::F16 {
        1.0 / 1024.0
    } else {
        1.0 / 128.0
    };
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut off = 0;
    for (g, w) in got.iter().zip(want) {
        let d = (g - w).abs();
        if d > 1e-5 * scale {
            off += 1;
            assert!(d <= ulp * w.abs().max(g.abs()), "{what}: {g} vs {w}");
        }
    }
    assert!(
        off <= 1 + got.len() / 20,
        "{what}: {off} of {} outputs differ",
        got.len()
    );
}

fn activations(rows: usize, k: usize, seed: u64, device: &Device, dtype: DType) -> Tensor<3> {
    let x = values(rows * k, seed);
    Tensor::<3>::from_data(TensorData::new(x, [1, rows, k]), (device, DType::F32)).cast(dtype)
}

/// The compute dtypes `device` runs; a layer asked to compute in another one on the device
/// gets a typed error (the loaders then keep it in host form).
fn half_dtypes(device: &Device) -> Vec<Precision> {
    let q = quantize_4bit("w", &values(64, 1), &[1, 64], 64, QuantType::Nf4, false).unwrap();
    [Precision::F32, Precision::F16, Precision::BF16]
        .into_iter()
        .filter(|&p| {
            let supported = cachet_tensor::supports_dtype(device, p);
            if !supported {
                eprintln!("SKIPPED: compute dtype {p:?} on {device:?}, which lacks it");
                let err = Linear4bit::new(q.clone(), None, p, Precision::F32)
                    .to_device_resident(device)
                    .unwrap_err();
                assert!(
                    matches!(&err, cachet_quant::QuantError::Tensor(_)),
                    "{err:?}"
                );
            }
            supported
        })
        .collect()
}

#[test]
fn four_bit_device_resident_forward_equals_the_host_path() {
    let Some(device) = test_device() else { return };
    // k = 100 and 99: blocks of 64 and packed words straddle rows; 37 × 99 is odd (a half
    // byte at the end).
    let shapes = [(37usize, 100usize, 64usize), (37, 99, 32), (8, 256, 128)];
    let dtypes = half_dtypes(&device);
    let mut cases = 0;
    for (n, k, blocksize) in shapes {
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for double_quant in [false, true] {
                let w = values(n * k, (n * k + blocksize) as u64);
                let q =
                    quantize_4bit("w", &w, &[n, k], blocksize, quant_type, double_quant).unwrap();
                for &compute in &dtypes {
                    for bias in [false, true] {
                        let b = bias.then(|| values(n, 7));
                        let host = Linear4bit::new(q.clone(), b, compute, Precision::F32);
                        for tile_bytes in [1usize, k * 16 * 5, cachet_quant::DEFAULT_TILE_BYTES] {
                            let resident =
                                host.to_device_resident_with(&device, tile_bytes).unwrap();
                            assert!(resident.is_device_resident());
                            for rows in [1usize, 5] {
                                for x_dtype in [DType::F32, compute.dtype()] {
                                    let x = activations(rows, k, rows as u64 + 3, &device, x_dtype);
                                    let want = host.forward(x.clone()).unwrap();
                                    let got = resident.forward(x).unwrap();
                                    assert_eq!(got.dtype(), x_dtype);
                                    assert_eq!(got.dims(), [1, rows, n]);
                                    let what = format!(
                                        "{quant_type:?} dq={double_quant} [{n},{k}] bs={blocksize} {compute:?} bias={bias} tile={tile_bytes} rows={rows} x={x_dtype:?}"
                                    );
                                    assert_close(&read(got), &read(want), compute, &what);
                                    cases += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("{cases} 4-bit cases compared");
}

#[test]
fn int8_device_resident_forward_equals_the_host_path() {
    let Some(device) = test_device() else { return };
    // k = 70: CB words straddle rows.
    for (n, k) in [(33usize, 70usize), (16, 128)] {
        let w: Vec<f32> = values(n * k, 11).iter().map(|v| v * 0.2).collect();
        let weight = Int8Weight::quantize("w", &w, n, k).unwrap();
        for threshold in [0.0f32, 6.0] {
            for bias in [false, true] {
                let b = bias.then(|| values(n, 5));
                let host = Linear8bitLt::new(weight.clone(), b, threshold);
                for tile_bytes in [1usize, k * 16 * 4, cachet_quant::DEFAULT_TILE_BYTES] {
                    let resident = host.to_device_resident_with(&device, tile_bytes).unwrap();
                    for rows in [1usize, 4] {
                        // Columns 3 and 40 hold outliers (|x| ≥ 6) in some rows, and row 0 a
                        // value just under the threshold.
                        let mut x: Vec<f32> = values(rows * k, 9).iter().map(|v| v * 3.0).collect();
                        x[3] = 7.5;
                        x[(rows - 1) * k + 40] = -6.0;
                        x[10] = 5.99;
                        let xt = Tensor::<3>::from_data(TensorData::new(x, [1, rows, k]), &device);
                        let want = read(host.forward(xt.clone()).unwrap());
                        let got = read(resident.forward(xt).unwrap());
                        let rel = relative(&got, &want);
                        assert!(
                            rel <= 1e-5,
                            "int8 [{n},{k}] threshold={threshold} bias={bias} tile={tile_bytes} rows={rows}: {rel}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn reading_back_is_bit_identical_and_memory_is_counted_on_the_device() {
    let Some(device) = test_device() else { return };
    for double_quant in [false, true] {
        let (n, k) = (37, 99);
        let q = quantize_4bit(
            "w",
            &values(n * k, 3),
            &[n, k],
            64,
            QuantType::Nf4,
            double_quant,
        )
        .unwrap();
        let host = Linear4bit::new(
            q.clone(),
            Some(values(n, 1)),
            Precision::F32,
            Precision::F16,
        );
        let resident = host.to_device_resident(&device).unwrap();
        // Debug shows metadata, never the (device) weights.
        let debug = format!("{resident:?}");
        assert!(
            debug.contains("Resident4bit") && debug.len() < 400,
            "{debug}"
        );
        let back = resident.host_copy().unwrap();
        assert_eq!(back.weight, q);
        assert_eq!(back.bias, host.host().unwrap().bias);
        assert_eq!(back.weight_dtype, Precision::F16);
        // Device bytes: 8 codes per i32 word, scales as stored, the 16-entry code, the bias.
        let words = (n * k).div_ceil(8) * 4;
        let scales = match &q.absmax {
            AbsMax::Plain(a) => a.len() * 4,
            AbsMax::Nested(nq) => {
                nq.quantized.len().div_ceil(4) * 4 + nq.absmax.len() * 4 + nq.code.len() * 4
            }
        };
        assert_eq!(
            LinearOp::memory_bytes(&resident),
            words + scales + 16 * 4 + n * 4
        );
        // Within a few bytes of the host form's count (padding of the last word, the code
        // table, the nested offset held as metadata).
        let host_bytes = LinearOp::memory_bytes(&host) as i64;
        assert!((LinearOp::memory_bytes(&resident) as i64 - host_bytes).abs() <= 3 + 64 + 4);
    }
    let (n, k) = (33, 70);
    let weight = Int8Weight::quantize("w", &values(n * k, 2), n, k).unwrap();
    let host = Linear8bitLt::new(weight.clone(), None, 6.0);
    let resident = host.to_device_resident(&device).unwrap();
    assert_eq!(resident.host_copy().unwrap().weight, weight);
    assert_eq!(resident.threshold(), 6.0);
    assert_eq!(
        LinearOp::memory_bytes(&resident),
        (n * k).div_ceil(4) * 4 + n * 4
    );
    assert_eq!(
        LinearOp::memory_bytes(&resident),
        LinearOp::memory_bytes(&host) + 2
    );
}

/// A user's own module holding the quantized layers.
#[derive(Module, Debug)]
struct Mlp {
    up: Linear4bit,
    down: Linear8bitLt,
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> cachet_quant::Result<Tensor<3>> {
        self.down
            .forward(burn::tensor::activation::relu(self.up.forward(x)?))
    }
}

#[test]
fn quantized_layers_embed_in_user_modules() {
    let Some(device) = test_device() else { return };
    let (d, h) = (64, 96);
    let up = quantize_4bit("up", &values(h * d, 1), &[h, d], 64, QuantType::Nf4, true).unwrap();
    let down = Int8Weight::quantize("down", &values(d * h, 2), d, h).unwrap();
    let host = Mlp {
        up: Linear4bit::new(up, None, Precision::F32, Precision::F32),
        down: Linear8bitLt::new(down, Some(values(d, 3)), 0.0),
    };
    let resident = Mlp {
        up: host.up.to_device_resident(&device).unwrap(),
        down: host.down.to_device_resident(&device).unwrap(),
    };
    let x = activations(3, d, 4, &device, DType::F32);
    let want = read(host.forward(x.clone()).unwrap());
    // Module machinery: clone, valid, display all work on the user's struct.
    let copy = resident.clone().valid();
    assert!(format!("{copy}").contains("Mlp"));
    let got = read(copy.forward(x).unwrap());
    let rel = relative(&got, &want);
    assert!(rel <= 1e-5, "user module: {rel}");
    // Forms convert both ways.
    let back = resident.up.to_host_form().unwrap();
    assert!(!back.is_device_resident());
    let picked = back
        .clone()
        .for_device(&device, WeightResidence::Auto)
        .unwrap();
    assert_ne!(picked.is_device_resident(), is_host_device(&device));
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/cachet-quant/tests/fixtures")
}

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama")
}

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

fn greedy(model: &Llama, prompt: &[i64], n: usize) -> Vec<i64> {
    let device = model.device();
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let input =
            Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device);
        let logits = model.forward(input, None, None).unwrap();
        let [_, s, v] = logits.dims();
        let last = read(logits.slice([0..1, s - 1..s, 0..v]));
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

#[test]
fn tiny_llama_device_resident_gives_the_host_forms_greedy_tokens_and_saves_the_same_bytes() {
    let Some(device) = test_device() else { return };
    let options = LoadOptions {
        torch_dtype: Some(Precision::F32),
        ..LoadOptions::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    for (name, config) in variants() {
        let reference =
            Checkpoint::open(fixtures().join(name).join("reference.safetensors")).unwrap();
        let ints = |key: &str| {
            reference
                .tensor_data(key)
                .unwrap()
                .try_into_vec::<i64>()
                .unwrap()
        };
        let (prompt, golden) = (ints("g.prompt_ids"), ints("g.tokens"));
        let load = |residence| {
            load_and_quantize_model_with::<Llama>(source(), &config, &options, &device, residence)
                .unwrap()
        };
        let host = load(WeightResidence::Host);
        let resident = load(WeightResidence::Device);
        assert!(
            resident
                .layers
                .values()
                .all(QuantizedLinear::is_device_resident)
        );
        assert!(
            !host
                .layers
                .values()
                .any(QuantizedLinear::is_device_resident)
        );
        // The default picks by device: on the device on a GPU, host memory on the host.
        let auto = load(WeightResidence::Auto);
        assert!(
            auto.layers
                .values()
                .all(|l| l.is_device_resident() != is_host_device(&device))
        );
        let tokens = greedy(&resident.model, &prompt, golden.len());
        assert_eq!(tokens, greedy(&host.model, &prompt, golden.len()), "{name}");
        assert_eq!(tokens, golden, "{name}: transformers + bitsandbytes tokens");
        // Memory: the same up to word padding and the per-layer code tables.
        let (a, b) = (host.memory_bytes() as i64, resident.memory_bytes() as i64);
        assert!((a - b).abs() <= 14 * (3 + 64 + 4), "{name}: {a} vs {b}");
        // Saving reads the weights back: the files are byte-identical.
        host.save_pretrained(tmp.path().join(format!("{name}-host")))
            .unwrap();
        resident
            .save_pretrained(tmp.path().join(format!("{name}-device")))
            .unwrap();
        let file = |form: &str| {
            std::fs::read(tmp.path().join(format!("{name}-{form}/model.safetensors"))).unwrap()
        };
        assert!(file("host") == file("device"), "{name}: saved bytes differ");
        // The model-level memory footprint sees the device bytes through the seam.
        let q0 = resident.model.layers[0].self_attn.q_proj.memory_bytes();
        assert!(q0 > 0);
    }
}

#[test]
fn cpu_placed_layers_keep_the_host_form_next_to_device_resident_ones() {
    let Some(device) = test_device() else { return };
    let options = LoadOptions {
        torch_dtype: Some(Precision::F32),
        device_map: Some(DeviceMap::parse(r#"{"model.layers.0": "cpu", "": 0}"#).unwrap()),
        ..LoadOptions::default()
    };
    let config = variants().remove(0).1;
    let mixed = load_and_quantize_model_with::<Llama>(
        source(),
        &config,
        &options,
        &device,
        WeightResidence::Device,
    )
    .unwrap();
    for (name, layer) in &mixed.layers {
        let on_cpu = name.starts_with("model.layers.0.");
        assert_eq!(layer.is_device_resident(), !on_cpu, "{name}");
    }
    let host = load_and_quantize_model_with::<Llama>(
        source(),
        &config,
        &LoadOptions {
            torch_dtype: Some(Precision::F32),
            ..LoadOptions::default()
        },
        &device,
        WeightResidence::Host,
    )
    .unwrap();
    let prompt = [5i64, 17, 99, 3];
    assert_eq!(
        greedy(&mixed.model, &prompt, 6),
        greedy(&host.model, &prompt, 6)
    );
}

#[test]
fn a_compute_dtype_the_device_lacks_keeps_the_host_form() {
    let Some(device) = test_device() else { return };
    let mut config = variants().remove(0).1;
    config.bnb_4bit_compute_dtype = "bf16".into();
    let options = LoadOptions {
        torch_dtype: Some(Precision::F32),
        ..LoadOptions::default()
    };
    let q = load_and_quantize_model_with::<Llama>(
        source(),
        &config,
        &options,
        &device,
        WeightResidence::Device,
    )
    .unwrap();
    let supported = cachet_tensor::supports_dtype(&device, Precision::BF16);
    for (name, layer) in &q.layers {
        assert_eq!(layer.is_device_resident(), supported, "{name}");
    }
    let prompt = [5i64, 17, 99, 3];
    assert_eq!(greedy(&q.model, &prompt, 4).len(), 4);
}
