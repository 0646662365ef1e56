//! The Hub cache through hf-hub against the loopback Hub test server: local → Hub → compile,
//! registry lookup, synchronize with conflict retries, auth, and every failure mode falling
//! back to compiling without leaving a half-populated entry.

mod support;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachet_compile::hub::{self, HubCache, HubOptions, LookupFilter};
use cachet_compile::local::{LocalCache, MANIFEST_FILE, Source};
use cachet_compile::{CacheEntry, CacheLayout, CompileCache, CompileCacheError, EntryBuilder};
use serde_json::json;
use support::hub_server::{FaultKind, HubServer, READ_TOKEN, WRITE_TOKEN};

fn options(server: &HubServer, token: &str) -> HubOptions {
    HubOptions {
        endpoint: Some(server.url()),
        token: Some(token.into()),
        timeout: Duration::from_secs(1),
        retries: 0,
        commit_attempts: 4,
        progress: false,
    }
}

fn layout() -> CacheLayout {
    CacheLayout::neuron("2.19.8089.0+8ab9f450")
}

fn entry(model_id: &str, batch: u64) -> CacheEntry {
    EntryBuilder::new(
        model_id,
        json!({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "rms_norm_eps": 1e-5}),
    )
    .task("text-generation")
    .dtype("bfloat16")
    .batch_size(batch)
    .sequence_length(128)
    .num_cores(2)
    .compiler("neuronxcc", "2.19.8089.0+8ab9f450")
    .build()
    .unwrap()
}

struct Compiler {
    calls: AtomicUsize,
    size: usize,
}

impl Compiler {
    fn new(size: usize) -> Self {
        Self {
            calls: AtomicUsize::new(0),
            size,
        }
    }
    fn compile(&self, out: &Path) -> std::io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        fs::write(out.join("model.neff"), pattern(self.size))?;
        fs::write(
            out.join("compile_flags.json"),
            b"[\"--model-type=transformer\"]",
        )?;
        Ok(())
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 % 251) as u8).collect()
}

fn machine(
    server: &HubServer,
    repo: &str,
    token: &str,
    push: bool,
) -> (tempfile::TempDir, CompileCache) {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalCache::new(dir.path(), layout());
    let hub = HubCache::new(repo, options(server, token)).unwrap();
    (dir, CompileCache::with_hub(local, hub, push))
}

#[test]
fn local_then_hub_then_compile() {
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    let compiler = Compiler::new(300_000);
    let e = entry("meta-llama/Llama-3.2-1B", 4);

    let (_a_dir, a) = machine(&server, "alice/cache", WRITE_TOKEN, true);
    let m = a.get_or_compile(&e, |out| compiler.compile(out)).unwrap();
    assert_eq!((m.source, compiler.calls()), (Source::Compiled, 1));
    let module_dir = layout().module_dir(&e.hash());
    let paths = server.paths("alice/cache");
    for p in [
        format!("{module_dir}/model.neff"),
        format!("{module_dir}/{MANIFEST_FILE}"),
        layout().registry_path(&e),
        layout().alias_path(&e),
    ] {
        assert!(paths.contains(&p), "{p} not pushed: {paths:?}");
    }
    // The registry file is optimum-neuron's serialisation.
    let text = server
        .file("alice/cache", &layout().registry_path(&e))
        .unwrap();
    assert_eq!(String::from_utf8(text.to_vec()).unwrap(), e.serialize());

    // A second machine downloads instead of compiling; then hits locally.
    let (b_dir, b) = machine(&server, "alice/cache", WRITE_TOKEN, true);
    let m = b.get_or_compile(&e, |out| compiler.compile(out)).unwrap();
    assert_eq!((m.source, compiler.calls()), (Source::Hub, 1));
    assert_eq!(
        fs::read(m.dir.join("model.neff")).unwrap(),
        pattern(300_000)
    );
    assert!(b_dir.path().join(layout().registry_path(&e)).is_file());
    let m = b.get_or_compile(&e, |out| compiler.compile(out)).unwrap();
    assert_eq!(m.source, Source::Local);

    // A different configuration misses everywhere and compiles.
    let m = b
        .get_or_compile(&entry("meta-llama/Llama-3.2-1B", 1), |out| {
            compiler.compile(out)
        })
        .unwrap();
    assert_eq!((m.source, compiler.calls()), (Source::Compiled, 2));
}

