//! Decision parity of `cachet-diffusion`'s newer methods with their references: diffusers 0.42.1's
//! MagCache (and its calibration) and TextKV, cache-dit 1.5.3's FoCa and DMD calibrators and
//! DBPrune (goldens made by `cargo xtask goldens`, `xtask/goldens/diffusion_methods.py`).
//!
//! Each scenario replays the recorded model calls (same checkpoint, inputs, step, timestep and
//! cache context) through `CacheHooks` and asserts, call by call, that the same blocks ran, that
//! the log agrees, that MagCache's interpolated and calibrated ratios and cache-dit's context
//! statistics (cached / pruned steps, residual diffs, pruned blocks per call) equal the
//! reference's, and that the outputs match within tolerance.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cachet_diffusion::models::{
    BlockFn, BlockGroup, BlockStates, CogVideoX, CogVideoXInputs, DitHooks, FluxInputs,
    FluxTransformer, HookableDit, ModuleFn, ModulePath,
};
use cachet_diffusion::{Action, CacheConfig, CacheHooks, DiffusionError};
use cachet_integration_tests::{fixture, test_device};
use cachet_nn::{Pretrained, Result};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DType, Device, Precision, Tensor};
use serde_json::Value;

/// Relative tolerance on the residual diffs and ratios the methods measure (f32 reductions in
/// another order than torch's).
const DIFF_RTOL: f64 = 1e-3;

/// Outputs of computed, reused or forecast paths: f32 kernels in another order.
const EXACT: f32 = 1e-4;

enum Model {
    Flux(FluxTransformer),
    CogVideoX(CogVideoX),
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Model {
    fn load(record: &Value, device: &Device) -> Self {
        let dir = workspace_root().join(record["model_dir"].as_str().unwrap());
        match record["class"].as_str().unwrap() {
            "FluxTransformer2DModel" => {
                Self::Flux(FluxTransformer::from_pretrained(dir, device, Precision::F32).unwrap())
            }
            "CogVideoXTransformer3DModel" => {
                Self::CogVideoX(CogVideoX::from_pretrained(dir, device, Precision::F32).unwrap())
            }
            other => panic!("unknown model class {other}"),
        }
    }

    fn hookable(&self) -> &dyn HookableDit {
        match self {
            Self::Flux(m) => m,
            Self::CogVideoX(m) => m,
        }
    }

    fn forward(
        &self,
        tensors: &Tensors,
        key: &str,
        device: &Device,
        hooks: &mut dyn DitHooks,
    ) -> Vec<f32> {
        let k = |name: &str| format!("in.{key}.{name}");
        match self {
            Self::Flux(m) => {
                let inputs = FluxInputs {
                    hidden_states: tensors.t(&k("hidden_states"), device),
                    encoder_hidden_states: tensors.t(&k("encoder_hidden_states"), device),
                    pooled_projections: tensors.t(&k("pooled_projections"), device),
                    timestep: tensors.t(&k("timestep"), device),
                    img_ids: tensors.t(&k("img_ids"), device),
                    txt_ids: tensors.t(&k("txt_ids"), device),
                    guidance: None,
                };
                floats(m.forward(&inputs, hooks).unwrap())
            }
            Self::CogVideoX(m) => {
                let inputs = CogVideoXInputs {
                    hidden_states: tensors.t(&k("hidden_states"), device),
                    encoder_hidden_states: tensors.t(&k("encoder_hidden_states"), device),
                    timestep: tensors.floats(&k("timestep")),
                    ofs: None,
                    image_rotary_emb: None,
                };
                floats(m.forward(&inputs, hooks).unwrap())
            }
        }
    }
}

struct Tensors(Checkpoint);

impl Tensors {
    fn t<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        self.0.load_float::<D>(name, device, DType::F32).unwrap()
    }
    fn floats(&self, name: &str) -> Vec<f32> {
        let data = self.0.tensor_data(name).unwrap();
        data.try_cast(DType::F32)
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap()
    }
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

/// Passes every hook call to the `CacheHooks` and records which blocks it let run.
struct Recording<'a> {
    inner: &'a mut CacheHooks,
    blocks: Vec<String>,
}

