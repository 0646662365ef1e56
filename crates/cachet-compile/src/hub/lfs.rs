//! Uploads through the Hub's commit API the way `huggingface_hub` speaks it, LFS included.
//!
//! The preupload endpoint sorts each file into `regular` (committed inline, base64) or `lfs`.
//! An LFS file goes through the Git LFS batch API: the Hub answers, per object, nothing (the
//! content is already stored) or an `upload` action, a single `PUT` (`basic`) or one `PUT` per
//! part followed by a completion `POST` (`multipart`, when the action's header has a
//! `chunk_size`), and optionally a `verify` action; the NDJSON commit then names the file by its
//! SHA-256 (`lfsFile`). hf-hub's own commit uploads LFS files only through Xet storage and
//! inlines them otherwise, which the Hub refuses for large files, so uploads come here.
//!
//! Upload URLs may point outside the Hub (presigned storage URLs): the token is sent to the Hub's
//! own origin only.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use indicatif::ProgressBar;
use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{debug, info_span, warn};

use super::HubCache;
use super::client::{error_chain, resolve_token};
use crate::entry::hex;
use crate::error::{CompileCacheError, Result, io_err};

/// `huggingface_hub`'s default endpoint.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Bytes of each file the preupload endpoint sees.
const SAMPLE_BYTES: usize = 512;
/// The most bytes read from a JSON answer of the Hub.
const MAX_ANSWER_BYTES: u64 = 16 << 20;
/// Files per preupload / batch request, as `huggingface_hub` chunks them.
const FILES_PER_REQUEST: usize = 256;
/// Media type of the Git LFS batch API.
const LFS_MEDIA_TYPE: &str = "application/vnd.git-lfs+json";
/// The slowest transfer allowed: a request sending `n` bytes may take the timeout plus
/// `n / MIN_RATE` seconds before it fails (a stalled upload must not hang forever).
const MIN_RATE: u64 = 256 << 10;

/// A local file about to be committed.
struct Upload {
    path_in_repo: String,
    local: PathBuf,
    size: u64,
    sample: Vec<u8>,
    sha256: String,
}

impl Upload {
    /// Reads `local` once for its size, its first bytes and its SHA-256.
    fn prepare(path_in_repo: &str, local: &PathBuf) -> Result<Self> {
        let mut file = File::open(local).map_err(io_err(local))?;
        let mut hasher = Sha256::new();
        let mut sample = Vec::with_capacity(SAMPLE_BYTES);
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io_err(local))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            let take = (SAMPLE_BYTES - sample.len()).min(n);
            sample.extend_from_slice(&buf[..take]);
            size += n as u64;
        }
        Ok(Self {
            path_in_repo: path_in_repo.to_owned(),
            local: local.clone(),
            size,
            sample,
            sha256: hex(&hasher.finalize()),
        })
    }
}

/// The HTTP side of the commit API: endpoint, token and a blocking client.
pub(super) struct CommitApi {
    http: Client,
    endpoint: String,
    token: Option<String>,
    retries: usize,
    timeout: Duration,
}

impl CommitApi {
    /// A client with the options' connect timeout; each request gets its own total timeout
    /// ([`CommitApi::deadline`]).
    pub(super) fn new(options: &super::HubOptions) -> Result<Self> {
        let http = Client::builder()
            .connect_timeout(options.timeout)
            .timeout(None)
            .user_agent(concat!("cachet-compile/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CompileCacheError::Hub {
                what: "HTTP client".into(),
                detail: e.to_string(),
            })?;
        let endpoint = options
            .endpoint
            .clone()
            .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        Ok(Self {
            http,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            token: resolve_token(options),
            retries: options.retries,
            timeout: options.timeout,
        })
    }

    /// How long a request sending `bytes` may take: the timeout, plus the time to send them at
    /// [`MIN_RATE`].
    fn deadline(&self, bytes: u64) -> Duration {
        self.timeout + Duration::from_secs(bytes / MIN_RATE)
    }

