//! `wrap`: any external compiler gets the cache; the key covers argv, input files, compiler and
//! the files the compiler's depfile lists (`#include`d headers).

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
    assert_eq!((first.source, runs(dir.path())), (Source::Compiled, 1));
    assert_eq!(fs::read_to_string(out.join("out.bin")).unwrap(), "ABC");

    // Outputs gone: a hit restores them without running the compiler.
    fs::remove_dir_all(&out).unwrap();
    let again = cmd.run(&cache).unwrap();
    assert_eq!((again.source, runs(dir.path())), (Source::Local, 1));
    assert_eq!(fs::read_to_string(out.join("out.bin")).unwrap(), "ABC");
    assert_eq!(again.entry.hash(), first.entry.hash());

    // A changed input file, a changed flag, a changed compiler version: each misses.
    fs::write(&input, "xyz").unwrap();
    assert_eq!(cmd.run(&cache).unwrap().source, Source::Compiled);
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

/// The C compiler installed here, if any.
fn real_c_compiler() -> Option<String> {
    ["cc", "gcc", "clang"]
        .into_iter()
        .find(|cc| {
            std::process::Command::new(cc)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_owned)
}

/// A script that does what `cc -c SRC -o OUT -MMD -MF DEP -I INC` does for these tests: it
/// follows `#include "NAME"` lines, writes the expanded text as the "object" and lists every
/// file it read in the depfile.
fn fake_c_compiler(dir: &Path) -> Vec<String> {
    let script = dir.join("fakecc.sh");
    fs::write(
        &script,
        r#"#!/bin/sh
# fakecc -c SRC -o OUT -MMD -MF DEP -I INC
set -e
src=$2; out=$4; dep=$7; inc=$9
deps="$src"
expand() {
    while IFS= read -r line; do
        case "$line" in
            '#include "'*) name=${line#'#include "'}; name=${name%'"'}
                deps="$deps $inc/$name"; expand < "$inc/$name" ;;
            *) printf '%s
' "$line" ;;
        esac
    done
}
expand < "$src" > "$out"
printf '%s: %s
' "$out" "$deps" > "$dep"
"#,
    )
    .unwrap();
    vec!["sh".into(), script.display().to_string()]
}

#[test]
fn an_edited_included_header_is_a_miss_not_a_stale_hit() {
    let dir = tempfile::tempdir().unwrap();
    header_edits_are_misses(fake_c_compiler(dir.path()), false);
    match real_c_compiler() {
        Some(cc) => header_edits_are_misses(vec![cc], true),
        None => eprintln!("no C compiler installed: checked with the depfile-writing script only"),
    }
}

fn header_edits_are_misses(cc: Vec<String>, real: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("inc")).unwrap();
    let (src, obj, dep, inc) = (
        d.join("main.c"),
        d.join("main.o"),
        d.join("main.d"),
        d.join("inc"),
    );
    fs::write(
        &src,
        "#include \"config.h\"\nint value(void) { return VALUE; }\n",
    )
    .unwrap();
    let header = inc.join("config.h");
    fs::write(&header, "#define VALUE 1\n").unwrap();
    let path = |p: &Path| p.display().to_string();
    let mut argv = cc.clone();
    argv.extend([
        "-c".into(),
        path(&src),
        "-o".into(),
        path(&obj),
        "-MMD".into(),
        "-MF".into(),
        path(&dep),
        "-I".into(),
        path(&inc),
    ]);
    let cmd = WrapCommand {
        argv,
        outputs: vec![obj.clone()],
        compiler_version: (!real).then(|| "fake-1".into()),
        ..Default::default()
    };
    assert_eq!(cmd.depfile(), Some(dep.clone()), "found from -MMD -MF");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = CompileCache::local_only(LocalCache::new(cache_dir.path(), cmd.layout().unwrap()));

    let first = cmd.run(&cache).unwrap();
    assert_eq!(first.source, Source::Compiled);
    assert!(
        first.dependencies.iter().any(|f| f.ends_with("config.h")),
        "{:?}",
        first.dependencies
    );
    let object_1 = fs::read(&obj).unwrap();
    let depfile_1 = fs::read_to_string(&dep).unwrap();

    // Outputs gone, nothing edited: a hit restores the object and the depfile.
    fs::remove_file(&obj).unwrap();
    fs::remove_file(&dep).unwrap();
    let hit = cmd.run(&cache).unwrap();
    assert_eq!(hit.source, Source::Local);
    assert_eq!(hit.entry.hash(), first.entry.hash());
    assert_eq!(fs::read(&obj).unwrap(), object_1);
    assert_eq!(fs::read_to_string(&dep).unwrap(), depfile_1);

    // The header changes, the command line does not: a miss that compiles the new header.
    fs::write(&header, "#define VALUE 2\n").unwrap();
    let edited = cmd.run(&cache).unwrap();
    assert_eq!(edited.source, Source::Compiled, "a stale hit");
    let object_2 = fs::read(&obj).unwrap();
    assert_ne!(object_2, object_1);

    // Back to the first header: the first result again, without compiling.
    fs::write(&header, "#define VALUE 1\n").unwrap();
    let back = cmd.run(&cache).unwrap();
    assert_eq!(back.source, Source::Local);
    assert_eq!(fs::read(&obj).unwrap(), object_1);

    // A header included by a header: its edits are misses too.
    let nested = inc.join("nested.h");
    fs::write(&nested, "#define BASE 10\n").unwrap();
    fs::write(&header, "#include \"nested.h\"\n#define VALUE BASE\n").unwrap();
    assert_eq!(cmd.run(&cache).unwrap().source, Source::Compiled);
    assert_eq!(cmd.run(&cache).unwrap().source, Source::Local);
    fs::write(&nested, "#define BASE 20\n").unwrap();
    let nested_edit = cmd.run(&cache).unwrap();
    assert_eq!(nested_edit.source, Source::Compiled, "a stale hit");
    assert!(
        nested_edit
            .dependencies
            .iter()
            .any(|f| f.ends_with("nested.h"))
    );
}

#[test]
fn a_depfile_the_command_does_not_write_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.o");
    let cmd = WrapCommand {
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!("echo x > {}", out.display()),
        ],
        outputs: vec![out],
        depfile: Some(dir.path().join("never.d")),
        compiler_version: Some("1".into()),
        ..Default::default()
    };
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = CompileCache::local_only(LocalCache::new(cache_dir.path(), cmd.layout().unwrap()));
    let err = cmd.run(&cache).unwrap_err().to_string();
    assert!(err.contains("never.d"), "{err}");
}
