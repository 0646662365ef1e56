//! Per-layer, per-token cache update cost at growing context lengths, with Llama-3-8B layer
//! shapes (8 kv heads, head_dim 128, f32), for each cache type, next to transformers'
//! `DynamicCache.update` measured in the same run (`reference`; skipped with a message when no
//! Python venv with transformers is found — set `CACHET_BENCH_VENV`).
//!
//! Each measured step stores one token and then rewinds to the same context (crop), so the
//! context stays fixed across iterations. The quantized cache is measured through
//! `update_view`, the call the model makes (its quantized prefix is attended to in place), and
//! through the dequantizing `update` (`quantized_4bit_dense`).
//!
//! A second group, `kv_attend_per_layer_token`, times what a decode step then does with the
//! cache at each context: one query token of 32 heads (4 per kv head) attending to it — dense
//! f32 keys/values (`baseline`), the quantized prefix in place (`quantized_4bit_in_place`), and
//! the quantized prefix dequantized into tensors first (`quantized_4bit_dequantized`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use burn::tensor::activation::softmax;
use burn::tensor::{Distribution, Tensor};
use cachet_kv::{
    Cache, DynamicCache, OffloadedCache, QuantizedCache, QuantizedCacheConfig, SinkCache,
    SlidingWindowCache, StaticCache,
};
use cachet_tensor::DeviceSpec;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const CONTEXTS: [usize; 4] = [256, 1024, 4096, 8192];

const REFERENCE: &str = r#"
import sys, time, torch
from transformers import DynamicCache
context, iters = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
cache = DynamicCache()
k = torch.randn(1, 8, context, 128)
cache.update(k, k.clone(), 0)
new = torch.randn(1, 8, 1, 128)
start = time.perf_counter()
for _ in range(iters):
    cache.update(new, new, 0)
    cache.crop(-1)
print(time.perf_counter() - start)
"#;

fn python() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("CACHET_BENCH_VENV").map(PathBuf::from),
        Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../target/goldens-venv"
        ))),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(|venv| venv.join("bin/python"))
        .find(|python| {
            python.exists()
                && Command::new(python)
                    .args(["-c", "import transformers, torch"])
                    .output()
                    .is_ok_and(|o| o.status.success())
        })
}

fn reference(python: &PathBuf, context: usize, iters: u64) -> Duration {
    let out = Command::new(python)
        .args(["-c", REFERENCE, &context.to_string(), &iters.to_string()])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seconds: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("seconds");
    Duration::from_secs_f64(seconds)
}

fn filled(cache: &mut dyn Cache, context: usize, device: &burn::tensor::Device) {
    let k = Tensor::<4>::random([1, HEADS, context, HEAD_DIM], Distribution::Default, device);
    let positions: Vec<usize> = (0..context).collect();
    cache.update(0, k.clone(), k, &positions).unwrap();
}

