//! cache-dit's DMD calibrator (Dynamic Mode Decomposition, an exponential-basis forecaster): each
//! named stream keeps its last `dmd_history` computed values; a cached step forecasts the stream
//! from the longest uniformly spaced tail of that history (≥ 4 snapshots) by eigenvalue powers of
//! the fitted linear propagator, and below that floor falls back to a Taylor expansion kept on
//! the side. The fit runs on the host in f64 (`dmd_fit`), once per snapshot window.

use std::collections::HashMap;

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::dmd_fit::DmdFit;
use crate::error::{DiffusionError, Result};

/// Longest snapshot history accepted: each snapshot is a full copy of the stream.
pub(crate) const MAX_DMD_HISTORY: usize = 64;

/// cache-dit's `DMDCalibratorConfig`, with its field names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DMDCalibratorConfig {
    /// Forecast the hidden-state stream.
    pub enable_calibrator: bool,
    /// Forecast the encoder-state stream.
    pub enable_encoder_calibrator: bool,
    /// Always `"dmd"`.
    pub calibrator_type: String,
    /// `"residual"` (forecast the Bn residual) or `"hidden_states"`.
    pub calibrator_cache_type: String,
    /// Computed-step snapshots kept per stream (≥ 4 uniformly spaced ones engage the fit).
    pub dmd_history: usize,
    /// SVD truncation rank; 0 (or less) keeps singular values above 1e-4 of the largest.
    pub dmd_rank: i64,
    /// Tikhonov term added to the singular values before inverting them.
    pub dmd_ridge: f64,
    /// `"low"`, `"medium"` or `"high"`: torch's SVD driver. All three compute the same economy
    /// SVD here (the snapshot matrix has at most `dmd_history` columns).
    pub dmd_svd_precision: String,
    /// Extra calibrator arguments: `n_derivatives` (orders of the Taylor fallback, default 1).
    pub calibrator_kwargs: serde_json::Map<String, serde_json::Value>,
}

impl Default for DMDCalibratorConfig {
    fn default() -> Self {
        Self {
            enable_calibrator: true,
            enable_encoder_calibrator: true,
            calibrator_type: "dmd".into(),
            calibrator_cache_type: "residual".into(),
            dmd_history: 6,
            dmd_rank: 0,
            dmd_ridge: 1e-8,
            dmd_svd_precision: "medium".into(),
            calibrator_kwargs: serde_json::Map::new(),
        }
    }
}

impl DMDCalibratorConfig {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.calibrator_type != "dmd" {
            return Err(DiffusionError::InvalidOption {
                field: "calibrator_type",
                reason: format!("{:?}: this config is DMD's (\"dmd\")", self.calibrator_type),
            });
        }
        super::calibrator::check_cache_type(&self.calibrator_cache_type)?;
        if self.dmd_history > MAX_DMD_HISTORY {
            return Err(DiffusionError::InvalidOption {
                field: "dmd_history",
                reason: format!("{}: at most {MAX_DMD_HISTORY}", self.dmd_history),
            });
        }
        if !self.dmd_ridge.is_finite() || self.dmd_ridge < 0.0 {
            return Err(DiffusionError::InvalidOption {
                field: "dmd_ridge",
                reason: format!("{}: must be finite and not negative", self.dmd_ridge),
            });
        }
        if !matches!(self.dmd_svd_precision.as_str(), "low" | "medium" | "high") {
            return Err(DiffusionError::InvalidOption {
                field: "dmd_svd_precision",
                reason: format!(
                    "{:?}: expected \"low\", \"medium\" or \"high\"",
                    self.dmd_svd_precision
                ),
            });
        }
        self.n_derivatives().map(|_| ())
    }

    /// Orders of the Taylor fallback (`calibrator_kwargs.n_derivatives`, default 1).
    pub(crate) fn n_derivatives(&self) -> Result<usize> {
        let bad = |reason: String| DiffusionError::InvalidOption {
            field: "calibrator_kwargs",
            reason,
        };
        for key in self.calibrator_kwargs.keys() {
            if key != "n_derivatives" {
                return Err(bad(format!(
                    "{key:?} is not a DMD argument (only \"n_derivatives\"; history, rank, ridge \
                     and SVD precision are the dmd_* fields)"
                )));
            }
        }
        match self.calibrator_kwargs.get("n_derivatives") {
            None => Ok(1),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n <= super::taylorseer::MAX_TAYLORSEER_ORDER)
                .ok_or_else(|| {
                    bad(format!(
                        "n_derivatives = {v}: expected 0 to {}",
                        super::taylorseer::MAX_TAYLORSEER_ORDER
                    ))
                }),
        }
    }
}

