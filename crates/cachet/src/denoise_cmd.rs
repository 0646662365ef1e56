//! `cachet denoise`: a flow-matching denoising loop on a DiT (by default the embedded Flux trained
//! on handwritten digits, drawing the digit `--label`) with a diffusion cache attached; prints the
//! cache summary, optionally compares with the uncached loop (speedup, PSNR, and for the digits
//! model SSIM and the classifier's verdict) and writes the steps-mask plot and the images.

use std::path::{Path, PathBuf};

use crate::denoise_png::{FloatImage, digits_png, flux_image, latents_png, video_frame_image};
use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Distribution, Tensor};
use cachet::diffusion::models::{CogVideoX, FluxTransformer, embedded};
use cachet::diffusion::{
    CacheConfig, CacheHooks, CogVideoXCond, Denoise, DigitsFlux, FlowMatchEuler, FluxCond,
    GrayImage, Guidance, TensorFormat, denoise, latent_psnr, psnr, ssim, steps_mask_png, summary,
};
use cachet::nn::Pretrained;
use cachet::tensor::{DeviceSpec, Precision, human_bytes};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `cachet denoise`.
#[derive(clap::Args, Debug)]
pub struct DenoiseArgs {
    /// diffusers model directory (FluxTransformer2DModel or CogVideoXTransformer3DModel, or a
    /// digits model folder with digits.json); the embedded digits model when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Digit to draw (0-9), for the digits model.
    #[arg(long)]
    label: Option<usize>,
    /// Denoising steps [default: the digits model's 28, else 20].
    #[arg(long)]
    steps: Option<usize>,
    /// Cache method: none, pab, fastercache, fbcache, dbcache, taylorseer, magcache, dbprune or
    /// textkv (refused on Flux and CogVideoX, where it would not be lossless).
    #[arg(long, default_value = "dbcache")]
    cache: String,
    /// Method options as JSON with the Python field names (for dbcache and dbprune:
    /// {"cache_config": {...}, "calibrator_config": {"calibrator_type": "taylorseer" | "foca" |
    /// "dmd", ...}, "adapter": {...}}; magcache without "mag_ratios" calibrates them first).
    #[arg(long)]
    cache_config: Option<String>,
    /// Classifier-free guidance scale (runs an unconditional branch) [default: the digits
    /// model's 4.5, else none].
    #[arg(long)]
    cfg: Option<f64>,
    /// Run the CFG branches as two model calls instead of one batch.
    #[arg(long)]
    separate_cfg: bool,
    /// Latent height (Flux: before 2x2 packing) [default: 32; the digits model's is fixed].
    #[arg(long)]
    height: Option<usize>,
    /// Latent width [default: 32; the digits model's is fixed].
    #[arg(long)]
    width: Option<usize>,
    /// Latent frames (CogVideoX).
    #[arg(long, default_value_t = 2)]
    frames: usize,
    /// Text tokens of the (random, seeded) stand-in text conditioning of a text model [default:
    /// 16].
    #[arg(long)]
    text_tokens: Option<usize>,
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
    /// Write the result as a PNG: cached, uncached and their difference (the digits model's
    /// images, or the final latents of other models); runs the uncached loop too, as
    /// --reference does.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The model being denoised.
enum Model {
    Digits(Box<DigitsFlux>),
    Flux(FluxTransformer),
    CogVideoX(CogVideoX),
}

fn load_model(path: Option<&Path>, device: &Device, precision: Precision) -> Result<Model> {
    let Some(dir) = path else {
        return Ok(Model::Digits(Box::new(embedded::digits_flux(
            device, precision,
        )?)));
    };
    if DigitsFlux::is_digits_dir(dir) {
        return Ok(Model::Digits(Box::new(DigitsFlux::from_dir(
            dir, device, precision,
        )?)));
    }
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

/// Latent side of a text model when `--height`/`--width` are not given.
const DEFAULT_LATENT: usize = 32;
/// Stand-in text tokens when `--text-tokens` is not given.
const DEFAULT_TEXT_TOKENS: usize = 16;
/// Steps when `--steps` is not given and the model sets no default.
const DEFAULT_STEPS: usize = 20;

/// Sizes from the command line: positive, and a latent this machine can hold.
fn check_sizes(args: &DenoiseArgs) -> Result<()> {
    let (height, width) = (
        args.height.unwrap_or(DEFAULT_LATENT),
        args.width.unwrap_or(DEFAULT_LATENT),
    );
    let text_tokens = args.text_tokens.unwrap_or(DEFAULT_TEXT_TOKENS);
    for (flag, value) in [
        ("--height", height),
        ("--width", width),
        ("--frames", args.frames),
        ("--text-tokens", text_tokens),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if args.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    let positions = height
        .checked_mul(width)
        .and_then(|x| x.checked_mul(args.frames));
    if positions.is_none_or(|p| p > MAX_LATENT_POSITIONS) {
        bail!(
            "--height {height} × --width {width} × --frames {} is more than \
             {MAX_LATENT_POSITIONS} latent positions",
            args.frames
        );
    }
    if text_tokens > MAX_LATENT_POSITIONS {
        bail!("--text-tokens {text_tokens} is more than {MAX_LATENT_POSITIONS}");
    }
    Ok(())
}

/// Flags that only a text model reads, refused for the digits model (its size and
/// conditioning are fixed), and `--label`, refused for the others.
fn check_model_flags(args: &DenoiseArgs, model: &Model) -> Result<()> {
    match model {
        Model::Digits(digits) => {
            let side = digits.latent_size();
            for (flag, value) in [("--height", args.height), ("--width", args.width)] {
                if value.is_some_and(|v| v != side) {
                    bail!(
                        "{flag}: the digits model draws {0}x{0} images, an {side}x{side} latent",
                        digits.spec.image_size
                    );
                }
            }
            if args.text_tokens.is_some() {
                bail!("--text-tokens: the digits model is conditioned on --label, not on text");
            }
        }
        Model::Flux(_) | Model::CogVideoX(_) => {
            if args.label.is_some() {
                bail!(
                    "--label: this model has no label table (only a digits model folder, with \
                     digits.json, or the embedded default)"
                );
            }
        }
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
    check_model_flags(&args, &model)?;
    let mut config = CacheConfig::from_name(&args.cache, args.cache_config.as_deref())?;
    let guidance = |default: Option<f64>| {
        args.cfg.or(default).map(|scale| Guidance {
            scale,
            separate: args.separate_cfg,
        })
    };
    let (height, width) = (
        args.height.unwrap_or(DEFAULT_LATENT),
        args.width.unwrap_or(DEFAULT_LATENT),
    );
    let text_tokens = args.text_tokens.unwrap_or(DEFAULT_TEXT_TOKENS);
    device.seed(args.seed);
    match &model {
        Model::Digits(digits) => {
            let label = args.label.unwrap_or(DEFAULT_LABEL);
            let cond = digits.cond(Some(label), &device)?;
            let uncond = digits.cond(None, &device)?;
            let steps = args.steps.unwrap_or(digits.spec.num_inference_steps);
            let job = Job {
                model: &digits.model,
                scheduler: digits.scheduler(steps)?,
                noise: digits.noise(args.seed, &device),
                cond,
                uncond: Some(uncond),
                guidance: guidance(Some(digits.spec.guidance_scale)),
                quiet: args.json,
            };
            report(&args, &job, config, View::Digits { digits, label })
        }
        Model::Flux(flux) => {
            if !height.is_multiple_of(2) || !width.is_multiple_of(2) {
                bail!("--height and --width must be even for Flux (2x2 latent packing)");
            }
            let guidance = guidance(None);
            let tokens = (height / 2) * (width / 2);
            let channels = flux.config.in_channels;
            let noise = Tensor::random(
                [1, tokens, channels],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let cond = FluxCond::random(flux, 1, text_tokens, height, width, &device);
            let uncond =
                guidance.map(|_| FluxCond::random(flux, 1, text_tokens, height, width, &device));
            let steps = args.steps.unwrap_or(DEFAULT_STEPS);
            let scheduler = FlowMatchEuler::new(steps, 1.0, Some(FlowMatchEuler::flux_mu(tokens)))?;
            let job = Job {
                model: flux,
                scheduler,
                noise,
                cond,
                uncond,
                guidance,
                quiet: args.json,
            };
            let image = move |latents: &[f32], dims: [usize; 3]| {
                flux_image(latents, dims, height, width, channels)
            };
            report(&args, &job, config, View::Latents(&image))
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
            let guidance = guidance(None);
            let c = &cog.config;
            let (f, ch, h, w) = (args.frames, c.in_channels, height, width);
            let noise = Tensor::random([1, f, ch * h * w], Distribution::Normal(0.0, 1.0), &device);
            let text = |device: &Device| {
                Tensor::random(
                    [1, text_tokens, c.text_embed_dim],
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
            let scheduler = FlowMatchEuler::new(args.steps.unwrap_or(DEFAULT_STEPS), 3.0, None)?;
            let job = Job {
                model: cog,
                scheduler,
                noise,
                cond,
                uncond,
                guidance,
                quiet: args.json,
            };
            let image = move |latents: &[f32], _: [usize; 3]| video_frame_image(latents, ch, h, w);
            report(&args, &job, config, View::Latents(&image))
        }
    }
}

/// The digit drawn when `--label` is not given.
const DEFAULT_LABEL: usize = 7;

/// How a run's result is shown and judged.
enum View<'a> {
    /// The digits model: decoded images, SSIM and the classifier.
    Digits {
        digits: &'a DigitsFlux,
        label: usize,
    },
    /// Any other model: its final latents as an RGB view.
    Latents(&'a dyn Fn(&[f32], [usize; 3]) -> FloatImage),
}

fn report<M: Denoise>(
    args: &DenoiseArgs,
    job: &Job<'_, M>,
    config: CacheConfig,
    view: View<'_>,
) -> Result<()> {
    let method = config.method();
    let mut config = config;
    if let CacheConfig::MagCache(c) = &mut config {
        // num_inference_steps follows --steps unless given; missing ratios are measured first.
        let keep = args
            .cache_config
            .as_deref()
            .unwrap_or_default()
            .contains("num_inference_steps");
        let (model, noise, uncond) = (job.model, job.noise.clone(), job.uncond.as_ref());
        c.prepare(
            keep,
            model,
            &job.scheduler,
            noise,
            &job.cond,
            uncond,
            job.guidance,
        )?;
    }
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
    let judged = match &view {
        View::Digits { digits, label } => Some(judge(digits, *label, &cached, reference.as_ref())?),
        View::Latents(_) => None,
    };
    if let Some(path) = &args.plot {
        let title = format!("{method}: computed vs cached per step");
        std::fs::write(path, steps_mask_png(cached.hooks.log(), &title))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.out {
        let png = match (&judged, &view) {
            (Some(j), _) => digits_png(method, j),
            (None, View::Latents(image)) => latents_png(
                method,
                *image,
                (&cached.latents, cached.dims),
                reference.as_ref().map(|r| (r.latents.as_slice(), r.dims)),
            ),
            (None, View::Digits { .. }) => bail!("the digits were not decoded"),
        };
        std::fs::write(path, png).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let memory = cached.hooks.memory_bytes();
    let calibration = cached.hooks.magcache_calibration();
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
        if !calibration.is_empty() {
            value["magcache_calibration"] = serde_json::to_value(&calibration)?;
        }
        if let (Some(r), Some((psnr, max_abs))) = (&reference, quality) {
            value["reference_seconds"] = r.seconds.into();
            value["speedup"] = (r.seconds / cached.seconds).into();
            value["psnr_db"] = finite_or_null(psnr);
            value["max_abs_error"] = max_abs.into();
        }
        if let Some(j) = &judged {
            value["label"] = j.label.into();
            value["predicted"] = j.predicted.into();
            if let Some(u) = &j.uncached {
                value["reference_predicted"] = u.predicted.into();
                value["image_psnr_db"] = finite_or_null(u.psnr);
                value["image_ssim"] = u.ssim.into();
            }
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("{stats}");
    calibration.iter().for_each(|c| println!("{c}"));
    if cached_steps.is_empty() && method != "none" {
        let p50 = stats
            .contexts
            .iter()
            .find_map(|c| c.diffs.as_ref())
            .map(|d| d.p50);
        if let Some(p50) = p50 {
            println!(
                "note: no step was cached: the median residual diff is {p50:.3}, above the \
                 threshold; a threshold above it caches steps (see the method's options in the \
                 README)"
            );
        }
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
            "uncached: {:.2} s; speedup {:.2}x, latent PSNR {psnr:.2} dB, max |error| {max_abs:.4}",
            r.seconds,
            r.seconds / cached.seconds
        );
    }
    if let Some(j) = &judged {
        print!(
            "digit {}: the classifier reads the {method} image as {}",
            j.label, j.predicted
        );
        match &j.uncached {
            Some(u) => println!(
                ", the uncached one as {}; image PSNR {:.2} dB, SSIM {:.4}",
                u.predicted, u.psnr, u.ssim
            ),
            None => println!(),
        }
    }
    Ok(())
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        x.into()
    } else {
        serde_json::Value::Null
    }
}

/// The digits model's verdict on a run: the images, what the classifier reads, and against
/// the uncached run PSNR and SSIM of the images.
pub(crate) struct Judged {
    pub(crate) label: usize,
    pub(crate) image: GrayImage,
    pub(crate) predicted: usize,
    pub(crate) uncached: Option<Uncached>,
}

pub(crate) struct Uncached {
    pub(crate) image: GrayImage,
    pub(crate) predicted: usize,
    pub(crate) psnr: f64,
    pub(crate) ssim: f64,
}

/// Images in [-1, 1]: a range of 2.
pub(crate) const DATA_RANGE: f64 = 2.0;

fn judge(
    digits: &DigitsFlux,
    label: usize,
    cached: &Run,
    reference: Option<&Run>,
) -> Result<Judged> {
    let image = digits.decode(&cached.latents)?;
    let predicted = digits.classifier.predict(&image)?;
    let uncached = match reference {
        Some(r) => {
            let reference = digits.decode(&r.latents)?;
            Some(Uncached {
                predicted: digits.classifier.predict(&reference)?,
                psnr: psnr(&reference, &image, DATA_RANGE)?,
                ssim: ssim(&reference, &image, DATA_RANGE)?,
                image: reference,
            })
        }
        None => None,
    };
    Ok(Judged {
        label,
        image,
        predicted,
        uncached,
    })
}
