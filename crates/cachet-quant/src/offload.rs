//! `cpu` and `disk` placements of projections. Disk offload keeps layers quantized: a `disk`
//! layer's 4-bit or int8 tensors are written to the offload folder in transformers' layout,
//! memory-mapped, and read on each use ([`DiskLinear`]). Dense projections (`lm_head`,
//! `skip_modules`, `keep_in_fp32_modules`) are offloaded too: [`CpuDenseLinear`] keeps the
//! weight on the CPU backend and multiplies there, [`DiskDenseLinear`] maps it from the folder
//! and loads it onto the activations' device on use.
//!
//! A disk layer's file may be damaged after load (truncated, removed, overwritten): each use
//! checks it first and the forward returns [`QuantError::OffloadedFile`] naming the file,
//! never a panic, nor a read past the end of a truncated mapping (which would be a SIGBUS).
//! Truncation racing with the read itself cannot be caught: that is the price of the mapping.

use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{DType, Device, Tensor};
use cachet_nn::{DenseFactory, LinearFactory, LinearOp, LinearSpec};
use cachet_tensor::Precision;
use cachet_tensor::safetensors::{Checkpoint, SafetensorsError};

use crate::error::{QuantError, Result};
use crate::linear::{HostLinear4bit, HostLinear8bitLt, via_host};
use crate::load::QuantizedLinear;
use crate::serialize::{read_four_bit, read_int8};

