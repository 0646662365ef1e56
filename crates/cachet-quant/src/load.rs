//! `load_and_quantize_model`: build any [`QuantizableModel`] straight into quantized layers
//! while streaming its checkpoint, reload quantized checkpoints (transformers' layout) and save
//! them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Device;
use cachet_nn::{ModelError, QuantizableModel};
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::BnbQuantizationConfig;
use crate::device::WeightResidence;
use crate::device_map::{DeviceMap, Placement};
use crate::error::{QuantError, Result};
pub use crate::factory::{QuantizedLinear, QuantizingFactory};
use crate::linear::Fp32Linear;

/// A loaded model with quantized projections, and what is needed to save it.
#[derive(Debug)]
pub struct QuantizedModel<M> {
    /// The model, ready for `forward` / `generate::greedy`.
    pub model: M,
    /// Quantized projections by module name (the others are dense).
    pub layers: BTreeMap<String, QuantizedLinear>,
    /// The quantization options in effect.
    pub config: BnbQuantizationConfig,
    /// The checkpoint directory it was loaded from.
    pub source: PathBuf,
    /// Seconds spent loading and quantizing.
    pub load_seconds: f64,
    /// Bytes of the floating-point parts (embeddings, norms, skipped projections) in
    /// `torch_dtype`.
    pub dense_bytes: usize,
    /// dtype of the floating-point parts (they are saved in it, as transformers does).
    pub torch_dtype: Precision,
    /// Projections of `keep_in_fp32_modules`, by module name: held, computed and saved in f32
    /// whatever `torch_dtype` is (the activations are cast to f32 and back around them).
    pub fp32_modules: BTreeMap<String, Arc<Fp32Linear>>,
    /// Modules the `device_map` places on `cpu` or `disk` that stay on the compute device
    /// anyway (embeddings and norms: only linear projections can be offloaded); a warning
    /// naming them is logged when the model loads.
    pub not_offloaded: Vec<String>,
    /// Checkpoint tensors that duplicate another one (a tied `lm_head.weight`): neither
    /// counted in `dense_bytes` nor saved, as transformers drops tied duplicates.
    pub tied_weights: Vec<String>,
}

