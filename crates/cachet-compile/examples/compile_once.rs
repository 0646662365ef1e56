//! Compile once, reuse everywhere: `CompileCache::get_or_compile` with an optimum-neuron entry.
//!
//! Run twice with `cargo run -p cachet-compile --example compile_once`: the first run "compiles"
//! (a stand-in that writes a file and sleeps), the second is a local hit in milliseconds.
//! Set `CUSTOM_CACHE_REPO` (and `HF_ENDPOINT`/`HF_TOKEN`) to add the Hub level.

use std::time::{Duration, Instant};

use cachet_compile::local::LocalCache;
use cachet_compile::{CacheLayout, CompileCache, EntryBuilder};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = json!({"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
                        "rms_norm_eps": 1e-5, "transformers_version": "4.57.0"});
    let entry = EntryBuilder::new("meta-llama/Llama-3.2-1B", config)
        .task("text-generation")
        .dtype("bfloat16")
        .batch_size(4)
        .sequence_length(4096)
        .num_cores(2)
        .compiler("examplecc", "1.0")
        .build()?;
    println!(
        "entry {} (arch {})",
        entry.hash(),
        &entry.arch_digest()[..16]
    );
    let dir = std::env::temp_dir().join("cachet-compile-example");
    let cache = CompileCache::local_only(LocalCache::new(&dir, CacheLayout::for_entry(&entry)));
    let start = Instant::now();
    let module = cache.get_or_compile(&entry, |out| {
        std::thread::sleep(Duration::from_secs(2)); // the expensive compiler
        std::fs::write(out.join("model.bin"), b"compiled artifact")
    })?;
    println!(
        "{:?} in {:.1} ms: {}",
        module.source,
        start.elapsed().as_secs_f64() * 1e3,
        module.dir.display()
    );
    Ok(())
}
