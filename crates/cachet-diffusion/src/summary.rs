//! What a cached inference did: cache-dit's `summary()` table (cached steps and residual-diff
//! percentiles), executed vs cached per context, and a PNG of the steps mask.

use std::collections::BTreeMap;
use std::fmt;

use cachet_plot::{Canvas, Rgb, WHITE, text_width};
use serde::Serialize;

use crate::hooks::CacheHooks;
use crate::log::{Action, DecisionLog};

/// Residual-diff distribution (numpy's linear-interpolation percentiles, as cache-dit prints).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DiffStats {
    /// Number of diffs.
    pub count: usize,
    /// Minimum.
    pub min: f64,
    /// 25th percentile.
    pub p25: f64,
    /// Median.
    pub p50: f64,
    /// 75th percentile.
    pub p75: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Maximum.
    pub max: f64,
}

/// `np.percentile(values, q)` with the default linear method.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl DiffStats {
    /// Statistics of `values` (`None` when empty).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Self {
            count: v.len(),
            min: v[0],
            p25: percentile(&v, 25.0),
            p50: percentile(&v, 50.0),
            p75: percentile(&v, 75.0),
            p95: percentile(&v, 95.0),
            max: v[v.len() - 1],
        })
    }
}

/// One row of the summary: a cache context (or DBCache unit) and what ran in it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ContextSummary {
    /// Context name (`cond`, `uncond`, a DBCache unit such as `transformer_blocks+single_transformer_blocks`).
    pub context: String,
    /// Steps whose block lists were cached (DBCache/FBCache) — cache-dit's "Cache Steps".
    pub cached_steps: Vec<usize>,
    /// Hooked calls that ran as written.
    pub computed: usize,
    /// Hooked calls answered from the cache or by approximation.
    pub cached: usize,
    /// Blocks run out of blocks visited (block methods).
    pub blocks_run: (usize, usize),
    /// Residual diffs measured, if the method measures any.
    pub diffs: Option<DiffStats>,
}

/// The summary of one inference.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Method name.
    pub method: String,
    /// Steps seen.
    pub steps: usize,
    /// Per context.
    pub contexts: Vec<ContextSummary>,
}

/// Summarises what `hooks` did since their last reset.
pub fn summary(hooks: &CacheHooks) -> Summary {
    let log = hooks.log();
    let mut contexts: BTreeMap<String, ContextSummary> = BTreeMap::new();
    let mut cached_steps: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut diffs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for d in &log.decisions {
        let entry = contexts
            .entry(d.context.clone())
            .or_insert_with(|| ContextSummary {
                context: d.context.clone(),
                ..ContextSummary::default()
            });
        match d.action {
            Action::Computed => entry.computed += 1,
            _ => entry.cached += 1,
        }
        if d.group.is_some() {
            entry.blocks_run.0 += d.computed_blocks;
            entry.blocks_run.1 += d.total_blocks;
            if d.action == Action::Cached {
                let steps = cached_steps.entry(d.context.clone()).or_default();
                if steps.last() != Some(&d.step) {
                    steps.push(d.step);
                }
            }
        }
        if let Some(diff) = d.diff {
            diffs.entry(d.context.clone()).or_default().push(diff);
        }
    }
    // DBCache keeps its own record (cache-dit's context), including diffs recorded for steps
    // that computed; prefer it.
    for unit in hooks.dbcache_stats() {
        diffs.insert(
            unit.name.clone(),
            unit.residual_diffs.iter().map(|(_, d)| *d).collect(),
        );
    }
    let mut out: Vec<ContextSummary> = contexts.into_values().collect();
    for c in &mut out {
        c.cached_steps = cached_steps.remove(&c.context).unwrap_or_default();
        c.diffs = diffs.get(&c.context).and_then(|v| DiffStats::of(v));
    }
    Summary {
        method: hooks.config().method().to_string(),
        steps: log.decisions.iter().map(|d| d.step + 1).max().unwrap_or(0),
        contexts: out,
    }
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Cache steps and residual diffs ({}, {} steps)",
            self.method, self.steps
        )?;
        writeln!(
            f,
            "| Context | Cache Steps | Computed | Cached | Blocks run | Diffs Min | Diffs P25 | Diffs P50 | Diffs P75 | Diffs P95 | Diffs Max |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        for c in &self.contexts {
            let d = c.diffs.as_ref();
            let blocks = if c.blocks_run.1 > 0 {
                format!("{}/{}", c.blocks_run.0, c.blocks_run.1)
            } else {
                "-".into()
            };
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                if c.context.is_empty() {
                    "(none)"
                } else {
                    &c.context
                },
                c.cached_steps.len(),
                c.computed,
                c.cached,
                blocks,
                cell(d.map(|d| d.min)),
                cell(d.map(|d| d.p25)),
                cell(d.map(|d| d.p50)),
                cell(d.map(|d| d.p75)),
                cell(d.map(|d| d.p95)),
                cell(d.map(|d| d.max)),
            )?;
        }
        Ok(())
    }
}

