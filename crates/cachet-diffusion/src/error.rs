//! Errors of the diffusion-cache crate.

use cachet_nn::ModelError;

/// Result alias of cachet-diffusion.
pub type Result<T, E = DiffusionError> = std::result::Result<T, E>;

/// What can go wrong configuring or running a diffusion cache; each names the option or input.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A hooked model was called outside `cache_context(name)` by a method that keeps per-context
    /// state (FirstBlockCache, TaylorSeer), as diffusers refuses it.
    #[error(
        "no cache context is set: {method} keeps separate state per context; call \
         `hooks.cache_context(\"cond\")` (or \"uncond\") before running the model"
    )]
    NoContext {
        /// The method that needs a context.
        method: &'static str,
    },
    /// A `(lo, hi)` range has `lo > hi`.
    #[error("{field} = ({lo}, {hi}): the lower bound is greater than the upper bound")]
    InvalidRange {
        /// Option name.
        field: &'static str,
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
    },
    /// A threshold or weight that must not be negative is.
    #[error("{field} = {value}: must not be negative")]
    Negative {
        /// Option name.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// An option is out of its valid domain.
    #[error("{field}: {reason}")]
    InvalidOption {
        /// Option name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// DBCache's compute blocks do not fit the block list.
    #[error(
        "Fn_compute_blocks ({fn_blocks}) + Bn_compute_blocks ({bn_blocks}) exceed the {blocks} \
         blocks of {group}"
    )]
    TooManyComputeBlocks {
        /// Fn.
        fn_blocks: usize,
        /// Bn.
        bn_blocks: usize,
        /// Blocks in the list.
        blocks: usize,
        /// The list's name.
        group: String,
    },
    /// FasterCache's `tensor_format` does not fit the denoiser output.
    #[error(
        "tensor_format {format:?} needs a rank-{expected} output, but the model returned shape {shape:?}"
    )]
    TensorFormat {
        /// The format.
        format: String,
        /// Rank the format implies.
        expected: usize,
        /// The output's shape.
        shape: Vec<usize>,
    },
    /// A block or module identifier (regex) matches nothing in the model.
    #[error(
        "{option} identifier {identifier:?} matches no {what} of the model (it has: {available})"
    )]
    UnmatchedIdentifier {
        /// The option holding the identifier.
        option: &'static str,
        /// The identifier.
        identifier: String,
        /// What it should have matched ("attention module", "block list").
        what: &'static str,
        /// A short list of what exists.
        available: String,
    },
    /// An identifier is not a valid regular expression.
    #[error("{option} identifier {identifier:?} is not a valid regex: {reason}")]
    BadIdentifier {
        /// The option.
        option: &'static str,
        /// The identifier.
        identifier: String,
        /// Regex error.
        reason: String,
    },
    /// The method cannot work on this model (the reason says why).
    #[error("{method} does not apply to this model: {reason}")]
    NotApplicable {
        /// The method.
        method: &'static str,
        /// Why.
        reason: String,
    },
    /// A config (JSON) could not be parsed.
    #[error("invalid {what} config: {reason}")]
    Config {
        /// Which config.
        what: &'static str,
        /// Parser message, naming the field.
        reason: String,
    },
    /// A class label outside a label-conditioned model's table.
    #[error("label {label} is out of range: the model draws labels 0 to {}", labels.saturating_sub(1))]
    LabelOutOfRange {
        /// The label asked for.
        label: usize,
        /// Labels the model knows (the null label excluded).
        labels: usize,
    },
    /// The cache was used inconsistently (batch size changed mid-inference, step missing...).
    #[error("{0}")]
    State(String),
    /// The model failed.
    #[error(transparent)]
    Model(Box<ModelError>),
}

impl From<ModelError> for DiffusionError {
    fn from(error: ModelError) -> Self {
        Self::Model(Box::new(error))
    }
}

impl From<DiffusionError> for ModelError {
    fn from(error: DiffusionError) -> Self {
        match error {
            DiffusionError::Model(inner) => *inner,
            other => ModelError::Hook(Box::new(other)),
        }
    }
}

impl DiffusionError {
    /// Recovers a diffusion error that travelled through the model as [`ModelError::Hook`].
    pub fn from_model(error: ModelError) -> Self {
        match error {
            ModelError::Hook(inner) => match inner.downcast::<DiffusionError>() {
                Ok(own) => *own,
                Err(other) => ModelError::Hook(other).into(),
            },
            other => other.into(),
        }
    }
}

/// Checks a `(lo, hi)` range.
pub(crate) fn check_range(field: &'static str, (lo, hi): (f64, f64)) -> Result<()> {
    if lo > hi {
        return Err(DiffusionError::InvalidRange { field, lo, hi });
    }
    Ok(())
}

/// Checks a value is not negative (NaN is refused too).
pub(crate) fn check_non_negative(field: &'static str, value: f64) -> Result<()> {
    if value.is_nan() || value < 0.0 {
        return Err(DiffusionError::Negative { field, value });
    }
    Ok(())
}

/// Checks a skip range is at least 1.
pub(crate) fn check_positive(field: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(DiffusionError::InvalidOption {
            field,
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}
