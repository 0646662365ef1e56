//! `cachet denoise`: a flow-matching denoising loop on a DiT (the embedded tiny Flux by default)
//! with a diffusion cache attached; prints the cache summary, optionally compares with the
//! uncached loop (speedup, PSNR) and writes the steps-mask plot and the final latents as images.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Distribution, Tensor};
use cachet::diffusion::models::{CogVideoX, FluxTransformer, embedded};
use cachet::diffusion::{
    CacheConfig, CacheHooks, CogVideoXCond, Denoise, FlowMatchEuler, FluxCond, Guidance,
    TensorFormat, denoise, latent_psnr, steps_mask_png, summary,
};
use cachet::nn::Pretrained;
use cachet::tensor::{DeviceSpec, Precision, human_bytes};
use cachet_plot::{Canvas, Rgb, WHITE};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `cachet denoise`.
#[derive(clap::Args, Debug)]
pub struct DenoiseArgs {
    /// diffusers model directory (FluxTransformer2DModel or CogVideoXTransformer3DModel); the
    /// embedded tiny Flux when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Cache method: none, pab, fastercache, fbcache, dbcache or taylorseer.
    #[arg(long, default_value = "dbcache")]
    cache: String,
    /// Method options as JSON with the Python field names (for dbcache: {"cache_config": {...},
    /// "calibrator_config": {...}, "adapter": {...}}).
    #[arg(long)]
    cache_config: Option<String>,
    /// Classifier-free guidance scale (runs an unconditional branch).
    #[arg(long)]
    cfg: Option<f64>,
    /// Run the CFG branches as two model calls instead of one batch.
    #[arg(long)]
    separate_cfg: bool,
    /// Latent height (Flux: before 2x2 packing).
    #[arg(long, default_value_t = 32)]
    height: usize,
    /// Latent width.
    #[arg(long, default_value_t = 32)]
    width: usize,
    /// Latent frames (CogVideoX).
    #[arg(long, default_value_t = 2)]
    frames: usize,
    /// Text tokens of the (random, seeded) stand-in text conditioning.
    #[arg(long, default_value_t = 16)]
    text_tokens: usize,
    /// Seed of the noise and the conditioning.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu, wgpu, wgpu:N, wgpu:cpu or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Also run the uncached loop and report speedup, PSNR and max error against it.
    #[arg(long)]
    reference: bool,
    /// Write the steps-mask plot (computed vs cached per step and block list) to this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write the final latents as an image: cached | uncached | difference (runs the uncached
    /// loop too, as --reference does).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The model being denoised.
enum Model {
    Flux(FluxTransformer),
    CogVideoX(CogVideoX),
}

fn load_model(path: Option<&Path>, device: &Device, precision: Precision) -> Result<Model> {
    let Some(dir) = path else {
        return Ok(Model::Flux(embedded::tiny_flux(device, precision)?));
    };
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", config_path.display()))?;
    match value.get("_class_name").and_then(|v| v.as_str()) {
        Some("CogVideoXTransformer3DModel") => Ok(Model::CogVideoX(CogVideoX::from_pretrained(
            dir, device, precision,
        )?)),
        Some("FluxTransformer2DModel") | None => Ok(Model::Flux(FluxTransformer::from_pretrained(
            dir, device, precision,
        )?)),
        Some(other) => bail!(
            "{}: unsupported model class {other:?} (Flux or CogVideoX)",
            config_path.display()
        ),
    }
}

/// One loop's result and the hooks that ran it.
struct Run {
    latents: Vec<f32>,
    dims: [usize; 3],
    seconds: f64,
    calls: usize,
    hooks: CacheHooks,
}

struct Job<'a, M: Denoise> {
    model: &'a M,
    scheduler: FlowMatchEuler,
    noise: Tensor<3>,
    cond: M::Cond,
    uncond: Option<M::Cond>,
    guidance: Option<Guidance>,
    quiet: bool,
}

