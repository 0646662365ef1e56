//! The Hugging Face Hub cache: a model repo laid out like optimum-neuron's, through `hf-hub`.
//!
//! Lookups go local → Hub → compile ([`CompileCache::get_or_compile`]); a Hub hit is downloaded
//! into a staging folder, verified (cachet manifest, else listed sizes and LFS SHA-256) and only
//! then published locally, so a failed, truncated or hostile download never leaves an entry.
//! Everything from a repo is untrusted: paths are checked before anything touches the disk.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hf_hub::progress::{DownloadEvent, Progress, ProgressEvent, ProgressHandler, UploadEvent};
use hf_hub::repository::{CommitOperation, RepoTreeEntry};
use hf_hub::{HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tracing::{info, info_span, warn};

use crate::entry::CacheEntry;
use crate::error::{CompileCacheError, Result, io_err};
use crate::layout::{CacheLayout, MODULE_PREFIX, REGISTRY_FOLDER, safe_relative};
use crate::local::{
    CachedModule, LocalCache, MANIFEST_FILE, Manifest, Source, Verify, sha256_file, verify_files,
    write_atomic,
};
use crate::pyjson::Value;

/// Environment variable naming the cache repo (overrides the saved default).
pub const CUSTOM_CACHE_REPO_ENV: &str = "CUSTOM_CACHE_REPO";
/// Environment variable overriding the read-only public fallback repo (empty disables it).
pub const DEFAULT_REPO_ENV: &str = "CACHET_DEFAULT_CACHE_REPO";
/// The read-only public cache used when nothing else is configured (optimum-neuron's).
pub const DEFAULT_PUBLIC_REPO: &str = "aws-neuron/optimum-neuron-cache";
/// File under `$HF_HOME` persisting `set REPO`.
pub const SAVED_REPO_FILE: &str = "cachet_compile_cache_repo";
/// optimum-neuron's own saved-repo file under `$HF_HOME`, read as a fallback.
pub const OPTIMUM_SAVED_REPO_FILE: &str = "optimum_neuron_custom_cache";
/// Files at least this large get a visible progress bar.
pub const PROGRESS_THRESHOLD: u64 = 16 << 20;

/// `$HF_HOME` (or `$XDG_CACHE_HOME/huggingface`, or `~/.cache/huggingface`).
pub fn hf_home() -> PathBuf {
    hf_hub::hf_home()
}

/// The repo `set` saved, if any (ours first, then optimum-neuron's).
pub fn saved_repo() -> Option<String> {
    for name in [SAVED_REPO_FILE, OPTIMUM_SAVED_REPO_FILE] {
        if let Ok(text) = std::fs::read_to_string(hf_home().join(name)) {
            let repo = text.trim();
            if !repo.is_empty() {
                return Some(repo.to_owned());
            }
        }
    }
    None
}

/// Persists `repo` as the default cache repo (`cachet compile-cache set`).
pub fn save_repo(repo: &str) -> Result<PathBuf> {
    check_repo_id(repo)?;
    let path = hf_home().join(SAVED_REPO_FILE);
    write_atomic(&path, repo.as_bytes())?;
    Ok(path)
}

/// Which repo to use and why: `CUSTOM_CACHE_REPO`, then the saved one, then the public default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepoChoice {
    /// The repo id.
    pub repo: String,
    /// `env`, `saved` or `default`.
    pub origin: &'static str,
}

/// Resolves the cache repo the way optimum-neuron does.
pub fn resolve_repo() -> Option<RepoChoice> {
    if let Ok(repo) = std::env::var(CUSTOM_CACHE_REPO_ENV)
        && !repo.trim().is_empty()
    {
        return Some(RepoChoice {
            repo: repo.trim().to_owned(),
            origin: "env",
        });
    }
    if let Some(repo) = saved_repo() {
        return Some(RepoChoice {
            repo,
            origin: "saved",
        });
    }
    let default = std::env::var(DEFAULT_REPO_ENV).unwrap_or_else(|_| DEFAULT_PUBLIC_REPO.into());
    (!default.trim().is_empty()).then(|| RepoChoice {
        repo: default.trim().to_owned(),
        origin: "default",
    })
}

fn check_repo_id(repo: &str) -> Result<()> {
    let ok = repo.split('/').count() == 2
        && repo.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(CompileCacheError::InvalidCommand(format!(
            "repo id {repo:?} is not of the form org/name"
        )))
    }
}

