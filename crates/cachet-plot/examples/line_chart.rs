//! Draws a small line chart and writes it as a PNG to the path given as the first argument, or to
//! `cachet-plot-example.png` in the temporary directory.

use std::path::PathBuf;

use cachet_plot::{Canvas, LineChart, Marker, Series, text_width};

fn main() -> std::io::Result<()> {
    let path = std::env::args_os().nth(1).map_or_else(
        || std::env::temp_dir().join("cachet-plot-example.png"),
        PathBuf::from,
    );

    let chart = LineChart {
        title: "KV cache bytes vs tokens".into(),
        subtitle: "dense | 4-bit {per-group scales} ~ illustrative numbers".into(),
        x_label: "context length (tokens)".into(),
        y_label: "memory (MiB)".into(),
        x_pow2_ticks: true,
        series: vec![
            Series {
                name: "dense f16".into(),
                color: [31, 119, 180],
                dashed: false,
                marker: Marker::Circle,
                marker_size: 5,
                points: (0..=8)
                    .map(|i| (f64::from(i * 512), f64::from(i) * 12.0))
                    .collect(),
            },
            Series {
                name: "quantized 4-bit".into(),
                color: [214, 39, 40],
                dashed: true,
                marker: Marker::TriangleUp,
                marker_size: 5,
                points: (0..=8)
                    .map(|i| (f64::from(i * 512), f64::from(i) * 3.5 + 1.0))
                    .collect(),
            },
        ],
        notes: vec!["(sliding window not built)".into()],
    };
    let (width, height) = (1200, 600);
    let mut canvas: Canvas = chart.render(width, height);
    // Free-form text on the rendered canvas, bottom right.
    let stamp = format!("cachet-plot @ {width}x{height}");
    canvas.text(
        canvas.width() as i64 - text_width(&stamp, 1) - 8,
        canvas.height() as i64 - 16,
        &stamp,
        1,
        [120, 120, 120],
    );

    std::fs::write(&path, canvas.to_png())?;
    println!("wrote {}", path.display());
    Ok(())
}