#[test]
fn lookup_searches_the_registry_with_filters() {
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    let compiler = Compiler::new(1000);
    let (_d, a) = machine(&server, "alice/cache", WRITE_TOKEN, true);
    for batch in [1, 4] {
        a.get_or_compile(&entry("meta-llama/Llama-3.2-1B", batch), |o| {
            compiler.compile(o)
        })
        .unwrap();
    }
    a.get_or_compile(&entry("other/model", 1), |o| compiler.compile(o))
        .unwrap();
    // A corrupt registry file is skipped, not fatal.
    let reg = layout().registry_dir();
    server.put_file(
        "alice/cache",
        &format!("{reg}/llama/meta-llama/Llama-3.2-1B/bad.json"),
        b"{oops".to_vec(),
    );

    let hub = a.hub().unwrap();
    let all = hub
        .lookup(
            &layout(),
            "meta-llama/Llama-3.2-1B",
            None,
            &LookupFilter::default(),
        )
        .unwrap();
    assert_eq!(all.len(), 2);
    let b4 = LookupFilter {
        batch_size: Some(4),
        dtype: Some("torch.bfloat16".into()),
        task: Some("text-generation".into()),
        ..Default::default()
    };
    let found = hub
        .lookup(&layout(), "meta-llama/Llama-3.2-1B", None, &b4)
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].1.hash(),
        entry("meta-llama/Llama-3.2-1B", 4).hash()
    );
    // By architecture: every model with this config, including other/model.
    let arch = entry("x/y", 1).arch_digest();
    let same_arch = hub
        .lookup(
            &layout(),
            "nobody/none",
            Some(&arch),
            &LookupFilter::default(),
        )
        .unwrap();
    assert_eq!(same_arch.len(), 3);
    // Like optimum-neuron, a registry for a longer compiler version string is found by prefix.
    let short = CacheLayout::neuron("2.19.8089.0");
    assert_eq!(
        hub.lookup(
            &short,
            "meta-llama/Llama-3.2-1B",
            None,
            &LookupFilter::default()
        )
        .unwrap()
        .len(),
        2
    );
    let none = hub
        .lookup(
            &CacheLayout::neuron("3.0"),
            "meta-llama/Llama-3.2-1B",
            None,
            &LookupFilter::default(),
        )
        .unwrap();
    assert!(none.is_empty());
}

#[test]
fn synchronize_uploads_missing_files_and_retries_conflicts() {
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    let compiler = Compiler::new(5000);
    let (dir, local_only) = {
        let dir = tempfile::tempdir().unwrap();
        let c = CompileCache::local_only(LocalCache::new(dir.path(), layout()));
        (dir, c)
    };
    for batch in [1, 2] {
        let e = entry("meta-llama/Llama-3.2-1B", batch);
        local_only
            .get_or_compile(&e, |o| compiler.compile(o))
            .unwrap();
    }
    let hub = HubCache::new("alice/cache", options(&server, WRITE_TOKEN)).unwrap();
    server.fault(Some("POST"), "/commit/", FaultKind::Status(409), 2);
    let report = hub.synchronize(local_only.local()).unwrap();
    assert_eq!(report.attempts, 3, "two conflicts then success");
    // 2 modules × (2 artifacts + manifest) + 2 × (registry + alias)
    assert_eq!(report.uploaded.len(), 10, "{:?}", report.uploaded);
    let again = hub.synchronize(local_only.local()).unwrap();
    assert!(again.uploaded.is_empty());
    assert_eq!(again.already_present, 10);

    // Conflicts that never end give a typed error.
    let e = entry("meta-llama/Llama-3.2-1B", 3);
    local_only
        .get_or_compile(&e, |o| compiler.compile(o))
        .unwrap();
    server.fault(Some("POST"), "/commit/", FaultKind::Status(409), u32::MAX);
    let err = hub.synchronize(local_only.local()).unwrap_err();
    assert!(
        matches!(err, CompileCacheError::Conflict { attempts: 4, .. }),
        "{err}"
    );
    drop(dir);
}

