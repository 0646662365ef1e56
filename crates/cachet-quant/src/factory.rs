//! [`QuantizingFactory`]: the `LinearFactory` that quantizes each projection as a model loads,
//! and [`QuantizedLinear`], the quantized layers it records for saving and inspection.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use burn::tensor::{DType, Device};
use cachet_nn::{DenseFactory, LinearFactory, LinearLayer, LinearOp, LinearSpec};
use cachet_tensor::Precision;
use cachet_tensor::safetensors::Checkpoint;
use indicatif::ProgressBar;

use crate::blockwise::quantize_4bit;
use crate::config::BnbQuantizationConfig;
use crate::device::WeightResidence;
use crate::device_map::{DeviceMap, Placement};
use crate::error::{QuantError, Result};
use crate::int8::Int8Weight;
use crate::linear::{Fp32Linear, Linear4bit, Linear8bitLt};
use crate::offload::{CpuDenseLinear, DiskDenseLinear, DiskLinear};
use crate::serialize::{
    Part, StoredLayout, four_bit_part, four_bit_parts, four_bit_tensors, int8_part, int8_parts,
    int8_tensors, read_float, read_four_bit, read_int8, stored_layout,
};

/// A quantized projection of a loaded model, kept for saving and inspection.
#[derive(Debug, Clone)]
pub enum QuantizedLinear {
    /// NF4/FP4 layer, and the dtype its weight had before quantization.
    FourBit(Arc<Linear4bit>, Precision),
    /// LLM.int8 layer.
    Int8(Arc<Linear8bitLt>),
}

impl QuantizedLinear {
    /// Bytes of the quantized weights (and bias).
    pub fn memory_bytes(&self) -> usize {
        match self {
            Self::FourBit(l, _) => l.memory_bytes(),
            Self::Int8(l) => l.memory_bytes(),
        }
    }

    /// Whether the layer's weights live on a compute device (rather than in host memory).
    pub fn is_device_resident(&self) -> bool {
        match self {
            Self::FourBit(l, _) => l.is_device_resident(),
            Self::Int8(l) => l.is_device_resident(),
        }
    }

    /// The tensors this layer saves under `prefix`, in transformers' layout (bias excluded); a
    /// device-resident layer is read back to host bytes first.
    pub fn tensors(&self, prefix: &str) -> Result<Vec<(String, burn::tensor::TensorData)>> {
        Ok(match self {
            Self::FourBit(l, dtype) => four_bit_tensors(prefix, &l.host_copy()?.weight, *dtype),
            Self::Int8(l) => int8_tensors(prefix, &l.host_copy()?.weight),
        })
    }

    /// Name, part, dtype and shape of each tensor [`QuantizedLinear::tensors`] returns, without
    /// copying data (a streaming writer lays out its header from these).
    pub fn parts(&self, prefix: &str) -> Vec<(String, Part, DType, Vec<usize>)> {
        match self {
            Self::FourBit(l, dtype) => match (l.resident(), l.host()) {
                (Some(r), _) => r.parts(prefix, *dtype),
                (None, Some(h)) => four_bit_parts(prefix, &h.weight, *dtype),
                (None, None) => Vec::new(),
            },
            Self::Int8(l) => match (l.resident(), l.host()) {
                (Some(r), _) => r.parts(prefix),
                (None, Some(h)) => int8_parts(prefix, &h.weight),
                (None, None) => Vec::new(),
            },
        }
    }

    /// The data of one part listed by [`QuantizedLinear::parts`] (read back from the device,
    /// that tensor only, when the layer is device-resident); `None` for a part it lacks.
    pub fn part(&self, part: Part) -> Result<Option<burn::tensor::TensorData>> {
        Ok(match self {
            Self::FourBit(l, dtype) => match (l.resident(), l.host()) {
                (Some(r), _) => r.part(*dtype, part)?,
                (None, Some(h)) => four_bit_part(&h.weight, *dtype, part),
                (None, None) => None,
            },
            Self::Int8(l) => match (l.resident(), l.host()) {
                (Some(r), _) => r.part(part)?,
                (None, Some(h)) => int8_part(&h.weight, part),
                (None, None) => None,
            },
        })
    }
}

fn round_values(values: &mut [f32], p: Precision) {
    match p {
        Precision::F32 => {}
        Precision::F16 => values
            .iter_mut()
            .for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
        Precision::BF16 => values
            .iter_mut()
            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
    }
}

