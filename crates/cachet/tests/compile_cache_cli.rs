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

/// The README's `wrap` example, run as written (in a folder with a `kernel.c` that includes a
/// header): compiled, then served from the cache, then compiled again after the header changes.
#[test]
fn the_readme_wrap_example_works_and_keys_on_included_headers() {
    let readme = include_str!("../../../README.md");
    let line = readme
        .lines()
        .find(|l| l.contains("compile-cache wrap"))
        .expect("the README shows wrap");
    let example: Vec<&str> = line
        .split('#')
        .next()
        .unwrap()
        .split_whitespace()
        .skip_while(|w| *w != "compile-cache")
        .collect();
    assert!(example.contains(&"--"), "{line}");
    let compiler = example[example.iter().position(|w| *w == "--").unwrap() + 1];
    let installed = Command::new(compiler)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("{compiler} is not installed: the README's wrap example was not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::write(
        dir.path().join("kernel.c"),
        "#include \"kernel.h\"\nint kernel(void) { return SCALE * 2; }\n",
    )
    .unwrap();
    let header = dir.path().join("kernel.h");
    std::fs::write(&header, "#define SCALE 3\n").unwrap();
    let run = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachet"));
        cmd.current_dir(dir.path())
            .args(&example[..1])
            .args(["--cache-dir", cache.to_str().unwrap(), "--json"])
            .args(&example[1..])
            .env_remove("CUSTOM_CACHE_REPO")
            .env("CACHET_DEFAULT_CACHE_REPO", "");
        json_ok(&cmd.output().unwrap())
    };
    let first = run();
    assert_eq!(first["source"], "compiled", "{first}");
    assert!(dir.path().join("kernel.o").is_file());
    assert_eq!(
        first["dependencies"],
        serde_json::json!(["kernel.c", "kernel.h"])
    );
    std::fs::remove_file(dir.path().join("kernel.o")).unwrap();
    assert_eq!(run()["source"], "local");
    assert!(dir.path().join("kernel.o").is_file());
    std::fs::write(&header, "#define SCALE 4\n").unwrap();
    assert_eq!(run()["source"], "compiled", "an edited header must not hit");
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

#[test]
fn cleanup_old_versions_prunes_the_hub_repo() {
    let server = hub_server::HubServer::start();
    server.add_repo("alice/team", true);
    for path in [
        "neuronxcc-2.19/MODULE_aaa/model.neff",
        "neuronxcc-2.19/0_REGISTRY/0.4.5/arch/aaa.json",
        "neuronxcc-2.19/MODULE_bbb/model.neff",
        "neuronxcc-2.19/0_REGISTRY/0.4.4/arch/bbb.json",
        "neuronxcc-2.18/MODULE_old/model.neff",
        "neuronxcc-2.18/0_REGISTRY/0.4.5/arch/old.json",
        "README.md",
    ] {
        server.put_file("alice/team", path, b"artifact".to_vec());
    }
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // The local cache's newest folder of each compiler is what the Hub keeps by default.
    std::fs::create_dir_all(cache.join("neuronxcc-2.19")).unwrap();
    let url = server.url();
    let home_s = home.path().to_str().unwrap();
    let cache_s = cache.to_str().unwrap();
    let no_token = [("HF_ENDPOINT", url.as_str()), ("HF_HOME", home_s)];
    let env = [
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HOME", home_s),
        ("HF_TOKEN", hub_server::WRITE_TOKEN),
    ];
    let cleanup = |extra: &[&str], envs: &[(&str, &str)]| {
        let mut args = vec![
            "compile-cache",
            "cleanup",
            "--cache-dir",
            cache_s,
            "--old-versions",
            "--hub",
        ];
        args.extend_from_slice(extra);
        cachet(&args, envs)
    };
    let all = server.paths("alice/team");

    // The read-only public default repo is refused, and so is deleting without a token.
    let out = cleanup(
        &[],
        &[
            ("HF_ENDPOINT", url.as_str()),
            ("HF_HOME", home_s),
            ("HF_TOKEN", hub_server::WRITE_TOKEN),
            (
                "CACHET_DEFAULT_CACHE_REPO",
                "aws-neuron/optimum-neuron-cache",
            ),
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read-only public cache"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cleanup(&["--repo", "alice/team"], &no_token);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a Hub token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --hub goes with --old-versions only; --tool-version needs --hub.
    let out = cachet(
        &[
            "compile-cache",
            "cleanup",
            "--cache-dir",
            cache_s,
            "--hub",
            "--repo",
            "alice/team",
        ],
        &env,
    );
    assert!(!out.status.success());
    let out = cachet(
        &[
            "compile-cache",
            "cleanup",
            "--cache-dir",
            cache_s,
            "--tool-version",
            "0.4.5",
        ],
        &env,
    );
    assert!(!out.status.success());
    assert_eq!(server.paths("alice/team"), all);

    // A dry run lists what would go and deletes nothing.
    let commits = server.commits("alice/team");
    let dry = json_ok(&cleanup(
        &[
            "--repo",
            "alice/team",
            "--tool-version",
            "0.4.5",
            "--dry-run",
            "--json",
        ],
        &env,
    ));
    let mut listed: Vec<&str> = dry["hub"]["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    listed.sort();
    let expected = [
        "neuronxcc-2.18/0_REGISTRY/0.4.5/arch/old.json",
        "neuronxcc-2.18/MODULE_old/model.neff",
        "neuronxcc-2.19/0_REGISTRY/0.4.4/arch/bbb.json",
        "neuronxcc-2.19/MODULE_bbb/model.neff",
    ];
    assert_eq!(listed, expected);
    assert_eq!(dry["hub"]["kept"][0], "neuronxcc-2.19");
    assert_eq!(dry["hub"]["dry_run"], true);
    assert_eq!(server.paths("alice/team"), all);
    assert_eq!(server.commits("alice/team"), commits);

    // For real: one commit, the kept version and the README stay.
    let out = cleanup(&["--repo", "alice/team", "--tool-version", "0.4.5"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("in 4 files from alice/team"), "{text}");
    assert!(text.contains("in one commit"), "{text}");
    assert_eq!(server.commits("alice/team"), commits + 1);
    let left = server.paths("alice/team");
    assert_eq!(
        left,
        [
            "README.md",
            "neuronxcc-2.19/0_REGISTRY/0.4.5/arch/aaa.json",
            "neuronxcc-2.19/MODULE_aaa/model.neff",
        ]
    );
    assert!(
        cache.join("neuronxcc-2.19").is_dir(),
        "local kept folder stays"
    );
}
