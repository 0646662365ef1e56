//! Cache entries: what was compiled, canonically serialised and hashed the optimum-neuron way.
//!
//! An entry is a model config (model factors) plus a `neuron` object holding the compilation and
//! environment factors (dtype, shapes, cores, compiler, flags, revision, tool version). Its
//! [`hash`](CacheEntry::hash) and [`arch_digest`](CacheEntry::arch_digest) are bit-exact with
//! optimum-neuron 0.4.5's `SingleModelCacheEntry`.

use std::path::Path;

use sha2::{Digest, Sha256, Sha512};

use crate::error::{CompileCacheError, Result};
use crate::pyjson::{self, DumpOptions, Map, Value};

/// Config keys optimum-neuron drops before hashing (`CACHE_WHITE_LIST`): volatile metadata.
pub(crate) const VOLATILE_CONFIG_KEYS: [&str; 14] = [
    "_name_or_path",
    "transformers_version",
    "_diffusers_version",
    "eos_token_id",
    "bos_token_id",
    "pad_token_id",
    "torchscript",
    "torch_dtype",
    "_commit_hash",
    "sample_size",
    "projection_dim",
    "_use_default_values",
    "_attn_implementation_autoset",
    "return_dict",
];

/// The `_entry_class` optimum-neuron writes for single-model entries.
pub(crate) const SINGLE_MODEL_ENTRY_CLASS: &str = "SingleModelCacheEntry";

/// One compilation's identity: model id, task, cleaned config and compilation factors.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    model_id: String,
    task: Option<String>,
    config: Map,
    neuron: Value,
}

impl CacheEntry {
    /// Builds an entry like `SingleModelCacheEntry(model_id, task, config, neuron_config)`.
    ///
    /// `config` is a `config.json` object (transformers writes its non-default form); volatile
    /// keys are dropped and a `neuron` key inside it is used when `neuron` is `None`. Both take
    /// a [`pyjson::Value`] (which holds Python-only numbers like `NaN` and big integers) or a
    /// `serde_json::Value`.
    pub fn new(
        model_id: impl Into<String>,
        task: Option<&str>,
        config: impl Into<Value>,
        neuron: Option<Value>,
    ) -> Result<Self> {
        let model_id = model_id.into();
        let Value::Object(mut config) = config.into() else {
            return Err(CompileCacheError::InvalidEntry {
                model_id,
                reason: "the model config is not a JSON object".into(),
            });
        };
        for key in VOLATILE_CONFIG_KEYS {
            config.remove(key);
        }
        let embedded = config.remove("neuron");
        let neuron = neuron.or(embedded).unwrap_or(Value::Null);
        match config.get("model_type") {
            Some(Value::String(_)) => {}
            _ => {
                return Err(CompileCacheError::InvalidEntry {
                    model_id,
                    reason: "the model config has no string `model_type`".into(),
                });
            }
        }
        Ok(Self {
            model_id,
            task: task.map(str::to_owned),
            config,
            neuron,
        })
    }

