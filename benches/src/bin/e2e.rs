//! `e2e`: end-to-end generation speed of cachet on a real checkpoint, one JSON line per run.
//! `cargo xtask bench --e2e` drives it next to transformers and llama.cpp and prints the table.
//!
//! ```text
//! e2e run --model DIR --weights f32 --cache dynamic --prompt-len 32,512 --new-tokens 64 --reps 3
//! e2e memcpy
//! ```
//!
//! `run` loads the model once, runs a short warm-up generation, then for each prompt length and
//! repetition: a prefill (`generate` with one new token into a fresh cache) and a decode of
//! `new_tokens - 1` more tokens continuing that filled cache. Prefill tok/s is the prompt length
//! over the prefill's wall time; decode tok/s is the marginal rate of decode steps 2..N (the
//! first decode step, which the second `generate` reports as its `prefill`, is left out), so it
//! counts exactly the per-token cost of the real generation loop. Prompts are synthetic token
//! ids ([`synthetic_prompt`], the same formula as xtask/bench/transformers_bench.py), EOS is
//! ignored, decoding is greedy.
//!
//! `memcpy` measures host memory bandwidth with a multi-threaded copy of a buffer far larger
//! than the last-level cache (best of several), the denominator of the benchmark's floor.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cachet_kv::Cache;
use cachet_kv::{CacheConfig, CacheImplementation, build_cache};
use cachet_models::{GenerationConfig, Llama, LlamaConfig, generate};
use cachet_nn::{Pretrained, QuantizableModel};
use cachet_quant::{BnbQuantizationConfig, LoadOptions, load_and_quantize_model};
use cachet_tensor::{Device, DeviceSpec, Precision};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rayon::prelude::*;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "e2e",
    about = "End-to-end generation benchmark of cachet (JSON lines)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a checkpoint and measure prefill and marginal decode speed.
    Run(RunArgs),
    /// Measure host memcpy bandwidth (GB/s, multi-threaded, best of several).
    Memcpy(MemcpyArgs),
}

/// How the weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Weights {
    /// Dense f32.
    F32,
    /// Dense bfloat16.
    Bf16,
    /// Dense float16.
    F16,
    /// bitsandbytes NF4, blocksize 64.
    Nf4,
    /// NF4 with double quantization of the absmax.
    Nf4Dq,
    /// bitsandbytes FP4, blocksize 64.
    Fp4,
    /// LLM.int8 with the outlier threshold 6.0.
    Int8,
    /// LLM.int8 with threshold 0 (no outlier decomposition).
    Int8T0,
}

impl Weights {
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Nf4 => "nf4",
            Self::Nf4Dq => "nf4-dq",
            Self::Fp4 => "fp4",
            Self::Int8 => "int8",
            Self::Int8T0 => "int8-t0",
        }
    }

    /// The bitsandbytes config, for the quantized kinds.
    fn bnb(self, float: Precision) -> Option<BnbQuantizationConfig> {
        match self {
            Self::F32 | Self::Bf16 | Self::F16 => None,
            quantized => BnbQuantizationConfig::preset(quantized.name(), float).ok(),
        }
    }
}

/// The KV cache, by transformers' names (`quantized-N`: the quanto backend with N bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CacheKind {
    #[value(name = "dynamic")]
    Dynamic,
    #[value(name = "static")]
    Static,
    #[value(name = "quantized-4")]
    Quantized4,
    #[value(name = "quantized-2")]
    Quantized2,
    #[value(name = "sliding_window")]
    SlidingWindow,
    #[value(name = "sink")]
    Sink,
    #[value(name = "offloaded")]
    Offloaded,
}

impl CacheKind {
    fn name(self) -> &'static str {
        match self {
            Self::Dynamic => "dynamic",
            Self::Static => "static",
            Self::Quantized4 => "quantized-4",
            Self::Quantized2 => "quantized-2",
            Self::SlidingWindow => "sliding_window",
            Self::Sink => "sink",
            Self::Offloaded => "offloaded",
        }
    }

    /// transformers' `cache_implementation` and `cache_config` for this kind.
    fn implementation(self, window: usize) -> (CacheImplementation, CacheConfig) {
        let mut config = CacheConfig::default();
        let implementation = match self {
            Self::Dynamic => CacheImplementation::Dynamic,
            Self::Static => CacheImplementation::Static,
            Self::Quantized4 | Self::Quantized2 => {
                config.backend = Some("quanto".into());
                config.nbits = Some(if self == Self::Quantized4 { 4 } else { 2 });
                CacheImplementation::Quantized
            }
            Self::SlidingWindow => {
                config.sliding_window = Some(window);
                CacheImplementation::SlidingWindow
            }
            Self::Sink => {
                config.window_length = Some(window);
                config.num_sink_tokens = Some(SINK_TOKENS);
                CacheImplementation::Sink
            }
            Self::Offloaded => CacheImplementation::Offloaded,
        };
        (implementation, config)
    }
}

