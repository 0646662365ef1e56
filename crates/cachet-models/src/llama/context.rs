//! What every layer of one forward shares: RoPE tables, positions, the padding mask, and the
//! attention masks decided from positions (built once per cache layout, not once per layer).

use std::cell::RefCell;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use cachet_kv::MaskLayout;
use cachet_nn::{ModelError, Result};

/// What every layer of one forward shares: RoPE tables, positions, the padding mask and the
/// masks built from it (once per distinct cache layout, not once per layer).
pub(super) struct ForwardContext {
    pub(super) cos: Tensor<4>,
    pub(super) sin: Tensor<4>,
    pub(super) cache_position: Vec<usize>,
    pub(super) attention_mask: Option<Tensor<2, Int>>,
    /// Whether the fused attention op may run (the host backend).
    pub(super) fused_attention: bool,
    /// Masks built so far in this forward, by (layout, layer window, batch).
    pub(super) masks: RefCell<Vec<(MaskKey, Tensor<4, Bool>)>>,
}

type MaskKey = (MaskLayout, Option<usize>, usize);

/// What a layer's attention must mask, decided from positions alone (no tensor work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MaskNeed {
    /// Every query sees every key (a decode step over a contiguous cache).
    Nothing,
    /// Plain causal masking, keys ending at the last query (a prompt over a contiguous cache).
    Causal,
    /// Anything else: windows that cut, padding, sinks, ring buffers, unused slots.
    Explicit,
}

impl ForwardContext {
    /// For keys at contiguous positions ending at the last query, with no padding: the window
    /// the queries see (`Some(None)`: plain causal); `None` for any other layout.
    pub(super) fn causal_window(
        &self,
        layout: &MaskLayout,
        window: Option<usize>,
    ) -> Option<Option<usize>> {
        let last = *self.cache_position.last()?;
        let plain = self.attention_mask.is_none()
            && layout.sink_tokens == 0
            && layout.rotation == 0
            && layout.rope_shift == 0
            && layout.valid_length == layout.kv_length
            && layout.kv_length >= self.cache_position.len()
            && layout.kv_offset + layout.kv_length == last + 1;
        plain.then_some(match (window, layout.window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    pub(super) fn mask_need(&self, layout: &MaskLayout, window: Option<usize>) -> MaskNeed {
        if self.attention_mask.is_some()
            || layout.sink_tokens > 0
            || layout.rotation > 0
            || layout.valid_length != layout.kv_length
            || layout.kv_length == 0
        {
            return MaskNeed::Explicit;
        }
        let (Some(&first), Some(&last)) = (self.cache_position.first(), self.cache_position.last())
        else {
            return MaskNeed::Explicit;
        };
        let seq = self.cache_position.len();
        let kv_len = layout.kv_length;
        // Keys are positions kv_offset..kv_offset + kv_len; the queries must be the last `seq`.
        if layout.kv_offset + kv_len != last + 1 || kv_len < seq {
            return MaskNeed::Explicit;
        }
        let window = match (window, layout.window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // The window cuts nothing if even the last query sees the first key.
        if window.is_some_and(|w| last >= layout.kv_offset + w) {
            return MaskNeed::Explicit;
        }
        let _ = first;
        if seq == 1 {
            MaskNeed::Nothing
        } else {
            MaskNeed::Causal
        }
    }

    /// The `[batch, 1, seq, kv_len]` mask for `layout`, built on the first layer that needs it.
    pub(super) fn mask(
        &self,
        layout: MaskLayout,
        window: Option<usize>,
        batch: usize,
        device: &Device,
    ) -> Result<Tensor<4, Bool>> {
        let key = (layout, window, batch);
        if let Some((_, mask)) = self.masks.borrow().iter().find(|(k, _)| *k == key) {
            return Ok(mask.clone());
        }
        let mask = attention_mask(self, layout, window, batch, device)?;
        self.masks.borrow_mut().push((key, mask.clone()));
        Ok(mask)
    }
}

/// `[batch, 1, seq, kv_len]`, true where a query must not see a key: future keys, keys outside
/// the sliding window, unused cache slots and padding.
fn attention_mask(
    ctx: &ForwardContext,
    layout: MaskLayout,
    window: Option<usize>,
    batch: usize,
    device: &Device,
) -> Result<Tensor<4, Bool>> {
    let seq = ctx.cache_position.len();
    let kv_len = layout.kv_length;
    let mut blocked = Vec::with_capacity(seq * kv_len);
    for &query in &ctx.cache_position {
        for j in 0..kv_len {
            let key = layout.position(j);
            let window = match (window, layout.window) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let outside_window = window.is_some_and(|w| query >= key + w);
            blocked.push(key > query || outside_window || j >= layout.valid_length);
        }
    }
    let structural = Tensor::<2, Bool>::from_data(TensorData::new(blocked, [seq, kv_len]), device)
        .reshape([1, 1, seq, kv_len]);
    let Some(padding) = &ctx.attention_mask else {
        return Ok(structural.repeat_dim(0, batch));
    };
    let [mask_batch, mask_len] = padding.dims();
    if mask_batch != batch {
        return Err(ModelError::Input(format!(
            "attention_mask has batch {mask_batch}, input_ids {batch}"
        )));
    }
    // Padding flags of the keys, by their absolute positions: the sinks, then a contiguous run.
    let columns = |from: usize, to: usize| -> Result<Tensor<2, Bool>> {
        let covered = to.min(mask_len).max(from);
        if covered < to && covered < layout.valid_length.min(to) {
            return Err(ModelError::Input(format!(
                "attention_mask covers {mask_len} positions, but keys reach position {}",
                to - 1
            )));
        }
        let mut part = padding
            .clone()
            .slice([0..batch, from..covered])
            .equal_elem(0);
        if covered < to {
            let tail = Tensor::<2, Bool>::from_data(
                TensorData::new(vec![false; batch * (to - covered)], [batch, to - covered]),
                device,
            );
            part = Tensor::cat(vec![part, tail], 1);
        }
        Ok(part)
    };
    let sinks = layout.sink_tokens.min(kv_len);
    let n = kv_len - sinks;
    let mut rest = columns(layout.kv_offset, layout.kv_offset + n)?;
    let rotation = if n > 0 { layout.rotation % n } else { 0 };
    if rotation > 0 {
        // Physical key j holds logical key (j - rotation) mod n: rotate the flags the same way.
        rest = Tensor::cat(
            vec![
                rest.clone().slice([0..batch, n - rotation..n]),
                rest.slice([0..batch, 0..n - rotation]),
            ],
            1,
        );
    }
    let pad = if sinks > 0 {
        Tensor::cat(vec![columns(0, sinks)?, rest], 1)
    } else {
        rest
    };
    let pad = pad.reshape([batch, 1, 1, kv_len]);
    Ok(structural
        .repeat_dim(0, batch)
        .bool_or(pad.repeat_dim(2, seq)))
}
