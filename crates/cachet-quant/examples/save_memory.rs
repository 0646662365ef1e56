//! Peak memory of `save_pretrained`, streamed (today) against one-shot (every output tensor
//! built, then one file written — what cachet did before), on a synthetic Llama.
//!
//! ```text
//! cargo run -p cachet-quant --example save_memory -- gen /tmp/synth 16
//! cargo run -p cachet-quant --example save_memory -- streamed /tmp/synth
//! cargo run -p cachet-quant --example save_memory -- oneshot /tmp/synth
//! cargo run --release -p cachet-quant --example save_memory -- gen-gpt2-xl /tmp/gpt2xl
//! cargo run --release -p cachet-quant --example save_memory -- size /tmp/gpt2xl 8
//! ```
//!
//! `gen DIR LAYERS` writes a random f32 checkpoint (hidden 1024, intermediate 2816, vocab
//! 32000). `gen-gpt2-xl DIR` writes a GPT2-XL stand-in (see `Shape::gpt2_xl`, 6.2 GB f32 in
//! 9 shards); `size DIR 8|4` quantizes it (LLM.int8, or NF4 + double quant; the rest in fp16),
//! saves it and prints the checkpoint sizes. The other modes quantize it to NF4 + double quant, reset the process's peak RSS
//! (`/proc/self/clear_refs`), save, and print the RSS before the save and its peak during it.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::TensorData;
use cachet_models::Llama;
use cachet_quant::{BnbQuantizationConfig, LoadOptions, QuantizedModel, load_and_quantize_model};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DeviceSpec, Precision, human_bytes};

fn status_kb(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Shape of a synthetic checkpoint.
struct Shape {
    hidden: usize,
    inter: usize,
    vocab: usize,
    heads: usize,
    layers: usize,
    tied: bool,
    /// Decoder layers per shard (0: one file).
    layers_per_shard: usize,
}

impl Shape {
    /// The 16-layer model of the save-memory measurements (1.08 GB f32).
    fn small(layers: usize) -> Self {
        Self {
            hidden: 1024,
            inter: 2816,
            vocab: 32000,
            heads: 16,
            layers,
            tied: false,
            layers_per_shard: 0,
        }
    }

    /// A GPT2-XL stand-in: GPT2-XL's width, depth and vocabulary (hidden 1600, 48 layers,
    /// vocab 50257, lm_head tied to the embeddings as GPT2 ties it), with a SwiGLU MLP of
    /// intermediate 4267 so its three matrices hold as many weights as GPT2's two 1600×6400
    /// ones: 1.555 B parameters (GPT2-XL: 1.558 B, of which 1.6 M position embeddings).
    fn gpt2_xl() -> Self {
        Self {
            hidden: 1600,
            inter: 4267,
            vocab: 50257,
            heads: 25,
            layers: 48,
            tied: true,
            layers_per_shard: 6,
        }
    }
}

fn generate(dir: &Path, shape: &Shape) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let Shape {
        hidden,
        inter,
        vocab,
        heads,
        layers,
        tied,
        layers_per_shard,
    } = *shape;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": hidden / heads,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": tied, "hidden_act": "silu",
        "attention_bias": false, "mlp_bias": false, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
            })
            .collect()
    };
    // Tensors grouped by shard: the embeddings (and lm_head, final norm) first, then
    // `layers_per_shard` decoder layers per shard (everything in one group when 0).
    let mut groups: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    groups[0].push(("model.embed_tokens.weight".into(), vec![vocab, hidden]));
    if !tied {
        groups[0].push(("lm_head.weight".into(), vec![vocab, hidden]));
    }
    groups[0].push(("model.norm.weight".into(), vec![hidden]));
    for i in 0..layers {
        if layers_per_shard > 0 && i % layers_per_shard == 0 {
            groups.push(Vec::new());
        }
        let g = groups.last_mut().expect("a group");
        let p = format!("model.layers.{i}");
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            g.push((format!("{p}.self_attn.{m}.weight"), vec![hidden, hidden]));
        }
        g.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        g.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        g.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
        g.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        g.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
    }
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    let mut params = 0usize;
    for (k, group) in groups.into_iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let mut tensors = Vec::new();
        for (name, shape) in group {
            let count: usize = shape.iter().product();
            params += count;
            total += count * 4;
            weight_map.insert(name.clone(), serde_json::json!(file));
            tensors.push((name, TensorData::new(random(count), shape)));
        }
        cachet_tensor::safetensors::save(dir.join(&file), &tensors, None)?;
        println!("wrote {file}");
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?,
        )?;
    }
    println!(
        "wrote {}: {params} parameters, {} of f32 weights in {n} file(s)",
        dir.display(),
        human_bytes(total as u64)
    );
    Ok(())
}

