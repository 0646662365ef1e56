//! Behaviour of the hooks on the embedded tiny Flux: contexts, resets, bad input, and that
//! caching disabled changes nothing.

use burn::tensor::{Device, Distribution, Tensor};
use cachet_diffusion::models::embedded;
use cachet_diffusion::models::{FluxInputs, FluxTransformer, NoHooks};
use cachet_diffusion::{
    Action, CacheConfig, CacheHooks, DBCacheConfig, DiffusionError, FasterCacheConfig,
    FirstBlockCacheConfig, FlowMatchEuler, FluxCond, PyramidAttentionBroadcastConfig, denoise,
};
use cachet_tensor::Precision;

fn model() -> (FluxTransformer, Device) {
    let device = Device::default();
    (
        embedded::tiny_flux(&device, Precision::F32).unwrap(),
        device,
    )
}

fn inputs(model: &FluxTransformer, device: &Device) -> FluxInputs {
    device.seed(7);
    let cond = FluxCond::random(model, 1, 4, 8, 8, device);
    FluxInputs {
        hidden_states: Tensor::random([1, 16, 64], Distribution::Normal(0.0, 1.0), device),
        encoder_hidden_states: cond.encoder_hidden_states,
        pooled_projections: cond.pooled_projections,
        timestep: Tensor::full([1], 0.5, device),
        img_ids: cond.img_ids,
        txt_ids: cond.txt_ids,
        guidance: None,
    }
}

fn max_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn caching_disabled_is_the_plain_model() {
    let (model, device) = model();
    let x = inputs(&model, &device);
    let plain = model.forward(&x, &mut NoHooks).unwrap();
    let mut hooks = CacheHooks::new(&model, CacheConfig::None).unwrap();
    hooks.begin_step(0, 500.0);
    let hooked = model.forward(&x, &mut hooks).unwrap();
    assert_eq!(max_diff(plain, hooked), 0.0);
}

#[test]
fn first_block_cache_needs_a_context_and_keeps_contexts_apart() {
    let (model, device) = model();
    let x = inputs(&model, &device);
    let config = CacheConfig::FbCache(FirstBlockCacheConfig { threshold: 0.5 });
    let mut hooks = CacheHooks::new(&model, config).unwrap();
    hooks.begin_step(0, 900.0);
    let err = model.forward(&x, &mut hooks).unwrap_err();
    let err = DiffusionError::from_model(err);
    assert!(
        matches!(
            err,
            DiffusionError::NoContext {
                method: "FirstBlockCache"
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("cache_context"));

    // Same input twice in "cond": the second call reuses the tail (diff 0 < threshold).
    hooks.cache_context("cond");
    let first = model.forward(&x, &mut hooks).unwrap();
    hooks.begin_step(1, 800.0);
    let second = model.forward(&x, &mut hooks).unwrap();
    assert!(max_diff(first.clone(), second) < 1e-4);
    // "uncond" has no state yet: it must compute everything.
    hooks.cache_context("uncond");
    model.forward(&x, &mut hooks).unwrap();
    let actions: Vec<(String, usize, Action)> = hooks
        .log()
        .decisions
        .iter()
        .filter(|d| d.target == "transformer_blocks")
        .map(|d| (d.context.clone(), d.step, d.action))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("cond".into(), 0, Action::Computed),
            ("cond".into(), 1, Action::Cached),
            ("uncond".into(), 1, Action::Computed),
        ]
    );
    hooks.reset();
    assert!(hooks.log().decisions.is_empty());
    assert_eq!(hooks.memory_bytes(), 0);
}

