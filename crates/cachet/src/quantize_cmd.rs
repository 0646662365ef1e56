//! `cachet quantize`: quantize a Llama-family checkpoint to bitsandbytes 4-bit or LLM.int8 and
//! save it in transformers' layout (loadable by `from_pretrained` and `cachet generate`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cachet::models::Llama;
use cachet::quant::{
    BnbQuantizationConfig, DeviceMap, LoadOptions, SaveOptions, load_and_quantize_model,
    parse_shard_size,
};
use cachet::tensor::{DeviceSpec, Precision, human_bytes};

/// Arguments of `cachet quantize`.
#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// Checkpoint directory (config.json + safetensors, single or sharded).
    #[arg(long)]
    model: PathBuf,
    /// Output directory (config.json with quantization_config + model.safetensors, or shards
    /// and an index).
    #[arg(long)]
    out: PathBuf,
    /// 4 (NF4/FP4) or 8 (LLM.int8).
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// 4-bit data type: nf4 or fp4.
    #[arg(long, default_value = "nf4")]
    quant_type: String,
    /// Quantize the 4-bit absmax again (bnb_4bit_use_double_quant).
    #[arg(long)]
    double_quant: bool,
    /// 4-bit block size (power of two, 32..=4096).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Modules kept in floating point (comma separated, substring match).
    #[arg(long, value_delimiter = ',', default_value = "lm_head")]
    skip: Vec<String>,
    /// LLM.int8 outlier threshold (0 disables the decomposition).
    #[arg(long, default_value_t = 6.0)]
    threshold: f32,
    /// dtype of the non-quantized layers and the 4-bit compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// accelerate-style device_map as JSON (`{"model.layers.1": "disk"}`), checked against
    /// the model's modules.
    #[arg(long)]
    device_map: Option<String>,
    /// Offload folder for `disk` placements.
    #[arg(long)]
    offload_folder: Option<PathBuf>,
    /// Largest weight file, as transformers' `max_shard_size` ("5GB", "500MB", "2GiB" or
    /// bytes); bigger models are saved as `model-0000i-of-0000N.safetensors` + an index.
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Peak resident set size of this process (Linux `VmHWM`), if known.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs `cachet quantize`.
pub fn run(args: QuantizeArgs) -> Result<()> {
    let precision: Precision = args.dtype.parse()?;
    let mut config = match args.bits {
        4 => BnbQuantizationConfig {
            load_in_4bit: true,
            bnb_4bit_quant_type: args.quant_type.clone(),
            bnb_4bit_use_double_quant: args.double_quant,
            bnb_4bit_blocksize: args.blocksize,
            ..BnbQuantizationConfig::default()
        },
        8 => BnbQuantizationConfig {
            load_in_8bit: true,
            llm_int8_threshold: args.threshold,
            ..BnbQuantizationConfig::default()
        },
        other => bail!("--bits must be 4 or 8, not {other}"),
    };
    let torch_name = precision
        .torch_name()
        .trim_start_matches("torch.")
        .to_string();
    config.bnb_4bit_compute_dtype = torch_name.clone();
    config.torch_dtype = Some(torch_name);
    config.skip_modules = Some(
        args.skip
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect(),
    );
    config.validate("command line")?;
    let device_map = args
        .device_map
        .as_deref()
        .map(DeviceMap::parse)
        .transpose()?;
    let save_options = SaveOptions {
        max_shard_size: parse_shard_size(&args.max_shard_size)?,
    };
    let device = DeviceSpec::Cpu.init()?;
    let before = dir_bytes(&args.model);
    let start = Instant::now();
    let options = LoadOptions {
        torch_dtype: Some(precision),
        device_map,
        offload_folder: args.offload_folder.clone(),
        progress: !args.json,
    };
    let model = load_and_quantize_model::<Llama>(&args.model, &config, &options, &device)
        .with_context(|| format!("quantizing {}", args.model.display()))?;
    let quantize_seconds = start.elapsed().as_secs_f64();
    if !model.not_offloaded.is_empty() && !args.json {
        eprintln!(
            "warning: only linear projections can be offloaded; kept on the compute device: {}",
            model.not_offloaded.join(", ")
        );
    }
    model
        .save_pretrained_with(&args.out, &save_options)
        .with_context(|| format!("saving to {}", args.out.display()))?;
    let total_seconds = start.elapsed().as_secs_f64();
    let after = dir_bytes(&args.out);
    let shards = std::fs::read_dir(&args.out)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .count()
        })
        .unwrap_or(0);
    let rss = peak_rss();
    let layers = model.layers.len();
    if args.json {
        let value = serde_json::json!({
            "model": args.model.display().to_string(),
            "out": args.out.display().to_string(),
            "bits": args.bits,
            "quant_type": if args.bits == 4 { Some(args.quant_type.as_str()) } else { None },
            "double_quant": args.double_quant,
            "blocksize": args.blocksize,
            "quantized_layers": layers,
            "bytes_before": before,
            "bytes_after": after,
            "shards": shards,
            "not_offloaded": model.not_offloaded,
            "memory_bytes": model.memory_bytes(),
            "quantize_seconds": quantize_seconds,
            "total_seconds": total_seconds,
            "peak_rss_bytes": rss,
        });
        println!("{}", serde_json::to_string(&value)?);
    } else {
        let kind = if args.bits == 4 {
            format!(
                "4-bit {}{} (blocksize {})",
                args.quant_type,
                if args.double_quant {
                    " + double quant"
                } else {
                    ""
                },
                args.blocksize
            )
        } else {
            format!("LLM.int8 (threshold {})", args.threshold)
        };
        println!(
            "quantized {} -> {} as {kind}",
            args.model.display(),
            args.out.display()
        );
        println!(
            "layers:   {layers} projections quantized, skipped: {:?}",
            args.skip
        );
        println!(
            "size:     {} -> {} on disk ({:.2}x smaller), {} in memory",
            human_bytes(before),
            human_bytes(after),
            before as f64 / after.max(1) as f64,
            human_bytes(model.memory_bytes() as u64)
        );
        if shards > 1 {
            println!(
                "files:    {shards} shards of at most {} + model.safetensors.index.json",
                args.max_shard_size
            );
        }
        println!("time:     {quantize_seconds:.2} s quantizing, {total_seconds:.2} s in all");
        if let Some(rss) = rss {
            println!("peak rss: {}", human_bytes(rss));
        }
    }
    Ok(())
}
