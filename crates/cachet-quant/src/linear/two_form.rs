//! [`TwoForm`]: the host / device-resident plumbing every quantized layer format shares.

use std::fmt;
use std::sync::Arc;

use burn::module::{Module, ModuleDisplay};
use burn::tensor::{Device, Tensor, TensorData};
use cachet_nn::LinearOp;

use crate::device::{DEFAULT_TILE_BYTES, WeightResidence};
use crate::error::Result;

/// The host form of a quantized format: weights in host memory, run by a host kernel.
pub trait HostForm: fmt::Debug + Clone + Send + Sync + 'static {
    /// Output and input features.
    fn dims(&self) -> (usize, usize);

    /// `y = x · Wᵀ + b` for row-major `x` `[rows, in]` on the host (f32 in, f32 out).
    fn forward_host(&self, x: &[f32], rows: usize) -> Vec<f32>;

    /// Host bytes of the weights and bias.
    fn memory_bytes(&self) -> usize;
}

/// The device-resident form of a quantized format: weights packed on the compute device, run
/// by tensor ops there; converts to and from its [`HostForm`] bit for bit.
pub trait DeviceForm: Module + ModuleDisplay + fmt::Debug + Send + Sync + 'static {
    /// The host form of the same format.
    type Host: HostForm;

    /// Uploads `host` to `device`; `tile_bytes` bounds the forward's transient memory per tile
    /// of output rows.
    fn upload(host: &Self::Host, device: &Device, tile_bytes: usize) -> Result<Self>;

    /// Reads the weights back to host form, bit-identical to what was uploaded.
    fn download(&self) -> Result<Self::Host>;

    /// `[out, in]`.
    fn shape(&self) -> [usize; 2];

    /// The device the weights live on.
    fn device(&self) -> Device;

    /// Sets the bound on the forward's transient memory per tile.
    fn set_tile_bytes(&mut self, tile_bytes: usize);

    /// `y = x · Wᵀ + b` for `x` `[.., in]` on the weights' device, in `x`'s dtype; an error
    /// when a value the forward reads back from the device does not arrive.
    fn forward<const N: usize>(&self, x: Tensor<N>) -> Result<Tensor<N>>;

    /// Bytes the weights take on the device.
    fn memory_bytes(&self) -> usize;
}

/// A quantized linear layer in one of two forms, chosen by the compute device at load: the
/// host form `H` (weights in host memory, host kernels; for the host device) or the
/// device-resident form `R` (weights packed on the device, tensor ops there; for a GPU).
/// A burn module (embed it in any `#[derive(Module)]` struct) and a [`LinearOp`].
#[derive(Module, Debug)]
pub struct TwoForm<H: HostForm, R: DeviceForm<Host = H>> {
    /// Device-resident weights (`None` in the host form).
    resident: Option<R>,
    /// Host-form weights, shared between clones (`None` when device-resident).
    #[module(skip)]
    host: Option<Arc<H>>,
}

