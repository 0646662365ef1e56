//! Serves the loopback Hub test server standalone (for `xtask/goldens/compile_cache.py`, which
//! drives the official Python `huggingface_hub` client through it).
//!
//! Prints `http://127.0.0.1:PORT` on the first line of stdout and serves until stdin closes, then
//! lists the requests it served on stderr.
//! Tokens: `hf_write_token_for_tests` (user alice, write), `hf_read_token_for_tests` (bob, read).
//! `--lfs-threshold BYTES` sets the size from which uploads go to LFS (default 10 MiB, the Hub's),
//! `--part-size BYTES` makes larger LFS objects go up in parts of that size (multipart).

#[path = "../tests/support/hub_server.rs"]
mod hub_server;

use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        let at = args.iter().position(|a| a == flag)?;
        let text = args
            .get(at + 1)
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        Some(
            text.parse::<usize>()
                .unwrap_or_else(|_| panic!("{flag} takes a byte count, not {text:?}")),
        )
    };
    let server = hub_server::HubServer::start();
    server.set_lfs(
        value("--lfs-threshold").unwrap_or(hub_server::LFS_THRESHOLD),
        value("--part-size"),
    );
    println!("{}", server.url());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    let log = server.log();
    eprintln!("{} requests served:", log.len());
    for line in log {
        eprintln!("  {line}");
    }
}
