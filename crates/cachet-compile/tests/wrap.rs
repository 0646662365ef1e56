//! `wrap`: any external compiler gets the cache; the key covers argv, input files and compiler.

use std::fs;
use std::path::Path;

use cachet_compile::local::{LocalCache, Source};
use cachet_compile::{CompileCache, CompileCacheError, WrapCommand};

fn setup(dir: &Path) -> (String, String) {
    let script = dir.join("compile.sh");
    fs::write(
        &script,
        "#!/bin/sh\nset -e\necho run >> \"$(dirname \"$0\")/counter\"\nmkdir -p \"$2\"\ntr a-z A-Z < \"$1\" > \"$2/out.bin\"\necho flags > \"$2/flags.txt\"\n",
    )
    .unwrap();
    let input = dir.join("model.hlo");
    fs::write(&input, "abc").unwrap();
    (script.display().to_string(), input.display().to_string())
}

fn runs(dir: &Path) -> usize {
    fs::read_to_string(dir.join("counter"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn wrapped_commands_run_once_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let (script, input) = setup(dir.path());
    let out = dir.path().join("build");
    let cmd = WrapCommand {
        argv: vec![
            "sh".into(),
            script.clone(),
            input.clone(),
            out.display().to_string(),
        ],
        outputs: vec![out.clone()],
        ..Default::default()
    };
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = CompileCache::local_only(LocalCache::new(cache_dir.path(), cmd.layout().unwrap()));
    assert!(
        cmd.layout()
            .unwrap()
            .compiler_version
            .starts_with("sha256-")
    );

    let first = cmd.run(&cache).unwrap();
    assert_eq!(
        (first.module.source, runs(dir.path())),
        (Source::Compiled, 1)
    );
    assert_eq!(fs::read_to_string(out.join("out.bin")).unwrap(), "ABC");

    // Outputs gone: a hit restores them without running the compiler.
    fs::remove_dir_all(&out).unwrap();
    let again = cmd.run(&cache).unwrap();
    assert_eq!((again.module.source, runs(dir.path())), (Source::Local, 1));
    assert_eq!(fs::read_to_string(out.join("out.bin")).unwrap(), "ABC");
    assert_eq!(again.entry.hash(), first.entry.hash());

    // A changed input file, a changed flag, a changed compiler version: each misses.
    fs::write(&input, "xyz").unwrap();
    assert_eq!(cmd.run(&cache).unwrap().module.source, Source::Compiled);
    assert_eq!(fs::read_to_string(out.join("out.bin")).unwrap(), "XYZ");
    let mut versioned = cmd.clone();
    versioned.compiler_version = Some("9.9".into());
    assert_ne!(
        versioned.entry().unwrap().hash(),
        cmd.entry().unwrap().hash()
    );
    let mut env = cmd.clone();
    env.env = vec!["CACHET_WRAP_TEST_UNSET_VAR".into()];
    assert_ne!(env.entry().unwrap().hash(), cmd.entry().unwrap().hash());
    assert_eq!(runs(dir.path()), 2);
}

#[test]
fn failures_cache_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (script, input) = setup(dir.path());
    let cache_dir = tempfile::tempdir().unwrap();
    let failing = WrapCommand {
        argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
        outputs: vec![dir.path().join("never")],
        ..Default::default()
    };
    let cache =
        CompileCache::local_only(LocalCache::new(cache_dir.path(), failing.layout().unwrap()));
    let err = failing.run(&cache).unwrap_err();
    assert!(
        matches!(err, CompileCacheError::CompileFailed { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("exit"), "{err}");
    // The command succeeds but does not write its declared output.
    let no_output = WrapCommand {
        argv: vec![
            "sh".into(),
            script,
            input,
            dir.path().join("elsewhere").display().to_string(),
        ],
        outputs: vec![dir.path().join("declared-but-missing")],
        ..Default::default()
    };
    let err = no_output.run(&cache).unwrap_err();
    assert!(err.to_string().contains("declared-but-missing"), "{err}");
    assert!(
        cachet_compile::local::status(cache_dir.path())
            .unwrap()
            .versions
            .iter()
            .all(|v| v.modules == 0)
    );
    let missing = WrapCommand {
        argv: vec!["definitely-not-a-compiler-xyz".into()],
        outputs: vec!["x".into()],
        ..Default::default()
    };
    assert!(missing.layout().is_err());
}

#[test]
fn entries_carry_hashes_of_arguments_and_environment_never_the_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.bin");
    // SAFETY: set before any thread of this test reads the environment; the name is unique.
    unsafe { std::env::set_var("CACHET_WRAP_TEST_SECRET", "env-secret-value") };
    let cmd = WrapCommand {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "true".into(),
            "--token=hf_secret_argument".into(),
        ],
        outputs: vec![out],
        env: vec!["CACHET_WRAP_TEST_SECRET".into()],
        compiler_version: Some("1".into()),
        ..Default::default()
    };
    let entry = cmd.entry().unwrap();
    let shown = entry.serialize();
    assert!(!shown.contains("hf_secret_argument"), "{shown}");
    assert!(!shown.contains("env-secret-value"), "{shown}");
    assert!(shown.contains("sha256:"), "{shown}");
    // Still a key: another value is another entry.
    let mut other = cmd.clone();
    other.argv[3] = "--token=other".into();
    assert_ne!(other.entry().unwrap().hash(), entry.hash());
}