#[test]
fn auth_errors_are_typed_and_never_show_the_token() {
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    server.add_repo("alice/public-cache", false);
    let bad = "hf_this_token_is_wrong";
    let hub = HubCache::new("alice/cache", options(&server, bad)).unwrap();
    let err = hub.info().unwrap_err();
    assert!(
        matches!(err, CompileCacheError::Unauthorized { .. }),
        "{err}"
    );
    assert!(!format!("{err} {err:?} {hub:?}").contains(bad));

    // bob (read-only token) reads the public repo but may not write to it.
    let hub = HubCache::new("alice/public-cache", options(&server, READ_TOKEN)).unwrap();
    assert!(!hub.info().unwrap().private);
    let f = tempfile::NamedTempFile::new().unwrap();
    let err = hub
        .upload(&[("x/y.bin".into(), f.path().to_owned())], "m")
        .unwrap_err();
    assert!(matches!(err, CompileCacheError::Forbidden { .. }), "{err}");
    assert!(!format!("{err} {err:?}").contains(READ_TOKEN));
    // bob cannot see alice's private repo.
    let hub = HubCache::new("alice/cache", options(&server, READ_TOKEN)).unwrap();
    assert!(matches!(
        hub.info().unwrap_err(),
        CompileCacheError::NotFound { .. }
    ));
    let hub = HubCache::new("alice/missing", options(&server, WRITE_TOKEN)).unwrap();
    assert!(matches!(
        hub.info().unwrap_err(),
        CompileCacheError::NotFound { .. }
    ));
    // The token went out as a bearer header and nowhere else.
    let state = server.state.lock().unwrap();
    assert!(
        state
            .auth_seen
            .iter()
            .any(|a| a == &format!("Bearer {WRITE_TOKEN}"))
    );
    assert!(state.log.iter().all(|l| !l.contains("hf_")));
}

/// Publishes one module with the reference machine, then breaks the Hub in one way and checks
/// that a fresh machine compiles instead, leaves no partial entry, and recovers once fixed.
fn fallback_case(name: &str, break_it: impl FnOnce(&HubServer, &CacheEntry)) {
    fallback_case_expecting(name, Source::Compiled, break_it)
}

fn fallback_case_expecting(
    name: &str,
    expected: Source,
    break_it: impl FnOnce(&HubServer, &CacheEntry),
) {
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    let compiler = Compiler::new(200_000);
    let e = entry("meta-llama/Llama-3.2-1B", 4);
    let (_a_dir, a) = machine(&server, "alice/cache", WRITE_TOKEN, true);
    a.get_or_compile(&e, |o| compiler.compile(o)).unwrap();
    break_it(&server, &e);
    let (b_dir, b) = machine(&server, "alice/cache", WRITE_TOKEN, false);
    let start = Instant::now();
    let m = b.get_or_compile(&e, |o| compiler.compile(o)).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{name}: took {:?}",
        start.elapsed()
    );
    assert_eq!(m.source, expected, "{name}");
    let calls = if expected == Source::Compiled { 2 } else { 1 };
    assert_eq!(compiler.calls(), calls, "{name}");
    assert_eq!(
        fs::read(m.dir.join("model.neff")).unwrap(),
        pattern(200_000),
        "{name}"
    );
    let staging = b_dir.path().join(layout().compiler_dir()).join(".staging");
    let leftovers: Vec<_> = fs::read_dir(&staging)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "{name}: staging leftovers {leftovers:?}"
    );
}

