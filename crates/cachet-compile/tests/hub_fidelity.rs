//! Fidelity of the loopback Hub test server: the official Python `huggingface_hub` client drove
//! it (recorded by `xtask/goldens/compile_cache.py --hub-server auto` in
//! `fixtures/hub_fidelity.json`), and hf-hub, driven the same way here, sees the same repo.

mod support;

use std::time::Duration;

use cachet_compile::hub::{self, HubCache, HubOptions};
use serde_json::Value;
use support::hub_server::{HubServer, WRITE_TOKEN};

fn recorded() -> Value {
    serde_json::from_str(include_str!("fixtures/hub_fidelity.json")).unwrap()
}

fn step<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("step {name} not recorded"));
    assert_eq!(s["ok"], true, "python step {name} failed: {s}");
    &s["value"]
}

#[test]
fn python_client_worked_against_the_server() {
    let doc = recorded();
    assert_eq!(step(&doc, "whoami"), "alice");
    assert_eq!(step(&doc, "create_repo"), "alice/py-cache");
    assert_eq!(step(&doc, "upload_folder"), true);
    assert_eq!(step(&doc, "repo_info_private"), true);
    assert_eq!(step(&doc, "hf_hub_download_sha256"), true);
    assert_eq!(
        step(&doc, "anonymous_private_repo_info_rejected"),
        "RepositoryNotFoundError"
    );
    assert_eq!(step(&doc, "missing_file_404"), "RemoteEntryNotFoundError");
    // Commits with `deletedFolder` / `deletedFile`, and a missing file's 404.
    assert_eq!(step(&doc, "upload_file"), true);
    assert_eq!(step(&doc, "delete_folder"), true);
    assert_eq!(step(&doc, "delete_file"), true);
    assert_eq!(
        step(&doc, "tree_after_deletes"),
        &serde_json::json!(["neuronxcc-2.0/MODULE_0123456789abcdef0123/model.neff"])
    );
    assert_eq!(
        step(&doc, "delete_missing_file_rejected"),
        "RemoteEntryNotFoundError"
    );
}

#[test]
fn hf_hub_sees_what_python_saw() {
    let server = HubServer::start();
    let options = HubOptions {
        endpoint: Some(server.url()),
        token: Some(WRITE_TOKEN.into()),
        timeout: Duration::from_secs(2),
        retries: 0,
        commit_attempts: 1,
        progress: false,
    };
    assert_eq!(
        hub::create_repo(&options, Some("py-cache"), false).unwrap(),
        "alice/py-cache"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut payload: Vec<u8> = (0..4096).flat_map(|_| 0u8..=255).collect();
    payload.extend("é".as_bytes());
    let neff = dir.path().join("model.neff");
    std::fs::write(&neff, &payload).unwrap();
    let flags = dir.path().join("flags.json");
    std::fs::write(&flags, "[\"-O1\"]").unwrap();
    let module = "neuronxcc-2.0/MODULE_0123456789abcdef0123";
    let cache = HubCache::new("alice/py-cache", options).unwrap();
    cache
        .upload(
            &[
                (format!("{module}/model.neff"), neff),
                (format!("{module}/compile_flags.json"), flags),
            ],
            "rust upload",
        )
        .unwrap();
    assert!(cache.info().unwrap().private);
    let listed: Vec<Value> = cache
        .list_files("")
        .unwrap()
        .into_iter()
        .map(|f| serde_json::json!([f.path, f.size]))
        .collect();
    assert_eq!(&Value::Array(listed), step(&recorded(), "list_repo_tree"));
    assert_eq!(
        cache
            .read_text(&format!("{module}/compile_flags.json"))
            .unwrap(),
        "[\"-O1\"]"
    );
}
