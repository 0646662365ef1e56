//! Load a Llama-family checkpoint (or the embedded tiny Llama), run one forward over a padded
//! batch, and decode greedily.
//!
//! Run with `cargo run -p cachet-models --example llama_forward [-- CHECKPOINT_DIR]`.

use cachet_models::{GreedyOptions, Llama, embedded, greedy};
use cachet_nn::Pretrained;
use cachet_tensor::{DeviceSpec, Int, Precision, Tensor, TensorData};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = DeviceSpec::Cpu.init()?;
    let model = match std::env::args().nth(1) {
        Some(dir) => Llama::from_pretrained(dir, &device, Precision::F32)?,
        None => embedded::tiny_llama(&device, Precision::F32)?,
    };
    let config = &model.config;
    println!(
        "{:?}: {} layers, {} heads ({} kv), vocab {}",
        config.family()?,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.kv_heads(),
        config.vocab_size
    );

    // Two prompts, the second left-padded with one 0; the mask marks the padding.
    let ids =
        Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 0, 4, 5], [2, 3]), &device);
    let mask =
        Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 1, 1, 0, 1, 1], [2, 3]), &device);
    let logits = model.forward(ids, Some(mask), None)?;
    println!("logits {:?}", logits.dims());

    let options = GreedyOptions {
        max_new_tokens: 8,
        eos_token_ids: config.eos_ids(),
        pad_token_id: 0,
    };
    let out = greedy(&model, &[vec![1, 2, 3], vec![4, 5]], &options, None)?;
    for (row, tokens) in out.tokens.iter().enumerate() {
        println!("prompt {row}: {tokens:?}");
    }
    println!("{:.1} tokens/s", out.tokens_per_second());
    Ok(())
}
