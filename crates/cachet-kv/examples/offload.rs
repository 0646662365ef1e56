//! Offloaded KV cache in a simulated decode loop: every layer's cache lives in host memory, the
//! layer being computed is on the compute device, the next one is prefetched meanwhile. Prints
//! the overlap achieved and the compute-device bytes held at peak versus one layer's cache.
//!
//! `cargo run -p cachet-kv --example offload [-- DEVICE [LAYERS CONTEXT STEPS]]`, e.g.
//! `cargo run -p cachet-kv --features wgpu --example offload -- wgpu 8 1024 16`.

use burn::tensor::{Distribution, Tensor};
use cachet_kv::{Cache, OffloadedCache};
use cachet_tensor::{DeviceSpec, human_bytes};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec: DeviceSpec = args.first().map_or("cpu", String::as_str).parse()?;
    let number =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (layers, context, steps) = (number(1, 8), number(2, 1024), number(3, 16));
    let (heads, head_dim) = (8, 128);
    let compute = spec.init()?;
    let host = DeviceSpec::Cpu.init()?;
    println!(
        "compute {compute:?}, host {host:?}: {layers} layers × [1, {heads}, {context}, {head_dim}] f32"
    );

    let mut cache = OffloadedCache::new(&compute, &host);
    let prompt = Tensor::<4>::random(
        [1, heads, context, head_dim],
        Distribution::Default,
        &compute,
    );
    let positions: Vec<usize> = (0..context).collect();
    for layer in 0..layers {
        cache.update(layer, prompt.clone(), prompt.clone(), &positions)?;
    }
    let start = std::time::Instant::now();
    for step in 0..steps {
        let position = context + step;
        for layer in 0..layers {
            let token =
                Tensor::<4>::random([1, heads, 1, head_dim], Distribution::Default, &compute);
            let (keys, values, _) =
                cache.update(layer, token.clone(), token.clone(), &[position])?;
            // Attention for one query: the compute the next layer's upload overlaps with.
            let scores = token.matmul(keys.swap_dims(2, 3));
            let out = burn::tensor::activation::softmax(scores, 3).matmul(values);
            compute.sync()?;
            drop(out);
        }
    }
    let elapsed = start.elapsed();
    let stats = cache.stats();
    let layer_bytes = 2 * heads * (context + steps) * head_dim * 4;
    println!("{steps} steps in {:.3} s", elapsed.as_secs_f64());
    println!(
        "uploads {} ({} prefetched), transfer {:.3} s, blocked {:.3} s → overlap {:.0}%",
        stats.uploads,
        stats.prefetched,
        stats.transfer_time.as_secs_f64(),
        stats.blocked_time.as_secs_f64(),
        stats.overlap() * 100.0
    );
    println!(
        "peak compute-device cache bytes {} = {:.2} layers (one layer {}); host holds {}",
        human_bytes(stats.peak_compute_bytes as u64),
        stats.peak_compute_bytes as f64 / layer_bytes as f64,
        human_bytes(layer_bytes as u64),
        human_bytes(cache.memory_bytes() as u64)
    );
    Ok(())
}
