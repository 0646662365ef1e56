//! [`QuantizableModel`]: what a quantizer needs to know about a model's modules, so it can
//! quantize any architecture without spelling its weight names a second time.

use std::collections::BTreeSet;

use crate::linear::LinearSpec;
use crate::pretrained::Pretrained;

/// A [`Pretrained`] model that describes its modules: which projections its `load_with` asks
/// the factory for (what a quantizer replaces), which weighted modules it builds itself, the
/// module names a `device_map` may place, and which checkpoint tensors are tied duplicates.
pub trait QuantizableModel: Pretrained {
    /// Every projection [`Pretrained::load_with`] builds through its factory for `config`, in
    /// load order.
    fn projections(config: &Self::Config) -> Vec<LinearSpec>;

    /// The weighted modules `load_with` builds itself, not through the factory (embeddings,
    /// norms): they stay dense and on the compute device.
    fn other_modules(config: &Self::Config) -> Vec<String>;

    /// Every module name a `device_map` may name: by default each dotted prefix of the
    /// projections and the other modules (`model`, `model.layers`, `model.layers.0`, ...).
    fn module_names(config: &Self::Config) -> BTreeSet<String> {
        let projections = Self::projections(config);
        let others = Self::other_modules(config);
        module_prefixes(
            projections
                .iter()
                .map(|s| s.name.as_str())
                .chain(others.iter().map(String::as_str)),
        )
    }

    /// Checkpoint tensors that duplicate another one under `config` (a tied `lm_head.weight`):
    /// neither loaded, counted nor saved by a quantizer. None by default.
    fn tied_weights(config: &Self::Config) -> Vec<String> {
        let _ = config;
        Vec::new()
    }
}

/// Each dotted prefix of each name (`a.b.c` gives `a`, `a.b` and `a.b.c`).
pub fn module_prefixes<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for name in names {
        let mut end = 0;
        for part in name.split('.') {
            end += part.len();
            out.insert(name[..end].to_string());
            end += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_cover_every_level() {
        let got = module_prefixes(["model.layers.0.mlp", "lm_head"]);
        let want: BTreeSet<String> = [
            "lm_head",
            "model",
            "model.layers",
            "model.layers.0",
            "model.layers.0.mlp",
        ]
        .into_iter()
        .map(str::to_string)
        .collect();
        assert_eq!(got, want);
    }
}
