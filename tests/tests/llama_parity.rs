//! Logit parity of the Llama-family model with transformers 5.23.0 (goldens made by
//! `cargo xtask goldens`): max |Δlogit| ≤ 1e-4 in f32, and identical greedy tokens.

use cachet_integration_tests::{fixture, max_abs_diff, test_device};
use cachet_models::{GreedyOptions, Llama, greedy};
use cachet_nn::Pretrained;
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DType, Device, Int, Precision, Tensor};

const TOLERANCE: f32 = 1e-4;

struct Reference(Checkpoint);

impl Reference {
    fn open(model: &str) -> Self {
        Self(Checkpoint::open(fixture(model).join("reference.safetensors")).unwrap())
    }
    fn ids(&self, name: &str, device: &Device) -> Tensor<2, Int> {
        self.0.load_int::<2>(name, device).unwrap()
    }
    fn ints(&self, name: &str) -> Vec<i64> {
        let data = self.0.tensor_data(name).unwrap();
        data.try_cast(DType::I64)
            .unwrap()
            .try_into_vec::<i64>()
            .unwrap()
    }
    fn floats(&self, name: &str) -> Vec<f32> {
        let data = self.0.tensor_data(name).unwrap();
        data.try_cast(DType::F32)
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap()
    }
}

fn logits_vec(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

fn check_model(name: &str) {
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(fixture(name), &device, Precision::F32).unwrap();
    let reference = Reference::open(name);
    let vocab = model.config.vocab_size;

    // Case a: no padding, explicit positions.
    let logits = model
        .forward(
            reference.ids("a.input_ids", &device),
            Some(reference.ids("a.attention_mask", &device)),
            Some(reference.ids("a.position_ids", &device)),
        )
        .unwrap();
    let diff = max_abs_diff(&logits_vec(logits), &reference.floats("a.logits"));
    assert!(diff <= TOLERANCE, "{name} case a: max |Δlogit| = {diff}");

    // Case b: left padding; only real tokens are compared (padded rows are undefined).
    let mask = reference.ints("b.attention_mask");
    let logits = model
        .forward(
            reference.ids("b.input_ids", &device),
            Some(reference.ids("b.attention_mask", &device)),
            Some(reference.ids("b.position_ids", &device)),
        )
        .unwrap();
    let (ours, theirs) = (logits_vec(logits), reference.floats("b.logits"));
    let mut worst = 0.0f32;
    for (pos, &keep) in mask.iter().enumerate() {
        if keep == 1 {
            let row = pos * vocab..(pos + 1) * vocab;
            worst = worst.max(max_abs_diff(&ours[row.clone()], &theirs[row]));
        }
    }
    assert!(worst <= TOLERANCE, "{name} case b: max |Δlogit| = {worst}");

    // Same as case b, with position ids derived from the mask by the model itself.
    let derived = model
        .forward(
            reference.ids("b.input_ids", &device),
            Some(reference.ids("b.attention_mask", &device)),
            None,
        )
        .unwrap();
    let derived = logits_vec(derived);
    for (pos, &keep) in mask.iter().enumerate() {
        if keep == 1 {
            let row = pos * vocab..(pos + 1) * vocab;
            assert!(
                max_abs_diff(&derived[row.clone()], &ours[row]) <= 1e-5,
                "{name}: derived positions differ"
            );
        }
    }

    // Case g: greedy decoding equals transformers' generate.
    let prompt: Vec<u32> = reference
        .ints("g.prompt_ids")
        .iter()
        .map(|&t| t as u32)
        .collect();
    let want: Vec<u32> = reference
        .ints("g.tokens")
        .iter()
        .map(|&t| t as u32)
        .collect();
    let options = GreedyOptions {
        max_new_tokens: want.len(),
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    let got = greedy(&model, &[prompt], &options, None).unwrap();
    assert_eq!(got.tokens[0], want, "{name}: greedy tokens");
}

#[test]
fn llama_matches_transformers() {
    check_model("llama");
}

#[test]
fn llama3_rope_scaling_and_tied_embeddings_match_transformers() {
    check_model("llama3-rope");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_model("mistral");
}

#[test]
fn qwen2_qkv_bias_matches_transformers() {
    check_model("qwen2");
}
