//! Text in, streamed text out: a chat prompt through the model's template, greedy decoding
//! through a KV cache, pieces printed as they are decoded.
//!
//! ```sh
//! cargo run -p cachet --example text_generation                       # embedded tiny Llama (random weights)
//! cargo run --release -p cachet --example text_generation -- target/models/SmolLM2-135M-Instruct.Q4_1.gguf
//! ```

use std::io::Write;

use cachet::models::{GenerationConfig, Llama, embedded, generate_streaming};
use cachet::nn::Pretrained;
use cachet::tensor::cpu_device;
use cachet::tensor::{Device, Precision};
use cachet::text::{DecodeStream, Message, TextModel};

fn load(path: Option<&str>, device: &Device) -> anyhow::Result<(Llama, TextModel)> {
    Ok(match path {
        Some(p) if p.ends_with(".gguf") => (
            Llama::from_gguf(p, device, Precision::F32)?,
            TextModel::from_gguf(p)?,
        ),
        Some(p) => (
            Llama::from_pretrained(p, device, Precision::F32)?,
            TextModel::from_dir(p)?,
        ),
        None => (
            embedded::tiny_llama(device, Precision::F32)?,
            TextModel::from_json_strs(
                embedded::TOKENIZER_JSON,
                Some(embedded::TOKENIZER_CONFIG_JSON),
                embedded::NAME,
            )?,
        ),
    })
}

fn main() -> anyhow::Result<()> {
    let device = cpu_device()?;
    let path = std::env::args().nth(1);
    let (model, text) = load(path.as_deref(), &device)?;
    let prompt = text.render_chat(&[Message::user("What is the capital of France?")], true)?;
    let ids = text.tokenizer.encode(&prompt, false)?;

    let mut config = GenerationConfig::greedy(32);
    config.eos_token_id = text.eos_token_id().map(cachet::models::TokenIds::One);
    let mut stream = DecodeStream::with_context(true, &ids);
    let mut failed = None;
    let out = generate_streaming(&model, &[ids], &config, None, &mut |step| {
        let Some(id) = step[0] else { return true };
        match stream.step(&text.tokenizer, id) {
            Ok(Some(piece)) => {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            }
            Ok(None) => {}
            Err(e) => failed = Some(e),
        }
        failed.is_none()
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    println!("{}", stream.flush(&text.tokenizer)?);
    eprintln!(
        "[{} tokens at {:.1} tokens/s]",
        out.sequences[0].len(),
        out.tokens_per_second(1)
    );
    Ok(())
}