/// The token hf-hub 1.0 would send: `options.token`, else (unless
/// `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set) `HF_TOKEN`, the file at `HF_TOKEN_PATH`, then
/// `$HF_HOME/token`. hf-hub resolves it privately; this mirrors its order so commands can refuse
/// before a request that needs one.
pub fn resolve_token(options: &HubOptions) -> Option<String> {
    if let Some(token) = options.token.as_ref().filter(|t| !t.is_empty()) {
        return Some(token.clone());
    }
    if std::env::var("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_ok_and(|v| !v.is_empty()) {
        return None;
    }
    if let Ok(token) = std::env::var("HF_TOKEN")
        && !token.is_empty()
    {
        return Some(token);
    }
    let files = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .into_iter()
        .chain([hf_home().join("token")]);
    for file in files {
        if let Ok(text) = std::fs::read_to_string(&file)
            && !text.trim().is_empty()
        {
            return Some(text.trim().to_owned());
        }
    }
    None
}

/// Connection settings for the Hub (`Debug` shows whether a token is set, never the token).
#[derive(Clone)]
pub struct HubOptions {
    /// Base URL; `None` reads `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Token; `None` reads `HF_TOKEN`, `HF_TOKEN_PATH` or `$HF_HOME/token`.
    pub token: Option<String>,
    /// Connect and per-read timeout (a stalled transfer fails after this long).
    pub timeout: Duration,
    /// Retries of transient failures inside hf-hub.
    pub retries: usize,
    /// Attempts of a commit that conflicts (HTTP 409), with exponential backoff.
    pub commit_attempts: u32,
    /// Show progress bars (they draw only on a terminal).
    pub progress: bool,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("commit_attempts", &self.commit_attempts)
            .field("progress", &self.progress)
            .finish()
    }
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            endpoint: None,
            token: None,
            timeout: Duration::from_secs(30),
            retries: 3,
            commit_attempts: 5,
            progress: true,
        }
    }
}

/// A Hub cache repo.
pub struct HubCache {
    client: HFClientSync,
    repo: HFRepositorySync<RepoTypeModel>,
    repo_id: String,
    options: HubOptions,
}

impl std::fmt::Debug for HubCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's Debug prints only whether a token is set, never the token.
        f.debug_struct("HubCache")
            .field("repo_id", &self.repo_id)
            .field("client", &self.client)
            .finish()
    }
}

fn client(options: &HubOptions) -> Result<HFClientSync> {
    let http = reqwest::Client::builder()
        .connect_timeout(options.timeout)
        .read_timeout(options.timeout)
        .user_agent(concat!("cachet-compile/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| CompileCacheError::Hub {
            what: "HTTP client".into(),
            detail: e.to_string(),
        })?;
    let mut builder = hf_hub::HFClient::builder()
        .client(http)
        .retry_max_attempts(options.retries)
        .retry_base_delay(Duration::from_millis(100))
        .cache_enabled(false);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.endpoint(endpoint.clone());
    }
    if let Some(token) = &options.token {
        builder = builder.token(token.clone());
    }
    builder.build_sync().map_err(|e| CompileCacheError::Hub {
        what: "Hub client".into(),
        detail: e.to_string(),
    })
}