impl DitHooks for Recording<'_> {
    fn run_blocks(
        &mut self,
        group: BlockGroup<'_>,
        states: BlockStates,
        block: &mut BlockFn<'_>,
    ) -> Result<BlockStates> {
        let Self { inner, blocks } = self;
        inner.run_blocks(group, states, &mut |hooks, i, s| {
            blocks.push(format!("{}.{i}", group.name));
            block(hooks, i, s)
        })
    }

    fn hooks_module(&self, path: ModulePath<'_>) -> bool {
        self.inner.hooks_module(path)
    }

    fn run_module(
        &mut self,
        path: ModulePath<'_>,
        batch: usize,
        run: &mut ModuleFn<'_>,
    ) -> Result<Vec<Tensor<3>>> {
        self.inner.run_module(path, batch, run)
    }
}

fn rel_close(a: f64, b: f64) -> bool {
    (a - b).abs() <= DIFF_RTOL * b.abs().max(1e-6)
}

/// Max |Δ| and max |Δ| / max |reference| over a call's output.
fn compare(ours: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(ours.len(), want.len());
    let abs = ours
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0.0, f32::max).max(1e-6);
    (abs, abs / scale)
}

fn scenario_dir() -> PathBuf {
    fixture("diffusion-cache")
}

fn read_record(name: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(scenario_dir().join(format!("{name}.json"))).unwrap(),
    )
    .unwrap()
}

fn steps(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_i64().unwrap())
        .collect()
}

fn counts(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap() as usize)
        .collect()
}

/// Replays scenario `name`; outputs must agree within `rtol` relative to the output's largest
/// magnitude. `None` when the scenario's fixture (a trained model's) is absent or no device.
fn replay(name: &str, rtol: f32) -> Option<()> {
    let device = test_device()?;
    let record = read_record(name);
    let tensors =
        Tensors(Checkpoint::open(scenario_dir().join(format!("{name}.safetensors"))).unwrap());
    let model = Model::load(&record, &device);
    let config: CacheConfig = serde_json::from_value(record["config"].clone()).unwrap();
    let method = config.method();
    if let CacheConfig::MagCache(c) = &config {
        // The ratios diffusers used after interpolating to num_inference_steps (float32 values;
        // JSON's decimal text is compared after rounding to float32).
        let want = &record["magcache"]["mag_ratios"];
        match c.interpolated_ratios() {
            Some(ours) => {
                let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
                let want: Vec<f64> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(f32s(ours), f32s(want), "{name}: interpolated mag_ratios");
            }
            None => assert!(want.is_null(), "{name}: mag_ratios"),
        }
    }
    let mut hooks = CacheHooks::new(model.hookable(), config).unwrap();
    let total_blocks: usize = model.hookable().block_groups().iter().map(|g| g.len).sum();
    hooks.reset();

    let mut inference = 0;
    let (mut worst_abs, mut worst_rel) = (0.0f32, 0.0f32);
    let mut summary = String::new();
    for (c, call) in record["calls"].as_array().unwrap().iter().enumerate() {
        let step = call["step"].as_u64().unwrap() as usize;
        let timestep = call["timestep"].as_f64().unwrap();
        let context = call["context"].as_str().unwrap();
        let key = call["inputs"].as_str().unwrap();
        let this_inference = call["inference"].as_u64().unwrap();
        if this_inference != inference {
            hooks.reset();
            inference = this_inference;
        }
        hooks.begin_step(step, timestep);
        hooks.cache_context(context);
        let logged = hooks.log().decisions.len();
        let mut recording = Recording {
            inner: &mut hooks,
            blocks: Vec::new(),
        };
        let out = model.forward(&tensors, key, &device, &mut recording);
        let ran: BTreeSet<String> = recording.blocks.into_iter().collect();
        let decisions = &hooks.log().decisions[logged..];
        let here = format!("{name}: call {c} (step {step}, {context})");

        // Which blocks ran (a block ran iff its attention layer did in the reference).
        let want: BTreeSet<String> = call["ran"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().rsplit_once('.').unwrap().0.to_string())
            .collect();
        assert_eq!(ran, want, "{here}: blocks run");
        for d in decisions {
            let ran_here = ran
                .iter()
                .filter(|b| b.rsplit_once('.').unwrap().0 == d.target)
                .count();
            assert_eq!(
                d.computed_blocks, ran_here,
                "{here}: {} computed blocks",
                d.target
            );
        }
        let skipped = want.len() < total_blocks;
        let logged_cached = decisions.iter().any(|d| d.action == Action::Cached);
        assert_eq!(logged_cached, skipped, "{here}: logged {decisions:?}");
        summary.push_str(&format!(" {step}{}:{}", &context[..1], want.len()));

        let reference = tensors.floats(&format!("out.{c}"));
        let (abs, rel) = compare(&out, &reference);
        worst_abs = worst_abs.max(abs);
        worst_rel = worst_rel.max(rel);
        assert!(
            rel < rtol,
            "{here}: output max |Δ| = {abs:e} ({rel:e} relative)"
        );
    }

    match method {
        "magcache" => check_calibration(name, &record, &hooks),
        "dbcache" => check_dbcache(name, &record, &hooks),
        "dbprune" => check_dbprune(name, &record, &hooks),
        _ => {}
    }
    eprintln!("{name}:{summary}\n{name}: outputs max |Δ| = {worst_abs:e}, relative {worst_rel:e}");
    Some(())
}

