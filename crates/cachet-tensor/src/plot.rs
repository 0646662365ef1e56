//! Just enough plotting for cachet's reports (`cachet kv-memory`, `cachet denoise`), with no
//! dependencies: an RGB canvas, a 5x7 bitmap font, a line chart with axes, ticks and a legend,
//! and a PNG encoder (stored deflate blocks inside zlib, so no compressor is needed).

/// An 8-bit RGB colour.
pub type Rgb = [u8; 3];

/// White.
pub const WHITE: Rgb = [255, 255, 255];
/// Black.
pub const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [228, 228, 228];
const SUBTLE: Rgb = [90, 90, 90];

/// An RGB image in memory, rows top to bottom.
#[derive(Debug, Clone)]
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A `width` x `height` canvas filled with `background`.
    pub fn new(width: usize, height: usize, background: Rgb) -> Self {
        let pixels = background
            .iter()
            .copied()
            .cycle()
            .take(width * height * 3)
            .collect();
        Self {
            width,
            height,
            pixels,
        }
    }

    /// Sets one pixel; coordinates outside the canvas are ignored.
    pub fn set(&mut self, x: i64, y: i64, color: Rgb) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return;
        }
        let at = (y as usize * self.width + x as usize) * 3;
        self.pixels[at..at + 3].copy_from_slice(&color);
    }

    /// The colour of one pixel.
    pub fn get(&self, x: usize, y: usize) -> Rgb {
        let at = (y * self.width + x) * 3;
        [self.pixels[at], self.pixels[at + 1], self.pixels[at + 2]]
    }

    /// Fills a `w` x `h` rectangle whose top-left corner is `(x, y)`.
    pub fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, color: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, color);
            }
        }
    }

    /// A line `thickness` pixels wide; `dash` is `(on, off)` in pixels, and `phase` the distance
    /// already drawn (so the dashes of a polyline continue across its segments). Returns the new
    /// phase.
    pub fn line(
        &mut self,
        from: (f64, f64),
        to: (f64, f64),
        color: Rgb,
        thickness: i64,
        dash: Option<(f64, f64)>,
        phase: f64,
    ) -> f64 {
        let (dx, dy) = (to.0 - from.0, to.1 - from.1);
        let length = (dx * dx + dy * dy).sqrt();
        let steps = length.ceil().max(1.0) as usize;
        let offset = (thickness - 1) / 2;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let travelled = phase + t * length;
            if let Some((on, off)) = dash
                && travelled % (on + off) >= on
            {
                continue;
            }
            let x = (from.0 + t * dx).round() as i64 - offset;
            let y = (from.1 + t * dy).round() as i64 - offset;
            self.fill_rect(x, y, thickness, thickness, color);
        }
        phase + length
    }

    /// Draws `marker` centred on `(x, y)` with "radius" `size`.
    pub fn marker(&mut self, x: f64, y: f64, marker: Marker, size: i64, color: Rgb) {
        let (cx, cy) = (x.round() as i64, y.round() as i64);
        for dy in -size..=size {
            for dx in -size..=size {
                let inside = match marker {
                    Marker::Circle => dx * dx + dy * dy <= size * size + size / 2,
                    Marker::Square => dx.abs() < size && dy.abs() < size,
                    Marker::Diamond => dx.abs() + dy.abs() <= size,
                    Marker::TriangleUp => dy > -size && 2 * dx.abs() <= dy + size,
                    Marker::TriangleDown => dy < size && 2 * dx.abs() <= size - dy,
                    Marker::Cross => (dx.abs() - dy.abs()).abs() <= 1,
                    Marker::Plus => dx.abs() <= 1 || dy.abs() <= 1,
                };
                if inside {
                    self.set(cx + dx, cy + dy, color);
                }
            }
        }
    }

    /// Draws `text` with its top-left corner at `(x, y)`, each font pixel `scale` x `scale`.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let left = x + i as i64 * GLYPH_ADVANCE * scale;
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..GLYPH_WIDTH {
                    if bits.as_bytes()[col as usize] == b'#' {
                        self.fill_rect(
                            left + col * scale,
                            y + row as i64 * scale,
                            scale,
                            scale,
                            color,
                        );
                    }
                }
            }
        }
    }

    /// Draws `text` rotated a quarter turn counter-clockwise (reading upwards), its baseline
    /// side to the right: `(x, y)` is the bottom-left corner of the rotated box.
    pub fn text_up(&mut self, x: i64, y: i64, text: &str, scale: i64, color: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let bottom = y - i as i64 * GLYPH_ADVANCE * scale;
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..GLYPH_WIDTH {
                    if bits.as_bytes()[col as usize] == b'#' {
                        self.fill_rect(
                            x + row as i64 * scale,
                            bottom - (col + 1) * scale,
                            scale,
                            scale,
                            color,
                        );
                    }
                }
            }
        }
    }

    /// The canvas as a PNG file.
    pub fn to_png(&self) -> Vec<u8> {
        encode_png(self.width as u32, self.height as u32, &self.pixels)
    }
}

