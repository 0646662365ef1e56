//! Renders a conversation with a model's chat template, tokenizes it, and streams the ids back
//! to text the way `cachet generate` prints an answer.
//!
//! ```sh
//! cargo run -p cachet-text --example chat_prompt                 # the embedded tiny Llama's files
//! cargo run -p cachet-text --example chat_prompt -- MODEL_DIR    # any folder with tokenizer.json
//! ```

use cachet_text::{DecodeStream, Message, TextModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).map_or_else(
        || {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../cachet-models/assets/tiny-llama")
        },
        std::path::PathBuf::from,
    );
    let text = TextModel::from_dir(&dir)?;
    let messages = [
        Message::system("You answer in one sentence."),
        Message::user("Who did Alice follow down the rabbit-hole?"),
    ];
    let prompt = text.render_chat(&messages, true)?;
    let ids = text.tokenizer.encode(&prompt, false)?;
    println!("template of {}:\n{prompt}", text.origin);
    println!("{} tokens: {ids:?}", ids.len());

    // Incremental detokenization: pieces come out only once they are whole UTF-8 text.
    let mut stream = DecodeStream::new(false);
    let mut echoed = String::new();
    for &id in &ids {
        if let Some(piece) = stream.step(&text.tokenizer, id)? {
            echoed.push_str(&piece);
        }
    }
    echoed.push_str(&stream.flush(&text.tokenizer)?);
    assert_eq!(echoed, text.tokenizer.decode(&ids, false)?);
    println!(
        "streamed back: {} characters, equal to a one-shot decode",
        echoed.chars().count()
    );
    Ok(())
}
