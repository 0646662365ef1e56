//! Backends and devices: which ones this build has, and parsing a device from a string.
//!
//! burn 0.22 chooses the backend at run time from the [`Device`] value. Libraries never enable a
//! backend; binaries enable `flex` (the CPU default) and/or `wgpu` on this crate, and users pick
//! among the compiled ones with strings such as `cpu`, `wgpu:1` or `auto`.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{Result, TensorError};

/// A device as the user names it; [`DeviceSpec::init`] turns it into a burn [`Device`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// burn's `flex` CPU backend (`cpu` or `flex`).
    Cpu,
    /// A wgpu adapter.
    Wgpu(WgpuAdapter),
    /// The first GPU that initialises, else the CPU.
    Auto,
}

/// Which wgpu adapter to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WgpuAdapter {
    /// wgpu's preferred adapter (`wgpu`).
    Default,
    /// The N-th discrete GPU (`wgpu:N`).
    Discrete(usize),
    /// The N-th integrated GPU (`wgpu:integrated:N`).
    Integrated(usize),
    /// The N-th virtual GPU (`wgpu:virtual:N`).
    Virtual(usize),
    /// A software adapter such as Mesa's llvmpipe (`wgpu:cpu`).
    Software,
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Wgpu(WgpuAdapter::Default) => f.write_str("wgpu"),
            DeviceSpec::Wgpu(WgpuAdapter::Discrete(i)) => write!(f, "wgpu:{i}"),
            DeviceSpec::Wgpu(WgpuAdapter::Integrated(i)) => write!(f, "wgpu:integrated:{i}"),
            DeviceSpec::Wgpu(WgpuAdapter::Virtual(i)) => write!(f, "wgpu:virtual:{i}"),
            DeviceSpec::Wgpu(WgpuAdapter::Software) => f.write_str("wgpu:cpu"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = TensorError;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason: &str| TensorError::InvalidDevice {
            spec: s.to_string(),
            reason: reason.to_string(),
        };
        let lower = s.trim().to_ascii_lowercase();
        let mut parts = lower.split(':');
        let head = parts.next().unwrap_or_default();
        let rest: Vec<&str> = parts.collect();
        let index = |text: &str| {
            text.parse::<usize>()
                .map_err(|_| invalid(&format!("{text:?} is not a device index")))
        };
        match (head, rest.as_slice()) {
            ("cpu" | "flex", []) => Ok(DeviceSpec::Cpu),
            ("auto", []) => Ok(DeviceSpec::Auto),
            ("wgpu" | "gpu", []) => Ok(DeviceSpec::Wgpu(WgpuAdapter::Default)),
            ("wgpu" | "gpu", ["cpu" | "software"]) => Ok(DeviceSpec::Wgpu(WgpuAdapter::Software)),
            ("wgpu" | "gpu", ["integrated", i]) => {
                Ok(DeviceSpec::Wgpu(WgpuAdapter::Integrated(index(i)?)))
            }
            ("wgpu" | "gpu", ["virtual", i]) => {
                Ok(DeviceSpec::Wgpu(WgpuAdapter::Virtual(index(i)?)))
            }
            ("wgpu" | "gpu", ["discrete", i] | [i]) => {
                Ok(DeviceSpec::Wgpu(WgpuAdapter::Discrete(index(i)?)))
            }
            ("wgpu" | "gpu", _) => Err(invalid("unrecognised wgpu adapter")),
            ("", _) => Err(invalid("empty device name")),
            ("cpu" | "flex" | "auto", _) => Err(invalid("this device takes no index")),
            _ => Err(invalid(&format!("unknown backend {head:?}"))),
        }
    }
}

impl DeviceSpec {
    /// Opens the device, failing with a typed error if its backend is not compiled in or no
    /// adapter initialises. Safe to call repeatedly and from any thread.
    pub fn init(&self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => cpu_device(),
            DeviceSpec::Wgpu(adapter) => wgpu_device(*adapter, &self.to_string()),
            DeviceSpec::Auto => match wgpu_device(WgpuAdapter::Default, "auto") {
                Ok(device) => Ok(device),
                Err(err) => {
                    tracing::info!(%err, "no GPU adapter, falling back to the CPU");
                    cpu_device()
                }
            },
        }
    }
}

