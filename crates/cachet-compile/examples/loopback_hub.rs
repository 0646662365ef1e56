//! Serves the loopback Hub test server standalone (for `xtask/goldens/compile_cache.py`, which
//! drives the official Python `huggingface_hub` client through it).
//!
//! Prints `http://127.0.0.1:PORT` on the first line of stdout and serves until stdin closes.
//! Tokens: `hf_write_token_for_tests` (user alice, write), `hf_read_token_for_tests` (bob, read).

#[path = "../tests/support/hub_server.rs"]
mod hub_server;

use std::io::Read;

fn main() {
    let server = hub_server::HubServer::start();
    println!("{}", server.url());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    eprintln!("{} requests served", server.log().len());
}
