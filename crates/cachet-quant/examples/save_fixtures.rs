//! Writes `tests/fixtures/cachet-saved/{llama-nf4-dq,llama-fp4,llama-int8}`: the workspace's tiny
//! Llama quantized and saved by cachet, for `xtask/goldens/bnb.py` to load in transformers.
//!
//! Run from the workspace root: `cargo run -p cachet-quant --example save_fixtures`.

use cachet_models::Llama;
use cachet_quant::{BnbQuantizationConfig, LoadOptions, load_and_quantize_model};
use cachet_tensor::{DeviceSpec, Precision};

fn main() -> anyhow::Result<()> {
    let device = DeviceSpec::Cpu.init()?;
    let source = "tests/fixtures/llama";
    let out = std::path::Path::new("crates/cachet-quant/tests/fixtures/cachet-saved");
    let fp32 = |mut c: BnbQuantizationConfig| {
        c.bnb_4bit_compute_dtype = "fp32".into();
        c.torch_dtype = Some("fp32".into());
        c
    };
    let variants = [
        (
            "llama-nf4-dq",
            fp32(BnbQuantizationConfig::nf4(Precision::F32)),
        ),
        (
            "llama-fp4",
            fp32(BnbQuantizationConfig {
                load_in_4bit: true,
                bnb_4bit_quant_type: "fp4".into(),
                ..BnbQuantizationConfig::default()
            }),
        ),
        ("llama-int8", fp32(BnbQuantizationConfig::int8())),
    ];
    let options = LoadOptions {
        torch_dtype: Some(Precision::F32),
        ..LoadOptions::default()
    };
    for (name, config) in variants {
        let model = load_and_quantize_model::<Llama>(source, &config, &options, &device)?;
        model.save_pretrained(out.join(name))?;
        // transformers' save writes no generation_config here; keep the fixture small.
        let _ = std::fs::remove_file(out.join(name).join("generation_config.json"));
        println!("wrote {}", out.join(name).display());
    }
    Ok(())
}
