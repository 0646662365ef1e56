//! `cargo xtask fuzz`: the property-based fuzz targets of every parser (`crates/*/tests/fuzz.rs`,
//! proptest on stable Rust) with a long budget.
//!
//! `cargo test` runs each property for `CACHET_FUZZ_CASES` cases (256 by default, see
//! `tests/fuzz_support.rs`); this command sets it higher and runs `cargo test -p <crate> --test
//! fuzz` for each crate, round after round with fresh random seeds until the time budget is
//! spent. It builds with the `fuzz` profile (release speed, overflow checks and debug assertions
//! kept in the workspace's code: an overflow that release would wrap silently is a finding).
//! A failure stops the run; proptest prints the minimal input and keeps its seed under
//! `target/proptest-regressions/`. Properties are the tests named `*arbitrary*` or `*mutated*`;
//! the summary counts their cases.

use std::collections::BTreeMap;
use std::path::Path;
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
}

fn fuzz_command(root: &Path, krate: &str, profile: &str) -> Command {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root)
        .args(["test", "--profile", profile, "-p", krate, "--test", "fuzz"]);
    cmd
}

/// The properties of a crate's fuzz target (its tests named `*arbitrary*` / `*mutated*`).
fn properties(root: &Path, krate: &str, profile: &str) -> Result<Vec<String>> {
    let mut cmd = fuzz_command(root, krate, profile);
    cmd.args(["--", "--list", "--format", "terse"]);
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

/// Runs the fuzz targets; see the module docs.
pub fn fuzz(root: &Path, args: FuzzArgs) -> Result<()> {
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
        let props = properties(root, krate, &args.profile)?;
        println!("    {krate}: {}", props.join(", "));
        targets.insert(krate.clone(), props);
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
            let mut cmd = fuzz_command(root, krate, &args.profile);
            cmd.env("CACHET_FUZZ_CASES", args.cases.to_string());
            println!(
                "\n==> round {rounds} [{}]: {}",
                fmt_duration(start.elapsed()),
                display(&cmd)
            );
            run(&mut cmd).with_context(|| {
                format!(
                    "fuzzing {krate} failed: the minimal input is printed above (its seed is kept \
                     under target/proptest-regressions/); add it to {krate}'s tests/fuzz.rs as a \
                     named regression test with the fix"
                )
            })?;
            for prop in &targets[krate] {
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
    Ok(())
}
