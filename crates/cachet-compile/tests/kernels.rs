//! burn/cubecl kernel-cache sharing: a second machine starts with the first one's kernels.

mod support;

use std::fs;
use std::time::Duration;

use cachet_compile::CompileCache;
use cachet_compile::hub::{HubCache, HubOptions};
use cachet_compile::kernels::{self, KernelCacheKey};
use cachet_compile::local::LocalCache;
use support::hub_server::{HubServer, WRITE_TOKEN};

fn key(device: &str) -> KernelCacheKey {
    KernelCacheKey {
        device: device.into(),
        backend: "wgpu-vulkan".into(),
        burn_version: "0.22.1".into(),
        cubecl_version: "0.11.3".into(),
    }
}

fn machine(server: &HubServer, k: &KernelCacheKey) -> (tempfile::TempDir, CompileCache) {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubCache::new(
        "alice/kernels",
        HubOptions {
            endpoint: Some(server.url()),
            token: Some(WRITE_TOKEN.into()),
            timeout: Duration::from_secs(2),
            retries: 0,
            commit_attempts: 2,
            progress: false,
        },
    )
    .unwrap();
    let cache = CompileCache::with_hub(LocalCache::new(dir.path(), k.layout()), hub, true);
    (dir, cache)
}

#[test]
fn a_second_machine_starts_warm() {
    let server = HubServer::start();
    server.add_repo("alice/kernels", true);
    let k = key("NVIDIA H100 80GB HBM3");

    // Machine A warmed its kernel cache (cubecl's files, opaque to us).
    let a_kernels = tempfile::tempdir().unwrap();
    fs::create_dir_all(a_kernels.path().join("autotune/matmul")).unwrap();
    fs::write(
        a_kernels.path().join("autotune/matmul/key1.json"),
        b"{\"fastest\": 3}",
    )
    .unwrap();
    fs::write(a_kernels.path().join("kernels.db"), vec![9u8; 70_000]).unwrap();
    let (_a_dir, a) = machine(&server, &k);
    kernels::push(&a, &k, a_kernels.path()).unwrap();

    // Machine B: empty cubecl folder, same device/backend/versions.
    let b_kernels = tempfile::tempdir().unwrap();
    fs::write(b_kernels.path().join("kernels.db"), b"local newer db").unwrap();
    let (_b_dir, b) = machine(&server, &k);
    let restored = kernels::pull(&b, &k, b_kernels.path()).unwrap();
    assert_eq!(
        restored,
        Some(1),
        "one file restored, the existing one kept"
    );
    assert_eq!(
        fs::read(b_kernels.path().join("autotune/matmul/key1.json")).unwrap(),
        b"{\"fastest\": 3}"
    );
    assert_eq!(
        fs::read(b_kernels.path().join("kernels.db")).unwrap(),
        b"local newer db"
    );

    // Another device or version shares nothing.
    let (_c_dir, c) = machine(&server, &key("llvmpipe"));
    assert_eq!(
        kernels::pull(&c, &key("llvmpipe"), b_kernels.path()).unwrap(),
        None
    );
    let mut newer = k.clone();
    newer.burn_version = "0.23.0".into();
    assert_ne!(newer.entry().unwrap().hash(), k.entry().unwrap().hash());
    assert!(kernels::push(&a, &k, &a_kernels.path().join("missing")).is_err());
}

#[test]
fn kernel_dir_follows_cubecls_default() {
    use cachet_compile::kernels::{global_kernel_dir, kernel_dir_for};
    // Inside a Cargo workspace: the outermost manifest's target/environment (a member's own
    // Cargo.toml does not count), like cubecl 0.11's `target` cache setting.
    let ws = tempfile::tempdir().unwrap();
    let member = ws.path().join("crates").join("a").join("src");
    std::fs::create_dir_all(&member).unwrap();
    std::fs::write(ws.path().join("Cargo.toml"), "[workspace]\n").unwrap();
    std::fs::write(ws.path().join("crates/a/Cargo.toml"), "[package]\n").unwrap();
    assert_eq!(
        kernel_dir_for(&member),
        ws.path().join("target").join("environment")
    );
    // Outside any Cargo project: the user cache folder.
    let plain = tempfile::tempdir().unwrap();
    if !plain
        .path()
        .ancestors()
        .any(|d| d.join("Cargo.toml").is_file())
    {
        assert_eq!(kernel_dir_for(plain.path()), global_kernel_dir());
        assert!(global_kernel_dir().ends_with("cubecl"));
    }
}
