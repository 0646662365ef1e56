//! A 2-D discrete Fourier transform over the last two dimensions, as four real matrix
//! products with cosine/sine tables, so FasterCache's frequency split stays on the device
//! (burn has no FFT; latent planes are small, and matmuls are what every backend does well).

use burn::tensor::{Device, Tensor, TensorData};

/// A complex tensor as real and imaginary parts, `[N, C, H, W]`.
#[derive(Clone, Debug)]
pub(crate) struct Spectrum {
    pub re: Tensor<4>,
    pub im: Tensor<4>,
}

impl Spectrum {
    pub(crate) fn mul_scalar(self, w: f64) -> Self {
        Self {
            re: self.re * w,
            im: self.im * w,
        }
    }

    pub(crate) fn mask(&self, mask: &Tensor<4>) -> Self {
        Self {
            re: self.re.clone() * mask.clone(),
            im: self.im.clone() * mask.clone(),
        }
    }

    pub(crate) fn sub(self, other: Self) -> Self {
        Self {
            re: self.re - other.re,
            im: self.im - other.im,
        }
    }

    pub(crate) fn add(self, other: Self) -> Self {
        Self {
            re: self.re + other.re,
            im: self.im + other.im,
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        cachet_tensor::tensor_bytes(&self.re) + cachet_tensor::tensor_bytes(&self.im)
    }
}

/// Cosine and sine tables of an `n`-point DFT, `[n, n]` (both symmetric).
fn tables(n: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let mut cos = Vec::with_capacity(n * n);
    let mut sin = Vec::with_capacity(n * n);
    for k in 0..n {
        for j in 0..n {
            // Reduce k*j mod n first so large planes keep full precision.
            let angle = 2.0 * std::f64::consts::PI * ((k * j) % n) as f64 / n as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [n, n]), device),
        Tensor::from_data(TensorData::new(sin, [n, n]), device),
    )
}

/// `x · M` over the last dimension.
fn right(x: &Tensor<4>, m: &Tensor<2>) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    x.clone()
        .reshape([n * c * h, w])
        .matmul(m.clone())
        .reshape([n, c, h, w])
}

/// `M · x` over the second-to-last dimension (`M` symmetric).
fn left(x: &Tensor<4>, m: &Tensor<2>) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    x.clone()
        .swap_dims(2, 3)
        .reshape([n * c * w, h])
        .matmul(m.clone())
        .reshape([n, c, w, h])
        .swap_dims(2, 3)
}

/// DFT tables for one plane size.
#[derive(Clone, Debug)]
pub(crate) struct Dft2 {
    cos_h: Tensor<2>,
    sin_h: Tensor<2>,
    cos_w: Tensor<2>,
    sin_w: Tensor<2>,
    h: usize,
    w: usize,
}

impl Dft2 {
    pub(crate) fn new(h: usize, w: usize, device: &Device) -> Self {
        let (cos_h, sin_h) = tables(h, device);
        let (cos_w, sin_w) = tables(w, device);
        Self {
            cos_h,
            sin_h,
            cos_w,
            sin_w,
            h,
            w,
        }
    }

    /// Whether the tables fit planes of `h` x `w`.
    pub(crate) fn fits(&self, h: usize, w: usize) -> bool {
        self.h == h && self.w == w
    }

    /// `torch.fft.fft2(x)` of a real `x`.
    pub(crate) fn forward(&self, x: &Tensor<4>) -> Spectrum {
        let xc = right(x, &self.cos_w);
        let xs = right(x, &self.sin_w);
        let re = left(&xc, &self.cos_h) - left(&xs, &self.sin_h);
        let im = -(left(&xc, &self.sin_h) + left(&xs, &self.cos_h));
        Spectrum { re, im }
    }

