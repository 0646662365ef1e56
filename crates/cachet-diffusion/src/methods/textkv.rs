//! TextKV (diffusers' `TextKVCacheConfig`): compute each block's text keys and values once per
//! prompt and reuse them at every step. That is lossless only where they are a function of the
//! prompt alone, as in NucleusMoE-Image's blocks (the only ones diffusers hooks). In Flux's
//! double-stream blocks the text tokens are modulated by the timestep embedding (`norm1_context`)
//! before `add_k_proj`/`add_v_proj`, and from the second block on they also carry what joint
//! attention mixed in from the image tokens, so their keys and values change at every step;
//! CogVideoX normalises text and video together under the same modulation. None of the DiTs
//! here has a block TextKV could cache without changing the output, so attaching it is refused
//! with that reason rather than approximating silently.

use serde::{Deserialize, Serialize};

use crate::error::DiffusionError;
use crate::methods::GroupLayout;

/// diffusers' `TextKVCacheConfig` (it has no fields).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextKVCacheConfig {}

/// Why TextKV cannot attach to a model with these block lists.
pub(crate) fn not_applicable(layout: &GroupLayout) -> DiffusionError {
    DiffusionError::NotApplicable {
        method: "textkv",
        reason: format!(
            "none of the model's block lists ({}) computes its text keys/values from the prompt \
             alone: Flux's and CogVideoX's blocks modulate the text tokens with the timestep \
             embedding and mix them with the image tokens, so their text K/V change every step \
             and reusing them would not be lossless (diffusers applies TextKV to NucleusMoE-Image \
             blocks only)",
            layout.names().collect::<Vec<_>>().join(", ")
        ),
    }
}