fn bench(c: &mut Criterion) {
    let device = DeviceSpec::Cpu.init().unwrap();
    let python = python();
    if python.is_none() {
        eprintln!(
            "cache_update: no venv with transformers found (set CACHET_BENCH_VENV); skipping the reference"
        );
    }
    let new = Tensor::<4>::random([1, HEADS, 1, HEAD_DIM], Distribution::Default, &device);
    let mut group = c.benchmark_group("kv_update_per_layer_token");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for context in CONTEXTS {
        if let Some(python) = &python {
            group.bench_with_input(
                BenchmarkId::new("reference", context),
                &context,
                |b, &context| b.iter_custom(|iters| reference(python, context, iters)),
            );
        }
        let mut caches: Vec<(&str, Box<dyn Cache>)> = vec![
            ("dynamic", Box::new(DynamicCache::new())),
            ("static", Box::new(StaticCache::new(context + 1).unwrap())),
            ("offloaded", Box::new(OffloadedCache::new(&device, &device))),
            (
                "quantized_4bit_dense",
                Box::new(QuantizedCache::new(QuantizedCacheConfig::default()).unwrap()),
            ),
        ];
        for (name, cache) in caches.iter_mut() {
            filled(cache.as_mut(), context, &device);
            group.bench_with_input(BenchmarkId::new(*name, context), &context, |b, &context| {
                b.iter(|| {
                    let out = cache
                        .update(0, new.clone(), new.clone(), &[context])
                        .unwrap();
                    drop(out);
                    cache.crop(context).unwrap();
                })
            });
        }
        let mut quantized = QuantizedCache::new(QuantizedCacheConfig::default()).unwrap();
        filled(&mut quantized, context, &device);
        group.bench_with_input(
            BenchmarkId::new("quantized_4bit", context),
            &context,
            |b, &context| {
                b.iter(|| {
                    let view = quantized
                        .update_view(0, new.clone(), new.clone(), &[context])
                        .unwrap();
                    drop(view);
                    quantized.crop(context).unwrap();
                })
            },
        );
        // The sliding window keeps `context` tokens; its storage does not grow, so no rewind.
        let mut sliding = SlidingWindowCache::new(context).unwrap();
        filled(&mut sliding, context, &device);
        group.bench_with_input(
            BenchmarkId::new("sliding_window", context),
            &context,
            |b, _| {
                b.iter(|| {
                    let at = sliding.seq_length(0);
                    drop(sliding.update(0, new.clone(), new.clone(), &[at]).unwrap());
                })
            },
        );
        // The sink cache at its window: every token evicts one (transformers re-rotates the kept
        // keys; cachet writes the ring slot and shifts the query instead).
        let inv_freq: Vec<f32> = (0..HEAD_DIM / 2)
            .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / HEAD_DIM as f32))
            .collect();
        let mut sink = SinkCache::new(context, 4, inv_freq).unwrap();
        filled(&mut sink, context - 1, &device);
        group.bench_with_input(BenchmarkId::new("sink", context), &context, |b, _| {
            b.iter(|| {
                let at = sink.seq_length(0);
                drop(sink.update(0, new.clone(), new.clone(), &[at]).unwrap());
            })
        });
    }
    group.finish();
    attend(c, &device);
}

/// Query heads per kv head (Llama-3-8B: 32 query heads over 8 kv heads).
const REP: usize = 4;

/// One decode step's attention at each context: dense f32, and the quantized cache.
fn attend(c: &mut Criterion, device: &burn::tensor::Device) {
    let mut group = c.benchmark_group("kv_attend_per_layer_token");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let query = Tensor::<4>::random([1, HEADS, REP, HEAD_DIM], Distribution::Default, device);
    let new = Tensor::<4>::random([1, HEADS, 1, HEAD_DIM], Distribution::Default, device);
    let dense_attention = |k: Tensor<4>, v: Tensor<4>| {
        let probs = softmax(query.clone().matmul(k.swap_dims(2, 3)).mul_scalar(scale), 3);
        probs.matmul(v)
    };
    for context in CONTEXTS {
        let mut dynamic = DynamicCache::new();
        filled(&mut dynamic, context, device);
        let (k, v, _) = dynamic
            .update(0, new.clone(), new.clone(), &[context])
            .unwrap();
        group.bench_with_input(BenchmarkId::new("baseline", context), &context, |b, _| {
            b.iter(|| dense_attention(k.clone(), v.clone()).into_data())
        });
        let mut quantized = QuantizedCache::new(QuantizedCacheConfig::default()).unwrap();
        filled(&mut quantized, context, device);
        let view = quantized
            .update_view(0, new.clone(), new.clone(), &[context])
            .unwrap();
        assert!(view.prefix_len() > 0, "a quantized prefix");
        group.bench_with_input(
            BenchmarkId::new("quantized_4bit_in_place", context),
            &context,
            |b, _| {
                b.iter(|| {
                    let scores = view.scores(query.clone()).unwrap();
                    let probs = softmax(scores.mul_scalar(scale), 3);
                    view.weighted_values(probs).unwrap().into_data()
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("quantized_4bit_dequantized", context),
            &context,
            |b, _| {
                b.iter(|| {
                    let (k, v, _) = view.clone().into_dense();
                    dense_attention(k, v).into_data()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