/// Maps an hf-hub error to a typed one naming `what` (never containing the token).
fn map_err(repo: &str, what: &str, e: HFError) -> CompileCacheError {
    match e {
        HFError::AuthRequired { .. } => CompileCacheError::Unauthorized {
            repo: repo.to_owned(),
        },
        HFError::Forbidden { context } => CompileCacheError::Forbidden {
            repo: repo.to_owned(),
            detail: context
                .server_message
                .clone()
                .unwrap_or_else(|| format!("HTTP {}", context.status)),
        },
        HFError::RepoNotFound { .. } => CompileCacheError::NotFound {
            what: format!("repo {repo}"),
        },
        HFError::EntryNotFound { .. } | HFError::RevisionNotFound { .. } => {
            CompileCacheError::NotFound {
                what: format!("{what} in {repo}"),
            }
        }
        HFError::Conflict { .. } => CompileCacheError::Conflict {
            repo: repo.to_owned(),
            attempts: 1,
        },
        other => CompileCacheError::Hub {
            what: format!("{what} in {repo}"),
            detail: error_chain(&other),
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Creates a cache repo (private unless `public`) and returns its id; `name` may be `org/name`
/// or a bare name created under the token's user.
pub fn create_repo(options: &HubOptions, name: Option<&str>, public: bool) -> Result<String> {
    let client = client(options)?;
    let name = name.unwrap_or("cachet-compile-cache");
    let repo_id = if name.contains('/') {
        name.to_owned()
    } else {
        let user = client
            .whoami()
            .send()
            .map_err(|e| map_err(name, "whoami", e))?;
        format!("{}/{name}", user.username)
    };
    check_repo_id(&repo_id)?;
    client
        .create_repository()
        .repo_id(&repo_id)
        .repo_type(RepoTypeModel)
        .private(!public)
        .exist_ok(true)
        .send()
        .map_err(|e| map_err(&repo_id, "create", e))?;
    Ok(repo_id)
}

/// One file listed in the repo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteFile {
    /// Path in the repo.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 when the Hub stores it in LFS.
    pub sha256: Option<String>,
}

/// Filters of `lookup`, compared to the entries' compilation factors.
#[derive(Debug, Clone, Default)]
pub struct LookupFilter {
    /// The task.
    pub task: Option<String>,
    /// `torch_dtype` (or `dtype`).
    pub dtype: Option<String>,
    /// `batch_size`.
    pub batch_size: Option<u64>,
    /// `sequence_length`.
    pub sequence_length: Option<u64>,
    /// `tp_degree` (number of cores).
    pub num_cores: Option<u64>,
    /// Any other `key=value` factor (value parsed as Python JSON, else a string).
    pub factors: Vec<(String, Value)>,
}

impl LookupFilter {
    /// Whether `entry` passes every filter.
    pub fn matches(&self, entry: &CacheEntry) -> bool {
        let n = entry.compile_config();
        let get = |k: &str| n.get(k);
        if let Some(task) = &self.task
            && entry.task() != Some(task.as_str())
        {
            return false;
        }
        if let Some(dtype) = &self.dtype {
            let have = get("torch_dtype")
                .or_else(|| get("dtype"))
                .and_then(Value::as_str);
            let norm = |s: &str| s.trim_start_matches("torch.").to_ascii_lowercase();
            if have.map(norm) != Some(norm(dtype)) {
                return false;
            }
        }
        for (key, want) in [
            ("batch_size", self.batch_size),
            ("sequence_length", self.sequence_length),
            ("tp_degree", self.num_cores),
        ] {
            if let Some(want) = want
                && get(key).and_then(Value::as_u64) != Some(want)
            {
                return false;
            }
        }
        self.factors.iter().all(|(k, v)| get(k) == Some(v))
    }
}

/// What `synchronize` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Files uploaded.
    pub uploaded: Vec<String>,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Files already on the Hub.
    pub already_present: usize,
    /// Modules skipped (private model to public repo), with the reason.
    pub skipped: Vec<String>,
    /// Commit attempts used (more than one after conflicts).
    pub attempts: u32,
}

/// What [`HubCache::prune_old_versions`] deleted (or, with `dry_run`, would delete).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// The repo.
    pub repo: String,
    /// The compiler folders kept.
    pub kept: Vec<String>,
    /// Files deleted.
    pub deleted: Vec<String>,
    /// Their total size.
    pub bytes: u64,
    /// Whether this was a dry run (nothing deleted).
    pub dry_run: bool,
    /// Commit attempts used (0 when nothing was committed).
    pub attempts: u32,
}

/// Selects the files of a repo listing that pruning old versions deletes.
///
/// A top-level folder `<compiler>-<version>` is deleted whole when another folder of the same
/// compiler (the part before the first `-`, as in the local cache) is in `keep`. Inside the kept
/// folders, with `tool_version`, `0_REGISTRY/<other tool version>/…` entries are deleted, and
/// so is every `MODULE_<hash>` folder whose hash only those entries name (modules no registry
/// entry names are left alone: they may be served by hash). Files outside compiler folders
/// (README, `.gitattributes`) and compilers with no kept folder are never selected.
pub fn plan_prune<'a>(
    files: &'a [RemoteFile],
    keep: &[String],
    tool_version: Option<&str>,
) -> Vec<&'a RemoteFile> {
    let compiler_of = |dir: &str| dir.split('-').next().unwrap_or("").to_owned();
    let kept_compilers: Vec<String> = keep.iter().map(|k| compiler_of(k)).collect();
    let split = |path: &'a str| path.split_once('/');
    let mut out = Vec::new();
    let mut old_hashes = std::collections::BTreeSet::new();
    let mut live_hashes = std::collections::BTreeSet::new();
    let hash_of = |rest: &str| {
        rest.rsplit('/')
            .next()
            .and_then(|f| f.strip_suffix(".json"))
            .map(str::to_owned)
    };
    for file in files {
        let Some((dir, rest)) = split(&file.path) else {
            continue;
        };
        if !dir.contains('-') || !kept_compilers.contains(&compiler_of(dir)) {
            continue;
        }
        if !keep.iter().any(|k| k == dir) {
            out.push(file);
            continue;
        }
        let (Some(tool_version), Some(registry)) = (
            tool_version,
            rest.strip_prefix(&format!("{REGISTRY_FOLDER}/")),
        ) else {
            continue;
        };
        let Some((version, entry)) = registry.split_once('/') else {
            continue;
        };
        let hash = hash_of(entry).map(|h| (dir.to_owned(), h));
        if version == tool_version {
            live_hashes.extend(hash);
        } else {
            old_hashes.extend(hash);
            out.push(file);
        }
    }
    let dead: Vec<String> = old_hashes
        .difference(&live_hashes)
        .map(|(dir, hash)| format!("{dir}/{MODULE_PREFIX}{hash}/"))
        .collect();
    for file in files {
        if dead.iter().any(|d| file.path.starts_with(d)) {
            out.push(file);
        }
    }
    out
}