#[test]
fn bad_options_are_typed_errors() {
    let (model, _) = model();
    let attach = |config: CacheConfig| CacheHooks::new(&model, config).unwrap_err();
    let pab = PyramidAttentionBroadcastConfig {
        spatial_attention_block_skip_range: Some(2),
        spatial_attention_timestep_skip_range: (800.0, 100.0),
        ..Default::default()
    };
    assert!(matches!(
        attach(CacheConfig::Pab(pab)),
        DiffusionError::InvalidRange {
            lo: 800.0,
            hi: 100.0,
            ..
        }
    ));
    let fbc = FirstBlockCacheConfig { threshold: -1.0 };
    assert!(matches!(
        attach(CacheConfig::FbCache(fbc)),
        DiffusionError::Negative {
            field: "threshold",
            ..
        }
    ));
    let db = DBCacheConfig {
        Fn_compute_blocks: 8,
        Bn_compute_blocks: 8,
        ..Default::default()
    };
    let err = attach(CacheConfig::DbCache {
        cache_config: db,
        calibrator_config: None,
        adapter: Default::default(),
    });
    assert!(
        matches!(
            err,
            DiffusionError::TooManyComputeBlocks {
                fn_blocks: 8,
                bn_blocks: 8,
                blocks: 12,
                ..
            }
        ),
        "{err}"
    );
    let db = DBCacheConfig {
        residual_diff_threshold: -0.1,
        Fn_compute_blocks: 2,
        ..Default::default()
    };
    let err = attach(CacheConfig::DbCache {
        cache_config: db,
        calibrator_config: None,
        adapter: Default::default(),
    });
    assert!(matches!(
        err,
        DiffusionError::Negative {
            field: "residual_diff_threshold",
            ..
        }
    ));
    let pab = PyramidAttentionBroadcastConfig {
        spatial_attention_block_skip_range: Some(2),
        spatial_attention_block_identifiers: vec!["^temporal".into()],
        ..Default::default()
    };
    assert!(matches!(
        attach(CacheConfig::Pab(pab)),
        DiffusionError::UnmatchedIdentifier { .. }
    ));
}

#[test]
fn faster_cache_tensor_format_must_fit_the_output_rank() {
    let (model, device) = model();
    let mut hooks = CacheHooks::new(
        &model,
        CacheConfig::FasterCache(FasterCacheConfig::default()),
    )
    .unwrap();
    let scheduler = FlowMatchEuler::new(2, 1.0, None).unwrap();
    let cond = FluxCond::random(&model, 1, 4, 8, 8, &device);
    let noise = Tensor::random([1, 16, 64], Distribution::Normal(0.0, 1.0), &device);
    let guidance = Some(cachet_diffusion::Guidance {
        scale: 3.0,
        separate: false,
    });
    let err = denoise(
        &model,
        &mut hooks,
        &scheduler,
        noise,
        &cond,
        Some(&cond.clone()),
        guidance,
        |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(err, DiffusionError::TensorFormat { expected: 5, .. }),
        "{err}"
    );
}

#[test]
fn dbcache_caches_identical_steps_after_warmup_and_resets_per_inference() {
    let (model, device) = model();
    let x = inputs(&model, &device);
    let db = DBCacheConfig {
        Fn_compute_blocks: 2,
        Bn_compute_blocks: 1,
        max_warmup_steps: 2,
        residual_diff_threshold: 0.05,
        ..Default::default()
    };
    let mut hooks = CacheHooks::new(
        &model,
        CacheConfig::DbCache {
            cache_config: db,
            calibrator_config: None,
            adapter: Default::default(),
        },
    )
    .unwrap();
    let plain = model.forward(&x, &mut NoHooks).unwrap();
    for round in 0..2 {
        hooks.reset();
        for step in 0..4 {
            hooks.begin_step(step, 1000.0 - step as f64);
            let out = model.forward(&x, &mut hooks).unwrap();
            // Identical inputs: the cached residual reproduces the full computation.
            assert!(
                max_diff(plain.clone(), out) < 1e-4,
                "round {round} step {step}"
            );
        }
        let stats = hooks.dbcache_stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(
            stats[0].name,
            "transformer_blocks+single_transformer_blocks"
        );
        assert_eq!(stats[0].cached_steps, vec![2, 3], "round {round}");
        let blocks: Vec<usize> = hooks
            .log()
            .decisions
            .iter()
            .map(|d| d.computed_blocks)
            .collect();
        // Steps 0, 1: all 4 + 8 blocks; steps 2, 3: F2 in the first list, B1 in the second.
        assert_eq!(blocks, vec![4, 8, 4, 8, 2, 1, 2, 1]);
    }
}
