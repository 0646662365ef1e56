//! [`BnbQuantizationConfig`]: accelerate's quantization options (same field names and
//! defaults), also read from transformers' `quantization_config` in `config.json`.

use std::path::Path;

use cachet_tensor::Precision;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::blockwise::check_4bit_blocksize;
use crate::codes::QuantType;
use crate::error::{QuantError, Result};

/// accelerate's `BnbQuantizationConfig`, with transformers' `quantization_config` as a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BnbQuantizationConfig {
    /// LLM.int8 quantization.
    pub load_in_8bit: bool,
    /// Outlier threshold of LLM.int8 (0 disables the decomposition).
    pub llm_int8_threshold: f32,
    /// 4-bit quantization.
    pub load_in_4bit: bool,
    /// `nf4` or `fp4` (accelerate's default: `fp4`).
    pub bnb_4bit_quant_type: String,
    /// Quantize the 4-bit absmax again (8-bit, blocks of 256).
    pub bnb_4bit_use_double_quant: bool,
    /// Compute dtype of 4-bit layers: `fp32`, `fp16`, `bf16` (or torch names).
    pub bnb_4bit_compute_dtype: String,
    /// dtype of the layers left in floating point; `None`: fp16 for 8-bit, the compute dtype
    /// for 4-bit (accelerate's rule).
    pub torch_dtype: Option<String>,
    /// Modules not to quantize (substring match, as accelerate); `None`: `["lm_head"]`.
    pub skip_modules: Option<Vec<String>>,
    /// Modules kept in fp32 (and not quantized).
    pub keep_in_fp32_modules: Option<Vec<String>>,
    /// cachet extension: 4-bit block size (bnb's fixed 64 in transformers; 32..=4096 here,
    /// recorded per tensor in the quant state so transformers reloads it).
    pub bnb_4bit_blocksize: usize,
}

impl Default for BnbQuantizationConfig {
    fn default() -> Self {
        Self {
            load_in_8bit: false,
            llm_int8_threshold: 6.0,
            load_in_4bit: false,
            bnb_4bit_quant_type: "fp4".into(),
            bnb_4bit_use_double_quant: false,
            bnb_4bit_compute_dtype: "fp16".into(),
            torch_dtype: None,
            skip_modules: None,
            keep_in_fp32_modules: None,
            bnb_4bit_blocksize: 64,
        }
    }
}

fn parse_precision(origin: &str, field: &str, value: &str) -> Result<Precision> {
    match value {
        "fp32" => Ok(Precision::F32),
        "fp16" => Ok(Precision::F16),
        "bf16" => Ok(Precision::BF16),
        other => other
            .trim_start_matches("torch.")
            .parse()
            .map_err(|_| QuantError::Config {
                origin: origin.to_string(),
                reason: format!(
                    "{field} must be fp32, fp16 or bf16 (or a torch dtype name), not {other:?}"
                ),
            }),
    }
}

impl BnbQuantizationConfig {
    /// 4-bit NF4 with double quantization and the given compute dtype (QLoRA's recipe).
    pub fn nf4(compute: Precision) -> Self {
        Self {
            load_in_4bit: true,
            bnb_4bit_quant_type: "nf4".into(),
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: compute.torch_name().trim_start_matches("torch.").into(),
            ..Self::default()
        }
    }

    /// LLM.int8 with accelerate's threshold 6.0.
    pub fn int8() -> Self {
        Self {
            load_in_8bit: true,
            ..Self::default()
        }
    }

