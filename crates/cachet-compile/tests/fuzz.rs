//! Property-based fuzzing of cachet-compile's parsers: registry entries
//! (`CacheEntry::deserialize`, optimum-neuron's JSON), the local cache manifest (through
//! `LocalCache::lookup`, `status` and `cleanup`, which read it from disk), and what a Hub repo
//! serves: tree listings (`HubCache::list_files` and `lookup` against the loopback Hub with the
//! listing body replaced), registry files (`lookup` reading fuzzed entries) and the answers of
//! the upload flow (preupload and LFS batch answers replaced, through `HubCache::upload`); and
//! what `wrap` reads back: the compiler's depfile and its dependency manifest.
//!
//! The property: a typed error (or a skipped file, where a lookup skips corrupt entries) or a
//! value whose every method works — never a panic, never more than a small multiple of the input
//! in memory, never a path outside the folder asked for.
//! Budget: `CACHET_FUZZ_CASES` (default 256) per property; `cargo xtask fuzz` runs more.

#[path = "../../../tests/fuzz_support.rs"]
mod fuzz_support;
mod support;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use cachet_compile::hub::{HubCache, HubOptions, LookupFilter};
use cachet_compile::local::{CleanupOptions, LocalCache, MANIFEST_FILE, Manifest, cleanup, status};
use cachet_compile::{CacheEntry, CacheLayout, CompileCache, EntryBuilder, WrapCommand};
use fuzz_support::{any_json, any_text, bounded, mutated_bytes, mutated_json};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::json;
use support::hub_server::{FaultKind, HubServer, READ_TOKEN};

fn layout() -> CacheLayout {
    CacheLayout::neuron("2.19.8089.0+8ab9f450")
}

fn entry() -> CacheEntry {
    EntryBuilder::new(
        "meta-llama/Llama-3.2-1B",
        json!({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "rms_norm_eps": 1e-5, "rope_scaling": {"factor": 8.0, "rope_type": "llama3"},
            "architectures": ["LlamaForCausalLM"], "eos_token_id": [1, 2]}),
    )
    .task("text-generation")
    .dtype("bfloat16")
    .batch_size(4)
    .sequence_length(128)
    .num_cores(2)
    .compiler("neuronxcc", "2.19.8089.0+8ab9f450")
    .build()
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Registry entries
// ---------------------------------------------------------------------------------------------

const ENTRY_KEYS: &[&str] = &[
    "_entry_class",
    "_model_id",
    "_task",
    "model_type",
    "compiler_type",
    "compiler_version",
    "neuron",
    "batch_size",
    "sequence_length",
    "tp_degree",
    "torch_dtype",
    "task",
];

fn valid_entry() -> serde_json::Value {
    serde_json::from_str(&entry().serialize()).unwrap()
}

/// Everything an accepted entry answers, and the paths it makes, are well formed.
fn exercise_entry(e: &CacheEntry) -> Result<(), TestCaseError> {
    let text = e.serialize();
    let again = CacheEntry::deserialize(&text, "round trip");
    prop_assert!(again.is_ok(), "{text}: {again:?}");
    prop_assert_eq!(again.unwrap().hash(), e.hash());
    let _ = (
        e.arch_digest(),
        e.model_type(),
        e.task(),
        e.compile_config(),
    );
    let _ = LookupFilter {
        batch_size: Some(4),
        dtype: Some("bfloat16".into()),
        ..Default::default()
    }
    .matches(e);
    // The layout either refuses the entry or makes paths inside the cache.
    if layout().validate(Some(e)).is_ok() {
        for path in [layout().registry_path(e), layout().alias_path(e)] {
            prop_assert!(
                Path::new(&path)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))),
                "{path}"
            );
        }
    }
    Ok(())
}

