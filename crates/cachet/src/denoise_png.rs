//! The images `cachet denoise --out` writes: the digits model's cached and uncached digits and
//! their amplified difference, or for other models an RGB view of the final latents.

use cachet_plot::{Canvas, Rgb, WHITE};

use crate::denoise_cmd::{DATA_RANGE, Judged};

/// How much the difference panel amplifies |cached - uncached|.
const DIFF_GAIN: f32 = 4.0;

/// The digits as a person judges them: cached, uncached and their amplified difference, each
/// pixel a `zoom` x `zoom` square, captions above and the classifier's reading below.
pub(crate) fn digits_png(method: &str, j: &Judged) -> Vec<u8> {
    let ink = |v: f32| -> Rgb {
        let g = (255.0 * (1.0 - (v.clamp(-1.0, 1.0) + 1.0) / 2.0)).round() as u8;
        [g, g, g]
    };
    let heat = |d: f32| -> Rgb {
        let t = (d * DIFF_GAIN / DATA_RANGE as f32).clamp(0.0, 1.0);
        let g = (255.0 * (1.0 - t)).round() as u8;
        [255, g, g]
    };
    let mut panels: Vec<(String, Vec<String>, Vec<Rgb>)> = vec![(
        method.to_string(),
        vec![format!("read as {}", j.predicted)],
        j.image.pixels.iter().map(|&v| ink(v)).collect(),
    )];
    if let Some(u) = &j.uncached {
        panels.push((
            "uncached".into(),
            vec![format!("read as {}", u.predicted)],
            u.image.pixels.iter().map(|&v| ink(v)).collect(),
        ));
        let diff = u
            .image
            .pixels
            .iter()
            .zip(&j.image.pixels)
            .map(|(a, b)| heat((a - b).abs()))
            .collect();
        let quality = if u.psnr.is_finite() {
            vec![
                format!("PSNR {:.1} dB", u.psnr),
                format!("SSIM {:.4}", u.ssim),
            ]
        } else {
            vec!["identical".into()]
        };
        panels.push((format!("|diff| x{DIFF_GAIN}"), quality, diff));
    }
    let (w, h) = (j.image.width, j.image.height);
    let zoom = (192 / w.max(h).max(1)).max(1);
    let (gap, top, line) = (12, 30, 18);
    let bottom = 8 + 2 * line + 14;
    let width = panels.len() * (w * zoom + gap) + gap;
    let height = top + h * zoom + bottom;
    let mut canvas = Canvas::new(width, height, WHITE);
    let text = [30, 30, 30];
    for (i, (title, captions, pixels)) in panels.iter().enumerate() {
        let x0 = gap + i * (w * zoom + gap);
        canvas.text(x0 as i64, 8, title, 2, text);
        canvas.fill_rect(
            x0 as i64 - 1,
            top as i64 - 1,
            (w * zoom) as i64 + 2,
            (h * zoom) as i64 + 2,
            [180, 180, 180],
        );
        for y in 0..h {
            for x in 0..w {
                canvas.fill_rect(
                    (x0 + x * zoom) as i64,
                    (top + y * zoom) as i64,
                    zoom as i64,
                    zoom as i64,
                    pixels[y * w + x],
                );
            }
        }
        for (k, caption) in captions.iter().enumerate() {
            let y = top + h * zoom + 8 + k * line;
            canvas.text(x0 as i64, y as i64, caption, 2, text);
        }
    }
    let note = format!(
        "label {}; 'read as': the digit classifier's verdict; difference amplified {DIFF_GAIN}x",
        j.label
    );
    canvas.text(gap as i64, height as i64 - 12, &note, 1, [110, 110, 110]);
    canvas.to_png()
}

