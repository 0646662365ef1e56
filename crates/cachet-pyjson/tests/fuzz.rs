//! Property-based fuzzing of `loads`: arbitrary text and mutations of a valid document must give
//! a value or a `LoadError` (never a panic, never more than a small multiple of the text in
//! memory), and every value read must survive `dumps` and read back equal in both of the forms
//! optimum-neuron hashes.
//! Budget: `CACHET_FUZZ_CASES` (default 256) per property; `cargo xtask fuzz` runs more.

#[path = "../../../tests/fuzz_support.rs"]
mod fuzz_support;

use std::time::Duration;

use cachet_pyjson::{DumpOptions, INT_MAX_STR_DIGITS, dumps, loads};
use fuzz_support::{any_json, any_text, bounded, fails_fast, mutated_bytes, mutated_json};
use proptest::prelude::*;
use serde_json::json;

fn valid() -> serde_json::Value {
    json!({
        "model_type": "llama",
        "hidden_size": 4096,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"factor": 8.0, "rope_type": "llama3"},
        "architectures": ["LlamaForCausalLM"],
        "eos_token_id": [128001, 128009],
        "tie_word_embeddings": false,
        "pad_token_id": null,
        "name": "caf\u{e9} \u{1F600} \"q\"\n"
    })
}

const KEYS: &[&str] = &["model_type", "hidden_size", "rms_norm_eps", "rope_scaling"];

fn check(text: &str) -> Result<(), TestCaseError> {
    let Ok(value) = bounded(text.len(), || loads(text))? else {
        return Ok(());
    };
    for options in [DumpOptions::ENTRY, DumpOptions::COMPACT_SORTED] {
        let dumped = dumps(&value, options);
        let back = loads(&dumped);
        prop_assert!(
            back.is_ok(),
            "dumps wrote {dumped:?}, which loads refuses: {back:?}"
        );
        prop_assert_eq!(back.unwrap(), value.clone());
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn loads_arbitrary_text(text in prop_oneof![
        any_text(),
        any_json(KEYS).prop_map(|v| v.to_string()),
    ]) {
        check(&text)?;
    }

    #[test]
    fn loads_arbitrary_bytes_as_utf8(bytes in fuzz_support::any_bytes()) {
        check(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn loads_mutated(text in prop_oneof![
        mutated_json(valid(), KEYS),
        mutated_bytes(valid().to_string().into_bytes())
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]) {
        check(&text)?;
    }
}

#[test]
fn deep_nesting_and_long_integers_are_refused_fast() {
    let deep = "[".repeat(1 << 20);
    let err = fails_fast("a million open brackets", Duration::from_secs(1), || {
        loads(&deep)
    });
    assert!(err.contains("nesting too deep"), "{err}");
    let digits = "9".repeat(INT_MAX_STR_DIGITS + 1);
    let err = fails_fast("4301 digits", Duration::from_secs(1), || loads(&digits));
    assert!(err.contains("4300"), "{err}");
    // Deep but allowed nesting reads and writes back.
    let ok = format!("{}{}", "[".repeat(500), "]".repeat(500));
    check(&ok).unwrap();
}