#[test]
fn hub_failures_fall_back_to_compiling() {
    let neff = |e: &CacheEntry| format!("MODULE_{}/model.neff", e.hash());
    // Control: unbroken, the same setup downloads from the Hub.
    fallback_case_expecting("control", Source::Hub, |_, _| {});
    fallback_case("401", |s, _| {
        s.fault(None, "/tree/", FaultKind::Status(401), u32::MAX)
    });
    fallback_case("403", |s, _| {
        s.fault(None, "/tree/", FaultKind::Status(403), u32::MAX)
    });
    fallback_case("404 on download", |s, e| {
        s.fault(None, &neff(e), FaultKind::Status(404), u32::MAX)
    });
    fallback_case("500", |s, e| {
        s.fault(None, &neff(e), FaultKind::Status(500), u32::MAX)
    });
    fallback_case("dropped connection", |s, e| {
        s.fault(
            Some("GET"),
            &neff(e),
            FaultKind::DropAfter(50_000),
            u32::MAX,
        )
    });
    fallback_case("timeout", |s, e| {
        s.fault(
            Some("GET"),
            &neff(e),
            FaultKind::Stall(Duration::from_secs(3)),
            u32::MAX,
        )
    });
    fallback_case("corrupt listing", |s, _| {
        s.fault(
            None,
            "/tree/",
            FaultKind::Body("[{\"type\": \"file\", \"path\"".into()),
            u32::MAX,
        )
    });
    fallback_case("tampered artifact", |s, e| {
        let path = format!("{}/model.neff", layout().module_dir(&e.hash()));
        let mut bytes = s.file("alice/cache", &path).unwrap().to_vec();
        bytes[10] ^= 0xff;
        s.put_file("alice/cache", &path, bytes);
    });
    fallback_case("missing artifact", |s, e| {
        let dir = layout().module_dir(&e.hash());
        let manifest = s
            .file("alice/cache", &format!("{dir}/{MANIFEST_FILE}"))
            .unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        m["files"]
            .as_array_mut()
            .unwrap()
            .push(json!({"path": "gone.bin", "size": 3, "sha256": "00"}));
        s.put_file(
            "alice/cache",
            &format!("{dir}/{MANIFEST_FILE}"),
            serde_json::to_vec(&m).unwrap(),
        );
    });
    fallback_case("corrupt manifest", |s, e| {
        let dir = layout().module_dir(&e.hash());
        s.put_file(
            "alice/cache",
            &format!("{dir}/{MANIFEST_FILE}"),
            b"{\"version\": 1, \"hash\"".to_vec(),
        );
    });
    fallback_case("path escape in listing", |s, e| {
        let dir = layout().module_dir(&e.hash());
        s.put_file(
            "alice/cache",
            &format!("{dir}/../../escape.bin"),
            vec![1, 2, 3],
        );
    });
    fallback_case("path escape in manifest", |s, e| {
        let dir = layout().module_dir(&e.hash());
        let manifest = s
            .file("alice/cache", &format!("{dir}/{MANIFEST_FILE}"))
            .unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        m["files"][0]["path"] = json!("../../../etc/passwd");
        s.put_file(
            "alice/cache",
            &format!("{dir}/{MANIFEST_FILE}"),
            serde_json::to_vec(&m).unwrap(),
        );
    });
}

#[test]
fn foreign_modules_without_manifest_are_verified_by_listing() {
    // An optimum-neuron repo: MODULE folders with no cachet manifest, LFS sums in the listing.
    let server = HubServer::start();
    server.add_repo("aws-neuron/optimum-neuron-cache", false);
    let e = entry("meta-llama/Llama-3.2-1B", 4);
    let dir = layout().module_dir(&e.hash());
    let big = pattern(11 << 20); // above the LFS threshold: listed with a sha256
    server.put_file(
        "aws-neuron/optimum-neuron-cache",
        &format!("{dir}/model.neff"),
        big.clone(),
    );
    server.put_file(
        "aws-neuron/optimum-neuron-cache",
        &format!("{dir}/model.done"),
        Vec::new(),
    );
    let compiler = Compiler::new(10);
    let (_d, c) = machine(
        &server,
        "aws-neuron/optimum-neuron-cache",
        READ_TOKEN,
        false,
    );
    let m = c.get_or_compile(&e, |o| compiler.compile(o)).unwrap();
    assert_eq!((m.source, compiler.calls()), (Source::Hub, 0));
    assert_eq!(fs::read(m.dir.join("model.neff")).unwrap(), big);
    assert!(m.dir.join("model.done").is_file());
}

