//! [`Canvas`]: an RGB image in memory with rectangles, lines, markers and text.

use crate::font::{GLYPH_ADVANCE, GLYPH_WIDTH, glyph};
use crate::png::write_png;

/// An 8-bit RGB colour.
pub type Rgb = [u8; 3];

/// White.
pub const WHITE: Rgb = [255, 255, 255];
/// Black.
pub(crate) const BLACK: Rgb = [0, 0, 0];

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

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The colour of one pixel; `None` outside the canvas.
    pub fn get(&self, x: usize, y: usize) -> Option<Rgb> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let at = (y * self.width + x) * 3;
        Some([self.pixels[at], self.pixels[at + 1], self.pixels[at + 2]])
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
        // The buffer holds exactly width x height pixels by construction.
        write_png(self.width as u32, self.height as u32, &self.pixels)
    }
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
