//! A tour of cachet-tensor: open a device from a string, check a dtype, count bytes, park a
//! tensor in host memory and prefetch it back, and round-trip a safetensors file.
//!
//! Run with `cargo run -p cachet-tensor --example tensor_tour [-- DEVICE]` (default `cpu`).

use std::collections::BTreeMap;

use cachet_tensor::safetensors::{Checkpoint, save_tensors};
use cachet_tensor::{
    DeviceSpec, HostTensor, MemoryFootprint, Precision, Tensor, cast_checked, human_bytes,
    supports_dtype,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec: DeviceSpec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "cpu".into())
        .parse()?;
    let device = spec.init()?;
    println!("device {spec}: {device:?}");
    for precision in [Precision::F32, Precision::F16, Precision::BF16] {
        println!(
            "  {precision}: supported = {}",
            supports_dtype(&device, precision)
        );
    }

    let x = Tensor::<2>::from_data([[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &device);
    let half = cast_checked(x.clone(), Precision::F16)?;
    println!(
        "f32 tensor holds {}, as f16 {}",
        human_bytes(x.memory_bytes() as u64),
        human_bytes(half.memory_bytes() as u64)
    );

    // Offload to host memory, keep computing, then collect the prefetched copy.
    let host = HostTensor::from_tensor(x.clone())?;
    let pending = host.prefetch::<2>(&device);
    let busy = x.clone().matmul(x.clone().transpose());
    let (back, timing) = pending.wait()?;
    println!(
        "prefetch overlapped {:.0}% of the copy; result {:?}",
        timing.overlap() * 100.0,
        busy.dims()
    );
    assert_eq!(back.into_data(), x.clone().into_data());

    // Save and reload a checkpoint.
    let dir = std::env::temp_dir().join(format!("cachet-tensor-tour-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tour.safetensors");
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    save_tensors(&path, vec![("x".to_string(), x)], Some(&metadata))?;
    let checkpoint = Checkpoint::open(&path)?;
    let loaded = checkpoint.load_float::<2>("x", &device, Precision::BF16.dtype())?;
    println!(
        "reloaded {:?} as {:?} from {}",
        loaded.dims(),
        loaded.dtype(),
        path.display()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
