//! [`SinkCache`] (StreamingLLM): keeps `num_sink_tokens` first tokens plus the most recent ones,
//! `window_length` in all. When tokens are evicted, the kept keys are re-rotated so their RoPE
//! positions stay consistent — exactly as transformers' `SinkCache` did (v4.52, its last release).

use burn::tensor::{DType, Tensor};
use cachet_tensor::MemoryFootprint;

use crate::cache::{Cache, MaskLayout};
use crate::error::{KvError, Result};
use crate::store::{check_layer_order, check_pair, check_positions, select_rows};

#[derive(Debug, Clone)]
struct SinkLayer {
    keys: Tensor<4>,
    values: Tensor<4>,
    seen: usize,
    /// Whether tokens were ever evicted (the sinks then no longer precede contiguous keys).
    shifted: bool,
}

/// Attention-sink cache with RoPE re-rotation of shifted keys.
#[derive(Debug, Clone)]
pub struct SinkCache {
    window_length: usize,
    num_sink_tokens: usize,
    inv_freq: Vec<f32>,
    layers: Vec<SinkLayer>,
}

impl SinkCache {
    /// A sink cache of `window_length` tokens (sinks included) for a model whose RoPE inverse
    /// frequencies are `inv_freq` (`head_dim / 2` values, `rotate_half` layout).
    pub fn new(window_length: usize, num_sink_tokens: usize, inv_freq: Vec<f32>) -> Result<Self> {
        if num_sink_tokens >= window_length {
            return Err(KvError::Config(format!(
                "window_length ({window_length}) must be larger than num_sink_tokens ({num_sink_tokens})"
            )));
        }
        if inv_freq.is_empty() {
            return Err(KvError::Config(
                "sink cache needs the model's RoPE frequencies".into(),
            ));
        }
        Ok(Self {
            window_length,
            num_sink_tokens,
            inv_freq,
            layers: Vec::new(),
        })
    }

    /// cos/sin `[1, 1, n, head_dim]` that rotate keys from positions `from..from+n` to `to..to+n`.
    fn rerotation(
        &self,
        from: usize,
        to: usize,
        n: usize,
        dtype: DType,
        device: &burn::tensor::Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(n * 2 * half),
            Vec::with_capacity(n * 2 * half),
        );
        for i in 0..n {
            let (orig, shifted) = ((from + i) as f32, (to + i) as f32);
            let row: Vec<(f32, f32)> = (0..2 * half)
                .map(|j| {
                    let f = self.inv_freq[j % half];
                    // As transformers: cos/sin tables in f32, then the angle-difference identities.
                    let (co, so) = ((orig * f).cos(), (orig * f).sin());
                    let (cs, ss) = ((shifted * f).cos(), (shifted * f).sin());
                    (co * cs + so * ss, -so * cs + co * ss)
                })
                .collect();
            cos.extend(row.iter().map(|r| r.0));
            sin.extend(row.iter().map(|r| r.1));
        }
        let make = |v: Vec<f32>| {
            Tensor::<4>::from_data(
                burn::tensor::TensorData::new(v, [1, 1, n, 2 * half]),
                (device, DType::F32),
            )
            .cast(dtype)
        };
        (make(cos), make(sin))
    }
}