    /// `url` with the Hub's default origin replaced by the configured endpoint (a Hub behind a
    /// proxy answers with its public URLs), like `huggingface_hub`'s `fix_hf_endpoint_in_url`.
    fn fix_endpoint(&self, url: &str) -> String {
        match url.strip_prefix(DEFAULT_ENDPOINT) {
            Some(rest) if self.endpoint != DEFAULT_ENDPOINT => format!("{}{rest}", self.endpoint),
            _ => url.to_owned(),
        }
    }

    /// Whether `url` is on the Hub's own origin (where the token may go).
    fn is_hub(&self, url: &str) -> bool {
        url.strip_prefix(&self.endpoint)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `make()`, retrying transport errors and HTTP 500/502/503/504 `retries` times.
    fn send(&self, what: &str, make: impl Fn() -> Result<RequestBuilder>) -> Result<Response> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            let sent = make()?.send();
            let transient = match &sent {
                Ok(r) => matches!(r.status().as_u16(), 500 | 502 | 503 | 504),
                Err(e) => e.is_connect() || e.is_timeout(),
            };
            if !transient || attempt >= self.retries {
                return sent.map_err(|e| CompileCacheError::Hub {
                    what: what.to_owned(),
                    detail: error_chain(&e),
                });
            }
            attempt += 1;
            warn!(
                what,
                attempt, "transient Hub failure, retrying in {delay:?}"
            );
            std::thread::sleep(delay);
            delay *= 2;
        }
    }

    /// A JSON request to the Hub (token included), its JSON answer.
    fn post_json(
        &self,
        repo: &str,
        what: &str,
        url: &str,
        body: &Value,
        lfs: bool,
    ) -> Result<Value> {
        let bytes = serde_json::to_vec(body).expect("JSON values serialize");
        let media = if lfs {
            LFS_MEDIA_TYPE
        } else {
            "application/json"
        };
        let response = self.send(what, || {
            Ok(self
                .authorized(self.http.post(url))
                .timeout(self.deadline(bytes.len() as u64))
                .header("Content-Type", media)
                .header("Accept", media)
                .body(bytes.clone()))
        })?;
        read_json(repo, what, response)
    }
}