/// Width in pixels of `text` at `scale` (no trailing gap).
pub fn text_width(text: &str, scale: i64) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * GLYPH_ADVANCE - (GLYPH_ADVANCE - GLYPH_WIDTH)) * scale
    }
}

/// Height of a line of text at `scale` (cap height; descenders hang below).
pub fn text_height(scale: i64) -> i64 {
    7 * scale
}

/// Point markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// A filled disc.
    Circle,
    /// A filled square.
    Square,
    /// A filled diamond.
    Diamond,
    /// A filled triangle pointing up.
    TriangleUp,
    /// A filled triangle pointing down.
    TriangleDown,
    /// An x.
    Cross,
    /// A +.
    Plus,
}

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

const GLYPH_WIDTH: i64 = 5;
const GLYPH_ADVANCE: i64 = 6;

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

/// Rows of a 5-wide glyph (`#` = ink); 7 rows, 9 for descenders. Lower-case letters have their
/// own glyphs; anything unknown is drawn as `?`.
fn glyph(c: char) -> &'static [&'static str] {
    match c {
        '0' => &[
            ".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.",
        ],
        '1' => &[
            "..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        '2' => &[
            ".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####",
        ],
        '3' => &[
            "#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###.",
        ],
        '4' => &[
            "...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#.",
        ],
        '5' => &[
            "#####", "#....", "####.", "....#", "....#", "#...#", ".###.",
        ],
        '6' => &[
            "..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###.",
        ],
        '7' => &[
            "#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#...",
        ],
        '8' => &[
            ".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###.",
        ],
        '9' => &[
            ".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##..",
        ],
        'A' => &[
            ".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'B' => &[
            "####.", "#...#", "#...#", "####.", "#...#", "#...#", "####.",
        ],
        'C' => &[
            ".###.", "#...#", "#....", "#....", "#....", "#...#", ".###.",
        ],
        'D' => &[
            "###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###..",
        ],
        'E' => &[
            "#####", "#....", "#....", "####.", "#....", "#....", "#####",
        ],
        'F' => &[
            "#####", "#....", "#....", "####.", "#....", "#....", "#....",
        ],
        'G' => &[
            ".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####",
        ],
        'H' => &[
            "#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#",
        ],
        'I' => &[
            ".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        'J' => &[
            "..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##..",
        ],
        'K' => &[
            "#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#",
        ],
        'L' => &[
            "#....", "#....", "#....", "#....", "#....", "#....", "#####",
        ],
        'M' => &[
            "#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#",
        ],
        'N' => &[
            "#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#",
        ],
        'O' => &[
            ".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'P' => &[
            "####.", "#...#", "#...#", "####.", "#....", "#....", "#....",
        ],
        'Q' => &[
            ".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#",
        ],
        'R' => &[
            "####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#",
        ],
        'S' => &[
            ".####", "#....", "#....", ".###.", "....#", "....#", "####.",
        ],
        'T' => &[
            "#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#..",
        ],
        'U' => &[
            "#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.",
        ],
        'V' => &[
            "#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#..",
        ],
        'W' => &[
            "#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#.",
        ],
        'X' => &[
            "#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#",
        ],
        'Y' => &[
            "#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#..",
        ],
        'Z' => &[
            "#####", "....#", "...#.", "..#..", ".#...", "#....", "#####",
        ],
        'a' => &[
            ".....", ".....", ".###.", "....#", ".####", "#...#", ".####",
        ],
        'b' => &[
            "#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####.",
        ],
        'c' => &[
            ".....", ".....", ".###.", "#....", "#....", "#...#", ".###.",
        ],
        'd' => &[
            "....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####",
        ],
        'e' => &[
            ".....", ".....", ".###.", "#...#", "#####", "#....", ".###.",
        ],
        'f' => &[
            "..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#...",
        ],
        'g' => &[
            ".....", ".....", ".####", "#...#", "#...#", "#...#", ".####", "....#", ".###.",
        ],
        'h' => &[
            "#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#",
        ],
        'i' => &[
            "..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###.",
        ],
        'j' => &[
            "...#.", ".....", "..##.", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##..",
        ],
        'k' => &[
            "#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#.",
        ],
        'l' => &[
            ".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.",
        ],
        'm' => &[
            ".....", ".....", "##.#.", "#.#.#", "#.#.#", "#.#.#", "#.#.#",
        ],
        'n' => &[
            ".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#",
        ],
        'o' => &[
            ".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###.",
        ],
        'p' => &[
            ".....", ".....", "####.", "#...#", "#...#", "#...#", "####.", "#....", "#....",
        ],
        'q' => &[
            ".....", ".....", ".####", "#...#", "#...#", "#...#", ".####", "....#", "....#",
        ],
        'r' => &[
            ".....", ".....", "#.##.", "##..#", "#....", "#....", "#....",
        ],
        's' => &[
            ".....", ".....", ".####", "#....", ".###.", "....#", "####.",
        ],
        't' => &[
            ".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##.",
        ],
        'u' => &[
            ".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#",
        ],
        'v' => &[
            ".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#..",
        ],
        'w' => &[
            ".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#.",
        ],
        'x' => &[
            ".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#",
        ],
        'y' => &[
            ".....", ".....", "#...#", "#...#", "#...#", "#...#", ".####", "....#", ".###.",
        ],
        'z' => &[
            ".....", ".....", "#####", "...#.", "..#..", ".#...", "#####",
        ],
        ' ' => &[
            ".....", ".....", ".....", ".....", ".....", ".....", ".....",
        ],
        '_' => &[
            ".....", ".....", ".....", ".....", ".....", ".....", ".....", "#####",
        ],
        '.' => &[
            ".....", ".....", ".....", ".....", ".....", ".##..", ".##..",
        ],
        ',' => &[
            ".....", ".....", ".....", ".....", ".....", ".##..", "..#..", ".#...",
        ],
        '-' => &[
            ".....", ".....", ".....", ".###.", ".....", ".....", ".....",
        ],
        ':' => &[
            ".....", ".##..", ".##..", ".....", ".##..", ".##..", ".....",
        ],
        ';' => &[
            ".....", ".##..", ".##..", ".....", ".##..", ".##..", "..#..", ".#...",
        ],
        '/' => &[
            ".....", "....#", "...#.", "..#..", ".#...", "#....", ".....",
        ],
        '(' => &[
            "...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#.",
        ],
        ')' => &[
            ".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#...",
        ],
        '[' => &[
            ".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###.",
        ],
        ']' => &[
            ".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###.",
        ],
        '=' => &[
            ".....", ".....", "#####", ".....", "#####", ".....", ".....",
        ],
        '+' => &[
            ".....", "..#..", "..#..", "#####", "..#..", "..#..", ".....",
        ],
        '*' => &[
            ".....", "..#..", "#.#.#", ".###.", "#.#.#", "..#..", ".....",
        ],
        '%' => &[
            "##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##",
        ],
        '#' => &[
            ".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#.",
        ],
        '<' => &[
            "...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#.",
        ],
        '>' => &[
            ".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#...",
        ],
        '!' => &[
            "..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#..",
        ],
        '\'' => &[
            "..#..", "..#..", ".#...", ".....", ".....", ".....", ".....",
        ],
        '"' => &[
            ".#.#.", ".#.#.", ".....", ".....", ".....", ".....", ".....",
        ],
        c if c.is_ascii_lowercase() => glyph(c.to_ascii_uppercase()),
        _ => &[
            ".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#..",
        ],
    }
}

