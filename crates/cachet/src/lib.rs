//! cachet: the inference accelerations Python users get from Hugging Face, for burn.
//!
//! This umbrella crate re-exports the focused crates so one dependency brings them all; depend
//! on a single crate (e.g. `cachet-tensor`) to pull in only what it needs. Backends are cargo
//! features: `flex` (CPU, default) and `wgpu`.

#[cfg(feature = "compile")]
pub use cachet_compile as compile;
pub use cachet_diffusion as diffusion;
pub use cachet_kv as kv;
pub use cachet_models as models;
pub use cachet_nn as nn;
#[cfg(feature = "quant")]
pub use cachet_quant as quant;
pub use cachet_tensor as tensor;
pub use cachet_text as text;