/// Loading options beyond the quantization config.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// dtype of the non-quantized parts; `None`: the config's `torch_dtype` rule.
    pub torch_dtype: Option<Precision>,
    /// Per-module placement (`cpu`, `disk`, or the compute device).
    pub device_map: Option<DeviceMap>,
    /// Where `disk` modules are written (must be writable).
    pub offload_folder: Option<PathBuf>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Whether checkpoint tensor `name` belongs to one of the quantized `layers` (their weight and
/// quantization state; biases stay as stored).
pub(crate) fn owned_by(layers: &BTreeMap<String, QuantizedLinear>, name: &str) -> bool {
    layers.keys().any(|p| {
        name.strip_prefix(p.as_str())
            .is_some_and(|rest| rest.starts_with(".weight") || rest == ".SCB")
    })
}

/// The dtype float tensor `name` of the checkpoint is held and saved in: f32 for the weight
/// and bias of a `keep_in_fp32_modules` projection, `torch_dtype` otherwise.
pub(crate) fn float_dtype_of(
    fp32_modules: &BTreeMap<String, Arc<Fp32Linear>>,
    torch_dtype: Precision,
    name: &str,
) -> Precision {
    let kept = name
        .rsplit_once('.')
        .is_some_and(|(module, _)| fp32_modules.contains_key(module));
    if kept { Precision::F32 } else { torch_dtype }
}

/// `M`'s weights in `dir`; errors of the weight files keep cachet-quant's own variants.
fn open_weights<M: QuantizableModel>(dir: &Path) -> Result<Checkpoint> {
    M::open_weights(dir).map_err(|err| match err {
        ModelError::Safetensors(e) => QuantError::Safetensors(e),
        ModelError::Tensor(e) => QuantError::Tensor(e),
        other => other.into(),
    })
}

/// accelerate's `load_and_quantize_model` for a checkpoint directory of model `M` (single or
/// sharded safetensors): every projection `M` builds through its factory is quantized as it is
/// read — one weight at a time, so peak memory stays near the quantized size — except
/// `lm_head`, `skip_modules` and `keep_in_fp32_modules`. Already-quantized checkpoints
/// (transformers' layout) load as they are. Quantized layers placed on the compute device keep
/// their weights there, packed, when it is a GPU, and in host memory when it is the host (see
/// [`load_and_quantize_model_with`]).
pub fn load_and_quantize_model<M: QuantizableModel>(
    weights_location: impl AsRef<Path>,
    config: &BnbQuantizationConfig,
    options: &LoadOptions,
    device: &Device,
) -> Result<QuantizedModel<M>> {
    load_and_quantize_model_with(
        weights_location,
        config,
        options,
        device,
        WeightResidence::Auto,
    )
}

/// [`load_and_quantize_model`] with the residence of the quantized weights placed on the
/// compute device chosen (`cpu`/`disk` placements keep their host and mapped forms).
pub fn load_and_quantize_model_with<M: QuantizableModel>(
    weights_location: impl AsRef<Path>,
    config: &BnbQuantizationConfig,
    options: &LoadOptions,
    device: &Device,
    residence: WeightResidence,
) -> Result<QuantizedModel<M>> {
    let dir = weights_location.as_ref();
    let start = Instant::now();
    let origin = dir.display().to_string();
    let _span = tracing::info_span!("load_and_quantize_model", dir = origin.as_str()).entered();
    let model_config = M::read_config(dir)?;
    let checkpoint = open_weights::<M>(dir)?;
    let torch_dtype = match options.torch_dtype {
        Some(p) => p,
        None => config.torch_dtype(&origin)?,
    };
    let mut factory =
        QuantizingFactory::new(config.clone(), &origin, torch_dtype)?.with_residence(residence);
    let mut not_offloaded = Vec::new();
    if let Some(map) = &options.device_map {
        map.validate(&M::module_names(&model_config))?;
        if map.uses_disk() {
            let folder =
                options
                    .offload_folder
                    .as_deref()
                    .ok_or_else(|| QuantError::DeviceMap {
                        reason:
                            "the device_map places modules on disk but no offload folder was given"
                                .into(),
                    })?;
            crate::offload::check_folder(folder)?;
        }
        factory = factory.with_device_map(map.clone(), options.offload_folder.clone());
        not_offloaded = M::other_modules(&model_config)
            .into_iter()
            .filter(|m| map.placement(m) != Placement::Device)
            .collect();
        if !not_offloaded.is_empty() {
            tracing::warn!(
                modules = ?not_offloaded,
                "the device_map places these modules on cpu/disk, but only linear projections can be offloaded: they stay on the compute device"
            );
        }
    }
    if options.progress {
        let bar = ProgressBar::new(M::projections(&model_config).len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} quantizing [{bar:30}] {pos}/{len} {elapsed} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        factory = factory.with_progress(bar);
    }
    let tied_weights = M::tied_weights(&model_config);
    let model = M::load_with(model_config, &checkpoint, device, torch_dtype, &factory)?;
    let (layers, fp32_modules) = factory.into_parts();
    let dense_bytes = checkpoint
        .names()
        .into_iter()
        .filter(|n| !owned_by(&layers, n))
        .filter(|n| !tied_weights.iter().any(|t| t == n))
        .filter_map(|n| {
            let size = float_dtype_of(&fp32_modules, torch_dtype, n).size();
            checkpoint.info(n).map(|i| (i, size))
        })
        .filter(|(i, _)| i.dtype.is_loadable_float())
        .map(|(i, size)| i.num_elements() * size)
        .sum();
    Ok(QuantizedModel {
        model,
        dense_bytes,
        torch_dtype,
        layers,
        fp32_modules,
        not_offloaded,
        tied_weights,
        config: config.clone(),
        source: dir.to_path_buf(),
        load_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Loads `dir` for inference: a checkpoint with a bitsandbytes `quantization_config` in its
/// config.json loads quantized (as transformers would), any other one dense through
/// [`Pretrained::from_pretrained`](cachet_nn::Pretrained::from_pretrained).
pub fn load_pretrained<M: QuantizableModel>(
    dir: impl AsRef<Path>,
    device: &Device,
    precision: Precision,
) -> Result<M> {
    let dir = dir.as_ref();
    match BnbQuantizationConfig::from_model_dir(dir)? {
        Some(config) => {
            let options = LoadOptions {
                torch_dtype: Some(precision),
                ..LoadOptions::default()
            };
            Ok(load_and_quantize_model::<M>(dir, &config, &options, device)?.model)
        }
        None => Ok(M::from_pretrained(dir, device, precision)?),
    }
}

impl<M> QuantizedModel<M> {
    /// Bytes of all weights: quantized projections plus the floating-point parts.
    pub fn memory_bytes(&self) -> usize {
        self.dense_bytes
            + self
                .layers
                .values()
                .map(QuantizedLinear::memory_bytes)
                .sum::<usize>()
    }
}
