//! The attention seam for KV caches: a forward that feeds tokens one at a time through a cache
//! must give the same logits as one forward over the whole sequence.

use cachet_integration_tests::{fixture, max_abs_diff, test_device};
use cachet_models::cache::CacheError;
use cachet_models::{GreedyOptions, KvCache, Llama, MaskLayout, greedy};
use cachet_tensor::{Int, Precision, Tensor, TensorData};

/// The simplest cache: concatenate every step (tests only; cachet-kv has the real ones).
#[derive(Default)]
struct ConcatCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
}

impl KvCache for ConcatCache {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout), CacheError> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        if cache_position[0] != self.seq_length(layer) {
            return Err(format!(
                "layer {layer}: position {} is not the next slot",
                cache_position[0]
            )
            .into());
        }
        let (k, v) = match self.layers[layer].take() {
            Some((k0, v0)) => (
                Tensor::cat(vec![k0, keys], 2),
                Tensor::cat(vec![v0, values], 2),
            ),
            None => (keys, values),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        let len = k.dims()[2];
        Ok((
            k,
            v,
            MaskLayout {
                kv_length: len,
                kv_offset: 0,
                valid_length: len,
            },
        ))
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }
}

fn ids(rows: &[&[i64]], device: &cachet_tensor::Device) -> Tensor<2, Int> {
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), device)
}

#[test]
fn incremental_decoding_through_the_seam_matches_full_forward() {
    let Some(device) = test_device() else { return };
    for name in ["llama", "mistral", "qwen2"] {
        let model = Llama::from_pretrained(fixture(name), &device, Precision::F32).unwrap();
        let tokens: &[i64] = &[5, 17, 42, 9, 100, 3, 77, 250];
        let full = model.forward(ids(&[tokens], &device), None, None).unwrap();
        let full = full.into_data().try_into_vec::<f32>().unwrap();
        let vocab = model.config.vocab_size;

        let mut cache = ConcatCache::default();
        // Prefill three tokens, then one at a time.
        let mut got = model
            .forward_with_cache(ids(&[&tokens[..3]], &device), None, None, Some(&mut cache))
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        for t in 3..tokens.len() {
            let step = model
                .forward_with_cache(
                    ids(&[&tokens[t..t + 1]], &device),
                    None,
                    None,
                    Some(&mut cache),
                )
                .unwrap();
            got.extend(step.into_data().try_into_vec::<f32>().unwrap());
        }
        assert_eq!(got.len(), tokens.len() * vocab);
        let diff = max_abs_diff(&got, &full);
        assert!(diff <= 1e-4, "{name}: cached vs full max |Δ| = {diff}");
    }
}

#[test]
fn batched_left_padded_greedy_is_the_same_with_and_without_cache() {
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(fixture("mistral"), &device, Precision::F32).unwrap();
    let prompts = vec![vec![3, 4, 5, 6, 7, 8], vec![9, 10]];
    let options = GreedyOptions {
        max_new_tokens: 6,
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    let plain = greedy(&model, &prompts, &options, None).unwrap();
    let mut cache = ConcatCache::default();
    let cached = greedy(&model, &prompts, &options, Some(&mut cache)).unwrap();
    assert_eq!(plain.tokens, cached.tokens);
    // Each row alone gives the same tokens as in the padded batch.
    for (row, prompt) in prompts.iter().enumerate() {
        let alone = greedy(&model, std::slice::from_ref(prompt), &options, None).unwrap();
        assert_eq!(alone.tokens[0], plain.tokens[row], "row {row}");
    }
}

#[test]
fn a_cache_error_surfaces_as_a_model_error() {
    let Some(device) = test_device() else { return };
    let model = Llama::from_pretrained(fixture("llama"), &device, Precision::F32).unwrap();
    let mut cache = ConcatCache::default();
    model
        .forward_with_cache(ids(&[&[1, 2]], &device), None, None, Some(&mut cache))
        .unwrap();
    // A mask that does not cover past + new tokens is rejected before the cache is touched.
    let err = model
        .forward_with_cache(
            ids(&[&[3]], &device),
            Some(ids(&[&[1, 1]], &device)),
            None,
            Some(&mut cache),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("attention_mask"), "{err}");
}
