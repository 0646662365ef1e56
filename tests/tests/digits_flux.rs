//! The embedded digits model (`xtask/goldens/digits_flux.py`: a Flux trained on scikit-learn's
//! handwritten digits) against its generator: the uncached denoising loop equals diffusers'
//! scheduler driving the same weights, the classifier and SSIM equal the generator's, and the
//! model draws the digit asked for — at least 80% of 10 labels x 3 seeds classified as their
//! label, uncached and with cache-dit's default DBCache.

use std::path::PathBuf;

use cachet_diffusion::models::embedded;
use cachet_diffusion::{
    CacheConfig, CacheHooks, DiffusionError, DigitsFlux, GrayImage, Guidance, denoise, psnr, ssim,
};
use cachet_integration_tests::{max_abs_diff, test_device};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DType, Device, Precision, Tensor};

/// Least share of generated digits classified as their label.
const MIN_ACCURACY: f64 = 0.8;

fn asset_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crates/cachet-diffusion/assets/digits-flux")
}

struct Reference(Checkpoint);

impl Reference {
    fn open() -> Self {
        Self(Checkpoint::open(asset_dir().join("reference.safetensors")).unwrap())
    }
    fn floats(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let data = self.0.tensor_data(name).unwrap();
        let shape = data.shape().to_vec();
        let values = data
            .try_cast(DType::F32)
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap();
        (values, shape)
    }
    fn labels(&self, name: &str) -> Vec<usize> {
        let data = self.0.tensor_data(name).unwrap();
        data.try_into_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect()
    }
    /// The `i`-th `[16, 16]` slice of `name` as an image.
    fn image(&self, name: &str, i: usize) -> GrayImage {
        let (values, shape) = self.floats(name);
        let (h, w) = (shape[1], shape[2]);
        GrayImage::new(w, h, values[i * h * w..(i + 1) * h * w].to_vec()).unwrap()
    }
}

fn load(device: &Device) -> DigitsFlux {
    embedded::digits_flux(device, Precision::F32).unwrap()
}

