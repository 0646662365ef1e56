//! `save_pretrained` killed at every step: the target directory is always the complete old
//! checkpoint or the complete new one, and files a user put there survive.
//!
//! The child is this test binary run again (`child_process_entry_point`); the test-only
//! variable `CACHET_QUANT_TEST_CRASH_AFTER=N` (read in debug builds only) makes its save call
//! `std::process::abort()` at its N-th step, so no destructor or cleanup runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use burn::tensor::{Int, Tensor, TensorData};
use cachet_models::Llama;
use cachet_quant::{
    BnbQuantizationConfig, LoadOptions, QuantizedModel, SaveOptions, load_and_quantize_model,
    load_pretrained,
};
use cachet_tensor::{DeviceSpec, Precision};

const CHILD_ENV: &str = "CACHET_QUANT_TEST_SAVE_CHILD";
const CRASH_ENV: &str = "CACHET_QUANT_TEST_CRASH_AFTER";
const NO_EXCHANGE_ENV: &str = "CACHET_QUANT_TEST_NO_EXCHANGE";

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama")
}

fn quantize(config: &BnbQuantizationConfig) -> QuantizedModel<Llama> {
    let device = DeviceSpec::Cpu.init().unwrap();
    let options = LoadOptions {
        torch_dtype: Some(Precision::F32),
        ..LoadOptions::default()
    };
    load_and_quantize_model::<Llama>(source(), config, &options, &device).unwrap()
}

/// The checkpoint the child writes: LLM.int8 in 40 kB shards (an index and several files),
/// over an NF4 single-file one, so the two differ in every file name and byte.
fn new_model() -> QuantizedModel<Llama> {
    quantize(&BnbQuantizationConfig::int8())
}

fn new_options() -> SaveOptions {
    SaveOptions {
        max_shard_size: 40_000,
    }
}

/// Not a test on its own: the body of the child process of the tests below.
#[test]
fn child_process_entry_point() {
    let Ok(target) = std::env::var(CHILD_ENV) else {
        return;
    };
    new_model()
        .save_pretrained_with(&target, &new_options())
        .unwrap();
    println!("CHILD-SAVED");
}

