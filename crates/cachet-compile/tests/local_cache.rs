//! Local cache: atomic publication, checksums, the cross-process lock (with real child
//! processes), crash safety, status and cleanup.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cachet_compile::local::{self, CleanupOptions, LocalCache, MANIFEST_FILE, Source, Verify};
use cachet_compile::{CacheLayout, CompileCacheError};

const CHILD_ENV: &str = "CACHET_COMPILE_TEST_CHILD";

fn layout() -> CacheLayout {
    CacheLayout::new("testcc", "1.0")
}

/// Compiles by writing two files, and records every compile in `counter` (one line each).
fn compile_into(out: &Path, counter: &Path, delay: Duration) -> std::io::Result<()> {
    let mut c = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(counter)?;
    writeln!(c, "{}", std::process::id())?;
    std::thread::sleep(delay);
    fs::create_dir_all(out.join("sub"))?;
    fs::write(out.join("model.neff"), vec![42u8; 100_000])?;
    fs::write(out.join("sub/flags.json"), b"[\"-O1\"]")?;
    Ok(())
}

/// Not a test on its own: the body of a child process spawned by the tests below.
#[test]
fn child_process_entry_point() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let root = PathBuf::from(std::env::var("CHILD_ROOT").unwrap());
    let cache = LocalCache::new(&root, layout());
    match mode.as_str() {
        "compile" => {
            let counter = root.join("counter.txt");
            let module = cache
                .get_or_compile("abc123", |out| {
                    compile_into(out, &counter, Duration::from_millis(400))
                })
                .unwrap();
            println!(
                "CHILD-RESULT {:?} {}",
                module.source,
                module.manifest.total_bytes()
            );
        }
        "crash" => {
            // Start compiling, write half an artifact, tell the parent, then hang until killed.
            let _ = cache.get_or_compile("dead00", |out| -> std::io::Result<()> {
                fs::write(out.join("model.neff"), vec![1u8; 50_000])?;
                fs::write(root.join("started"), b"1")?;
                std::thread::sleep(Duration::from_secs(60));
                Ok(())
            });
        }
        "api" => {
            // The one-call API with the environment's defaults (CACHET_COMPILE_CACHE = root).
            let entry = cachet_compile::EntryBuilder::new(
                "org/model",
                serde_json::json!({"model_type": "llama", "hidden_size": 8}),
            )
            .compiler("testcc", "1.0")
            .batch_size(1)
            .build()
            .unwrap();
            let module = cachet_compile::with_compile_cache(&entry, |out| {
                fs::write(out.join("artifact.bin"), b"compiled")
            })
            .unwrap();
            assert!(module.dir.starts_with(&root));
            println!(
                "CHILD-RESULT {:?} {}",
                module.source,
                module.manifest.total_bytes()
            );
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn spawn_child(root: &Path, mode: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .env("CHILD_ROOT", root)
        .env(local::CACHE_DIR_ENV, root)
        .env("HF_HOME", root.join("hf-home"))
        .env("CACHET_DEFAULT_CACHE_REPO", "")
        .env_remove("CUSTOM_CACHE_REPO")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn four_processes_compile_a_missing_entry_once() {
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..4).map(|_| spawn_child(dir.path(), "compile")).collect();
    let mut sources = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let start = text
            .find("CHILD-RESULT")
            .unwrap_or_else(|| panic!("no result in {text}"));
        let line = text[start..].lines().next().unwrap().to_owned();
        assert!(line.ends_with(" 100007"), "{line}");
        sources.push(line);
    }
    let compiles = fs::read_to_string(dir.path().join("counter.txt")).unwrap();
    assert_eq!(
        compiles.lines().count(),
        1,
        "compiled more than once: {compiles}"
    );
    assert_eq!(sources.iter().filter(|s| s.contains("Compiled")).count(), 1);
    assert_eq!(sources.iter().filter(|s| s.contains("Local")).count(), 3);
}

fn child_result(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text
        .find("CHILD-RESULT")
        .unwrap_or_else(|| panic!("no result in {text}"));
    text[start..].lines().next().unwrap().to_owned()
}

#[test]
fn with_compile_cache_uses_the_environment_defaults() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        child_result(spawn_child(dir.path(), "api")),
        "CHILD-RESULT Compiled 8"
    );
    assert_eq!(
        child_result(spawn_child(dir.path(), "api")),
        "CHILD-RESULT Local 8"
    );
    let status = local::status(dir.path()).unwrap();
    assert_eq!(status.versions[0].compiler_dir, "testcc-1.0");
    assert_eq!(
        status.versions[0].registry_files, 2,
        "registry entry and alias"
    );
}

