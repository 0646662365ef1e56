//! Just enough plotting for cachet's reports (`cachet kv-memory`, `cachet denoise`, the diffusion
//! steps mask), with no heavy dependencies: an RGB [`Canvas`], a 5x7 bitmap font covering
//! printable ASCII, a [`LineChart`] with axes, ticks and a legend, and a PNG encoder
//! ([`encode_png`]; stored deflate blocks inside zlib, so no compressor is needed).
//!
//! ```
//! use cachet_plot::{LineChart, Marker, Series};
//!
//! let chart = LineChart {
//!     title: "Squares".into(),
//!     subtitle: "y = x^2".into(),
//!     x_label: "x".into(),
//!     y_label: "y".into(),
//!     x_pow2_ticks: false,
//!     series: vec![Series {
//!         name: "x^2".into(),
//!         color: [31, 119, 180],
//!         dashed: false,
//!         marker: Marker::Circle,
//!         marker_size: 4,
//!         points: (0..=8).map(|x| (f64::from(x), f64::from(x * x))).collect(),
//!     }],
//!     notes: vec![],
//! };
//! let png = chart.render(640, 400).to_png();
//! assert!(png.starts_with(b"\x89PNG"));
//! ```

mod canvas;
mod chart;
mod font;
mod png;

pub use canvas::{Canvas, Marker, Rgb, WHITE};
pub use chart::{LineChart, Series};
pub use font::text_width;
pub use png::{PngError, encode_png};
