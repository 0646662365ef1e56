//! Workspace-level benchmarks of cachet live in `benches/`; run them with `cargo xtask bench`.