fn check_entry(text: &str) -> Result<(), TestCaseError> {
    if let Ok(e) = bounded(text.len(), || CacheEntry::deserialize(text, "fuzz.json"))? {
        exercise_entry(&e)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn entry_arbitrary(text in prop_oneof![
        any_text(),
        any_json(ENTRY_KEYS).prop_map(|v| v.to_string()),
    ]) {
        check_entry(&text)?;
    }

    #[test]
    fn entry_mutated(text in prop_oneof![
        3 => mutated_json(valid_entry(), ENTRY_KEYS),
        1 => mutated_bytes(entry().serialize().into_bytes())
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]) {
        check_entry(&text)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Local manifest
// ---------------------------------------------------------------------------------------------

const HASH: &str = "0123456789abcdef0123";
const ARTIFACT: &[u8] = b"neff bytes";

fn valid_manifest() -> serde_json::Value {
    json!({
        "version": 1,
        "hash": HASH,
        "files": [
            {"path": "model.neff", "size": ARTIFACT.len(),
             "sha256": "1b0c8b4f4b5c8e7f3a0a73b7c4c71d64f32c9c27a1f4c3f0c2f3a1d0e9b8c7a6"},
            {"path": "sub/flags.json", "size": 2, "sha256": "00"}
        ]
    })
}

const MANIFEST_KEYS: &[&str] = &[
    "version",
    "hash",
    "files",
    "path",
    "size",
    "sha256",
    "model.neff",
    "../model.neff",
    "/etc/passwd",
    "sub/../../x",
];

/// A module folder holding one artifact and `manifest` as its manifest (fresh for every case).
fn check_manifest(root: &Path, manifest: &[u8]) -> Result<(), TestCaseError> {
    let cache = LocalCache::new(root, layout());
    let dir = cache.module_dir(HASH);
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("model.neff"), ARTIFACT).unwrap();
    std::fs::write(dir.join("sub/flags.json"), b"[]").unwrap();
    std::fs::write(dir.join(MANIFEST_FILE), manifest).unwrap();
    let len = manifest.len() + 4096;
    if let Ok(Some(module)) = bounded(len, || cache.lookup(HASH))? {
        let _ = module.manifest.total_bytes();
    }
    // The same bytes through serde, as the Hub download path reads a remote manifest.
    if let Ok(m) = serde_json::from_slice::<Manifest>(manifest) {
        let _ = m.total_bytes();
    }
    let _ = bounded(len, || status(root))?;
    let options = CleanupOptions {
        old_versions: false,
        all: false,
        dry_run: true,
        keep: None,
        staging_grace: Duration::from_secs(3600),
    };
    let _ = bounded(len, || cleanup(root, &options))?;
    Ok(())
}

fn scratch(name: &str) -> std::path::PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
        .path()
        .join(name)
}

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn manifest_arbitrary(bytes in prop_oneof![
        fuzz_support::any_bytes(),
        any_text().prop_map(String::into_bytes),
        any_json(MANIFEST_KEYS).prop_map(|v| v.to_string().into_bytes()),
    ]) {
        check_manifest(&scratch("arbitrary"), &bytes)?;
    }

    #[test]
    fn manifest_mutated(text in mutated_json(valid_manifest(), MANIFEST_KEYS)) {
        check_manifest(&scratch("mutated"), text.as_bytes())?;
    }
}

// ---------------------------------------------------------------------------------------------
// What a Hub repo serves: tree listings and registry files
// ---------------------------------------------------------------------------------------------

const REPO: &str = "fuzz/cache";

fn options(server: &HubServer) -> HubOptions {
    HubOptions {
        endpoint: Some(server.url()),
        token: Some(READ_TOKEN.into()),
        // Long enough for a loopback answer on a loaded or paused machine (a 2 s limit failed
        // a round under `nice`): the server injects bodies, never stalls, so no case waits on it.
        timeout: Duration::from_secs(60),
        retries: 0,
        commit_attempts: 1,
        progress: false,
    }
}

/// A server with the entry's registry and alias files in the repo.
fn hub() -> (HubServer, HubCache) {
    let server = HubServer::start();
    server.add_repo(REPO, false);
    let e = entry();
    for path in [layout().registry_path(&e), layout().alias_path(&e)] {
        server.put_file(REPO, &path, e.serialize().into_bytes());
    }
    let hub = HubCache::new(REPO, options(&server)).unwrap();
    (server, hub)
}

/// A tree listing as the Hub writes it, valid for both the root and the registry folder.
fn valid_listing() -> serde_json::Value {
    let e = entry();
    let size = e.serialize().len();
    json!([
        {"type": "directory", "oid": "0000000000000000000000000000000000000000", "size": 0,
         "path": layout().compiler_dir()},
        {"type": "file", "oid": "1111111111111111111111111111111111111111", "size": size,
         "path": layout().registry_path(&e)},
        {"type": "file", "oid": "2222222222222222222222222222222222222222", "size": size,
         "path": layout().alias_path(&e),
         "lfs": {"oid": "ab", "sha256": "ab", "size": size, "pointerSize": 134}}
    ])
}

