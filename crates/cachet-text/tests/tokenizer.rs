//! SmolLM2's tokenizer (tokenizer.json and the GGUF file's metadata) against transformers'
//! goldens; skipped with `SKIPPED: …` when `cargo xtask fetch-model smollm2` has not run.

use std::path::{Path, PathBuf};

use cachet_text::{DecodeStream, StopStrings, TextModel, Tokenizer};

fn models_dir() -> PathBuf {
    match std::env::var_os("CACHET_MODELS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models"),
    }
}

fn smollm2_dir() -> Option<PathBuf> {
    let dir = models_dir().join("SmolLM2-135M-Instruct");
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        println!(
            "SKIPPED: {} has no tokenizer.json (run `cargo xtask fetch-model smollm2`)",
            dir.display()
        );
        None
    }
}

fn goldens() -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_goldens.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_against_goldens(tok: &Tokenizer) {
    for case in goldens() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids_no_special"]),
            "{text:?}"
        );
        let with = ids(&case["ids"]);
        assert_eq!(
            tok.decode(&with, false).unwrap(),
            case["decoded"].as_str().unwrap()
        );
        assert_eq!(
            tok.decode(&with, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap()
        );
    }
}

#[test]
fn tokenizer_json_matches_transformers() {
    let Some(dir) = smollm2_dir() else { return };
    let text = TextModel::from_dir(&dir).unwrap();
    check_against_goldens(&text.tokenizer);
    assert_eq!(text.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(text.eos_token_id(), Some(2));
    assert!(text.tokenizer.special_ids().contains(&2));
    assert!(text.chat_template.is_some());
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let Some(dir) = smollm2_dir() else { return };
    let gguf = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        println!(
            "SKIPPED: {} is missing (run `cargo xtask fetch-model smollm2`)",
            gguf.display()
        );
        return;
    }
    let from_gguf = TextModel::from_gguf(&gguf).unwrap();
    check_against_goldens(&from_gguf.tokenizer);
    let from_json = TextModel::from_dir(&dir).unwrap();
    for case in goldens() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            from_gguf.tokenizer.encode(text, false).unwrap(),
            from_json.tokenizer.encode(text, false).unwrap()
        );
    }
    assert_eq!(from_gguf.eos_token_id(), Some(2));
    let messages = [cachet_text::Message::user("What is the capital of France?")];
    assert_eq!(
        from_gguf.render_chat(&messages, true).unwrap(),
        from_json.render_chat(&messages, true).unwrap()
    );
}

#[test]
fn streaming_decode_reassembles_the_text() {
    let Some(dir) = smollm2_dir() else { return };
    let tok = TextModel::from_dir(&dir).unwrap().tokenizer;
    for case in goldens() {
        let ids = ids(&case["ids"]);
        let mut stream = DecodeStream::new(false);
        let mut out = String::new();
        for &id in &ids {
            if let Some(piece) = stream.step(&tok, id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                out.push_str(&piece);
            }
        }
        out.push_str(&stream.flush(&tok).unwrap());
        assert_eq!(out, case["decoded"].as_str().unwrap());
    }
    // An emoji spans several byte-level tokens: nothing is emitted until it is whole.
    let ids = tok.encode("😀", false).unwrap();
    assert!(ids.len() > 1);
    let mut stream = DecodeStream::new(false);
    let pieces: Vec<Option<String>> = ids
        .iter()
        .map(|&id| stream.step(&tok, id).unwrap())
        .collect();
    assert!(pieces[..ids.len() - 1].iter().all(Option::is_none));
    assert_eq!(pieces.last().unwrap().as_deref(), Some("😀"));
    let mut stops = StopStrings::new(["France"]);
    assert_eq!(stops.push("Paris, Fran"), "Paris, ");
    assert_eq!(stops.push("ce!"), "");
    assert!(stops.stopped());
}

#[test]
fn unparsable_tokenizer_json_names_the_file() {
    let dir = std::env::temp_dir().join(format!("cachet-text-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let err = TextModel::from_dir(&dir).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains("tokenizer.json") && err.contains("not a usable tokenizer"),
        "{err}"
    );
}

/// The embedded tiny Llama's tokenizer and ChatML template (no download) against transformers'
/// encodings and `apply_chat_template` (crates/cachet-text/tests/fixtures/embedded_tokenizer.json,
/// from xtask/goldens/embedded_tokenizer.py).
#[test]
fn embedded_tokenizer_and_template_match_transformers() {
    let assets =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cachet-models/assets/tiny-llama");
    let text = cachet_text::TextModel::from_dir(&assets).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/embedded_tokenizer.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for case in golden["encodings"].as_array().unwrap() {
        let s = case["text"].as_str().unwrap();
        let got = text.tokenizer.encode(s, true).unwrap();
        assert_eq!(got, ids(&case["ids"]), "{s:?}");
        assert_eq!(text.tokenizer.decode(&got, false).unwrap(), s);
    }
    let chat = &golden["chat"];
    let messages: Vec<cachet_text::Message> =
        serde_json::from_value(chat["messages"].clone()).unwrap();
    let rendered = text.render_chat(&messages, true).unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    assert_eq!(
        text.tokenizer.encode(&rendered, true).unwrap(),
        ids(&chat["ids"])
    );
    assert_eq!(text.eos_token_id(), Some(2));
}

/// A `llama`-type (SentencePiece BPE, byte fallback) GGUF tokenizer against transformers' own
/// GGUF conversion (fixtures from xtask/goldens/gguf_llama_tokenizer.py; no download).
#[cfg(feature = "gguf")]
#[test]
fn gguf_sentencepiece_tokenizer_matches_transformers() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let text = cachet_text::TextModel::from_gguf(fixtures.join("llama_tokenizer.gguf")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("llama_tokenizer.json")).unwrap(),
    )
    .unwrap();
    let source =
        std::fs::read_to_string(fixtures.join("../../../../tests/fixtures/text/alice.txt"))
            .unwrap();
    let cases = golden["cases"].as_array().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let input: String = match case["text"].as_str() {
            Some(s) => s.to_string(),
            None => source
                .chars()
                .take(case["text_prefix_chars"].as_u64().unwrap() as usize)
                .collect(),
        };
        let got = text.tokenizer.encode(&input, true).unwrap();
        assert_eq!(
            got,
            ids(&case["ids"]),
            "case {i}: {:?}",
            &input[..input.len().min(40)]
        );
        if let Some(want) = golden["decoded"].get(i) {
            assert_eq!(
                text.tokenizer.decode(&got, true).unwrap(),
                want.as_str().unwrap(),
                "case {i}"
            );
        }
    }
}