/// Repo facts `lookup`/uploads need.
#[derive(Debug, Clone, Serialize)]
pub struct RepoInfo {
    /// The repo id.
    pub id: String,
    /// Whether the repo is private.
    pub private: bool,
}

impl HubCache {
    /// Opens `repo_id` on the Hub (no request is made yet).
    pub fn new(repo_id: &str, options: HubOptions) -> Result<Self> {
        check_repo_id(repo_id)?;
        let client = client(&options)?;
        let (owner, name) = hf_hub::split_id(repo_id);
        let repo = client.model(owner, name);
        Ok(Self {
            client,
            repo,
            repo_id: repo_id.to_owned(),
            options,
        })
    }

    /// The repo id.
    pub fn repo_id(&self) -> &str {
        &self.repo_id
    }

    /// Fetches whether the repo exists and is private.
    pub fn info(&self) -> Result<RepoInfo> {
        let info = self
            .repo
            .info()
            .send()
            .map_err(|e| map_err(&self.repo_id, "repo info", e))?;
        Ok(RepoInfo {
            id: self.repo_id.clone(),
            private: info.private.unwrap_or(false),
        })
    }

    /// Whether `model_id` is private (or unknown to the Hub, e.g. a local model).
    pub fn model_is_private(&self, model_id: &str) -> bool {
        if check_repo_id(model_id).is_err() {
            return true;
        }
        let (owner, name) = hf_hub::split_id(model_id);
        match self.client.model(owner, name).info().send() {
            Ok(info) => info.private.unwrap_or(false),
            Err(_) => true,
        }
    }

    /// Lists files under `prefix` (recursively; `""` is the whole repo); a missing folder is an
    /// empty list.
    pub fn list_files(&self, prefix: &str) -> Result<Vec<RemoteFile>> {
        let listing = if prefix.is_empty() {
            self.repo.list_tree().recursive(true).send()
        } else {
            self.repo
                .list_tree()
                .path_in_repo(prefix.to_owned())
                .recursive(true)
                .send()
        };
        let entries = match listing {
            Ok(entries) => entries,
            Err(HFError::EntryNotFound { .. }) | Err(HFError::RevisionNotFound { .. })
                if !prefix.is_empty() =>
            {
                return Ok(Vec::new());
            }
            // The tree endpoint's 404 for a missing folder comes back as a plain HTTP error; at
            // the root it means the repo is missing or invisible to us.
            Err(HFError::Http { context }) if context.status.as_u16() == 404 => {
                if prefix.is_empty() {
                    return Err(CompileCacheError::NotFound {
                        what: format!("repo {}", self.repo_id),
                    });
                }
                return Ok(Vec::new());
            }
            Err(e) => return Err(map_err(&self.repo_id, prefix, e)),
        };
        let origin = format!("the tree of {}", self.repo_id);
        let mut out = Vec::new();
        for entry in entries {
            if let RepoTreeEntry::File {
                path, size, lfs, ..
            } = entry
            {
                safe_relative(&path, &origin)?;
                if !prefix.is_empty() && !path.starts_with(&format!("{prefix}/")) {
                    return Err(CompileCacheError::UnsafePath {
                        path,
                        origin,
                        reason: "listed outside the requested folder",
                    });
                }
                out.push(RemoteFile {
                    path,
                    size,
                    sha256: lfs.and_then(|l| l.sha256),
                });
            }
        }
        Ok(out)
    }

    /// Downloads one file to `dest` (must not exist) with a progress bar for large files.
    fn download(&self, remote: &RemoteFile, tmp_root: &Path, dest: &Path) -> Result<()> {
        let _span = info_span!("hub_download", file = remote.path, bytes = remote.size).entered();
        let bar = self.bar(remote.size, &remote.path);
        let progress = bar.clone().map(|bar| Progress::new(BarHandler::new(bar)));
        let got = self
            .repo
            .download_file()
            .filename(remote.path.clone())
            .local_dir(tmp_root.to_owned())
            .maybe_progress(progress)
            .send()
            .map_err(|e| map_err(&self.repo_id, &remote.path, e))?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::rename(&got, dest).map_err(io_err(dest))?;
        Ok(())
    }

