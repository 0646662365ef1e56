//! Connecting to the Hub: [`HubOptions`], the token, the hf-hub client and its errors.

use std::path::PathBuf;
use std::time::Duration;

use hf_hub::{HFClientSync, HFError};

use crate::error::{CompileCacheError, Result};

/// `$HF_HOME` (or `$XDG_CACHE_HOME/huggingface`, or `~/.cache/huggingface`).
pub(crate) fn hf_home() -> PathBuf {
    hf_hub::hf_home()
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

pub(super) fn client(options: &HubOptions) -> Result<HFClientSync> {
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
pub(super) fn map_err(repo: &str, what: &str, e: HFError) -> CompileCacheError {
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

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
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