    /// `torch.fft.ifft2(z).real`.
    pub(crate) fn inverse_real(&self, z: &Spectrum) -> Tensor<4> {
        let rc = right(&z.re, &self.cos_w);
        let rs = right(&z.re, &self.sin_w);
        let ic = right(&z.im, &self.cos_w);
        let is = right(&z.im, &self.sin_w);
        let out = left(&rc, &self.cos_h)
            - left(&ic, &self.sin_h)
            - left(&is, &self.cos_h)
            - left(&rs, &self.sin_h);
        out / (self.h * self.w) as f64
    }
}

/// FasterCache's low-frequency disc (radius `min(h, w) / 5` around the centre of the shifted
/// spectrum), returned in unshifted coordinates, `[1, 1, h, w]` of 0/1. `fftshift` moves index
/// `k` to `(k + n/2) mod n`, so the unshifted mask reads the shifted one there; shifting is then
/// never needed (diffusers shifts and unshifts every dimension, which cancels out).
pub(crate) fn low_frequency_mask(h: usize, w: usize, device: &Device) -> Tensor<4> {
    let radius = (h.min(w) / 5) as i64;
    let (cy, cx) = ((h / 2) as i64, (w / 2) as i64);
    let mut values = vec![0f32; h * w];
    for ky in 0..h {
        for kx in 0..w {
            let sy = ((ky + h / 2) % h) as i64;
            let sx = ((kx + w / 2) % w) as i64;
            if (sx - cx).pow(2) + (sy - cy).pow(2) <= radius * radius {
                values[ky * w + kx] = 1.0;
            }
        }
    }
    Tensor::from_data(TensorData::new(values, [1, 1, h, w]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dft(x: &[f32], h: usize, w: usize) -> (Vec<f64>, Vec<f64>) {
        let mut re = vec![0.0; h * w];
        let mut im = vec![0.0; h * w];
        for ky in 0..h {
            for kx in 0..w {
                for y in 0..h {
                    for xx in 0..w {
                        let a = -2.0
                            * std::f64::consts::PI
                            * (ky as f64 * y as f64 / h as f64 + kx as f64 * xx as f64 / w as f64);
                        re[ky * w + kx] += x[y * w + xx] as f64 * a.cos();
                        im[ky * w + kx] += x[y * w + xx] as f64 * a.sin();
                    }
                }
            }
        }
        (re, im)
    }

    #[test]
    fn matches_a_naive_dft_and_round_trips() {
        let device = Device::default();
        let (h, w) = (5, 6);
        let values: Vec<f32> = (0..h * w).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let x: Tensor<4> =
            Tensor::from_data(TensorData::new(values.clone(), [1, 1, h, w]), &device);
        let dft = Dft2::new(h, w, &device);
        let spec = dft.forward(&x);
        let (re, im) = naive_dft(&values, h, w);
        let got_re: Vec<f32> = spec.re.clone().into_data().try_into_vec().unwrap();
        let got_im: Vec<f32> = spec.im.clone().into_data().try_into_vec().unwrap();
        for i in 0..h * w {
            assert!((got_re[i] as f64 - re[i]).abs() < 1e-3, "re {i}");
            assert!((got_im[i] as f64 - im[i]).abs() < 1e-3, "im {i}");
        }
        let back: Vec<f32> = dft.inverse_real(&spec).into_data().try_into_vec().unwrap();
        for i in 0..h * w {
            assert!((back[i] - values[i]).abs() < 1e-4);
        }
    }

    #[test]
    fn low_mask_is_the_shifted_disc() {
        let device = Device::default();
        // 10x10: radius 2, centre (5, 5) shifted = DC at (0, 0) unshifted.
        let mask: Vec<f32> = low_frequency_mask(10, 10, &device)
            .into_data()
            .try_into_vec()
            .unwrap();
        assert_eq!(mask[0], 1.0);
        assert_eq!(mask[2], 1.0); // (0, 2): distance 2
        assert_eq!(mask[3], 0.0);
        assert_eq!(mask[9 * 10 + 9], 1.0); // (-1, -1): distance sqrt 2
        assert_eq!(mask.iter().filter(|v| **v == 1.0).count(), 13);
    }
}
