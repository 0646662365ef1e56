//! Host gemv throughput against memory bandwidth: a stack of SmolLM2-sized projections far
//! larger than the last-level cache, multiplied by one activation row each, as a decode step
//! does. Prints GB/s of weights read for the gemv and for a plain multi-threaded sum of the same
//! bytes (the read-stream ceiling).
//!
//! `cargo run --release -p cachet-tensor --example gemv_bandwidth`

use std::time::Instant;

use cachet_tensor::kernels::DenseMatrix;
use rayon::prelude::*;

fn main() {
    // 30 layers of (q, k, v, o, gate, up, down) at SmolLM2-135M widths: 538 MB of f32.
    let shapes = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let mut seed = 1u32;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed % 2001) as f32 / 1000.0 - 1.0
    };
    let mats: Vec<DenseMatrix> = (0..30)
        .flat_map(|_| shapes)
        .map(|(r, c)| DenseMatrix::from_f32(r, c, (0..r * c).map(|_| next()).collect()).unwrap())
        .collect();
    let bytes: usize = mats.iter().map(|m| m.memory_bytes()).sum();
    let x: Vec<f32> = (0..1536).map(|_| next()).collect();
    let mut best_gemv = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        let mut sink = 0.0f32;
        for m in &mats {
            sink += m.matmul_t(&x[..m.cols()], 1)[0];
        }
        std::hint::black_box(sink);
        best_gemv = best_gemv.min(t.elapsed().as_secs_f64());
    }
    let flat: Vec<Vec<f32>> = mats.iter().map(|m| m.to_f32_vec()).collect();
    let mut best_sum = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        let s: f32 = flat
            .par_iter()
            .map(|v| {
                // Sixteen independent lanes: the compiler vectorises the reduction.
                let mut lanes = [0.0f32; 16];
                for c in v.chunks_exact(16) {
                    for (l, x) in lanes.iter_mut().zip(c) {
                        *l += x;
                    }
                }
                lanes.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best_sum = best_sum.min(t.elapsed().as_secs_f64());
    }
    let gb = bytes as f64 / 1e9;
    println!(
        "weights {:.0} MB, threads {}: gemv {:.2} ms = {:.1} GB/s; read-stream sum {:.2} ms = {:.1} GB/s",
        bytes as f64 / 1e6,
        rayon::current_num_threads(),
        best_gemv * 1e3,
        gb / best_gemv,
        best_sum * 1e3,
        gb / best_sum
    );
}
