//! Loading Llama-family models from GGUF files (llama.cpp's format).
//!
//! [`Llama::from_gguf`] maps llama.cpp's metadata to a [`LlamaConfig`] as transformers' GGUF
//! loader does, renames the tensors to Hugging Face's names, undoes the row permutation llama.cpp's
//! converter applies to the query and key projections of the `llama` architecture, dequantizes,
//! and hands the result to [`Llama::load`] as an in-memory safetensors checkpoint, so a GGUF
//! model runs through exactly the code a Hugging Face checkpoint does.

use std::collections::BTreeMap;
use std::path::Path;

use cachet_tensor::gguf::{GgufFile, GgufTensorInfo, Value};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{Device, Precision};
use serde_json::{Map, Value as Json, json};

use super::config::LlamaConfig;
use super::model::Llama;
use cachet_nn::{ModelError, Pretrained, Result};

/// The tensor holding llama.cpp's per-frequency RoPE factors (Llama 3.1+ scaling).
const ROPE_FREQS: &str = "rope_freqs.weight";

impl Llama {
    /// Loads a `.gguf` file of a `llama` (incl. Mistral), or `qwen2` model onto `device` in
    /// `precision`, dequantizing every weight.
    pub fn from_gguf(
        path: impl AsRef<Path>,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let path = path.as_ref();
        let _span = tracing::info_span!("load_gguf_model", file = %path.display()).entered();
        let file = GgufFile::open(path)?;
        Self::from_gguf_file(&file, device, precision)
    }

    /// Like [`Llama::from_gguf`], from a file already opened.
    pub fn from_gguf_file(file: &GgufFile, device: &Device, precision: Precision) -> Result<Self> {
        let config = gguf_config(file)?;
        let checkpoint = gguf_checkpoint(file, &config, precision)?;
        Self::load(config, &checkpoint, device, precision)
    }
}

/// Reads the file's metadata values by llama.cpp key, with typed errors naming the file and key.
struct Meta<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl Meta<'_> {
    fn error(&self, reason: String) -> ModelError {
        ModelError::Config {
            origin: self.file.label().to_owned(),
            reason,
        }
    }

    /// `{arch}.{suffix}` as a non-negative integer, if present.
    fn uint(&self, suffix: &str) -> Result<Option<u64>> {
        let key = format!("{}.{suffix}", self.arch);
        self.uint_key(&key)
    }

    fn uint_key(&self, key: &str) -> Result<Option<u64>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata key {key:?} must be a non-negative integer, but it is a {} ({})",
                    v.value_type(),
                    short(v)
                ))
            }),
        }
    }

    fn required(&self, suffix: &str) -> Result<u64> {
        self.uint(suffix)?.ok_or_else(|| {
            self.error(format!(
                "metadata key \"{}.{suffix}\" is missing",
                self.arch
            ))
        })
    }

    /// `{arch}.{suffix}` as a float (f32 widened exactly, f64, or an integer), if present.
    fn float(&self, suffix: &str) -> Result<Option<f64>> {
        let key = format!("{}.{suffix}", self.arch);
        match self.file.get(&key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_i64().map(|i| i as f64))
                .map(Some)
                .ok_or_else(|| {
                    self.error(format!(
                        "metadata key {key:?} must be a number, but it is a {}",
                        v.value_type()
                    ))
                }),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata key {key:?} must be a string, but it is a {}",
                    v.value_type()
                ))
            }),
        }
    }
}

/// A value for messages, cut short.
fn short(v: &Value) -> String {
    let mut s = match v {
        Value::Array(a) => format!("array of {} {}", a.len(), a.element_type()),
        other => format!("{other:?}"),
    };
    s.truncate(60);
    s
}

