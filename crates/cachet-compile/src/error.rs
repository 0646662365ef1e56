//! Typed errors of the compile cache, each naming the file, entry, repo or URL involved.

use std::path::PathBuf;

/// Everything that can go wrong in the compile cache.
#[derive(Debug, thiserror::Error)]
pub enum CompileCacheError {
    /// A filesystem operation failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON document did not parse.
    #[error("invalid JSON in {what}: {source}")]
    Json {
        /// The file or Hub path.
        what: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A config did not parse the way Python's `json.loads` reads it.
    #[error("cannot read {what} like Python's json.loads: {source}")]
    Config {
        /// The file or registry path.
        what: String,
        /// Where and why.
        source: crate::pyjson::LoadError,
    },
    /// A cache entry could not be built from the given config.
    #[error("invalid cache entry for {model_id}: {reason}")]
    InvalidEntry {
        /// The model id.
        model_id: String,
        /// What is wrong.
        reason: String,
    },
    /// A registry entry (local or from the Hub) is malformed.
    #[error("corrupt registry entry {what}: {reason}")]
    CorruptRegistry {
        /// The registry path.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A cached artifact does not match its recorded size or checksum.
    #[error("cached artifact {path} is corrupt: {reason}")]
    Corrupt {
        /// The artifact.
        path: PathBuf,
        /// Which check failed.
        reason: String,
    },
    /// A path from a manifest or a Hub listing would land outside the cache directory.
    #[error("refusing unsafe path {path:?} from {origin}: {reason}")]
    UnsafePath {
        /// The offending path, as given.
        path: String,
        /// Where it came from (a repo, a manifest).
        origin: String,
        /// Why it is unsafe.
        reason: &'static str,
    },
    /// The compile closure or command failed; nothing was cached.
    #[error("compilation of entry {hash} failed: {message}")]
    CompileFailed {
        /// The entry hash.
        hash: String,
        /// The compiler's error.
        message: String,
    },
    /// The compile step produced no files.
    #[error("compilation of entry {hash} produced no files in {dir}")]
    EmptyOutput {
        /// The entry hash.
        hash: String,
        /// The output directory.
        dir: PathBuf,
    },
    /// The Hub answered 401: no token or a bad one.
    #[error("authentication required for {repo} (HTTP 401); set HF_TOKEN or log in")]
    Unauthorized {
        /// The repository.
        repo: String,
    },
    /// An operation that writes to the Hub found no token to send.
    #[error("{action} {repo} needs a Hub token with write access; set HF_TOKEN or log in")]
    TokenRequired {
        /// What needed it, e.g. `deleting from`.
        action: &'static str,
        /// The repository.
        repo: String,
    },
    /// The Hub answered 403: the token may not read or write here.
    #[error("access to {repo} forbidden (HTTP 403): {detail}")]
    Forbidden {
        /// The repository.
        repo: String,
        /// The server's message.
        detail: String,
    },
    /// The repository or file does not exist.
    #[error("not found on the Hub: {what}")]
    NotFound {
        /// The repo or file.
        what: String,
    },
    /// A commit conflicted with a concurrent one and retries ran out.
    #[error("commit to {repo} conflicted (HTTP 409) after {attempts} attempts")]
    Conflict {
        /// The repository.
        repo: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// Any other Hub or transport failure (timeout, dropped connection, 5xx).
    #[error("Hub request for {what} failed: {detail}")]
    Hub {
        /// The repo, file or URL.
        what: String,
        /// The client's error.
        detail: String,
    },
    /// A file from the Hub is bigger than cachet reads or downloads (before anything is read
    /// where the size is advertised).
    #[error("refusing {what}: {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The file or module, and the repo.
        what: String,
        /// Its size: the advertised one, else the bytes received (then `limit + 1`).
        size: u64,
        /// The limit it exceeds.
        limit: u64,
    },
    /// Private-model compilations may not be pushed to a public cache repo.
    #[error("refusing to push compilations of private model {model_id} to public repo {repo}")]
    PrivateToPublic {
        /// The private model.
        model_id: String,
        /// The public cache repo.
        repo: String,
    },
    /// No cache repository is configured where one is required.
    #[error(
        "no cache repository configured: pass one, set CUSTOM_CACHE_REPO, or run `cachet compile-cache set`"
    )]
    NoRepo,
    /// A `wrap`ped compiler command is unusable.
    #[error("invalid wrapped command: {0}")]
    InvalidCommand(String),
}

/// Result with [`CompileCacheError`].
pub(crate) type Result<T, E = CompileCacheError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CompileCacheError {
    let path = path.into();
    move |source| CompileCacheError::Io { path, source }
}
