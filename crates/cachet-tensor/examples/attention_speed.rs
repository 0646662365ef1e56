//! Prompt attention throughput: [`causal_attention`] at SmolLM2-135M's head layout (9 query
//! heads over 3 kv heads, head width 64) for prompts of 512 and 2048 tokens, in GFLOP/s of the
//! causal half of `q·kᵀ` and `p·v`, next to a blocked f32 matmul of the same FLOPs (the
//! projections' gemm) as the ceiling a prompt's attention could reach.
//!
//! `cargo run --release -p cachet-tensor --example attention_speed`

use std::time::Instant;

use cachet_tensor::kernels::{AttentionShape, DenseMatrix, causal_attention};

fn values(len: usize, mut seed: u32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    for len in [512usize, 2048] {
        let shape = AttentionShape {
            batch: 1,
            heads: 9,
            kv_heads: 3,
            q_len: len,
            kv_len: len,
            head_dim: 64,
            v_dim: 64,
        };
        let q = values(9 * len * 64, 1);
        let k = values(3 * len * 64, 2);
        let v = values(3 * len * 64, 3);
        // Causal half of the scores, two matmuls (q·kᵀ and p·v), 2 FLOPs per multiply-add.
        let flops = 9.0 * (len * (len + 1) / 2) as f64 * 64.0 * 2.0 * 2.0;
        let secs = best_of(5, || {
            std::hint::black_box(causal_attention(&q, &k, &v, shape, None, 0.125).unwrap());
        });
        // A gemm of about the same FLOPs: [len, 576] times a [n, 576] weight.
        let n = ((flops / (2.0 * len as f64 * 576.0)) as usize).max(1);
        let w = DenseMatrix::from_f32(n, 576, values(n * 576, 4)).unwrap();
        let x = values(len * 576, 5);
        let gemm_secs = best_of(5, || {
            std::hint::black_box(w.matmul_t(&x, len));
        });
        let gemm_flops = 2.0 * (len * n * 576) as f64;
        println!(
            "prompt {len:>5}: attention {:>7.2} ms = {:>6.1} GFLOP/s; gemm of the same work {:>7.2} ms = {:>6.1} GFLOP/s",
            secs * 1e3,
            flops / secs / 1e9,
            gemm_secs * 1e3,
            gemm_flops / gemm_secs / 1e9
        );
    }
}
