//! The `cachet` command line: a thin layer over the library crates.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cachet::models::{GreedyOptions, Llama, embedded, greedy};
use cachet::tensor::{DeviceSpec, Precision, available_backends};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Inference accelerations for burn: KV caches, diffusion cache hooks, quantization, compile cache.
#[derive(Parser, Debug)]
#[command(name = "cachet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the backends compiled in and the devices they open.
    Info {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Greedily generate tokens with a Llama-family model.
    Generate(GenerateArgs),
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Checkpoint directory (config.json + safetensors); the embedded tiny Llama when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt token ids, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
    prompt_ids: Vec<u32>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Device: cpu, wgpu, wgpu:N, wgpu:cpu or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (`tokens`, `tokens_per_second`, ...) instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CACHET_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Info { json } => info(json),
        Command::Generate(args) => generate(args),
    }
}

fn info(json: bool) -> Result<()> {
    let backends = available_backends();
    if json {
        let value =
            serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "backends": backends });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("cachet {}", env!("CARGO_PKG_VERSION"));
    for backend in backends {
        let compiled = if backend.compiled {
            "compiled in"
        } else {
            "not compiled in"
        };
        println!("{:<6} {compiled:<16} {}", backend.name, backend.status);
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    let spec: DeviceSpec = args.device.parse()?;
    let device = spec.init()?;
    let precision: Precision = args.dtype.parse()?;
    if args.prompt_ids.is_empty() {
        bail!("--prompt-ids needs at least one token id");
    }
    let load_start = Instant::now();
    let (model, name) = match &args.model {
        Some(dir) => (
            Llama::from_pretrained(dir, &device, precision)
                .with_context(|| format!("loading model from {}", dir.display()))?,
            dir.display().to_string(),
        ),
        None => (
            embedded::tiny_llama(&device, precision)?,
            embedded::NAME.to_string(),
        ),
    };
    let load_seconds = load_start.elapsed().as_secs_f64();
    let options = GreedyOptions {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: if args.ignore_eos {
            vec![]
        } else {
            model.config.eos_ids()
        },
        pad_token_id: 0,
    };
    let output = greedy(
        &model,
        std::slice::from_ref(&args.prompt_ids),
        &options,
        None,
    )?;
    let tokens = &output.tokens[0];
    if args.json {
        let value = serde_json::json!({
            "model": name,
            "device": spec.to_string(),
            "dtype": precision.to_string(),
            "prompt_ids": args.prompt_ids,
            "tokens": tokens,
            "num_tokens": tokens.len(),
            "tokens_per_second": output.tokens_per_second(),
            "prefill_seconds": output.prefill.as_secs_f64(),
            "total_seconds": output.elapsed.as_secs_f64(),
            "load_seconds": load_seconds,
            "cache": "none",
        });
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("model:   {name} on {spec} ({precision})");
        println!("prompt:  {:?}", args.prompt_ids);
        println!("tokens:  {tokens:?}");
        println!(
            "speed:   {:.1} tokens/s ({} tokens in {:.3} s, prefill {:.3} s)",
            output.tokens_per_second(),
            tokens.len(),
            output.elapsed.as_secs_f64(),
            output.prefill.as_secs_f64()
        );
    }
    Ok(())
}