    /// Names of [`BnbQuantizationConfig::preset`].
    pub const PRESETS: [&'static str; 5] = ["nf4", "nf4-dq", "fp4", "int8", "int8-t0"];

    /// A preset by name, with `float` as the dtype of the non-quantized layers and of the 4-bit
    /// compute: `nf4`, `nf4-dq` (double quant), `fp4` (block size 64), `int8` (threshold 6) and
    /// `int8-t0` (threshold 0: no outlier decomposition).
    pub fn preset(name: &str, float: Precision) -> Result<Self> {
        let torch = float.torch_name().trim_start_matches("torch.").to_string();
        let four = |quant_type: &str, double_quant: bool| Self {
            load_in_4bit: true,
            bnb_4bit_quant_type: quant_type.into(),
            bnb_4bit_use_double_quant: double_quant,
            bnb_4bit_compute_dtype: torch.clone(),
            torch_dtype: Some(torch.clone()),
            ..Self::default()
        };
        let eight = |threshold: f32| Self {
            load_in_8bit: true,
            llm_int8_threshold: threshold,
            torch_dtype: Some(torch.clone()),
            ..Self::default()
        };
        Ok(match name {
            "nf4" => four("nf4", false),
            "nf4-dq" => four("nf4", true),
            "fp4" => four("fp4", false),
            "int8" => eight(6.0),
            "int8-t0" => eight(0.0),
            other => {
                return Err(QuantError::Config {
                    origin: "quantization preset".into(),
                    reason: format!("{other:?} is not one of {}", Self::PRESETS.join(", ")),
                });
            }
        })
    }

    /// Checks the options as accelerate's `__post_init__` does (and the block size).
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| QuantError::Config {
            origin: origin.to_string(),
            reason,
        };
        if self.load_in_4bit && self.load_in_8bit {
            return Err(bad(
                "load_in_4bit and load_in_8bit can't be both true".into()
            ));
        }
        if !self.load_in_4bit && !self.load_in_8bit {
            return Err(bad(
                "load_in_4bit and load_in_8bit can't be both false".into()
            ));
        }
        if !(self.llm_int8_threshold >= 0.0 && self.llm_int8_threshold.is_finite()) {
            return Err(bad(format!(
                "llm_int8_threshold must be a finite number >= 0, not {}",
                self.llm_int8_threshold
            )));
        }
        if QuantType::parse(&self.bnb_4bit_quant_type).is_none() {
            return Err(bad(format!(
                "bnb_4bit_quant_type must be in ['fp4','nf4'] but found {:?}",
                self.bnb_4bit_quant_type
            )));
        }
        check_4bit_blocksize(self.bnb_4bit_blocksize)?;
        self.compute_dtype(origin)?;
        self.torch_dtype(origin)?;
        Ok(())
    }

    /// The 4-bit quant type.
    pub fn quant_type(&self) -> QuantType {
        QuantType::parse(&self.bnb_4bit_quant_type).unwrap_or(QuantType::Fp4)
    }

    /// The compute dtype of quantized layers (4-bit: `bnb_4bit_compute_dtype`; 8-bit: the
    /// dtype of the non-quantized layers, as bnb computes in the input's dtype).
    pub fn compute_dtype(&self, origin: &str) -> Result<Precision> {
        if self.load_in_8bit {
            return self.torch_dtype(origin);
        }
        parse_precision(
            origin,
            "bnb_4bit_compute_dtype",
            &self.bnb_4bit_compute_dtype,
        )
    }

    /// dtype of the layers kept in floating point (accelerate's defaulting rule).
    pub fn torch_dtype(&self, origin: &str) -> Result<Precision> {
        match &self.torch_dtype {
            Some(t) => parse_precision(origin, "torch_dtype", t),
            None if self.load_in_8bit => Ok(Precision::F16),
            None => parse_precision(
                origin,
                "bnb_4bit_compute_dtype",
                &self.bnb_4bit_compute_dtype,
            ),
        }
    }

    /// Modules left unquantized: `skip_modules` (default `lm_head`) plus `keep_in_fp32_modules`.
    pub fn modules_not_to_convert(&self) -> Vec<String> {
        let mut out = self
            .skip_modules
            .clone()
            .unwrap_or_else(|| vec!["lm_head".to_string()]);
        out.extend(self.keep_in_fp32_modules.clone().unwrap_or_default());
        out
    }

    /// Whether `module` is quantized (accelerate's rule: no skip entry is a substring of it).
    pub fn converts(&self, module: &str) -> bool {
        !self
            .modules_not_to_convert()
            .iter()
            .any(|m| module.contains(m.as_str()))
    }

    /// Whether `module` must stay in fp32.
    pub fn keeps_in_fp32(&self, module: &str) -> bool {
        self.keep_in_fp32_modules
            .iter()
            .flatten()
            .any(|m| module.contains(m.as_str()))
    }