#[derive(Args)]
struct RunArgs {
    /// Checkpoint directory (config.json + safetensors), e.g. target/models/SmolLM2-135M-Instruct.
    #[arg(long)]
    model: PathBuf,
    /// Weights: dense f32/bf16/f16, or quantized while loading (bitsandbytes layouts).
    #[arg(long, value_enum, default_value = "f32")]
    weights: Weights,
    /// Floating-point dtype of the layers a quantized model keeps dense (embeddings, norms,
    /// lm_head) and of its 4-bit compute: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    float_dtype: String,
    /// KV cache.
    #[arg(long, value_enum, default_value = "dynamic")]
    cache: CacheKind,
    /// Window of the sliding_window and sink caches (tokens).
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Prompt lengths (comma separated or repeated); one JSON line each.
    #[arg(long = "prompt-len", value_delimiter = ',', num_args = 1.., default_value = "32")]
    prompt_lens: Vec<usize>,
    /// Tokens generated per run (the first comes from the prefill); at least 3.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Repetitions per prompt length (medians are reported, every value is kept).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Compute device: cpu (default), wgpu, wgpu:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct MemcpyArgs {
    /// Buffer size in MiB (source and destination each).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Copies; the best one counts.
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Threads (default: rayon's pool, as the decode uses).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Memcpy(args) => memcpy(&args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// The synthetic prompt of `len` tokens: a fixed pattern inside the vocabulary, clear of the
/// low ids where special tokens live. xtask/bench/transformers_bench.py uses the same formula.
fn synthetic_prompt(len: usize, vocab: usize) -> Vec<u32> {
    let base = if vocab > 2000 { 1000 } else { 0 };
    (0..len)
        .map(|i| (base + (i * 7919 + 13) % (vocab - base)) as u32)
        .collect()
}

/// A loaded model and what its weights weigh.
struct Loaded {
    model: Llama,
    load_seconds: f64,
    /// Bytes of every weight held.
    weight_bytes: usize,
    /// Bytes one decode step reads: every projection, the lm_head (the embedding matrix when
    /// tied) and one embedding row.
    decode_bytes: usize,
    /// Number of quantized projections.
    quantized_layers: usize,
}

/// The projections of the decoder layers, by module name, with (in, out) features.
fn projections(c: &LlamaConfig) -> Vec<(String, usize, usize)> {
    Llama::projections(c)
        .into_iter()
        .filter(|s| s.name.starts_with("model.layers."))
        .map(|s| (s.name, s.in_features, s.out_features))
        .collect()
}

fn load(args: &RunArgs, device: &Device) -> Result<Loaded> {
    let dir = &args.model;
    if !dir.join("config.json").is_file() {
        bail!(
            "{} has no config.json (fetch the model with `cargo xtask fetch-model`)",
            dir.display()
        );
    }
    let float: Precision = args
        .float_dtype
        .parse()
        .with_context(|| format!("--float-dtype {}", args.float_dtype))?;
    let start = Instant::now();
    let dense = |p: Precision| -> Result<Loaded> {
        let model = Llama::from_pretrained(dir, device, p)
            .with_context(|| format!("loading {} in {p}", dir.display()))?;
        let load_seconds = start.elapsed().as_secs_f64();
        let c = &model.config;
        let proj: usize = projections(c).iter().map(|(_, i, o)| i * o).sum();
        let table = c.vocab_size * c.hidden_size;
        let norms = (2 * c.num_hidden_layers + 1) * c.hidden_size;
        let untied = if c.tie_word_embeddings { 0 } else { table };
        Ok(Loaded {
            weight_bytes: (proj + table + untied + norms) * p.size(),
            decode_bytes: (proj + table + c.hidden_size) * p.size(),
            quantized_layers: 0,
            load_seconds,
            model,
        })
    };
    match args.weights {
        Weights::F32 => dense(Precision::F32),
        Weights::Bf16 => dense(Precision::BF16),
        Weights::F16 => dense(Precision::F16),
        quantized => {
            let config = quantized.bnb(float).expect("a quantized kind");
            let options = LoadOptions {
                torch_dtype: Some(float),
                ..LoadOptions::default()
            };
            let qm = load_and_quantize_model::<Llama>(dir, &config, &options, device)
                .with_context(|| format!("loading {} as {}", dir.display(), quantized.name()))?;
            let load_seconds = start.elapsed().as_secs_f64();
            let c = &qm.model.config;
            let mut decode = 0usize;
            for (name, i, o) in projections(c) {
                decode += match qm.layers.get(&name) {
                    Some(layer) => layer.memory_bytes(),
                    None => i * o * float.size(),
                };
            }
            decode += match qm.layers.get("lm_head") {
                Some(layer) => layer.memory_bytes(),
                None => c.vocab_size * c.hidden_size * float.size(),
            };
            decode += c.hidden_size * float.size();
            Ok(Loaded {
                weight_bytes: qm.memory_bytes(),
                decode_bytes: decode,
                quantized_layers: qm.layers.len(),
                load_seconds,
                model: qm.model,
            })
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn new_cache(
    model: &Llama,
    kind: CacheKind,
    window: usize,
    max_len: usize,
) -> Result<Box<dyn Cache>> {
    let (implementation, config) = kind.implementation(window);
    build_cache(
        implementation,
        &config,
        &model.cache_info(),
        &model.device(),
        max_len,
    )
    .with_context(|| format!("building the {} cache", kind.name()))
}

/// The sink cache takes at most its window as the first input and fewer new tokens than its
/// ring afterwards, so a longer prompt is fed in chunks of half the window (StreamingLLM's way
/// of reading a long input); every other cache takes the prompt in one forward.
fn prefill_chunk(kind: CacheKind, window: usize) -> Option<usize> {
    (kind == CacheKind::Sink).then(|| (window.saturating_sub(SINK_TOKENS) / 2).max(1))
}

/// Sink tokens of the sink cache.
const SINK_TOKENS: usize = 4;

/// One repetition: prefill into a fresh cache, then decode continuing it.
struct Rep {
    prefill: Duration,
    first_step: Duration,
    /// Wall time of decode steps 2..N.
    rest: Duration,
    steps: usize,
    cache_bytes: usize,
    tokens: Vec<u32>,
}

fn one_rep(
    model: &Llama,
    kind: CacheKind,
    window: usize,
    prompt: &[u32],
    new_tokens: usize,
) -> Result<Rep> {
    let mut cache = new_cache(model, kind, window, prompt.len() + new_tokens + 1)?;
    // Each call feeds the tokens the cache has not seen yet; the token it generates is dropped
    // except after the last chunk.
    let mut prefill_time = Duration::ZERO;
    let mut first = 0;
    let chunk = prefill_chunk(kind, window).unwrap_or(prompt.len()).max(1);
    let mut end = 0;
    while end < prompt.len() {
        end = (end + chunk).min(prompt.len());
        let out = generate(
            model,
            &[prompt[..end].to_vec()],
            &GenerationConfig::greedy(1),
            Some(cache.as_mut()),
        )
        .with_context(|| format!("prefill of tokens ..{end}"))?;
        prefill_time += out.prefill;
        first = out.sequences[0][0];
    }
    let mut ids = prompt.to_vec();
    ids.push(first);
    let decode = generate(
        model,
        &[ids],
        &GenerationConfig::greedy(new_tokens - 1),
        Some(cache.as_mut()),
    )
    .context("decode")?;
    let produced = decode.sequences[0].len();
    if produced != new_tokens - 1 {
        bail!(
            "decode produced {produced} tokens instead of {}",
            new_tokens - 1
        );
    }
    let mut tokens = vec![first];
    tokens.extend(&decode.sequences[0]);
    Ok(Rep {
        prefill: prefill_time,
        first_step: decode.prefill,
        rest: decode.elapsed.saturating_sub(decode.prefill),
        steps: produced - 1,
        cache_bytes: decode.cache_bytes,
        tokens,
    })
}

fn run(args: &RunArgs) -> Result<()> {
    if args.new_tokens < 3 {
        bail!("--new-tokens must be at least 3 (the decode rate skips the first step)");
    }
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let spec: DeviceSpec = args.device.parse()?;
    let device = spec.init()?;
    let loaded = load(args, &device)?;
    let model = &loaded.model;
    let vocab = model.config.vocab_size;
    let model_name = model_name(&args.model);

    // Warm-up: first-touch allocations, kernel selection, thread pool start.
    let warm_start = Instant::now();
    one_rep(
        model,
        args.cache,
        args.window,
        &synthetic_prompt(16, vocab),
        4,
    )
    .context("warm-up generation")?;
    let warmup_seconds = warm_start.elapsed().as_secs_f64();

    for &len in &args.prompt_lens {
        if len == 0 {
            bail!("--prompt-len must be positive");
        }
        let prompt = synthetic_prompt(len, vocab);
        let mut reps = Vec::with_capacity(args.reps);
        for _ in 0..args.reps {
            reps.push(
                one_rep(model, args.cache, args.window, &prompt, args.new_tokens)
                    .with_context(|| format!("prompt of {len} tokens"))?,
            );
        }
        let secs = |f: fn(&Rep) -> Duration| -> Vec<f64> {
            reps.iter().map(|r| f(r).as_secs_f64()).collect()
        };
        let prefill_s = secs(|r| r.prefill);
        let rest_s = secs(|r| r.rest);
        let prefill_tps: Vec<f64> = prefill_s.iter().map(|s| len as f64 / s).collect();
        let decode_tps: Vec<f64> = reps
            .iter()
            .map(|r| r.steps as f64 / r.rest.as_secs_f64().max(f64::EPSILON))
            .collect();
        let line: Value = json!({
            "engine": "cachet",
            "model": model_name,
            "weights": args.weights.name(),
            "float_dtype": args.float_dtype,
            "cache": args.cache.name(),
            "window": matches!(args.cache, CacheKind::SlidingWindow | CacheKind::Sink).then_some(args.window),
            "prefill_chunk": prefill_chunk(args.cache, args.window).filter(|&c| c < len),
            "device": spec.to_string(),
            "threads": rayon::current_num_threads(),
            "prompt_len": len,
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "prefill_tok_s": median(&prefill_tps),
            "decode_tok_s": median(&decode_tps),
            "prefill_tok_s_all": prefill_tps,
            "decode_tok_s_all": decode_tps,
            "prefill_s": prefill_s,
            "first_decode_step_s": secs(|r| r.first_step),
            "decode_steps_s": rest_s,
            "decode_steps": reps[0].steps,
            "load_s": loaded.load_seconds,
            "warmup_s": warmup_seconds,
            "weight_bytes": loaded.weight_bytes,
            "decode_bytes_per_token": loaded.decode_bytes,
            "quantized_layers": loaded.quantized_layers,
            "cache_bytes": reps.last().map(|r| r.cache_bytes),
            "first_tokens": reps[0].tokens.iter().take(8).collect::<Vec<_>>(),
        });
        println!("{line}");
    }
    Ok(())
}

fn model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn memcpy(args: &MemcpyArgs) -> Result<()> {
    if args.mib == 0 || args.reps == 0 {
        bail!("--mib and --reps must be positive");
    }
    let threads = args.threads.unwrap_or_else(rayon::current_num_threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting the rayon pool")?;
    let bytes = args.mib << 20;
    let chunk = bytes.div_ceil(threads);
    // Both written in full first (a zeroed allocation maps its pages lazily, on first write),
    // then one untimed copy, so no page fault lands in a timed copy.
    let src: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let mut dst = vec![1u8; bytes];
    pool.install(|| {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    let mut copy_gb_s = Vec::with_capacity(args.reps);
    let mut read_gb_s = Vec::with_capacity(args.reps);
    for _ in 0..args.reps {
        let start = Instant::now();
        pool.install(|| {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
        });
        copy_gb_s.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
        // A read-only stream (what a decode step does to its weights), for reference.
        let start = Instant::now();
        let sum: u64 = pool.install(|| {
            dst.par_chunks(chunk)
                .map(|c| {
                    c.chunks_exact(8)
                        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                        .fold(0u64, u64::wrapping_add)
                })
                .reduce(|| 0, u64::wrapping_add)
        });
        read_gb_s.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
        std::hint::black_box(sum);
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let line = json!({
        "engine": "memcpy",
        "bytes": bytes,
        "threads": threads,
        "reps": args.reps,
        "gb_s": best(&copy_gb_s),
        "gb_s_all": copy_gb_s,
        "read_gb_s": best(&read_gb_s),
        "read_gb_s_all": read_gb_s,
        "definition": "bytes copied per second (1 GB = 1e9 bytes), best copy",
    });
    println!("{line}");
    Ok(())
}