    fn bar(&self, total: u64, label: &str) -> Option<ProgressBar> {
        if !self.options.progress || total < PROGRESS_THRESHOLD {
            return None;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(label.rsplit('/').next().unwrap_or(label).to_owned());
        Some(bar)
    }

    /// Downloads module `hash` into `staging` and verifies it; `Ok(false)` if the Hub lacks it.
    pub fn fetch_module(&self, layout: &CacheLayout, hash: &str, staging: &Path) -> Result<bool> {
        let prefix = layout.module_dir(hash);
        let _span = info_span!("hub_fetch_module", repo = self.repo_id, hash).entered();
        let files = self.list_files(&prefix)?;
        if files.is_empty() {
            return Ok(false);
        }
        let tmp = tempfile::Builder::new()
            .prefix(".download.")
            .tempdir_in(staging)
            .map_err(io_err(staging))?;
        let mut listed = BTreeMap::new();
        for remote in &files {
            let rel = &remote.path[prefix.len() + 1..];
            if rel == MANIFEST_FILE {
                continue;
            }
            self.download(remote, tmp.path(), &staging.join(rel))?;
            listed.insert(rel.to_owned(), remote.clone());
        }
        drop(tmp);
        // Verify: the cachet manifest when present, else the listing's sizes and LFS sums.
        if let Some(remote) = files
            .iter()
            .find(|f| f.path.ends_with(&format!("/{MANIFEST_FILE}")))
        {
            let dl = tempfile::tempdir_in(staging).map_err(io_err(staging))?;
            let path = self.download_path(remote, dl.path())?;
            let text = std::fs::read(&path).map_err(io_err(&path))?;
            let manifest: Manifest =
                serde_json::from_slice(&text).map_err(|source| CompileCacheError::Json {
                    what: format!("{} in {}", remote.path, self.repo_id),
                    source,
                })?;
            drop(dl);
            if manifest.hash != hash {
                return Err(CompileCacheError::Corrupt {
                    path: staging.to_owned(),
                    reason: format!("remote manifest is for {}, not {hash}", manifest.hash),
                });
            }
            verify_files(staging, &manifest, Verify::Full)?;
        } else {
            for (rel, remote) in &listed {
                let path = staging.join(rel);
                let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
                if !meta.is_file() || meta.len() != remote.size {
                    return Err(CompileCacheError::Corrupt {
                        path,
                        reason: format!("size {} != listed {}", meta.len(), remote.size),
                    });
                }
                if let Some(want) = &remote.sha256
                    && &sha256_file(&path)? != want
                {
                    return Err(CompileCacheError::Corrupt {
                        path,
                        reason: "sha256 differs from the Hub's LFS object id".into(),
                    });
                }
            }
        }
        Ok(true)
    }

    fn download_path(&self, remote: &RemoteFile, dir: &Path) -> Result<PathBuf> {
        self.repo
            .download_file()
            .filename(remote.path.clone())
            .local_dir(dir.to_owned())
            .send()
            .map_err(|e| map_err(&self.repo_id, &remote.path, e))
    }

    /// Reads a small text file from the repo.
    pub fn read_text(&self, path: &str) -> Result<String> {
        safe_relative(path, &self.repo_id)?;
        let bytes = self
            .repo
            .download_file_to_bytes()
            .filename(path.to_owned())
            .send()
            .map_err(|e| map_err(&self.repo_id, path, e))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CompileCacheError::CorruptRegistry {
            what: format!("{path} in {}", self.repo_id),
            reason: "not UTF-8".into(),
        })
    }

    /// Commits `files` (`(path in repo, local file)`), retrying conflicts with backoff.
    pub fn upload(&self, files: &[(String, PathBuf)], message: &str) -> Result<u32> {
        for (path, _) in files {
            safe_relative(path, "an upload")?;
        }
        let total: u64 = files
            .iter()
            .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let _span = info_span!(
            "hub_upload",
            repo = self.repo_id,
            files = files.len(),
            bytes = total
        )
        .entered();
        let bar = self.bar(total, "upload");
        let make = || {
            files
                .iter()
                .map(|(path, local)| CommitOperation::add_file(path.clone(), local.clone()))
                .collect()
        };
        let result = self.commit(make, message, bar.as_ref());
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        result
    }

