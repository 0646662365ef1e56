//! Output parity of the CogVideoX transformer with diffusers 0.42.1 (goldens made by
//! `cargo xtask goldens`, `xtask/goldens/cogvideox.py`): max |Δ| < 1e-4 in f32, plus typed load
//! errors and the hook seam seeing every block and `attn1` once per forward.

use std::ops::Range;

use cachet_diffusion::models::{
    BlockFn, BlockGroup, BlockStates, DenoiserFn, DenoiserOutput, DitHooks, HookableDit, ModuleFn,
    ModulePath, NoHooks,
};
use cachet_diffusion::models::{CogVideoX, CogVideoXInputs};
use cachet_integration_tests::{fixture, max_abs_diff, test_device};
use cachet_nn::ModelError;
use cachet_nn::Pretrained;
use cachet_nn::Result;
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DType, Device, Precision, Tensor};

const TOLERANCE: f32 = 1e-4;

struct Reference(Checkpoint);

impl Reference {
    fn open(name: &str) -> Self {
        Self(Checkpoint::open(fixture(name).join("reference.safetensors")).unwrap())
    }
    fn has(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        self.0.load_float::<D>(name, device, DType::F32).unwrap()
    }
    fn floats(&self, name: &str) -> Vec<f32> {
        let data = self.0.tensor_data(name).unwrap();
        data.try_cast(DType::F32)
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap()
    }
    fn inputs(&self, case: &str, device: &Device) -> CogVideoXInputs {
        let key = |k: &str| format!("{case}.{k}");
        CogVideoXInputs {
            hidden_states: self.tensor::<5>(&key("hidden_states"), device),
            encoder_hidden_states: self.tensor::<3>(&key("encoder_hidden_states"), device),
            timestep: self.floats(&key("timestep")),
            ofs: self.has(&key("ofs")).then(|| self.floats(&key("ofs"))),
            image_rotary_emb: None,
        }
    }
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

fn check(name: &str, cases: &[&str]) {
    let Some(device) = test_device() else { return };
    let model = CogVideoX::from_pretrained(fixture(name), &device, Precision::F32).unwrap();
    let reference = Reference::open(name);
    for case in cases {
        let inputs = reference.inputs(case, &device);
        let out = model.forward(&inputs, &mut NoHooks).unwrap();
        let want = reference.floats(&format!("{case}.output"));
        let diff = max_abs_diff(&floats(out), &want);
        eprintln!("{name}.{case}: max |Δ| = {diff:e}");
        assert!(diff < TOLERANCE, "{name}.{case}: max |Δ| = {diff}");

        // The rotary helper equals the pipeline's tables.
        let cos_key = format!("{case}.rotary_cos");
        if reference.has(&cos_key) {
            let [_, frames, _, height, width] = inputs.hidden_states.dims();
            let rotary = model
                .rotary_embeddings(frames, height, width, &device)
                .unwrap();
            let cos = max_abs_diff(&floats(rotary.cos), &reference.floats(&cos_key));
            let sin = max_abs_diff(
                &floats(rotary.sin),
                &reference.floats(&format!("{case}.rotary_sin")),
            );
            assert!(
                cos < 1e-6 && sin < 1e-6,
                "{name}.{case}: rotary Δ {cos} {sin}"
            );
        }
    }
}

#[test]
fn cogvideox_sincos_matches_diffusers() {
    check("cogvideox", &["a", "b"]);
}

#[test]
fn cogvideox_rotary_learned_positions_match_diffusers() {
    check("cogvideox-rotary", &["a"]);
}

#[test]
fn cogvideox15_patch_t_ofs_match_diffusers() {
    check("cogvideox15", &["a"]);
}

#[test]
fn select_batch_rows_match_the_full_batch() {
    let Some(device) = test_device() else { return };
    let model =
        CogVideoX::from_pretrained(fixture("cogvideox15"), &device, Precision::F32).unwrap();
    let inputs = Reference::open("cogvideox15").inputs("a", &device);
    let full = floats(model.forward(&inputs, &mut NoHooks).unwrap());
    let row = floats(
        model
            .forward(&inputs.select_batch(1..2).unwrap(), &mut NoHooks)
            .unwrap(),
    );
    let half = full.len() / 2;
    assert!(max_abs_diff(&full[half..], &row) < 1e-5);
}

#[test]
fn malformed_config_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("cogvideox");
    std::fs::copy(
        source.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let Some(device) = test_device() else { return };
    for bad in [
        r#"{"num_layers": "two"}"#,
        r#"{"use_learned_positional_embeddings": true, "use_rotary_positional_embeddings": false}"#,
        r#"{"activation_fn": "swiglu"}"#,
    ] {
        std::fs::write(dir.path().join("config.json"), bad).unwrap();
        let err = CogVideoX::from_pretrained(dir.path(), &device, Precision::F32).unwrap_err();
        assert!(matches!(err, ModelError::Config { .. }), "{bad}: {err}");
    }
}

#[test]
fn missing_or_misshaped_weight_is_named() {
    let Some(device) = test_device() else { return };
    let source = fixture("cogvideox");
    let config = std::fs::read_to_string(source.join("config.json")).unwrap();
    let checkpoint = Checkpoint::open(source.join("diffusion_pytorch_model.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), &config).unwrap();

    let drop = "transformer_blocks.1.attn1.to_k.weight";
    let kept: Vec<_> = checkpoint
        .names()
        .into_iter()
        .filter(|n| *n != drop)
        .map(|n| (n.to_string(), checkpoint.tensor_data(n).unwrap()))
        .collect();
    cachet_tensor::safetensors::save(
        dir.path().join("diffusion_pytorch_model.safetensors"),
        &kept,
        None,
    )
    .unwrap();
    let err = CogVideoX::from_pretrained(dir.path(), &device, Precision::F32).unwrap_err();
    match err {
        ModelError::MissingWeight { name, .. } => assert_eq!(name, drop),
        other => panic!("expected MissingWeight, got {other}"),
    }

    // A config with a wider text embedding than the weights: a shape error naming the tensor.
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["text_embed_dim"] = serde_json::json!(48);
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    std::fs::copy(
        source.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = CogVideoX::from_pretrained(dir.path(), &device, Precision::F32).unwrap_err();
    match err {
        ModelError::WeightShape { name, .. } => assert_eq!(name, "patch_embed.text_proj.weight"),
        other => panic!("expected WeightShape, got {other}"),
    }
}

/// Counts what the model hands to the hooks, running everything as written.
#[derive(Default)]
struct Counting {
    denoiser: usize,
    groups: Vec<String>,
    blocks: Vec<usize>,
    modules: Vec<String>,
}

impl DitHooks for Counting {
    fn run_denoiser(&mut self, batch: usize, run: &mut DenoiserFn<'_>) -> Result<DenoiserOutput> {
        assert_eq!(batch, 2);
        self.denoiser += 1;
        run(self, None)
    }

    fn run_blocks(
        &mut self,
        group: BlockGroup<'_>,
        states: BlockStates,
        block: &mut BlockFn<'_>,
    ) -> Result<BlockStates> {
        self.groups.push(group.name.to_string());
        let mut states = states;
        for i in 0..group.len {
            self.blocks.push(i);
            states = block(self, i, states)?;
        }
        Ok(states)
    }

    fn hooks_module(&self, _path: ModulePath<'_>) -> bool {
        true
    }

    fn run_module(
        &mut self,
        path: ModulePath<'_>,
        batch: usize,
        run: &mut ModuleFn<'_>,
    ) -> Result<Vec<Tensor<3>>> {
        assert_eq!(batch, 2);
        self.modules.push(path.to_string());
        let out = run()?;
        assert_eq!(out.len(), 2, "attn1 returns (hidden, encoder)");
        Ok(out)
    }
}

#[test]
fn hooks_see_every_block_and_attention_once() {
    let Some(device) = test_device() else { return };
    let model = CogVideoX::from_pretrained(fixture("cogvideox"), &device, Precision::F32).unwrap();
    let reference = Reference::open("cogvideox");
    let inputs = reference.inputs("a", &device);
    let mut hooks = Counting::default();
    let out = model.forward(&inputs, &mut hooks).unwrap();
    assert_eq!(hooks.denoiser, 1);
    assert_eq!(hooks.groups, vec!["transformer_blocks"]);
    assert_eq!(hooks.blocks, vec![0, 1]);
    let names: Vec<String> = model.hook_points().into_iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        vec!["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    );
    assert_eq!(hooks.modules, names);
    assert_eq!(model.block_groups().len(), 1);
    let diff = max_abs_diff(&floats(out), &reference.floats("a.output"));
    assert!(diff < TOLERANCE, "hooked forward differs: {diff}");
}

#[test]
fn denoiser_hook_may_run_only_some_rows() {
    struct SecondRow;
    impl DitHooks for SecondRow {
        fn run_denoiser(&mut self, _: usize, run: &mut DenoiserFn<'_>) -> Result<DenoiserOutput> {
            let rows: Range<usize> = 1..2;
            run(self, Some(rows))
        }
    }
    let Some(device) = test_device() else { return };
    let model = CogVideoX::from_pretrained(fixture("cogvideox"), &device, Precision::F32).unwrap();
    let inputs = Reference::open("cogvideox").inputs("a", &device);
    let out = floats(model.forward(&inputs, &mut SecondRow).unwrap());
    let want = Reference::open("cogvideox").floats("a.output");
    let diff = max_abs_diff(&out, &want[want.len() / 2..]);
    assert!(diff < TOLERANCE, "row 1 alone: max |Δ| = {diff}");
}
