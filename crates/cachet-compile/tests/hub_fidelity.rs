//! Fidelity of the loopback Hub test server: the official Python `huggingface_hub` client drove
//! it (recorded by `xtask/goldens/compile_cache.py --hub-server auto` in
//! `fixtures/hub_fidelity.json`), the LFS upload flow included (multipart parts of 5 MiB), and
//! cachet's client, driven the same way here, sees the same repo.

mod support;

use std::time::Duration;

use cachet_compile::hub::{self, HubCache, HubOptions};
use serde_json::Value;
use support::hub_server::{HubServer, LFS_THRESHOLD, WRITE_TOKEN};

/// The part size `compile_cache.py` starts the server with (`LFS_PART_SIZE`).
const LFS_PART_SIZE: usize = 5 << 20;
/// The size of its LFS file (`LFS_FILE_SIZE`), above the Hub's 10 MiB threshold.
const LFS_FILE_SIZE: usize = 12 << 20;

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
        &serde_json::json!([
            "neuronxcc-2.0/MODULE_0123456789abcdef0123/big.neff",
            "neuronxcc-2.0/MODULE_0123456789abcdef0123/model.neff"
        ])
    );
    // A file above the LFS threshold went up through the LFS flow and is listed in LFS.
    assert_eq!(step(&doc, "upload_lfs_file"), true);
    assert_eq!(step(&doc, "lfs_download_equal"), true);
    let tree = step(&doc, "lfs_tree");
    assert_eq!(tree[0][1], LFS_FILE_SIZE);
    assert_eq!(&tree[0][2], step(&doc, "lfs_sha256"));
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

    // The LFS file, as Python uploaded it: the same flow, the same listing.
    server.set_lfs(LFS_THRESHOLD, Some(LFS_PART_SIZE));
    let big: Vec<u8> = (0..LFS_FILE_SIZE).map(|i| (i * 31 % 251) as u8).collect();
    let big_file = dir.path().join("big.neff");
    std::fs::write(&big_file, &big).unwrap();
    let big_path = format!("{module}/big.neff");
    let before = server.log().len();
    cache
        .upload(&[(big_path.clone(), big_file)], "rust LFS upload")
        .unwrap();
    let flow: Vec<String> = server.log()[before..]
        .iter()
        .map(|l| {
            let l = l.replace("alice/py-cache", "REPO");
            match l.split_once("/lfs-upload/") {
                Some((method, rest)) => {
                    format!("{method}/lfs-upload/OID{}", &rest[64.min(rest.len())..])
                }
                None => l,
            }
        })
        .collect();
    assert_eq!(
        flow,
        [
            "POST /api/models/REPO/preupload/main",
            "POST /REPO.git/info/lfs/objects/batch",
            "PUT /lfs-upload/OID/part/1",
            "PUT /lfs-upload/OID/part/2",
            "PUT /lfs-upload/OID/part/3",
            "POST /lfs-upload/OID",
            "POST /REPO.git/info/lfs/objects/verify",
            "POST /api/models/REPO/commit/main",
        ]
    );
    let listed: Vec<Value> = cache
        .list_files(module)
        .unwrap()
        .into_iter()
        .filter(|f| f.path == big_path)
        .map(|f| serde_json::json!([f.path, f.size, f.sha256]))
        .collect();
    assert_eq!(&Value::Array(listed), step(&recorded(), "lfs_tree"));
}