#[test]
fn private_models_are_not_pushed_to_public_repos() {
    let server = HubServer::start();
    server.add_repo("alice/public-cache", false);
    server.add_repo("alice/secret-model", true);
    server.add_repo("meta-llama/Llama-3.2-1B", false);
    let compiler = Compiler::new(100);
    let (_d, c) = machine(&server, "alice/public-cache", WRITE_TOKEN, true);
    // alice can see her private model, but the cache repo is public: refused.
    c.get_or_compile(&entry("alice/secret-model", 1), |o| compiler.compile(o))
        .unwrap();
    assert!(
        server.paths("alice/public-cache").is_empty(),
        "{:?}",
        server.paths("alice/public-cache")
    );
    let hub = c.hub().unwrap();
    let err = hub
        .push_module(
            c.local(),
            &c.local()
                .lookup(&entry("alice/secret-model", 1).hash())
                .unwrap()
                .unwrap(),
            Some(&entry("alice/secret-model", 1)),
        )
        .unwrap_err();
    assert!(
        matches!(err, CompileCacheError::PrivateToPublic { .. }),
        "{err}"
    );
    // A public model is pushed; synchronize skips the private one.
    c.get_or_compile(&entry("meta-llama/Llama-3.2-1B", 1), |o| {
        compiler.compile(o)
    })
    .unwrap();
    let report = hub.synchronize(c.local()).unwrap();
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert!(report.uploaded.is_empty(), "{report:?}");
    assert!(
        server
            .paths("alice/public-cache")
            .iter()
            .all(|p| !p.contains(&entry("alice/secret-model", 1).hash()))
    );
}

#[test]
fn create_makes_private_repos_under_the_user() {
    let server = HubServer::start();
    let opts = options(&server, WRITE_TOKEN);
    assert_eq!(
        hub::create_repo(&opts, None, false).unwrap(),
        "alice/cachet-compile-cache"
    );
    assert!(server.state.lock().unwrap().repos["alice/cachet-compile-cache"].private);
    assert_eq!(
        hub::create_repo(&opts, Some("alice/open"), true).unwrap(),
        "alice/open"
    );
    assert!(!server.state.lock().unwrap().repos["alice/open"].private);
    // Existing repos are fine (exist_ok), other namespaces are forbidden, bad ids rejected.
    assert_eq!(
        hub::create_repo(&opts, None, false).unwrap(),
        "alice/cachet-compile-cache"
    );
    let err = hub::create_repo(&opts, Some("aws-neuron/x"), false).unwrap_err();
    assert!(matches!(err, CompileCacheError::Forbidden { .. }), "{err}");
    assert!(hub::create_repo(&opts, Some("a/../b"), false).is_err());
}

#[test]
fn large_artifacts_round_trip() {
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    let size = 100 << 20;
    let compiler = Compiler::new(size);
    let e = entry("meta-llama/Llama-3.2-1B", 4);
    let mut opts = options(&server, WRITE_TOKEN);
    opts.progress = true;
    opts.timeout = Duration::from_secs(30);
    let a_dir = tempfile::tempdir().unwrap();
    let a = CompileCache::with_hub(
        LocalCache::new(a_dir.path(), layout()),
        HubCache::new("alice/cache", opts.clone()).unwrap(),
        true,
    );
    a.get_or_compile(&e, |o| compiler.compile(o)).unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let b = CompileCache::with_hub(
        LocalCache::new(b_dir.path(), layout()),
        HubCache::new("alice/cache", opts).unwrap(),
        false,
    );
    let m = b.get_or_compile(&e, |o| compiler.compile(o)).unwrap();
    assert_eq!((m.source, compiler.calls()), (Source::Hub, 1));
    let got = fs::read(m.dir.join("model.neff")).unwrap();
    assert_eq!(got.len(), size);
    assert!(got == pattern(size));
    // The artifact went through the LFS upload flow: preupload, batch, PUT, verify, and a
    // commit naming it by SHA-256; the small files went inline.
    let neff = format!("{}/model.neff", layout().module_dir(&e.hash()));
    assert!(server.is_lfs("alice/cache", &neff));
    let flags = format!("{}/compile_flags.json", layout().module_dir(&e.hash()));
    assert!(!server.is_lfs("alice/cache", &flags));
    let log = server.log();
    let position = |prefix: &str| {
        log.iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {log:?}"))
    };
    let steps = [
        position("POST /api/models/alice/cache/preupload/"),
        position("POST /alice/cache.git/info/lfs/objects/batch"),
        position("PUT /lfs-upload/"),
        position("POST /alice/cache.git/info/lfs/objects/verify"),
        position("POST /api/models/alice/cache/commit/"),
    ];
    assert!(steps.is_sorted(), "{log:?}");
    let sha = server.state.lock().unwrap().repos["alice/cache"].files[&neff]
        .sha256
        .clone();
    assert_eq!(server.state.lock().unwrap().lfs_verified, vec![sha]);
}