impl<M: Denoise> Job<'_, M> {
    fn run(&self, config: CacheConfig, label: &str) -> Result<Run> {
        let mut hooks = CacheHooks::new(self.model, config)?;
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(self.scheduler.len() as u64)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} steps {elapsed_precise}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        let out = denoise(
            self.model,
            &mut hooks,
            &self.scheduler,
            self.noise.clone(),
            &self.cond,
            self.uncond.as_ref(),
            self.guidance,
            |_| bar.inc(1),
        )?;
        bar.finish_and_clear();
        let dims = out.latents.dims();
        let latents: Vec<f32> = out
            .latents
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .map_err(|e| anyhow::anyhow!("cannot read latents: {e:?}"))?;
        Ok(Run {
            latents,
            dims,
            seconds: out.seconds,
            calls: out.model_calls,
            hooks,
        })
    }
}

/// Most latent values accepted (height × width × frames), so a typo is an error, not an
/// allocation abort: 2^26 (a 4k×4k latent, or 64 frames of 1k×1k).
const MAX_LATENT_POSITIONS: usize = 1 << 26;

/// Sizes from the command line: positive, and a latent this machine can hold.
fn check_sizes(args: &DenoiseArgs) -> Result<()> {
    for (flag, value) in [
        ("--height", args.height),
        ("--width", args.width),
        ("--frames", args.frames),
        ("--text-tokens", args.text_tokens),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    let positions = args
        .height
        .checked_mul(args.width)
        .and_then(|x| x.checked_mul(args.frames));
    if positions.is_none_or(|p| p > MAX_LATENT_POSITIONS) {
        bail!(
            "--height {} × --width {} × --frames {} is more than {MAX_LATENT_POSITIONS} latent positions",
            args.height,
            args.width,
            args.frames
        );
    }
    if args.text_tokens > MAX_LATENT_POSITIONS {
        bail!(
            "--text-tokens {} is more than {MAX_LATENT_POSITIONS}",
            args.text_tokens
        );
    }
    Ok(())
}

/// Runs `cachet denoise`.
pub fn run(args: DenoiseArgs) -> Result<()> {
    let spec: DeviceSpec = args.device.parse()?;
    let device = spec.init()?;
    let precision: Precision = args.dtype.parse()?;
    check_sizes(&args)?;
    let model = load_model(args.model.as_deref(), &device, precision)?;
    let mut config = CacheConfig::from_name(&args.cache, args.cache_config.as_deref())?;
    let guidance = args.cfg.map(|scale| Guidance {
        scale,
        separate: args.separate_cfg,
    });
    device.seed(args.seed);
    match &model {
        Model::Flux(flux) => {
            if !args.height.is_multiple_of(2) || !args.width.is_multiple_of(2) {
                bail!("--height and --width must be even for Flux (2x2 latent packing)");
            }
            let tokens = (args.height / 2) * (args.width / 2);
            let channels = flux.config.in_channels;
            let noise = Tensor::random(
                [1, tokens, channels],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let cond =
                FluxCond::random(flux, 1, args.text_tokens, args.height, args.width, &device);
            let uncond = guidance.map(|_| {
                FluxCond::random(flux, 1, args.text_tokens, args.height, args.width, &device)
            });
            let scheduler =
                FlowMatchEuler::new(args.steps, 1.0, Some(FlowMatchEuler::flux_mu(tokens)))?;
            let job = Job {
                model: flux,
                scheduler,
                noise,
                cond,
                uncond,
                guidance,
                quiet: args.json,
            };
            report(&args, &job, config, |latents, dims| {
                flux_image(
                    latents,
                    dims,
                    args.height,
                    args.width,
                    flux.config.in_channels,
                )
            })
        }
        Model::CogVideoX(cog) => {
            if let CacheConfig::FasterCache(fc) = &mut config {
                let given = args
                    .cache_config
                    .as_deref()
                    .is_some_and(|c| c.contains("tensor_format"));
                if !given {
                    fc.tensor_format = TensorFormat::Bfchw;
                }
            }
            let c = &cog.config;
            let (f, ch, h, w) = (args.frames, c.in_channels, args.height, args.width);
            let noise = Tensor::random([1, f, ch * h * w], Distribution::Normal(0.0, 1.0), &device);
            let text = |device: &Device| {
                Tensor::random(
                    [1, args.text_tokens, c.text_embed_dim],
                    Distribution::Normal(0.0, 1.0),
                    device,
                )
            };
            let cond = CogVideoXCond {
                encoder_hidden_states: text(&device),
                shape: [f, ch, h, w],
            };
            let uncond = guidance.map(|_| CogVideoXCond {
                encoder_hidden_states: text(&device),
                shape: [f, ch, h, w],
            });
            let scheduler = FlowMatchEuler::new(args.steps, 3.0, None)?;
            let job = Job {
                model: cog,
                scheduler,
                noise,
                cond,
                uncond,
                guidance,
                quiet: args.json,
            };
            report(&args, &job, config, |latents, _| {
                video_frame_image(latents, ch, h, w)
            })
        }
    }
}

fn report<M: Denoise>(
    args: &DenoiseArgs,
    job: &Job<'_, M>,
    config: CacheConfig,
    image: impl Fn(&[f32], [usize; 3]) -> FloatImage,
) -> Result<()> {
    let method = config.method();
    let with_reference = args.reference || args.out.is_some();
    if with_reference {
        // One untimed step first, so neither timed loop pays for first-use allocations.
        let warm = Job {
            model: job.model,
            scheduler: FlowMatchEuler::new(1, 1.0, None)?,
            noise: job.noise.clone(),
            cond: job.cond.clone(),
            uncond: job.uncond.clone(),
            guidance: job.guidance,
            quiet: true,
        };
        warm.run(CacheConfig::None, "warm-up")?;
    }
    let cached = job.run(config, method)?;
    let reference = if with_reference {
        Some(job.run(CacheConfig::None, "uncached")?)
    } else {
        None
    };
    let stats = summary(&cached.hooks);
    let steps = job.scheduler.len();
    let cached_steps: std::collections::BTreeSet<usize> = cached
        .hooks
        .log()
        .decisions
        .iter()
        .filter(|d| d.action != cachet::diffusion::Action::Computed)
        .map(|d| d.step)
        .collect();
    let quality = reference
        .as_ref()
        .map(|r| latent_psnr(&r.latents, &cached.latents));
    if let Some(path) = &args.plot {
        let title = format!("{method}: computed vs cached per step");
        std::fs::write(path, steps_mask_png(cached.hooks.log(), &title))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.out {
        let mut panels = vec![(method.to_string(), image(&cached.latents, cached.dims))];
        if let Some(r) = &reference {
            panels.push(("uncached".to_string(), image(&r.latents, r.dims)));
            let diff: Vec<f32> = r
                .latents
                .iter()
                .zip(&cached.latents)
                .map(|(a, b)| (a - b).abs())
                .collect();
            panels.push(("|difference|".to_string(), image(&diff, r.dims)));
        }
        std::fs::write(path, panels_png(&panels))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let memory = cached.hooks.memory_bytes();
    if args.json {
        let mut value = serde_json::json!({
            "method": method,
            "steps": steps,
            "seconds": cached.seconds,
            "model_calls": cached.calls,
            "computed_steps": steps - cached_steps.len(),
            "cached_steps": cached_steps.len(),
            "cache_memory_bytes": memory,
            "summary": stats,
        });
        if let (Some(r), Some((psnr, max_abs))) = (&reference, quality) {
            value["reference_seconds"] = r.seconds.into();
            value["speedup"] = (r.seconds / cached.seconds).into();
            value["psnr_db"] = if psnr.is_finite() {
                psnr.into()
            } else {
                serde_json::Value::Null
            };
            value["max_abs_error"] = max_abs.into();
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("{stats}");
    if cached_steps.is_empty() && method != "none" {
        let p50 = stats
            .contexts
            .iter()
            .find_map(|c| c.diffs.as_ref())
            .map(|d| d.p50);
        let hint = match method {
            "dbcache" => r#"'{"cache_config": {"residual_diff_threshold": 0.8}}'"#,
            "fbcache" => r#"'{"threshold": 0.8}'"#,
            _ => "(see the method's options in the README)",
        };
        println!(
            "note: no step was cached{}. The embedded model has random weights, whose features \
             change more between steps than a trained model's; try --cache-config {hint}",
            p50.map(|p| format!(" (median residual diff {p:.3})"))
                .unwrap_or_default()
        );
    }
    println!(
        "{method}: {steps} steps in {:.2} s ({} model calls), {} steps with cached work, cache holds {}",
        cached.seconds,
        cached.calls,
        cached_steps.len(),
        human_bytes(memory as u64)
    );
    if let (Some(r), Some((psnr, max_abs))) = (&reference, quality) {
        println!(
            "uncached: {:.2} s; speedup {:.2}x, PSNR {psnr:.2} dB, max |error| {max_abs:.4}",
            r.seconds,
            r.seconds / cached.seconds
        );
    }
    Ok(())
}

/// Flux latents `[1, (h/2)(w/2), 4C]` unpacked (`_unpack_latents`) to an RGB view of channels 0–2.
fn flux_image(latents: &[f32], _dims: [usize; 3], h: usize, w: usize, packed: usize) -> FloatImage {
    // A DiT with fewer than 4 packed channels still has channel 0: show it in every colour.
    let c = (packed / 4).max(1);
    let stride = packed / c;
    let at = |ch: usize, y: usize, x: usize| {
        let token = (y / 2) * (w / 2) + x / 2;
        let sub = (y % 2) * 2 + x % 2;
        latents[token * packed + ch * stride + sub.min(stride - 1)]
    };
    let mut pixels = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            pixels.push([at(0, y, x), at(1.min(c - 1), y, x), at(2.min(c - 1), y, x)]);
        }
    }
    (w, h, pixels)
}

/// The first frame of CogVideoX latents `[1, F, C·H·W]`, channels 0–2.
fn video_frame_image(latents: &[f32], c: usize, h: usize, w: usize) -> FloatImage {
    let at = |ch: usize, y: usize, x: usize| latents[(ch.min(c - 1) * h + y) * w + x];
    let pixels = (0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .map(|(y, x)| [at(0, y, x), at(1, y, x), at(2, y, x)])
        .collect();
    (w, h, pixels)
}

/// Side-by-side panels, each channel min-max normalised, upscaled to at least 192 px.
/// An RGB image as floats: width, height, pixels row by row.
type FloatImage = (usize, usize, Vec<[f32; 3]>);

fn panels_png(panels: &[(String, FloatImage)]) -> Vec<u8> {
    let zoom = panels
        .first()
        .map_or(1, |(_, (w, h, _))| (192 / (*w).max(*h).max(1)).max(1));
    let (gap, top) = (8, 28);
    let width: usize = panels
        .iter()
        .map(|(_, (w, _, _))| w * zoom + gap)
        .sum::<usize>()
        + gap;
    let height = panels
        .iter()
        .map(|(_, (_, h, _))| h * zoom)
        .max()
        .unwrap_or(0)
        + top
        + gap;
    let mut canvas = Canvas::new(width, height, WHITE);
    let mut x0 = gap;
    for (title, (w, h, pixels)) in panels {
        canvas.text(x0 as i64, 8, title, 2, [30, 30, 30]);
        let mut lo = [f32::INFINITY; 3];
        let mut hi = [f32::NEG_INFINITY; 3];
        for p in pixels {
            for k in 0..3 {
                lo[k] = lo[k].min(p[k]);
                hi[k] = hi[k].max(p[k]);
            }
        }
        for y in 0..*h {
            for x in 0..*w {
                let p = pixels[y * w + x];
                let color: Rgb = std::array::from_fn(|k| {
                    let span = (hi[k] - lo[k]).max(1e-12);
                    (((p[k] - lo[k]) / span) * 255.0).round() as u8
                });
                canvas.fill_rect(
                    (x0 + x * zoom) as i64,
                    (top + y * zoom) as i64,
                    zoom as i64,
                    zoom as i64,
                    color,
                );
            }
        }
        x0 += w * zoom + gap;
    }
    canvas.to_png()
}