/// Every file under `dir` (relative path → bytes); `None` when `dir` does not exist.
fn snapshot(dir: &Path) -> Option<BTreeMap<String, Vec<u8>>> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = format!("{rel}{}", entry.file_name().to_string_lossy());
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), &format!("{name}/"), out);
            } else {
                out.insert(name, std::fs::read(entry.path()).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    dir.is_dir().then(|| {
        walk(dir, "", &mut out);
        out
    })
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn logits(model: &Llama) -> Vec<f32> {
    let device = model.device();
    let ids = [5i64, 17, 99, 3, 200, 41];
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device);
    model
        .forward(input, None, None)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap()
}

fn describe(state: &BTreeMap<String, Vec<u8>>) -> Vec<(&String, usize)> {
    state.iter().map(|(k, v)| (k, v.len())).collect()
}

#[test]
fn a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: the crash hook exists in debug builds only");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The old checkpoint: NF4 in one file, plus files of the user's own.
    let pristine = tmp.path().join("pristine");
    quantize(&BnbQuantizationConfig::nf4(Precision::F32))
        .save_pretrained(&pristine)
        .unwrap();
    std::fs::write(pristine.join("README.md"), b"# my notes\n").unwrap();
    std::fs::create_dir(pristine.join("extra")).unwrap();
    std::fs::write(pristine.join("extra/tokenizer.json"), b"{}").unwrap();
    let old = snapshot(&pristine).unwrap();
    // The new one: the same save, completed in this process, over a copy of the old.
    let expected = tmp.path().join("expected");
    copy_tree(&pristine, &expected);
    let new_model = new_model();
    new_model
        .save_pretrained_with(&expected, &new_options())
        .unwrap();
    let new = snapshot(&expected).unwrap();
    assert_eq!(new["README.md"], b"# my notes\n", "a user's file is lost");
    assert_eq!(
        new["extra/tokenizer.json"], b"{}",
        "a user's folder is lost"
    );
    assert!(
        new.contains_key("model.safetensors.index.json") && !new.contains_key("model.safetensors")
    );
    assert_ne!(old["config.json"], new["config.json"]);

    let target = tmp.path().join("out");
    for exchange in [true, false] {
        let mut seen = (0, 0);
        for step in 1.. {
            assert!(step < 200, "the save never completed");
            if target.exists() {
                std::fs::remove_dir_all(&target).unwrap();
            }
            copy_tree(&pristine, &target);
            let mut child = Command::new(std::env::current_exe().unwrap());
            child
                .args([
                    "--exact",
                    "child_process_entry_point",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, &target)
                .env(CRASH_ENV, step.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            if !exchange {
                child.env(NO_EXCHANGE_ENV, "1");
            }
            let out = child.output().unwrap();
            let finished = String::from_utf8_lossy(&out.stdout).contains("CHILD-SAVED");
            if finished {
                assert!(out.status.success());
                assert!(step > 1, "the crash hook never fired");
                assert!(
                    snapshot(&target).unwrap() == new,
                    "a completed save is not the new checkpoint"
                );
                break;
            }
            assert!(
                !out.status.success(),
                "step {step}: the child neither saved nor died"
            );
            let raw = snapshot(&target);
            if exchange {
                // Swapped by one atomic exchange: never a moment without a whole checkpoint.
                assert!(
                    raw.as_ref() == Some(&old) || raw.as_ref() == Some(&new),
                    "killed at step {step} (exchange), the directory is neither checkpoint: {:?}",
                    raw.as_ref().map(describe)
                );
            }
            // What the next save (or a recovery) finds: a whole checkpoint, no leftovers.
            cachet_quant::recover_interrupted_save(&target).unwrap();
            let state = snapshot(&target);
            if state.as_ref() == Some(&old) {
                seen.0 += 1;
            } else if state.as_ref() == Some(&new) {
                seen.1 += 1;
            } else {
                panic!(
                    "killed at step {step} (exchange: {exchange}), the recovered directory is \
                     neither checkpoint: {:?}",
                    state.as_ref().map(describe)
                );
            }
            assert_eq!(
                names(tmp.path()),
                ["expected", "out", "pristine"],
                "step {step}: leftovers after recovery"
            );
        }
        assert!(
            seen.0 > 0 && seen.1 > 0,
            "crash points must fall before and after the swap: {seen:?}"
        );
    }
    // The completed save loads back to the model that was saved.
    let device = DeviceSpec::Cpu.init().unwrap();
    let reloaded = load_pretrained::<Llama>(&target, &device, Precision::F32).unwrap();
    assert_eq!(logits(&reloaded), logits(&new_model.model));
}

#[test]
fn an_interrupted_save_is_recovered_by_the_next_save() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    let q = quantize(&BnbQuantizationConfig::nf4(Precision::F32));
    q.save_pretrained(&target).unwrap();
    // A save that died between its two renames (no atomic exchange): the target is parked
    // beside it and a complete staging folder waits; another died while staging.
    let parked = tmp.path().join(".out.cachet-save-999999999");
    std::fs::create_dir_all(parked.join("new")).unwrap();
    std::fs::write(parked.join("new/model.safetensors"), b"half").unwrap();
    std::fs::rename(&target, parked.join("old")).unwrap();
    let staging = tmp.path().join(".out.cachet-save-999999998");
    std::fs::create_dir_all(staging.join("new")).unwrap();
    let old = snapshot(&parked.join("old")).unwrap();
    cachet_quant::recover_interrupted_save(&target).unwrap();
    assert!(
        snapshot(&target).unwrap() == old,
        "the old checkpoint is not back"
    );
    assert_eq!(names(tmp.path()), ["out"]);
    // The next save cleans up by itself too.
    std::fs::create_dir_all(staging.join("new")).unwrap();
    q.save_pretrained(&target).unwrap();
    assert_eq!(names(tmp.path()), ["out"]);
    assert!(snapshot(&target).unwrap() == old);
}
