//! Benchmark rows of the methods added upstream since the first ones: diffusers' MagCache,
//! cache-dit's FoCa and DMD calibrators (inside DBCache) and DBPrune, at the settings their
//! documentation shows. MagCache needs the model's own magnitude ratios: they come from one
//! calibration run (`{"calibrate": true}`) of the embedded digits model, as a user would get them.
//! TextKV has no row: it is refused on these DiTs, where it would not be lossless.

use std::sync::OnceLock;

use cachet_diffusion::models::embedded;
use cachet_diffusion::{CacheConfig, Guidance, calibrate_mag_ratios};
use cachet_tensor::{DeviceSpec, Precision};

/// Steps of the bench (`CACHET_BENCH_STEPS`, else the model's default), which MagCache's ratios
/// are calibrated for.
fn steps(default: usize) -> usize {
    std::env::var("CACHET_BENCH_STEPS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The digits model's magnitude ratios: MagCache's calibration mode over one guided run (digit 0,
/// the bench's first noise seed), cond and uncond batched.
fn mag_ratios() -> &'static (usize, Vec<f64>) {
    static RATIOS: OnceLock<(usize, Vec<f64>)> = OnceLock::new();
    RATIOS.get_or_init(|| {
        let device = DeviceSpec::Cpu.init().expect("cpu device");
        let digits = embedded::digits_flux(&device, Precision::F32).expect("digits model");
        let steps = steps(digits.spec.num_inference_steps);
        let ratios = calibrate_mag_ratios(
            &digits.model,
            &digits.scheduler(steps).expect("scheduler"),
            digits.noise(1000, &device),
            &digits.cond(Some(0), &device).expect("cond"),
            Some(&digits.cond(None, &device).expect("uncond")),
            Some(Guidance {
                scale: digits.spec.guidance_scale,
                separate: false,
            }),
        )
        .expect("calibration run");
        (steps, ratios)
    })
}

/// `(name, config)` of each row.
pub fn variants() -> Vec<(String, CacheConfig)> {
    let config = |name: &str, options: &str| {
        CacheConfig::from_name(name, Some(options))
            .unwrap_or_else(|e| panic!("{name} {options}: {e}"))
    };
    let mut v = Vec::new();
    // diffusers' MagCacheConfig defaults (threshold 0.06, 3 skipped steps at most, the first
    // 20% of the steps computed) with the model's calibrated ratios, and a looser threshold.
    let (steps, ratios) = mag_ratios();
    for t in ["0.06", "0.12"] {
        v.push((
            format!("magcache_{t}"),
            config(
                "magcache",
                &format!(
                    r#"{{"threshold": {t}, "num_inference_steps": {steps}, "mag_ratios": {}}}"#,
                    serde_json::to_string(ratios).expect("ratios")
                ),
            ),
        ));
    }
    // cache-dit's FoCa example (DBCache F1B0, 8 warm-up steps, threshold 0.12) and DMD example
    // (F8B0, same threshold, 6-snapshot history).
    let cache = |f: usize| {
        format!(
            r#""cache_config": {{"Fn_compute_blocks": {f}, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.12, "max_warmup_steps": 8}}"#
        )
    };
    v.push((
        "dbcache_F1B0_R0.12_foca".into(),
        config(
            "dbcache",
            &format!(
                r#"{{{}, "calibrator_config": {{"calibrator_type": "foca"}}}}"#,
                cache(1)
            ),
        ),
    ));
    v.push((
        "dbcache_F8B0_R0.12_dmd".into(),
        config(
            "dbcache",
            &format!(
                r#"{{{}, "calibrator_config": {{"calibrator_type": "dmd", "dmd_history": 6}}}}"#,
                cache(8)
            ),
        ),
    ));
    // cache-dit's DBPrune example: 8 warm-up steps, threshold 0.12, dynamic threshold.
    v.push((
        "dbprune_R0.12_dynamic".into(),
        config(
            "dbprune",
            r#"{"cache_config": {"max_warmup_steps": 8, "residual_diff_threshold": 0.12, "enable_dynamic_prune_threshold": true}}"#,
        ),
    ));
    v
}