/// A fit and the window it was made for: `(newest snapshot step, tail length, spacing)`, and one
/// fit per batch item (`None`: a degenerate window).
type WindowFit = ((i64, usize, i64), Option<Vec<DmdFit>>);

/// One stream: snapshots, the cached fit of the current window, and the Taylor fallback ladder.
#[derive(Clone, Debug)]
struct DmdState {
    history: usize,
    rank: i64,
    ridge: f64,
    order: usize,
    current_step: i64,
    last_non_approximated_step: i64,
    snapshots: Vec<(i64, Tensor<3>)>,
    /// The fit of the current window, once made.
    fit: Option<WindowFit>,
    prev: Vec<Option<Tensor<3>>>,
    current: Vec<Option<Tensor<3>>>,
}

impl DmdState {
    fn new(history: usize, rank: i64, ridge: f64, n_derivatives: usize) -> Self {
        let order = n_derivatives + 1;
        Self {
            history,
            rank,
            ridge,
            order,
            current_step: -1,
            last_non_approximated_step: -1,
            snapshots: Vec::new(),
            fit: None,
            prev: vec![None; order],
            current: vec![None; order],
        }
    }

    fn reset(&mut self) {
        *self = Self::new(self.history, self.rank, self.ridge, self.order - 1);
    }

    /// cache-dit's `_update_taylor`: the new ladder is differenced against `prev`, the ladder of
    /// two updates ago (it is read before the shift), over the steps since the last update.
    fn update_taylor(&mut self, y: Tensor<3>) {
        let mut d: Vec<Option<Tensor<3>>> = vec![None; self.order];
        let window = self.current_step - self.last_non_approximated_step;
        if let Some(prev0) = &self.prev[0]
            && prev0.dims() != y.dims()
        {
            self.reset();
        }
        d[0] = Some(y);
        for i in 0..self.order - 1 {
            match (&self.prev[i], &d[i]) {
                (Some(prev), Some(cur)) if self.current_step > 1 && window > 0 => {
                    d[i + 1] = Some((cur.clone() - prev.clone()) / window as f64);
                }
                _ => break,
            }
        }
        self.prev = std::mem::replace(&mut self.current, d);
    }

    fn update(&mut self, y: Tensor<3>) {
        if let Some((_, last)) = self.snapshots.last()
            && last.dims() != y.dims()
        {
            self.reset();
        }
        self.update_taylor(y.clone());
        self.snapshots.push((self.current_step, y));
        if self.snapshots.len() > self.history {
            let excess = self.snapshots.len() - self.history;
            self.snapshots.drain(..excess);
        }
        self.last_non_approximated_step = self.current_step;
        self.fit = None;
    }

    /// The longest uniformly spaced suffix of the snapshots (oldest first) and its spacing.
    fn uniform_tail(&self) -> (Vec<&Tensor<3>>, i64) {
        let n = self.snapshots.len();
        if n < 2 {
            return (Vec::new(), 0);
        }
        let steps: Vec<i64> = self.snapshots.iter().map(|(s, _)| *s).collect();
        let spacing = steps[n - 1] - steps[n - 2];
        if spacing <= 0 {
            return (Vec::new(), 0);
        }
        let mut start = n - 2;
        while start > 0 && steps[start] - steps[start - 1] == spacing {
            start -= 1;
        }
        (
            self.snapshots[start..].iter().map(|(_, t)| t).collect(),
            spacing,
        )
    }