const LISTING_KEYS: &[&str] = &[
    "type",
    "oid",
    "size",
    "path",
    "lfs",
    "sha256",
    "pointerSize",
    "file",
    "directory",
    "../../etc/passwd",
    "/abs",
    "",
];

/// Lists and looks up with every tree listing replaced by `body`.
fn check_listing(server: &HubServer, hub: &HubCache, body: &str) -> Result<(), TestCaseError> {
    server.clear_faults();
    server.fault(
        Some("GET"),
        "/tree/",
        FaultKind::Body(body.to_owned()),
        u32::MAX,
    );
    let registry = layout().registry_dir();
    for prefix in ["", registry.as_str()] {
        if let Ok(files) = bounded(body.len(), || hub.list_files(prefix))? {
            for f in files {
                let inside = prefix.is_empty() || f.path.starts_with(&format!("{prefix}/"));
                prop_assert!(inside, "{} listed under {}", f.path, prefix);
                prop_assert!(
                    Path::new(&f.path)
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_))),
                    "{}",
                    f.path
                );
            }
        }
    }
    let arch = entry().arch_digest();
    let _ = hub.lookup(
        &layout(),
        "meta-llama/Llama-3.2-1B",
        Some(&arch),
        &LookupFilter::default(),
    );
    server.clear_faults();
    Ok(())
}

/// Lookups with the registry files replaced by `text`.
fn check_remote_entry(
    server: &HubServer,
    hub: &HubCache,
    text: &[u8],
) -> Result<(), TestCaseError> {
    let e = entry();
    for path in [layout().registry_path(&e), layout().alias_path(&e)] {
        server.put_file(REPO, &path, text.to_vec());
    }
    let found = hub.lookup(
        &layout(),
        "meta-llama/Llama-3.2-1B",
        Some(&e.arch_digest()),
        &LookupFilter::default(),
    );
    // Corrupt files are skipped; a listing that works never fails the lookup.
    prop_assert!(found.is_ok(), "{found:?}");
    for (_, found) in found.unwrap() {
        exercise_entry(&found)?;
    }
    Ok(())
}

/// Runs `test` over `strategy` with the fuzz configuration; panics with the minimal input.
fn run<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(fuzz_support::config());
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

#[test]
fn hub_listing_arbitrary() {
    let (server, hub) = hub();
    run(
        prop_oneof![
            any_text(),
            any_json(LISTING_KEYS).prop_map(|v| v.to_string())
        ],
        |body| check_listing(&server, &hub, &body),
    );
}

#[test]
fn hub_listing_mutated() {
    let (server, hub) = hub();
    run(mutated_json(valid_listing(), LISTING_KEYS), |body| {
        check_listing(&server, &hub, &body)
    });
}

#[test]
fn hub_registry_entries_mutated() {
    let (server, hub) = hub();
    run(
        prop_oneof![
            3 => mutated_json(valid_entry(), ENTRY_KEYS).prop_map(String::into_bytes),
            1 => fuzz_support::any_bytes(),
        ],
        |text| check_remote_entry(&server, &hub, &text),
    );
}

// ---------------------------------------------------------------------------------------------
// The upload flow's answers: preupload and LFS batch
// ---------------------------------------------------------------------------------------------

const UPLOAD_KEYS: &[&str] = &[
    "files",
    "path",
    "uploadMode",
    "shouldIgnore",
    "objects",
    "oid",
    "size",
    "actions",
    "upload",
    "verify",
    "href",
    "header",
    "chunk_size",
    "00001",
    "error",
    "code",
    "message",
    "transfer",
];