/// Quantizes `dir` to `bits` (8: LLM.int8; 4: NF4 + double quant), floating-point parts in
/// fp16 as transformers users load them, saves it and reports the sizes.
fn measure_size(dir: &Path, bits: u32) -> anyhow::Result<()> {
    let device = DeviceSpec::Cpu.init()?;
    let config = if bits == 8 {
        BnbQuantizationConfig::int8()
    } else {
        BnbQuantizationConfig::nf4(Precision::F16)
    };
    let options = LoadOptions {
        torch_dtype: Some(Precision::F16),
        ..LoadOptions::default()
    };
    let source = Checkpoint::open(dir)?.total_bytes();
    let start = std::time::Instant::now();
    let q = load_and_quantize_model::<Llama>(dir, &config, &options, &device)?;
    let quantized = start.elapsed().as_secs_f64();
    let rss = status_kb("VmHWM:") * 1024;
    let out = dir.with_extension(format!("out-{bits}bit"));
    let _ = std::fs::remove_dir_all(&out);
    let start = std::time::Instant::now();
    q.save_pretrained(&out)?;
    let saved = start.elapsed().as_secs_f64();
    let mut written = 0u64;
    let mut weights = 0u64;
    let mut files = Vec::new();
    for e in std::fs::read_dir(&out)? {
        let e = e?;
        let len = e.metadata()?.len();
        written += len;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            weights += len;
        }
        files.push(name);
    }
    files.sort();
    let ck = Checkpoint::open(&out)?;
    println!(
        "{bits}-bit: source {} ({source} B) -> in memory {} ({} B), saved weights {} ({weights} B, {} in all), files {files:?}; lm_head.weight saved: {}; quantize {quantized:.1} s, save {saved:.1} s, peak RSS while quantizing {}",
        human_bytes(source),
        human_bytes(q.memory_bytes() as u64),
        q.memory_bytes(),
        human_bytes(weights),
        human_bytes(written),
        ck.contains("lm_head.weight"),
        human_bytes(rss),
    );
    Ok(())
}

/// The one-shot writer cachet used before saving was streamed.
fn one_shot(q: &QuantizedModel<Llama>, out: &Path) -> anyhow::Result<()> {
    let ck = Checkpoint::open(&q.source)?;
    let owned = |name: &str| {
        q.layers.keys().any(|p| {
            name.strip_prefix(p.as_str())
                .is_some_and(|rest| rest.starts_with(".weight") || rest == ".SCB")
        })
    };
    let mut tensors = Vec::new();
    for name in ck.names() {
        if !owned(name) {
            tensors.push((name.to_string(), ck.tensor_data(name)?));
        }
    }
    for (prefix, layer) in &q.layers {
        tensors.extend(layer.tensors(prefix)?);
    }
    std::fs::create_dir_all(out)?;
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    cachet_tensor::safetensors::save(out.join("model.safetensors"), &tensors, Some(&metadata))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("streamed", String::as_str);
    let dir = Path::new(args.get(2).map_or("/tmp/cachet-synth", String::as_str));
    match mode {
        "gen" => {
            let layers = args.get(3).map_or(Ok(16), |s| s.parse())?;
            return generate(dir, &Shape::small(layers));
        }
        "gen-gpt2-xl" => return generate(dir, &Shape::gpt2_xl()),
        "size" => {
            let bits = args.get(3).map_or(Ok(8), |s| s.parse())?;
            return measure_size(dir, bits);
        }
        _ => {}
    }
    let device = DeviceSpec::Cpu.init()?;
    let options = LoadOptions {
        torch_dtype: Some(Precision::F32),
        ..LoadOptions::default()
    };
    let q = load_and_quantize_model::<Llama>(
        dir,
        &BnbQuantizationConfig::nf4(Precision::F32),
        &options,
        &device,
    )?;
    let out = dir.with_extension(format!("out-{mode}"));
    let _ = std::fs::remove_dir_all(&out);
    // Reset VmHWM to the current RSS, so the peak below is the save's own.
    std::fs::write("/proc/self/clear_refs", "5")?;
    let before = status_kb("VmRSS:") * 1024;
    let start = std::time::Instant::now();
    match mode {
        "oneshot" => one_shot(&q, &out)?,
        _ => q.save_pretrained(&out)?,
    }
    let peak = status_kb("VmHWM:") * 1024;
    let written: u64 = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "{mode}: wrote {} in {:.2} s; RSS before save {}, peak during save {} (+{})",
        human_bytes(written),
        start.elapsed().as_secs_f64(),
        human_bytes(before),
        human_bytes(peak),
        human_bytes(peak.saturating_sub(before))
    );
    Ok(())
}