    fn approximate_taylor(&self) -> Option<Tensor<3>> {
        let elapsed = (self.current_step - self.last_non_approximated_step) as f64;
        let mut out: Option<Tensor<3>> = None;
        let mut factorial = 1.0;
        for (i, d) in self.current.iter().enumerate() {
            let Some(d) = d else { break };
            if i > 0 {
                factorial *= i as f64;
            }
            let term = d.clone() * (1.0 / factorial) * elapsed.powi(i as i32);
            out = Some(match out {
                None => term,
                Some(acc) => acc + term,
            });
        }
        out
    }

    fn approximate(&mut self) -> Result<Option<Tensor<3>>> {
        let (tail, spacing) = self.uniform_tail();
        if tail.len() < 4 {
            return Ok(self.approximate_taylor());
        }
        let (newest_step, newest) = self
            .snapshots
            .last()
            .cloned()
            .ok_or_else(|| DiffusionError::State("DMD: the snapshot tail is empty".into()))?;
        let k = (self.current_step - newest_step) as f64 / spacing as f64;
        let key = (newest_step, tail.len(), spacing);
        if self.fit.as_ref().map(|f| f.0) != Some(key) {
            let fits = fit_window(&tail, self.rank, self.ridge)?;
            self.fit = Some((key, fits));
        }
        if let Some((_, Some(fits))) = &self.fit
            && let Some(pred) = evaluate(fits, k, &newest)?
        {
            return Ok(Some(pred));
        }
        Ok(Some(newest))
    }

    fn bytes(&self) -> usize {
        let t = |x: &Tensor<3>| cachet_tensor::tensor_bytes(x);
        self.snapshots.iter().map(|(_, s)| t(s)).sum::<usize>()
            + self
                .prev
                .iter()
                .chain(&self.current)
                .flatten()
                .map(t)
                .sum::<usize>()
            + self
                .fit
                .iter()
                .filter_map(|(_, f)| f.as_ref())
                .flatten()
                .map(DmdFit::bytes)
                .sum::<usize>()
    }
}

/// Host values of a tensor as f64.
fn host_values(t: &Tensor<3>) -> Result<Vec<f64>> {
    let data = t.clone().into_data().convert::<f32>();
    let values: Vec<f32> = data
        .try_into_vec()
        .map_err(|e| DiffusionError::State(format!("DMD: cannot read a snapshot: {e:?}")))?;
    Ok(values.into_iter().map(f64::from).collect())
}

/// cache-dit's `_dmd_fit`: one fit per batch item; `None` if any item is degenerate (its
/// forecast is then the newest snapshot, as cache-dit's).
fn fit_window(tail: &[&Tensor<3>], rank: i64, ridge: f64) -> Result<Option<Vec<DmdFit>>> {
    let _span = tracing::debug_span!("dmd_fit", snapshots = tail.len()).entered();
    let batch = tail[0].dims()[0].max(1);
    let host: Vec<Vec<f64>> = tail.iter().map(|t| host_values(t)).collect::<Result<_>>()?;
    let per_item = host[0].len() / batch;
    let mut fits = Vec::with_capacity(batch);
    for item in 0..batch {
        let traj: Vec<Vec<f64>> = host
            .iter()
            .map(|s| s[item * per_item..(item + 1) * per_item].to_vec())
            .collect();
        match DmdFit::new(&traj, rank, ridge) {
            Some(fit) => fits.push(fit),
            None => return Ok(None),
        }
    }
    Ok(Some(fits))
}

/// cache-dit's `_dmd_eval`: the forecast in the stream's dtype, `None` if it is not finite.
fn evaluate(fits: &[DmdFit], k: f64, like: &Tensor<3>) -> Result<Option<Tensor<3>>> {
    let values: Vec<f32> = fits
        .iter()
        .flat_map(|f| f.forecast(k))
        .map(|x| x as f32)
        .collect();
    if values.iter().any(|x| !x.is_finite()) {
        return Ok(None);
    }
    let data = TensorData::new(values, like.dims());
    let pred = Tensor::<3>::from_data(data, &like.device()).cast(like.dtype());
    Ok(Some(pred))
}

