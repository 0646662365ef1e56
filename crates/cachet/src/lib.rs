//! cachet: the inference accelerations Python users get from Hugging Face, for burn.
//!
//! This umbrella crate re-exports the focused crates so one dependency brings them all; depend
//! on a single crate (e.g. `cachet-tensor`) to pull in only what it needs. Backends are cargo
//! features: `flex` (CPU, default) and `wgpu`.

pub use cachet_kv as kv;
pub use cachet_models as models;
pub use cachet_tensor as tensor;