/// One row of the steps-mask plot: its label and, per step, the fraction of work computed
/// (`None` where the row had no call at that step).
pub(crate) type MaskRow = (String, Vec<Option<f64>>);

/// Rows of the steps-mask plot and the number of steps; one row per context and block list
/// (block methods) or per context and module list (module methods).
pub(crate) fn steps_mask_rows(log: &DecisionLog) -> (usize, Vec<MaskRow>) {
    let steps = log.decisions.iter().map(|d| d.step + 1).max().unwrap_or(0);
    let mut rows: BTreeMap<(String, String), Vec<(usize, usize)>> = BTreeMap::new();
    let mut order: Vec<(String, String)> = Vec::new();
    for d in &log.decisions {
        let row_name = match d.group {
            Some(_) => d.target.clone(),
            None => d.target.split('.').next().unwrap_or(&d.target).to_string(),
        };
        let key = (d.context.clone(), row_name);
        if !rows.contains_key(&key) {
            order.push(key.clone());
        }
        let cells = rows.entry(key).or_insert_with(|| vec![(0, 0); steps]);
        let (run, total) = if d.group.is_some() {
            (d.computed_blocks, d.total_blocks)
        } else {
            (usize::from(d.action == Action::Computed), 1)
        };
        cells[d.step].0 += run;
        cells[d.step].1 += total;
    }
    let rows = order
        .into_iter()
        .map(|key| {
            let cells = &rows[&key];
            let label = if key.0.is_empty() {
                key.1.clone()
            } else {
                format!("{} {}", key.0, key.1)
            };
            let fractions = cells
                .iter()
                .map(|(run, total)| (*total > 0).then(|| *run as f64 / *total as f64))
                .collect();
            (label, fractions)
        })
        .collect();
    (steps, rows)
}

const COMPUTED: Rgb = [46, 139, 87];
const CACHED: Rgb = [255, 165, 0];
const EMPTY: Rgb = [235, 235, 235];
const INK: Rgb = [30, 30, 30];

fn blend(a: Rgb, b: Rgb, t: f64) -> Rgb {
    let mix = |x: u8, y: u8| (x as f64 * (1.0 - t) + y as f64 * t).round() as u8;
    [mix(a[0], b[0]), mix(a[1], b[1]), mix(a[2], b[2])]
}