/// Whether `device` is the host: the CPU backend that the `cpu` spec opens. There host kernels
/// run (much faster than tensor ops on the CPU) and host-side stores live.
pub fn is_host_device(device: &Device) -> bool {
    cpu_device().is_ok_and(|cpu| cpu == *device)
}

/// The CPU device (burn's `flex` backend).
pub fn cpu_device() -> Result<Device> {
    #[cfg(feature = "flex")]
    {
        Ok(Device::flex())
    }
    #[cfg(not(feature = "flex"))]
    {
        Err(TensorError::BackendNotCompiled { backend: "flex" })
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device(adapter: WgpuAdapter, spec: &str) -> Result<Device> {
    use burn::tensor::DeviceKind;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    // burn refuses to initialise the same wgpu runtime twice, so opened devices are kept here.
    static OPENED: OnceLock<Mutex<HashMap<WgpuAdapter, Device>>> = OnceLock::new();
    let mut opened = OPENED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(device) = opened.get(&adapter) {
        return Ok(device.clone());
    }
    let kind = match adapter {
        WgpuAdapter::Default => DeviceKind::DefaultDevice,
        WgpuAdapter::Discrete(i) => DeviceKind::DiscreteGpu(i),
        WgpuAdapter::Integrated(i) => DeviceKind::IntegratedGpu(i),
        WgpuAdapter::Virtual(i) => DeviceKind::VirtualGpu(i),
        WgpuAdapter::Software => DeviceKind::Cpu,
    };
    let _span = tracing::info_span!("wgpu_init", spec).entered();
    let device = Device::wgpu_options()
        .device_kind(kind)
        .init()
        .map_err(|err| TensorError::NoAdapter {
            backend: "wgpu",
            spec: spec.to_string(),
            reason: err.to_string(),
        })?;
    opened.insert(adapter, device.clone());
    Ok(device)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(_adapter: WgpuAdapter, _spec: &str) -> Result<Device> {
    Err(TensorError::BackendNotCompiled { backend: "wgpu" })
}

/// One backend of this build, for `cachet info`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendInfo {
    /// Backend name.
    pub name: &'static str,
    /// Whether this binary was built with it.
    pub compiled: bool,
    /// The device it opens by default, or why it could not open one.
    pub status: String,
}

/// Lists the backends this build knows, probing each compiled one by opening its default device.
pub fn available_backends() -> Vec<BackendInfo> {
    let probe = |spec: DeviceSpec| match spec.init() {
        Ok(device) => format!("ok: {device:?}"),
        Err(err) => format!("unavailable: {err}"),
    };
    vec![
        BackendInfo {
            name: "flex",
            compiled: cfg!(feature = "flex"),
            status: probe(DeviceSpec::Cpu),
        },
        BackendInfo {
            name: "wgpu",
            compiled: cfg!(feature = "wgpu"),
            status: probe(DeviceSpec::Wgpu(WgpuAdapter::Default)),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let cases = [
            ("cpu", DeviceSpec::Cpu),
            ("FLEX", DeviceSpec::Cpu),
            ("auto", DeviceSpec::Auto),
            ("wgpu", DeviceSpec::Wgpu(WgpuAdapter::Default)),
            ("wgpu:1", DeviceSpec::Wgpu(WgpuAdapter::Discrete(1))),
            (
                "wgpu:integrated:0",
                DeviceSpec::Wgpu(WgpuAdapter::Integrated(0)),
            ),
            ("wgpu:virtual:2", DeviceSpec::Wgpu(WgpuAdapter::Virtual(2))),
            ("wgpu:cpu", DeviceSpec::Wgpu(WgpuAdapter::Software)),
        ];
        for (text, want) in cases {
            let got: DeviceSpec = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            let again: DeviceSpec = got.to_string().parse().unwrap();
            assert_eq!(again, want, "display of {text} round-trips");
        }
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (text, needle) in [
            ("", "empty"),
            ("cuda", "unknown backend"),
            ("wgpu:x", "not a device index"),
            ("cpu:0", "takes no index"),
            ("wgpu:1:2", "unrecognised wgpu adapter"),
        ] {
            let err = text.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_feature_is_a_typed_error() {
        let err = DeviceSpec::Wgpu(WgpuAdapter::Default).init().unwrap_err();
        assert!(matches!(
            err,
            TensorError::BackendNotCompiled { backend: "wgpu" }
        ));
    }
}
