//! `cachet generate` and `cachet perplexity` with text: the embedded default prints text, a GGUF
//! file and a model folder answer a question, `--json` adds `text`, an over-long prompt exits
//! with 1, perplexity runs and rejects bad options. The SmolLM2 cases are skipped
//! (`SKIPPED: …`) without the files of `cargo xtask fetch-model smollm2`.

use std::path::PathBuf;
use std::process::Command;

fn models_dir() -> PathBuf {
    match std::env::var_os("CACHET_MODELS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/models"),
    }
}

fn model(name: &str) -> Option<PathBuf> {
    let path = models_dir().join(name);
    if path.exists() {
        Some(path)
    } else {
        // `cargo xtask ci` requires the GGUF file (CACHET_REQUIRE_MODELS=gguf): no silent skip.
        let kind = if name.ends_with(".gguf") {
            "gguf"
        } else {
            "hf"
        };
        let required = std::env::var("CACHET_REQUIRE_MODELS")
            .is_ok_and(|v| v.split(',').any(|k| k.trim() == kind));
        assert!(
            !required,
            "{} is missing and CACHET_REQUIRE_MODELS requires it",
            path.display()
        );
        println!(
            "SKIPPED: {} is missing (run `cargo xtask fetch-model smollm2`)",
            path.display()
        );
        None
    }
}

/// Fails the test with the command's stderr unless it exited successfully.
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cachet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cachet"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn gguf_answers_in_text() {
    let Some(gguf) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let out = cachet(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    succeeded(&out);
    assert!(stdout.contains("Paris"), "{stdout}");
}

#[test]
fn folder_json_has_text_and_stop_strings_cut_it() {
    let Some(dir) = model("SmolLM2-135M-Instruct") else {
        return;
    };
    let out = cachet(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--json",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
        "--stop",
        "Paris",
    ]);
    succeeded(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(!text.contains("Paris") && text.contains("France"), "{text}");
    assert!(!v["tokens"].as_array().unwrap().is_empty());
}

#[test]
fn overlong_prompt_exits_1() {
    let Some(dir) = model("SmolLM2-135M-Instruct") else {
        return;
    };
    let prompt = "word ".repeat(9000);
    let out = cachet(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--raw",
        "--prompt",
        &prompt,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("context"));
}

#[test]
fn chat_keeps_the_conversation() {
    let Some(gguf) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cachet"))
        .args([
            "generate",
            "--chat",
            "--max-new-tokens",
            "24",
            "--model",
            gguf.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Italy?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    succeeded(&out);
    assert!(
        stdout.contains("Paris") && stdout.contains("Rome"),
        "{stdout}"
    );
}

fn text_file() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/text/alice.txt")
        .display()
        .to_string()
}

#[test]
fn embedded_default_prints_text_and_takes_a_prompt() {
    let out = cachet(&["generate"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    succeeded(&out);
    assert!(stdout.contains("text:    \""), "{stdout}");
    assert!(stdout.contains("random weights"), "{stdout}");
    let out = cachet(&[
        "generate",
        "--prompt",
        "Alice",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    succeeded(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["text"].is_string(), "{v}");
    // ChatML from the embedded tokenizer_config.json: <|im_start|> is id 3.
    assert_eq!(v["prompt_ids"][0][0], 3, "{v}");
}

#[test]
fn perplexity_on_the_embedded_default() {
    let text = text_file();
    let base = [
        "perplexity",
        "--text",
        text.as_str(),
        "--max-tokens",
        "300",
        "--context",
        "128",
        "--stride",
        "64",
        "--json",
    ];
    let out = cachet(&base);
    succeeded(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], 300);
    assert_eq!(v["report"]["tokens_scored"], 299);
    let ppl = v["report"]["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{v}");
    // The same windows fed 32 tokens at a time through a cache give the same perplexity.
    let chunked = cachet(&[&base[..], &["--chunk", "32", "--cache", "static"]].concat());
    succeeded(&chunked);
    let w: serde_json::Value = serde_json::from_slice(&chunked.stdout).unwrap();
    let other = w["report"]["perplexity"].as_f64().unwrap();
    assert!((other / ppl - 1.0).abs() < 1e-4, "{ppl} vs {other}");
}

#[test]
fn perplexity_bad_input_exits_1_with_a_message() {
    let text = text_file();
    for (args, needle) in [
        (
            vec!["perplexity", "--text", "/nonexistent/file.txt"],
            "file.txt",
        ),
        (
            vec!["perplexity", "--text", text.as_str(), "--stride", "0"],
            "stride",
        ),
        (
            vec!["perplexity", "--text", text.as_str(), "--max-tokens", "1"],
            "at least 2",
        ),
        (
            vec!["perplexity", "--text", text.as_str(), "--quantize", "nf4"],
            "--model",
        ),
        (
            vec!["perplexity", "--text", text.as_str(), "--cache", "bogus"],
            "bogus",
        ),
    ] {
        let out = cachet(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
