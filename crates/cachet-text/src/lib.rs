//! Text in, text out for cachet: Hugging Face `tokenizer.json` files (or a GGUF file's
//! `tokenizer.ggml.*` metadata), chat templates rendered as transformers'
//! `apply_chat_template` renders them, an incremental detokenizer for streaming, and stop strings.
//!
//! ```no_run
//! use cachet_text::{Message, TextModel};
//!
//! let text = TextModel::from_dir("path/to/model")?;
//! let prompt = text.render_chat(&[Message::user("Hi!")], true)?;
//! let ids = text.tokenizer.encode(&prompt, false)?;
//! # Ok::<(), cachet_text::TextError>(())
//! ```

mod error;
#[cfg(feature = "gguf")]
mod gguf;
mod stop;
mod stream;
mod template;
mod tokenizer;

pub use error::TextError;
/// Template values (messages with tool calls, `tools`) for [`ChatTemplate::render_with`].
pub use minijinja::Value;
pub use stop::StopStrings;
pub use stream::DecodeStream;
pub use template::{ChatTemplate, Message, json_value};
pub use tokenizer::{TextModel, Tokenizer};

use error::Result;