/// MagCache's calibration: the ratios of the last inference, per context, as diffusers'.
fn check_calibration(name: &str, record: &Value, hooks: &CacheHooks) {
    let recorded = record["magcache"]["calibration"].as_array().unwrap();
    let ours = hooks.magcache_calibration();
    if recorded.is_empty() {
        assert!(ours.is_empty(), "{name}: no calibration expected");
        return;
    }
    let steps = record["config"]["num_inference_steps"].as_u64().unwrap() as usize;
    for c in &ours {
        let want: Vec<f64> = recorded
            .iter()
            .filter(|r| r[0].as_str() == Some(c.context.as_str()))
            .map(|r| r[1].as_f64().unwrap())
            .collect();
        let last = &want[want.len() - steps..];
        assert!(c.complete, "{name}: {} calibration incomplete", c.context);
        assert_eq!(c.mag_ratios.len(), last.len(), "{name}: {}", c.context);
        for (i, (a, b)) in c.mag_ratios.iter().zip(last).enumerate() {
            assert!(rel_close(*a, *b), "{name}: ratio {i}: {a} vs {b}");
        }
        eprintln!("{name}: {} ratios {:?}", c.context, c.mag_ratios);
    }
    assert!(!ours.is_empty(), "{name}: calibration recorded nothing");
}

fn check_dbcache(name: &str, record: &Value, hooks: &CacheHooks) {
    let stats = hooks.dbcache_stats();
    let want = record["dbcache"].as_array().unwrap();
    assert_eq!(stats.len(), want.len(), "{name}: DBCache units");
    for (ours, want) in stats.iter().zip(want) {
        assert_eq!(ours.cached_steps, steps(&want["cached_steps"]), "{name}");
        assert_eq!(
            ours.cfg_cached_steps,
            steps(&want["cfg_cached_steps"]),
            "{name}: CFG"
        );
        for (diffs, want) in [
            (&ours.residual_diffs, &want["residual_diffs"]),
            (&ours.cfg_residual_diffs, &want["cfg_residual_diffs"]),
        ] {
            let want = want.as_object().unwrap();
            assert_eq!(diffs.len(), want.len(), "{name}: {diffs:?} vs {want:?}");
            for (step, diff) in diffs {
                let w = want[&step.to_string()].as_f64().unwrap();
                assert!(rel_close(*diff, w), "{name}: diff at {step}: {diff} vs {w}");
            }
        }
        eprintln!("{name}: {} cached steps {:?}", ours.name, ours.cached_steps);
    }
}