/// The [`LlamaConfig`] a GGUF file describes, built from Hugging Face field names so that the
/// config's own defaults and validation apply.
///
/// `general.architecture` `llama` becomes `mistral` when `general.name` mentions Mistral (as
/// transformers does); `qwen2` maps to Qwen2. Embeddings are tied when `output.weight` is
/// absent. Llama 3 RoPE scaling, which llama.cpp stores as `rope_freqs.weight` factors, is
/// recognised by recomputing those factors.
pub fn gguf_config(file: &GgufFile) -> Result<LlamaConfig> {
    let origin = file.label();
    let bad = |reason: String| ModelError::Config {
        origin: origin.to_owned(),
        reason,
    };
    let arch = file
        .get("general.architecture")
        .ok_or_else(|| bad("metadata key \"general.architecture\" is missing".into()))?
        .as_str()
        .ok_or_else(|| bad("metadata key \"general.architecture\" is not a string".into()))?;
    let meta = Meta { file, arch };
    let name = meta.string("general.name")?.unwrap_or("");
    let (model_type, hf_arch) = match arch {
        "llama" if name.to_ascii_lowercase().contains("mistral") => {
            ("mistral", "MistralForCausalLM")
        }
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        other => {
            return Err(bad(format!(
                "general.architecture {other:?} is not supported (supported: llama, qwen2)"
            )));
        }
    };
    if meta.uint("expert_count")?.is_some_and(|n| n > 0) {
        return Err(bad(format!(
            "{arch}.expert_count is set: mixture-of-experts models are not supported"
        )));
    }

    let mut c = Map::new();
    c.insert("architectures".into(), json!([hf_arch]));
    c.insert("model_type".into(), json!(model_type));
    let hidden = meta.required("embedding_length")?;
    c.insert("hidden_size".into(), json!(hidden));
    c.insert(
        "intermediate_size".into(),
        json!(meta.required("feed_forward_length")?),
    );
    c.insert(
        "num_hidden_layers".into(),
        json!(meta.required("block_count")?),
    );
    let heads = meta.required("attention.head_count")?;
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert(
        "num_key_value_heads".into(),
        json!(meta.uint("attention.head_count_kv")?.unwrap_or(heads)),
    );
    let key_length = meta.uint("attention.key_length")?;
    let head_dim = match arch {
        // transformers reads rope.dimension_count as head_dim for llama only.
        "llama" => key_length.or(meta.uint("rope.dimension_count")?),
        _ => key_length,
    };
    if let Some(head_dim) = head_dim {
        c.insert("head_dim".into(), json!(head_dim));
    }
    let effective_head_dim = head_dim.unwrap_or(hidden / heads.max(1));
    if let Some(v) = meta.uint("attention.value_length")?
        && v != effective_head_dim
    {
        return Err(bad(format!(
            "{arch}.attention.value_length {v} differs from the head size {effective_head_dim} (not supported)"
        )));
    }
    if let Some(ctx) = meta.uint("context_length")? {
        c.insert("max_position_embeddings".into(), json!(ctx));
    }
    if let Some(eps) = meta.float("attention.layer_norm_rms_epsilon")? {
        c.insert("rms_norm_eps".into(), json!(eps));
    }
    let theta = meta.float("rope.freq_base")?;
    if let Some(theta) = theta {
        c.insert("rope_theta".into(), json!(theta));
    }
    if let Some(window) = meta.uint("attention.sliding_window")? {
        c.insert("sliding_window".into(), json!(window));
        if arch == "qwen2" {
            c.insert("use_sliding_window".into(), json!(true));
        }
    }
    c.insert("vocab_size".into(), json!(vocab_size(&meta)?));
    c.insert(
        "tie_word_embeddings".into(),
        json!(!file.contains("output.weight")),
    );
    if arch == "llama" {
        c.insert(
            "attention_bias".into(),
            json!(file.contains("blk.0.attn_q.bias")),
        );
    }
    c.insert("mlp_bias".into(), json!(file.contains("blk.0.ffn_up.bias")));
    for (gguf_key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = meta.uint_key(gguf_key)? {
            c.insert(hf_key.into(), json!(id));
        }
    }
    if let Some(scaling) = rope_scaling(&meta, effective_head_dim, theta)? {
        c.insert("rope_scaling".into(), scaling);
    }
    LlamaConfig::from_json(&Json::Object(c).to_string(), origin)
}

/// `{arch}.vocab_size`, else the length of the token list, else `token_embd.weight`'s rows.
fn vocab_size(meta: &Meta<'_>) -> Result<u64> {
    if let Some(v) = meta.uint("vocab_size")? {
        return Ok(v);
    }
    if let Some(v) = meta.file.get("tokenizer.ggml.tokens") {
        return match v.as_array() {
            Some(a) => Ok(a.len() as u64),
            None => Err(meta.error(format!(
                "metadata key \"tokenizer.ggml.tokens\" must be an array, but it is a {}",
                v.value_type()
            ))),
        };
    }
    match meta.file.tensor("token_embd.weight") {
        Some(t) if t.dims().len() == 2 => Ok(t.dims()[1]),
        _ => Err(meta.error(
            "cannot tell the vocabulary size: no vocab_size, token list or token_embd.weight"
                .into(),
        )),
    }
}

