//! Quantize a Llama-family checkpoint to NF4 + double quant while loading, generate a few
//! tokens greedily, and compare memory with the dense model.
//!
//! `cargo run -p cachet-quant --example quantize_llama [-- DIR]` (default: the workspace's
//! tiny test Llama).

use burn::tensor::{Int, Tensor, TensorData};
use cachet_models::Llama;
use cachet_quant::{BnbQuantizationConfig, LoadOptions, load_and_quantize_model};
use cachet_tensor::safetensors::Checkpoint;
use cachet_tensor::{DeviceSpec, Precision, human_bytes};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/llama".to_string());
    let device = DeviceSpec::Cpu.init()?;
    let dense_bytes = Checkpoint::open(&dir)?.total_bytes();
    let config = BnbQuantizationConfig::nf4(Precision::F32);
    let options = LoadOptions {
        torch_dtype: Some(Precision::F32),
        progress: true,
        ..LoadOptions::default()
    };
    let quantized = load_and_quantize_model::<Llama>(&dir, &config, &options, &device)?;
    println!(
        "{} projections quantized in {:.2} s; weights {} f32 checkpoint -> {} NF4 in memory",
        quantized.layers.len(),
        quantized.load_seconds,
        human_bytes(dense_bytes),
        human_bytes(quantized.memory_bytes() as u64)
    );
    let mut ids: Vec<i64> = vec![1, 2, 3, 4, 5];
    for _ in 0..8 {
        let input =
            Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device);
        let logits = quantized.model.forward(input, None, None)?;
        let [_, s, _] = logits.dims();
        let next = logits
            .slice([0..1, s - 1..s])
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?[0];
        ids.push(next);
    }
    println!("greedy: {:?}", &ids[5..]);
    Ok(())
}
