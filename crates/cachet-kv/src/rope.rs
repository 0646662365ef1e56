//! RoPE rotation by a fixed number of positions, for the sink cache's shifted keys and query.

use burn::tensor::{DType, Device, Tensor, TensorData};

/// cos/sin `[1, 1, 1, 2·len(inv_freq)]` (rotate_half layout) of a rotation by `shift` positions,
/// computed in f64 so large shifts keep full precision.
pub(crate) fn shift_rotation(
    inv_freq: &[f32],
    shift: usize,
    dtype: DType,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let half = inv_freq.len();
    let angle = |j: usize| shift as f64 * inv_freq[j % half] as f64;
    let cos: Vec<f32> = (0..2 * half).map(|j| angle(j).cos() as f32).collect();
    let sin: Vec<f32> = (0..2 * half).map(|j| angle(j).sin() as f32).collect();
    let make = |v: Vec<f32>| {
        Tensor::<4>::from_data(
            TensorData::new(v, [1, 1, 1, 2 * half]),
            (device, DType::F32),
        )
        .cast(dtype)
    };
    (make(cos), make(sin))
}

/// `x` rotated forward by `shift` positions (RoPE `rotate_half` layout).
pub(crate) fn rotate_by(x: Tensor<4>, inv_freq: &[f32], shift: usize) -> Tensor<4> {
    if shift == 0 {
        return x;
    }
    let (cos, sin) = shift_rotation(inv_freq, shift, x.dtype(), &x.device());
    x.clone() * cos + rotate_half(x) * sin
}

/// `[-x2, x1]` of the two halves of the last dimension.
fn rotate_half(x: Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
    let x2 = x.slice([0..b, 0..h, 0..s, d / 2..d]);
    Tensor::cat(vec![x2.neg(), x1], 3)
}