fn check_dbprune(name: &str, record: &Value, hooks: &CacheHooks) {
    let stats = hooks.dbprune_stats();
    let want = record["dbprune"].as_array().unwrap();
    assert_eq!(stats.len(), want.len(), "{name}: DBPrune units");
    for (ours, want) in stats.iter().zip(want) {
        let unit = format!("{name}: {}", ours.name);
        assert_eq!(ours.pruned_steps, steps(&want["cached_steps"]), "{unit}");
        assert_eq!(
            ours.cfg_pruned_steps,
            steps(&want["cfg_cached_steps"]),
            "{unit}: CFG"
        );
        assert_eq!(
            ours.pruned_blocks,
            counts(&want["pruned_blocks"]),
            "{unit}: pruned blocks"
        );
        assert_eq!(ours.actual_blocks, counts(&want["actual_blocks"]), "{unit}");
        assert_eq!(
            ours.cfg_pruned_blocks,
            counts(&want["cfg_pruned_blocks"]),
            "{unit}: CFG pruned blocks"
        );
        assert_eq!(
            ours.cfg_actual_blocks,
            counts(&want["cfg_actual_blocks"]),
            "{unit}: CFG"
        );
        for (diffs, want) in [
            (&ours.residual_diffs, &want["residual_diffs"]),
            (&ours.cfg_residual_diffs, &want["cfg_residual_diffs"]),
        ] {
            let want = want.as_object().unwrap();
            assert_eq!(diffs.len(), want.len(), "{unit}: steps with diffs");
            for (step, list) in diffs {
                let w: Vec<f64> = want[&step.to_string()]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(list.len(), w.len(), "{unit}: diffs at {step}");
                for (a, b) in list.iter().zip(&w) {
                    assert!(rel_close(*a, *b), "{unit}: diff at {step}: {a} vs {b}");
                }
            }
        }
        eprintln!(
            "{unit}: pruned steps {:?}, pruned blocks {:?}",
            ours.pruned_steps, ours.pruned_blocks
        );
    }
}

#[test]
fn magcache_flux_ratios() {
    replay("magcache_flux", EXACT);
}

#[test]
fn magcache_threshold_skip_limit_and_retention() {
    replay("magcache_flux_threshold", EXACT);
}

#[test]
fn magcache_state_per_context_over_two_inferences() {
    replay("magcache_flux_cond_uncond", EXACT);
}

#[test]
fn magcache_cogvideox_batched_cfg() {
    replay("magcache_cogvideox", EXACT);
}

#[test]
fn magcache_calibration_records_the_ratios() {
    replay("magcache_calibrate", EXACT);
}

#[test]
fn magcache_calibration_cogvideox() {
    replay("magcache_calibrate_cogvideox", EXACT);
}

#[test]
fn magcache_with_calibrated_ratios() {
    replay("magcache_calibrated", EXACT);
}

#[test]
fn dbcache_foca_calibrator() {
    replay("dbcache_foca", EXACT);
}

#[test]
fn dbcache_foca_damped_past_three_steps() {
    replay("dbcache_foca_long_gap", EXACT);
}

#[test]
fn dbcache_foca_hidden_states() {
    replay("dbcache_foca_hidden_states", EXACT);
}

#[test]
fn dbcache_foca_separate_cfg() {
    replay("dbcache_foca_separate_cfg", EXACT);
}

