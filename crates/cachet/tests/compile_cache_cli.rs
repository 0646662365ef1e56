//! End-to-end tests of `cachet compile-cache` (hash goldens from optimum-neuron 0.4.5, local
//! status/cleanup, wrap, and the Hub commands against a loopback Hub).
#![cfg(feature = "compile")]

#[path = "../../cachet-compile/tests/support/hub_server.rs"]
mod hub_server;

use std::process::{Command, Output};

use serde_json::Value;

fn cachet(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachet"));
    cmd.args(args)
        .env_remove("CUSTOM_CACHE_REPO")
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env("CACHET_DEFAULT_CACHE_REPO", "");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("cachet binary runs")
}

fn json_ok(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "cachet failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

#[test]
fn hash_matches_optimum_neuron_goldens() {
    let goldens: Value = serde_json::from_str(include_str!(
        "../../cachet-compile/tests/fixtures/entry_hashes.json"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for record in goldens["entries"].as_array().unwrap() {
        let Some(neuron) = record["neuron_json"].as_str() else {
            continue;
        };
        let config = dir.path().join("config.json");
        let neuron_path = dir.path().join("neuron.json");
        std::fs::write(&config, record["config_json"].as_str().unwrap()).unwrap();
        std::fs::write(&neuron_path, neuron).unwrap();
        let mut args = vec![
            "compile-cache",
            "hash",
            "--config",
            config.to_str().unwrap(),
            "--neuron-config",
            neuron_path.to_str().unwrap(),
            "--model-id",
            record["model_id"].as_str().unwrap(),
            "--json",
        ];
        if let Some(task) = record["task"].as_str() {
            args.extend(["--task", task]);
        }
        let out = json_ok(&cachet(&args, &[]));
        assert_eq!(out["hash"], record["hash"], "{}", record["name"]);
        assert_eq!(
            out["arch_digest"], record["arch_digest"],
            "{}",
            record["name"]
        );
    }
}

#[test]
fn wrap_status_and_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = dir.path().join("out.txt");
    let cmd = format!(
        "echo compiled >> {0}.log; echo artifact > {0}",
        out.display()
    );
    let wrap = |expect: &str| {
        let o = json_ok(&cachet(
            &[
                "compile-cache",
                "wrap",
                "--cache-dir",
                cache.to_str().unwrap(),
                "--json",
                "--output",
                out.to_str().unwrap(),
                "--",
                "sh",
                "-c",
                &cmd,
            ],
            &[],
        ));
        assert_eq!(o["source"], expect);
    };
    wrap("compiled");
    std::fs::remove_file(&out).unwrap();
    wrap("local");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "artifact\n");
    assert_eq!(
        std::fs::read_to_string(format!("{}.log", out.display()))
            .unwrap()
            .lines()
            .count(),
        1
    );

    let status = json_ok(&cachet(
        &[
            "compile-cache",
            "status",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--json",
        ],
        &[],
    ));
    assert_eq!(status["versions"][0]["modules"], 1);
    let text = cachet(
        &[
            "compile-cache",
            "status",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[],
    );
    assert!(String::from_utf8_lossy(&text.stdout).contains("1 modules"));
    let dry = json_ok(&cachet(
        &[
            "compile-cache",
            "cleanup",
            "--all",
            "--dry-run",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--json",
        ],
        &[],
    ));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["removed"].as_array().unwrap().len(), 1);
    json_ok(&cachet(
        &[
            "compile-cache",
            "cleanup",
            "--all",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--json",
        ],
        &[],
    ));
    let status = json_ok(&cachet(
        &[
            "compile-cache",
            "status",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--json",
        ],
        &[],
    ));
    assert_eq!(status["versions"].as_array().unwrap().len(), 0);
}

#[test]
fn hub_commands_against_a_loopback_hub() {
    let server = hub_server::HubServer::start();
    let home = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HOME", home.path().to_str().unwrap()),
        ("HF_TOKEN", hub_server::WRITE_TOKEN),
    ];
    let created = json_ok(&cachet(
        &["compile-cache", "create", "-n", "team-cache", "--json"],
        &env,
    ));
    assert_eq!(created["repo"], "alice/team-cache");
    assert_eq!(created["private"], true);
    let saved = std::fs::read_to_string(home.path().join("cachet_compile_cache_repo")).unwrap();
    assert_eq!(saved, "alice/team-cache");

    // A compile through `wrap --hub`, then synchronize pushes it, then lookup finds nothing
    // for an unrelated model id and the registry lists the wrapped command's entry.
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = dir.path().join("a.out");
    let cmd = format!("echo built > {}", out.display());
    json_ok(&cachet(
        &[
            "compile-cache",
            "wrap",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--json",
            "--output",
            out.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &cmd,
        ],
        &env,
    ));
    let sync = json_ok(&cachet(
        &[
            "compile-cache",
            "synchronize",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--json",
        ],
        &env,
    ));
    let uploaded = sync["folders"][0]["report"]["uploaded"]
        .as_array()
        .unwrap()
        .len();
    assert!(uploaded >= 4, "{sync}");
    assert!(server.paths("alice/team-cache").len() >= 4);
    let again = json_ok(&cachet(
        &[
            "compile-cache",
            "synchronize",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--json",
        ],
        &env,
    ));
    assert_eq!(
        again["folders"][0]["report"]["uploaded"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let found = json_ok(&cachet(
        &["compile-cache", "lookup", "nobody/none", "--json"],
        &env,
    ));
    assert_eq!(found["entries"].as_array().unwrap().len(), 0);

    // The token file written by `huggingface-cli login` ($HF_HOME/token) authenticates too:
    // the private repo is visible with it and invisible without it.
    let file_env = [
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HOME", home.path().to_str().unwrap()),
    ];
    let anonymous = cachet(&["compile-cache", "set", "alice/team-cache"], &file_env);
    assert!(!anonymous.status.success());
    std::fs::write(
        home.path().join("token"),
        format!("{}\n", hub_server::WRITE_TOKEN),
    )
    .unwrap();
    let set = json_ok(&cachet(
        &["compile-cache", "set", "alice/team-cache", "--json"],
        &file_env,
    ));
    assert_eq!(set["private"], true);

    // `set` checks the repo exists; a bad token is a clear error without the token in it.
    let missing = cachet(&["compile-cache", "set", "alice/nope"], &env);
    assert!(!missing.status.success());
    let bad = cachet(
        &["compile-cache", "set", "alice/team-cache"],
        &[
            ("HF_ENDPOINT", url.as_str()),
            ("HF_HOME", home.path().to_str().unwrap()),
            ("HF_TOKEN", "hf_bad_secret"),
        ],
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("401") || stderr.contains("authentication"),
        "{stderr}"
    );
    assert!(!stderr.contains("hf_bad_secret"), "{stderr}");
}
