//! cache-dit's calibrators behind one type: the `calibrator_config` of DBCache and DBPrune names
//! its forecaster by `calibrator_type` (`taylorseer`, the default, `foca` or `dmd`), and each
//! cache unit keeps one calibrator per forecast stream owner (hidden / encoder, per CFG branch).

use burn::tensor::Tensor;
use serde::{Deserialize, Deserializer, Serialize};

use super::dmd::{DMDCalibratorConfig, DmdCalibrator};
use super::foca::{FoCaCalibrator, FoCaCalibratorConfig};
use super::taylorseer::{TaylorSeerCalibrator, TaylorSeerCalibratorConfig};
use crate::error::{DiffusionError, Result};

/// cache-dit's `calibrator_config`: TaylorSeer, FoCa or DMD, chosen by `calibrator_type` in JSON
/// (absent: `taylorseer`, as a `TaylorSeerCalibratorConfig` serialises without it).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum CalibratorConfig {
    /// Taylor-series forecast (`TaylorSeerCalibratorConfig`).
    TaylorSeer(TaylorSeerCalibratorConfig),
    /// BDF2 predictor + Heun corrector (`FoCaCalibratorConfig`).
    FoCa(FoCaCalibratorConfig),
    /// Dynamic Mode Decomposition (`DMDCalibratorConfig`).
    Dmd(DMDCalibratorConfig),
}

impl<'de> Deserialize<'de> for CalibratorConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let kind = match value.get("calibrator_type") {
            None => "taylorseer".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "calibrator_type must be a string, found {other}"
                )));
            }
        };
        let parsed = match kind.as_str() {
            "taylorseer" => serde_json::from_value(value).map(Self::TaylorSeer),
            "foca" => serde_json::from_value(value).map(Self::FoCa),
            "dmd" => serde_json::from_value(value).map(Self::Dmd),
            other => {
                return Err(D::Error::custom(format!(
                    "calibrator_type {other:?} is not supported (taylorseer, foca or dmd)"
                )));
            }
        };
        parsed.map_err(D::Error::custom)
    }
}

impl Default for CalibratorConfig {
    fn default() -> Self {
        Self::TaylorSeer(TaylorSeerCalibratorConfig::default())
    }
}

impl From<TaylorSeerCalibratorConfig> for CalibratorConfig {
    fn from(config: TaylorSeerCalibratorConfig) -> Self {
        Self::TaylorSeer(config)
    }
}

impl From<FoCaCalibratorConfig> for CalibratorConfig {
    fn from(config: FoCaCalibratorConfig) -> Self {
        Self::FoCa(config)
    }
}

impl From<DMDCalibratorConfig> for CalibratorConfig {
    fn from(config: DMDCalibratorConfig) -> Self {
        Self::Dmd(config)
    }
}

/// Checks `calibrator_cache_type`.
pub(crate) fn check_cache_type(cache_type: &str) -> Result<()> {
    if !matches!(cache_type, "residual" | "hidden_states") {
        return Err(DiffusionError::InvalidOption {
            field: "calibrator_cache_type",
            reason: format!("{cache_type:?}: expected \"residual\" or \"hidden_states\""),
        });
    }
    Ok(())
}

impl CalibratorConfig {
    /// Checks the options of the chosen calibrator.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::TaylorSeer(c) => c.validate(),
            Self::FoCa(c) => c.validate(),
            Self::Dmd(c) => c.validate(),
        }
    }

    /// The calibrator's name (`calibrator_type`).
    pub fn calibrator_type(&self) -> &'static str {
        match self {
            Self::TaylorSeer(_) => "taylorseer",
            Self::FoCa(_) => "foca",
            Self::Dmd(_) => "dmd",
        }
    }

    /// Whether the hidden-state stream is forecast.
    pub fn enable_calibrator(&self) -> bool {
        match self {
            Self::TaylorSeer(c) => c.enable_calibrator,
            Self::FoCa(c) => c.enable_calibrator,
            Self::Dmd(c) => c.enable_calibrator,
        }
    }

    /// Whether the encoder-state stream is forecast.
    pub fn enable_encoder_calibrator(&self) -> bool {
        match self {
            Self::TaylorSeer(c) => c.enable_encoder_calibrator,
            Self::FoCa(c) => c.enable_encoder_calibrator,
            Self::Dmd(c) => c.enable_encoder_calibrator,
        }
    }

    /// Whether the forecast stream is the residual (else the hidden states).
    pub fn caches_residual(&self) -> bool {
        let cache_type = match self {
            Self::TaylorSeer(c) => &c.calibrator_cache_type,
            Self::FoCa(c) => &c.calibrator_cache_type,
            Self::Dmd(c) => &c.calibrator_cache_type,
        };
        cache_type == "residual"
    }

    /// A fresh calibrator of this kind (cache-dit's `Calibrator(config)`), from a validated
    /// config.
    pub(crate) fn build(&self) -> Calibrator {
        match self {
            Self::TaylorSeer(c) => {
                Calibrator::TaylorSeer(TaylorSeerCalibrator::new(c.taylorseer_order))
            }
            Self::FoCa(_) => Calibrator::FoCa(FoCaCalibrator::default()),
            Self::Dmd(c) => Calibrator::Dmd(DmdCalibrator::new(c)),
        }
    }
}

