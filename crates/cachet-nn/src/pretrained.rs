//! The loading seam every model implements: a config, a checkpoint, and a factory that builds
//! each projection. `load` and `from_pretrained` are written once here, for every model.

use std::path::Path;

use burn::tensor::Device;
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;

use crate::error::Result;
use crate::linear::LinearFactory;

/// A model that loads from a Hugging Face-style directory (`config.json` + safetensors), with
/// every linear projection built through a [`LinearFactory`] (how quantizers load straight
/// into quantized layers).
pub trait Pretrained: Sized {
    /// The parsed, validated `config.json`.
    type Config;

    /// Reads and validates the `config.json` of `dir`.
    fn read_config(dir: &Path) -> Result<Self::Config>;

    /// Opens the weights of `dir`: a single file, a sharded index, or every safetensors file.
    fn open_weights(dir: &Path) -> Result<Checkpoint> {
        Ok(Checkpoint::open(dir)?)
    }

    /// The factory [`Pretrained::load`] builds projections with.
    fn default_factory() -> &'static dyn LinearFactory;

    /// Builds the model from a parsed config and an opened checkpoint, asking `factory` for
    /// every projection.
    fn load_with(
        config: Self::Config,
        checkpoint: &Checkpoint,
        device: &Device,
        precision: Precision,
        factory: &dyn LinearFactory,
    ) -> Result<Self>;

    /// Builds the model with the [default factory](Pretrained::default_factory).
    fn load(
        config: Self::Config,
        checkpoint: &Checkpoint,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        Self::load_with(
            config,
            checkpoint,
            device,
            precision,
            Self::default_factory(),
        )
    }

    /// Loads the model in `dir` on `device`, computing in `precision`.
    fn from_pretrained(
        dir: impl AsRef<Path>,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let _span = tracing::info_span!(
            "load_model",
            model = std::any::type_name::<Self>(),
            dir = %dir.display()
        )
        .entered();
        let config = Self::read_config(dir)?;
        let checkpoint = Self::open_weights(dir)?;
        Self::load(config, &checkpoint, device, precision)
    }
}
