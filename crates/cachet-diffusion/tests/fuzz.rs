//! Property-based fuzzing of cachet-diffusion's parsers: `FluxConfig::from_json`,
//! `CogVideoXConfig::from_json` (diffusers' config.json), and the cache-method config
//! (`CacheConfig` from JSON, and `CacheConfig::from_name` as `--cache-config` passes it, with
//! Python's field names), attached to the embedded tiny Flux and run for a few denoising steps.
//!
//! The property: a typed error or a value the library then uses without panicking, never more
//! than a small multiple of the input in memory. Budget: `CACHET_FUZZ_CASES` (default 256) per
//! property; `cargo xtask fuzz` runs more.

#[path = "../../../tests/fuzz_support.rs"]
mod fuzz_support;

use std::sync::OnceLock;
use std::time::Duration;

use burn::tensor::{Device, Distribution, Tensor};
use cachet_diffusion::models::{CogVideoXConfig, FluxConfig, FluxTransformer, embedded};
use cachet_diffusion::{CacheConfig, CacheHooks, FlowMatchEuler, FluxCond, Guidance, denoise};
use cachet_tensor::Precision;
use fuzz_support::{any_json, any_text, bounded, fails_fast, mutated_json};
use proptest::prelude::*;
use serde_json::json;

const FAST: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Model configs
// ---------------------------------------------------------------------------------------------

const FLUX_KEYS: &[&str] = &[
    "_class_name",
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
];

fn valid_flux() -> serde_json::Value {
    serde_json::from_str(include_str!("../assets/tiny-flux/config.json")).unwrap()
}

fn check_flux(text: &str) -> Result<(), TestCaseError> {
    if let Ok(config) = bounded(text.len(), || FluxConfig::from_json(text, "fuzz.json"))? {
        prop_assert!(fuzz_support::one_json_document(text), "{text:?}");
        // What the model derives from an accepted config must be computable.
        let _ = (
            config.inner_dim(),
            config.output_width(),
            config.out_channels(),
        );
    }
    Ok(())
}

const COG_KEYS: &[&str] = &[
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "time_embed_dim",
    "ofs_embed_dim",
    "text_embed_dim",
    "num_layers",
    "sample_width",
    "sample_height",
    "sample_frames",
    "patch_size",
    "patch_size_t",
    "temporal_compression_ratio",
    "max_text_seq_length",
    "activation_fn",
    "timestep_activation_fn",
    "norm_eps",
    "spatial_interpolation_scale",
    "temporal_interpolation_scale",
    "use_rotary_positional_embeddings",
    "use_learned_positional_embeddings",
];

fn valid_cogvideox() -> serde_json::Value {
    json!({
        "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
        "time_embed_dim": 32, "ofs_embed_dim": 32, "text_embed_dim": 16, "num_layers": 2,
        "sample_width": 8, "sample_height": 8, "sample_frames": 9, "patch_size": 2,
        "patch_size_t": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 8,
        "activation_fn": "gelu-approximate", "timestep_activation_fn": "silu",
        "use_rotary_positional_embeddings": true, "use_learned_positional_embeddings": true
    })
}