/// The [`LinearFactory`] that quantizes each projection as the model loads (or reads it
/// pre-quantized), recording what it built.
pub struct QuantizingFactory {
    config: BnbQuantizationConfig,
    origin: String,
    /// dtype of the floating-point parts (weights are rounded to it before quantizing, as
    /// transformers loads them in `torch_dtype` first).
    torch_dtype: Precision,
    compute_dtype: Precision,
    device_map: Option<DeviceMap>,
    offload_folder: Option<PathBuf>,
    residence: WeightResidence,
    built: Mutex<BTreeMap<String, QuantizedLinear>>,
    kept_fp32: Mutex<BTreeMap<String, Arc<Fp32Linear>>>,
    progress: ProgressBar,
}

impl std::fmt::Debug for QuantizingFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizingFactory")
            .field("config", &self.config)
            .field("origin", &self.origin)
            .finish()
    }
}

impl QuantizingFactory {
    /// A factory for `config` (validated); `origin` names the checkpoint in errors.
    pub fn new(
        config: BnbQuantizationConfig,
        origin: &str,
        torch_dtype: Precision,
    ) -> Result<Self> {
        config.validate(origin)?;
        let compute_dtype = if config.load_in_4bit {
            config.compute_dtype(origin)?
        } else {
            torch_dtype
        };
        Ok(Self {
            config,
            origin: origin.to_string(),
            torch_dtype,
            compute_dtype,
            device_map: None,
            offload_folder: None,
            residence: WeightResidence::Auto,
            built: Mutex::new(BTreeMap::new()),
            kept_fp32: Mutex::new(BTreeMap::new()),
            progress: ProgressBar::hidden(),
        })
    }

    /// Places modules per `device_map`; `disk` modules go to `offload_folder`.
    pub fn with_device_map(mut self, map: DeviceMap, offload_folder: Option<PathBuf>) -> Self {
        self.device_map = Some(map);
        self.offload_folder = offload_folder;
        self
    }

    /// Where quantized layers placed on the compute device keep their weights (default
    /// [`WeightResidence::Auto`]: on the device unless it is the host).
    pub fn with_residence(mut self, residence: WeightResidence) -> Self {
        self.residence = residence;
        self
    }

    /// Reports progress on `bar` (one tick per projection).
    pub fn with_progress(mut self, bar: ProgressBar) -> Self {
        self.progress = bar;
        self
    }

    /// The quantized layers built so far, by module name.
    pub fn into_layers(self) -> BTreeMap<String, QuantizedLinear> {
        self.into_parts().0
    }