/// DMD's forecast goes through an SVD and an eigendecomposition in f64 (torch: LAPACK), then f32.
const DMD: f32 = 1e-3;

#[test]
fn dbcache_dmd_exponential_fit() {
    replay("dbcache_dmd", DMD);
}

#[test]
fn dbcache_dmd_history_rank_ridge() {
    replay("dbcache_dmd_history4_rank2", DMD);
}

#[test]
fn dbcache_dmd_taylor_fallback() {
    replay("dbcache_dmd_taylor_fallback", DMD);
}

#[test]
fn dbcache_dmd_hidden_states_separate_cfg_per_list() {
    replay("dbcache_dmd_hidden_states_cfg", DMD);
}

#[test]
fn dbprune_flux() {
    replay("dbprune_flux", EXACT);
}

#[test]
fn dbprune_dynamic_threshold_and_non_prune_ids() {
    replay("dbprune_dynamic_threshold", EXACT);
}

#[test]
fn dbprune_dynamic_threshold_cap() {
    replay("dbprune_dynamic_max", EXACT);
}

#[test]
fn dbprune_cached_step_limits() {
    replay("dbprune_limits", EXACT);
}

#[test]
fn dbprune_separate_cfg() {
    replay("dbprune_separate_cfg", EXACT);
}

#[test]
fn dbprune_one_unit_per_block_list() {
    replay("dbprune_per_list", EXACT);
}

#[test]
fn dbprune_taylorseer_calibrator() {
    replay("dbprune_taylorseer", EXACT);
}

#[test]
fn dbprune_foca_reduced_vram() {
    replay("dbprune_foca_reduced_vram", EXACT);
}

#[test]
fn dbprune_cogvideox() {
    replay("dbprune_cogvideox", EXACT);
}

// The trained demo model (`crates/cachet-diffusion/assets/digits-flux`), 28 guided steps with
// separate cond / uncond calls, at the methods' documented settings.

#[test]
fn magcache_trained_model() {
    replay("magcache_digits", EXACT);
}

#[test]
fn magcache_calibration_trained_model() {
    replay("magcache_calibrate_digits", EXACT);
}

#[test]
fn dbcache_foca_trained_model() {
    replay("dbcache_foca_digits", EXACT);
}

#[test]
fn dbcache_dmd_trained_model() {
    replay("dbcache_dmd_digits", DMD);
}

#[test]
fn dbprune_trained_model() {
    replay("dbprune_digits", EXACT);
}

/// diffusers hooks no Flux block with TextKV (it targets NucleusMoE-Image blocks), and Flux's text
/// keys/values move at every step; cachet refuses TextKV on Flux with that reason.
#[test]
fn textkv_is_refused_where_it_would_not_be_lossless() {
    let Some(device) = test_device() else { return };
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(scenario_dir().join("textkv_flux.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["hooked_blocks"], serde_json::json!([]));
    assert_eq!(record["outputs_equal_uncached"], Value::Bool(true));
    let model = Model::load(
        &serde_json::json!({
            "model_dir": "crates/cachet-diffusion/assets/tiny-flux",
            "class": "FluxTransformer2DModel",
        }),
        &device,
    );
    let layers = model.hookable().block_groups()[0].len;
    let drift = record["min_relative_step_change"].as_object().unwrap();
    assert_eq!(drift.len(), 2 * layers, "one K and one V per double block");
    assert!(drift.values().all(|v| v.as_f64().unwrap() > 1e-3));
    let config = CacheConfig::from_name("textkv", Some("{}")).unwrap();
    assert_eq!(config.method(), "textkv");
    let err = CacheHooks::new(model.hookable(), config).unwrap_err();
    assert!(
        matches!(
            err,
            DiffusionError::NotApplicable {
                method: "textkv",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("timestep"), "{err}");
    assert!(CacheConfig::from_name("textkv", Some(r#"{"lossless": true}"#)).is_err());
}