fn rotate_half(x: Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
    let x2 = x.slice([0..b, 0..h, 0..s, d / 2..d]);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

impl Cache for SinkCache {
    fn update(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
        cache_position: &[usize],
    ) -> Result<(Tensor<4>, Tensor<4>, MaskLayout)> {
        check_layer_order(layer, self.layers.len())?;
        check_pair(layer, &keys, &values)?;
        let new = keys.dims()[2];
        let (window, sinks) = (self.window_length, self.num_sink_tokens);
        if keys.dims()[3] != 2 * self.inv_freq.len() {
            return Err(KvError::Shape {
                layer,
                what: format!(
                    "head_dim {} does not match the RoPE frequencies ({})",
                    keys.dims()[3],
                    2 * self.inv_freq.len()
                ),
            });
        }
        if layer == self.layers.len() {
            check_positions(layer, 0, cache_position, new)?;
            if new > window {
                return Err(KvError::Config(format!(
                    "the first input ({new} tokens) is longer than the sink cache window ({window}); crop the prompt to its last {window} tokens"
                )));
            }
            self.layers.push(SinkLayer {
                keys: keys.clone(),
                values: values.clone(),
                seen: new,
                shifted: false,
            });
            return Ok((keys, values, MaskLayout::contiguous(0, new)));
        }
        let rotation = {
            let entry = &self.layers[layer];
            check_positions(layer, entry.seen, cache_position, new)?;
            let [b, h, stored, d] = entry.keys.dims();
            if keys.dims()[..2] != [b, h] || keys.dims()[3] != d {
                return Err(KvError::Shape {
                    layer,
                    what: format!(
                        "new keys {:?} do not match the cached [{b}, {h}, _, {d}]",
                        keys.dims()
                    ),
                });
            }
            if keys.dtype() != entry.keys.dtype() {
                return Err(KvError::DType {
                    layer,
                    expected: entry.keys.dtype(),
                    got: keys.dtype(),
                });
            }
            if new + stored < window {
                None
            } else if new >= window - sinks {
                return Err(KvError::Config(format!(
                    "{new} new tokens do not fit the sink cache window ({window} with {sinks} sink tokens)"
                )));
            } else {
                Some(self.rerotation(
                    sinks + new,
                    sinks,
                    window - sinks - new,
                    keys.dtype(),
                    &keys.device(),
                ))
            }
        };
        let entry = &mut self.layers[layer];
        let rotation_applied = rotation.is_some();
        let (k, v) = match rotation {
            None => (
                Tensor::cat(vec![entry.keys.clone(), keys], 2),
                Tensor::cat(vec![entry.values.clone(), values], 2),
            ),
            Some((cos, sin)) => {
                let [b, h, stored, dk] = entry.keys.dims();
                let dv = entry.values.dims()[3];
                let keep = window - sinks - new;
                let kept_k = entry
                    .keys
                    .clone()
                    .slice([0..b, 0..h, stored - keep..stored, 0..dk]);
                let kept_k = kept_k.clone() * cos + rotate_half(kept_k) * sin;
                let kept_v = entry
                    .values
                    .clone()
                    .slice([0..b, 0..h, stored - keep..stored, 0..dv]);
                let sink_k = entry.keys.clone().slice([0..b, 0..h, 0..sinks, 0..dk]);
                let sink_v = entry.values.clone().slice([0..b, 0..h, 0..sinks, 0..dv]);
                (
                    Tensor::cat(vec![sink_k, kept_k, keys], 2),
                    Tensor::cat(vec![sink_v, kept_v, values], 2),
                )
            }
        };
        entry.seen += new;
        entry.shifted |= rotation_applied;
        entry.keys = k.clone();
        entry.values = v.clone();
        let len = k.dims()[2];
        let layout = if !entry.shifted {
            MaskLayout::contiguous(0, len)
        } else {
            // Sinks hold positions 0..sinks; the rest are the most recent tokens.
            MaskLayout {
                kv_length: len,
                kv_offset: entry.seen - (len - sinks),
                sink_tokens: sinks,
                valid_length: len,
                rotation: 0,
                window: None,
            }
        };
        Ok((k, v, layout))
    }

    fn seq_length(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.seen)
    }

    fn max_length(&self) -> Option<usize> {
        None
    }

    fn mask_layout(&self, layer: usize, query_length: usize) -> MaskLayout {
        match self.layers.get(layer) {
            None => MaskLayout::contiguous(0, query_length),
            Some(l) => {
                let stored = l.keys.dims()[2];
                if !l.shifted && stored + query_length < self.window_length {
                    MaskLayout::contiguous(0, stored + query_length)
                } else {
                    let len = self.window_length;
                    MaskLayout {
                        kv_length: len,
                        kv_offset: l.seen + query_length - (len - self.num_sink_tokens),
                        sink_tokens: self.num_sink_tokens,
                        valid_length: len,
                        rotation: 0,
                        window: None,
                    }
                }
            }
        }
    }

    fn crop(&mut self, max_length: usize) -> Result<()> {
        for layer in &mut self.layers {
            if max_length >= layer.seen {
                continue;
            }
            if layer.shifted {
                return Err(KvError::Unsupported {
                    cache: "sink cache",
                    op: "crop after tokens were evicted",
                });
            }
            let [b, h, _, dk] = layer.keys.dims();
            let dv = layer.values.dims()[3];
            layer.keys = layer.keys.clone().slice([0..b, 0..h, 0..max_length, 0..dk]);
            layer.values = layer
                .values
                .clone()
                .slice([0..b, 0..h, 0..max_length, 0..dv]);
            layer.seen = max_length;
        }
        Ok(())
    }

    fn reorder(&mut self, beam_indices: &[usize]) -> Result<()> {
        for layer in &mut self.layers {
            layer.keys = select_rows(layer.keys.clone(), beam_indices)?;
            layer.values = select_rows(layer.values.clone(), beam_indices)?;
        }
        Ok(())
    }

    fn batch_size(&self) -> Option<usize> {
        self.layers.first().map(|l| l.keys.dims()[0])
    }

    fn reset(&mut self) {
        self.layers.clear();
    }

    fn memory_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.keys.memory_bytes() + l.values.memory_bytes())
            .sum()
    }

    fn boxed_clone(&self) -> Box<dyn Cache> {
        Box::new(self.clone())
    }

    fn name(&self) -> &'static str {
        "sink"
    }
}
