//! Host-side tables of CogVideoX: the timestep embedding, the 3D sin-cos positional table and
//! the 3D rotary frequencies, each computed with diffusers' float precisions (f32 where torch
//! computes in f32, f64 where it computes in f64) so the model matches it to rounding.

use burn::tensor::{DType, Device, Tensor, TensorData};

use super::config::CogVideoXConfig;
use cachet_nn::{ModelError, Result};

/// `get_timestep_embedding` (max period 10000, scale 1): `[n, dim]`, row-major, in f32.
pub(crate) fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> Vec<f32> {
    let half = dim / 2;
    let log_period = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (log_period * k as f32 / denom).exp())
        .collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|&f| t * f).collect();
        let (sin, cos) = (args.iter().map(|a| a.sin()), args.iter().map(|a| a.cos()));
        let start = out.len();
        if flip_sin_to_cos {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
        out.resize(start + dim, 0.0);
    }
    out
}

/// `get_1d_sincos_pos_embed_from_grid` in f64: `[pos.len(), dim]` as `[sin | cos]`.
fn sincos_1d(dim: usize, pos: &[f32]) -> Vec<Vec<f64>> {
    let half = dim / 2;
    let omega: Vec<f64> = (0..half)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / (dim as f64 / 2.0)))
        .collect();
    pos.iter()
        .map(|&p| {
            let args: Vec<f64> = omega.iter().map(|&w| p as f64 * w).collect();
            args.iter()
                .map(|a| a.sin())
                .chain(args.iter().map(|a| a.cos()))
                .collect()
        })
        .collect()
}

/// `get_3d_sincos_pos_embed` for a `frames × height × width` token grid: `[tokens, dim]` with
/// the temporal quarter first, then the spatial part (x positions, then y positions).
pub(crate) fn sincos_3d(
    dim: usize,
    frames: usize,
    height: usize,
    width: usize,
    spatial_scale: f64,
    temporal_scale: f64,
) -> Vec<f32> {
    let (dim_t, dim_s) = (dim / 4, 3 * dim / 4);
    let grid =
        |n: usize, scale: f64| -> Vec<f32> { (0..n).map(|i| i as f32 / scale as f32).collect() };
    let xs = sincos_1d(dim_s / 2, &grid(width, spatial_scale));
    let ys = sincos_1d(dim_s / 2, &grid(height, spatial_scale));
    let ts = sincos_1d(dim_t, &grid(frames, temporal_scale));
    let mut out = Vec::with_capacity(frames * height * width * dim);
    for t in &ts {
        for y in &ys {
            for x in &xs {
                out.extend(t.iter().chain(x).chain(y).map(|&v| v as f32));
            }
        }
    }
    out
}

/// The joint positional table of `CogVideoXPatchEmbed._get_positional_embeddings`:
/// `[1, max_text_seq_length + tokens, inner_dim]`, zeros over the text positions.
pub(crate) fn joint_sincos_table(
    config: &CogVideoXConfig,
    latent_frames: usize,
    height: usize,
    width: usize,
    device: &Device,
    dtype: DType,
) -> Tensor<3> {
    let dim = config.inner_dim();
    let (h, w) = (height / config.patch_size, width / config.patch_size);
    let video = sincos_3d(
        dim,
        latent_frames,
        h,
        w,
        config.spatial_interpolation_scale,
        config.temporal_interpolation_scale,
    );
    let text = config.max_text_seq_length;
    let mut data = vec![0.0f32; text * dim];
    data.extend(video);
    let tokens = data.len() / dim;
    Tensor::from_data(TensorData::new(data, [1, tokens, dim]), (device, dtype))
}

/// Cosine and sine of the 3D rotary embedding, `[video tokens, head_dim]` each (diffusers'
/// `image_rotary_emb`), applied to the video part of queries and keys.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    /// `cos`, `[tokens, head_dim]`.
    pub cos: Tensor<2>,
    /// `sin`, `[tokens, head_dim]`.
    pub sin: Tensor<2>,
}

/// `torch.linspace(start, end, steps)` in f32 (same two-sided formula as torch's CPU kernel).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// `get_1d_rotary_pos_embed(dim, pos, use_real=True, repeat_interleave_real=True)` in f32:
/// per position, `(cos, sin)` each of width `dim` (every frequency twice).
fn rotary_1d(dim: usize, pos: &[f32]) -> Vec<(Vec<f32>, Vec<f32>)> {
    let freqs: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|k| 1.0 / 10000f32.powf(k as f32 / dim as f32))
        .collect();
    pos.iter()
        .map(|&p| {
            let args: Vec<f32> = freqs.iter().map(|&f| p * f).collect();
            let twice = |g: fn(f32) -> f32| args.iter().flat_map(|&a| [g(a), g(a)]).collect();
            (twice(f32::cos), twice(f32::sin))
        })
        .collect()
}