/// Latents of a text model: cached, uncached and their difference, each channel min-max
/// normalised.
pub(crate) fn latents_png(
    method: &str,
    image: &dyn Fn(&[f32], [usize; 3]) -> FloatImage,
    (cached, dims): (&[f32], [usize; 3]),
    reference: Option<(&[f32], [usize; 3])>,
) -> Vec<u8> {
    let mut panels = vec![(method.to_string(), image(cached, dims))];
    if let Some((r, r_dims)) = reference {
        panels.push(("uncached".to_string(), image(r, r_dims)));
        let diff: Vec<f32> = r.iter().zip(cached).map(|(a, b)| (a - b).abs()).collect();
        panels.push(("|difference|".to_string(), image(&diff, r_dims)));
    }
    panels_png(&panels)
}

/// Flux latents `[1, (h/2)(w/2), 4C]` unpacked (`_unpack_latents`) to an RGB view of channels 0–2.
pub(crate) fn flux_image(
    latents: &[f32],
    _dims: [usize; 3],
    h: usize,
    w: usize,
    packed: usize,
) -> FloatImage {
    // A DiT with fewer than 4 packed channels still has channel 0: show it in every colour.
    let c = (packed / 4).max(1);
    let stride = packed / c;
    let at = |ch: usize, y: usize, x: usize| {
        let token = (y / 2) * (w / 2) + x / 2;
        let sub = (y % 2) * 2 + x % 2;
        latents[token * packed + ch * stride + sub.min(stride - 1)]
    };
    let mut pixels = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            pixels.push([at(0, y, x), at(1.min(c - 1), y, x), at(2.min(c - 1), y, x)]);
        }
    }
    (w, h, pixels)
}

/// The first frame of CogVideoX latents `[1, F, C·H·W]`, channels 0–2.
pub(crate) fn video_frame_image(latents: &[f32], c: usize, h: usize, w: usize) -> FloatImage {
    let at = |ch: usize, y: usize, x: usize| latents[(ch.min(c - 1) * h + y) * w + x];
    let pixels = (0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .map(|(y, x)| [at(0, y, x), at(1, y, x), at(2, y, x)])
        .collect();
    (w, h, pixels)
}

/// An RGB image as floats: width, height, pixels row by row.
pub(crate) type FloatImage = (usize, usize, Vec<[f32; 3]>);

/// Side-by-side panels, each channel min-max normalised, upscaled to at least 192 px.
fn panels_png(panels: &[(String, FloatImage)]) -> Vec<u8> {
    let zoom = panels
        .first()
        .map_or(1, |(_, (w, h, _))| (192 / (*w).max(*h).max(1)).max(1));
    let (gap, top) = (8, 28);
    let width: usize = panels
        .iter()
        .map(|(_, (w, _, _))| w * zoom + gap)
        .sum::<usize>()
        + gap;
    let height = panels
        .iter()
        .map(|(_, (_, h, _))| h * zoom)
        .max()
        .unwrap_or(0)
        + top
        + gap;
    let mut canvas = Canvas::new(width, height, WHITE);
    let mut x0 = gap;
    for (title, (w, h, pixels)) in panels {
        canvas.text(x0 as i64, 8, title, 2, [30, 30, 30]);
        let mut lo = [f32::INFINITY; 3];
        let mut hi = [f32::NEG_INFINITY; 3];
        for p in pixels {
            for k in 0..3 {
                lo[k] = lo[k].min(p[k]);
                hi[k] = hi[k].max(p[k]);
            }
        }
        for y in 0..*h {
            for x in 0..*w {
                let p = pixels[y * w + x];
                let color: Rgb = std::array::from_fn(|k| {
                    let span = (hi[k] - lo[k]).max(1e-12);
                    (((p[k] - lo[k]) / span) * 255.0).round() as u8
                });
                canvas.fill_rect(
                    (x0 + x * zoom) as i64,
                    (top + y * zoom) as i64,
                    zoom as i64,
                    zoom as i64,
                    color,
                );
            }
        }
        x0 += w * zoom + gap;
    }
    canvas.to_png()
}
