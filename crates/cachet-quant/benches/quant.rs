//! Speed of the 4-bit kernels on a 4096×4096 f32 weight, each group against a `reference`:
//! `gemv` (NF4 fused gemv vs a plain f32 gemv; goal ratio ≤ 0.67, i.e. ≥ 1.5× faster),
//! `dequantize` (vs memcpy of the same output; goal ratio ≤ 4, i.e. ≥ 25% of memcpy bandwidth),
//! `quantize` (vs bitsandbytes 0.50.2's CPU backend timed in the goldens venv; goal ratio ≤ 0.1;
//! skipped with a message when the venv is missing). `cargo xtask bench` prints the ratios.
//! Rows `*_avx512`, `*_avx2`, `*_portable` force that kernel level (`SimdLevel::force`); levels
//! this CPU lacks are skipped with a message; the unsuffixed rows use the detected level.

use std::hint::black_box;
use std::process::Command;
use std::time::Duration;

use cachet_quant::simd::SimdLevel;
use cachet_quant::{HostLinear4bit, QuantType, quantize_4bit};
use cachet_tensor::Precision;
use criterion::{Criterion, criterion_group, criterion_main};
use rayon::prelude::*;

const N: usize = 4096;

fn weight() -> Vec<f32> {
    // Deterministic pseudo-normal values (sum of uniforms), no RNG dependency.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..N * N)
        .map(|_| {
            let mut s = 0.0f32;
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s += (state >> 40) as f32 / (1u64 << 24) as f32;
            }
            (s - 2.0) * 0.05
        })
        .collect()
}

/// Plain f32 gemv `y = W x` (rayon over rows, 8-lane dot): the baseline the NF4 gemv must beat.
fn gemv_f32(w: &[f32], x: &[f32], y: &mut [f32]) {
    y.par_iter_mut()
        .enumerate()
        .with_min_len(16)
        .for_each(|(o, y)| {
            let row = &w[o * N..(o + 1) * N];
            let mut acc = [0.0f32; 8];
            for (a, b) in row.chunks_exact(8).zip(x.chunks_exact(8)) {
                for l in 0..8 {
                    acc[l] += a[l] * b[l];
                }
            }
            *y = acc.iter().sum();
        });
}

/// Seconds bitsandbytes' CPU backend takes to quantize a 4096×4096 f32 tensor to NF4 (median).
fn bnb_quantize_seconds() -> Option<f64> {
    // The goldens venv `cargo xtask goldens` makes, unless CACHET_GOLDENS_PYTHON says otherwise.
    let python = std::env::var("CACHET_GOLDENS_PYTHON").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../target/goldens-venv/bin/python"
        )
        .into()
    });
    let script = "import time,torch,bitsandbytes.functional as F\n\
        torch.manual_seed(0); w=torch.randn(4096,4096)*0.05\n\
        F.quantize_4bit(w,blocksize=64,quant_type='nf4')\n\
        ts=[]\n\
        for _ in range(5):\n    t=time.perf_counter(); F.quantize_4bit(w,blocksize=64,quant_type='nf4'); ts.append(time.perf_counter()-t)\n\
        ts.sort(); print(ts[2])";
    let out = Command::new(&python).args(["-c", script]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()?
        .parse()
        .ok()
}

/// The kernel levels this CPU can run, best first (a message names the ones it lacks).
fn levels() -> Vec<SimdLevel> {
    SimdLevel::ALL
        .into_iter()
        .filter(|l| {
            if !l.is_available() {
                eprintln!("{l} rows skipped: this CPU lacks it");
            }
            l.is_available()
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let w = weight();
    let x: Vec<f32> = (0..N)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let q = quantize_4bit("bench", &w, &[N, N], 64, QuantType::Nf4, false).unwrap();
    let layer = HostLinear4bit {
        weight: q.clone(),
        bias: None,
        compute_dtype: Precision::F32,
        weight_dtype: Precision::F32,
    };

    let mut g = c.benchmark_group("gemv_4096x4096");
    g.sample_size(20);
    let mut y = vec![0.0f32; N];
    g.bench_function("reference", |b| {
        b.iter(|| gemv_f32(black_box(&w), black_box(&x), &mut y))
    });
    g.bench_function("nf4_fused_gemv", |b| {
        b.iter(|| black_box(layer.forward_host(black_box(&x), 1)))
    });
    for level in levels() {
        SimdLevel::force(Some(level));
        g.bench_function(format!("nf4_gemv_{level}"), |b| {
            b.iter(|| black_box(layer.forward_host(black_box(&x), 1)))
        });
    }
    SimdLevel::force(None);
    g.finish();

    let mut g = c.benchmark_group("dequantize_4096x4096");
    g.sample_size(10);
    let mut dst = vec![0.0f32; N * N];
    g.bench_function("reference", |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 16)
                .zip(w.par_chunks(1 << 16))
                .for_each(|(d, s)| d.copy_from_slice(s));
            black_box(&dst);
        })
    });
    // Into a reused buffer, like the memcpy reference; `_alloc` also pays for a fresh 64 MiB
    // output (page faults), as `dequantize()` does.
    g.bench_function("nf4_dequantize", |b| {
        b.iter(|| {
            q.dequantize_into(&mut dst);
            black_box(&dst);
        })
    });
    g.bench_function("nf4_dequantize_alloc", |b| {
        b.iter(|| black_box(q.dequantize()))
    });
    for level in levels() {
        SimdLevel::force(Some(level));
        g.bench_function(format!("nf4_dequantize_{level}"), |b| {
            b.iter(|| {
                q.dequantize_into(&mut dst);
                black_box(&dst);
            })
        });
    }
    SimdLevel::force(None);
    g.finish();

    let mut g = c.benchmark_group("quantize_4096x4096");
    g.sample_size(10);
    match bnb_quantize_seconds() {
        Some(secs) => {
            eprintln!(
                "bitsandbytes 0.50.2 CPU quantize_4bit(nf4) of 4096x4096: {:.1} ms",
                secs * 1e3
            );
            g.bench_function("reference", |b| {
                b.iter_custom(|iters| Duration::from_secs_f64(secs * iters as f64))
            });
        }
        None => eprintln!(
            "quantize reference skipped: no bitsandbytes venv (set CACHET_GOLDENS_PYTHON to its python)"
        ),
    }
    g.bench_function("nf4_quantize", |b| {
        b.iter(|| {
            black_box(quantize_4bit("bench", &w, &[N, N], 64, QuantType::Nf4, false).unwrap())
        })
    });
    g.bench_function("nf4_double_quant", |b| {
        b.iter(|| black_box(quantize_4bit("bench", &w, &[N, N], 64, QuantType::Nf4, true).unwrap()))
    });
    for level in levels() {
        SimdLevel::force(Some(level));
        g.bench_function(format!("nf4_quantize_{level}"), |b| {
            b.iter(|| {
                black_box(quantize_4bit("bench", &w, &[N, N], 64, QuantType::Nf4, false).unwrap())
            })
        });
    }
    SimdLevel::force(None);
    g.finish();
}

criterion_group!(quant, benches);
criterion_main!(quant);