    /// The quantized layers and the `keep_in_fp32_modules` projections built so far.
    #[allow(clippy::type_complexity)]
    pub fn into_parts(
        self,
    ) -> (
        BTreeMap<String, QuantizedLinear>,
        BTreeMap<String, Arc<Fp32Linear>>,
    ) {
        self.progress.finish_and_clear();
        (
            self.built.into_inner().unwrap_or_else(|e| e.into_inner()),
            self.kept_fp32
                .into_inner()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    fn bias(&self, spec: &LinearSpec, checkpoint: &Checkpoint) -> Result<Option<Vec<f32>>> {
        if !spec.bias {
            return Ok(None);
        }
        let (b, _) = read_float(checkpoint, &format!("{}.bias", spec.name))?;
        Ok(Some(b))
    }

    fn build_quantized(
        &self,
        spec: &LinearSpec,
        checkpoint: &Checkpoint,
    ) -> Result<Option<QuantizedLinear>> {
        let shape = [spec.out_features, spec.in_features];
        let layer = match stored_layout(checkpoint, &spec.name) {
            StoredLayout::FourBit(qt) => {
                let (weight, dtype) = read_four_bit(checkpoint, &spec.name, qt, shape)?;
                QuantizedLinear::FourBit(
                    Arc::new(Linear4bit::new(
                        weight,
                        self.bias(spec, checkpoint)?,
                        self.compute_dtype,
                        dtype,
                    )),
                    dtype,
                )
            }
            StoredLayout::Int8 => QuantizedLinear::Int8(Arc::new(Linear8bitLt::new(
                read_int8(checkpoint, &spec.name, shape)?,
                self.bias(spec, checkpoint)?,
                self.config.llm_int8_threshold,
            ))),
            StoredLayout::Float => {
                if !self.config.converts(&spec.name) {
                    return Ok(None);
                }
                let name = format!("{}.weight", spec.name);
                let (mut values, stored_shape) = read_float(checkpoint, &name)?;
                if stored_shape != shape {
                    return Err(QuantError::InconsistentState {
                        tensor: name,
                        reason: format!("shape {stored_shape:?}, the config implies {shape:?}"),
                    });
                }
                round_values(&mut values, self.torch_dtype);
                let _span = tracing::debug_span!("quantize", tensor = name.as_str()).entered();
                if self.config.load_in_4bit {
                    let weight = quantize_4bit(
                        &name,
                        &values,
                        &shape,
                        self.config.bnb_4bit_blocksize,
                        self.config.quant_type(),
                        self.config.bnb_4bit_use_double_quant,
                    )?;
                    QuantizedLinear::FourBit(
                        Arc::new(Linear4bit::new(
                            weight,
                            self.bias(spec, checkpoint)?,
                            self.compute_dtype,
                            self.torch_dtype,
                        )),
                        self.torch_dtype,
                    )
                } else {
                    QuantizedLinear::Int8(Arc::new(Linear8bitLt::new(
                        Int8Weight::quantize(&name, &values, shape[0], shape[1])?,
                        self.bias(spec, checkpoint)?,
                        self.config.llm_int8_threshold,
                    )))
                }
            }
        };
        Ok(Some(layer))
    }

    fn build_layer(
        &self,
        spec: &LinearSpec,
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<LinearLayer> {
        let placement = self
            .device_map
            .as_ref()
            .map_or(Placement::Device, |m| m.placement(&spec.name));
        let folder = || {
            self.offload_folder
                .as_deref()
                .ok_or_else(|| QuantError::DeviceMap {
                    reason: format!(
                        "{} is placed on disk but no offload folder was given",
                        spec.name
                    ),
                })
        };
        let Some(mut layer) = self.build_quantized(spec, checkpoint)? else {
            // Dense projections (lm_head, skip_modules, keep_in_fp32_modules) honour the
            // placement too; keep_in_fp32_modules are built in f32 whatever the model's dtype.
            let keep = self.config.keeps_in_fp32(&spec.name);
            let dense_dtype = if keep { DType::F32 } else { dtype };
            let dense = match placement {
                Placement::Device => DenseFactory.build(spec, checkpoint, device, dense_dtype)?,
                Placement::Cpu => LinearLayer::custom(Arc::new(CpuDenseLinear::load(
                    spec,
                    checkpoint,
                    dense_dtype,
                )?)),
                Placement::Disk => LinearLayer::custom(Arc::new(DiskDenseLinear::write(
                    folder()?,
                    spec,
                    checkpoint,
                    dense_dtype,
                )?)),
            };
            if !keep {
                return Ok(dense);
            }
            let kept = Arc::new(Fp32Linear::new(
                &spec.name,
                dense,
                [spec.out_features, spec.in_features],
            ));
            self.kept_fp32
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(spec.name.clone(), kept.clone());
            return Ok(LinearLayer::custom(kept));
        };
        if placement == Placement::Device && self.residence.on_device(device) {
            layer = self.to_device_resident(spec, layer, device)?;
        }
        let op: Arc<dyn LinearOp> = match (&placement, &layer) {
            (Placement::Disk, _) => Arc::new(DiskLinear::write(folder()?, &spec.name, &layer)?),
            (_, QuantizedLinear::FourBit(l, _)) => l.clone(),
            (_, QuantizedLinear::Int8(l)) => l.clone(),
        };
        self.built
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.name.clone(), layer);
        Ok(LinearLayer::custom(op))
    }
}

impl QuantizingFactory {
    /// Moves `layer` (host form) onto `device`; keeps it in host form, with a warning, when
    /// the device cannot compute in the layer's dtype.
    fn to_device_resident(
        &self,
        spec: &LinearSpec,
        layer: QuantizedLinear,
        device: &Device,
    ) -> Result<QuantizedLinear> {
        let moved = match &layer {
            QuantizedLinear::FourBit(l, dtype) => l
                .to_device_resident(device)
                .map(|r| QuantizedLinear::FourBit(Arc::new(r), *dtype)),
            QuantizedLinear::Int8(l) => l
                .to_device_resident(device)
                .map(|r| QuantizedLinear::Int8(Arc::new(r))),
        };
        match moved {
            Ok(moved) => Ok(moved),
            Err(QuantError::Tensor(err))
                if matches!(*err, cachet_tensor::TensorError::UnsupportedDType { .. }) =>
            {
                tracing::warn!(
                    module = spec.name.as_str(),
                    %err,
                    "keeping the quantized weights in host memory"
                );
                Ok(layer)
            }
            Err(err) => Err(err),
        }
    }
}

impl LinearFactory for QuantizingFactory {
    fn build(
        &self,
        spec: &LinearSpec,
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> cachet_nn::Result<LinearLayer> {
        let out = self.build_layer(spec, checkpoint, device, dtype);
        self.progress.inc(1);
        self.progress.set_message(spec.name.clone());
        Ok(out?)
    }
}
