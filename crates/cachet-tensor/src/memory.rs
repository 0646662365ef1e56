//! Memory accounting: how many bytes tensors, and collections of them, hold.
//!
//! Caches report their footprint through [`MemoryFootprint`], so a generation loop can compare it
//! with a device budget before it allocates.

use burn::tensor::{Device, Tensor, TensorData, kind::Basic};

/// Bytes held by one tensor: element count times element size (no allocator padding).
pub fn tensor_bytes<const D: usize, K: Basic>(tensor: &Tensor<D, K>) -> usize {
    tensor.shape().num_elements() * tensor.dtype().size()
}

/// Bytes the device's allocator has in use now, where the backend reports it (GPU backends do).
pub fn device_bytes_in_use(device: &Device) -> Option<u64> {
    device.memory_pool_usage().map(|usage| usage.bytes_in_use)
}

/// Something that holds tensors and can say how many bytes they take.
pub trait MemoryFootprint {
    /// Total bytes of tensor data held.
    fn memory_bytes(&self) -> usize;
}

impl<const D: usize, K: Basic> MemoryFootprint for Tensor<D, K> {
    fn memory_bytes(&self) -> usize {
        tensor_bytes(self)
    }
}

impl MemoryFootprint for TensorData {
    fn memory_bytes(&self) -> usize {
        self.as_bytes().len()
    }
}

impl<T: MemoryFootprint> MemoryFootprint for Option<T> {
    fn memory_bytes(&self) -> usize {
        self.as_ref().map_or(0, T::memory_bytes)
    }
}

impl<T: MemoryFootprint> MemoryFootprint for [T] {
    fn memory_bytes(&self) -> usize {
        self.iter().map(T::memory_bytes).sum()
    }
}

impl<T: MemoryFootprint> MemoryFootprint for Vec<T> {
    fn memory_bytes(&self) -> usize {
        self.as_slice().memory_bytes()
    }
}

impl<A: MemoryFootprint, B: MemoryFootprint> MemoryFootprint for (A, B) {
    fn memory_bytes(&self) -> usize {
        self.0.memory_bytes() + self.1.memory_bytes()
    }
}

impl<T: MemoryFootprint + ?Sized> MemoryFootprint for &T {
    fn memory_bytes(&self) -> usize {
        (**self).memory_bytes()
    }
}

/// Physical memory of this machine (`MemTotal` of /proc/meminfo), when the OS says: the bound
/// preallocating structures (static and windowed KV caches) are checked against before they
/// allocate, so an absurd size is an error naming it instead of an allocation abort.
/// Read once per process: a cache asks at its first update of every layer.
pub fn host_memory_bytes() -> Option<u64> {
    static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// Formats a byte count for people (`1.50 MiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Tunes the C allocator of this process for inference on the host: freed activation buffers
/// stay in the heap for the next step instead of going back to the OS, since every step frees
/// and allocates the same sizes and each fresh page costs a fault. A binary calls this once at
/// start; it is a no-op off glibc.
pub fn tune_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // glibc's malloc.h: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3 (at most 32 MiB on
        // 64-bit targets).
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::DType;

    #[test]
    fn counts_elements_times_dtype_size() {
        let device = Device::flex();
        let a = Tensor::<3>::zeros([2, 3, 4], (&device, DType::F32));
        let b = Tensor::<2>::zeros([5, 6], (&device, DType::F16));
        assert_eq!(tensor_bytes(&a), 2 * 3 * 4 * 4);
        assert_eq!(b.memory_bytes(), 5 * 6 * 2);
        let pair = (a.clone(), Some(b.clone()));
        assert_eq!(pair.memory_bytes(), 96 + 60);
        let layers = vec![
            (a.clone(), a),
            (b.clone().reshape([5, 6, 1]), b.reshape([1, 5, 6])),
        ];
        assert_eq!(layers.memory_bytes(), 2 * 96 + 2 * 60);
        assert_eq!(None::<Tensor<1>>.memory_bytes(), 0);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.00 MiB");
    }
}
