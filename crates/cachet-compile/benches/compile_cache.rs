//! Compile-cache benchmarks: local hit latency (goal < 10 ms), and a Hub hit over loopback
//! against a raw file copy of the same bytes (the `reference`, ratio reported by
//! `cargo xtask bench`). The N=4 processes → one compile property is asserted by
//! `tests/local_cache.rs::four_processes_compile_a_missing_entry_once`.

#[path = "../tests/support/hub_server.rs"]
mod hub_server;

use std::hint::black_box;
use std::time::Duration;

use cachet_compile::hub::{HubCache, HubOptions};
use cachet_compile::local::{LocalCache, Verify};
use cachet_compile::{CacheLayout, CompileCache, EntryBuilder};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

fn entry(batch: u64) -> cachet_compile::CacheEntry {
    EntryBuilder::new(
        "meta-llama/Llama-3.2-1B",
        json!({"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16}),
    )
    .task("text-generation")
    .batch_size(batch)
    .compiler("benchcc", "1.0")
    .build()
    .unwrap()
}

fn local_hit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let e = entry(1);
    let cache = CompileCache::local_only(LocalCache::new(dir.path(), CacheLayout::for_entry(&e)));
    cache
        .get_or_compile(&e, |out| {
            std::fs::write(out.join("model.neff"), vec![7u8; 4 << 20])
        })
        .unwrap();
    let mut group = c.benchmark_group("local_hit_4MiB");
    group.bench_function("hash_and_verify_sha256", |b| {
        b.iter(|| {
            black_box(
                cache
                    .get_or_compile(&e, |_| -> Result<(), String> { unreachable!() })
                    .unwrap(),
            )
        })
    });
    let sized = LocalCache::new(dir.path(), CacheLayout::for_entry(&e)).with_verify(Verify::Size);
    let hash = e.hash();
    group.bench_function("verify_size_only", |b| {
        b.iter(|| black_box(sized.lookup(&hash).unwrap().unwrap()))
    });
    group.bench_function("entry_hash_only", |b| b.iter(|| black_box(e.hash())));
    group.finish();
}

fn hub_hit(c: &mut Criterion) {
    const SIZE: usize = 32 << 20;
    let server = hub_server::HubServer::start();
    server.add_repo("alice/cache", true);
    let e = entry(2);
    let layout = CacheLayout::for_entry(&e);
    let options = HubOptions {
        endpoint: Some(server.url()),
        token: Some(hub_server::WRITE_TOKEN.into()),
        timeout: Duration::from_secs(30),
        retries: 0,
        commit_attempts: 1,
        progress: false,
    };
    let src = tempfile::tempdir().unwrap();
    let publisher = CompileCache::with_hub(
        LocalCache::new(src.path(), layout.clone()),
        HubCache::new("alice/cache", options.clone()).unwrap(),
        true,
    );
    let module = publisher
        .get_or_compile(&e, |out| {
            std::fs::write(out.join("model.neff"), vec![3u8; SIZE])
        })
        .unwrap();
    let mut group = c.benchmark_group("hub_hit_32MiB_loopback");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(criterion::Throughput::Bytes(SIZE as u64));
    group.bench_function("reference", |b| {
        b.iter(|| {
            let dst = tempfile::tempdir().unwrap();
            std::fs::copy(module.dir.join("model.neff"), dst.path().join("model.neff")).unwrap();
        })
    });
    group.bench_function("hub_download_verify_publish", |b| {
        b.iter(|| {
            let dst = tempfile::tempdir().unwrap();
            let cache = CompileCache::with_hub(
                LocalCache::new(dst.path(), layout.clone()),
                HubCache::new("alice/cache", options.clone()).unwrap(),
                false,
            );
            let m = cache
                .get_or_compile(&e, |_| -> Result<(), String> { Err("must hit".into()) })
                .unwrap();
            black_box(m.source)
        })
    });
    group.finish();
}

criterion_group!(benches, local_hit, hub_hit);
criterion_main!(benches);