fn check_cogvideox(text: &str) -> Result<(), TestCaseError> {
    if let Ok(config) = bounded(text.len(), || CogVideoXConfig::from_json(text, "fuzz.json"))? {
        prop_assert!(fuzz_support::one_json_document(text), "{text:?}");
        let _ = (
            config.inner_dim(),
            config.out_channels(),
            config.uses_positional_table(),
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn flux_config_arbitrary(text in prop_oneof![
        any_text(),
        any_json(FLUX_KEYS).prop_map(|v| v.to_string()),
    ]) {
        check_flux(&text)?;
    }

    #[test]
    fn flux_config_mutated(text in mutated_json(valid_flux(), FLUX_KEYS)) {
        check_flux(&text)?;
    }

    #[test]
    fn cogvideox_config_arbitrary(text in prop_oneof![
        any_text(),
        any_json(COG_KEYS).prop_map(|v| v.to_string()),
    ]) {
        check_cogvideox(&text)?;
    }

    #[test]
    fn cogvideox_config_mutated(text in mutated_json(valid_cogvideox(), COG_KEYS)) {
        check_cogvideox(&text)?;
    }
}

#[test]
fn model_config_absurd_sizes_fail_fast() {
    for (key, value) in [
        ("num_attention_heads", json!(1u64 << 40)),
        ("attention_head_dim", json!(1u64 << 62)),
        ("in_channels", json!(u64::MAX)),
        ("patch_size", json!(1u64 << 33)),
    ] {
        let mut flux = valid_flux();
        flux[key] = value.clone();
        let text = flux.to_string();
        fails_fast(&format!("flux {key}"), FAST, || {
            FluxConfig::from_json(&text, "absurd")
        });
        let mut cog = valid_cogvideox();
        cog[key] = value;
        let text = cog.to_string();
        fails_fast(&format!("cogvideox {key}"), FAST, || {
            CogVideoXConfig::from_json(&text, "absurd")
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Cache-method config
// ---------------------------------------------------------------------------------------------

const METHODS: &[&str] = &[
    "none",
    "pab",
    "fastercache",
    "fbcache",
    "dbcache",
    "taylorseer",
    "magcache",
    "dbprune",
    "textkv",
];

const CACHE_KEYS: &[&str] = &[
    "method",
    "threshold",
    "cache_config",
    "calibrator_config",
    "adapter",
    "Fn_compute_blocks",
    "Bn_compute_blocks",
    "residual_diff_threshold",
    "max_accumulated_residual_diff_threshold",
    "max_warmup_steps",
    "warmup_interval",
    "max_cached_steps",
    "max_continuous_cached_steps",
    "enable_separate_cfg",
    "cfg_compute_first",
    "cfg_diff_compute_separate",
    "steps_computation_mask",
    "steps_computation_policy",
    "taylorseer_order",
    "calibrator_cache_type",
    "blocks",
    "forward_pattern",
    "params_modifiers",
    "spatial_attention_block_skip_range",
    "spatial_attention_timestep_skip_range",
    "spatial_attention_block_identifiers",
    "unconditional_batch_skip_range",
    "alpha_low_frequency",
    "attention_weight",
    "tensor_format",
    "is_guidance_distilled",
    "cache_interval",
    "disable_cache_before_step",
    "disable_cache_after_step",
    "max_order",
    "taylor_factors_dtype",
    "skip_predict_identifiers",
    "cache_identifiers",
    "transformer_blocks",
    "single_transformer_blocks",
    "calibrator_type",
    "dmd_history",
    "dmd_rank",
    "dmd_ridge",
    "dmd_svd_precision",
    "calibrator_kwargs",
    "mag_ratios",
    "calibrate",
    "max_skip_steps",
    "retention_ratio",
    "num_inference_steps",
    "enable_dynamic_prune_threshold",
    "max_dynamic_prune_threshold",
    "dynamic_prune_threshold_relax_ratio",
    "non_prune_block_ids",
    "force_reduce_calibrator_vram",
];

/// Every method's full default config (all fields spelled out), plus a DBCache with an adapter,
/// a calibrator and a steps mask.
fn valid_cache_configs() -> Vec<serde_json::Value> {
    // MagCache's defaults lack the model's ratios and TextKV does not apply to Flux: both are
    // refused on attach (typed errors); a MagCache with ratios is below.
    let mut out: Vec<serde_json::Value> = METHODS
        .iter()
        .filter(|m| !matches!(**m, "magcache" | "textkv"))
        .map(|m| serde_json::to_value(CacheConfig::from_name(m, None).unwrap()).unwrap())
        .collect();
    out.push(json!({
        "method": "dbcache",
        "cache_config": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1, "max_warmup_steps": 1,
            "residual_diff_threshold": 0.5, "max_cached_steps": 2,
            "max_continuous_cached_steps": 1, "enable_separate_cfg": true,
            "steps_computation_mask": [1, 0, 0], "steps_computation_policy": "static"},
        "calibrator_config": {"taylorseer_order": 2, "calibrator_cache_type": "hidden_states"},
        "adapter": {"blocks": [["transformer_blocks"], ["single_transformer_blocks"]],
            "params_modifiers": [{"residual_diff_threshold": 0.2}, {"Fn_compute_blocks": 2}]}
    }));
    out.push(json!({
        "method": "magcache", "mag_ratios": [1.0, 1.1, 0.9, 1.0], "num_inference_steps": 3,
        "threshold": 0.2, "max_skip_steps": 1, "retention_ratio": 0.3
    }));
    out.push(json!({
        "method": "dbcache",
        "cache_config": {"Fn_compute_blocks": 1, "max_warmup_steps": 1, "residual_diff_threshold": 0.9},
        "calibrator_config": {"calibrator_type": "dmd", "dmd_history": 4, "dmd_rank": 2}
    }));
    out.push(json!({
        "method": "dbprune",
        "cache_config": {"Fn_compute_blocks": 1, "max_warmup_steps": 1, "residual_diff_threshold": 0.5,
            "enable_dynamic_prune_threshold": true, "non_prune_block_ids": [2],
            "force_reduce_calibrator_vram": true},
        "calibrator_config": {"calibrator_type": "foca"}
    }));
    out.push(json!({
        "method": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1,
        "disable_cache_after_step": 3, "max_order": 2, "taylor_factors_dtype": "float32",
        "cache_identifiers": ["transformer_blocks\\.\\d+\\.attn"],
        "skip_predict_identifiers": ["single_transformer_blocks\\.0\\.attn"]
    }));
    out
}

fn tiny_flux() -> &'static FluxTransformer {
    static MODEL: OnceLock<FluxTransformer> = OnceLock::new();
    MODEL.get_or_init(|| embedded::tiny_flux(&Device::default(), Precision::F32).unwrap())
}

/// Attaches an accepted config to the tiny Flux and runs three denoising steps.
fn run_config(config: CacheConfig, guidance: u8) -> Result<(), TestCaseError> {
    let model = tiny_flux();
    let Ok(mut hooks) = bounded(1 << 16, || CacheHooks::new(model, config))? else {
        return Ok(());
    };
    let device = Device::default();
    device.seed(3);
    let cond = FluxCond::random(model, 1, 4, 8, 8, &device);
    let uncond = FluxCond::random(model, 1, 4, 8, 8, &device);
    let noise = Tensor::<3>::random([1, 16, 64], Distribution::Normal(0.0, 1.0), &device);
    let scheduler = FlowMatchEuler::new(3, 1.0, None).unwrap();
    let guidance = match guidance % 3 {
        0 => None,
        g => Some(Guidance {
            scale: 3.0,
            separate: g == 2,
        }),
    };
    let _ = denoise(
        model,
        &mut hooks,
        &scheduler,
        noise,
        &cond,
        guidance.map(|_| &uncond),
        guidance,
        |_| {},
    );
    let _ = (hooks.log().decisions.len(), hooks.layout());
    Ok(())
}

/// Parses `text` as `{"method": ...}` JSON and as `--cache-config` options of every method
/// name, running whatever is accepted.
fn check_cache(text: &str, name: usize, guidance: u8) -> Result<(), TestCaseError> {
    if let Ok(config) = bounded(text.len(), || serde_json::from_str::<CacheConfig>(text))? {
        run_config(config, guidance)?;
    }
    let method = METHODS[name % METHODS.len()];
    if let Ok(config) = bounded(text.len(), || CacheConfig::from_name(method, Some(text)))? {
        run_config(config, guidance)?;
    }
    Ok(())
}

/// A valid config with JSON edits; half the time without its `method` key (the options of
/// `--cache-config`).
fn mutated_cache_config() -> impl Strategy<Value = String> {
    let bases = valid_cache_configs();
    (0..bases.len(), any::<bool>()).prop_flat_map(move |(i, strip)| {
        let mut base = bases[i].clone();
        if strip {
            base.as_object_mut().unwrap().remove("method");
        }
        mutated_json(base, CACHE_KEYS)
    })
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn cache_config_arbitrary(
        text in prop_oneof![any_text(), any_json(CACHE_KEYS).prop_map(|v| v.to_string())],
        name in any::<usize>(),
        guidance in any::<u8>(),
    ) {
        check_cache(&text, name, guidance)?;
    }

    #[test]
    fn cache_config_mutated(
        text in mutated_cache_config(),
        name in any::<usize>(),
        guidance in any::<u8>(),
    ) {
        check_cache(&text, name, guidance)?;
    }
}

#[test]
fn valid_bases_parse_and_run() {
    FluxConfig::from_json(&valid_flux().to_string(), "valid").unwrap();
    CogVideoXConfig::from_json(&valid_cogvideox().to_string(), "valid").unwrap();
    for base in valid_cache_configs() {
        let config: CacheConfig = serde_json::from_value(base.clone()).unwrap();
        CacheHooks::new(tiny_flux(), config.clone()).unwrap_or_else(|e| panic!("{base}: {e}"));
        run_config(config, 1).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: crashes the fuzzer found, kept as named cases
// ---------------------------------------------------------------------------------------------

/// `cogvideox_config_arbitrary`: `inner_dim` (heads x head width) overflowed inside validation
/// ("attempt to multiply with overflow"). Sizes are bounded now, with a typed error.
#[test]
fn regression_cogvideox_head_count_overflow() {
    let err = CogVideoXConfig::from_json(r#"{"num_attention_heads": 288230376151711744}"#, "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_attention_heads"), "{err}");
    // A zero sample_frames passed validation and underflowed when the model sized its table.
    let err = CogVideoXConfig::from_json(r#"{"sample_frames": 0}"#, "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("sample_frames"), "{err}");
}

/// `flux_config_mutated`: an accepted `patch_size` of 2^29 made `output_width` (patch² x
/// channels, the width of `proj_out`) overflow; and an `axes_dims_rope` sum could overflow
/// inside validation. Both are typed errors now.
#[test]
fn regression_flux_width_overflows() {
    for text in [
        r#"{"patch_size": 536870912}"#,
        r#"{"patch_size": 18446744073709551615}"#,
        r#"{"attention_head_dim": 4, "axes_dims_rope": [9223372036854775808, 9223372036854775808, 4]}"#,
        r#"{"num_attention_heads": 1099511627776}"#,
    ] {
        let err = FluxConfig::from_json(text, "t").unwrap_err().to_string();
        assert!(err.contains("field"), "{text}: {err}");
    }
}

/// `cache_config_mutated` (in `cargo xtask fuzz`): DBCache's check that `Fn_compute_blocks +
/// Bn_compute_blocks` fit the block list added the two unchecked, so `Bn_compute_blocks: 2^64 -
/// 1` overflowed ("attempt to add with overflow") instead of being refused.
#[test]
fn regression_dbcache_compute_blocks_sum_overflow() {
    let text = r#"{"method": "dbcache", "cache_config": {"Fn_compute_blocks": 1,
        "Bn_compute_blocks": 18446744073709551615}}"#;
    let config: CacheConfig = serde_json::from_str(text).unwrap();
    let err = CacheHooks::new(tiny_flux(), config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("18446744073709551615"), "{err}");
}

/// `cache_config_mutated` (in `cargo xtask fuzz`): the TaylorSeer calibrator sized its list of
/// derivatives from `taylorseer_order` unchecked, so `2^60` aborted the process on the first
/// cached step ("memory allocation ... failed"). The order is bounded now, with a typed error.
#[test]
fn regression_taylorseer_order_is_bounded() {
    let text = r#"{"method": "dbcache", "cache_config": {"Fn_compute_blocks": 1},
        "calibrator_config": {"taylorseer_order": 1152921504606846976}}"#;
    let config: CacheConfig = serde_json::from_str(text).unwrap();
    let err = fails_fast("taylorseer_order 2^60", FAST, || {
        CacheHooks::new(tiny_flux(), config)
    });
    assert!(err.contains("taylorseer_order"), "{err}");
}

/// `cache_config_mutated`: DBCache listed `range(0, max_warmup_steps, warmup_interval)` into a
/// vector on every step, so `max_warmup_steps: 2^63 - 1` died with "capacity overflow"; and
/// TaylorSeer's step arithmetic overflowed for `disable_cache_before_step` past `i64::MAX`. Both
/// are computed, not listed or wrapped, now.
#[test]
fn regression_huge_step_options_run() {
    for text in [
        r#"{"method": "dbcache", "cache_config": {"Fn_compute_blocks": 1,
            "max_warmup_steps": 9223372036854775807}}"#,
        r#"{"method": "taylorseer", "disable_cache_before_step": 9223372036854775808,
            "disable_cache_after_step": 18446744073709551615}"#,
    ] {
        let config: CacheConfig = serde_json::from_str(text).unwrap();
        let model = tiny_flux();
        let mut hooks = CacheHooks::new(model, config).unwrap();
        let device = Device::default();
        let cond = FluxCond::random(model, 1, 4, 8, 8, &device);
        let noise = Tensor::<3>::random([1, 16, 64], Distribution::Normal(0.0, 1.0), &device);
        let scheduler = FlowMatchEuler::new(3, 1.0, None).unwrap();
        denoise(
            model,
            &mut hooks,
            &scheduler,
            noise,
            &cond,
            None,
            None,
            |_| {},
        )
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    }
}
