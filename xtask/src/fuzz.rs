//! `cargo xtask fuzz`: the property-based fuzz targets of every parser (`crates/*/tests/fuzz.rs`,
//! proptest on stable Rust) with a long budget.
//!
//! `cargo test` runs each property for `CACHET_FUZZ_CASES` cases (256 by default, see
//! `tests/fuzz_support.rs`); this command sets it higher and runs each crate's `fuzz` test
//! binary, round after round with fresh random seeds until the time budget is spent. It builds
//! the binaries once, up front, with the `fuzz` profile (release speed, overflow checks and debug
//! assertions kept in the workspace's code: an overflow that release would wrap silently is a
//! finding) and runs copies of them, so editing the sources during a long run neither rebuilds
//! nor changes what is being fuzzed.
//! A failure stops the run; proptest prints the minimal input and keeps its seed under
//! `target/proptest-regressions/`. Properties are the tests named `*arbitrary*` or `*mutated*`;
//! the summary counts their cases.
//!
//! Each finished round appends a line to `tests/fuzz-ledger.csv` (date, commit, crate, cases
//! per property, wall seconds, CPU seconds of the test process), which is committed, so the hours
//! each target has been fuzzed add up across machines; `cargo xtask fuzz --ledger` prints the
//! totals. CPU time is the measure of effort: it does not grow when the run shares the machine
//! (e.g. under `nice`). Rows written before the CPU column existed count their wall seconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, display, fmt_duration, run};

/// The crates with a `tests/fuzz.rs`.
pub const CRATES: [&str; 7] = [
    "cachet-pyjson",
    "cachet-tensor",
    "cachet-kv",
    "cachet-compile",
    "cachet-models",
    "cachet-quant",
    "cachet-diffusion",
];

/// Options of `cargo xtask fuzz`.
#[derive(clap::Args, Debug, Clone)]
pub struct FuzzArgs {
    /// Cases per property in each round.
    #[arg(long, default_value_t = 10_000)]
    cases: u32,
    /// Keep starting rounds until this many minutes have passed [default: one round].
    #[arg(long)]
    minutes: Option<f64>,
    /// Only these crates (repeatable) [default: every crate with a fuzz target].
    #[arg(long = "crate", value_name = "CRATE")]
    crates: Vec<String>,
    /// Cargo profile to build with (`dev` reuses the `cargo test` build).
    #[arg(long, default_value = "fuzz")]
    profile: String,
    /// Print the hours and cases each target has been fuzzed (from the ledger) and exit.
    #[arg(long)]
    ledger: bool,
}

/// The committed record of finished fuzz rounds.
const LEDGER: &str = "tests/fuzz-ledger.csv";
const LEDGER_HEADER: &str = "utc,commit,crate,cases_per_property,properties,seconds,cpu_seconds";

/// Appends one finished round to the ledger.
fn record_round(
    root: &Path,
    krate: &str,
    cases: u32,
    properties: usize,
    seconds: f64,
    cpu_seconds: f64,
) -> Result<()> {
    use std::io::Write as _;
    let path = root.join(LEDGER);
    let fresh = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("could not open {}", path.display()))?;
    if fresh {
        writeln!(file, "{LEDGER_HEADER}")?;
    }
    let commit = Command::new("git")
        .current_dir(root)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let utc = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    writeln!(
        file,
        "{utc},{commit},{krate},{cases},{properties},{seconds:.1},{cpu_seconds:.1}"
    )?;
    Ok(())
}

/// Totals of one crate in the ledger.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    rounds: u64,
    cases: u64,
    seconds: f64,
    cpu_seconds: f64,
}

/// Totals per crate from the ledger.
fn ledger_totals(root: &Path) -> Result<BTreeMap<String, Totals>> {
    let path = root.join(LEDGER);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("could not read {}", path.display())),
    };
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let parsed = (f.len() == 6 || f.len() == 7)
            .then(|| {
                let seconds = f[5].parse::<f64>().ok()?;
                let cpu = match f.get(6) {
                    Some(c) => c.parse::<f64>().ok()?,
                    None => seconds,
                };
                Some((f[3].parse::<u64>().ok()?, seconds, cpu))
            })
            .flatten();
        let Some((cases, seconds, cpu_seconds)) = parsed else {
            bail!(
                "{}:{}: malformed ledger line {line:?}",
                path.display(),
                n + 1
            );
        };
        let t = totals.entry(f[2].to_owned()).or_default();
        t.rounds += 1;
        t.cases += cases;
        t.seconds += seconds;
        t.cpu_seconds += cpu_seconds;
    }
    Ok(totals)
}

fn print_ledger(root: &Path) -> Result<()> {
    let totals = ledger_totals(root)?;
    println!("fuzzing recorded in {LEDGER}:");
    println!(
        "  {:<18} {:>7} {:>20} {:>10} {:>10}",
        "crate", "rounds", "cases per property", "wall hours", "CPU hours"
    );
    for krate in CRATES {
        let t = totals.get(krate).copied().unwrap_or_default();
        println!(
            "  {krate:<18} {:>7} {:>20} {:>10.2} {:>10.2}",
            t.rounds,
            t.cases,
            t.seconds / 3600.0,
            t.cpu_seconds / 3600.0
        );
    }
    Ok(())
}

