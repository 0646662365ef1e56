//! Reads JSON as Python's `json.loads` does and writes it back as `json.dumps(sort_keys=True)`.

use cachet_pyjson::{DumpOptions, dumps, loads};

fn main() {
    let text = std::env::args()
        .nth(1)
        .unwrap_or_else(|| r#"{"b": 1e-5, "a": [NaN, 100.0, 12345678901234567890]}"#.into());
    match loads(&text) {
        Ok(value) => println!("{}", dumps(&value, DumpOptions::COMPACT_SORTED)),
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}