/// Encodes 8-bit RGB pixels (`width * height * 3` bytes, rows top to bottom) as a PNG.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let row = width as usize * 3;
    assert_eq!(rgb.len(), row * height as usize, "pixel buffer size");
    // Scanlines, each with filter type 0 (none).
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for line in rgb.chunks(row.max(1)).take(height as usize) {
        raw.push(0);
        raw.extend_from_slice(line);
    }

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    write_chunk(&mut png, b"IHDR", &ihdr);
    write_chunk(&mut png, b"IDAT", &zlib_stored(&raw));
    write_chunk(&mut png, b"IEND", &[]);
    png
}

fn write_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream of uncompressed ("stored") deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    const MAX_BLOCK: usize = 65_535;
    let blocks = data.len().div_ceil(MAX_BLOCK).max(1);
    let mut out = Vec::with_capacity(data.len() + blocks * 5 + 6);
    // CMF: deflate, 32 KiB window; FLG: no dictionary, check bits so CMF*256+FLG is a multiple of 31.
    out.extend_from_slice(&[0x78, 0x01]);
    let mut chunks = data.chunks(MAX_BLOCK).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(u8::from(last)); // BFINAL, BTYPE = 00 (stored)
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// zlib's Adler-32 checksum.
fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that can be summed before b could overflow.
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
};

