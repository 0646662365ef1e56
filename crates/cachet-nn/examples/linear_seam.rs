//! The linear-layer seam: a custom `LinearFactory` decides, per named projection, what a model
//! loader builds. Here it wraps every dense layer in a `LinearOp` that counts its calls — the
//! same hook quantizers use to load straight into 4-bit layers.
//!
//! `cargo run -p cachet-nn --example linear_seam`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::tensor::{DType, Device, Tensor, TensorData};
use cachet_nn::{
    DenseFactory, LinearFactory, LinearLayer, LinearOp, LinearSpec, Loader, Result, SplitMix64,
};
use cachet_tensor::safetensors::Checkpoint;

/// A dense layer that counts how often it runs.
#[derive(Debug)]
struct Counted {
    inner: LinearLayer,
    shape: (usize, usize),
    calls: AtomicUsize,
}

impl LinearOp for Counted {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.forward(x)
    }
    fn in_features(&self) -> usize {
        self.shape.0
    }
    fn out_features(&self) -> usize {
        self.shape.1
    }
    fn memory_bytes(&self) -> usize {
        4 * self.shape.0 * self.shape.1
    }
}

/// Builds every projection densely, then wraps it; keeps a handle on each layer it built.
#[derive(Default)]
struct CountingFactory {
    built: Mutex<Vec<(String, Arc<Counted>)>>,
}

impl LinearFactory for CountingFactory {
    fn build(
        &self,
        spec: &LinearSpec,
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<LinearLayer> {
        println!(
            "building {} [{} -> {}]",
            spec.name, spec.in_features, spec.out_features
        );
        let inner = DenseFactory.build(spec, checkpoint, device, dtype)?;
        let layer = Arc::new(Counted {
            inner,
            shape: (spec.in_features, spec.out_features),
            calls: AtomicUsize::new(0),
        });
        if let Ok(mut built) = self.built.lock() {
            built.push((spec.name.clone(), layer.clone()));
        }
        Ok(LinearLayer::custom(layer))
    }
}

/// An in-memory safetensors file with one seeded `[out, in]` f32 weight.
fn checkpoint(name: &str, out: usize, inp: usize) -> Checkpoint {
    let mut rng = SplitMix64::new(7);
    let values: Vec<u8> = (0..out * inp)
        .flat_map(|_| (rng.normal() as f32).to_le_bytes())
        .collect();
    let mut header = format!(
        r#"{{"{name}.weight":{{"dtype":"F32","shape":[{out},{inp}],"data_offsets":[0,{}]}}}}"#,
        values.len()
    )
    .into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&values);
    Checkpoint::from_bytes("example", bytes).expect("a well-formed safetensors file")
}

fn main() -> Result<()> {
    let device = cachet_tensor::cpu_device()?;
    let checkpoint = checkpoint("proj", 3, 4);
    let factory = CountingFactory::default();
    let loader = Loader {
        checkpoint: &checkpoint,
        device: &device,
        dtype: DType::F32,
        factory: &factory,
    };
    let layer = loader.linear("proj", 4, 3, false)?;
    let x = Tensor::<3>::from_data(
        TensorData::new(vec![1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], [1, 2, 4]),
        &device,
    );
    for _ in 0..2 {
        let y = layer.forward(x.clone())?;
        let values = y.into_data().try_to_vec::<f32>().unwrap_or_default();
        println!("y (the weight's first two columns) = {values:?}");
    }
    for (name, op) in factory.built.lock().iter().flat_map(|b| b.iter()) {
        println!(
            "{name}: {} calls, {} bytes of weights",
            op.calls.load(Ordering::Relaxed),
            op.memory_bytes()
        );
    }
    Ok(())
}
