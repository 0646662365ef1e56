//! The projections of one batch-1 decode step, timed alone: every linear layer of a Llama-shaped
//! model (random weights) as an f32 gemv and as NF4 (plain and double-quantized statistics)
//! through `HostLinear4bit::forward_host`, the path a decode step takes.
//!
//! ```text
//! cargo run --release -p cachet-quant --example gemv_speed
//! cargo run --release -p cachet-quant --example gemv_speed -- 2048 8192 16 512
//! ```
//!
//! Arguments: hidden size, intermediate size, layers, kv width (defaults: SmolLM2-135M's 576,
//! 1536, 30, 192). Prints milliseconds per step (best of the repetitions), bytes read per second
//! and weights per second. This is evidence for one part of the step (the weights' traffic and
//! the kernels' instruction cost), never a decode speed: `cargo xtask bench --e2e` measures that.

use std::time::Instant;

use cachet_quant::{HostLinear4bit, QuantType, quantize_4bit};
use cachet_tensor::Precision;
use cachet_tensor::kernels::DenseMatrix;

/// A fixed-seed xorshift stream of values in (-scale, scale).
fn values(state: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            ((*state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Median and best of `reps` timings of `f` in milliseconds, after one warm-up call.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let [hidden, inter, layers, kv] = match args[..] {
        [] => [576, 1536, 30, 192],
        [h, i, l, k] => [h, i, l, k],
        _ => return Err("arguments: hidden intermediate layers kv_width".into()),
    };
    // (out, in) of q, k, v, o, gate, up, down.
    let shapes = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut dense = Vec::new();
    let mut plain = Vec::new();
    let mut nested = Vec::new();
    let mut weights = 0usize;
    for _ in 0..layers {
        for &(out, inp) in &shapes {
            let w = values(&mut state, out * inp, 0.05);
            weights += w.len();
            for (double_quant, list) in [(false, &mut plain), (true, &mut nested)] {
                let q = quantize_4bit("w", &w, &[out, inp], 64, QuantType::Nf4, double_quant)?;
                list.push(HostLinear4bit {
                    weight: q,
                    bias: None,
                    compute_dtype: Precision::F32,
                    weight_dtype: Precision::F32,
                });
            }
            dense.push(DenseMatrix::from_f32(out, inp, w)?);
        }
    }
    let xs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(_, inp)| values(&mut state, inp, 1.0))
        .collect();
    let reps = 20;
    println!(
        "{layers} layers, hidden {hidden}, intermediate {inter}, kv width {kv}: {:.1} M weights, \
         {} rayon threads",
        weights as f64 / 1e6,
        rayon::current_num_threads()
    );
    let report = |name: &str, bytes: usize, (median, best): (f64, f64)| {
        println!(
            "  {name:<18} {median:>7.2} ms (best {best:.2}) {:>6.1} GB/s {:>6.1} G weights/s",
            bytes as f64 / best / 1e6,
            weights as f64 / best / 1e6
        );
    };
    let dense_bytes: usize = dense.iter().map(DenseMatrix::memory_bytes).sum();
    report(
        "f32 gemv",
        dense_bytes,
        time(reps, || {
            for (i, m) in dense.iter().enumerate() {
                std::hint::black_box(m.matmul_t(&xs[i % shapes.len()], 1));
            }
        }),
    );
    for (name, list) in [("nf4", &plain), ("nf4 double quant", &nested)] {
        let bytes: usize = list.iter().map(|l| l.weight.memory_bytes()).sum();
        report(
            name,
            bytes,
            time(reps, || {
                for (i, l) in list.iter().enumerate() {
                    std::hint::black_box(l.forward_host(&xs[i % shapes.len()], 1));
                }
            }),
        );
    }
    Ok(())
}
