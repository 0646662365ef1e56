//! `cachet generate`: load a model (or the embedded default), generate, report speed and cache.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cachet::kv::CacheConfig;
use cachet::models::llama::TokenIds;
use cachet::models::{GenerationConfig, Llama, embedded, generate};
use cachet::tensor::{DeviceSpec, Precision, human_bytes};

/// Window given to a sliding-window cache on a model that has none.
const DEFAULT_WINDOW: usize = 64;

/// Arguments of `cachet generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json + safetensors); the embedded tiny Llama when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt token ids, comma separated; repeat the flag for a batch (left-padded).
    #[arg(long, num_args = 1, action = clap::ArgAction::Append)]
    prompt_ids: Vec<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Device: cpu, wgpu, wgpu:N, wgpu:cpu or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// KV cache: dynamic, static, offloaded, offloaded_static, quantized, sliding_window, sink, or none.
    #[arg(long, default_value = "dynamic")]
    cache: String,
    /// Cache options as JSON, with transformers' cache_config keys (e.g. '{"max_cache_len": 64}').
    #[arg(long)]
    cache_config: Option<String>,
    /// Beams for beam search.
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Sequences returned per prompt (beam search).
    #[arg(long)]
    num_return_sequences: Option<usize>,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    do_sample: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Sample among the top-k tokens (0 = all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampling RNG.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device-memory budget for the cache in bytes; over it, fall back to the offloaded cache.
    #[arg(long)]
    max_cache_bytes: Option<usize>,
    /// A generation_config.json whose fields are used as defaults (flags still apply on top).
    #[arg(long)]
    generation_config: Option<PathBuf>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of text; see the README for its fields.
    #[arg(long)]
    json: bool,
}

fn parse_prompts(raw: &[String]) -> Result<Vec<Vec<u32>>> {
    if raw.is_empty() {
        return Ok(vec![vec![1, 2, 3, 4, 5]]);
    }
    raw.iter()
        .map(|text| {
            let ids: Result<Vec<u32>, _> = text
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| t.trim().parse::<u32>())
                .collect();
            let ids = ids.with_context(|| {
                format!("--prompt-ids {text:?}: not a comma-separated list of token ids")
            })?;
            if ids.is_empty() {
                bail!("--prompt-ids needs at least one token id");
            }
            Ok(ids)
        })
        .collect()
}

/// Loads a checkpoint directory; bitsandbytes-quantized checkpoints (a `quantization_config` in
/// config.json) load into quantized layers when the `quant` feature is on.
fn load_model(
    dir: &std::path::Path,
    device: &cachet::tensor::Device,
    precision: Precision,
) -> Result<Llama> {
    #[cfg(feature = "quant")]
    {
        Ok(cachet::quant::load_pretrained(dir, device, precision)?)
    }
    #[cfg(not(feature = "quant"))]
    {
        Ok(Llama::from_pretrained(dir, device, precision)?)
    }
}

/// Runs `cachet generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let spec: DeviceSpec = args.device.parse()?;
    let device = spec.init()?;
    let precision: Precision = args.dtype.parse()?;
    let prompts = parse_prompts(&args.prompt_ids)?;

    let load_start = Instant::now();
    let (model, name) = match &args.model {
        Some(dir) => (
            load_model(dir, &device, precision)
                .with_context(|| format!("loading model from {}", dir.display()))?,
            dir.display().to_string(),
        ),
        None => (
            embedded::tiny_llama(&device, precision)?,
            embedded::NAME.to_string(),
        ),
    };
    let load_seconds = load_start.elapsed().as_secs_f64();

    let mut config = match &args.generation_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str::<GenerationConfig>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => GenerationConfig::default(),
    };
    config.max_new_tokens = args.max_new_tokens;
    config.num_beams = args.num_beams;
    config.num_return_sequences = args.num_return_sequences.unwrap_or(args.num_beams);
    config.do_sample = args.do_sample;
    config.temperature = args.temperature;
    config.top_k = args.top_k;
    config.top_p = args.top_p;
    config.seed = args.seed;
    config.max_cache_bytes = args.max_cache_bytes.or(config.max_cache_bytes);
    config.eos_token_id = if args.ignore_eos {
        None
    } else {
        config
            .eos_token_id
            .or_else(|| Some(TokenIds::Many(model.config.eos_ids())))
    };
    if args.cache == "none" {
        config.use_cache = false;
    } else {
        config.cache_implementation = Some(args.cache.clone());
    }
    if let Some(text) = &args.cache_config {
        config.cache_config = Some(CacheConfig::from_json(text)?);
    }
    let windowless = model.cache_info().sliding_window.is_none();
    let window_given = config
        .cache_config
        .as_ref()
        .is_some_and(|c| c.sliding_window.is_some());
    if args.cache == "sliding_window" && windowless && !window_given {
        // A model without a window gets one from the cache; say so rather than fail.
        eprintln!(
            "note: {name} has no sliding_window; using a window of {DEFAULT_WINDOW} tokens (set it with --cache-config '{{\"sliding_window\": N}}')"
        );
        config
            .cache_config
            .get_or_insert_with(CacheConfig::default)
            .sliding_window = Some(DEFAULT_WINDOW);
    }

    let output = generate(&model, &prompts, &config, None)?;
    let tokens_per_second = output.tokens_per_second(prompts.len());
    if args.json {
        let tokens = if output.sequences.len() == 1 {
            serde_json::json!(output.sequences[0])
        } else {
            serde_json::json!(output.sequences)
        };
        let value = serde_json::json!({
            "model": name,
            "device": spec.to_string(),
            "dtype": precision.to_string(),
            "prompt_ids": prompts,
            "tokens": tokens,
            "sequences": output.sequences,
            "sequence_scores": output.sequence_scores,
            "num_tokens": output.sequences.iter().map(Vec::len).sum::<usize>(),
            "tokens_per_second": tokens_per_second,
            "prefill_seconds": output.prefill.as_secs_f64(),
            "total_seconds": output.elapsed.as_secs_f64(),
            "load_seconds": load_seconds,
            "cache": output.cache,
            "cache_bytes": output.cache_bytes,
        });
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("model:   {name} on {spec} ({precision})");
        for (i, sequence) in output.sequences.iter().enumerate() {
            let score = output
                .sequence_scores
                .as_ref()
                .map(|s| format!("  (score {:.4})", s[i]))
                .unwrap_or_default();
            println!("tokens:  {sequence:?}{score}");
        }
        println!(
            "speed:   {tokens_per_second:.1} tokens/s ({:.3} s, prefill {:.3} s)",
            output.elapsed.as_secs_f64(),
            output.prefill.as_secs_f64()
        );
        println!(
            "cache:   {} holding {}",
            output.cache,
            human_bytes(output.cache_bytes as u64)
        );
    }
    Ok(())
}
