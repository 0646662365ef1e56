//! `cachet kv-memory`: measures the memory every KV cache type holds as the context grows and
//! plots it to a PNG.
//!
//! Nothing is computed by formula: one layer of each cache is filled through [`Cache::update`]
//! with random keys and values, step by step, and [`Cache::memory_bytes`] is read at each context
//! point; the plot shows that times the number of layers.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{Distribution, Tensor};
use cachet::kv::{Cache, CacheConfig, CacheImplementation, ModelCacheInfo, build_cache};
use cachet::models::LlamaConfig;
use cachet::models::Rope;
use cachet::models::inverse_frequencies;
use cachet::tensor::{DeviceSpec, Precision, cast_checked, human_bytes};
use cachet_plot::{LineChart, Marker, Rgb, Series};

/// Llama-3-8B's RoPE base, used for the sink cache's re-rotation when no `--model` is given.
const LLAMA3_ROPE_THETA: f64 = 500_000.0;
/// Tokens per `update` call at most.
const CHUNK: usize = 256;
/// Sink tokens of the sink cache (transformers' default).
const SINK_TOKENS: usize = 4;
/// Bits and full-precision residual tokens of the quantized cache (transformers' defaults).
const QUANT_BITS: u8 = 4;
const QUANT_RESIDUAL: usize = 128;
/// PNG size.
const WIDTH: usize = 1280;
const HEIGHT: usize = 760;