/// RoPE scaling: `{arch}.rope.scaling.type` (`none`, `linear`), the older
/// `{arch}.rope.scale_linear`, or Llama 3's scaling recognised from `rope_freqs.weight`.
fn rope_scaling(meta: &Meta<'_>, head_dim: u64, theta: Option<f64>) -> Result<Option<Json>> {
    let arch = meta.arch;
    let kind = meta.string(&format!("{arch}.rope.scaling.type"))?;
    let factor = meta
        .float("rope.scaling.factor")?
        .or(meta.float("rope.scale_linear")?);
    let linear = |factor: f64| json!({"rope_type": "linear", "factor": factor});
    let from_keys = match (kind, factor) {
        (None | Some("none"), None) => None,
        (None, Some(1.0)) => None,
        (None | Some("linear"), Some(f)) => Some(linear(f)),
        (Some("none"), Some(_)) => None,
        (Some(other), _) => {
            return Err(meta.error(format!(
                "{arch}.rope.scaling.type {other:?} is not supported (supported: none, linear, and Llama 3 frequency factors)"
            )));
        }
    };
    let Some(freqs) = meta.file.tensor(ROPE_FREQS) else {
        return Ok(from_keys);
    };
    if from_keys.is_some() {
        return Err(meta.error(format!(
            "both {arch}.rope.scaling.* and {ROPE_FREQS} are present"
        )));
    }
    let factors = meta.file.dequantize(ROPE_FREQS)?;
    llama3_scaling(meta, freqs, &factors, head_dim, theta.unwrap_or(10_000.0)).map(Some)
}

/// Recognises llama.cpp's `rope_freqs.weight` as Llama 3 scaling: its converter computes the
/// factors from `factor` with `low_freq_factor` 1, `high_freq_factor` 4 and an original context
/// of 8192 (every Llama 3.x); they are recomputed and compared before being trusted.
fn llama3_scaling(
    meta: &Meta<'_>,
    info: &GgufTensorInfo,
    factors: &[f32],
    dim: u64,
    theta: f64,
) -> Result<Json> {
    let (low, high, original) = (1.0f64, 4.0f64, 8192.0f64);
    let half = (dim / 2) as usize;
    if factors.len() != half || half == 0 {
        return Err(meta.error(format!(
            "{ROPE_FREQS} has {} values, but head_dim {dim} implies {half}",
            info.num_elements()
        )));
    }
    let factor = f64::from(factors.iter().copied().fold(f32::MIN, f32::max));
    let mut matches = factor.is_finite() && factor >= 1.0;
    for (i, &got) in factors.iter().enumerate() {
        // As the converter computes it: f32 inverse frequencies, f64 arithmetic after.
        let freq = 1.0f32 / (theta as f32).powf((2 * i) as f32 / dim as f32);
        let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
        let want = if wavelen < original / high {
            1.0
        } else if wavelen > original / low {
            factor
        } else {
            let smooth = (original / wavelen - low) / (high - low);
            1.0 / ((1.0 - smooth) / factor + smooth)
        };
        matches &= (f64::from(got) - want).abs() <= 1e-4 * want.abs();
    }
    if !matches {
        return Err(meta.error(format!(
            "{ROPE_FREQS} holds RoPE frequency factors that are not Llama 3 scaling (factor {factor}, low 1, high 4, original context 8192); they are not supported"
        )));
    }
    if factor == 1.0 {
        return Ok(json!({"rope_type": "default"}));
    }
    Ok(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original as u64,
    }))
}

/// The Hugging Face name of a llama.cpp tensor name, for the tensors of a Llama-family model.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    Some(match gguf_name {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf_name.strip_prefix("blk.")?;
            let (layer, rest) = rest.split_once('.')?;
            if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let (module, param) = rest.rsplit_once('.')?;
            if param != "weight" && param != "bias" {
                return None;
            }
            let hf = match module {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{layer}.{hf}.{param}")
        }
    })
}

/// One tensor of the checkpoint being built.
struct Planned<'a> {
    hf: String,
    info: &'a GgufTensorInfo,
    shape: Vec<usize>,
    /// Heads to undo llama.cpp's query/key row permutation over.
    unpermute: Option<usize>,
    begin: usize,
    end: usize,
}

