//! Wall-time speedup and quality of every cache method on a Flux-style DiT with seeded random
//! weights (`FluxTransformer::random`), on the CPU backend: FLUX.1's 19 double + 38 single blocks
//! (so cache-dit's `F8B0` means the same) at inner dim 128, a 32x32 latent (256 image tokens) and
//! 32 text tokens, 28 steps — about 0.4 s per uncached step on 2 cores, ~8 minutes in all.
//!
//! Two parts:
//!
//! - `diffusion_step/{reference,none}` (criterion): one model call without hooks
//!   (`cachet_diffusion::models::NoHooks`) and with `CacheHooks` attached but caching disabled
//!   (`CacheConfig::None`) — the hooks' overhead, as the ratio of the two in `cargo xtask bench`.
//! - `diffusion_cache/<variant>` (a measured loop, since one sample is a whole denoising run of
//!   several seconds): `cachet_diffusion::denoise` over 28 flow-matching Euler steps from the
//!   same seeded noise and conditioning for every method and threshold, interleaved over a few
//!   rounds (the fastest round counts, as other processes share the machine). Each variant's
//!   final latent is compared with the uncached run (`none`): PSNR = 10·log10(peak² / MSE) with
//!   peak = max|uncached latent|, and the max abs error — on latents, where cache-dit reports
//!   PSNR on decoded images. The table is printed and written to
//!   `target/cachet-bench/diffusion_cache.md`, which `cargo xtask bench` prints after criterion's.
//!
//! Set `CACHET_BENCH_DIT=dim,double,single`, `CACHET_BENCH_LATENT`, `CACHET_BENCH_STEPS`,
//! `CACHET_BENCH_ROUNDS` to change the model, latent size, number of steps or rounds,
//! `CACHET_BENCH_TIME_SCALE` for the time-embedding damping (see `smooth_time_embedding`; 0 keeps
//! the plain random weights), and `CACHET_BENCH_DEBUG=1` to print every residual diff.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};
use cachet_diffusion::models::{FluxConfig, FluxTransformer};
use cachet_diffusion::models::{HookableDit, NoHooks};
use cachet_diffusion::{
    Action, CacheConfig, CacheHooks, DBCacheConfig, Denoise, FirstBlockCacheConfig, FlowMatchEuler,
    FluxCond, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig, TaylorSeerCalibratorConfig,
    denoise, steps_mask,
};
use cachet_nn::LinearLayer;
use cachet_tensor::{DeviceSpec, Precision, human_bytes};
use criterion::{Criterion, SamplingMode};

const HEAD_DIM: usize = 64;
const TXT_TOKENS: usize = 32;
const SEED: u64 = 0x5EED;