/// `get_resize_crop_region_for_grid` of the CogVideoX pipeline (Python's `round`: ties to even).
fn resize_crop_region(
    grid: (usize, usize),
    base_width: usize,
    base_height: usize,
) -> ((f64, f64), (f64, f64)) {
    let (tw, th) = (base_width as f64, base_height as f64);
    let (h, w) = (grid.0 as f64, grid.1 as f64);
    let (resize_h, resize_w) = if h / w > th / tw {
        (th, (th / h * w).round_ties_even())
    } else {
        ((tw / w * h).round_ties_even(), tw)
    };
    let top = ((th - resize_h) / 2.0).round_ties_even();
    let left = ((tw - resize_w) / 2.0).round_ties_even();
    ((top, left), (top + resize_h, left + resize_w))
}

/// `CogVideoXPipeline._prepare_rotary_positional_embeddings` for latents of
/// `latent_frames × height × width` (latent units, before patching).
///
/// CogVideoX 1.0 (`patch_size_t` unset) centres a linspace grid in the config's sample size;
/// 1.5 slices integer positions and needs the grid to fit in the sample size.
pub(crate) fn rotary_positional_embeddings(
    config: &CogVideoXConfig,
    latent_frames: usize,
    height: usize,
    width: usize,
    device: &Device,
) -> Result<RotaryEmbedding> {
    let p = config.patch_size;
    let (grid_h, grid_w) = (height / p, width / p);
    let (base_w, base_h) = (config.sample_width / p, config.sample_height / p);
    let (ts, ys, xs) = match config.patch_size_t {
        None => {
            let ((top, left), (bottom, right)) =
                resize_crop_region((grid_h, grid_w), base_w, base_h);
            let t = latent_frames as f64;
            (
                linspace(0.0, (t * (t - 1.0) / t) as f32, latent_frames),
                linspace(
                    top as f32,
                    (bottom * (grid_h as f64 - 1.0) / grid_h as f64) as f32,
                    grid_h,
                ),
                linspace(
                    left as f32,
                    (right * (grid_w as f64 - 1.0) / grid_w as f64) as f32,
                    grid_w,
                ),
            )
        }
        Some(pt) => {
            if grid_h > base_h || grid_w > base_w {
                return Err(ModelError::Input(format!(
                    "rotary grid {grid_h}x{grid_w} exceeds the sample grid {base_h}x{base_w} \
                     (CogVideoX 1.5 slices positions from it)"
                )));
            }
            let arange = |n: usize| (0..n).map(|i| i as f32).collect::<Vec<_>>();
            (
                arange(latent_frames.div_ceil(pt)),
                arange(grid_h),
                arange(grid_w),
            )
        }
    };
    let head_dim = config.attention_head_dim;
    let (dim_t, dim_s) = (head_dim / 4, head_dim / 8 * 3);
    let (ft, fy, fx) = (
        rotary_1d(dim_t, &ts),
        rotary_1d(dim_s, &ys),
        rotary_1d(dim_s, &xs),
    );
    let tokens = ts.len() * ys.len() * xs.len();
    let width_out = dim_t + 2 * dim_s;
    let (mut cos, mut sin) = (
        Vec::with_capacity(tokens * width_out),
        Vec::with_capacity(tokens * width_out),
    );
    for t in &ft {
        for y in &fy {
            for x in &fx {
                cos.extend(t.0.iter().chain(&y.0).chain(&x.0));
                sin.extend(t.1.iter().chain(&y.1).chain(&x.1));
            }
        }
    }
    let table = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [tokens, width_out]), device);
    Ok(RotaryEmbedding {
        cos: table(cos),
        sin: table(sin),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_is_cos_then_sin() {
        let e = timestep_embedding(&[0.0], 8, true, 0.0);
        assert_eq!(e, vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn crop_region_centres_a_narrow_grid() {
        assert_eq!(resize_crop_region((4, 4), 4, 4), ((0.0, 0.0), (4.0, 4.0)));
        assert_eq!(resize_crop_region((4, 2), 4, 4), ((0.0, 1.0), (4.0, 3.0)));
    }

    #[test]
    fn linspace_hits_both_ends() {
        assert_eq!(linspace(0.0, 3.0, 4), vec![0.0, 1.0, 2.0, 3.0]);
    }
}
