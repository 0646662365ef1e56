//! Speedup and quality of every cache method on the embedded digits model
//! (`models::embedded::digits_flux`: a Flux of 6 double + 12 single blocks, width 64, trained with
//! flow matching on scikit-learn's handwritten digits), on the CPU backend, at the settings the
//! methods' documentation gives, 28 Euler steps, classifier-free guidance 4.5 (both branches in
//! one batch), every digit 0–9 drawn from several seeds.
//!
//! Two parts:
//!
//! - `diffusion_step/{reference,none}` (criterion): one guided model call without hooks
//!   (`cachet_diffusion::models::NoHooks`) and with `CacheHooks` attached but caching disabled
//!   (`CacheConfig::None`) — the hooks' overhead, as the ratio of the two in `cargo xtask bench`.
//! - `diffusion_cache/<variant>` (a measured loop, since one sample is a whole denoising run):
//!   `cachet_diffusion::denoise` of every (label, seed) for every method, the methods run back to
//!   back on each image, over a few rounds; a variant's time is the sum over the images of each
//!   image's fastest round (other processes share the machine). Each image is
//!   compared with the uncached run's (`none`): PSNR (data range 2, images in [-1, 1]) and SSIM
//!   (Gaussian window, Wang et al. 2004), averaged over the images; the digit classifier shipped
//!   with the model reads every image (accuracy = share read as the label asked for). The table
//!   is printed and written to `target/cachet-bench/diffusion_cache.md`, which `cargo xtask
//!   bench` prints after criterion's.
//!
//! Set `CACHET_BENCH_SEEDS` (seeds per digit, default 3), `CACHET_BENCH_STEPS`,
//! `CACHET_BENCH_ROUNDS` (default 2) to change the workload, and `CACHET_BENCH_DEBUG=1` to print
//! every residual diff of the first sample.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor};
use cachet_diffusion::models::{FluxTransformer, HookableDit, NoHooks, embedded};
use cachet_diffusion::{
    Action, CacheConfig, CacheHooks, Denoise, DigitsFlux, FluxCond, GrayImage, Guidance, denoise,
    psnr, ssim,
};
use cachet_tensor::{DeviceSpec, Precision, human_bytes};
use criterion::{Criterion, SamplingMode};

mod upstream;

/// Images are in [-1, 1].
const DATA_RANGE: f64 = 2.0;

/// One image to draw.
struct Sample {
    label: usize,
    noise: Tensor<3>,
    /// `[uncond; cond]` conditioning, as the batched CFG loop stacks it.
    cond: FluxCond,
    uncond: FluxCond,
}

