//! Host/device movement for offloading: park tensors in host memory, bring them back, and
//! prefetch the next one on a background thread while the current one computes.
//!
//! burn 0.22 has no asynchronous copy API, so [`Prefetch`] overlaps a transfer with compute by
//! running the upload on its own thread; the compute thread only blocks if it asks for the
//! tensor before the copy has finished.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::{DType, Device, Float, Int, Tensor, TensorData, kind::Basic};

use crate::error::{Result, TensorError};
use crate::memory::MemoryFootprint;

/// A tensor parked in host memory: its bytes, shape and dtype, owned by no device.
#[derive(Debug, Clone)]
pub struct HostTensor {
    data: Arc<TensorData>,
}

impl HostTensor {
    /// Reads a tensor back from its device into host memory (waits for pending work on it).
    pub fn from_tensor<const D: usize, K: Basic>(tensor: Tensor<D, K>) -> Result<Self> {
        let data = tensor
            .try_into_data()
            .map_err(|err| TensorError::Transfer {
                what: "tensor to host".into(),
                reason: err.to_string(),
            })?;
        Ok(Self::from_data(data))
    }

    /// Wraps host data already in memory.
    pub fn from_data(data: TensorData) -> Self {
        Self {
            data: Arc::new(data),
        }
    }

    /// The host data.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Shape of the parked tensor.
    pub fn shape(&self) -> &[usize] {
        self.data.shape().as_slice()
    }

    /// Stored dtype.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Uploads a float tensor of rank `D` to `device`, keeping its dtype.
    pub fn to_device<const D: usize>(&self, device: &Device) -> Tensor<D, Float> {
        Tensor::from_data((*self.data).clone(), (device, self.dtype()))
    }

    /// Uploads an integer tensor of rank `D` to `device`, keeping its dtype.
    pub fn to_device_int<const D: usize>(&self, device: &Device) -> Tensor<D, Int> {
        Tensor::from_data((*self.data).clone(), (device, self.dtype()))
    }

    /// Starts uploading to `device` on a background thread; see [`Prefetch`].
    pub fn prefetch<const D: usize>(&self, device: &Device) -> Prefetch<Tensor<D, Float>> {
        let host = self.clone();
        let device = device.clone();
        Prefetch::spawn("host tensor upload", move || {
            let tensor = host.to_device::<D>(&device);
            // Make sure the copy really happened on this thread, not lazily at first use.
            device.sync().map_err(|err| TensorError::Transfer {
                what: "prefetch upload".into(),
                reason: err.to_string(),
            })?;
            Ok(tensor)
        })
    }
}

impl MemoryFootprint for HostTensor {
    fn memory_bytes(&self) -> usize {
        self.data.as_bytes().len()
    }
}

/// A transfer running on a background thread, overlapping with whatever the caller computes.
///
/// [`Prefetch::wait`] returns the result and how long the caller actually blocked, so offloaded
/// caches can report the overlap they achieved (`1 - blocked / transfer time`).
#[derive(Debug)]
pub struct Prefetch<T> {
    what: &'static str,
    handle: JoinHandle<Result<(T, Duration)>>,
}

/// What [`Prefetch::wait`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferTiming {
    /// Time the background thread spent on the transfer.
    pub transfer: Duration,
    /// Time the caller spent waiting for it.
    pub blocked: Duration,
}

impl TransferTiming {
    /// Fraction of the transfer hidden behind the caller's own work (1.0 = fully overlapped).
    pub fn overlap(&self) -> f64 {
        if self.transfer.is_zero() {
            return 1.0;
        }
        (1.0 - self.blocked.as_secs_f64() / self.transfer.as_secs_f64()).clamp(0.0, 1.0)
    }
}

impl<T: Send + 'static> Prefetch<T> {
    /// Runs `work` on a new background thread.
    pub fn spawn(what: &'static str, work: impl FnOnce() -> Result<T> + Send + 'static) -> Self {
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let value = work()?;
            Ok((value, start.elapsed()))
        });
        Self { what, handle }
    }

    /// Whether the transfer has finished (never blocks).
    pub fn is_ready(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the transfer; returns the value and the timing of the overlap.
    pub fn wait(self) -> Result<(T, TransferTiming)> {
        let start = Instant::now();
        let joined = self.handle.join().map_err(|panic| TensorError::Transfer {
            what: self.what.into(),
            reason: panic_message(&panic),
        })?;
        let blocked = start.elapsed();
        let (value, transfer) = joined?;
        Ok((value, TransferTiming { transfer, blocked }))
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        format!("transfer thread panicked: {text}")
    } else if let Some(text) = panic.downcast_ref::<String>() {
        format!("transfer thread panicked: {text}")
    } else {
        "transfer thread panicked".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_host_memory() {
        let device = Device::flex();
        let x = Tensor::<2>::from_data([[1.0f32, 2.0], [3.0, -4.5]], &device);
        let host = HostTensor::from_tensor(x.clone()).unwrap();
        assert_eq!(host.shape(), &[2, 2]);
        assert_eq!(host.memory_bytes(), 16);
        let back = host.to_device::<2>(&device);
        assert_eq!(back.into_data(), x.clone().into_data());
        let (fetched, timing) = host.prefetch::<2>(&device).wait().unwrap();
        assert_eq!(fetched.into_data(), x.into_data());
        assert!((0.0..=1.0).contains(&timing.overlap()));
    }

    #[test]
    fn half_precision_survives_offload() {
        let device = Device::flex();
        let x = Tensor::<1>::from_data([0.5f32, 1.25, -3.0], (&device, DType::BF16));
        let host = HostTensor::from_tensor(x).unwrap();
        assert_eq!(host.dtype(), DType::BF16);
        let back = host.to_device::<1>(&device);
        assert_eq!(back.dtype(), DType::BF16);
        let values = back
            .into_data()
            .try_cast(DType::F32)
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(values, vec![0.5, 1.25, -3.0]);
    }

    #[test]
    fn a_failing_transfer_is_an_error_not_a_panic() {
        let prefetch: Prefetch<()> = Prefetch::spawn("test", || panic!("boom"));
        let err = prefetch.wait().unwrap_err().to_string();
        assert!(err.contains("boom"), "{err}");
    }
}