    /// Creates one commit of `operations()`, retrying conflicts (HTTP 409) with exponential
    /// backoff; returns the attempts used.
    fn commit(
        &self,
        operations: impl Fn() -> Vec<CommitOperation>,
        message: &str,
        bar: Option<&ProgressBar>,
    ) -> Result<u32> {
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=self.options.commit_attempts.max(1) {
            let progress = bar.cloned().map(|b| Progress::new(BarHandler::new(b)));
            match self
                .repo
                .create_commit()
                .operations(operations())
                .commit_message(message.to_owned())
                .maybe_progress(progress)
                .send()
            {
                Ok(_) => return Ok(attempt),
                Err(HFError::Conflict { .. }) if attempt < self.options.commit_attempts => {
                    warn!(
                        repo = self.repo_id,
                        attempt, "commit conflict, retrying in {delay:?}"
                    );
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(HFError::Conflict { .. }) => {
                    return Err(CompileCacheError::Conflict {
                        repo: self.repo_id.clone(),
                        attempts: attempt,
                    });
                }
                Err(e) => return Err(map_err(&self.repo_id, "commit", e)),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Deletes what [`plan_prune`] selects from this repo in one commit: the folders of other
    /// versions of the kept compilers (`keep`: `<compiler>-<version>` folders) and, with
    /// `tool_version`, registry entries of other tool versions plus the `MODULE_` folders only
    /// they referenced. Needs a token with write access unless `dry_run`; folders of compilers
    /// with no kept version are never touched.
    pub fn prune_old_versions(
        &self,
        keep: &[String],
        tool_version: Option<&str>,
        dry_run: bool,
    ) -> Result<PruneReport> {
        let _span = info_span!("hub_prune", repo = self.repo_id, dry_run).entered();
        if !dry_run && resolve_token(&self.options).is_none() {
            return Err(CompileCacheError::TokenRequired {
                action: "deleting from",
                repo: self.repo_id.clone(),
            });
        }
        let files = self.list_files("")?;
        let mut report = PruneReport {
            repo: self.repo_id.clone(),
            kept: keep.to_vec(),
            dry_run,
            ..Default::default()
        };
        for file in plan_prune(&files, keep, tool_version) {
            report.bytes += file.size;
            report.deleted.push(file.path.clone());
        }
        if dry_run || report.deleted.is_empty() {
            return Ok(report);
        }
        let deleted = report.deleted.clone();
        let make = || deleted.iter().map(CommitOperation::delete).collect();
        let message = format!(
            "cachet-compile: prune versions other than {}",
            keep.join(", ")
        );
        report.attempts = self.commit(make, &message, None)?;
        info!(
            files = report.deleted.len(),
            bytes = report.bytes,
            "pruned old versions"
        );
        Ok(report)
    }

    /// The registry folder of `layout` in this repo: exact compiler version, else (like
    /// optimum-neuron) the first root folder starting with `<compiler>-<version>`.
    pub fn registry_dir(&self, layout: &CacheLayout) -> Result<Option<String>> {
        let root = self
            .repo
            .list_tree()
            .send()
            .map_err(|e| map_err(&self.repo_id, "repo root", e))?;
        let prefix = layout.compiler_dir();
        let mut dirs: Vec<String> = root
            .into_iter()
            .filter_map(|e| match e {
                RepoTreeEntry::Directory { path, .. } if path.starts_with(&prefix) => Some(path),
                _ => None,
            })
            .collect();
        dirs.sort();
        let dir = dirs
            .iter()
            .find(|d| **d == prefix)
            .or_else(|| dirs.first())
            .cloned();
        Ok(dir.map(|d| format!("{d}/{REGISTRY_FOLDER}/{}", layout.tool_version)))
    }

    /// Searches the registry for entries of `model_id` (alias paths) or, with `arch_digest`,
    /// for every entry of that architecture, keeping those passing `filter`.
    pub fn lookup(
        &self,
        layout: &CacheLayout,
        model_id: &str,
        arch_digest: Option<&str>,
        filter: &LookupFilter,
    ) -> Result<Vec<(String, CacheEntry)>> {
        let _span = info_span!("hub_lookup", repo = self.repo_id, model_id).entered();
        let Some(registry) = self.registry_dir(layout)? else {
            return Ok(Vec::new());
        };
        let files = self.list_files(&registry)?;
        let alias_suffix = format!("/{model_id}/");
        let mut out = Vec::new();
        for file in files {
            if !file.path.ends_with(".json") {
                continue;
            }
            let rel = &file.path[registry.len() + 1..];
            let by_arch = arch_digest.is_some_and(|a| rel.starts_with(&format!("{a}/")));
            let by_alias = rel.split('/').count() == 4 && format!("/{rel}").contains(&alias_suffix);
            if !(by_arch || by_alias) {
                continue;
            }
            let text = match self.read_text(&file.path) {
                Ok(t) => t,
                Err(e) => {
                    warn!("skipping registry entry: {e}");
                    continue;
                }
            };
            match CacheEntry::deserialize(&text, &format!("{} in {}", file.path, self.repo_id)) {
                Ok(entry) if filter.matches(&entry) => out.push((file.path.clone(), entry)),
                Ok(_) => {}
                Err(e) => warn!("skipping {e}"),
            }
        }
        // An entry appears under its arch digest and its alias: keep one per hash.
        let mut seen = std::collections::HashSet::new();
        out.retain(|(_, e)| seen.insert(e.hash()));
        Ok(out)
    }

    /// Uploads the local cache's files the Hub lacks, never pushing compilations of private
    /// models to a public repo.
    pub fn synchronize(&self, local: &LocalCache) -> Result<SyncReport> {
        let layout = local.layout();
        let _span = info_span!("hub_synchronize", repo = self.repo_id).entered();
        let info = self.info()?;
        let remote: HashMap<String, u64> = self
            .list_files(&layout.compiler_dir())?
            .into_iter()
            .map(|f| (f.path, f.size))
            .collect();
        let mut report = SyncReport::default();
        let mut blocked_hashes = Vec::new();
        if !info.private {
            for (_, entry) in local.registry_entries()? {
                if self.model_is_private(entry.model_id()) {
                    report.skipped.push(format!(
                        "{} ({}): private model, public repo",
                        entry.hash(),
                        entry.model_id()
                    ));
                    blocked_hashes.push(entry.hash());
                }
            }
        }
        let mut files = Vec::new();
        for (rel, path, size) in local.publishable_files()? {
            if blocked_hashes.iter().any(|h| {
                rel.contains(&format!("/{MODULE_PREFIX}{h}/"))
                    || rel.ends_with(&format!("/{h}.json"))
            }) {
                continue;
            }
            if remote.get(&rel) == Some(&size) {
                report.already_present += 1;
                continue;
            }
            report.bytes += size;
            report.uploaded.push(rel.clone());
            files.push((rel, path));
        }
        if !files.is_empty() {
            report.attempts = self.upload(&files, "Synchronizing local compiler cache.")?;
            info!(files = files.len(), bytes = report.bytes, "synchronized");
        }
        Ok(report)
    }

    /// Uploads one module and its registry entry (after a compile).
    pub fn push_module(
        &self,
        local: &LocalCache,
        module: &CachedModule,
        entry: Option<&CacheEntry>,
    ) -> Result<()> {
        let layout = local.layout();
        if let Some(entry) = entry
            && !self.info()?.private
            && self.model_is_private(entry.model_id())
        {
            return Err(CompileCacheError::PrivateToPublic {
                model_id: entry.model_id().to_owned(),
                repo: self.repo_id.clone(),
            });
        }
        let prefix = layout.module_dir(&module.hash);
        let mut files: Vec<(String, PathBuf)> = module
            .manifest
            .files
            .iter()
            .map(|f| (format!("{prefix}/{}", f.path), module.dir.join(&f.path)))
            .collect();
        files.push((
            format!("{prefix}/{MANIFEST_FILE}"),
            module.dir.join(MANIFEST_FILE),
        ));
        if let Some(entry) = entry {
            for rel in [layout.registry_path(entry), layout.alias_path(entry)] {
                files.push((rel.clone(), local.root().join(rel)));
            }
        }
        self.upload(&files, &format!("cachet-compile: add {prefix}"))?;
        Ok(())
    }
}

/// Drives an indicatif bar from hf-hub progress events.
struct BarHandler {
    bar: ProgressBar,
    per_file: Mutex<HashMap<String, u64>>,
}

impl BarHandler {
    fn new(bar: ProgressBar) -> Self {
        Self {
            bar,
            per_file: Mutex::new(HashMap::new()),
        }
    }
}

impl ProgressHandler for BarHandler {
    fn on_progress(&self, event: &ProgressEvent) {
        match event {
            ProgressEvent::Download(DownloadEvent::Progress { files }) => {
                let mut map = self.per_file.lock().expect("progress map");
                for f in files {
                    map.insert(f.filename.clone(), f.bytes_completed);
                }
                self.bar.set_position(map.values().sum());
            }
            ProgressEvent::Download(DownloadEvent::AggregateProgress {
                bytes_completed, ..
            })
            | ProgressEvent::Upload(UploadEvent::Progress {
                bytes_completed, ..
            }) => self.bar.set_position(*bytes_completed),
            ProgressEvent::Upload(UploadEvent::Committing) => {
                self.bar.set_position(self.bar.length().unwrap_or(0));
                self.bar.set_message("committing");
            }
            _ => {}
        }
    }
}

/// The local cache plus an optional Hub repo: local → Hub → compile.
#[derive(Debug)]
pub struct CompileCache {
    local: LocalCache,
    hub: Option<HubCache>,
    push: bool,
}

impl CompileCache {
    /// A cache with only the local level.
    pub fn local_only(local: LocalCache) -> Self {
        Self {
            local,
            hub: None,
            push: false,
        }
    }

    /// A cache with a Hub level; `push` uploads fresh compilations (needs a writable repo).
    pub fn with_hub(local: LocalCache, hub: HubCache, push: bool) -> Self {
        Self {
            local,
            hub: Some(hub),
            push,
        }
    }

    /// The default cache for `layout`: local dir from the environment and the repo resolved
    /// like optimum-neuron (pushing only to a configured repo, never to the public default).
    pub fn from_env(layout: CacheLayout) -> Result<Self> {
        Ok(Self::from_env_with_local(LocalCache::open_default(layout)))
    }

    /// Like [`from_env`](Self::from_env) over a given local cache.
    pub fn from_env_with_local(local: LocalCache) -> Self {
        match resolve_repo() {
            Some(choice) => {
                let push = choice.origin != "default";
                match HubCache::new(&choice.repo, HubOptions::default()) {
                    Ok(hub) => Self::with_hub(local, hub, push),
                    Err(e) => {
                        warn!("Hub cache disabled: {e}");
                        Self::local_only(local)
                    }
                }
            }
            None => Self::local_only(local),
        }
    }

    /// The local level.
    pub fn local(&self) -> &LocalCache {
        &self.local
    }

    /// The Hub level, if any.
    pub fn hub(&self) -> Option<&HubCache> {
        self.hub.as_ref()
    }

    /// Returns `entry`'s module from the local cache or the Hub, never compiling.
    pub fn fetch(&self, entry: &CacheEntry) -> Result<Option<CachedModule>> {
        self.local.layout().validate(Some(entry))?;
        let hash = entry.hash();
        if let Ok(Some(hit)) = self.local.lookup(&hash) {
            return Ok(Some(hit));
        }
        let Some(hub) = &self.hub else {
            return Ok(None);
        };
        let _lock = self.local.lock(&hash)?;
        if let Ok(Some(hit)) = self.local.lookup(&hash) {
            return Ok(Some(hit));
        }
        let staging = self.local.stage(&hash)?;
        match hub.fetch_module(self.local.layout(), &hash, staging.path()) {
            Ok(true) => {
                let module = self.local.commit(staging, Source::Hub)?;
                self.local.write_registry(entry)?;
                Ok(Some(module))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                warn!("Hub cache unusable: {e}");
                Ok(None)
            }
        }
    }

    /// Serves `entry`: a verified local module, else a verified Hub download, else `compile`
    /// into a fresh folder. Hub failures fall back to compiling; upload failures only warn.
    pub fn get_or_compile<F, E>(&self, entry: &CacheEntry, compile: F) -> Result<CachedModule>
    where
        F: FnOnce(&Path) -> std::result::Result<(), E>,
        E: std::fmt::Display,
    {
        self.local.layout().validate(Some(entry))?;
        let hash = entry.hash();
        let layout = self.local.layout().clone();
        let module = self.local.get_or_fill(&hash, |staging| {
            if let Some(hub) = &self.hub {
                match hub.fetch_module(&layout, &hash, staging) {
                    Ok(true) => return Ok(Source::Hub),
                    Ok(false) => info!(hash, repo = hub.repo_id(), "not in the Hub cache"),
                    Err(e) => warn!("Hub cache unusable, compiling instead: {e}"),
                }
                clear_dir(staging)?;
            }
            compile(staging).map_err(|e| CompileCacheError::CompileFailed {
                hash: hash.clone(),
                message: e.to_string(),
            })?;
            Ok(Source::Compiled)
        })?;
        if module.source != Source::Local {
            self.local.write_registry(entry)?;
        }
        if module.source == Source::Compiled
            && self.push
            && let Some(hub) = &self.hub
            && let Err(e) = hub.push_module(&self.local, &module, Some(entry))
        {
            warn!("not uploaded to {}: {e}", hub.repo_id());
        }
        Ok(module)
    }
}

fn clear_dir(dir: &Path) -> Result<()> {
    for item in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let path = item.path();
        let res = if item.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        res.map_err(io_err(&path))?;
    }
    Ok(())
}

/// Compiles once per configuration with the default cache ([`CompileCache::from_env`]):
/// `compile` writes its artifacts into the folder it is given; the verified module is returned.
pub fn with_compile_cache<F, E>(entry: &CacheEntry, compile: F) -> Result<CachedModule>
where
    F: FnOnce(&Path) -> std::result::Result<(), E>,
    E: std::fmt::Display,
{
    CompileCache::from_env(CacheLayout::for_entry(entry))?.get_or_compile(entry, compile)
}

#[cfg(test)]
mod debug_tests {
    #[test]
    fn debug_never_shows_the_token() {
        let options = super::HubOptions {
            token: Some("hf_secret_value".into()),
            ..super::HubOptions::default()
        };
        let shown = format!("{options:?}");
        assert!(
            !shown.contains("hf_secret_value") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}