    /// Starts an [`EntryBuilder`] for a model config read from a `config.json` file.
    pub fn builder_from_file(
        model_id: impl Into<String>,
        config_json: impl AsRef<Path>,
    ) -> Result<EntryBuilder> {
        let path = config_json.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| CompileCacheError::Io {
            path: path.to_owned(),
            source,
        })?;
        let config = pyjson::loads(&text).map_err(|source| CompileCacheError::Config {
            what: path.display().to_string(),
            source,
        })?;
        Ok(EntryBuilder::new(model_id, config))
    }

    /// Builds an entry from `config.json` text (and optional neuron-config text), parsed exactly
    /// as Python's `json.loads` reads them.
    pub fn from_json_text(
        model_id: impl Into<String>,
        task: Option<&str>,
        config: &str,
        neuron: Option<&str>,
    ) -> Result<Self> {
        let model_id = model_id.into();
        let parse = |what: &str, text: &str| {
            pyjson::loads(text).map_err(|source| CompileCacheError::Config {
                what: format!("{what} of {model_id}"),
                source,
            })
        };
        let config = parse("config", config)?;
        let neuron = neuron.map(|t| parse("neuron config", t)).transpose()?;
        Self::new(model_id.clone(), task, config, neuron)
    }

    /// Parses an entry serialised by [`serialize`](Self::serialize) (or optimum-neuron).
    pub fn deserialize(text: &str, origin: &str) -> Result<Self> {
        let value = pyjson::loads(text).map_err(|source| CompileCacheError::Config {
            what: origin.to_owned(),
            source,
        })?;
        let Value::Object(mut map) = value else {
            return Err(CompileCacheError::CorruptRegistry {
                what: origin.to_owned(),
                reason: "not a JSON object".into(),
            });
        };
        let field = |map: &mut Map, key: &str| map.remove(key);
        let class = field(&mut map, "_entry_class");
        if class.as_ref().and_then(Value::as_str) != Some(SINGLE_MODEL_ENTRY_CLASS) {
            return Err(CompileCacheError::CorruptRegistry {
                what: origin.to_owned(),
                reason: format!("unsupported `_entry_class` {class:?}"),
            });
        }
        let Some(Value::String(model_id)) = field(&mut map, "_model_id") else {
            return Err(CompileCacheError::CorruptRegistry {
                what: origin.to_owned(),
                reason: "missing string `_model_id`".into(),
            });
        };
        let task = match field(&mut map, "_task") {
            Some(Value::String(t)) => Some(t),
            Some(Value::Null) | None => None,
            Some(other) => {
                return Err(CompileCacheError::CorruptRegistry {
                    what: origin.to_owned(),
                    reason: format!("`_task` is {other}, not a string"),
                });
            }
        };
        Self::new(model_id, task.as_deref(), Value::Object(map), None).map_err(|e| {
            CompileCacheError::CorruptRegistry {
                what: origin.to_owned(),
                reason: e.to_string(),
            }
        })
    }

    /// The model id (`org/name` on the Hub, or a local name).
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The task (`text-generation`, ...), if any.
    pub fn task(&self) -> Option<&str> {
        self.task.as_deref()
    }

    /// The config's `model_type`, which names the registry alias folder.
    pub fn model_type(&self) -> &str {
        self.config
            .get("model_type")
            .and_then(Value::as_str)
            .expect("checked in CacheEntry::new")
    }

    /// The cleaned model config (volatile keys and `neuron` removed).
    pub fn config(&self) -> &Map {
        &self.config
    }

    /// The compilation factors (`neuron` object of optimum-neuron).
    pub fn compile_config(&self) -> &Value {
        &self.neuron
    }

    /// The canonical text: `json.dumps(config | {neuron, _entry_class, _model_id, _task}, indent=2, sort_keys=True)`.
    pub fn serialize(&self) -> String {
        let mut map = self.config.clone();
        map.insert("neuron".into(), self.neuron.clone());
        map.insert("_entry_class".into(), SINGLE_MODEL_ENTRY_CLASS.into());
        map.insert("_model_id".into(), self.model_id.clone().into());
        map.insert(
            "_task".into(),
            self.task.clone().map(Value::String).unwrap_or(Value::Null),
        );
        pyjson::dumps(&Value::Object(map), DumpOptions::ENTRY)
    }

    /// The entry hash: the first 20 hex digits of the SHA-512 of [`serialize`](Self::serialize).
    pub fn hash(&self) -> String {
        let digest = Sha512::digest(self.serialize().as_bytes());
        hex(&digest)[..20].to_owned()
    }

    /// The architecture digest: SHA-256 of `json.dumps({model_type, task, config}, sort_keys=True)`.
    ///
    /// Equal for every compilation of one architecture, so lookups can list them together.
    pub fn arch_digest(&self) -> String {
        let mut map = Map::new();
        map.insert("model_type".into(), self.model_type().into());
        map.insert(
            "task".into(),
            self.task.clone().map(Value::String).unwrap_or(Value::Null),
        );
        map.insert("config".into(), Value::Object(self.config.clone()));
        let text = pyjson::dumps(&Value::Object(map), DumpOptions::COMPACT_SORTED);
        hex(&Sha256::digest(text.as_bytes()))
    }
}

/// Builds a [`CacheEntry`] from a model config and named compilation factors.
///
/// Factor names follow optimum-neuron's neuron config (`batch_size`, `sequence_length`,
/// `torch_dtype`, `tp_degree`, `checkpoint_revision`, ...) so lookups filter the same way.
#[derive(Debug, Clone)]
pub struct EntryBuilder {
    model_id: String,
    task: Option<String>,
    config: Value,
    neuron: Map,
}

impl EntryBuilder {
    /// Starts from a model id and a model config object (a [`pyjson::Value`] or a
    /// `serde_json::Value`).
    pub fn new(model_id: impl Into<String>, config: impl Into<Value>) -> Self {
        Self {
            model_id: model_id.into(),
            task: None,
            config: config.into(),
            neuron: Map::new(),
        }
    }

    /// Sets the task (`text-generation`, ...).
    pub fn task(mut self, task: impl Into<String>) -> Self {
        self.task = Some(task.into());
        self
    }

    /// Sets any compilation factor.
    pub fn factor(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.neuron.insert(key.into(), value.into());
        self
    }

    /// The compute dtype (`torch_dtype`, e.g. `bfloat16`).
    pub fn dtype(self, dtype: &str) -> Self {
        self.factor("torch_dtype", dtype)
    }

    /// The static batch size compiled for.
    pub fn batch_size(self, batch: u64) -> Self {
        self.factor("batch_size", batch)
    }

    /// The static sequence length compiled for.
    pub fn sequence_length(self, len: u64) -> Self {
        self.factor("sequence_length", len)
    }

    /// The number of cores the model is sharded over (`tp_degree`).
    pub fn num_cores(self, cores: u64) -> Self {
        self.factor("tp_degree", cores)
    }

    /// The compiler's name and version (`compiler_type`, `compiler_version`).
    pub fn compiler(self, name: &str, version: &str) -> Self {
        self.factor("compiler_type", name)
            .factor("compiler_version", version)
    }

    /// The compiler flags, in order.
    pub fn flags<I: IntoIterator<Item = S>, S: Into<String>>(self, flags: I) -> Self {
        let flags: Vec<Value> = flags.into_iter().map(|f| Value::String(f.into())).collect();
        self.factor("compiler_flags", flags)
    }

    /// The checkpoint revision (commit) compiled.
    pub fn revision(self, revision: &str) -> Self {
        self.factor("checkpoint_revision", revision)
    }

    /// The version of the tool driving the compiler (e.g. cachet's own).
    pub fn tool_version(self, version: &str) -> Self {
        self.factor("tool_version", version)
    }

    /// Finishes the entry (fails if the config is not an object with a `model_type`).
    pub fn build(self) -> Result<CacheEntry> {
        let neuron = (!self.neuron.is_empty()).then_some(Value::Object(self.neuron));
        CacheEntry::new(self.model_id, self.task.as_deref(), self.config, neuron)
    }
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}
