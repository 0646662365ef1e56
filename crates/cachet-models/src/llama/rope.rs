//! Rotary position embeddings (the `rotate_half` layout of Hugging Face Llama).

use burn::tensor::{DType, Device, Int, Tensor};

use super::config::Rope;

/// Inverse frequencies of `rope` for heads of width `head_dim`, and the factor the position is
/// divided by (`linear` scaling), computed in f64 like transformers computes them in f32.
pub fn inverse_frequencies(rope: Rope, head_dim: usize) -> (Vec<f32>, f32) {
    let theta = match rope {
        Rope::Default { theta } | Rope::Linear { theta, .. } | Rope::Llama3 { theta, .. } => theta,
    };
    // transformers: 1 / theta ** (arange(0, dim, 2).float() / dim), in float32.
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match rope {
        Rope::Default { .. } => (base, 1.0),
        Rope::Linear { factor, .. } => (base, factor as f32),
        Rope::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
            ..
        } => {
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let original = original_max_position_embeddings as f32;
            let low_freq_wavelen = original / low;
            let high_freq_wavelen = original / high;
            let scaled = base
                .into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen > low_freq_wavelen {
                        freq / factor
                    } else if wavelen < high_freq_wavelen {
                        freq
                    } else {
                        let smooth = (original / wavelen - low) / (high - low);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect();
            (scaled, 1.0)
        }
    }
}

/// Precomputed RoPE frequencies; produces cos/sin for any position ids.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Tensor<1>,
    position_scale: f32,
    /// `inv_freq / position_scale` on the host: the angle per position (for cache shifts).
    angle_per_position: Vec<f32>,
}

impl RotaryEmbedding {
    /// Builds the frequencies of `rope` on `device`.
    pub fn new(rope: Rope, head_dim: usize, device: &Device) -> Self {
        let (freqs, position_scale) = inverse_frequencies(rope, head_dim);
        // Linear scaling divides positions; dividing the frequencies gives the same angles.
        let angle_per_position = freqs.iter().map(|f| f / position_scale).collect();
        Self {
            inv_freq: Tensor::from_data(freqs.as_slice(), (device, DType::F32)),
            position_scale,
            angle_per_position,
        }
    }

    /// Rotation angle per position of each frequency pair (`inv_freq` with linear scaling folded
    /// in), computed once at load.
    pub fn angle_per_position(&self) -> &[f32] {
        &self.angle_per_position
    }

    /// cos and sin of shape `[batch, 1, seq, head_dim]` for `position_ids` `[batch, seq]`, in f32.
    pub fn cos_sin(&self, position_ids: Tensor<2, Int>) -> (Tensor<4>, Tensor<4>) {
        let [batch, seq] = position_ids.dims();
        let half = self.inv_freq.dims()[0];
        let mut positions = position_ids.float().cast(DType::F32);
        if self.position_scale != 1.0 {
            positions = positions.div_scalar(self.position_scale);
        }
        let freqs =
            positions.reshape([batch, seq, 1]) * self.inv_freq.clone().reshape([1, 1, half]);
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([batch, 1, seq, half * 2]);
        (emb.clone().cos(), emb.sin())
    }
}

/// Applies RoPE to `x` `[batch, heads, seq, head_dim]`: `x * cos + rotate_half(x) * sin`.
pub(crate) fn apply_rotary(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [batch, heads, seq, dim] = x.dims();
    let half = dim / 2;
    let x1 = x.clone().slice([0..batch, 0..heads, 0..seq, 0..half]);
    let x2 = x.clone().slice([0..batch, 0..heads, 0..seq, half..dim]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let dtype = x.dtype();
    x * cos.clone().cast(dtype) + rotated * sin.clone().cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let rope = Rope::Llama3 {
            theta: 500_000.0,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let (plain, _) = inverse_frequencies(Rope::Default { theta: 500_000.0 }, 128);
        let (scaled, _) = inverse_frequencies(rope, 128);
        assert_eq!(scaled[0], plain[0], "highest frequency unchanged");
        let last = plain.len() - 1;
        assert!(
            (scaled[last] - plain[last] / 8.0).abs() < 1e-12,
            "lowest frequency divided"
        );
        assert!(scaled.iter().zip(&plain).all(|(s, p)| s <= p));
    }
}
