//! Tokenizers (Hugging Face's `tokenizers`, from `tokenizer.json` or GGUF metadata) and the
//! per-model text bundle: tokenizer, chat template and special tokens.

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{chain, read_to_string};
use crate::{ChatTemplate, Message, Result, TextError};

/// A tokenizer: text to ids and back.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    origin: String,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_to_string(path)?;
        Self::from_json_str(&text, path.display().to_string())
    }

    /// Parses the contents of a `tokenizer.json`; `origin` names it in errors.
    pub fn from_json_str(json: &str, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        let inner: tokenizers::Tokenizer =
            json.parse()
                .map_err(|e: tokenizers::Error| TextError::Tokenizer {
                    origin: origin.clone(),
                    reason: chain(e.as_ref()),
                })?;
        Ok(Self { inner, origin })
    }

    /// Where this tokenizer came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Ids of `text`; `add_special_tokens` applies the post-processor (e.g. a leading BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.codec("encode", e))
    }

    /// Text of `ids`; `skip_special_tokens` drops special tokens (BOS, EOS, chat markers).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.codec("decode", e))
    }

    /// The id of a token (added/special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of the tokens marked special, ascending.
    pub fn special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The wrapped `tokenizers::Tokenizer`, for anything not covered here.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn codec(&self, op: &'static str, e: tokenizers::Error) -> TextError {
        TextError::Codec {
            origin: self.origin.clone(),
            op,
            reason: chain(e.as_ref()),
        }
    }
}

/// Everything text-related a model folder or GGUF file provides.
#[derive(Debug)]
pub struct TextModel {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, when the model has one.
    pub chat_template: Option<ChatTemplate>,
    /// `bos_token` (string form), when known.
    pub bos_token: Option<String>,
    /// `eos_token` (string form), when known.
    pub eos_token: Option<String>,
    /// Where it came from.
    pub origin: String,
}

impl TextModel {
    /// Loads a Hugging Face model folder: `tokenizer.json`, and when present
    /// `tokenizer_config.json` (special tokens, `chat_template`) and `chat_template.jinja`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = if config_path.is_file() {
            serde_json::from_str(&read_to_string(&config_path)?).map_err(|e| TextError::Json {
                origin: config_path.display().to_string(),
                reason: e.to_string(),
            })?
        } else {
            Json::Null
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (template, origin) = if jinja_path.is_file() {
            (
                Some(read_to_string(&jinja_path)?),
                jinja_path.display().to_string(),
            )
        } else {
            (
                template_from_config(&config, &config_path)?,
                config_path.display().to_string(),
            )
        };
        Self::assemble(
            tokenizer,
            template,
            origin,
            specials_of(&config),
            dir.display().to_string(),
        )
    }

    /// From the contents of a `tokenizer.json` and, optionally, a `tokenizer_config.json`
    /// (files embedded in a binary, say); `origin` names them in errors.
    pub fn from_json_strs(
        tokenizer_json: &str,
        tokenizer_config_json: Option<&str>,
        origin: &str,
    ) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_json_str(tokenizer_json, format!("{origin}/tokenizer.json"))?;
        let config_origin = format!("{origin}/tokenizer_config.json");
        let config: Json = match tokenizer_config_json {
            Some(text) => serde_json::from_str(text).map_err(|e| TextError::Json {
                origin: config_origin.clone(),
                reason: e.to_string(),
            })?,
            None => Json::Null,
        };
        let template = template_from_config(&config, Path::new(&config_origin))?;
        Self::assemble(
            tokenizer,
            template,
            config_origin,
            specials_of(&config),
            origin.to_string(),
        )
    }

    /// Loads the tokenizer and chat template stored in a GGUF file's metadata.
    #[cfg(feature = "gguf")]
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = cachet_tensor::gguf::GgufFile::open(path).map_err(|e| TextError::Gguf {
            origin: path.display().to_string(),
            reason: chain(&e),
        })?;
        Self::from_gguf_file(&file)
    }

    /// [`TextModel::from_gguf`] on an opened file.
    #[cfg(feature = "gguf")]
    pub fn from_gguf_file(file: &cachet_tensor::gguf::GgufFile) -> Result<Self> {
        let parts = crate::gguf::build(file)?;
        Self::assemble(
            parts.tokenizer,
            parts.chat_template,
            format!("{} (tokenizer.chat_template)", file.label()),
            parts.specials,
            file.label().to_string(),
        )
    }

    fn assemble(
        tokenizer: Tokenizer,
        template: Option<String>,
        template_origin: String,
        specials: Vec<(String, String)>,
        origin: String,
    ) -> Result<Self> {
        let chat_template = match template {
            Some(source) => {
                let mut t = ChatTemplate::new(source, template_origin)?;
                t.special_tokens = specials.clone();
                Some(t)
            }
            None => None,
        };
        let find = |key: &str| {
            specials
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token: find("bos_token"),
            eos_token: find("eos_token"),
            origin,
        })
    }

    /// Renders `messages` with the chat template (an error when the model has none).
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match &self.chat_template {
            Some(t) => t.render(messages, add_generation_prompt),
            None => Err(TextError::NoChatTemplate {
                origin: self.origin.clone(),
            }),
        }
    }

    /// Id of `eos_token`, when it is known and in the vocabulary.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token
            .as_deref()
            .and_then(|t| self.tokenizer.token_to_id(t))
    }
}

/// The special tokens a tokenizer_config.json names, as `(key, token)`.
fn specials_of(config: &Json) -> Vec<(String, String)> {
    [
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "sep_token",
        "cls_token",
        "mask_token",
    ]
    .into_iter()
    .filter_map(|key| {
        config
            .get(key)
            .and_then(token_string)
            .map(|value| (key.to_string(), value))
    })
    .collect()
}

/// The `chat_template` of a tokenizer_config.json: a string, or a list of `{name, template}`
/// of which `default` is used (transformers' choice without a `chat_template` argument).
fn template_from_config(config: &Json, path: &Path) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let named = |name: &str| {
                list.iter().find_map(|t| {
                    (t.get("name")?.as_str()? == name)
                        .then(|| t.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            named("default").map(Some).ok_or_else(|| TextError::Json {
                origin: path.display().to_string(),
                reason: "chat_template is a list without a template named \"default\"".into(),
            })
        }
        Some(_) => Err(TextError::Json {
            origin: path.display().to_string(),
            reason: "chat_template is neither a string nor a list of named templates".into(),
        }),
    }
}

/// A special token in tokenizer_config.json: a string or an `AddedToken` object.
fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}
