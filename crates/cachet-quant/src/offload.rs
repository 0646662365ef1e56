//! Disk offload that keeps layers quantized: a `disk` layer's 4-bit or int8 tensors are written
//! to the offload folder in transformers' layout, memory-mapped, and read on each use.

use std::fmt;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use cachet_models::LinearOp;
use cachet_tensor::{Checkpoint, Precision};

use crate::error::{QuantError, Result};
use crate::linear::{Linear4bit, Linear8bitLt};
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

#[derive(Clone, Copy)]
enum Kind {
    FourBit(crate::codes::QuantType, Precision),
    Int8(f32),
}

/// A quantized layer that lives on disk and is loaded on use.
pub struct DiskLinear {
    path: PathBuf,
    checkpoint: Checkpoint,
    name: String,
    kind: Kind,
    shape: [usize; 2],
    bias: Option<Vec<f32>>,
}

impl fmt::Debug for DiskLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskLinear")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("shape", &self.shape)
            .finish()
    }
}

impl DiskLinear {
    /// Writes `layer` to `folder/<name>.safetensors` and maps it.
    pub fn write(folder: &Path, name: &str, layer: &QuantizedLinear) -> Result<Self> {
        let path = folder.join(format!("{name}.safetensors"));
        cachet_tensor::safetensors::save(&path, &layer.tensors(name), None).map_err(|e| {
            QuantError::OffloadFolder {
                path: folder.to_path_buf(),
                reason: format!("writing {}: {e}", path.display()),
            }
        })?;
        let checkpoint = Checkpoint::open(&path)?;
        let (kind, shape, bias) = match layer {
            QuantizedLinear::FourBit(l, _) => (
                Kind::FourBit(l.weight.quant_type, l.compute_dtype),
                [l.weight.shape[0], l.weight.shape[1]],
                l.bias.clone(),
            ),
            QuantizedLinear::Int8(l) => (
                Kind::Int8(l.threshold),
                [l.weight.rows, l.weight.cols],
                l.bias.clone(),
            ),
        };
        Ok(Self {
            path,
            checkpoint,
            name: name.to_string(),
            kind,
            shape,
            bias,
        })
    }

    /// `y = x · Wᵀ + b` on the host, reading the weight from the mapping.
    pub fn forward_host(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let _span = tracing::trace_span!("disk_linear", name = self.name.as_str()).entered();
        Ok(match self.kind {
            Kind::FourBit(qt, compute) => {
                let (weight, dtype) = read_four_bit(&self.checkpoint, &self.name, qt, self.shape)?;
                Linear4bit {
                    weight,
                    bias: self.bias.clone(),
                    compute_dtype: compute,
                    weight_dtype: dtype,
                }
                .forward_host(x, rows)
            }
            Kind::Int8(threshold) => Linear8bitLt {
                weight: read_int8(&self.checkpoint, &self.name, self.shape)?,
                bias: self.bias.clone(),
                threshold,
            }
            .forward_host(x, rows),
        })
    }
}

impl LinearOp for DiskLinear {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let device = x.device();
        let dtype = x.dtype();
        let [b, s, _] = x.dims();
        let data = x
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 data");
        let out = self
            .forward_host(&data, b * s)
            .unwrap_or_else(|e| panic!("disk-offloaded layer {}: {e}", self.name));
        Tensor::<3>::from_data(
            TensorData::new(out, [b, s, self.shape[0]]),
            (&device, dtype),
        )
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
