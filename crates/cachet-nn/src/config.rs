//! Reading a model's `config.json`: serde with the failing field's path in the error, then the
//! model's own validation. Shared by every model config, each of which mirrors a Hugging Face
//! `config.json` field for field.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{ModelError, Result};

/// Parses `text` into `T` and validates it; `origin` (a path or label) names it in errors.
pub fn parse<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    validate: impl FnOnce(&T, &str) -> Result<()>,
) -> Result<T> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let config: T =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| ModelError::Config {
            origin: origin.to_string(),
            reason: format!("field `{}`: {}", err.path(), err.inner()),
        })?;
    // One document: text after it (`{...} x`) is refused, as `json.loads` refuses it.
    deserializer.end().map_err(|err| ModelError::Config {
        origin: origin.to_string(),
        reason: format!("trailing characters after the JSON document: {err}"),
    })?;
    validate(&config, origin)?;
    Ok(config)
}

/// Reads a config file: its text and the path to name it by.
pub fn read(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((text, path.display().to_string()))
}
