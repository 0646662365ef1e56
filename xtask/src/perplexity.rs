//! `cargo xtask perplexity`: the quality table. Perplexity of SmolLM2-135M-Instruct on the
//! committed public-domain text for dense, bitsandbytes-quantized weights and quantized KV
//! caches, from `cachet perplexity` and from transformers (+bitsandbytes / quanto / hqq,
//! `xtask/bench/perplexity.py`) in the same run, same windows, same tokens.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::e2e::capture;
use super::fetch_model::{self, ModelId};
use super::{cargo, fmt_duration, run, target_dir, venv_python};

/// Rows: weights kinds, then quantized KV caches (`backend-bits`).
const ROWS: [&str; 10] = [
    "f32", "nf4", "nf4-dq", "fp4", "int8", "int8-t0", "quanto-4", "quanto-2", "hqq-4", "hqq-2",
];
/// The committed text.
const TEXT: &str = "tests/fixtures/text/alice.txt";
/// The goal: cachet within this relative distance of the reference's perplexity.
const TOLERANCE: f64 = 0.01;

/// Options of `cargo xtask perplexity`.
#[derive(clap::Args, Debug, Clone)]
pub struct PerplexityArgs {
    /// Rows to run [default: all: f32,nf4,nf4-dq,fp4,int8,int8-t0,quanto-4,quanto-2,hqq-4,hqq-2].
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// Score the first N tokens of the text [default: all].
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Tokens between window starts.
    #[arg(long, default_value_t = 256)]
    stride: usize,
    /// Tokens per forward in the KV-cache rows (so the quantized cache is read).
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Threads of both engines.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The goldens venv running transformers [env: CACHET_GOLDENS_VENV; default:
    /// target/goldens-venv].
    #[arg(long, value_name = "PATH")]
    venv: Option<PathBuf>,
}

/// The cache options of a KV row, as transformers' QuantizedCache gets them.
fn kv_config(row: &str) -> Option<Value> {
    let (backend, bits) = row.split_once('-')?;
    if backend != "quanto" && backend != "hqq" {
        return None;
    }
    Some(json!({
        "backend": backend,
        "nbits": bits.parse::<u8>().ok()?,
        "axis_key": 0,
        "axis_value": 0,
        "q_group_size": 64,
        "residual_length": 128,
    }))
}

fn f64_at(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

/// Runs `cargo xtask perplexity`.
pub fn bench_perplexity(root: &Path, mut args: PerplexityArgs) -> Result<()> {
    if args.rows.is_empty() {
        args.rows = ROWS.iter().map(|s| s.to_string()).collect();
    }
    for row in &args.rows {
        if !ROWS.contains(&row.as_str()) {
            bail!("--rows {row}: not one of {}", ROWS.join(", "));
        }
    }
    let venv = fetch_model::main_venv(root, args.venv.as_deref());
    let dir = fetch_model::ensure_model(root, ModelId::Smollm2, &venv)?;
    let python = venv_python(&venv);
    if !python.is_file() {
        bail!(
            "{} has no Python: run `cargo xtask fetch-model smollm2` to create the goldens venv",
            venv.display()
        );
    }
    let text = root.join(TEXT);
    let logs = target_dir(root).join("perplexity-logs");
    let start = Instant::now();

    println!("==> building cachet (release)");
    run(Command::new(cargo())
        .current_dir(root)
        .args(["build", "--release", "-p", "cachet"]))?;
    let cachet = target_dir(root)
        .join("release")
        .join(format!("cachet{}", std::env::consts::EXE_SUFFIX));

    let common = |cmd: &mut Command| {
        cmd.arg("--context")
            .arg(args.context.to_string())
            .arg("--stride")
            .arg(args.stride.to_string());
        if let Some(n) = args.max_tokens {
            cmd.arg("--max-tokens").arg(n.to_string());
        }
    };

    let mut errors = Vec::new();
    let mut ours = std::collections::BTreeMap::new();
    for row in &args.rows {
        println!("==> cachet perplexity: {row}");
        let mut cmd = Command::new(&cachet);
        cmd.current_dir(root)
            .env("RAYON_NUM_THREADS", args.threads.to_string())
            .args(["perplexity", "--json", "--model"])
            .arg(&dir)
            .arg("--text")
            .arg(&text);
        common(&mut cmd);
        match kv_config(row) {
            Some(config) => {
                cmd.args(["--cache", "quantized", "--cache-config"])
                    .arg(config.to_string())
                    .arg("--chunk")
                    .arg(args.chunk.to_string());
            }
            None if row != "f32" => {
                cmd.arg("--quantize").arg(row);
            }
            None => {}
        }
        match capture(&mut cmd, &logs.join(format!("cachet-{row}.log"))) {
            Ok(out) => match out
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
            {
                Some(v) => {
                    ours.insert(row.clone(), v);
                }
                None => errors.push(format!("cachet {row}: no JSON in its output")),
            },
            Err(e) => errors.push(format!("cachet {row}: {e:#}")),
        }
    }

    println!("==> transformers perplexity: {}", args.rows.join(","));
    let mut theirs = std::collections::BTreeMap::new();
    let mut cmd = Command::new(&python);
    cmd.current_dir(root)
        .arg("-P")
        .arg("xtask/bench/perplexity.py")
        .arg("--model")
        .arg(&dir)
        .arg("--text")
        .arg(&text)
        .arg("--rows")
        .arg(args.rows.join(","))
        .arg("--chunk")
        .arg(args.chunk.to_string())
        .arg("--threads")
        .arg(args.threads.to_string());
    common(&mut cmd);
    match capture(&mut cmd, &logs.join("transformers.log")) {
        Ok(out) => {
            for v in out
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            {
                let row = v["row"].as_str().unwrap_or_default().to_string();
                if let Some(e) = v.get("error") {
                    errors.push(format!("transformers {row}: {e}"));
                } else {
                    theirs.insert(row, v);
                }
            }
        }
        Err(e) => errors.push(format!("transformers: {e:#}")),
    }

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| weights / KV cache | cachet | transformers | cachet vs reference | cachet s | transformers s |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|");
    let mut rows_json = Vec::new();
    let mut misses = Vec::new();
    let mut tokens = None;
    for row in &args.rows {
        let a = ours.get(row);
        let b = theirs.get(row);
        let pa = a.and_then(|v| f64_at(v, "/report/perplexity"));
        let pb = b.and_then(|v| f64_at(v, "/perplexity"));
        tokens = tokens.or(a.and_then(|v| v["tokens"].as_u64()));
        let rel = pa.zip(pb).map(|(x, y)| x / y - 1.0);
        if let Some(r) = rel
            && r > TOLERANCE
        {
            misses.push(format!("{row}: {:+.2}%", r * 100.0));
        }
        let label = match kv_config(row) {
            Some(_) => format!("f32, KV {row} (residual 128)"),
            None => row.clone(),
        };
        let cell =
            |v: Option<f64>, digits: usize| v.map_or("—".into(), |x| format!("{x:.digits$}"));
        let _ = writeln!(
            table,
            "| {label} | {} | {} | {} | {} | {} |",
            cell(pa, 3),
            cell(pb, 3),
            rel.map_or("—".into(), |r| format!("{:+.2}%", r * 100.0)),
            cell(a.and_then(|v| f64_at(v, "/report/seconds")), 1),
            cell(b.and_then(|v| f64_at(v, "/seconds")), 1),
        );
        rows_json.push(json!({
            "row": row, "cachet": a, "transformers": b, "relative": rel,
        }));
    }
    let versions = theirs
        .values()
        .next()
        .map(|v| v["versions"].clone())
        .unwrap_or(Value::Null);
    let header = format!(
        "SmolLM2-135M-Instruct on {TEXT} ({} tokens), windows of {} every {}, KV rows fed {} tokens per forward; reference {}",
        tokens.map_or("?".into(), |t| t.to_string()),
        args.context,
        args.stride,
        args.chunk,
        versions
    );
    println!("\n{header}\n\n{table}");
    let unmeasured = args.rows.len() - ours.keys().filter(|r| theirs.contains_key(*r)).count();
    if unmeasured > 0 {
        println!("goal: {unmeasured} row(s) have no pair to compare (see the errors below)");
    }
    if misses.is_empty() {
        println!(
            "goal: every row within {:.0}% of the reference (or better): met",
            TOLERANCE * 100.0
        );
    } else {
        println!(
            "goal: every row within {:.0}% of the reference (or better): missed by {}",
            TOLERANCE * 100.0,
            misses.join(", ")
        );
    }
    let out = target_dir(root).join("perplexity-bench.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&json!({
            "header": header, "rows": rows_json, "markdown": table, "misses": misses,
            "errors": errors, "seconds": start.elapsed().as_secs_f64(),
        }))? + "\n",
    )
    .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} in all)",
        out.display(),
        fmt_duration(start.elapsed())
    );
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("  - {}", e.lines().next().unwrap_or(e));
        }
        bail!(
            "{} row(s) failed (logs in {})",
            errors.len(),
            logs.display()
        );
    }
    Ok(())
}
