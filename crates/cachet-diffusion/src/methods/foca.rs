//! cache-dit's FoCa calibrator (Forecast then Calibrate): a cached step's value is predicted
//! recursively from the two most recent values (computed or predicted) and corrected by a Heun
//! (trapezoidal) step anchored at the last computed value, the horizon clamped to three steps
//! beyond which the prediction is damped toward the anchor. No hyper-parameters.

use std::collections::HashMap;

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};

/// cache-dit's `FoCaCalibratorConfig`, with its field names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FoCaCalibratorConfig {
    /// Forecast the hidden-state stream.
    pub enable_calibrator: bool,
    /// Forecast the encoder-state stream.
    pub enable_encoder_calibrator: bool,
    /// Always `"foca"`.
    pub calibrator_type: String,
    /// `"residual"` (forecast the Bn residual) or `"hidden_states"`.
    pub calibrator_cache_type: String,
    /// Accepted for compatibility; FoCa has no arguments and ignores them, as cache-dit does.
    pub calibrator_kwargs: serde_json::Map<String, serde_json::Value>,
}

impl Default for FoCaCalibratorConfig {
    fn default() -> Self {
        Self {
            enable_calibrator: true,
            enable_encoder_calibrator: true,
            calibrator_type: "foca".into(),
            calibrator_cache_type: "residual".into(),
            calibrator_kwargs: serde_json::Map::new(),
        }
    }
}

impl FoCaCalibratorConfig {
    /// Checks the type names.
    pub fn validate(&self) -> Result<()> {
        if self.calibrator_type != "foca" {
            return Err(DiffusionError::InvalidOption {
                field: "calibrator_type",
                reason: format!(
                    "{:?}: this config is FoCa's (\"foca\")",
                    self.calibrator_type
                ),
            });
        }
        super::calibrator::check_cache_type(&self.calibrator_cache_type)
    }
}

/// Horizon (steps since the anchor) up to which the Heun step is taken as is.
const MAX_HORIZON: f64 = 3.0;

/// One stream: the rolling pair of latest values and the pair of latest computed anchors.
#[derive(Clone, Debug)]
struct FoCaState {
    current_step: i64,
    last_full_step: i64,
    prev_full_step: i64,
    f_k: Option<Tensor<3>>,
    f_km1: Option<Tensor<3>>,
    f_full: Option<Tensor<3>>,
    f_full_prev: Option<Tensor<3>>,
}

impl Default for FoCaState {
    fn default() -> Self {
        Self {
            current_step: -1,
            last_full_step: -1,
            prev_full_step: -1,
            f_k: None,
            f_km1: None,
            f_full: None,
            f_full_prev: None,
        }
    }
}

impl FoCaState {
    fn update(&mut self, y: Tensor<3>) {
        // A new shape starts the stream over, step counter included (cache-dit's reset).
        if let Some(f_k) = &self.f_k
            && f_k.dims() != y.dims()
        {
            *self = Self::default();
        }
        self.prev_full_step = self.last_full_step;
        self.last_full_step = self.current_step;
        self.f_full_prev = self.f_full.take();
        self.f_full = Some(y.clone());
        self.f_km1 = self.f_k.take();
        self.f_k = Some(y);
    }

    fn approximate(&mut self) -> Result<Tensor<3>> {
        let f_k = self.f_k.clone().ok_or_else(|| {
            DiffusionError::State("FoCa: a stream was forecast before it was computed".into())
        })?;
        let (Some(f_km1), Some(f_full), Some(f_full_prev)) =
            (&self.f_km1, &self.f_full, &self.f_full_prev)
        else {
            return Ok(self.f_full.clone().unwrap_or(f_k));
        };
        let elapsed = (self.current_step - self.last_full_step) as f64;
        let slope = (f_full.clone() - f_full_prev.clone()) + (f_k.clone() - f_km1.clone());
        let pred = if elapsed <= MAX_HORIZON {
            f_full.clone() + slope * (elapsed / 2.0)
        } else {
            let w = MAX_HORIZON / elapsed;
            let heun3 = f_full.clone() + slope * (MAX_HORIZON / 2.0);
            heun3 * w + f_full.clone() * (1.0 - w)
        };
        self.f_km1 = Some(f_k);
        self.f_k = Some(pred.clone());
        Ok(pred)
    }

    fn bytes(&self) -> usize {
        [&self.f_k, &self.f_km1, &self.f_full, &self.f_full_prev]
            .into_iter()
            .flatten()
            .map(cachet_tensor::tensor_bytes)
            .sum()
    }
}

/// cache-dit's `FoCaCalibrator`: named streams created on first update.
#[derive(Clone, Debug, Default)]
pub(crate) struct FoCaCalibrator {
    states: HashMap<String, FoCaState>,
}

impl FoCaCalibrator {
    pub(crate) fn reset_cache(&mut self) {
        self.states
            .values_mut()
            .for_each(|s| *s = FoCaState::default());
    }

    pub(crate) fn mark_step_begin(&mut self) {
        self.states.values_mut().for_each(|s| s.current_step += 1);
    }

    pub(crate) fn update(&mut self, y: Tensor<3>, name: &str) {
        self.states.entry(name.to_string()).or_default().update(y);
    }

    /// The forecast of stream `name` (which advances its rolling pair); `None` when the stream
    /// does not exist.
    pub(crate) fn approximate(&mut self, name: &str) -> Result<Option<Tensor<3>>> {
        self.states
            .get_mut(name)
            .map(FoCaState::approximate)
            .transpose()
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.states.values().map(FoCaState::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn scalar(v: f32) -> Tensor<3> {
        Tensor::from_data(TensorData::new(vec![v], [1, 1, 1]), &Device::default())
    }

    fn value(t: Tensor<3>) -> f32 {
        t.into_data().try_into_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn heun_step_is_exact_on_a_line_and_damped_past_three_steps() {
        let mut cal = FoCaCalibrator::default();
        // Computed at steps 0 and 1 on the line y = 2t + 1.
        for t in 0..2 {
            cal.mark_step_begin();
            cal.update(scalar(2.0 * t as f32 + 1.0), "Bn");
        }
        for t in 2..5 {
            cal.mark_step_begin();
            let y = value(cal.approximate("Bn").unwrap().unwrap());
            assert!((y - (2.0 * t as f32 + 1.0)).abs() < 1e-5, "step {t}: {y}");
        }
        // Step 5 is 4 steps past the anchor: the Heun value at horizon 3 (9.0 on the line),
        // weighted 3/4 against the anchor 3.0.
        cal.mark_step_begin();
        let y = value(cal.approximate("Bn").unwrap().unwrap());
        assert!((y - (0.75 * 9.0 + 0.25 * 3.0)).abs() < 1e-5, "{y}");
        assert!(cal.approximate("missing").unwrap().is_none());
    }

    #[test]
    fn one_computed_value_is_reused() {
        let mut cal = FoCaCalibrator::default();
        cal.mark_step_begin();
        cal.update(scalar(4.0), "Bn");
        cal.mark_step_begin();
        assert_eq!(value(cal.approximate("Bn").unwrap().unwrap()), 4.0);
        cal.reset_cache();
        assert!(cal.approximate("Bn").is_err());
    }
}