/// Arguments of `cachet kv-memory`.
#[derive(clap::Args, Debug)]
pub struct KvMemoryArgs {
    /// PNG file to write.
    #[arg(long, default_value = "kv-memory.png")]
    out: PathBuf,
    /// Longest context measured, in tokens.
    #[arg(long, default_value_t = 8192)]
    max_context: usize,
    /// Context lengths measured (evenly spaced up to --max-context).
    #[arg(long, default_value_t = 16)]
    points: usize,
    /// Read layers, kv heads and head_dim from this checkpoint's config.json (else Llama-3-8B's).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Decoder layers [default: 32, or the model's].
    #[arg(long)]
    layers: Option<usize>,
    /// Key/value heads [default: 8, or the model's].
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Per-head width [default: 128, or the model's].
    #[arg(long)]
    head_dim: Option<usize>,
    /// Cache dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Window of the sliding_window and sink caches, in tokens [default: 4096, or the model's
    /// sliding_window].
    #[arg(long)]
    window: Option<usize>,
    /// Also print the measured series as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The cache shape being measured.
#[derive(Debug, Clone)]
struct Shape {
    name: String,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    window: usize,
    rope: Rope,
}

impl Shape {
    fn from_args(args: &KvMemoryArgs) -> Result<Self> {
        let (name, layers, kv_heads, head_dim, window, rope) = match &args.model {
            Some(dir) => {
                let path = dir.join("config.json");
                let config = LlamaConfig::from_file(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                (
                    dir.file_name()
                        .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
                    config.num_hidden_layers,
                    config.kv_heads(),
                    config.head_dim(),
                    config.sliding_window.unwrap_or(4096),
                    config.rope()?,
                )
            }
            None => (
                "Llama-3-8B".to_string(),
                32,
                8,
                128,
                4096,
                Rope::Default {
                    theta: LLAMA3_ROPE_THETA,
                },
            ),
        };
        let overridden = [
            (args.layers, layers),
            (args.kv_heads, kv_heads),
            (args.head_dim, head_dim),
        ]
        .iter()
        .any(|&(given, base)| given.is_some_and(|g| g != base));
        let shape = Self {
            name: if overridden {
                format!("{name} (modified)")
            } else {
                name
            },
            layers: args.layers.unwrap_or(layers),
            kv_heads: args.kv_heads.unwrap_or(kv_heads),
            head_dim: args.head_dim.unwrap_or(head_dim),
            window: args.window.unwrap_or(window),
            rope,
        };
        if shape.layers == 0 || shape.kv_heads == 0 {
            bail!("--layers and --kv-heads must be at least 1");
        }
        if shape.head_dim < 2 || !shape.head_dim.is_multiple_of(2) {
            bail!(
                "--head-dim must be even and at least 2 (RoPE), got {}",
                shape.head_dim
            );
        }
        if shape.window <= 2 * SINK_TOKENS {
            bail!(
                "--window must be larger than {} (the sink cache keeps {SINK_TOKENS} sink tokens), got {}",
                2 * SINK_TOKENS,
                shape.window
            );
        }
        Ok(shape)
    }
}

/// One cache type's measurements.
struct Measured {
    cache: CacheImplementation,
    /// `memory_bytes()` of the one filled layer at each context point.
    layer_bytes: Vec<usize>,
}

/// The context lengths measured: `points` evenly spaced values ending at `max`.
fn context_points(max: usize, points: usize) -> Vec<usize> {
    let mut out: Vec<usize> = (1..=points).map(|i| (max * i).div_ceil(points)).collect();
    out.dedup();
    out
}

/// The `(start, len)` update steps that reach every point, at most `chunk` tokens each.
fn schedule(points: &[usize], chunk: usize) -> Vec<(usize, usize)> {
    let mut steps = Vec::new();
    let mut at = 0;
    for &point in points {
        while at < point {
            let len = chunk.min(point - at);
            steps.push((at, len));
            at += len;
        }
    }
    steps
}

fn cache_config(cache: CacheImplementation, shape: &Shape, max_context: usize) -> CacheConfig {
    let mut config = CacheConfig::default();
    match cache {
        CacheImplementation::Static | CacheImplementation::OffloadedStatic => {
            config.max_cache_len = Some(max_context);
        }
        CacheImplementation::SlidingWindow => config.sliding_window = Some(shape.window),
        CacheImplementation::Sink => {
            config.window_length = Some(shape.window);
            config.num_sink_tokens = Some(SINK_TOKENS);
        }
        CacheImplementation::Quantized => {
            config.nbits = Some(QUANT_BITS);
            config.residual_length = Some(QUANT_RESIDUAL);
        }
        _ => {}
    }
    config
}

fn style(cache: CacheImplementation) -> (Rgb, bool, Marker, i64) {
    // Series that coincide with an earlier one (offloaded = dynamic, offloaded_static = static,
    // sink = sliding_window past the window, dynamic = static once it has doubled to the full
    // context) are dashed and have smaller markers, drawn over the larger ones, so all show.
    match cache {
        CacheImplementation::Dynamic => ([31, 119, 180], false, Marker::Circle, 5),
        CacheImplementation::Static => ([255, 127, 14], false, Marker::Square, 7),
        CacheImplementation::Offloaded => ([44, 160, 44], true, Marker::Diamond, 3),
        CacheImplementation::OffloadedStatic => ([214, 39, 40], true, Marker::TriangleUp, 4),
        CacheImplementation::Quantized => ([148, 103, 189], false, Marker::Plus, 5),
        CacheImplementation::SlidingWindow => ([140, 86, 75], false, Marker::TriangleDown, 7),
        CacheImplementation::Sink => ([227, 119, 194], true, Marker::Cross, 4),
    }
}

fn legend_name(cache: CacheImplementation, shape: &Shape) -> String {
    match cache {
        CacheImplementation::Offloaded | CacheImplementation::OffloadedStatic => {
            format!("{cache} (host)")
        }
        CacheImplementation::SlidingWindow => format!("{cache} ({})", shape.window),
        CacheImplementation::Sink => format!("{cache} ({}, {SINK_TOKENS} sinks)", shape.window),
        CacheImplementation::Quantized => {
            format!("{cache} ({QUANT_BITS}-bit)")
        }
        _ => cache.to_string(),
    }
}

/// Runs `cachet kv-memory`.
pub fn run(args: KvMemoryArgs) -> Result<()> {
    let started = Instant::now();
    let shape = Shape::from_args(&args)?;
    let precision: Precision = args.dtype.parse()?;
    if args.max_context == 0 || args.points == 0 {
        bail!("--max-context and --points must be at least 1");
    }
    let device = DeviceSpec::Cpu.init()?;
    let points = context_points(args.max_context, args.points.min(args.max_context));
    // The sink cache refuses an update of `window - sinks` tokens or more once full.
    let chunk = CHUNK.min((shape.window - SINK_TOKENS) / 2).max(1);
    let steps = schedule(&points, chunk);

    // The same random keys/values feed every cache.
    let inputs = steps
        .iter()
        .map(|&(_, len)| -> Result<(Tensor<4>, Tensor<4>)> {
            let dims = [1, shape.kv_heads, len, shape.head_dim];
            let random = || Tensor::<4>::random(dims, Distribution::Default, &device);
            Ok((
                cast_checked(random(), precision)?,
                cast_checked(random(), precision)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;

    let info = ModelCacheInfo {
        num_layers: shape.layers,
        sliding_window: None,
        rope_inv_freq: inverse_frequencies(shape.rope, shape.head_dim).0,
    };
    let mut measured = Vec::new();
    let mut skipped = Vec::new();
    for cache in CacheImplementation::ALL {
        let config = cache_config(cache, &shape, args.max_context);
        let mut built = match build_cache(cache, &config, &info, &device, args.max_context) {
            Ok(built) => built,
            Err(err) => {
                eprintln!("note: skipping the {cache} cache: {err}");
                skipped.push(
                    serde_json::json!({ "cache": cache.as_str(), "reason": err.to_string() }),
                );
                continue;
            }
        };
        let layer_bytes = fill(built.as_mut(), &steps, &inputs, &points)
            .with_context(|| format!("filling the {cache} cache"))?;
        measured.push(Measured { cache, layer_bytes });
    }
    if measured.is_empty() {
        bail!("no cache type could be built");
    }

    let total = |bytes: usize| bytes * shape.layers;
    let peak = measured
        .iter()
        .flat_map(|m| m.layer_bytes.iter().map(|&b| total(b)))
        .max()
        .unwrap_or(0);
    let (unit, divisor) = if peak >= 1 << 30 {
        ("GiB", (1u64 << 30) as f64)
    } else if peak >= 1 << 20 {
        ("MiB", (1u64 << 20) as f64)
    } else {
        ("KiB", 1024.0)
    };
    let chart = LineChart {
        title: format!("KV cache memory vs context length, {}", shape.name),
        subtitle: format!(
            "memory_bytes() of one filled layer x {} layers; {} kv heads, head_dim {}, {precision}, batch 1",
            shape.layers, shape.kv_heads, shape.head_dim
        ),
        x_label: "context length (tokens)".into(),
        y_label: format!("KV cache memory ({unit}, all {} layers)", shape.layers),
        x_pow2_ticks: true,
        series: measured
            .iter()
            .map(|m| {
                let (color, dashed, marker, marker_size) = style(m.cache);
                Series {
                    name: legend_name(m.cache, &shape),
                    color,
                    dashed,
                    marker,
                    marker_size,
                    points: points
                        .iter()
                        .zip(&m.layer_bytes)
                        .map(|(&n, &b)| (n as f64, total(b) as f64 / divisor))
                        .collect(),
                }
            })
            .collect(),
        notes: skipped
            .iter()
            .map(|s| format!("({} not built)", s["cache"].as_str().unwrap_or("?")))
            .collect(),
    };
    let png = chart.render(WIDTH, HEIGHT).to_png();
    std::fs::write(&args.out, &png).with_context(|| format!("writing {}", args.out.display()))?;
    let seconds = started.elapsed().as_secs_f64();

    if args.json {
        let series: Vec<_> = measured
            .iter()
            .map(|m| {
                serde_json::json!({
                    "cache": m.cache.as_str(),
                    "layer_bytes": m.layer_bytes,
                    "bytes": m.layer_bytes.iter().map(|&b| total(b)).collect::<Vec<_>>(),
                })
            })
            .collect();
        let value = serde_json::json!({
            "out": args.out.display().to_string(),
            "model": shape.name,
            "layers": shape.layers,
            "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "dtype": precision.to_string(),
            "window": shape.window,
            "chunk": chunk,
            "context": points,
            "series": series,
            "skipped": skipped,
            "width": WIDTH,
            "height": HEIGHT,
            "seconds": seconds,
        });
        println!("{}", serde_json::to_string(&value)?);
    } else {
        let last = points.last().copied().unwrap_or(0);
        println!(
            "KV cache memory at {last} tokens ({} layers x {} kv heads x head_dim {}, {precision}):",
            shape.layers, shape.kv_heads, shape.head_dim
        );
        for m in &measured {
            let bytes = total(m.layer_bytes.last().copied().unwrap_or(0));
            println!(
                "  {:<26} {}",
                legend_name(m.cache, &shape),
                human_bytes(bytes as u64)
            );
        }
        println!("wrote {} ({seconds:.1} s)", args.out.display());
    }
    Ok(())
}

/// Feeds `inputs` to layer 0 of `cache` step by step and reads its memory at every point.
fn fill(
    cache: &mut dyn Cache,
    steps: &[(usize, usize)],
    inputs: &[(Tensor<4>, Tensor<4>)],
    points: &[usize],
) -> Result<Vec<usize>> {
    let mut bytes = Vec::with_capacity(points.len());
    let mut next_point = points.iter().peekable();
    for (&(start, len), (keys, values)) in steps.iter().zip(inputs) {
        let positions: Vec<usize> = (start..start + len).collect();
        cache.update(0, keys.clone(), values.clone(), &positions)?;
        if next_point.peek() == Some(&&(start + len)) {
            next_point.next();
            bytes.push(cache.memory_bytes());
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_and_steps_cover_the_context() {
        assert_eq!(context_points(1024, 4), [256, 512, 768, 1024]);
        assert_eq!(context_points(10, 3), [4, 7, 10]);
        let steps = schedule(&[256, 512], 100);
        assert_eq!(steps.len(), 6);
        assert_eq!(steps[2], (200, 56));
        assert_eq!(steps.last(), Some(&(456, 56)));
    }
}
