//! [`LineChart`]: a line chart with axes from zero, round ticks, a grid and a legend.

use crate::canvas::{BLACK, Canvas, Marker, Rgb, WHITE};
use crate::font::{text_height, text_width};

const GRID: Rgb = [228, 228, 228];
const SUBTLE: Rgb = [90, 90, 90];

/// One line of a [`LineChart`].
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Line and marker colour.
    pub color: Rgb,
    /// Dashed instead of solid (lets a series drawn over an identical one show both).
    pub dashed: bool,
    /// Marker at each point.
    pub marker: Marker,
    /// Marker "radius" in pixels.
    pub marker_size: i64,
    /// `(x, y)` points in data units, x increasing.
    pub points: Vec<(f64, f64)>,
}

/// A line chart: title, subtitle, axes from zero, ticks, grid, legend to the right.
#[derive(Debug, Clone)]
pub struct LineChart {
    /// Large text at the top.
    pub title: String,
    /// Smaller line under the title.
    pub subtitle: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label left of the y axis (drawn upwards).
    pub y_label: String,
    /// Prefer power-of-two x ticks (token counts) when they divide the range evenly.
    pub x_pow2_ticks: bool,
    /// The lines, drawn in order (later ones on top).
    pub series: Vec<Series>,
    /// Extra legend lines under the entries.
    pub notes: Vec<String>,
}

impl LineChart {
    /// Renders the chart on a `width` x `height` canvas.
    pub fn render(&self, width: usize, height: usize) -> Canvas {
        let mut canvas = Canvas::new(width, height, WHITE);
        let (w, h) = (width as i64, height as i64);
        let title_scale = 3;
        let small = 2;

        // Title and subtitle, centred.
        canvas.text(
            (w - text_width(&self.title, title_scale)) / 2,
            18,
            &self.title,
            title_scale,
            BLACK,
        );
        canvas.text(
            (w - text_width(&self.subtitle, small)) / 2,
            18 + text_height(title_scale) + 14,
            &self.subtitle,
            small,
            SUBTLE,
        );

        // Legend width decides the plot's right edge.
        let entries: Vec<&str> = self.series.iter().map(|s| s.name.as_str()).collect();
        let sample = 44;
        let legend_text = entries
            .iter()
            .map(|e| text_width(e, small))
            .chain(self.notes.iter().map(|n| text_width(n, small)))
            .max()
            .unwrap_or(0);
        let legend_w = sample + 12 + legend_text + 28;
        let top = 18 + text_height(title_scale) + 14 + text_height(small) + 30;
        let left = 130;
        let right = w - legend_w - 40;
        let bottom = h - 80;

        let (x_max, y_max) = self
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .fold((0.0f64, 0.0f64), |(xm, ym), &(x, y)| (xm.max(x), ym.max(y)));
        let x_ticks = ticks(x_max.max(1.0), self.x_pow2_ticks, 1.0);
        let y_ticks = ticks(if y_max > 0.0 { y_max } else { 1.0 }, false, 1.04);
        let x_top = *x_ticks.last().unwrap_or(&1.0);
        let y_top = *y_ticks.last().unwrap_or(&1.0);
        let px = |x: f64| left as f64 + x / x_top * (right - left) as f64;
        let py = |y: f64| bottom as f64 - y / y_top * (bottom - top) as f64;

        // Grid, ticks and tick labels.
        let y_decimals = decimals(&y_ticks);
        for &t in &y_ticks {
            let y = py(t).round() as i64;
            if t > 0.0 {
                canvas.fill_rect(left + 1, y, right - left, 1, GRID);
            }
            canvas.fill_rect(left - 6, y, 6, 2, BLACK);
            let label = format!("{t:.y_decimals$}");
            canvas.text(
                left - 12 - text_width(&label, small),
                y - text_height(small) / 2,
                &label,
                small,
                BLACK,
            );
        }
        let x_decimals = decimals(&x_ticks);
        for &t in &x_ticks {
            let x = px(t).round() as i64;
            if t > 0.0 {
                canvas.fill_rect(x, top, 1, bottom - top, GRID);
            }
            canvas.fill_rect(x, bottom, 2, 7, BLACK);
            let label = format!("{t:.x_decimals$}");
            canvas.text(
                x - text_width(&label, small) / 2,
                bottom + 14,
                &label,
                small,
                BLACK,
            );
        }
        // Axes.
        canvas.fill_rect(left - 1, top, 2, bottom - top + 1, BLACK);
        canvas.fill_rect(left - 1, bottom, right - left + 2, 2, BLACK);
        // Axis labels.
        canvas.text(
            left + (right - left - text_width(&self.x_label, small)) / 2,
            bottom + 14 + text_height(small) + 18,
            &self.x_label,
            small,
            BLACK,
        );
        canvas.text_up(
            24,
            top + (bottom - top + text_width(&self.y_label, small)) / 2,
            &self.y_label,
            small,
            BLACK,
        );

        // The series: every line, then the markers, largest first, so a series that coincides
        // with another still shows its (smaller) markers on top.
        for series in &self.series {
            let dash = series.dashed.then_some((12.0, 8.0));
            let mut phase = 0.0;
            for pair in series.points.windows(2) {
                phase = canvas.line(
                    (px(pair[0].0), py(pair[0].1)),
                    (px(pair[1].0), py(pair[1].1)),
                    series.color,
                    2,
                    dash,
                    phase,
                );
            }
        }
        let mut by_size: Vec<&Series> = self.series.iter().collect();
        by_size.sort_by_key(|s| std::cmp::Reverse(s.marker_size));
        for series in by_size {
            for &(x, y) in &series.points {
                canvas.marker(
                    px(x),
                    py(y),
                    series.marker,
                    series.marker_size,
                    series.color,
                );
            }
        }

        // Legend box.
        let row = 30;
        let legend_x = right + 30;
        let legend_h = 16 + row * (entries.len() + self.notes.len()) as i64;
        canvas.fill_rect(legend_x, top, legend_w, legend_h, [248, 248, 248]);
        for (x, y, bw, bh) in [
            (legend_x, top, legend_w, 1),
            (legend_x, top + legend_h, legend_w, 1),
            (legend_x, top, 1, legend_h),
            (legend_x + legend_w, top, 1, legend_h + 1),
        ] {
            canvas.fill_rect(x, y, bw, bh, [170, 170, 170]);
        }
        for (i, series) in self.series.iter().enumerate() {
            let y = top + 12 + row * i as i64 + text_height(small) / 2;
            let x0 = legend_x + 12;
            let dash = series.dashed.then_some((12.0, 8.0));
            canvas.line(
                (x0 as f64, y as f64),
                ((x0 + sample) as f64, y as f64),
                series.color,
                2,
                dash,
                0.0,
            );
            canvas.marker(
                (x0 + sample / 2) as f64,
                y as f64,
                series.marker,
                series.marker_size,
                series.color,
            );
            canvas.text(
                x0 + sample + 12,
                y - text_height(small) / 2,
                &series.name,
                small,
                BLACK,
            );
        }
        for (i, note) in self.notes.iter().enumerate() {
            let y = top + 12 + row * (self.series.len() + i) as i64;
            canvas.text(legend_x + 12, y, note, small, SUBTLE);
        }
        canvas
    }
}