struct Setup {
    digits: DigitsFlux,
    steps: usize,
    guidance: Guidance,
    samples: Vec<Sample>,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn setup(device: &Device) -> Setup {
    let digits = embedded::digits_flux(device, Precision::F32).expect("embedded digits model");
    let steps = env_usize("CACHET_BENCH_STEPS", digits.spec.num_inference_steps);
    let seeds = env_usize("CACHET_BENCH_SEEDS", 3).max(1);
    let mut samples = Vec::new();
    for seed in 0..seeds as u64 {
        for label in 0..digits.spec.num_labels {
            samples.push(Sample {
                label,
                noise: digits.noise(1000 + seed, device),
                cond: digits.cond(Some(label), device).expect("cond"),
                uncond: digits.cond(None, device).expect("uncond"),
            });
        }
    }
    let guidance = Guidance {
        scale: digits.spec.guidance_scale,
        separate: false,
    };
    Setup {
        digits,
        steps,
        guidance,
        samples,
    }
}

/// A method's config from its name and options with the Python field names, as the CLI takes
/// them.
fn config(name: &str, options: &str) -> CacheConfig {
    CacheConfig::from_name(name, Some(options)).unwrap_or_else(|e| panic!("{name} {options}: {e}"))
}

/// `(name, config)` of every measured variant; `reference` runs without hooks.
fn variants() -> Vec<(String, Option<CacheConfig>)> {
    let mut v: Vec<(String, Option<CacheConfig>)> = vec![
        ("reference".into(), None),
        ("none".into(), Some(CacheConfig::None)),
    ];
    let mut add = |name: &str, method: &str, options: &str| {
        v.push((name.to_string(), Some(config(method, options))));
    };
    // diffusers' FirstBlockCache documentation: FirstBlockCacheConfig(threshold=0.2).
    add("fbcache_0.2", "fbcache", r#"{"threshold": 0.2}"#);
    add("fbcache_0.12", "fbcache", r#"{"threshold": 0.12}"#);
    // cache-dit's defaults (F8B0, 8 warm-up steps) at the documented thresholds, with and
    // without the TaylorSeer calibrator (order 1, as cache-dit's examples).
    let taylor = r#""calibrator_config": {"calibrator_type": "taylorseer", "taylorseer_order": 1}"#;
    for t in ["0.08", "0.12"] {
        let cache = format!(r#""cache_config": {{"residual_diff_threshold": {t}}}"#);
        add(
            &format!("dbcache_F8B0_R{t}"),
            "dbcache",
            &format!("{{{cache}}}"),
        );
        add(
            &format!("dbcache_F8B0_R{t}_taylorseer"),
            "dbcache",
            &format!("{{{cache}, {taylor}}}"),
        );
    }
    // Fewer always-computed blocks and warm-up steps (cache-dit's F1B0 / F4B0 examples).
    for (f, w) in [(4, 4), (1, 4)] {
        let cache = format!(
            r#""cache_config": {{"Fn_compute_blocks": {f}, "residual_diff_threshold": 0.12, "max_warmup_steps": {w}}}"#
        );
        add(
            &format!("dbcache_F{f}B0_R0.12_W{w}_taylorseer"),
            "dbcache",
            &format!("{{{cache}, {taylor}}}"),
        );
    }
    // diffusers' PAB example for Flux: spatial attention every 2nd step in timesteps 100–800.
    add(
        "pab",
        "pab",
        r#"{"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": [100, 800]}"#,
    );
    // diffusers' FasterCache defaults; its unconditional-branch skip rebuilds the branch from
    // frequency bands of an image-shaped output, which Flux's packed tokens are not, so only
    // its attention reuse runs here.
    add(
        "fastercache",
        "fastercache",
        r#"{"is_guidance_distilled": true}"#,
    );
    // diffusers' TaylorSeerCacheConfig defaults (interval 5, first 3 steps computed, order 1).
    add("taylorseer", "taylorseer", "{}");
    // MagCache, the FoCa and DMD calibrators, DBPrune.
    v.extend(upstream::variants().into_iter().map(|(n, c)| (n, Some(c))));
    v
}

/// What one variant produced: per sample the fastest time over the rounds; images and
/// statistics of the first round.
struct Outcome {
    name: String,
    seconds: Vec<f64>,
    images: Vec<GrayImage>,
    cached_steps: usize,
    /// Block/module runs that computed, of all logged.
    computed: (usize, usize),
    memory: usize,
}

/// The uncached loop without any hooks: `denoise` with `NoHooks` in place of `CacheHooks`.
fn denoise_plain(s: &Setup, sample: &Sample) -> Tensor<3> {
    let scheduler = s.digits.scheduler(s.steps).expect("scheduler");
    let both = FluxTransformer::concat_cond(&sample.uncond, &sample.cond);
    let mut latents = sample.noise.clone();
    for i in 0..scheduler.len() {
        let doubled = Tensor::cat(vec![latents.clone(), latents.clone()], 0);
        let out = s
            .digits
            .model
            .velocity(doubled, scheduler.sigmas[i], &both, &mut NoHooks)
            .expect("forward");
        let u = out.clone().narrow(0, 0, 1);
        let c = out.narrow(0, 1, 1);
        let v = u.clone() + (c - u) * s.guidance.scale;
        latents = scheduler.step(i, latents, v);
    }
    latents
}

/// Final latents read back to the host (inside the timing, as a caller would).
fn host(latents: Tensor<3>) -> Vec<f32> {
    latents
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 latents")
}

/// One denoising run of one sample: seconds, final latents, and the hooks (`None`: no hooks).
fn run_one(
    s: &Setup,
    config: &Option<CacheConfig>,
    sample: &Sample,
) -> (f64, Vec<f32>, Option<CacheHooks>) {
    match config {
        None => {
            let start = Instant::now();
            let latents = host(denoise_plain(s, sample));
            (start.elapsed().as_secs_f64(), latents, None)
        }
        Some(config) => {
            let scheduler = s.digits.scheduler(s.steps).expect("scheduler");
            let mut hooks = CacheHooks::new(&s.digits.model as &dyn HookableDit, config.clone())
                .expect("hooks attach");
            let start = Instant::now();
            let result = denoise(
                &s.digits.model,
                &mut hooks,
                &scheduler,
                sample.noise.clone(),
                &sample.cond,
                Some(&sample.uncond),
                Some(s.guidance),
                |_| {},
            )
            .expect("denoise");
            let latents = host(result.latents);
            (start.elapsed().as_secs_f64(), latents, Some(hooks))
        }
    }
}

/// Steps where something was cached or forecast, and the share of logged block/module runs
/// that computed.
fn log_stats(hooks: &CacheHooks, steps: usize) -> (usize, usize, usize) {
    let mut cached = vec![false; steps];
    let (mut computed, mut total) = (0usize, 0usize);
    for d in &hooks.log().decisions {
        if d.action != Action::Computed && d.step < steps {
            cached[d.step] = true;
        }
        computed += d.computed_blocks;
        total += d.total_blocks;
    }
    (cached.iter().filter(|c| **c).count(), computed, total)
}

fn target_dir() -> PathBuf {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Mean PSNR and SSIM of `images` against `reference`, image by image (`None` PSNR: identical).
fn image_quality(reference: &[GrayImage], images: &[GrayImage]) -> (Option<f64>, f64) {
    let (mut p, mut q, mut exact) = (0.0, 0.0, true);
    for (r, i) in reference.iter().zip(images) {
        let v = psnr(r, i, DATA_RANGE).expect("psnr");
        if v.is_finite() {
            exact = false;
            p += v;
        } else {
            // Identical images: cap at 100 dB so a mean stays finite.
            p += 100.0;
        }
        q += ssim(r, i, DATA_RANGE).expect("ssim");
    }
    let n = reference.len().max(1) as f64;
    ((!exact).then_some(p / n), q / n)
}

fn cache_table(s: &Setup, selected: &dyn Fn(&str) -> bool) {
    let rounds = env_usize("CACHET_BENCH_ROUNDS", 2).max(1);
    let list: Vec<_> = variants()
        .into_iter()
        .filter(|(name, _)| {
            let id = format!("diffusion_cache/{name}");
            // The baselines always run: every row is relative to them.
            name == "none" || name == "reference" || selected(&id)
        })
        .collect();
    if !list
        .iter()
        .any(|(name, _)| selected(&format!("diffusion_cache/{name}")))
    {
        return;
    }
    let mut outcomes: Vec<Outcome> = list
        .iter()
        .map(|(name, _)| Outcome {
            name: name.clone(),
            seconds: vec![f64::INFINITY; s.samples.len()],
            images: Vec::new(),
            cached_steps: 0,
            computed: (0, 0),
            memory: 0,
        })
        .collect();
    let bench_start = Instant::now();
    // Every variant runs each sample back to back, and each sample's fastest round counts: a
    // burst of load from other processes then slows all variants of one sample alike, and a
    // later round replaces it.
    for round in 0..rounds {
        let round_start = Instant::now();
        for (i, sample) in s.samples.iter().enumerate() {
            for ((_, config), outcome) in list.iter().zip(outcomes.iter_mut()) {
                let (seconds, latents, hooks) = run_one(s, config, sample);
                outcome.seconds[i] = outcome.seconds[i].min(seconds);
                if round > 0 {
                    continue;
                }
                outcome
                    .images
                    .push(s.digits.decode(&latents).expect("decode"));
                if let Some(hooks) = &hooks {
                    let (cached, computed, total) = log_stats(hooks, s.steps);
                    outcome.cached_steps += cached;
                    outcome.computed.0 += computed;
                    outcome.computed.1 += total;
                    outcome.memory = outcome.memory.max(hooks.memory_bytes());
                    if i == 0 && std::env::var_os("CACHET_BENCH_DEBUG").is_some() {
                        let diffs: Vec<String> = hooks
                            .log()
                            .decisions
                            .iter()
                            .filter_map(|d| d.diff.map(|x| format!("{}:{x:.3}", d.step)))
                            .collect();
                        eprintln!("  {}: diffs {}", outcome.name, diffs.join(" "));
                    }
                }
            }
        }
        eprintln!(
            "diffusion_cache: round {}/{rounds} in {:.0} s",
            round + 1,
            round_start.elapsed().as_secs_f64()
        );
    }
    let best = |o: &Outcome| o.seconds.iter().sum::<f64>();
    let find = |name: &str| outcomes.iter().find(|o| o.name == name).expect("baseline");
    let none = find("none");
    let none_time = best(none);
    let reference_time = best(find("reference"));
    let n = s.samples.len();
    let accuracy = |o: &Outcome| {
        let right = o
            .images
            .iter()
            .zip(&s.samples)
            .filter(|(image, sample)| {
                s.digits.classifier.predict(image).expect("classify") == sample.label
            })
            .count();
        right as f64 / n as f64
    };
    let c = &s.digits.model.config;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Embedded digits model (Flux trained on scikit-learn's digits): inner dim {}, {} double + \
         {} single blocks, {} image + {} text tokens, f32 on CPU ({} threads), {} Euler steps, \
         CFG {} batched (batch 2); {n} images (digits 0–9 × {} seeds) per variant, \
         each image's fastest of {rounds} interleaved rounds. Uncached: {:.1} ms per step.\n",
        c.inner_dim(),
        c.num_layers,
        c.num_single_layers,
        s.digits.tokens(),
        s.digits.spec.text_tokens,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        s.steps,
        s.guidance.scale,
        n / s.digits.spec.num_labels,
        1e3 * none_time / (s.steps * n) as f64,
    );
    let _ = writeln!(
        md,
        "| variant | time | speedup vs none | PSNR (dB) | SSIM | classifier accuracy | cached steps (mean) | computed | extra memory |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        let t = best(o);
        let (p, q) = image_quality(&none.images, &o.images);
        let p = p.map_or_else(|| "exact".to_string(), |p| format!("{p:.1}"));
        let _ = writeln!(
            md,
            "| {} | {:.2} s | {:.2}× | {p} | {q:.4} | {:.0}% | {:.1}/{} | {:.0}% | {} |",
            o.name,
            t,
            none_time / t,
            100.0 * accuracy(o),
            o.cached_steps as f64 / n as f64,
            s.steps,
            if o.computed.1 == 0 {
                100.0
            } else {
                100.0 * o.computed.0 as f64 / o.computed.1 as f64
            },
            human_bytes(o.memory as u64),
        );
    }
    let _ = writeln!(
        md,
        "\nhook overhead with caching disabled (none ÷ reference, whole runs): {:+.2}%",
        100.0 * (none_time / reference_time - 1.0)
    );
    let _ = writeln!(
        md,
        "PSNR and SSIM: decoded 16x16 images against `none`'s, mean over the images (an identical \
         image counts 100 dB); classifier accuracy: share of images the shipped digit classifier \
         reads as the label asked for; computed = share of the hooked block-list or attention \
         runs that computed; extra memory = tensors the method holds at the end of a run. Total \
         bench time {:.0} s.",
        bench_start.elapsed().as_secs_f64()
    );
    println!("\n{md}");
    let dir = target_dir().join("cachet-bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("diffusion_cache.md"), &md);
    }
}

fn main() {
    // cargo bench passes `--bench`, xtask `--noplot`, and maybe a filter (the one positional).
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .filter(|f| !f.is_empty());
    // Criterion filters by regex; skip building the model when nothing here is selected.
    let selected = |id: &str| {
        filter.as_deref().is_none_or(|f| {
            regex::Regex::new(f).map_or_else(|_| id.contains(f), |re| re.is_match(id))
        })
    };
    let ids: Vec<String> = ["diffusion_step/reference", "diffusion_step/none"]
        .into_iter()
        .map(str::to_owned)
        .chain(
            variants()
                .into_iter()
                .map(|(name, _)| format!("diffusion_cache/{name}")),
        )
        .collect();
    if !ids.iter().any(|id| selected(id)) {
        return;
    }
    let device = DeviceSpec::Cpu.init().expect("cpu device");
    let s = setup(&device);

    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("diffusion_step");
        group
            .sample_size(20)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        let scheduler = s.digits.scheduler(s.steps).expect("scheduler");
        let sigma = scheduler.sigmas[s.steps / 2];
        let sample = &s.samples[0];
        let both = FluxTransformer::concat_cond(&sample.uncond, &sample.cond);
        let doubled = Tensor::cat(vec![sample.noise.clone(), sample.noise.clone()], 0);
        let model = &s.digits.model;
        group.bench_function("reference", |b| {
            b.iter(|| {
                model
                    .velocity(doubled.clone(), sigma, &both, &mut NoHooks)
                    .expect("forward")
                    .into_data()
            })
        });
        let mut hooks =
            CacheHooks::new(model as &dyn HookableDit, CacheConfig::None).expect("hooks");
        group.bench_function("none", |b| {
            b.iter(|| {
                hooks.begin_step(s.steps / 2, sigma * 1000.0);
                hooks.cache_context("cond_uncond");
                model
                    .velocity(doubled.clone(), sigma, &both, &mut hooks)
                    .expect("forward")
                    .into_data()
            })
        });
        group.finish();
    }
    c.final_summary();

    cache_table(&s, &selected);
}
