//! `cachet perplexity`: perplexity of a model on a text file, with transformers' sliding-window
//! recipe, for dense or quantized weights and any KV cache.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use cachet::kv::CacheConfig;
use cachet::models::{Llama, PerplexityConfig, embedded, perplexity};
use cachet::tensor::{DeviceSpec, Precision};
use cachet::text::TextModel;

/// Arguments of `cachet perplexity`.
#[derive(clap::Args, Debug)]
pub struct PerplexityArgs {
    /// Checkpoint directory or `.gguf` file; the embedded tiny Llama when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text to score (UTF-8), tokenized by the model's tokenizer.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Tokens between window starts.
    #[arg(long, default_value_t = 256)]
    stride: usize,
    /// Tokens fed per forward inside a window, through the cache (0: the whole window at once,
    /// so the cache is written but not read; 1: token by token, as in decoding).
    #[arg(long, default_value_t = 0)]
    chunk: usize,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Quantize the weights while loading (a model folder): nf4, nf4-dq, fp4, int8, int8-t0.
    #[arg(long)]
    quantize: Option<String>,
    /// KV cache: dynamic, static, offloaded, offloaded_static, quantized, sliding_window, sink.
    #[arg(long, default_value = "dynamic")]
    cache: String,
    /// Cache options as JSON, with transformers' cache_config keys.
    #[arg(long)]
    cache_config: Option<String>,
    /// Device: cpu, wgpu, wgpu:N, wgpu:cpu or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Do not add the tokenizer's special tokens (BOS) in front of the text.
    #[arg(long)]
    no_special_tokens: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn load(
    args: &PerplexityArgs,
    device: &cachet::tensor::Device,
    precision: Precision,
) -> Result<(Llama, TextModel, String)> {
    let Some(path) = &args.model else {
        if args.quantize.is_some() {
            bail!("--quantize needs --model (a checkpoint folder)");
        }
        let text = crate::generate_cmd::embedded_text()?;
        return Ok((
            embedded::tiny_llama(device, precision)?,
            text,
            embedded::NAME.into(),
        ));
    };
    let name = path.display().to_string();
    let (model, text) = match &args.quantize {
        None => crate::generate_cmd::load_any(path, device, precision)
            .with_context(|| format!("loading model from {name}"))?,
        Some(kind) => quantized(path, kind, device, precision)?,
    };
    let text = text.with_context(|| {
        format!("{name} has no tokenizer (no tokenizer.json or GGUF tokenizer metadata)")
    })?;
    Ok((model, text, name))
}

#[cfg(feature = "quant")]
fn quantized(
    path: &std::path::Path,
    kind: &str,
    device: &cachet::tensor::Device,
    precision: Precision,
) -> Result<(Llama, Option<TextModel>)> {
    use cachet::quant::{BnbQuantizationConfig, LoadOptions, load_and_quantize_model};
    if !path.is_dir() {
        bail!(
            "--quantize {kind}: {} is not a checkpoint folder (quantize-while-loading reads safetensors)",
            path.display()
        );
    }
    let config = BnbQuantizationConfig::preset(kind, precision)?;
    let options = LoadOptions {
        torch_dtype: Some(precision),
        progress: true,
        ..LoadOptions::default()
    };
    let qm = load_and_quantize_model::<Llama>(path, &config, &options, device)
        .with_context(|| format!("loading {} as {kind}", path.display()))?;
    Ok((qm.model, crate::generate_cmd::folder_text(path)?))
}

#[cfg(not(feature = "quant"))]
fn quantized(
    _: &std::path::Path,
    kind: &str,
    _: &cachet::tensor::Device,
    _: Precision,
) -> Result<(Llama, Option<TextModel>)> {
    bail!("--quantize {kind}: this cachet was built without the `quant` feature")
}

/// Runs `cachet perplexity`.
pub fn run(args: PerplexityArgs) -> Result<()> {
    let spec: DeviceSpec = args.device.parse()?;
    let device = spec.init()?;
    let precision: Precision = args.dtype.parse()?;
    let source = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {} (UTF-8 text)", args.text.display()))?;
    let (model, text, name) = load(&args, &device, precision)?;
    let mut ids = text.tokenizer.encode(&source, !args.no_special_tokens)?;
    if let Some(n) = args.max_tokens {
        ids.truncate(n);
    }
    let context = args.context.min(model.config.max_position_embeddings);
    if context < args.context {
        eprintln!(
            "note: --context {} exceeds the model's {context} positions; using {context}",
            args.context
        );
    }
    let config = PerplexityConfig {
        context,
        stride: args.stride.min(context),
        chunk: args.chunk,
        cache_implementation: Some(args.cache.clone()),
        cache_config: args
            .cache_config
            .as_deref()
            .map(CacheConfig::from_json)
            .transpose()?,
    };
    let report = perplexity(&model, &ids, &config)
        .with_context(|| format!("perplexity of {name} on {}", args.text.display()))?;
    let weights = args
        .quantize
        .clone()
        .unwrap_or_else(|| precision.to_string());
    if args.json {
        let value = serde_json::json!({
            "model": name,
            "text": args.text.display().to_string(),
            "weights": weights,
            "cache": args.cache,
            "context": config.context,
            "stride": config.stride,
            "chunk": config.chunk,
            "tokens": ids.len(),
            "report": report,
        });
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("model:      {name} ({weights}, {} cache)", args.cache);
        println!(
            "text:       {} ({} tokens; windows of {} every {})",
            args.text.display(),
            ids.len(),
            config.context,
            config.stride
        );
        println!(
            "perplexity: {:.4} (mean NLL {:.5} nats over {} tokens, {} windows, {:.1} s)",
            report.perplexity,
            report.mean_nll,
            report.tokens_scored,
            report.windows,
            report.seconds
        );
    }
    Ok(())
}