impl HubCache {
    /// Commits `files` (`(path in repo, local file)`) with LFS for the files the Hub asks it for;
    /// a conflicting commit (HTTP 409) is retried with backoff. Returns the commit attempts.
    pub(super) fn commit_files(
        &self,
        files: &[(String, PathBuf)],
        message: &str,
        bar: Option<&ProgressBar>,
    ) -> Result<u32> {
        let uploads = files
            .iter()
            .map(|(path, local)| Upload::prepare(path, local))
            .collect::<Result<Vec<_>>>()?;
        let modes = self.preupload(&uploads)?;
        let lfs: Vec<&Upload> = uploads
            .iter()
            .filter(|u| u.size > 0 && modes.get(&u.path_in_repo).map(String::as_str) == Some("lfs"))
            .collect();
        if !lfs.is_empty() {
            self.upload_lfs(&lfs, bar)?;
        }
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=self.options.commit_attempts.max(1) {
            match self.post_commit(&uploads, &modes, message) {
                Err(CompileCacheError::Conflict { .. })
                    if attempt < self.options.commit_attempts =>
                {
                    warn!(
                        repo = self.repo_id,
                        attempt, "commit conflict, retrying in {delay:?}"
                    );
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(CompileCacheError::Conflict { repo, .. }) => {
                    return Err(CompileCacheError::Conflict {
                        repo,
                        attempts: attempt,
                    });
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(attempt),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Asks the preupload endpoint how each file is to be uploaded (`regular` or `lfs`).
    fn preupload(&self, uploads: &[Upload]) -> Result<BTreeMap<String, String>> {
        let api = &self.api;
        let url = format!(
            "{}/api/models/{}/preupload/main",
            api.endpoint, self.repo_id
        );
        let mut modes = BTreeMap::new();
        for chunk in uploads.chunks(FILES_PER_REQUEST) {
            let files: Vec<Value> = chunk
                .iter()
                .map(|u| json!({"path": u.path_in_repo, "size": u.size, "sample": base64(&u.sample)}))
                .collect();
            let answer = api.post_json(
                &self.repo_id,
                "preupload",
                &url,
                &json!({"files": files}),
                false,
            )?;
            let malformed = || self.malformed("preupload", &answer);
            for file in answer["files"].as_array().ok_or_else(malformed)? {
                let (Some(path), Some(mode @ ("lfs" | "regular"))) =
                    (file["path"].as_str(), file["uploadMode"].as_str())
                else {
                    return Err(malformed());
                };
                modes.insert(path.to_owned(), mode.to_owned());
            }
        }
        for upload in uploads {
            if !modes.contains_key(&upload.path_in_repo) {
                return Err(self.malformed("preupload (a file is missing)", &Value::Null));
            }
        }
        Ok(modes)
    }

    /// The LFS batch request, then each object's upload and verify actions.
    fn upload_lfs(&self, lfs: &[&Upload], bar: Option<&ProgressBar>) -> Result<()> {
        let api = &self.api;
        let url = format!(
            "{}/{}.git/info/lfs/objects/batch",
            api.endpoint, self.repo_id
        );
        for chunk in lfs.chunks(FILES_PER_REQUEST) {
            let objects: Vec<Value> = chunk
                .iter()
                .map(|u| json!({"oid": u.sha256, "size": u.size}))
                .collect();
            let body = json!({
                "operation": "upload",
                "transfers": ["basic", "multipart"],
                "objects": objects,
                "hash_algo": "sha256",
                "ref": {"name": "main"},
            });
            let answer = api.post_json(&self.repo_id, "LFS batch", &url, &body, true)?;
            let listed = answer["objects"]
                .as_array()
                .ok_or_else(|| self.malformed("LFS batch", &answer))?;
            for upload in chunk {
                let object = listed
                    .iter()
                    .find(|o| o["oid"].as_str() == Some(upload.sha256.as_str()))
                    .ok_or_else(|| self.malformed("LFS batch (an object is missing)", &answer))?;
                self.upload_object(upload, object, bar)?;
            }
        }
        Ok(())
    }

    /// One object of the batch answer: an error, nothing to do, or upload (+ verify).
    fn upload_object(
        &self,
        upload: &Upload,
        object: &Value,
        bar: Option<&ProgressBar>,
    ) -> Result<()> {
        let what = format!("LFS upload of {}", upload.path_in_repo);
        let _span = info_span!(
            "hub_lfs_upload",
            file = upload.path_in_repo,
            bytes = upload.size
        )
        .entered();
        if let Some(error) = object.get("error") {
            return Err(CompileCacheError::Hub {
                what,
                detail: format!(
                    "the LFS batch API refused it: {} (code {})",
                    error["message"].as_str().unwrap_or("no message"),
                    error["code"]
                ),
            });
        }
        let Some(actions) = object.get("actions").filter(|a| !a.is_null()) else {
            debug!(file = upload.path_in_repo, "already in LFS storage");
            if let Some(bar) = bar {
                bar.inc(upload.size);
            }
            return Ok(());
        };
        let action = |name: &str| -> Result<Option<(String, BTreeMap<String, String>)>> {
            let Some(a) = actions.get(name).filter(|a| !a.is_null()) else {
                return Ok(None);
            };
            let href = a["href"]
                .as_str()
                .ok_or_else(|| self.malformed(&what, object))?;
            let header = match a.get("header") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(Value::Object(map)) => map
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), v)
                    })
                    .collect(),
                Some(_) => return Err(self.malformed(&what, object)),
            };
            Ok(Some((self.api.fix_endpoint(href), header)))
        };
        let (href, header) = action("upload")?.ok_or_else(|| self.malformed(&what, object))?;
        match header.get("chunk_size") {
            Some(chunk) => {
                let chunk: u64 = chunk
                    .parse()
                    .ok()
                    .filter(|&c| c > 0)
                    .ok_or_else(|| self.malformed(&what, object))?;
                self.upload_parts(upload, &href, &header, chunk, bar, &what)?;
            }
            None => self.upload_whole(upload, &href, &header, bar, &what)?,
        }
        if let Some((verify, header)) = action("verify")? {
            let api = &self.api;
            let body = serde_json::to_vec(&json!({"oid": upload.sha256, "size": upload.size}))
                .expect("JSON values serialize");
            let response = api.send(&what, || {
                let mut request = self
                    .api
                    .http
                    .post(&verify)
                    .timeout(api.deadline(0))
                    .header("Content-Type", LFS_MEDIA_TYPE)
                    .header("Accept", LFS_MEDIA_TYPE)
                    .body(body.clone());
                if api.is_hub(&verify) {
                    request = api.authorized(request);
                }
                Ok(with_headers(request, &header))
            })?;
            check(&self.repo_id, &format!("{what} (verify)"), response)?;
        }
        Ok(())
    }

