//! The `cachet` command line: a thin layer over the library crates.

#[cfg(feature = "compile")]
mod compile_cmd;
mod denoise_cmd;
mod denoise_png;
mod generate_cmd;
mod kv_memory_cmd;
mod perplexity_cmd;
#[cfg(feature = "quant")]
mod quantize_cmd;

use anyhow::Result;
use cachet::tensor::available_backends;
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
    /// Generate tokens with a Llama-family model (greedy, sampling or beam search) through a KV cache.
    Generate(generate_cmd::GenerateArgs),
    /// Perplexity of a model on a text file (transformers' sliding-window recipe), for any weights and cache.
    Perplexity(perplexity_cmd::PerplexityArgs),
    /// Denoise with a DiT (embedded tiny Flux by default) through a diffusion cache; summary, plots, speedup.
    Denoise(denoise_cmd::DenoiseArgs),
    /// Plot KV-cache memory versus context length for every cache type to a PNG (measured).
    KvMemory(kv_memory_cmd::KvMemoryArgs),
    /// Compile cache: hash, status, cleanup, wrap, and a Hub cache (create/set/lookup/synchronize).
    #[cfg(feature = "compile")]
    CompileCache(compile_cmd::CompileCacheArgs),
    /// Quantize a checkpoint to bitsandbytes 4-bit (NF4/FP4) or LLM.int8 and save it.
    #[cfg(feature = "quant")]
    Quantize(quantize_cmd::QuantizeArgs),
}

fn main() -> Result<()> {
    cachet::tensor::tune_host_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CACHET_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Info { json } => info(json),
        Command::Generate(args) => generate_cmd::run(args),
        Command::Perplexity(args) => perplexity_cmd::run(args),
        Command::Denoise(args) => denoise_cmd::run(args),
        Command::KvMemory(args) => kv_memory_cmd::run(args),
        #[cfg(feature = "compile")]
        Command::CompileCache(args) => compile_cmd::run(args),
        #[cfg(feature = "quant")]
        Command::Quantize(args) => quantize_cmd::run(args),
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