/// One guided run of `label` from `noise`; returns the final latents.
fn sample(
    digits: &DigitsFlux,
    config: CacheConfig,
    noise: Tensor<3>,
    label: usize,
    separate: bool,
    device: &Device,
) -> Tensor<3> {
    let steps = digits.spec.num_inference_steps;
    let mut hooks = CacheHooks::new(&digits.model, config).unwrap();
    let cond = digits.cond(Some(label), device).unwrap();
    let uncond = digits.cond(None, device).unwrap();
    let guidance = Guidance {
        scale: digits.spec.guidance_scale,
        separate,
    };
    denoise(
        &digits.model,
        &mut hooks,
        &digits.scheduler(steps).unwrap(),
        noise,
        &cond,
        Some(&uncond),
        Some(guidance),
        |_| {},
    )
    .unwrap()
    .latents
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

#[test]
fn uncached_sampling_matches_diffusers_scheduler() {
    let Some(device) = test_device() else { return };
    let digits = load(&device);
    let r = Reference::open();
    let (noise, shape) = r.floats("sample.noise");
    let labels = r.labels("sample.labels");
    let (expected, _) = r.floats("sample.latents");
    let per = shape[1] * shape[2];
    for (i, &label) in labels.iter().enumerate() {
        let start = Tensor::<3>::from_data(
            burn::tensor::TensorData::new(
                noise[i * per..(i + 1) * per].to_vec(),
                [1, shape[1], shape[2]],
            ),
            &device,
        );
        // diffusers' loop runs cond and uncond as two calls; the batched form must agree too.
        for separate in [true, false] {
            let out = host(sample(
                &digits,
                CacheConfig::None,
                start.clone(),
                label,
                separate,
                &device,
            ));
            let want = &expected[i * per..(i + 1) * per];
            let diff = max_abs_diff(&out, want);
            eprintln!("case {i} (label {label}, separate {separate}): max |Δ| = {diff:e}");
            assert!(diff < 1e-4, "case {i}: final latents differ by {diff}");
            let image = digits.decode(&out).unwrap();
            let golden = r.image("sample.images", i);
            let image_diff = max_abs_diff(&image.pixels, &golden.pixels);
            assert!(
                image_diff < 1e-4,
                "case {i}: decoded image differs by {image_diff}"
            );
        }
    }
}

#[test]
fn classifier_reproduces_the_generator() {
    let Some(device) = test_device() else { return };
    let digits = load(&device);
    let r = Reference::open();
    let labels = r.labels("classifier.labels");
    let (logits, _) = r.floats("classifier.logits");
    let classes = digits.classifier.classes();
    for (i, &label) in labels.iter().enumerate() {
        let image = r.image("classifier.images", i);
        let ours = digits.classifier.logits(&image).unwrap();
        let diff = max_abs_diff(&ours, &logits[i * classes..(i + 1) * classes]);
        assert!(diff < 1e-4, "image {i}: logits differ by {diff}");
        assert_eq!(
            digits.classifier.predict(&image).unwrap(),
            label,
            "image {i}"
        );
    }
    assert!(
        digits.spec.classifier_heldout_accuracy >= 0.9,
        "held-out accuracy {}",
        digits.spec.classifier_heldout_accuracy
    );
    let wrong = GrayImage::new(8, 8, vec![0.0; 64]).unwrap();
    assert!(digits.classifier.logits(&wrong).is_err());
}

#[test]
fn ssim_and_psnr_match_the_generator() {
    let r = Reference::open();
    let (values, _) = r.floats("ssim.value");
    let (psnrs, _) = r.floats("ssim.psnr");
    for (i, (&want, &want_psnr)) in values.iter().zip(&psnrs).enumerate() {
        let (a, b) = (r.image("ssim.a", i), r.image("ssim.b", i));
        let got = ssim(&a, &b, 2.0).unwrap();
        assert!(
            (got - want as f64).abs() < 1e-5,
            "pair {i}: SSIM {got} vs {want}"
        );
        let got = psnr(&a, &b, 2.0).unwrap();
        assert!(
            (got - want_psnr as f64).abs() < 1e-3,
            "pair {i}: PSNR {got} vs {want_psnr}"
        );
    }
}

#[test]
fn labels_out_of_range_are_typed_errors() {
    let Some(device) = test_device() else { return };
    let digits = load(&device);
    let err = digits.cond(Some(10), &device).unwrap_err();
    assert!(
        matches!(
            err,
            DiffusionError::LabelOutOfRange {
                label: 10,
                labels: 10
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("0 to 9"), "{err}");
    assert!(digits.decode(&[0.0; 3]).is_err());
}

/// Generated digits are classified as their label, uncached and with DBCache's defaults.
#[test]
fn generated_digits_are_classified_as_their_label() {
    let Some(device) = test_device() else { return };
    let digits = load(&device);
    let seeds = [11u64, 12, 13];
    for (name, config) in [
        ("uncached", CacheConfig::None),
        ("dbcache", CacheConfig::from_name("dbcache", None).unwrap()),
    ] {
        let mut right = 0;
        let mut total = 0;
        let mut wrong = Vec::new();
        for label in 0..digits.spec.num_labels {
            for &seed in &seeds {
                let noise = digits.noise(seed, &device);
                let out = host(sample(
                    &digits,
                    config.clone(),
                    noise,
                    label,
                    false,
                    &device,
                ));
                let image = digits.decode(&out).unwrap();
                let predicted = digits.classifier.predict(&image).unwrap();
                total += 1;
                if predicted == label {
                    right += 1;
                } else {
                    wrong.push(format!("{label}->{predicted} (seed {seed})"));
                }
            }
        }
        let accuracy = right as f64 / total as f64;
        eprintln!("{name}: {right}/{total} classified as their label; wrong: {wrong:?}");
        assert!(
            accuracy >= MIN_ACCURACY,
            "{name}: only {right}/{total} generated digits classified as their label ({wrong:?})"
        );
    }
}

/// A digits model folder loads like the embedded one; a `digits.json` that does not fit the
/// weights is a typed error naming the mismatch.
#[test]
fn digits_folder_loads_and_mismatches_are_typed_errors() {
    let Some(device) = test_device() else { return };
    let embedded = load(&device);
    let folder = DigitsFlux::from_dir(&asset_dir(), &device, Precision::F32).unwrap();
    assert_eq!(folder.spec, embedded.spec);
    assert!(DigitsFlux::is_digits_dir(&asset_dir()));

    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(asset_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(asset_dir().join("digits.json")).unwrap())
            .unwrap();
    for (key, value, needle) in [
        (
            "num_labels",
            serde_json::json!(9),
            "null_label 10 must follow the labels",
        ),
        (
            "text_tokens",
            serde_json::json!(3),
            "the label table has 10 labels of 4 tokens",
        ),
        ("image_size", serde_json::json!(18), "image_size 18"),
        ("latent_channels", serde_json::json!(3), "latent_channels 3"),
    ] {
        let mut edited = spec.clone();
        edited[key] = value;
        std::fs::write(tmp.path().join("digits.json"), edited.to_string()).unwrap();
        let err = DigitsFlux::from_dir(tmp.path(), &device, Precision::F32).unwrap_err();
        assert!(
            matches!(err, DiffusionError::Config { .. }) && err.to_string().contains(needle),
            "{key}: {err}"
        );
    }
}