/// Checks that `folder` exists (or can be created) and is writable.
pub fn check_folder(folder: &Path) -> Result<()> {
    let bad = |reason: String| QuantError::OffloadFolder {
        path: folder.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(folder).map_err(|e| bad(format!("cannot create it: {e}")))?;
    let probe = folder.join(format!(".cachet-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| bad(format!("not writable: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The file a `disk` layer maps, with its length when it was written: checked before each use.
struct MappedFile {
    path: PathBuf,
    len: u64,
    checkpoint: Checkpoint,
}

impl MappedFile {
    /// Maps `path`, just written.
    fn open(path: PathBuf) -> Result<Self> {
        let checkpoint = Checkpoint::open(&path)?;
        let len = std::fs::metadata(&path)
            .map_err(|source| QuantError::Io {
                op: "reading the length of",
                path: path.clone(),
                source,
            })?
            .len();
        Ok(Self {
            path,
            len,
            checkpoint,
        })
    }

    /// The mapping, once the file is known to be as long as it was written (one `stat`): a
    /// shorter file would make reading the mapping past its new end a SIGBUS.
    fn checkpoint(&self, module: &str) -> Result<&Checkpoint> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.len() >= self.len => Ok(&self.checkpoint),
            Ok(meta) => Err(self.damaged(
                module,
                format!(
                    "the file was truncated to {} bytes since it was written ({} bytes)",
                    meta.len(),
                    self.len
                ),
            )),
            Err(err) => Err(self.damaged(module, format!("the file is gone: {err}"))),
        }
    }

    /// The error of layer `module` whose file no longer reads back.
    fn damaged(&self, module: &str, reason: impl fmt::Display) -> QuantError {
        QuantError::OffloadedFile {
            module: module.to_string(),
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    FourBit(crate::codes::QuantType, Precision),
    Int8(f32),
}

/// A quantized layer that lives on disk and is loaded on use.
pub struct DiskLinear {
    file: MappedFile,
    name: String,
    kind: Kind,
    shape: [usize; 2],
    bias: Option<Vec<f32>>,
}

impl fmt::Debug for DiskLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskLinear")
            .field("name", &self.name)
            .field("path", &self.file.path)
            .field("shape", &self.shape)
            .finish()
    }
}

impl DiskLinear {
    /// Writes `layer` to `folder/<name>.safetensors` and maps it.
    pub fn write(folder: &Path, name: &str, layer: &QuantizedLinear) -> Result<Self> {
        let path = folder.join(format!("{name}.safetensors"));
        cachet_tensor::safetensors::save(&path, &layer.tensors(name)?, None).map_err(|e| {
            QuantError::OffloadFolder {
                path: folder.to_path_buf(),
                reason: format!("writing {}: {e}", path.display()),
            }
        })?;
        let file = MappedFile::open(path)?;
        let (kind, shape, bias) = match layer {
            QuantizedLinear::FourBit(l, _) => {
                let l = l.host_copy()?;
                (
                    Kind::FourBit(l.weight.quant_type, l.compute_dtype),
                    [l.weight.shape[0], l.weight.shape[1]],
                    l.bias.clone(),
                )
            }
            QuantizedLinear::Int8(l) => {
                let l = l.host_copy()?;
                (
                    Kind::Int8(l.threshold),
                    [l.weight.rows, l.weight.cols],
                    l.bias.clone(),
                )
            }
        };
        Ok(Self {
            file,
            name: name.to_string(),
            kind,
            shape,
            bias,
        })
    }

    /// `y = x · Wᵀ + b` on the host, reading the weight from the mapping; a file damaged since
    /// it was written is [`QuantError::OffloadedFile`].
    pub fn forward_host(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let _span = tracing::trace_span!("disk_linear", name = self.name.as_str()).entered();
        let checkpoint = self.file.checkpoint(&self.name)?;
        let damaged = |err: QuantError| self.file.damaged(&self.name, err);
        Ok(match self.kind {
            Kind::FourBit(qt, compute) => {
                let (weight, dtype) =
                    read_four_bit(checkpoint, &self.name, qt, self.shape).map_err(damaged)?;
                HostLinear4bit {
                    weight,
                    bias: self.bias.clone(),
                    compute_dtype: compute,
                    weight_dtype: dtype,
                }
                .forward_host(x, rows)
            }
            Kind::Int8(threshold) => HostLinear8bitLt {
                weight: read_int8(checkpoint, &self.name, self.shape).map_err(damaged)?,
                bias: self.bias.clone(),
                threshold,
            }
            .forward_host(x, rows),
        })
    }
}

impl LinearOp for DiskLinear {
    fn forward(&self, x: Tensor<3>) -> cachet_nn::Result<Tensor<3>> {
        Ok(via_host(x, self.shape[0], |data, rows| {
            self.forward_host(data, rows)
        })?)
    }

    // The product runs on the host either way: a model on the host chains it with its other
    // host layers (and computes exactly what the same layer kept in memory computes).
    fn has_host_forward(&self) -> bool {
        true
    }

    fn forward_host(&self, x: &[f32], rows: usize) -> cachet_nn::Result<Option<Vec<f32>>> {
        Ok(Some(DiskLinear::forward_host(self, x, rows)?))
    }

    fn in_features(&self) -> usize {
        self.shape[1]
    }

    fn out_features(&self) -> usize {
        self.shape[0]
    }

    fn memory_bytes(&self) -> usize {
        // Resident: the bias only; the weight is mapped from disk.
        self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// A dense (not quantized) projection placed on `cpu`: its weight lives in host memory on the
/// CPU backend and the product runs there; activations move to the host and back (accelerate's
/// meaning of `cpu`: the weights stay on the CPU).
pub struct CpuDenseLinear {
    name: String,
    linear: Linear,
    cpu: Device,
    shape: [usize; 2],
    bytes: usize,
}

impl fmt::Debug for CpuDenseLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuDenseLinear")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .finish()
    }
}

impl CpuDenseLinear {
    /// Loads projection `spec` from `checkpoint` onto the CPU backend in `dtype`.
    pub fn load(spec: &LinearSpec, checkpoint: &Checkpoint, dtype: DType) -> Result<Self> {
        let cpu = cachet_tensor::cpu_device().map_err(|e| QuantError::DeviceMap {
            reason: format!(
                "{} is placed on cpu, but the CPU backend is missing: {e}",
                spec.name
            ),
        })?;
        let layer = DenseFactory.build(spec, checkpoint, &cpu, dtype)?;
        let bytes = cachet_tensor::MemoryFootprint::memory_bytes(&layer);
        let linear = layer
            .as_dense()
            .cloned()
            .expect("DenseFactory builds dense layers");
        Ok(Self {
            name: spec.name.clone(),
            linear,
            cpu,
            shape: [spec.out_features, spec.in_features],
            bytes,
        })
    }
}

impl LinearOp for CpuDenseLinear {
    fn forward(&self, x: Tensor<3>) -> cachet_nn::Result<Tensor<3>> {
        let _span = tracing::trace_span!("cpu_dense_linear", name = self.name.as_str()).entered();
        let device = x.device();
        let y = self.linear.forward(x.to_device(&self.cpu));
        Ok(y.to_device(&device))
    }

    fn in_features(&self) -> usize {
        self.shape[1]
    }

    fn out_features(&self) -> usize {
        self.shape[0]
    }

    fn memory_bytes(&self) -> usize {
        self.bytes
    }
}

/// A dense (not quantized) projection placed on `disk`: its weight (and bias) are written to
/// `folder/<name>.safetensors` in the model's dtype, memory-mapped, and loaded onto the
/// activations' device on each use (accelerate's disk offload), then dropped.
pub struct DiskDenseLinear {
    file: MappedFile,
    name: String,
    shape: [usize; 2],
    bias: bool,
    dtype: DType,
}

impl fmt::Debug for DiskDenseLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskDenseLinear")
            .field("name", &self.name)
            .field("path", &self.file.path)
            .field("shape", &self.shape)
            .finish()
    }
}