/// The form a quantized layer is in, borrowed: host weights or device-resident ones.
pub(super) enum Form<'a, H, R> {
    Host(&'a Arc<H>),
    Resident(&'a R),
}

impl<H: HostForm, R: DeviceForm<Host = H>> From<H> for TwoForm<H, R> {
    /// A layer in host form.
    fn from(host: H) -> Self {
        Self {
            resident: None,
            host: Some(Arc::new(host)),
        }
    }
}

impl<H: HostForm, R: DeviceForm<Host = H>> TwoForm<H, R> {
    /// The form this layer is in; exactly one of `resident` / `host` is set by construction.
    pub(super) fn form(&self) -> Form<'_, H, R> {
        match (&self.resident, &self.host) {
            (Some(r), _) => Form::Resident(r),
            (None, Some(h)) => Form::Host(h),
            (None, None) => unreachable!("a quantized layer is built host or device-resident"),
        }
    }

    /// This layer with its weights on `device` (uploaded, or moved from another device),
    /// forward by tensor ops there, even when `device` is the host.
    pub fn to_device_resident(&self, device: &Device) -> Result<Self> {
        self.to_device_resident_with(device, DEFAULT_TILE_BYTES)
    }

    /// [`TwoForm::to_device_resident`] with a bound on the forward's transient memory per
    /// tile of output rows (`tile_bytes`; the default is [`DEFAULT_TILE_BYTES`]).
    pub fn to_device_resident_with(&self, device: &Device, tile_bytes: usize) -> Result<Self> {
        let mut resident = match self.form() {
            Form::Resident(r) => r.clone().to_device(device),
            Form::Host(h) => R::upload(h, device, tile_bytes)?,
        };
        resident.set_tile_bytes(tile_bytes);
        Ok(Self {
            resident: Some(resident),
            host: None,
        })
    }

    /// This layer in host form (read back from the device if it is device-resident).
    pub fn to_host_form(&self) -> Result<Self> {
        Ok(Self {
            resident: None,
            host: Some(self.host_copy()?),
        })
    }

    /// This layer in the form `residence` gives for `device`: device-resident on a GPU, host
    /// form on the host device (with [`WeightResidence::Auto`]).
    pub fn for_device(self, device: &Device, residence: WeightResidence) -> Result<Self> {
        match (residence.on_device(device), &self.resident) {
            (true, Some(r)) if DeviceForm::device(r) == *device => Ok(self),
            (true, _) => self.to_device_resident(device),
            (false, None) => Ok(self),
            (false, Some(_)) => self.to_host_form(),
        }
    }

    /// Whether the weights live on a compute device (rather than in host memory).
    pub fn is_device_resident(&self) -> bool {
        self.resident.is_some()
    }

    /// The host form, if this is one.
    pub fn host(&self) -> Option<&H> {
        self.host.as_deref()
    }

    /// The device-resident form, if this is one.
    pub fn resident(&self) -> Option<&R> {
        self.resident.as_ref()
    }

    /// The host form: shared if this is one, else read back from the device (bit-identical).
    pub fn host_copy(&self) -> Result<Arc<H>> {
        match self.form() {
            Form::Host(h) => Ok(h.clone()),
            Form::Resident(r) => Ok(Arc::new(r.download()?)),
        }
    }

    /// Output and input features.
    pub fn dims(&self) -> (usize, usize) {
        match self.form() {
            Form::Host(h) => h.dims(),
            Form::Resident(r) => {
                let [n, k] = r.shape();
                (n, k)
            }
        }
    }

    /// `y = x · Wᵀ + b` for `x` `[.., in]`, output in `x`'s dtype on `x`'s device; a failed
    /// read from a device (activations, or the int8 outlier columns) is a typed error.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Result<Tensor<D>> {
        match self.form() {
            Form::Resident(r) => r.forward(x),
            Form::Host(h) => via_host(x, h.dims().0, |data, rows| Ok(h.forward_host(data, rows))),
        }
    }
}

impl<H: HostForm, R: DeviceForm<Host = H>> LinearOp for TwoForm<H, R> {
    fn forward(&self, x: Tensor<3>) -> cachet_nn::Result<Tensor<3>> {
        Ok(TwoForm::forward(self, x)?)
    }

    fn has_host_forward(&self) -> bool {
        matches!(self.form(), Form::Host(_))
    }

    fn forward_host(&self, x: &[f32], rows: usize) -> cachet_nn::Result<Option<Vec<f32>>> {
        Ok(match self.form() {
            Form::Host(h) => Some(h.forward_host(x, rows)),
            Form::Resident(_) => None,
        })
    }

    fn in_features(&self) -> usize {
        self.dims().1
    }

    fn out_features(&self) -> usize {
        self.dims().0
    }

    /// Host bytes (codes, scales, bias) in the host form; device bytes when device-resident.
    fn memory_bytes(&self) -> usize {
        match self.form() {
            Form::Resident(r) => r.memory_bytes(),
            Form::Host(h) => h.memory_bytes(),
        }
    }
}

/// Runs a host kernel `f` (`[rows, in]` f32 → `[rows, out]` f32) on `x` `[.., in]`: the
/// activations travel to the host and the result back to `x`'s device, in `x`'s dtype.
pub(crate) fn via_host<const D: usize>(
    x: Tensor<D>,
    out_features: usize,
    f: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Tensor<D>> {
    let device = x.device();
    let dtype = x.dtype();
    let mut dims = x.dims();
    let (data, rows) = cachet_nn::tensor_to_host(x)?;
    let out = f(&data, rows)?;
    dims[D - 1] = out_features;
    Ok(Tensor::<D>::from_data(
        TensorData::new(out, dims),
        (&device, dtype),
    ))
}
