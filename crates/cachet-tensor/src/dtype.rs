//! Float precisions and the capability check that guards every half-precision use.
//!
//! A device that cannot compute in a dtype may still accept tensors of it and return garbage
//! (bf16 on Vulkan llvmpipe does), so every conversion here checks first and fails with
//! [`TensorError::UnsupportedDType`] instead.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TensorError};

/// A floating-point precision for weights, activations and caches.
///
/// Serialises with torch's names (`"float32"`, `"float16"`, `"bfloat16"`), as the `torch_dtype` /
/// `dtype` fields of Hugging Face configs spell them; parsing also accepts `f32`, `fp16`, `bf16`...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Precision {
    /// 32-bit IEEE float.
    #[default]
    #[serde(rename = "float32", alias = "f32", alias = "fp32", alias = "float")]
    F32,
    /// 16-bit IEEE float.
    #[serde(rename = "float16", alias = "f16", alias = "fp16", alias = "half")]
    F16,
    /// bfloat16.
    #[serde(rename = "bfloat16", alias = "bf16")]
    BF16,
}

impl Precision {
    /// The burn dtype of this precision.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::BF16 => DType::BF16,
        }
    }

    /// The precision of a burn float dtype, if it is one of ours.
    pub fn from_dtype(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 | DType::Flex32 => Some(Precision::F32),
            DType::F16 => Some(Precision::F16),
            DType::BF16 => Some(Precision::BF16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.dtype().size()
    }

    /// The torch name (`float32`, `float16`, `bfloat16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Precision::F32 => "float32",
            Precision::F16 => "float16",
            Precision::BF16 => "bfloat16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::BF16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = TensorError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().trim_start_matches("torch.") {
            "f32" | "fp32" | "float32" | "float" => Ok(Precision::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::BF16),
            _ => Err(TensorError::UnknownDType(s.to_string())),
        }
    }
}

/// Whether `device` computes correctly in `precision` (f32 always; f16/bf16 as the backend says).
pub fn supports_dtype(device: &Device, precision: Precision) -> bool {
    precision == Precision::F32 || device.supports_dtype(precision.dtype())
}

/// Fails with a typed error unless `device` supports `precision`; call before any half-precision use.
pub fn ensure_supported(device: &Device, precision: Precision) -> Result<()> {
    if supports_dtype(device, precision) {
        return Ok(());
    }
    let alt = match precision {
        Precision::BF16 if supports_dtype(device, Precision::F16) => " or f16",
        Precision::F16 if supports_dtype(device, Precision::BF16) => " or bf16",
        _ => "",
    };
    Err(TensorError::UnsupportedDType {
        dtype: precision,
        device: format!("{device:?}"),
        alt,
    })
}

/// Casts a float tensor to `precision` after checking that its device supports it.
pub fn cast_checked<const D: usize>(tensor: Tensor<D>, precision: Precision) -> Result<Tensor<D>> {
    ensure_supported(&tensor.device(), precision)?;
    if tensor.dtype() == precision.dtype() {
        return Ok(tensor);
    }
    Ok(tensor.cast(precision.dtype()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_serialise_like_torch() {
        for (text, want) in [
            ("float32", Precision::F32),
            ("torch.float16", Precision::F16),
            ("BF16", Precision::BF16),
            ("fp16", Precision::F16),
        ] {
            assert_eq!(text.parse::<Precision>().unwrap(), want);
        }
        assert!("f8".parse::<Precision>().is_err());
        let json = serde_json::to_string(&Precision::BF16).unwrap();
        assert_eq!(json, "\"bfloat16\"");
        let back: Precision = serde_json::from_str("\"f16\"").unwrap();
        assert_eq!(back, Precision::F16);
    }
}