struct Setup {
    model: FluxTransformer,
    scheduler: FlowMatchEuler,
    noise: Tensor<3>,
    cond: FluxCond,
    steps: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Seeded normals from the host (the same on every run and backend).
fn normal(shape: &[usize], seed: u64) -> TensorData {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| {
            let (u, v) = (1.0 - next(), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    TensorData::new(values, shape.to_vec())
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Damps the timestep embedder's inputs by frequency: sinusoid channel `i` (frequency
/// `f_i = 10000^(-i/128)` per timestep unit, 0–1000 scale) is scaled by `exp(-(f_i·scale)²/2)`.
///
/// With plain random weights, the channels whose period is shorter than the step spacing
/// (≈36 timestep units at 28 steps) alias from step to step, so `temb` — and with it every
/// block's modulation — jumps randomly between steps, and the block residuals differ by ≈65%
/// from one step to the next: nothing a trained DiT does (its conditioning is smooth in `t`, which
/// is what every cache method relies on). `scale` = 0 keeps the weights as drawn.
fn smooth_time_embedding(model: &mut FluxTransformer, scale: f64, device: &Device) {
    if scale <= 0.0 {
        return;
    }
    let layer = &mut model.time_text_embed.timestep_embedder.linear_1;
    let linear = layer.as_dense().expect("dense").clone();
    let half = 128;
    let damp: Vec<f32> = (0..2 * half)
        .map(|c| {
            let f = 10_000f64.powf(-((c % half) as f64) / half as f64);
            (-(f * scale).powi(2) / 2.0).exp() as f32
        })
        .collect();
    let damp = Tensor::<2>::from_data(TensorData::new(damp, [2 * half, 1]), device);
    let weight = linear.weight.val() * damp;
    *layer = LinearLayer::dense(Linear {
        weight: Param::from_tensor(weight),
        bias: linear.bias,
    });
}

fn setup(device: &Device) -> Setup {
    let dims: Vec<usize> = std::env::var("CACHET_BENCH_DIT")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| v.len() == 3)
        .unwrap_or_else(|| vec![128, 19, 38]);
    let (dim, double, single) = (dims[0], dims[1], dims[2]);
    let steps = env_usize("CACHET_BENCH_STEPS", 28);
    let config = FluxConfig::from_json(
        &serde_json::json!({
            "in_channels": 64,
            "num_layers": double,
            "num_single_layers": single,
            "attention_head_dim": HEAD_DIM,
            "num_attention_heads": dim / HEAD_DIM,
            "joint_attention_dim": 512,
            "pooled_projection_dim": 256,
            "guidance_embeds": true,
            "axes_dims_rope": [8, 28, 28],
        })
        .to_string(),
        "bench",
    )
    .expect("bench config");
    let mut model = FluxTransformer::random(config, device, Precision::F32, SEED).expect("model");
    smooth_time_embedding(
        &mut model,
        env_f64("CACHET_BENCH_TIME_SCALE", 100.0),
        device,
    );
    // A `latent` x `latent` latent of 16 channels, packed 2x2: (latent/2)² tokens of 64 channels.
    let rows = env_usize("CACHET_BENCH_LATENT", 32) / 2;
    let img_tokens = rows * rows;
    let c = &model.config;
    let noise = Tensor::from_data(normal(&[1, img_tokens, c.in_channels], 1), device);
    let cond = FluxCond {
        encoder_hidden_states: Tensor::from_data(
            normal(&[1, TXT_TOKENS, c.joint_attention_dim], 2),
            device,
        ),
        pooled_projections: Tensor::from_data(normal(&[1, c.pooled_projection_dim], 3), device),
        img_ids: cachet_diffusion::flux_image_ids(rows, rows, device),
        txt_ids: Tensor::zeros([TXT_TOKENS, 3], device),
        guidance: Some(3.5),
        rope: None,
    }
    .with_rope(&model)
    .expect("rope tables");
    let scheduler =
        FlowMatchEuler::new(steps, 1.0, Some(FlowMatchEuler::flux_mu(img_tokens))).expect("sched");
    Setup {
        model,
        scheduler,
        noise,
        cond,
        steps,
    }
}

/// The uncached loop without any hooks: `denoise` with `NoHooks` in place of `CacheHooks`.
fn denoise_plain(s: &Setup) -> Tensor<3> {
    let mut latents = s.noise.clone();
    for i in 0..s.scheduler.len() {
        let v = s
            .model
            .velocity(
                latents.clone(),
                s.scheduler.sigmas[i],
                &s.cond,
                &mut NoHooks,
            )
            .expect("forward");
        latents = s.scheduler.step(i, latents, v);
    }
    latents
}

fn dbcache(
    fn_blocks: usize,
    threshold: f64,
    calibrator: bool,
    mask: Option<(&str, &str)>,
    steps: usize,
) -> CacheConfig {
    let mut cache_config = DBCacheConfig {
        Fn_compute_blocks: fn_blocks,
        Bn_compute_blocks: 0,
        residual_diff_threshold: threshold,
        ..DBCacheConfig::default()
    };
    if let Some((policy, mode)) = mask {
        cache_config.steps_computation_mask = Some(steps_mask(steps, policy).expect("mask"));
        cache_config.steps_computation_policy = mode.into();
        cache_config.num_inference_steps = Some(steps);
    }
    CacheConfig::DbCache {
        cache_config,
        calibrator_config: calibrator.then(|| TaylorSeerCalibratorConfig {
            taylorseer_order: 1,
            ..TaylorSeerCalibratorConfig::default()
        }),
        adapter: Default::default(),
    }
}

/// `(name, config)` of every measured variant; `reference` runs without hooks.
fn variants(steps: usize) -> Vec<(String, Option<CacheConfig>)> {
    let mut v: Vec<(String, Option<CacheConfig>)> = vec![
        ("reference".into(), None),
        ("none".into(), Some(CacheConfig::None)),
    ];
    // F8B0 as cache-dit runs FLUX.1 (the model has FLUX.1's 19 + 38 blocks).
    for t in [0.08, 0.12, 0.2, 0.3] {
        v.push((
            format!("dbcache_F8B0_R{t}"),
            Some(dbcache(8, t, false, None, steps)),
        ));
    }
    // Fewer warm-up steps (4 instead of cache-dit's 8): the 28-step run has more to cache.
    for (fn_blocks, t, calibrator) in [
        (8, 0.2, false),
        (8, 0.3, false),
        (4, 0.2, false),
        (8, 0.2, true),
    ] {
        let mut config = dbcache(fn_blocks, t, calibrator, None, steps);
        if let CacheConfig::DbCache { cache_config, .. } = &mut config {
            cache_config.max_warmup_steps = 4;
        }
        let suffix = if calibrator { "_taylorseer" } else { "" };
        v.push((
            format!("dbcache_F{fn_blocks}B0_R{t}_W4{suffix}"),
            Some(config),
        ));
    }
    v.push((
        "dbcache_F1B0_R0.12".into(),
        Some(dbcache(1, 0.12, false, None, steps)),
    ));
    v.push((
        "dbcache_F1B0_R0.12_taylorseer".into(),
        Some(dbcache(1, 0.12, true, None, steps)),
    ));
    for policy in ["fast", "ultra"] {
        if steps_mask(steps, policy).is_err() {
            continue;
        }
        for mode in ["dynamic", "static"] {
            v.push((
                format!("dbcache_F1B0_R0.12_taylorseer_mask-{policy}-{mode}"),
                Some(dbcache(1, 0.12, true, Some((policy, mode)), steps)),
            ));
        }
    }
    for t in [0.05, 0.08, 0.12, 0.2] {
        v.push((
            format!("fbcache_{t}"),
            Some(CacheConfig::FbCache(FirstBlockCacheConfig { threshold: t })),
        ));
    }
    for skip in [2, 3] {
        v.push((
            format!("pab_spatial{skip}"),
            Some(CacheConfig::Pab(PyramidAttentionBroadcastConfig {
                spatial_attention_block_skip_range: Some(skip),
                spatial_attention_timestep_skip_range: (50.0, 950.0),
                ..PyramidAttentionBroadcastConfig::default()
            })),
        ));
    }
    for interval in [3, 5] {
        v.push((
            format!("taylorseer_interval{interval}"),
            Some(CacheConfig::TaylorSeer(TaylorSeerCacheConfig {
                cache_interval: interval,
                taylor_factors_dtype: "float32".into(),
                ..TaylorSeerCacheConfig::default()
            })),
        ));
    }
    v
}

/// What one variant produced (the first round's outputs; timings over all rounds).
struct Outcome {
    name: String,
    seconds: Vec<f64>,
    latents: Option<Tensor<3>>,
    cached_steps: usize,
    computed_pct: f64,
    syncs_per_step: f64,
    memory: usize,
}

fn run_variant(s: &Setup, config: &Option<CacheConfig>) -> (f64, Tensor<3>, Option<CacheHooks>) {
    match config {
        None => {
            let start = Instant::now();
            let out = denoise_plain(s);
            (start.elapsed().as_secs_f64(), out, None)
        }
        Some(config) => {
            let mut hooks = CacheHooks::new(&s.model as &dyn HookableDit, config.clone())
                .expect("hooks attach");
            let out = denoise(
                &s.model,
                &mut hooks,
                &s.scheduler,
                s.noise.clone(),
                &s.cond,
                None,
                None,
                |_| {},
            )
            .expect("denoise");
            (out.seconds, out.latents, Some(hooks))
        }
    }
}

/// Steps where something was cached or forecast, the share of logged block/module runs that
/// computed, and host reads of a residual diff per step (each is one device sync).
fn log_stats(hooks: &CacheHooks, steps: usize) -> (usize, f64, f64) {
    let log = &hooks.log().decisions;
    let mut cached = vec![false; steps];
    let (mut computed, mut total, mut syncs) = (0usize, 0usize, 0usize);
    for d in log {
        if d.action != Action::Computed {
            cached[d.step] = true;
        }
        computed += d.computed_blocks;
        total += d.total_blocks;
        syncs += usize::from(d.diff.is_some());
    }
    let pct = if total == 0 {
        100.0
    } else {
        100.0 * computed as f64 / total as f64
    };
    (
        cached.iter().filter(|c| **c).count(),
        pct,
        syncs as f64 / steps as f64,
    )
}

fn quality(reference: &Tensor<3>, latents: &Tensor<3>) -> (f64, f64) {
    let r: Vec<f32> = reference
        .clone()
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32");
    let l: Vec<f32> = latents
        .clone()
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32");
    let peak = r.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let (mut se, mut max) = (0f64, 0f64);
    for (a, b) in r.iter().zip(&l) {
        let d = (*a as f64 - *b as f64).abs();
        se += d * d;
        max = max.max(d);
    }
    let mse = se / r.len() as f64;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (peak * peak / mse).log10()
    };
    (psnr, max)
}

fn target_dir() -> PathBuf {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn cache_table(s: &Setup, selected: &dyn Fn(&str) -> bool) {
    let rounds = env_usize("CACHET_BENCH_ROUNDS", 3).max(1);
    let list: Vec<_> = variants(s.steps)
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
            seconds: Vec::new(),
            latents: None,
            cached_steps: 0,
            computed_pct: 100.0,
            syncs_per_step: 0.0,
            memory: 0,
        })
        .collect();
    let bench_start = Instant::now();
    for round in 0..rounds {
        for ((name, config), outcome) in list.iter().zip(outcomes.iter_mut()) {
            let (seconds, latents, hooks) = run_variant(s, config);
            eprintln!(
                "diffusion_cache/{name}: round {}/{rounds}: {seconds:.2} s",
                round + 1
            );
            outcome.seconds.push(seconds);
            if round == 0 {
                if let Some(hooks) = &hooks {
                    let (cached, pct, syncs) = log_stats(hooks, s.steps);
                    outcome.cached_steps = cached;
                    outcome.computed_pct = pct;
                    outcome.syncs_per_step = syncs;
                    outcome.memory = hooks.memory_bytes();
                    if std::env::var_os("CACHET_BENCH_DEBUG").is_some() {
                        let diffs: Vec<String> = hooks
                            .log()
                            .decisions
                            .iter()
                            .filter_map(|d| d.diff.map(|x| format!("{}:{x:.3}", d.step)))
                            .collect();
                        eprintln!("  diffs: {}", diffs.join(" "));
                    }
                }
                outcome.latents = Some(latents);
            }
        }
    }
    let best = |o: &Outcome| o.seconds.iter().copied().fold(f64::INFINITY, f64::min);
    let none = outcomes
        .iter()
        .find(|o| o.name == "none")
        .expect("none runs");
    let (none_time, none_latents) = (best(none), none.latents.clone().expect("latents"));
    let reference_time = best(
        outcomes
            .iter()
            .find(|o| o.name == "reference")
            .expect("ref"),
    );
    let c = &s.model.config;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Flux-style DiT with random weights: inner dim {}, {} double + {} single blocks, {} image + \
         {TXT_TOKENS} text tokens, f32 on CPU ({} threads), {} Euler steps, batch 1, no CFG; \
         fastest of {rounds} interleaved rounds. Uncached: {:.2} s per step.\n",
        c.inner_dim(),
        c.num_layers,
        c.num_single_layers,
        s.noise.dims()[1],
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        s.steps,
        none_time / s.steps as f64,
    );
    let _ = writeln!(
        md,
        "| variant | time | speedup vs none | PSNR (dB) | max abs err | cached steps | computed | diff syncs/step | extra memory |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        let t = best(o);
        let (psnr, max) = quality(&none_latents, o.latents.as_ref().expect("latents"));
        let psnr = if psnr.is_infinite() {
            "exact".to_string()
        } else {
            format!("{psnr:.1}")
        };
        let _ = writeln!(
            md,
            "| {} | {:.2} s | {:.2}× | {psnr} | {max:.2e} | {}/{} | {:.0}% | {:.2} | {} |",
            o.name,
            t,
            none_time / t,
            o.cached_steps,
            s.steps,
            o.computed_pct,
            o.syncs_per_step,
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
        "PSNR = 10·log10(peak² / MSE) of the final latent against `none`, peak = max|latent of \
         `none`|; computed = share of the hooked block-list or attention runs that computed; \
         extra memory = tensors the method holds at the end of the run. Total bench time {:.0} s.",
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
            variants(28)
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
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        let sigma = s.scheduler.sigmas[s.steps / 2];
        group.bench_function("reference", |b| {
            b.iter(|| {
                s.model
                    .velocity(s.noise.clone(), sigma, &s.cond, &mut NoHooks)
                    .expect("forward")
                    .into_data()
            })
        });
        let mut hooks =
            CacheHooks::new(&s.model as &dyn HookableDit, CacheConfig::None).expect("hooks");
        group.bench_function("none", |b| {
            b.iter(|| {
                hooks.begin_step(s.steps / 2, sigma * 1000.0);
                hooks.cache_context("cond");
                s.model
                    .velocity(s.noise.clone(), sigma, &s.cond, &mut hooks)
                    .expect("forward")
                    .into_data()
            })
        });
        group.finish();
    }
    c.final_summary();

    cache_table(&s, &selected);
}