/// A server where every file goes to LFS, in parts of 8 bytes above that.
fn upload_hub() -> (HubServer, HubCache, tempfile::TempDir) {
    let server = HubServer::start();
    server.add_repo("alice/upload", true);
    server.set_lfs(1, Some(8));
    let mut opts = options(&server);
    opts.token = Some(support::hub_server::WRITE_TOKEN.into());
    let hub = HubCache::new("alice/upload", opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.bin"), b"0123456789abcdef0123").unwrap();
    (server, hub, dir)
}

/// `upload` with the answer of `endpoint` replaced by `body`: a typed error or a commit whose
/// file is the one uploaded.
fn check_upload(
    server: &HubServer,
    hub: &HubCache,
    dir: &Path,
    endpoint: &str,
    body: &str,
) -> Result<(), TestCaseError> {
    server.clear_faults();
    server.fault(
        Some("POST"),
        endpoint,
        FaultKind::Body(body.to_owned()),
        u32::MAX,
    );
    let file = [("m/a.bin".to_owned(), dir.join("a.bin"))];
    if bounded(body.len(), || hub.upload(&file, "fuzz"))?.is_ok() {
        let stored = server.file("alice/upload", "m/a.bin");
        prop_assert_eq!(
            stored.map(|b| b.to_vec()),
            Some(b"0123456789abcdef0123".to_vec())
        );
    }
    server.clear_faults();
    Ok(())
}

fn valid_preupload() -> serde_json::Value {
    json!({"files": [{"path": "m/a.bin", "uploadMode": "lfs", "shouldIgnore": false, "oid": null}]})
}

fn valid_batch(server: &HubServer) -> serde_json::Value {
    let oid = "9b7a4c2d2ec1b5d8a2a6d3c1e8a4f3b0c6a2f1e9d8c7b6a5f4e3d2c1b0a99887";
    let url = server.url();
    json!({"transfer": "multipart", "objects": [{"oid": oid, "size": 20, "authenticated": true,
        "actions": {"upload": {"href": format!("{url}/lfs-upload/{oid}"),
            "header": {"chunk_size": "8", "00001": format!("{url}/lfs-upload/{oid}/part/1"),
                "00002": format!("{url}/lfs-upload/{oid}/part/2"),
                "00003": format!("{url}/lfs-upload/{oid}/part/3")}},
            "verify": {"href": format!("{url}/alice/upload.git/info/lfs/objects/verify"),
                "header": {}}}}]})
}

#[test]
fn hub_upload_answers_mutated() {
    let (server, hub, dir) = upload_hub();
    run(
        prop_oneof![
            mutated_json(valid_preupload(), UPLOAD_KEYS).prop_map(|b| ("/preupload/", b)),
            mutated_json(valid_batch(&server), UPLOAD_KEYS).prop_map(|b| ("/objects/batch", b)),
            any_json(UPLOAD_KEYS).prop_map(|v| ("/objects/batch", v.to_string())),
        ],
        |(endpoint, body)| check_upload(&server, &hub, dir.path(), endpoint, &body),
    );
}

// ---------------------------------------------------------------------------------------------
// wrap: the compiler's depfile and the dependency manifest
// ---------------------------------------------------------------------------------------------

/// `wrap` of a command that writes nothing new, with its depfile holding `depfile` and its
/// dependency manifest `manifest`: a typed error or an outcome whose dependencies come from the
/// depfile.
fn check_wrap(dir: &Path, depfile: &[u8], manifest: &[u8]) -> Result<(), TestCaseError> {
    std::fs::create_dir_all(dir).unwrap();
    let out = dir.join("out.o");
    let dep = dir.join("out.d");
    std::fs::write(&out, b"object").unwrap();
    std::fs::write(&dep, depfile).unwrap();
    let cmd = WrapCommand {
        argv: vec!["true".into()],
        outputs: vec![out],
        depfile: Some(dep),
        compiler_version: Some("fuzz".into()),
        ..Default::default()
    };
    let layout = cmd.layout().unwrap();
    let root = dir.join("cache");
    let manifest_path = root
        .join(layout.compiler_dir())
        .join("wrap-deps")
        .join(format!("{}.json", cmd.entry().unwrap().hash()));
    std::fs::create_dir_all(manifest_path.parent().unwrap()).unwrap();
    std::fs::write(&manifest_path, manifest).unwrap();
    let cache = CompileCache::local_only(LocalCache::new(&root, layout));
    let len = depfile.len() + manifest.len();
    if let Ok(outcome) = bounded(len, || cmd.run(&cache))? {
        // A fresh result is keyed on what this depfile lists (a hit reports the recorded set
        // that matched, which earlier cases may have written).
        if outcome.source == cachet_compile::local::Source::Compiled {
            let text = String::from_utf8_lossy(depfile);
            for dependency in &outcome.dependencies {
                prop_assert!(dependency.len() <= text.len(), "{dependency:?}");
            }
        }
    }
    Ok(())
}

const DEPFILE_PIECES: &[&str] = &[
    "out.o",
    ":",
    " ",
    "\\\n",
    "\\ ",
    "$$",
    "#",
    "\n",
    "\r\n",
    "a.c",
    "inc/x.h",
    "\\",
    "\t",
    "C:\\x.h",
    "::",
    "/etc/passwd",
    "..",
];

proptest! {
    #![proptest_config(fuzz_support::config())]

    #[test]
    fn wrap_depfile_and_manifest(
        depfile in prop_oneof![
            fuzz_support::any_bytes(),
            prop::collection::vec(prop::sample::select(DEPFILE_PIECES), 0..40)
                .prop_map(|p| p.concat().into_bytes()),
        ],
        manifest in prop_oneof![
            fuzz_support::any_bytes(),
            mutated_json(json!({"sets": [["a.c", "inc/x.h"], []]}), &["sets"])
                .prop_map(String::into_bytes),
        ],
    ) {
        check_wrap(&scratch("wrap"), &depfile, &manifest)?;
    }
}

#[test]
fn valid_bases_parse() {
    check_entry(&entry().serialize()).unwrap();
    let (server, hub) = hub();
    let found = hub
        .lookup(
            &layout(),
            "meta-llama/Llama-3.2-1B",
            None,
            &LookupFilter::default(),
        )
        .unwrap();
    assert_eq!(found.len(), 1);
    check_listing(&server, &hub, &valid_listing().to_string()).unwrap();
    server.fault(
        Some("GET"),
        "/tree/",
        FaultKind::Body(valid_listing().to_string()),
        u32::MAX,
    );
    assert_eq!(hub.list_files("").unwrap().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Regressions: crashes the fuzzer found, kept as named cases
// ---------------------------------------------------------------------------------------------

/// `hub_upload_answers_mutated` (in `cargo xtask fuzz`): an LFS batch answer that the client
/// found malformed, with multi-byte characters around the 300th byte of its text, panicked
/// while its message was cut to 300 bytes ("assertion failed: self.is_char_boundary"); the
/// message is cut by characters now, and the upload is a typed error.
#[test]
fn regression_malformed_lfs_answer_with_multibyte_text() {
    let (server, hub, dir) = upload_hub();
    let oid = "9b7a4c2d2ec1b5d8a2a6d3c1e8a4f3b0c6a2f1e9d8c7b6a5f4e3d2c1b0a99887";
    // The fuzzer's answer: its upload action has no `href` string, and non-ASCII text follows.
    let body = json!({"objects": [{"oid": oid, "size": 20, "authenticated": true,
        "actions": {"upload": {"href": 7, "header": {"00003": "୦Aa𞣇\u{113e1}ᠠ".repeat(40)}}}}],
        "transfer": "multipart"});
    server.fault(
        Some("POST"),
        "/objects/batch",
        FaultKind::Body(body.to_string()),
        u32::MAX,
    );
    let file = [("m/a.bin".to_owned(), dir.path().join("a.bin"))];
    let err = hub.upload(&file, "malformed").unwrap_err().to_string();
    assert!(err.contains("malformed answer"), "{err}");
    check_upload(
        &server,
        &hub,
        dir.path(),
        "/objects/batch",
        &body.to_string(),
    )
    .unwrap();
}

/// `manifest_mutated`: a manifest whose sizes add up past `u64::MAX` made `total_bytes` overflow
/// ("attempt to add with overflow"); the sum saturates now.
#[test]
fn regression_manifest_sizes_past_u64_max() {
    let text = r#"{"files":[{"path":"model.neff","sha256":"00","size":18446744073709551615},
        {"path":"sub/flags.json","sha256":"00","size":2}],"hash":"0123456789abcdef0123","version":1}"#;
    let manifest: Manifest = serde_json::from_str(text).unwrap();
    assert_eq!(manifest.total_bytes(), u64::MAX);
    check_manifest(&scratch("regression"), text.as_bytes()).unwrap();
}
