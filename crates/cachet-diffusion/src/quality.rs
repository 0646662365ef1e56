//! Image quality of a cached run against the uncached one: PSNR and SSIM on decoded grayscale
//! images (what cache-dit reports), next to the latent PSNR of [`latent_psnr`](crate::latent_psnr).

use crate::error::{DiffusionError, Result};

/// A grayscale image, row by row.
#[derive(Clone, Debug, PartialEq)]
pub struct GrayImage {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// `height * width` values, row-major.
    pub pixels: Vec<f32>,
}

impl GrayImage {
    /// An image from row-major pixels; their count must be `width * height`.
    pub fn new(width: usize, height: usize, pixels: Vec<f32>) -> Result<Self> {
        if width.checked_mul(height) != Some(pixels.len()) {
            return Err(DiffusionError::InvalidOption {
                field: "pixels",
                reason: format!("{} values for a {width}x{height} image", pixels.len()),
            });
        }
        Ok(Self {
            width,
            height,
            pixels,
        })
    }

    /// The pixel at row `y`, column `x`.
    pub fn at(&self, y: usize, x: usize) -> f32 {
        self.pixels[y * self.width + x]
    }
}

/// Side of SSIM's Gaussian window (Wang et al. 2004).
pub const SSIM_WINDOW: usize = 11;
/// Standard deviation of SSIM's Gaussian window.
pub const SSIM_SIGMA: f64 = 1.5;
const SSIM_K1: f64 = 0.01;
const SSIM_K2: f64 = 0.03;

fn same_size(a: &GrayImage, b: &GrayImage) -> Result<()> {
    if (a.width, a.height) != (b.width, b.height) {
        return Err(DiffusionError::InvalidOption {
            field: "image",
            reason: format!(
                "a {}x{} image compared with a {}x{} one",
                a.width, a.height, b.width, b.height
            ),
        });
    }
    Ok(())
}

fn check_range(data_range: f64) -> Result<()> {
    if data_range.is_nan() || data_range <= 0.0 {
        return Err(DiffusionError::InvalidOption {
            field: "data_range",
            reason: format!("{data_range}: must be positive"),
        });
    }
    Ok(())
}

/// `10 log10(data_range² / MSE)` in dB; infinite for identical images. `data_range` is the span
/// of valid pixel values (2 for images in [-1, 1]).
pub fn psnr(reference: &GrayImage, other: &GrayImage, data_range: f64) -> Result<f64> {
    same_size(reference, other)?;
    check_range(data_range)?;
    let n = reference.pixels.len().max(1) as f64;
    let mse = reference
        .pixels
        .iter()
        .zip(&other.pixels)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        / n;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (data_range * data_range / mse).log10()
    })
}

/// The normalised 11x11 Gaussian window (sigma 1.5), row-major.
fn gaussian_window() -> Vec<f64> {
    let half = (SSIM_WINDOW as f64 - 1.0) / 2.0;
    let g: Vec<f64> = (0..SSIM_WINDOW)
        .map(|i| {
            let x = i as f64 - half;
            (-(x * x) / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp()
        })
        .collect();
    let sum: f64 = g.iter().sum();
    let mut w = Vec::with_capacity(SSIM_WINDOW * SSIM_WINDOW);
    for gy in &g {
        for gx in &g {
            w.push(gy * gx / (sum * sum));
        }
    }
    w
}

/// Mean structural similarity (Wang et al. 2004): local means, variances and covariance under an
/// 11x11 Gaussian window (sigma 1.5), `C1 = (0.01 L)²`, `C2 = (0.03 L)²` with `L = data_range`,
/// averaged over every position where the window lies inside the image. 1 for identical images;
/// images smaller than the window are an error.
pub fn ssim(reference: &GrayImage, other: &GrayImage, data_range: f64) -> Result<f64> {
    same_size(reference, other)?;
    check_range(data_range)?;
    let k = SSIM_WINDOW;
    if reference.width < k || reference.height < k {
        return Err(DiffusionError::InvalidOption {
            field: "image",
            reason: format!(
                "{}x{}: SSIM needs at least {k}x{k} pixels (its window)",
                reference.width, reference.height
            ),
        });
    }
    let w = gaussian_window();
    let c1 = (SSIM_K1 * data_range).powi(2);
    let c2 = (SSIM_K2 * data_range).powi(2);
    let (mut total, mut count) = (0f64, 0usize);
    for y0 in 0..=reference.height - k {
        for x0 in 0..=reference.width - k {
            let (mut ma, mut mb, mut aa, mut bb, mut ab) = (0f64, 0f64, 0f64, 0f64, 0f64);
            for dy in 0..k {
                for dx in 0..k {
                    let g = w[dy * k + dx];
                    let a = reference.at(y0 + dy, x0 + dx) as f64;
                    let b = other.at(y0 + dy, x0 + dx) as f64;
                    ma += g * a;
                    mb += g * b;
                    aa += g * a * a;
                    bb += g * b * b;
                    ab += g * a * b;
                }
            }
            let (va, vb, cov) = (aa - ma * ma, bb - mb * mb, ab - ma * mb);
            total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            count += 1;
        }
    }
    Ok(total / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize, scale: f32) -> GrayImage {
        let pixels = (0..w * h)
            .map(|i| ((i % w) as f32 / w as f32 * 2.0 - 1.0) * scale)
            .collect();
        GrayImage::new(w, h, pixels).unwrap()
    }

    #[test]
    fn identical_images_are_perfect() {
        let a = ramp(16, 16, 1.0);
        assert_eq!(psnr(&a, &a, 2.0).unwrap(), f64::INFINITY);
        assert!((ssim(&a, &a, 2.0).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn psnr_of_a_constant_offset() {
        let a = GrayImage::new(2, 1, vec![0.0, 0.5]).unwrap();
        let b = GrayImage::new(2, 1, vec![0.1, 0.6]).unwrap();
        // mse 0.01, range 2: 10 log10(400) = 26.02
        assert!((psnr(&a, &b, 2.0).unwrap() - 26.0206).abs() < 1e-3);
    }

    #[test]
    fn ssim_falls_as_structure_is_lost() {
        let a = ramp(16, 16, 1.0);
        let b = ramp(16, 16, 0.5);
        let flat = GrayImage::new(16, 16, vec![0.0; 256]).unwrap();
        let half = ssim(&a, &b, 2.0).unwrap();
        let none = ssim(&a, &flat, 2.0).unwrap();
        assert!(half < 1.0 && none < half, "{half} {none}");
    }

    #[test]
    fn bad_sizes_and_ranges_are_errors() {
        let a = ramp(16, 16, 1.0);
        assert!(ssim(&a, &ramp(16, 15, 1.0), 2.0).is_err());
        assert!(ssim(&ramp(8, 8, 1.0), &ramp(8, 8, 1.0), 2.0).is_err());
        assert!(psnr(&a, &a, 0.0).is_err());
        assert!(GrayImage::new(3, 3, vec![0.0; 8]).is_err());
    }
}