/// cache-dit's `DMDCalibrator`: named streams created on first update.
#[derive(Clone, Debug)]
pub(crate) struct DmdCalibrator {
    history: usize,
    rank: i64,
    ridge: f64,
    n_derivatives: usize,
    states: HashMap<String, DmdState>,
}

impl DmdCalibrator {
    /// From a validated config (`n_derivatives` falls back to 1 otherwise).
    pub(crate) fn new(config: &DMDCalibratorConfig) -> Self {
        Self {
            history: config.dmd_history,
            rank: config.dmd_rank,
            ridge: config.dmd_ridge,
            n_derivatives: config.n_derivatives().unwrap_or(1),
            states: HashMap::new(),
        }
    }

    pub(crate) fn reset_cache(&mut self) {
        self.states.values_mut().for_each(DmdState::reset);
    }

    pub(crate) fn mark_step_begin(&mut self) {
        self.states.values_mut().for_each(|s| s.current_step += 1);
    }

    pub(crate) fn update(&mut self, y: Tensor<3>, name: &str) {
        let (h, r, ridge, n) = (self.history, self.rank, self.ridge, self.n_derivatives);
        self.states
            .entry(name.to_string())
            .or_insert_with(|| DmdState::new(h, r, ridge, n))
            .update(y);
    }

    /// The forecast of stream `name`; `None` when it holds no value yet.
    pub(crate) fn approximate(&mut self, name: &str) -> Result<Option<Tensor<3>>> {
        match self.states.get_mut(name) {
            Some(state) => state.approximate(),
            None => Ok(None),
        }
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.states.values().map(DmdState::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn tensor(values: Vec<f32>, device: &Device) -> Tensor<3> {
        let n = values.len();
        Tensor::from_data(TensorData::new(values, [1, 1, n]), device)
    }

    fn read(t: Tensor<3>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().unwrap()
    }

    #[test]
    fn uniform_tail_fit_forecasts_exponentials_and_falls_back_to_taylor() {
        let device = Device::default();
        let mut cal = DmdCalibrator::new(&DMDCalibratorConfig::default());
        let value = |t: i64| -> Vec<f32> {
            (0..8)
                .map(|i| (0.8f64.powi(t as i32) * (1.0 + i as f64) + 0.5f64.powi(t as i32)) as f32)
                .collect()
        };
        // Computed steps 0..=4: five uniformly spaced snapshots.
        for t in 0..5 {
            cal.mark_step_begin();
            cal.update(tensor(value(t), &device), "Bn");
        }
        cal.mark_step_begin();
        let pred = read(cal.approximate("Bn").unwrap().unwrap());
        let want = value(5);
        for (p, w) in pred.iter().zip(&want) {
            assert!((p - w).abs() < 1e-4, "{p} vs {w}");
        }
        // A fresh stream with two snapshots uses the Taylor ladder.
        cal.update(tensor(vec![1.0; 4], &device), "other");
        cal.mark_step_begin();
        assert!(cal.approximate("other").unwrap().is_some());
        assert!(cal.approximate("missing").unwrap().is_none());
        assert!(cal.memory_bytes() > 0);
    }

    #[test]
    fn kwargs_and_options_are_checked() {
        let mut config = DMDCalibratorConfig::default();
        config.validate().unwrap();
        config
            .calibrator_kwargs
            .insert("n_derivatives".into(), serde_json::json!(2));
        assert_eq!(config.n_derivatives().unwrap(), 2);
        config
            .calibrator_kwargs
            .insert("history".into(), serde_json::json!(3));
        assert!(config.validate().is_err());
        let bad = DMDCalibratorConfig {
            dmd_svd_precision: "ultra".into(),
            ..DMDCalibratorConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = DMDCalibratorConfig {
            dmd_history: 1 << 40,
            ..DMDCalibratorConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