/// Tick positions from 0 to at least `max * headroom`: a 1-2-5 step (or a power of two dividing
/// `max` when `pow2`) giving about 4 to 10 intervals.
fn ticks(max: f64, pow2: bool, headroom: f64) -> Vec<f64> {
    let target = max * headroom;
    let mut step = None;
    if pow2 && max.fract() == 0.0 {
        step = (0..40)
            .map(|e| 2f64.powi(e))
            .find(|&s| (max / s).fract() == 0.0 && max / s <= 10.0 && max / s >= 4.0);
    }
    let step = step.unwrap_or_else(|| {
        let raw = target / 6.0;
        let magnitude = 10f64.powf(raw.log10().floor());
        let mut chosen = 10.0 * magnitude;
        for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
            if m * magnitude >= raw {
                chosen = m * magnitude;
                break;
            }
        }
        chosen
    });
    let n = (target / step - 1e-9).ceil().max(1.0) as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// Decimals needed to print every tick exactly (at most 3).
fn decimals(ticks: &[f64]) -> usize {
    (0..=3)
        .find(|&d| {
            let scale = 10f64.powi(d as i32);
            ticks
                .iter()
                .all(|t| ((t * scale).round() - t * scale).abs() < 1e-6)
        })
        .unwrap_or(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            ticks(8192.0, true, 1.0),
            (0..=8).map(|i| f64::from(i) * 1024.0).collect::<Vec<_>>()
        );
        assert_eq!(ticks(2.0, false, 1.04), vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!(decimals(&[0.0, 0.25, 0.5]), 2);
        assert_eq!(decimals(&[0.0, 1024.0]), 0);
    }
}