/// One calibrator: named forecast streams, advanced together once per step.
#[derive(Clone, Debug)]
pub(crate) enum Calibrator {
    TaylorSeer(TaylorSeerCalibrator),
    FoCa(FoCaCalibrator),
    Dmd(DmdCalibrator),
}

impl Calibrator {
    /// Resets every stream but keeps them (a new inference).
    pub(crate) fn reset_cache(&mut self) {
        match self {
            Self::TaylorSeer(c) => c.reset_cache(),
            Self::FoCa(c) => c.reset_cache(),
            Self::Dmd(c) => c.reset_cache(),
        }
    }

    /// Advances every existing stream by one step.
    pub(crate) fn mark_step_begin(&mut self) {
        match self {
            Self::TaylorSeer(c) => c.mark_step_begin(),
            Self::FoCa(c) => c.mark_step_begin(),
            Self::Dmd(c) => c.mark_step_begin(),
        }
    }

    /// Records a computed value of stream `name` (created on first use).
    pub(crate) fn update(&mut self, y: Tensor<3>, name: &str) {
        match self {
            Self::TaylorSeer(c) => c.update(y, name),
            Self::FoCa(c) => c.update(y, name),
            Self::Dmd(c) => c.update(y, name),
        }
    }

    /// The forecast of stream `name` for the current step; `None` when the stream holds no
    /// value. FoCa's forecast advances the stream, so call it once per cached use, as cache-dit.
    pub(crate) fn approximate(&mut self, name: &str) -> Result<Option<Tensor<3>>> {
        match self {
            Self::TaylorSeer(c) => Ok(c.approximate(name).ok()),
            Self::FoCa(c) => c.approximate(name),
            Self::Dmd(c) => c.approximate(name),
        }
    }

    /// Bytes of tensors held.
    pub(crate) fn memory_bytes(&self) -> usize {
        match self {
            Self::TaylorSeer(c) => c.memory_bytes(),
            Self::FoCa(c) => c.memory_bytes(),
            Self::Dmd(c) => c.memory_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrator_type_picks_the_config() {
        let parse = |text: &str| serde_json::from_str::<CalibratorConfig>(text);
        assert!(matches!(
            parse(r#"{"taylorseer_order": 2}"#).unwrap(),
            CalibratorConfig::TaylorSeer(c) if c.taylorseer_order == 2
        ));
        assert_eq!(
            parse(r#"{"calibrator_type": "foca"}"#).unwrap(),
            CalibratorConfig::FoCa(FoCaCalibratorConfig::default())
        );
        assert!(matches!(
            parse(r#"{"calibrator_type": "dmd", "dmd_history": 5}"#).unwrap(),
            CalibratorConfig::Dmd(c) if c.dmd_history == 5
        ));
        // Fields of another calibrator are refused, with the field named.
        let err = parse(r#"{"calibrator_type": "foca", "dmd_history": 5}"#).unwrap_err();
        assert!(err.to_string().contains("dmd_history"), "{err}");
        assert!(parse(r#"{"calibrator_type": "pab"}"#).is_err());
        assert!(parse(r#"{"calibrator_type": 3}"#).is_err());
        // A config serialises with its type and reads back the same.
        for config in [
            CalibratorConfig::default(),
            FoCaCalibratorConfig::default().into(),
            DMDCalibratorConfig::default().into(),
        ] {
            let text = serde_json::to_string(&config).unwrap();
            assert_eq!(parse(&text).unwrap(), config, "{text}");
            config.validate().unwrap();
        }
    }
}
