//! Peak memory of `save_pretrained`, streamed (today) against one-shot (every output tensor
//! built, then one file written — what cachet did before), on a synthetic Llama.
//!
//! ```text
//! cargo run -p cachet-quant --example save_memory -- gen /tmp/synth 16
//! cargo run -p cachet-quant --example save_memory -- streamed /tmp/synth
//! cargo run -p cachet-quant --example save_memory -- oneshot /tmp/synth
//! ```
//!
//! `gen DIR LAYERS` writes a random f32 checkpoint (hidden 1024, intermediate 2816, vocab
//! 32000). The other modes quantize it to NF4 + double quant, reset the process's peak RSS
//! (`/proc/self/clear_refs`), save, and print the RSS before the save and its peak during it.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::TensorData;
use cachet_quant::{BnbQuantizationConfig, LoadOptions, QuantizedModel, load_and_quantize_model};
use cachet_tensor::{Checkpoint, DeviceSpec, Precision, human_bytes};

fn status_kb(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn generate(dir: &Path, layers: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (hidden, inter, vocab, heads) = (1024usize, 2816usize, 32000usize, 16usize);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": hidden / heads,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "hidden_act": "silu",
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
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| {
        let n = shape.iter().product();
        tensors.push((name, TensorData::new(random(n), shape)));
    };
    add("model.embed_tokens.weight".into(), vec![vocab, hidden]);
    add("lm_head.weight".into(), vec![vocab, hidden]);
    add("model.norm.weight".into(), vec![hidden]);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            add(format!("{p}.self_attn.{m}.weight"), vec![hidden, hidden]);
        }
        add(format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]);
        add(format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]);
        add(format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]);
        add(format!("{p}.input_layernorm.weight"), vec![hidden]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![hidden]);
    }
    cachet_tensor::safetensors::save(dir.join("model.safetensors"), &tensors, None)?;
    println!("wrote {}", dir.display());
    Ok(())
}

/// The one-shot writer cachet used before saving was streamed.
fn one_shot(q: &QuantizedModel, out: &Path) -> anyhow::Result<()> {
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
        tensors.extend(layer.tensors(prefix));
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
    if mode == "gen" {
        let layers = args.get(3).map_or(Ok(16), |s| s.parse())?;
        return generate(dir, layers);
    }
    let device = DeviceSpec::Cpu.init()?;
    let options = LoadOptions {
        torch_dtype: Some(Precision::F32),
        ..LoadOptions::default()
    };
    let q = load_and_quantize_model(
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