    /// `basic`: the whole file in one `PUT`.
    fn upload_whole(
        &self,
        upload: &Upload,
        href: &str,
        header: &BTreeMap<String, String>,
        bar: Option<&ProgressBar>,
        what: &str,
    ) -> Result<()> {
        let response = self.api.send(what, || {
            let file = File::open(&upload.local).map_err(io_err(&upload.local))?;
            let body = Body::sized(Counted::new(file, bar), upload.size);
            let mut request = self
                .api
                .http
                .put(href)
                .timeout(self.api.deadline(upload.size))
                .body(body);
            if self.api.is_hub(href) {
                request = self.api.authorized(request);
            }
            Ok(with_headers(request, header))
        })?;
        check(&self.repo_id, what, response).map(drop)
    }

    /// `multipart`: one `PUT` per part to the numbered URLs, then the completion `POST` with
    /// each part's ETag.
    fn upload_parts(
        &self,
        upload: &Upload,
        href: &str,
        header: &BTreeMap<String, String>,
        chunk: u64,
        bar: Option<&ProgressBar>,
        what: &str,
    ) -> Result<()> {
        let mut parts: Vec<(u64, &String)> = header
            .iter()
            .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
            .collect();
        parts.sort();
        if parts.len() as u64 != upload.size.div_ceil(chunk) {
            return Err(CompileCacheError::Hub {
                what: what.to_owned(),
                detail: format!(
                    "the Hub sent {} part URLs for {} bytes in parts of {chunk}",
                    parts.len(),
                    upload.size
                ),
            });
        }
        let mut etags = Vec::with_capacity(parts.len());
        for (index, (_, url)) in parts.iter().enumerate() {
            let url = self.api.fix_endpoint(url);
            let offset = index as u64 * chunk;
            let len = chunk.min(upload.size - offset);
            let response = self.api.send(what, || {
                let mut file = File::open(&upload.local).map_err(io_err(&upload.local))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(io_err(&upload.local))?;
                let body = Body::sized(Counted::new(file.take(len), bar), len);
                Ok(self
                    .api
                    .http
                    .put(&url)
                    .timeout(self.api.deadline(len))
                    .body(body))
            })?;
            let response = check(&self.repo_id, what, response)?;
            let etag = response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .filter(|e| !e.is_empty())
                .ok_or_else(|| CompileCacheError::Hub {
                    what: what.to_owned(),
                    detail: format!("part {} came back without an ETag", index + 1),
                })?;
            etags.push(json!({"partNumber": index + 1, "etag": etag}));
        }
        let body = serde_json::to_vec(&json!({"oid": upload.sha256, "parts": etags}))
            .expect("JSON values serialize");
        let response = self.api.send(what, || {
            Ok(self
                .api
                .http
                .post(href)
                .timeout(self.api.deadline(0))
                .header("Content-Type", LFS_MEDIA_TYPE)
                .header("Accept", LFS_MEDIA_TYPE)
                .body(body.clone()))
        })?;
        check(&self.repo_id, &format!("{what} (completion)"), response).map(drop)
    }

