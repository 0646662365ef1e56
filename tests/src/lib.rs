//! Shared helpers of cachet's workspace-level integration tests.

use std::path::PathBuf;

use cachet_tensor::{Device, DeviceSpec};

/// The device integration tests run on: `CACHET_TEST_DEVICE` if set, else wgpu when this build
/// has it, else the CPU. `None` (after printing why) when the device cannot be opened, so a
/// machine without a GPU adapter skips the wgpu pass loudly instead of failing or passing silently.
pub fn test_device() -> Option<Device> {
    let spec = std::env::var("CACHET_TEST_DEVICE").unwrap_or_else(|_| {
        if cfg!(feature = "wgpu") {
            "wgpu"
        } else {
            "cpu"
        }
        .to_string()
    });
    let spec: DeviceSpec = spec
        .parse()
        .expect("CACHET_TEST_DEVICE must be a device string");
    match spec.init() {
        Ok(device) => {
            static ANNOUNCED: std::sync::Once = std::sync::Once::new();
            ANNOUNCED.call_once(|| eprintln!("cachet integration tests run on {spec}: {device:?}"));
            Some(device)
        }
        Err(err) => {
            // `cargo xtask ci --wgpu` sets this where a Vulkan driver is installed: there a
            // device that does not open is a failure, not a skip.
            assert!(
                std::env::var_os("CACHET_REQUIRE_DEVICE").is_none(),
                "cannot open test device {spec} and CACHET_REQUIRE_DEVICE is set: {err}"
            );
            eprintln!("SKIPPED: cannot open test device {spec}: {err}");
            None
        }
    }
}

/// Path of a committed fixture under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A JSON array of token ids (as the golden files store them).
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("a JSON array of token ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect()
}

/// A committed JSON fixture, parsed.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}