    /// Reads transformers' `BitsAndBytesConfig` dict (`quantization_config` of config.json).
    pub fn from_transformers(value: &Value, origin: &str) -> Result<Self> {
        let bad = |reason: String| QuantError::Config {
            origin: origin.to_string(),
            reason,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| bad("quantization_config is not an object".into()))?;
        match obj.get("quant_method").and_then(Value::as_str) {
            Some("bitsandbytes") | None => {}
            Some(other) => {
                return Err(bad(format!(
                    "quant_method {other:?} is not bitsandbytes (cachet-quant reads bitsandbytes checkpoints)"
                )));
            }
        }
        let flag = |k: &str| -> Result<bool> {
            match obj.get(k).or_else(|| obj.get(&format!("_{k}"))) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(bad(format!("{k} must be a boolean, not {other}"))),
            }
        };
        let string = |k: &str, default: &str| -> Result<String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(bad(format!("{k} must be a string, not {other}"))),
            }
        };
        let list = |k: &str| -> Result<Option<Vec<String>>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad(format!("{k} must be a list of strings")))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some),
                Some(other) => Err(bad(format!("{k} must be a list of strings, not {other}"))),
            }
        };
        let threshold = match obj.get("llm_int8_threshold") {
            None | Some(Value::Null) => 6.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(format!("llm_int8_threshold must be a number, not {v}")))?
                as f32,
        };
        let blocksize = match obj.get("bnb_4bit_blocksize") {
            None | Some(Value::Null) => 64,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| bad(format!("bnb_4bit_blocksize must be an integer, not {v}")))?
                as usize,
        };
        let config = Self {
            load_in_8bit: flag("load_in_8bit")?,
            llm_int8_threshold: threshold,
            load_in_4bit: flag("load_in_4bit")?,
            bnb_4bit_quant_type: string("bnb_4bit_quant_type", "fp4")?,
            bnb_4bit_use_double_quant: flag("bnb_4bit_use_double_quant")?,
            bnb_4bit_compute_dtype: string("bnb_4bit_compute_dtype", "float32")?,
            // transformers loads the rest of the model in the checkpoint's dtype.
            torch_dtype: None,
            skip_modules: list("llm_int8_skip_modules")?,
            // cachet extension (transformers keeps a model class's `_keep_in_fp32_modules`).
            keep_in_fp32_modules: list("keep_in_fp32_modules")?,
            bnb_4bit_blocksize: blocksize,
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// transformers' `BitsAndBytesConfig.to_dict()` for `config.json` (plus cachet's blocksize
    /// when it is not bnb's 64).
    pub fn to_transformers(&self) -> Value {
        let compute = self
            .compute_dtype("")
            .map(|p| p.torch_name().trim_start_matches("torch.").to_string())
            .unwrap_or_else(|_| "float32".into());
        let mut map: Map<String, Value> = serde_json::from_value(json!({
            "_load_in_4bit": self.load_in_4bit,
            "_load_in_8bit": self.load_in_8bit,
            "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": self.skip_modules,
            "llm_int8_threshold": self.llm_int8_threshold,
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
            "quant_method": "bitsandbytes",
        }))
        .expect("an object");
        if let Some(keep) = self.keep_in_fp32_modules.as_ref().filter(|k| !k.is_empty()) {
            // Kept modules are stored as plain f32 tensors: transformers must not quantize them
            // on load, so they join llm_int8_skip_modules; cachet reads its own key back to
            // keep them in f32.
            map.insert(
                "llm_int8_skip_modules".into(),
                json!(self.modules_not_to_convert()),
            );
            map.insert("keep_in_fp32_modules".into(), json!(keep));
        }
        if self.bnb_4bit_blocksize != 64 {
            map.insert("bnb_4bit_blocksize".into(), json!(self.bnb_4bit_blocksize));
        }
        Value::Object(map)
    }

    /// Reads `quantization_config` from a checkpoint directory's `config.json`, if present.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| QuantError::Io {
            op: "reading",
            path: path.clone(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| QuantError::Config {
            origin: path.display().to_string(),
            reason: e.to_string(),
        })?;
        match value.get("quantization_config") {
            None | Some(Value::Null) => Ok(None),
            Some(q) => Self::from_transformers(q, &path.display().to_string()).map(Some),
        }
    }
}