/// The CRC-32 of PNG chunks (ISO 3309, as zlib's `crc32`).
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &byte in data {
        c = CRC_TABLE[((c ^ u32::from(byte)) & 0xff) as usize] ^ (c >> 8);
    }
    c ^ 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be32(bytes: &[u8]) -> u32 {
        u32::from_be_bytes(bytes[..4].try_into().unwrap())
    }

    /// Inflates a zlib stream made only of stored blocks, checking header and Adler-32.
    fn inflate_stored(zlib: &[u8]) -> Vec<u8> {
        let (cmf, flg) = (zlib[0], zlib[1]);
        assert_eq!(cmf & 0x0f, 8, "deflate");
        assert_eq!((u16::from(cmf) * 256 + u16::from(flg)) % 31, 0, "FCHECK");
        assert_eq!(flg & 0x20, 0, "no preset dictionary");
        let mut at = 2;
        let mut out = Vec::new();
        loop {
            let header = zlib[at];
            assert_eq!((header >> 1) & 3, 0, "stored block");
            let len = u16::from_le_bytes([zlib[at + 1], zlib[at + 2]]);
            let nlen = u16::from_le_bytes([zlib[at + 3], zlib[at + 4]]);
            assert_eq!(len, !nlen, "LEN/NLEN");
            at += 5;
            out.extend_from_slice(&zlib[at..at + len as usize]);
            at += len as usize;
            if header & 1 == 1 {
                break;
            }
        }
        assert_eq!(be32(&zlib[at..]), adler32(&out), "Adler-32");
        assert_eq!(at + 4, zlib.len(), "nothing after the checksum");
        out
    }

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
        assert_eq!(adler32(&[]), 1);
    }

    #[test]
    fn png_chunks_have_valid_crcs_and_inflate_to_the_pixels() {
        // Big enough for two stored blocks (> 65535 bytes of scanlines).
        let (w, h) = (200usize, 120usize);
        let mut canvas = Canvas::new(w, h, WHITE);
        canvas.fill_rect(10, 10, 50, 20, [200, 30, 40]);
        canvas.text(5, 60, "Abc 0.5 GiB", 2, BLACK);
        canvas.line(
            (0.0, 119.0),
            (199.0, 0.0),
            [0, 90, 200],
            2,
            Some((5.0, 3.0)),
            0.0,
        );
        let png = canvas.to_png();

        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut at = 8;
        let mut kinds = Vec::new();
        let mut idat = Vec::new();
        let mut ihdr = Vec::new();
        while at < png.len() {
            let len = be32(&png[at..]) as usize;
            let kind = &png[at + 4..at + 8];
            let data = &png[at + 8..at + 8 + len];
            let crc = be32(&png[at + 8 + len..]);
            assert_eq!(crc, crc32(&png[at + 4..at + 8 + len]), "CRC of {kind:?}");
            match kind {
                b"IHDR" => ihdr = data.to_vec(),
                b"IDAT" => idat.extend_from_slice(data),
                _ => {}
            }
            kinds.push(String::from_utf8(kind.to_vec()).unwrap());
            at += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        assert_eq!(be32(&ihdr[0..]), w as u32);
        assert_eq!(be32(&ihdr[4..]), h as u32);
        assert_eq!(&ihdr[8..], &[8, 2, 0, 0, 0]);

        let raw = inflate_stored(&idat);
        assert_eq!(raw.len(), h * (1 + 3 * w));
        for (y, line) in raw.chunks(1 + 3 * w).enumerate() {
            assert_eq!(line[0], 0, "filter type of row {y}");
            for x in 0..w {
                assert_eq!(&line[1 + 3 * x..4 + 3 * x], &canvas.get(x, y));
            }
        }
        assert_eq!(canvas.get(20, 15), [200, 30, 40]);
    }

    #[test]
    fn empty_image_still_has_a_final_block() {
        let png = encode_png(0, 0, &[]);
        let idat_len = be32(&png[33..]) as usize;
        assert_eq!(inflate_stored(&png[41..41 + idat_len]).len(), 0);
    }

    #[test]
    fn every_glyph_is_five_wide() {
        for c in ' '..='~' {
            let rows = glyph(c);
            assert!(
                rows.len() == 7 || rows.len() == 8 || rows.len() == 9,
                "{c:?}"
            );
            assert!(rows.iter().all(|r| r.len() == 5), "{c:?}");
        }
    }

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
