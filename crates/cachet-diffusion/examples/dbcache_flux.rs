//! DBCache with the TaylorSeer calibrator on the embedded tiny Flux, against the uncached loop.
//!
//! `cargo run -p cachet-diffusion --example dbcache_flux`

use burn::tensor::{Device, Distribution, Tensor};
use cachet_diffusion::models::embedded;
use cachet_diffusion::{
    CacheConfig, CacheHooks, DBCacheConfig, FlowMatchEuler, FluxCond, TaylorSeerCalibratorConfig,
    denoise, latent_psnr, summary,
};
use cachet_tensor::Precision;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::default();
    device.seed(0);
    let model = embedded::tiny_flux(&device, Precision::F32)?;
    let (height, width, steps) = (32, 32, 20);
    let tokens = (height / 2) * (width / 2);
    let noise = Tensor::random([1, tokens, 64], Distribution::Normal(0.0, 1.0), &device);
    let cond = FluxCond::random(&model, 1, 16, height, width, &device);
    let scheduler = FlowMatchEuler::new(steps, 1.0, Some(FlowMatchEuler::flux_mu(tokens)))?;

    let run = |config: CacheConfig| -> Result<_, Box<dyn std::error::Error>> {
        let mut hooks = CacheHooks::new(&model, config)?;
        let out = denoise(
            &model,
            &mut hooks,
            &scheduler,
            noise.clone(),
            &cond,
            None,
            None,
            |_| {},
        )?;
        let latents: Vec<f32> = out.latents.into_data().try_into_vec()?;
        Ok((latents, out.seconds, hooks))
    };

    // The random tiny model's features move more per step than a trained FLUX.1's, so the
    // threshold is higher than cache-dit's 0.08 default; F2B1 suits its 12 blocks.
    let cached_config = CacheConfig::DbCache {
        cache_config: DBCacheConfig {
            Fn_compute_blocks: 2,
            Bn_compute_blocks: 1,
            residual_diff_threshold: 0.9,
            max_warmup_steps: 4,
            ..Default::default()
        },
        calibrator_config: Some(TaylorSeerCalibratorConfig::default().into()),
        adapter: Default::default(),
    };
    let (reference, reference_seconds, _) = run(CacheConfig::None)?;
    let (cached, seconds, hooks) = run(cached_config)?;
    println!("{}", summary(&hooks));
    let (psnr, max_abs) = latent_psnr(&reference, &cached);
    println!(
        "uncached {reference_seconds:.2} s, DBCache+TaylorSeer {seconds:.2} s: {:.2}x, PSNR {psnr:.1} dB, max |error| {max_abs:.3}",
        reference_seconds / seconds
    );
    Ok(())
}
