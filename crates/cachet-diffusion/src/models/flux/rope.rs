//! Flux's multi-axis rotary embedding (`FluxPosEmbed`) and its interleaved-pair rotation.
//!
//! Each position id has one coordinate per axis (`[index, row, column]` for Flux); axis `i` gets
//! `axes_dims_rope[i]` channels of the head. Frequencies and angles are computed on the host in
//! f64, like diffusers does on CPU, then rounded to f32.

use burn::tensor::{DType, Device, Tensor, TensorData};

use cachet_nn::{ModelError, Result};

/// RoPE base of Flux (`FluxPosEmbed(theta=10000)`).
pub(crate) const THETA: f64 = 10_000.0;

/// `(cos, sin)` tables `[tokens, head_dim]` for position `ids` `[tokens, axes]` (f32 values),
/// each frequency repeated twice (`repeat_interleave_real=True`), axes concatenated in order.
pub(crate) fn rope_tables(
    ids: &[f32],
    tokens: usize,
    axes_dims: &[usize],
    device: &Device,
) -> Result<(Tensor<2>, Tensor<2>)> {
    let axes = axes_dims.len();
    if ids.len() != tokens * axes {
        return Err(ModelError::Input(format!(
            "position ids hold {} values, expected {tokens} tokens x {axes} axes",
            ids.len()
        )));
    }
    let head_dim: usize = axes_dims.iter().sum();
    let mut cos = Vec::with_capacity(tokens * head_dim);
    let mut sin = Vec::with_capacity(tokens * head_dim);
    // diffusers: 1 / theta ** (arange(0, dim, 2, float64) / dim), per axis.
    let freqs: Vec<Vec<f64>> = axes_dims
        .iter()
        .map(|&dim| {
            (0..dim / 2)
                .map(|j| 1.0 / THETA.powf((2 * j) as f64 / dim as f64))
                .collect()
        })
        .collect();
    for t in 0..tokens {
        for (axis, axis_freqs) in freqs.iter().enumerate() {
            let pos = f64::from(ids[t * axes + axis]);
            for &f in axis_freqs {
                let angle = pos * f;
                let (s, c) = (angle.sin() as f32, angle.cos() as f32);
                cos.extend([c, c]);
                sin.extend([s, s]);
            }
        }
    }
    let table = |v: Vec<f32>| {
        Tensor::from_data(TensorData::new(v, [tokens, head_dim]), (device, DType::F32))
    };
    Ok((table(cos), table(sin)))
}

/// Rotates `x` `[batch, tokens, heads, head_dim]` by `(cos, sin)` `[tokens, head_dim]` with the
/// interleaved layout (`use_real_unbind_dim=-1`): pairs `(x[2i], x[2i+1])` are rotated together.
/// Computed in f32 and cast back, as diffusers' `apply_rotary_emb` does.
pub(crate) fn apply_rotary(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    let [batch, tokens, heads, dim] = x.dims();
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let pairs = x.clone().reshape([batch, tokens, heads, dim / 2, 2]);
    let real = pairs.clone().narrow(4, 0, 1);
    let imag = pairs.narrow(4, 1, 1);
    let rotated = Tensor::cat(vec![imag.neg(), real], 4).reshape([batch, tokens, heads, dim]);
    let cos = cos.clone().reshape([1, tokens, 1, dim]);
    let sin = sin.clone().reshape([1, tokens, 1, dim]);
    (x * cos + rotated * sin).cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_repeat_each_frequency_and_concatenate_axes() {
        let device = Device::default();
        // One token at (0, 1, 2) with axes (2, 4): axis 0 has one frequency (1), axis 1 two.
        let (cos, sin) = rope_tables(&[1.0, 2.0], 1, &[2, 4], &device).unwrap();
        let cos: Vec<f32> = cos.into_data().try_into_vec().unwrap();
        let sin: Vec<f32> = sin.into_data().try_into_vec().unwrap();
        let f1 = 1.0 / 10_000f64.powf(0.5);
        let want_cos = [
            1f64.cos(),
            1f64.cos(),
            2f64.cos(),
            2f64.cos(),
            (2.0 * f1).cos(),
            (2.0 * f1).cos(),
        ];
        for (a, b) in cos.iter().zip(want_cos) {
            assert!((f64::from(*a) - b).abs() < 1e-6);
        }
        assert!((f64::from(sin[0]) - 1f64.sin()).abs() < 1e-6);
    }

    #[test]
    fn rotation_turns_pairs() {
        let device = Device::default();
        // Angle pi/2 on the single pair: (a, b) -> (-b, a).
        let (cos, sin) = rope_tables(&[std::f32::consts::FRAC_PI_2], 1, &[2], &device).unwrap();
        let x = Tensor::<4>::from_data(TensorData::new(vec![3.0f32, 5.0], [1, 1, 1, 2]), &device);
        let out: Vec<f32> = apply_rotary(x, &cos, &sin)
            .into_data()
            .try_into_vec()
            .unwrap();
        assert!(
            (out[0] + 5.0).abs() < 1e-5 && (out[1] - 3.0).abs() < 1e-5,
            "{out:?}"
        );
    }
}