    /// The NDJSON commit: regular files inline, LFS files by SHA-256.
    fn post_commit(
        &self,
        uploads: &[Upload],
        modes: &BTreeMap<String, String>,
        message: &str,
    ) -> Result<()> {
        let mut body = Vec::new();
        let mut line = |value: Value| {
            body.extend(serde_json::to_vec(&value).expect("JSON values serialize"));
            body.push(b'\n');
        };
        line(json!({"key": "header", "value": {"summary": message, "description": ""}}));
        for upload in uploads {
            if upload.size > 0 && modes.get(&upload.path_in_repo).map(String::as_str) == Some("lfs")
            {
                line(json!({"key": "lfsFile", "value": {
                    "path": upload.path_in_repo, "algo": "sha256",
                    "oid": upload.sha256, "size": upload.size}}));
            } else {
                let bytes = std::fs::read(&upload.local).map_err(io_err(&upload.local))?;
                line(json!({"key": "file", "value": {
                    "content": base64(&bytes), "path": upload.path_in_repo,
                    "encoding": "base64"}}));
            }
        }
        let api = &self.api;
        let url = format!("{}/api/models/{}/commit/main", api.endpoint, self.repo_id);
        let response = api.send("commit", || {
            Ok(api
                .authorized(api.http.post(&url))
                .timeout(api.deadline(body.len() as u64))
                .header("Content-Type", "application/x-ndjson")
                .body(body.clone()))
        })?;
        read_json(&self.repo_id, "commit", response).map(drop)
    }

    fn malformed(&self, what: &str, answer: &Value) -> CompileCacheError {
        // At most 300 characters of the answer (a byte cut could split a character).
        let shown: String = answer.to_string().chars().take(300).collect();
        CompileCacheError::Hub {
            what: format!("{what} in {}", self.repo_id),
            detail: format!("malformed answer: {shown}"),
        }
    }
}

/// The request with `header`'s fields added.
fn with_headers(mut request: RequestBuilder, header: &BTreeMap<String, String>) -> RequestBuilder {
    for (k, v) in header {
        request = request.header(k.as_str(), v.as_str());
    }
    request
}

/// The response if it succeeded, else the typed error its status means.
fn check(repo: &str, what: &str, response: Response) -> Result<Response> {
    let status = response.status().as_u16();
    if response.status().is_success() {
        return Ok(response);
    }
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let message = header("x-error-message");
    let mut raw = Vec::new();
    let _ = response.take(4096).read_to_end(&mut raw);
    let body = String::from_utf8_lossy(&raw).into_owned();
    let detail = message.unwrap_or_else(|| {
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body)
    });
    Err(match status {
        401 => CompileCacheError::Unauthorized {
            repo: repo.to_owned(),
        },
        403 => CompileCacheError::Forbidden {
            repo: repo.to_owned(),
            detail,
        },
        404 => CompileCacheError::NotFound {
            what: format!("{what} in {repo}: {detail}"),
        },
        409 => CompileCacheError::Conflict {
            repo: repo.to_owned(),
            attempts: 1,
        },
        _ => CompileCacheError::Hub {
            what: format!("{what} in {repo}"),
            detail: format!("HTTP {status}: {detail}"),
        },
    })
}

/// A successful answer's JSON (at most [`MAX_ANSWER_BYTES`]).
fn read_json(repo: &str, what: &str, response: Response) -> Result<Value> {
    let response = check(repo, what, response)?;
    let mut bytes = Vec::new();
    response
        .take(MAX_ANSWER_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CompileCacheError::Hub {
            what: format!("{what} in {repo}"),
            detail: e.to_string(),
        })?;
    if bytes.len() as u64 > MAX_ANSWER_BYTES {
        return Err(CompileCacheError::TooLarge {
            what: format!("the answer to {what} in {repo}"),
            size: bytes.len() as u64,
            limit: MAX_ANSWER_BYTES,
        });
    }
    serde_json::from_slice(&bytes).map_err(|source| CompileCacheError::Json {
        what: format!("the answer to {what} in {repo}"),
        source,
    })
}

/// A reader that advances a progress bar.
struct Counted<R> {
    inner: R,
    bar: Option<ProgressBar>,
}

impl<R> Counted<R> {
    fn new(inner: R, bar: Option<&ProgressBar>) -> Self {
        Self {
            inner,
            bar: bar.cloned(),
        }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        }
        Ok(n)
    }
}

/// Standard base64 with padding (RFC 4648), as the commit API takes inline files.
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (&[0xff, 0xfe, 0x00], "//4A"),
        ] {
            assert_eq!(base64(input), want);
        }
    }
}