/// A PNG of the steps mask: one row per context and block list, one cell per step, green where
/// everything ran, orange where everything was cached, in between for partly cached steps.
pub fn steps_mask_png(log: &DecisionLog, title: &str) -> Vec<u8> {
    let (steps, rows) = steps_mask_rows(log);
    let scale = 2;
    let label_w = rows
        .iter()
        .map(|(l, _)| text_width(l, scale))
        .max()
        .unwrap_or(0)
        + 16;
    let cell = 18i64.max(560 / steps.max(1) as i64).min(40);
    let top = 56;
    let width = (label_w + cell * steps as i64 + 24).max(text_width(title, scale) + 32);
    let height = top + cell * rows.len() as i64 + 64;
    let mut canvas = Canvas::new(width as usize, height as usize, WHITE);
    canvas.text(16, 14, title, scale, INK);
    for (r, (label, cells)) in rows.iter().enumerate() {
        let y = top + r as i64 * cell;
        canvas.text(8, y + (cell - 14) / 2, label, scale, INK);
        for (s, frac) in cells.iter().enumerate() {
            let x = label_w + s as i64 * cell;
            let color = match frac {
                None => EMPTY,
                Some(f) => blend(CACHED, COMPUTED, *f),
            };
            canvas.fill_rect(x + 1, y + 1, cell - 2, cell - 2, color);
        }
    }
    let axis_y = top + cell * rows.len() as i64 + 6;
    let every = if steps > 30 {
        5
    } else if steps > 12 {
        2
    } else {
        1
    };
    for s in (0..steps).step_by(every) {
        let label = s.to_string();
        let x = label_w + s as i64 * cell + (cell - text_width(&label, 1)) / 2;
        canvas.text(x, axis_y, &label, 1, INK);
    }
    let legend_y = axis_y + 20;
    canvas.fill_rect(16, legend_y, 14, 14, COMPUTED);
    canvas.text(36, legend_y + 1, "computed", scale, INK);
    canvas.fill_rect(170, legend_y, 14, 14, CACHED);
    canvas.text(190, legend_y + 1, "cached / approximated", scale, INK);
    canvas.to_png()
}

/// How far a cached result is from the uncached one: PSNR in dB with peak `max|reference|`
/// (the latents are not images, so the peak is the reference's own range), and max |error|.
pub fn latent_psnr(reference: &[f32], other: &[f32]) -> (f64, f64) {
    let peak = reference.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let (mut sq, mut max_abs) = (0f64, 0f64);
    for (a, b) in reference.iter().zip(other) {
        let e = (*a as f64 - *b as f64).abs();
        sq += e * e;
        max_abs = max_abs.max(e);
    }
    let mse = sq / reference.len().max(1) as f64;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (peak * peak / mse).log10()
    };
    (psnr, max_abs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Decision;

    #[test]
    fn psnr_of_identical_and_offset_latents() {
        assert_eq!(latent_psnr(&[1.0, -2.0], &[1.0, -2.0]).0, f64::INFINITY);
        let (psnr, max_abs) = latent_psnr(&[2.0, -2.0], &[2.2, -2.0]);
        // mse = 0.02, peak 2: 10 log10(4 / 0.02) = 23.01
        assert!((psnr - 23.0103).abs() < 1e-3, "{psnr}");
        assert!((max_abs - 0.2).abs() < 1e-6);
    }

    #[test]
    fn percentiles_match_numpy() {
        let v = [0.1, 0.4, 0.2, 0.3];
        let s = DiffStats::of(&v).unwrap();
        // np.percentile([0.1,0.2,0.3,0.4], [25,50,75,95]) = 0.175, 0.25, 0.325, 0.385
        assert!((s.p25 - 0.175).abs() < 1e-12);
        assert!((s.p50 - 0.25).abs() < 1e-12);
        assert!((s.p75 - 0.325).abs() < 1e-12);
        assert!((s.p95 - 0.385).abs() < 1e-12);
        assert_eq!((s.min, s.max), (0.1, 0.4));
    }

    #[test]
    fn steps_mask_rows_split_contexts_and_lists() {
        let mut log = DecisionLog::default();
        for step in 0..3 {
            log.push(Decision {
                step,
                context: "u".into(),
                target: "transformer_blocks".into(),
                group: Some(0),
                action: if step == 1 {
                    Action::Cached
                } else {
                    Action::Computed
                },
                computed_blocks: if step == 1 { 1 } else { 4 },
                total_blocks: 4,
                diff: None,
            });
        }
        let (steps, rows) = steps_mask_rows(&log);
        assert_eq!(steps, 3);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1, vec![Some(1.0), Some(0.25), Some(1.0)]);
        let png = steps_mask_png(&log, "test");
        assert_eq!(&png[1..4], b"PNG");
    }
}
