//! Pruning old compiler and tool versions from a Hub cache repo (`cleanup --old-versions --hub`)
//! against the loopback Hub test server: one commit of deletions, dry runs, refusals without a
//! token or write access, conflict retries, and the server's atomic commits with deletions.

mod support;

use std::sync::Once;
use std::time::Duration;

use cachet_compile::CompileCacheError;
use cachet_compile::hub::{HubCache, HubOptions, RemoteFile, plan_prune};
use hf_hub::repository::CommitOperation;
use support::hub_server::{FaultKind, HubServer, READ_TOKEN, WRITE_TOKEN};

/// Tokens come only from the options in this binary (not from the environment or
/// `$HF_HOME/token` of the machine running the tests). Every test calls this first, before any
/// thread reads the environment.
fn isolate() {
    static ONCE: Once = Once::new();
    // SAFETY: runs once, before any test thread of this binary reads the environment.
    ONCE.call_once(|| unsafe { std::env::set_var("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1") });
}

fn options(server: &HubServer, token: Option<&str>) -> HubOptions {
    HubOptions {
        endpoint: Some(server.url()),
        token: token.map(str::to_owned),
        timeout: Duration::from_secs(2),
        retries: 0,
        commit_attempts: 3,
        progress: false,
    }
}

const KEEP: &str = "neuronxcc-2.19";

/// A repo with two neuronxcc versions, two registry tool versions, an nvcc folder and a README.
fn populate(server: &HubServer, repo: &str, private: bool) {
    server.add_repo(repo, private);
    for (path, bytes) in [
        // Kept compiler, current tool version.
        ("neuronxcc-2.19/MODULE_aaa/model.neff", 1000),
        ("neuronxcc-2.19/0_REGISTRY/0.4.5/arch1/aaa.json", 10),
        ("neuronxcc-2.19/0_REGISTRY/0.4.5/llama/org/m/aaa.json", 10),
        // Kept compiler, only an old tool version names bbb: entry and module go.
        ("neuronxcc-2.19/MODULE_bbb/model.neff", 2000),
        ("neuronxcc-2.19/MODULE_bbb/compile_flags.json", 20),
        ("neuronxcc-2.19/0_REGISTRY/0.4.4/arch1/bbb.json", 10),
        ("neuronxcc-2.19/0_REGISTRY/0.4.4/llama/org/m/bbb.json", 10),
        // Named by both tool versions: the old entry goes, the module stays.
        ("neuronxcc-2.19/MODULE_ccc/model.neff", 3000),
        ("neuronxcc-2.19/0_REGISTRY/0.4.4/arch1/ccc.json", 10),
        ("neuronxcc-2.19/0_REGISTRY/0.4.5/arch1/ccc.json", 10),
        // Named by no registry entry (served by hash): left alone.
        ("neuronxcc-2.19/MODULE_ddd/model.neff", 4000),
        // Another version of the kept compiler: all of it goes.
        ("neuronxcc-2.18/MODULE_old/model.neff", 5000),
        ("neuronxcc-2.18/0_REGISTRY/0.4.5/arch0/old.json", 10),
        // A compiler with no kept version, and files outside compiler folders: untouched.
        ("nvcc-12.1/MODULE_n/kernel.cubin", 600),
        ("README.md", 5),
        (".gitattributes", 5),
    ] {
        server.put_file(repo, path, vec![7u8; bytes]);
    }
}