/// The file's weights under Hugging Face names, dequantized to `precision`, as an in-memory
/// safetensors checkpoint (query/key rows restored to `rotate_half` order for `llama`).
pub fn gguf_checkpoint(
    file: &GgufFile,
    config: &LlamaConfig,
    precision: Precision,
) -> Result<Checkpoint> {
    let permuted = file.architecture() == Some("llama");
    let (dtype, elem) = match precision {
        Precision::F32 => ("F32", 4),
        Precision::F16 => ("F16", 2),
        Precision::BF16 => ("BF16", 2),
    };
    let mut planned = Vec::new();
    let mut offset = 0usize;
    for info in file.tensors() {
        let Some(hf) = hf_tensor_name(info.name()) else {
            if info.name() != ROPE_FREQS {
                tracing::warn!(tensor = info.name(), "GGUF tensor not used by the model");
            }
            continue;
        };
        let module = hf.rsplit_once('.').map_or("", |(m, _)| m);
        let unpermute = if !permuted {
            None
        } else if module.ends_with("self_attn.q_proj") {
            Some(config.num_attention_heads)
        } else if module.ends_with("self_attn.k_proj") {
            Some(config.kv_heads())
        } else {
            None
        };
        let shape = info.shape();
        if let Some(heads) = unpermute {
            let rows = shape.first().copied().unwrap_or(1);
            if heads == 0 || !rows.is_multiple_of(2 * heads) {
                return Err(ModelError::Config {
                    origin: file.label().to_owned(),
                    reason: format!(
                        "tensor {:?} has {rows} rows, not a multiple of 2 x {heads} heads",
                        info.name()
                    ),
                });
            }
        }
        let bytes = info.num_elements() * elem;
        planned.push(Planned {
            hf,
            info,
            shape,
            unpermute,
            begin: offset,
            end: offset + bytes,
        });
        offset += bytes;
    }

    let mut header = BTreeMap::new();
    for p in &planned {
        header.insert(
            p.hf.as_str(),
            json!({"dtype": dtype, "shape": p.shape, "data_offsets": [p.begin, p.end]}),
        );
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| ModelError::Config {
        origin: file.label().to_owned(),
        reason: format!("cannot build the checkpoint header: {e}"),
    })?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let data_start = 8 + header.len();
    let mut bytes = vec![0u8; data_start + offset];
    bytes[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
    bytes[8..data_start].copy_from_slice(&header);
    for p in &planned {
        let slot = &mut bytes[data_start + p.begin..data_start + p.end];
        let name = p.info.name();
        let cols = p.shape.get(1..).map_or(1, |s| s.iter().product());
        match precision {
            Precision::F32 => fill(slot, &file.dequantize(name)?, cols, p.unpermute, |v| {
                v.to_le_bytes()
            }),
            Precision::F16 => fill(slot, &file.dequantize_f16(name)?, cols, p.unpermute, |v| {
                v.to_bits().to_le_bytes()
            }),
            Precision::BF16 => fill(slot, &file.dequantize_bf16(name)?, cols, p.unpermute, |v| {
                v.to_bits().to_le_bytes()
            }),
        }
    }
    let label = format!("{} (dequantized)", file.label());
    Ok(Checkpoint::from_bytes(&label, bytes)?)
}

/// Writes `values` (`rows x cols`, row-major) into `slot` as little-endian bytes; with `heads`,
/// HF row `h*hd + t*hd/2 + d` takes GGUF row `h*hd + 2d + t` (the inverse of llama.cpp's
/// converter, as transformers' GGUF loader computes it).
fn fill<T: Copy, const N: usize>(
    slot: &mut [u8],
    values: &[T],
    cols: usize,
    heads: Option<usize>,
    encode: impl Fn(T) -> [u8; N],
) {
    // An empty tensor may still have a huge dimension (`[0, 2^62]`): nothing to write, and its
    // row width in bytes would overflow.
    if values.is_empty() {
        return;
    }
    let cols = cols.max(1);
    let rows = values.len() / cols;
    let source_row = |r: usize| match heads {
        None => r,
        Some(heads) => {
            let head_dim = rows / heads;
            let half = head_dim / 2;
            let (h, within) = (r / head_dim, r % head_dim);
            let (t, d) = (within / half, within % half);
            h * head_dim + 2 * d + t
        }
    };
    for (r, out_row) in slot.chunks_exact_mut(cols * N).enumerate() {
        let src = source_row(r) * cols;
        for (out, &v) in out_row.chunks_exact_mut(N).zip(&values[src..src + cols]) {
            out.copy_from_slice(&encode(v));
        }
    }
}
