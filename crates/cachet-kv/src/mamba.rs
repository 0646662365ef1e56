//! [`MambaCache`]: the state cache of Mamba-style models, a convolution window and an SSM state
//! per layer instead of keys and values (transformers' `MambaCache`).
//!
//! No cachet model uses it: it is a container for Mamba-style models built outside cachet,
//! mirroring transformers' class.

use burn::tensor::{DType, Device, Tensor};
use cachet_tensor::MemoryFootprint;

use crate::error::{KvError, Result};
use crate::store::select_rows;

/// Shapes of a Mamba state cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MambaCacheConfig {
    /// Layers.
    pub num_layers: usize,
    /// Batch size.
    pub batch: usize,
    /// Channels of the mixer (`intermediate_size`).
    pub intermediate_size: usize,
    /// Convolution kernel width (`conv_kernel`).
    pub conv_kernel: usize,
    /// SSM state width (`state_size`).
    pub state_size: usize,
}

/// Per-layer convolution states `[batch, intermediate, conv_kernel]` and SSM states
/// `[batch, intermediate, state_size]`, preallocated with zeros.
#[derive(Debug, Clone)]
pub struct MambaCache {
    config: MambaCacheConfig,
    conv_states: Vec<Tensor<3>>,
    ssm_states: Vec<Tensor<3>>,
}

impl MambaCache {
    /// A zeroed cache on `device` in `dtype`.
    pub fn new(config: MambaCacheConfig, dtype: DType, device: &Device) -> Result<Self> {
        let c = config;
        if [
            c.num_layers,
            c.batch,
            c.intermediate_size,
            c.conv_kernel,
            c.state_size,
        ]
        .contains(&0)
        {
            return Err(KvError::Config(format!(
                "every MambaCache dimension must be positive: {c:?}"
            )));
        }
        let zeros =
            |width| Tensor::<3>::zeros([c.batch, c.intermediate_size, width], (device, dtype));
        Ok(Self {
            config,
            conv_states: (0..c.num_layers).map(|_| zeros(c.conv_kernel)).collect(),
            ssm_states: (0..c.num_layers).map(|_| zeros(c.state_size)).collect(),
        })
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.config.num_layers {
            return Err(KvError::Shape {
                layer,
                what: format!("the cache has {} layers", self.config.num_layers),
            });
        }
        Ok(())
    }

    fn check_shape(&self, layer: usize, got: [usize; 3], width: usize, what: &str) -> Result<()> {
        let want = [self.config.batch, self.config.intermediate_size, width];
        if got != want {
            return Err(KvError::Shape {
                layer,
                what: format!("{what} has shape {got:?}, expected {want:?}"),
            });
        }
        Ok(())
    }

    /// Decode step: shifts the convolution window left by one and writes `column`
    /// `[batch, intermediate]` at `cache_position` (clamped to the window), as transformers does.
    pub fn update_conv_state(
        &mut self,
        layer: usize,
        column: Tensor<2>,
        cache_position: usize,
    ) -> Result<Tensor<3>> {
        self.check_layer(layer)?;
        let [b, i] = column.dims();
        self.check_shape(layer, [b, i, 1], 1, "conv column")?;
        let k = self.config.conv_kernel;
        let state = self.conv_states[layer].clone();
        let rolled = Tensor::cat(
            vec![
                state.clone().slice([0..b, 0..i, 1..k]),
                state.slice([0..b, 0..i, 0..1]),
            ],
            2,
        );
        let at = cache_position.min(k - 1);
        let column = column.cast(rolled.dtype()).reshape([b, i, 1]);
        let updated = rolled.slice_assign([0..b, 0..i, at..at + 1], column);
        self.conv_states[layer] = updated.clone();
        Ok(updated)
    }

    /// Prefill: sets the whole convolution window of `layer` (`[batch, intermediate, conv_kernel]`).
    pub fn set_conv_state(&mut self, layer: usize, state: Tensor<3>) -> Result<()> {
        self.check_layer(layer)?;
        self.check_shape(layer, state.dims(), self.config.conv_kernel, "conv state")?;
        self.conv_states[layer] = state;
        Ok(())
    }

    /// Replaces the SSM state of `layer`.
    pub fn update_ssm_state(&mut self, layer: usize, state: Tensor<3>) -> Result<Tensor<3>> {
        self.check_layer(layer)?;
        self.check_shape(layer, state.dims(), self.config.state_size, "ssm state")?;
        self.ssm_states[layer] = state.clone();
        Ok(state)
    }

    /// Convolution window of `layer`.
    pub fn conv_state(&self, layer: usize) -> Option<&Tensor<3>> {
        self.conv_states.get(layer)
    }

    /// SSM state of `layer`.
    pub fn ssm_state(&self, layer: usize) -> Option<&Tensor<3>> {
        self.ssm_states.get(layer)
    }

    /// Reorders the batch (beam search).
    pub fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        // Validate once so a bad index leaves every state untouched.
        let batch = self.config.batch;
        if let Some(&index) = beam_indices.iter().find(|&&i| i >= batch) {
            return Err(KvError::BatchIndex { index, batch });
        }
        for t in self
            .conv_states
            .iter_mut()
            .chain(self.ssm_states.iter_mut())
        {
            *t = select_rows(t.clone(), beam_indices)?;
        }
        self.config.batch = beam_indices.len();
        Ok(())
    }

    /// Zeroes every state.
    pub fn reset(&mut self) {
        for t in self
            .conv_states
            .iter_mut()
            .chain(self.ssm_states.iter_mut())
        {
            *t = t.zeros_like();
        }
    }
}

impl MemoryFootprint for MambaCache {
    fn memory_bytes(&self) -> usize {
        self.conv_states.memory_bytes() + self.ssm_states.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor<3>) -> Vec<f32> {
        t.clone().into_data().try_into_vec::<f32>().unwrap()
    }

    #[test]
    fn conv_window_rolls_and_writes_like_transformers() {
        let device = Device::flex();
        let config = MambaCacheConfig {
            num_layers: 2,
            batch: 1,
            intermediate_size: 2,
            conv_kernel: 3,
            state_size: 4,
        };
        let mut cache = MambaCache::new(config, DType::F32, &device).unwrap();
        for (pos, v) in [1.0f32, 2.0, 3.0, 4.0].into_iter().enumerate() {
            let col = Tensor::<2>::from_data([[v, -v]], &device);
            cache.update_conv_state(0, col, pos).unwrap();
        }
        // Positions 0, 1, 2 fill the window (each step also rolls); position 3 clamps to the end.
        // transformers: roll(-1) then write at min(pos, k-1).
        let mut expect = [0.0f32; 3];
        for (pos, v) in [1.0f32, 2.0, 3.0, 4.0].into_iter().enumerate() {
            expect.rotate_left(1);
            expect[pos.min(2)] = v;
        }
        let got = values(cache.conv_state(0).unwrap());
        assert_eq!(&got[..3], &expect);
        assert_eq!(&got[3..], &expect.map(|x| -x));
        assert_eq!(
            values(cache.conv_state(1).unwrap()),
            vec![0.0; 6],
            "other layers untouched"
        );
        assert_eq!(cache.memory_bytes(), 2 * (6 + 8) * 4);
        assert!(
            cache
                .update_ssm_state(0, Tensor::zeros([1, 2, 5], &device))
                .is_err()
        );
        assert!(
            cache
                .update_conv_state(2, Tensor::zeros([1, 2], &device), 0)
                .is_err()
        );
        cache.reset();
        assert_eq!(values(cache.conv_state(0).unwrap()), vec![0.0; 6]);
    }
}