/// What pruning with `keep = [KEEP]` and tool version 0.4.5 deletes.
fn expected_with_tool_version() -> Vec<String> {
    sorted(
        [
            "neuronxcc-2.18/0_REGISTRY/0.4.5/arch0/old.json",
            "neuronxcc-2.18/MODULE_old/model.neff",
            "neuronxcc-2.19/0_REGISTRY/0.4.4/arch1/bbb.json",
            "neuronxcc-2.19/0_REGISTRY/0.4.4/arch1/ccc.json",
            "neuronxcc-2.19/0_REGISTRY/0.4.4/llama/org/m/bbb.json",
            "neuronxcc-2.19/MODULE_bbb/compile_flags.json",
            "neuronxcc-2.19/MODULE_bbb/model.neff",
        ]
        .map(String::from)
        .to_vec(),
    )
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn dry_run_lists_and_deletes_nothing() {
    isolate();
    let server = HubServer::start();
    populate(&server, "alice/cache", false);
    let before = server.paths("alice/cache");
    let commits = server.commits("alice/cache");
    // Reading is enough to plan: bob's read token on alice's public repo.
    let hub = HubCache::new("alice/cache", options(&server, Some(READ_TOKEN))).unwrap();
    let report = hub
        .prune_old_versions(&[KEEP.into()], Some("0.4.5"), true)
        .unwrap();
    assert!(report.dry_run);
    assert_eq!(sorted(report.deleted.clone()), expected_with_tool_version());
    assert_eq!(report.bytes, 5000 + 10 + 2000 + 20 + 10 + 10 + 10);
    assert_eq!(report.attempts, 0);
    assert_eq!(server.paths("alice/cache"), before);
    assert_eq!(server.commits("alice/cache"), commits);
}

#[test]
fn prune_deletes_other_versions_in_one_commit() {
    isolate();
    let server = HubServer::start();
    populate(&server, "alice/cache", true);
    let commits = server.commits("alice/cache");
    let hub = HubCache::new("alice/cache", options(&server, Some(WRITE_TOKEN))).unwrap();

    // Without a tool version only other compiler versions go.
    let report = hub.prune_old_versions(&[KEEP.into()], None, false).unwrap();
    assert_eq!(
        sorted(report.deleted.clone()),
        vec![
            "neuronxcc-2.18/0_REGISTRY/0.4.5/arch0/old.json".to_string(),
            "neuronxcc-2.18/MODULE_old/model.neff".to_string(),
        ]
    );
    assert_eq!(report.attempts, 1);
    assert_eq!(server.commits("alice/cache"), commits + 1);

    // With the tool version, old registry entries and the modules only they name go too.
    let report = hub
        .prune_old_versions(&[KEEP.into()], Some("0.4.5"), false)
        .unwrap();
    let mut expected = expected_with_tool_version();
    expected.retain(|p| !p.starts_with("neuronxcc-2.18"));
    assert_eq!(sorted(report.deleted.clone()), expected);
    assert_eq!(
        server.commits("alice/cache"),
        commits + 2,
        "one commit each"
    );
    let left = server.paths("alice/cache");
    assert_eq!(
        left,
        sorted(
            [
                ".gitattributes",
                "README.md",
                "neuronxcc-2.19/0_REGISTRY/0.4.5/arch1/aaa.json",
                "neuronxcc-2.19/0_REGISTRY/0.4.5/arch1/ccc.json",
                "neuronxcc-2.19/0_REGISTRY/0.4.5/llama/org/m/aaa.json",
                "neuronxcc-2.19/MODULE_aaa/model.neff",
                "neuronxcc-2.19/MODULE_ccc/model.neff",
                "neuronxcc-2.19/MODULE_ddd/model.neff",
                "nvcc-12.1/MODULE_n/kernel.cubin",
            ]
            .map(String::from)
            .to_vec()
        )
    );

    // Nothing left to prune: no commit.
    let report = hub
        .prune_old_versions(&[KEEP.into()], Some("0.4.5"), false)
        .unwrap();
    assert!(report.deleted.is_empty());
    assert_eq!(report.attempts, 0);
    assert_eq!(server.commits("alice/cache"), commits + 2);
}

#[test]
fn refusals_leave_the_repo_untouched() {
    isolate();
    let server = HubServer::start();
    populate(&server, "alice/cache", true);
    let before = server.paths("alice/cache");

    // No token at all: refused before any request.
    let hub = HubCache::new("alice/cache", options(&server, None)).unwrap();
    let err = hub
        .prune_old_versions(&[KEEP.into()], None, false)
        .unwrap_err();
    assert!(
        matches!(err, CompileCacheError::TokenRequired { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    assert!(
        !server.log().iter().any(|l| l.contains("/commit/")),
        "no commit attempted"
    );

    // A token that cannot see the private repo: a typed not-found, nothing deleted.
    let hub = HubCache::new("alice/cache", options(&server, Some(READ_TOKEN))).unwrap();
    let err = hub
        .prune_old_versions(&[KEEP.into()], None, false)
        .unwrap_err();
    assert!(matches!(err, CompileCacheError::NotFound { .. }), "{err}");

    // A read-only token on a public repo: the Hub's 403, typed, never showing the token.
    populate(&server, "alice/public", false);
    let public_before = server.paths("alice/public");
    let hub = HubCache::new("alice/public", options(&server, Some(READ_TOKEN))).unwrap();
    let err = hub
        .prune_old_versions(&[KEEP.into()], None, false)
        .unwrap_err();
    assert!(matches!(err, CompileCacheError::Forbidden { .. }), "{err}");
    assert!(!err.to_string().contains(READ_TOKEN));
    assert_eq!(server.paths("alice/cache"), before);
    assert_eq!(server.paths("alice/public"), public_before);
}

#[test]
fn conflicts_are_retried() {
    isolate();
    let server = HubServer::start();
    populate(&server, "alice/cache", true);
    server.fault(Some("POST"), "/commit/", FaultKind::Status(409), 1);
    let hub = HubCache::new("alice/cache", options(&server, Some(WRITE_TOKEN))).unwrap();
    let report = hub.prune_old_versions(&[KEEP.into()], None, false).unwrap();
    assert_eq!(report.attempts, 2);
    assert!(
        !server
            .paths("alice/cache")
            .iter()
            .any(|p| p.starts_with("neuronxcc-2.18/"))
    );
}

#[test]
fn plan_never_touches_unkept_compilers_or_root_files() {
    let files: Vec<RemoteFile> = [
        "README.md",
        "nvcc-12.1/MODULE_x/a",
        "nvcc-12.2/MODULE_y/a",
        "neuronxcc-2.19/MODULE_z/a",
        "no_dash/MODULE_w/a",
    ]
    .iter()
    .map(|p| RemoteFile {
        path: p.to_string(),
        size: 1,
        sha256: None,
    })
    .collect();
    let plan: Vec<&str> = plan_prune(&files, &[KEEP.into()], Some("0.4.5"))
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert!(plan.is_empty(), "{plan:?}");
    let plan: Vec<&str> = plan_prune(&files, &["nvcc-12.2".into()], None)
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(plan, ["nvcc-12.1/MODULE_x/a"]);
}

#[test]
fn server_commits_with_deletions_are_atomic() {
    isolate();
    let server = HubServer::start();
    populate(&server, "alice/cache", true);
    let before = server.paths("alice/cache");
    let client = hf_hub::HFClient::builder()
        .endpoint(server.url())
        .token(WRITE_TOKEN)
        .retry_max_attempts(0)
        .build_sync()
        .unwrap();
    let repo = client.model("alice", "cache");
    // Deleting a missing file fails the whole commit: the existing one is not deleted either.
    let err = repo
        .create_commit()
        .operations(vec![
            CommitOperation::delete("README.md"),
            CommitOperation::delete("no/such/file"),
        ])
        .commit_message("bad".to_owned())
        .send()
        .unwrap_err();
    assert!(
        err.to_string().contains("404") || err.to_string().contains("not found"),
        "{err}"
    );
    assert_eq!(server.paths("alice/cache"), before);
    // Adds and deletes in one commit.
    repo.create_commit()
        .operations(vec![
            CommitOperation::delete("README.md"),
            CommitOperation::add_bytes("NEW.md", b"hi".to_vec()),
        ])
        .commit_message("ok".to_owned())
        .send()
        .unwrap();
    let after = server.paths("alice/cache");
    assert!(after.contains(&"NEW.md".to_string()) && !after.contains(&"README.md".to_string()));
}