impl DiskDenseLinear {
    /// Copies projection `spec` from `checkpoint` (cast to `dtype`) to
    /// `folder/<name>.safetensors`, one tensor at a time, and maps it.
    pub fn write(
        folder: &Path,
        spec: &LinearSpec,
        checkpoint: &Checkpoint,
        dtype: DType,
    ) -> Result<Self> {
        let shape = [spec.out_features, spec.in_features];
        let mut tensors = Vec::new();
        let mut names = vec![(format!("{}.weight", spec.name), shape.to_vec())];
        if spec.bias {
            names.push((format!("{}.bias", spec.name), vec![spec.out_features]));
        }
        for (name, want) in names {
            let info =
                checkpoint
                    .info(&name)
                    .ok_or_else(|| cachet_nn::ModelError::MissingWeight {
                        name: name.clone(),
                        module: spec.name.clone(),
                    })?;
            if info.shape != want {
                return Err(cachet_nn::ModelError::WeightShape {
                    name,
                    expected: want,
                    actual: info.shape.clone(),
                }
                .into());
            }
            if !info.dtype.is_loadable_float() {
                return Err(QuantError::UnsupportedDType {
                    tensor: name,
                    dtype: info.dtype.to_string(),
                });
            }
            let data = checkpoint.tensor_data(&name)?;
            let data = if data.dtype() == dtype {
                data
            } else {
                data.convert_dtype(dtype)
            };
            tensors.push((name, data));
        }
        let path = folder.join(format!("{}.safetensors", spec.name));
        cachet_tensor::safetensors::save(&path, &tensors, None).map_err(|e| {
            QuantError::OffloadFolder {
                path: folder.to_path_buf(),
                reason: format!("writing {}: {e}", path.display()),
            }
        })?;
        drop(tensors);
        Ok(Self {
            file: MappedFile::open(path)?,
            name: spec.name.clone(),
            shape,
            bias: spec.bias,
            dtype,
        })
    }

    /// The layer on `device`, read from the mapping; a file damaged since it was written is
    /// [`QuantError::OffloadedFile`].
    fn load(&self, device: &Device) -> Result<Linear> {
        let checkpoint = self.file.checkpoint(&self.name)?;
        let damaged = |err: SafetensorsError| self.file.damaged(&self.name, err);
        let weight = checkpoint
            .load_float::<2>(&format!("{}.weight", self.name), device, self.dtype)
            .map_err(damaged)?;
        let bias = if self.bias {
            Some(Param::from_tensor(
                checkpoint
                    .load_float::<1>(&format!("{}.bias", self.name), device, self.dtype)
                    .map_err(damaged)?,
            ))
        } else {
            None
        };
        // As DenseFactory builds it (same layout, same numbers).
        Ok(cachet_nn::burn_linear(weight, bias))
    }
}

impl LinearOp for DiskDenseLinear {
    fn forward(&self, x: Tensor<3>) -> cachet_nn::Result<Tensor<3>> {
        let _span = tracing::trace_span!("disk_dense_linear", name = self.name.as_str()).entered();
        let linear = self.load(&x.device())?;
        Ok(linear.forward(x))
    }

    fn in_features(&self) -> usize {
        self.shape[1]
    }

    fn out_features(&self) -> usize {
        self.shape[0]
    }

    fn memory_bytes(&self) -> usize {
        // Nothing resident: weight and bias are mapped from disk.
        0
    }
}