#[test]
fn threads_also_compile_once() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter.txt");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let cache = LocalCache::new(dir.path(), layout());
                cache
                    .get_or_compile("t1", |out| {
                        compile_into(out, &counter, Duration::from_millis(100))
                    })
                    .unwrap();
            });
        }
    });
    assert_eq!(fs::read_to_string(&counter).unwrap().lines().count(), 1);
}

#[test]
fn a_killed_writer_leaves_no_valid_entry_and_releases_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child(dir.path(), "crash");
    let start = Instant::now();
    while !dir.path().join("started").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "child never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();

    let cache = LocalCache::new(dir.path(), layout());
    assert!(
        cache.lookup("dead00").unwrap().is_none(),
        "half-written entry reads as valid"
    );
    let status = local::status(dir.path()).unwrap();
    assert_eq!(status.versions[0].modules, 0);
    assert_eq!(status.versions[0].staging_leftovers, 1);

    // The lock died with the process: a new compile proceeds at once.
    let counter = dir.path().join("counter.txt");
    let module = cache
        .get_or_compile("dead00", |out| compile_into(out, &counter, Duration::ZERO))
        .unwrap();
    assert_eq!(module.source, Source::Compiled);

    let report = local::cleanup(
        dir.path(),
        &CleanupOptions {
            staging_grace: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.removed.len(), 1, "{:?}", report.removed);
    assert!(cache.lookup("dead00").unwrap().is_some());
}

#[test]
fn corrupt_artifacts_are_detected_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cache = LocalCache::new(dir.path(), layout());
    let counter = dir.path().join("counter.txt");
    let module = cache
        .get_or_compile("c0ffee", |out| compile_into(out, &counter, Duration::ZERO))
        .unwrap();
    assert_eq!(module.manifest.files.len(), 2);
    assert_eq!(
        cache.lookup("c0ffee").unwrap().unwrap().source,
        Source::Local
    );

    // Same size, one byte flipped: only the checksum catches it.
    let neff = module.dir.join("model.neff");
    let mut bytes = fs::read(&neff).unwrap();
    bytes[500] ^= 1;
    fs::write(&neff, &bytes).unwrap();
    let err = cache.lookup("c0ffee").unwrap_err();
    assert!(matches!(err, CompileCacheError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("model.neff"), "{err}");
    // Size-only verification does not see it; full verification rebuilds it.
    assert!(
        cache
            .clone()
            .with_verify(Verify::Size)
            .lookup("c0ffee")
            .unwrap()
            .is_some()
    );
    let again = cache
        .get_or_compile("c0ffee", |out| compile_into(out, &counter, Duration::ZERO))
        .unwrap();
    assert_eq!(again.source, Source::Compiled);
    assert_eq!(fs::read_to_string(&counter).unwrap().lines().count(), 2);
    cache.lookup("c0ffee").unwrap().unwrap();

    // A missing manifest (e.g. a foreign folder) is not a valid entry either.
    fs::remove_file(again.dir.join(MANIFEST_FILE)).unwrap();
    assert!(cache.lookup("c0ffee").is_err());
    // A symlinked artifact is refused.
    let module = cache
        .get_or_compile("5ym", |out| compile_into(out, &counter, Duration::ZERO))
        .unwrap();
    let target = dir.path().join("elsewhere");
    fs::write(&target, vec![42u8; 100_000]).unwrap();
    fs::remove_file(module.dir.join("model.neff")).unwrap();
    std::os::unix::fs::symlink(&target, module.dir.join("model.neff")).unwrap();
    let err = cache.lookup("5ym").unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
}