/// Builds a crate's fuzz test binary with `profile` and copies it to `target/fuzz-bin/`, so the
/// rounds run what was built here even if cargo rebuilds the original meanwhile.
fn build_target(root: &Path, krate: &str, profile: &str) -> Result<PathBuf> {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root).args([
        "test",
        "--profile",
        profile,
        "-p",
        krate,
        "--test",
        "fuzz",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    let shown = display(&cmd);
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    let built = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "fuzz")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("`{shown}` named no fuzz test executable"))?;
    let dir = root.join("target/fuzz-bin");
    std::fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let copy = dir.join(format!("{krate}-fuzz"));
    std::fs::copy(&built, &copy)
        .with_context(|| format!("could not copy {} to {}", built.display(), copy.display()))?;
    Ok(copy)
}

/// Runs a built fuzz binary the way `cargo test` would: from the crate's directory.
fn target_command(root: &Path, krate: &str, exe: &Path) -> Command {
    let dir = root.join("crates").join(krate);
    let mut cmd = Command::new(exe);
    cmd.current_dir(&dir).env("CARGO_MANIFEST_DIR", &dir);
    cmd
}

/// The properties of a crate's fuzz target (its tests named `*arbitrary*` / `*mutated*`).
fn properties(root: &Path, krate: &str, exe: &Path) -> Result<Vec<String>> {
    let mut cmd = target_command(root, krate, exe);
    cmd.args(["--list", "--format", "terse"]);
    let shown = display(&cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|name| name.contains("arbitrary") || name.contains("mutated"))
        .map(str::to_owned)
        .collect())
}

/// CPU seconds (user + system) of this process's finished, waited-for children; `None` where
/// `/proc` does not say (then a round counts its wall time).
fn children_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (`state`);
    // `cutime` and `cstime` are fields 16 and 17, in USER_HZ (100 per second on Linux).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(13)?.parse::<u64>().ok()? + fields.get(14)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Runs the fuzz targets; see the module docs.
pub fn fuzz(root: &Path, args: FuzzArgs) -> Result<()> {
    if args.ledger {
        return print_ledger(root);
    }
    let crates: Vec<String> = if args.crates.is_empty() {
        CRATES.iter().map(|c| c.to_string()).collect()
    } else {
        for c in &args.crates {
            if !CRATES.contains(&c.as_str()) {
                bail!("{c} has no fuzz target (crates: {})", CRATES.join(", "));
            }
        }
        args.crates.clone()
    };
    let budget = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    println!(
        "==> fuzz: {} cases per property per round, {}, profile `{}`",
        args.cases,
        budget.map_or("one round".to_owned(), |b| format!(
            "rounds for {}",
            fmt_duration(b)
        )),
        args.profile
    );
    // Build (and list) first, so the budget is spent fuzzing, not compiling.
    let mut targets = BTreeMap::new();
    for krate in &crates {
        let exe = build_target(root, krate, &args.profile)?;
        let props = properties(root, krate, &exe)?;
        println!("    {krate}: {}", props.join(", "));
        targets.insert(krate.clone(), (exe, props));
    }
    let start = Instant::now();
    let mut totals: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut rounds = 0u32;
    let over = || budget.is_none_or(|b| start.elapsed() >= b);
    while rounds == 0 || !over() {
        rounds += 1;
        for krate in &crates {
            if rounds > 1 && over() {
                break;
            }
            let (exe, props) = &targets[krate];
            let mut cmd = target_command(root, krate, exe);
            cmd.env("CACHET_FUZZ_CASES", args.cases.to_string());
            println!(
                "\n==> round {rounds} [{}]: {}",
                fmt_duration(start.elapsed()),
                display(&cmd)
            );
            let round = Instant::now();
            let cpu_before = children_cpu_seconds();
            run(&mut cmd).with_context(|| {
                format!(
                    "fuzzing {krate} failed: the minimal input is printed above (its seed is kept \
                     under target/proptest-regressions/); add it to {krate}'s tests/fuzz.rs as a \
                     named regression test with the fix"
                )
            })?;
            let seconds = round.elapsed().as_secs_f64();
            let cpu_seconds = cpu_before
                .zip(children_cpu_seconds())
                .map_or(seconds, |(before, after)| after - before);
            record_round(root, krate, args.cases, props.len(), seconds, cpu_seconds)?;
            for prop in props {
                *totals.entry((krate.clone(), prop.clone())).or_default() += u64::from(args.cases);
            }
        }
    }
    println!(
        "\nfuzz: no failure in {} ({rounds} rounds started); cases per target:",
        fmt_duration(start.elapsed()),
    );
    let mut sum = 0;
    for ((krate, prop), cases) in &totals {
        println!("  {krate:<18} {prop:<34} {cases:>10}");
        sum += cases;
    }
    println!("  {:<18} {:<34} {sum:>10}", "total", "");
    print_ledger(root)
}
