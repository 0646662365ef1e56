//! The umbrella crate in a few lines: open the best device, load the embedded model, generate.
//!
//! Run with `cargo run -p cachet --example quickstart`.

use cachet::models::{GreedyOptions, embedded, greedy};
use cachet::tensor::{DeviceSpec, Precision};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = DeviceSpec::Auto.init()?;
    let model = embedded::tiny_llama(&device, Precision::F32)?;
    let options = GreedyOptions {
        max_new_tokens: 12,
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    let out = greedy(&model, &[vec![1, 2, 3, 4, 5]], &options, None)?;
    println!(
        "{:?} ({:.0} tokens/s on {device:?})",
        out.tokens[0],
        out.tokens_per_second()
    );
    Ok(())
}