#[test]
fn failed_or_empty_compiles_cache_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = LocalCache::new(dir.path(), layout());
    let err = cache
        .get_or_compile("f00", |out| -> Result<(), String> {
            fs::write(out.join("partial"), b"x").unwrap();
            Err("neuronx-cc: out of memory".into())
        })
        .unwrap_err();
    assert!(err.to_string().contains("out of memory"), "{err}");
    assert!(cache.lookup("f00").unwrap().is_none());
    let err = cache
        .get_or_compile("f00", |_| -> Result<(), String> { Ok(()) })
        .unwrap_err();
    assert!(
        matches!(err, CompileCacheError::EmptyOutput { .. }),
        "{err}"
    );
    assert!(cache.lookup("f00").unwrap().is_none());
    // Hashes are path components: anything but alphanumerics is refused.
    assert!(cache.lookup("../x").is_err());
}

#[test]
fn status_and_cleanup_of_versions() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter.txt");
    for version in ["1.0", "2.0"] {
        let cache = LocalCache::new(dir.path(), CacheLayout::new("testcc", version));
        for hash in ["a1", "b2"] {
            cache
                .get_or_compile(hash, |out| compile_into(out, &counter, Duration::ZERO))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = local::status(dir.path()).unwrap();
    assert_eq!(status.versions.len(), 2);
    assert!(status.versions.iter().all(|v| v.modules == 2));
    assert!(status.total_bytes > 400_000);

    let keep = CleanupOptions {
        old_versions: true,
        keep: Some("testcc-2.0".into()),
        dry_run: true,
        ..Default::default()
    };
    let report = local::cleanup(dir.path(), &keep).unwrap();
    assert_eq!(report.removed, vec![dir.path().join("testcc-1.0")]);
    assert!(
        dir.path().join("testcc-1.0").exists(),
        "dry run removed files"
    );
    let report = local::cleanup(
        dir.path(),
        &CleanupOptions {
            dry_run: false,
            ..keep
        },
    )
    .unwrap();
    assert!(report.bytes > 200_000);
    assert!(!dir.path().join("testcc-1.0").exists());
    let report = local::cleanup(
        dir.path(),
        &CleanupOptions {
            all: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.removed.len(), 1);
    assert!(local::status(dir.path()).unwrap().versions.is_empty());
}

#[test]
fn default_dir_honours_the_environment_variable() {
    // Only read here; other tests pass explicit roots.
    let d = local::default_cache_dir();
    match std::env::var_os(local::CACHE_DIR_ENV) {
        Some(v) if !v.is_empty() => assert_eq!(d, PathBuf::from(v)),
        _ => assert_eq!(d, PathBuf::from(local::DEFAULT_CACHE_DIR)),
    }
}

#[test]
fn a_layout_that_would_escape_the_root_is_refused_by_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    for layout in [
        CacheLayout::new("/abs", "1.0"),
        CacheLayout::new("cc", "../../escape"),
        CacheLayout::new("cc", "1").with_tool_version("../.."),
    ] {
        let cache = LocalCache::new(&root, layout.clone());
        let unsafe_path = |r: Result<_, CompileCacheError>| {
            matches!(r, Err(CompileCacheError::UnsafePath { .. }))
        };
        assert!(unsafe_path(cache.lookup("abc").map(|_| ())), "{layout:?}");
        assert!(unsafe_path(cache.lock("abc").map(|_| ())), "{layout:?}");
        assert!(unsafe_path(cache.stage("abc").map(|_| ())), "{layout:?}");
        assert!(
            unsafe_path(cache.publishable_files().map(|_| ())),
            "{layout:?}"
        );
        assert!(
            unsafe_path(cache.registry_entries().map(|_| ())),
            "{layout:?}"
        );
    }
    // Nothing was created outside (or inside) the root.
    assert!(!dir.path().join("escape").exists());
    assert!(!root.exists());
}