#[test]
fn lfs_uploads_in_parts_skip_stored_objects_and_commit_nothing_on_failure() {
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    // LFS from 64 KiB, parts of 100 KiB: a 250 KiB artifact goes up in 3 parts.
    server.set_lfs(64 << 10, Some(100 << 10));
    let hub = HubCache::new("alice/cache", options(&server, WRITE_TOKEN)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("model.neff");
    fs::write(&big, pattern(250 << 10)).unwrap();
    let small = dir.path().join("flags.json");
    fs::write(&small, "[]").unwrap();
    let files = |prefix: &str| {
        vec![
            (format!("{prefix}/model.neff"), big.clone()),
            (format!("{prefix}/flags.json"), small.clone()),
        ]
    };
    hub.upload(&files("a"), "first").unwrap();
    assert!(server.is_lfs("alice/cache", "a/model.neff"));
    assert!(!server.is_lfs("alice/cache", "a/flags.json"));
    assert_eq!(
        *server.file("alice/cache", "a/model.neff").unwrap(),
        pattern(250 << 10)
    );
    let parts = |log: &[String]| log.iter().filter(|l| l.contains("/part/")).count();
    assert_eq!(parts(&server.log()), 3);
    // The same content again: the batch answers without actions, nothing is sent.
    let before = server.log().len();
    hub.upload(&files("b"), "same bytes").unwrap();
    let log = server.log()[before..].to_vec();
    assert!(log.iter().all(|l| !l.starts_with("PUT")), "{log:?}");
    assert_eq!(
        *server.file("alice/cache", "b/model.neff").unwrap(),
        pattern(250 << 10)
    );
    // An upload that fails leaves the repo as it was: no commit names a missing object.
    fs::write(&big, pattern(300 << 10)).unwrap();
    server.fault(
        Some("PUT"),
        "/lfs-upload/",
        FaultKind::Status(403),
        u32::MAX,
    );
    let commits = server.commits("alice/cache");
    let err = hub.upload(&files("c"), "fails").unwrap_err();
    assert!(matches!(err, CompileCacheError::Forbidden { .. }), "{err}");
    assert_eq!(server.commits("alice/cache"), commits);
    assert!(
        !server
            .paths("alice/cache")
            .iter()
            .any(|p| p.starts_with("c/"))
    );
}

#[test]
fn synchronize_replaces_same_size_files_with_other_bytes() {
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    let dir = tempfile::tempdir().unwrap();
    let local = CompileCache::local_only(LocalCache::new(dir.path(), layout()));
    // One module below the LFS threshold (compared by git blob id), one above (by SHA-256).
    let small = entry("meta-llama/Llama-3.2-1B", 1);
    let big = entry("meta-llama/Llama-3.2-1B", 2);
    local
        .get_or_compile(&small, |o| Compiler::new(5000).compile(o))
        .unwrap();
    local
        .get_or_compile(&big, |o| Compiler::new(11 << 20).compile(o))
        .unwrap();
    let hub = HubCache::new("alice/cache", options(&server, WRITE_TOKEN)).unwrap();
    let first = hub.synchronize(local.local()).unwrap();
    assert_eq!(first.uploaded.len(), 10, "{:?}", first.uploaded);
    // Someone else's bytes of the same sizes land on the Hub.
    let changed = [
        format!("{}/model.neff", layout().module_dir(&small.hash())),
        format!("{}/model.neff", layout().module_dir(&big.hash())),
        layout().registry_path(&small),
    ];
    for path in &changed {
        let mut bytes = server.file("alice/cache", path).unwrap().to_vec();
        bytes[0] ^= 0xff;
        server.put_file("alice/cache", path, bytes);
    }
    let report = hub.synchronize(local.local()).unwrap();
    let mut uploaded = report.uploaded.clone();
    uploaded.sort();
    let mut want = changed.to_vec();
    want.sort();
    assert_eq!(
        uploaded, want,
        "same-size files with other bytes must be uploaded"
    );
    assert_eq!(report.already_present, 7);
    for path in &changed {
        assert_eq!(
            server.file("alice/cache", path).unwrap().to_vec(),
            fs::read(dir.path().join(path)).unwrap(),
            "{path}"
        );
    }
    let again = hub.synchronize(local.local()).unwrap();
    assert!(again.uploaded.is_empty(), "{:?}", again.uploaded);
    assert_eq!(again.already_present, 10);
}

#[test]
fn remote_text_is_read_up_to_a_limit() {
    const LIMIT: u64 = 16 << 20;
    assert_eq!(hub::MAX_TEXT_BYTES, LIMIT);
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    server.put_file(
        "alice/cache",
        "registry/big.json",
        vec![b' '; LIMIT as usize + 1],
    );
    server.put_file(
        "alice/cache",
        "registry/limit.json",
        vec![b' '; LIMIT as usize],
    );
    server.put_file("alice/cache", "registry/ok.json", b"{}".to_vec());
    server.put_file("alice/cache", "registry/empty.json", Vec::new());
    let hub = HubCache::new("alice/cache", options(&server, WRITE_TOKEN)).unwrap();
    match hub.read_text("registry/big.json") {
        Err(CompileCacheError::TooLarge { what, size, limit }) => {
            assert!(what.contains("registry/big.json"), "{what}");
            assert_eq!((size, limit), (LIMIT + 1, LIMIT));
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(text) => panic!("read {} bytes over the limit", text.len()),
    }
    let shown = hub.read_text("registry/big.json").unwrap_err().to_string();
    assert!(
        shown.contains("registry/big.json") && shown.contains(&(LIMIT + 1).to_string()),
        "{shown}"
    );
    // Only the first bytes were asked for: the file never had to fit in memory.
    let ranges = server.state.lock().unwrap().ranges_seen.clone();
    assert!(
        ranges.contains(&format!("registry/big.json bytes=0-{LIMIT}")),
        "{ranges:?}"
    );
    assert_eq!(
        hub.read_text("registry/limit.json").unwrap().len() as u64,
        LIMIT
    );
    assert_eq!(hub.read_text("registry/ok.json").unwrap(), "{}");
    // No byte 0 to start a range at: the Hub answers 416, which is an empty file.
    assert_eq!(hub.read_text("registry/empty.json").unwrap(), "");
}

#[test]
fn module_downloads_refuse_advertised_sizes_over_the_limit() {
    let server = HubServer::start();
    server.add_repo("alice/cache", true);
    let e = entry("meta-llama/Llama-3.2-1B", 4);
    let module = layout().module_dir(&e.hash());
    let hub = HubCache::new("alice/cache", options(&server, WRITE_TOKEN)).unwrap();
    let staging = tempfile::tempdir().unwrap();
    // A listing that promises a 2 TiB artifact, or a 1 GiB manifest, or many files over the
    // module limit together.
    let huge = |file: &str, size: u64| json!({"type": "file", "oid": "0".repeat(40), "size": size, "path": format!("{module}/{file}")});
    let half = hub::MAX_MODULE_BYTES / 2 + 1;
    for (listing, named, size, limit) in [
        (
            json!([huge("model.neff", 2 << 40)]),
            "model.neff",
            2u64 << 40,
            hub::MAX_MODULE_BYTES,
        ),
        (
            json!([huge(MANIFEST_FILE, 1 << 30)]),
            MANIFEST_FILE,
            1 << 30,
            hub::MAX_TEXT_BYTES,
        ),
        (
            json!([huge("a.neff", half), huge("b.neff", half)]),
            "MODULE_",
            2 * half,
            hub::MAX_MODULE_BYTES,
        ),
    ] {
        server.clear_faults();
        server.fault(
            Some("GET"),
            "/tree/",
            FaultKind::Body(listing.to_string()),
            u32::MAX,
        );
        let before = server.log().len();
        match hub.fetch_module(&layout(), &e.hash(), staging.path()) {
            Err(CompileCacheError::TooLarge {
                what,
                size: got,
                limit: got_limit,
            }) => {
                assert!(what.contains(named), "{what}");
                assert_eq!((got, got_limit), (size, limit), "{named}");
            }
            other => panic!("{named}: {other:?}"),
        }
        let downloads: Vec<String> = server.log()[before..]
            .iter()
            .filter(|l| l.contains("/resolve/"))
            .cloned()
            .collect();
        assert!(downloads.is_empty(), "{named}: downloaded {downloads:?}");
    }
}
