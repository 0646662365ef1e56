//! Foundation benchmarks: checkpoint reading against the `safetensors` crate (the reference,
//! ratio reported by `cargo xtask bench`), model loading, prefill and a no-cache decode step.

use std::hint::black_box;

use cachet_models::{GreedyOptions, embedded, greedy};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DeviceSpec, Int, Precision, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};

const WEIGHTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crates/cachet-models/assets/tiny-llama/model.safetensors"
);

fn read_checkpoint(c: &mut Criterion) {
    let bytes = std::fs::read(WEIGHTS).unwrap();
    let mut group = c.benchmark_group("read_all_tensors_to_host");
    group.bench_function("reference", |b| {
        b.iter(|| {
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let total: usize = st
                .tensors()
                .into_iter()
                .map(|(_, view)| view.data().to_vec().len())
                .sum();
            black_box(total)
        })
    });
    group.bench_function("cachet", |b| {
        b.iter(|| {
            let checkpoint = Checkpoint::open(WEIGHTS).unwrap();
            let total: usize = checkpoint
                .names()
                .into_iter()
                .map(|name| checkpoint.tensor_data(name).unwrap().as_bytes().len())
                .sum();
            black_box(total)
        })
    });
    group.finish();
}

fn model(c: &mut Criterion) {
    let device = DeviceSpec::Cpu.init().unwrap();
    c.bench_function("load_embedded_tiny_llama", |b| {
        b.iter(|| black_box(embedded::tiny_llama(&device, Precision::F32).unwrap()))
    });
    let model = embedded::tiny_llama(&device, Precision::F32).unwrap();
    let ids: Vec<i64> = (0..64).map(|i| (i * 7 % 500) as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 64]), &device);
    c.bench_function("prefill_64_tokens", |b| {
        b.iter(|| {
            black_box(
                model
                    .forward(input.clone(), None, None)
                    .unwrap()
                    .into_data(),
            )
        })
    });
    let options = GreedyOptions {
        max_new_tokens: 8,
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    c.bench_function("greedy_8_tokens_no_cache", |b| {
        b.iter(|| black_box(greedy(&model, &[vec![1, 2, 3, 4, 5]], &options, None).unwrap()))
    });
}

criterion_group!(benches, read_checkpoint, model);
criterion_main!(benches);
