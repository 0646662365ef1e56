//! A Hugging Face Hub-compatible HTTP server on loopback, for tests (the real Hub is unreachable).
//!
//! It implements what `hf-hub` and Python's `huggingface_hub` use for a compile cache: whoami,
//! repo create/info, tree listing (git blob ids, LFS sums), file resolve (HEAD/GET, one byte
//! range), preupload + NDJSON commit (inline base64 files, LFS files, deletions), the Git LFS
//! upload flow (preupload answers `lfs` from a size threshold; the batch endpoint answers
//! `basic` or, above a part size, `multipart` actions with a `verify` action; the upload URLs
//! store objects after checking their SHA-256; a commit may name only uploaded objects and may not
//! inline a file that belongs in LFS), bearer tokens with read/write roles, and the
//! 401/403/404/409/416 answers of the Hub. Faults (status codes, stalls, dropped connections, replaced bodies) can be
//! injected per path. Its fidelity is checked by `xtask/goldens/compile_cache.py`, which drives
//! the official Python client through it (`examples/loopback_hub.rs` serves it standalone).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Files at least this large are listed with `lfs` metadata, like the Hub.
pub const LFS_THRESHOLD: usize = 10 << 20;

/// What a token may do.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub user: String,
    pub write: bool,
}

/// A stored file with its SHA-256 and git object id, computed once (the Hub serves
/// precomputed digests too).
#[derive(Debug)]
pub struct Blob {
    pub bytes: Vec<u8>,
    pub sha256: String,
    /// Stored in LFS (listed with `lfs` metadata).
    pub lfs: bool,
    /// What the tree listing's `oid` is on the Hub: the git blob id of the bytes, or for a file
    /// in LFS of its pointer file ([`Blob::lfs_pointer`]).
    pub git_oid: String,
}

impl Blob {
    /// A file put in place directly: in LFS from [`LFS_THRESHOLD`] bytes, as the Hub stores it.
    fn new(bytes: Vec<u8>) -> Arc<Self> {
        let lfs = bytes.len() >= LFS_THRESHOLD;
        Self::stored(bytes, lfs)
    }

    fn stored(bytes: Vec<u8>, lfs: bool) -> Arc<Self> {
        let sha256 = sha256_hex(&bytes);
        let git_oid = if lfs {
            git_blob_id(lfs_pointer(&sha256, bytes.len()).as_bytes())
        } else {
            git_blob_id(&bytes)
        };
        Arc::new(Self {
            bytes,
            sha256,
            lfs,
            git_oid,
        })
    }
}

/// The git-lfs pointer file git stores for a file in LFS.
pub fn lfs_pointer(sha256: &str, size: usize) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

/// Git's blob id: SHA-1 of `blob LEN\0` and the bytes.
pub fn git_blob_id(bytes: &[u8]) -> String {
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A repository: private flag, files and head commit.
#[derive(Debug, Clone, Default)]
pub struct Repo {
    pub private: bool,
    pub files: BTreeMap<String, Arc<Blob>>,
    pub commit: String,
    pub commits: u32,
}

/// An injected failure.
#[derive(Debug, Clone)]
pub enum FaultKind {
    /// Answer with this status and a JSON error body.
    Status(u16),
    /// Send the headers and this many body bytes, then close the connection.
    DropAfter(usize),
    /// Send nothing for this long (then close).
    Stall(Duration),
    /// Answer 200 with this body instead.
    Body(String),
}

/// A failure applied to requests whose method matches and path contains a string.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Option<String>,
    pub path_contains: String,
    pub kind: FaultKind,
    /// How many requests it applies to (`u32::MAX`: all).
    pub times: u32,
}

/// How the server sorts uploads into LFS.
#[derive(Debug, Clone, Copy)]
pub struct LfsPolicy {
    /// Files at least this large are `lfs` in the preupload answer, and refused inline.
    pub threshold: usize,
    /// Objects larger than this are uploaded in parts of this size (`multipart`).
    pub part_size: Option<usize>,
}

impl Default for LfsPolicy {
    fn default() -> Self {
        Self {
            threshold: LFS_THRESHOLD,
            part_size: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub repos: HashMap<String, Repo>,
    pub lfs: LfsPolicy,
    /// LFS objects uploaded, by SHA-256.
    pub lfs_objects: HashMap<String, Arc<Blob>>,
    /// Parts of multipart uploads in progress, by SHA-256 and part number.
    pub lfs_parts: HashMap<(String, usize), Vec<u8>>,
    /// SHA-256 of the objects whose `verify` action was called.
    pub lfs_verified: Vec<String>,
    pub tokens: HashMap<String, TokenInfo>,
    pub faults: Vec<Fault>,
    /// `METHOD path` of every request, in order.
    pub log: Vec<String>,
    /// `Authorization` headers seen (to check what clients send).
    pub auth_seen: Vec<String>,
    /// `Range` headers of file downloads, as `path range`.
    pub ranges_seen: Vec<String>,
}

/// The running server; stops on drop.
pub struct HubServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub const WRITE_TOKEN: &str = "hf_write_token_for_tests";
pub const READ_TOKEN: &str = "hf_read_token_for_tests";

impl HubServer {
    /// Starts on 127.0.0.1 with an ephemeral port; `alice` has a write token, `bob` a read token.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        {
            let mut s = state.lock().unwrap();
            s.tokens.insert(
                WRITE_TOKEN.into(),
                TokenInfo {
                    user: "alice".into(),
                    write: true,
                },
            );
            s.tokens.insert(
                READ_TOKEN.into(),
                TokenInfo {
                    user: "bob".into(),
                    write: false,
                },
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || {
                        let _ = handle(conn, addr, &state);
                    });
                }
            })
        };
        Self {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a repo directly (owner/name).
    pub fn add_repo(&self, id: &str, private: bool) {
        self.state.lock().unwrap().repos.insert(
            id.into(),
            Repo {
                private,
                commit: fake_sha(id.as_bytes()),
                ..Default::default()
            },
        );
    }

    /// Puts a file directly into a repo.
    pub fn put_file(&self, repo: &str, path: &str, bytes: Vec<u8>) {
        let mut s = self.state.lock().unwrap();
        let r = s.repos.get_mut(repo).expect("repo exists");
        r.files.insert(path.into(), Blob::new(bytes));
    }

    /// A file's bytes, if present.
    pub fn file(&self, repo: &str, path: &str) -> Option<Arc<Vec<u8>>> {
        let s = self.state.lock().unwrap();
        Some(Arc::new(s.repos.get(repo)?.files.get(path)?.bytes.clone()))
    }

    /// Paths of a repo's files.
    pub fn paths(&self, repo: &str) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.repos
            .get(repo)
            .map(|r| r.files.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Sets the size from which uploads go to LFS and the part size of multipart uploads.
    pub fn set_lfs(&self, threshold: usize, part_size: Option<usize>) {
        self.state.lock().unwrap().lfs = LfsPolicy {
            threshold,
            part_size,
        };
    }

    /// Whether `path` in `repo` is stored in LFS.
    pub fn is_lfs(&self, repo: &str, path: &str) -> bool {
        let s = self.state.lock().unwrap();
        s.repos
            .get(repo)
            .and_then(|r| r.files.get(path))
            .is_some_and(|b| b.lfs)
    }

    /// How many commits `repo` has received.
    pub fn commits(&self, repo: &str) -> u32 {
        self.state
            .lock()
            .unwrap()
            .repos
            .get(repo)
            .map_or(0, |r| r.commits)
    }

    /// Injects a fault.
    pub fn fault(&self, method: Option<&str>, path_contains: &str, kind: FaultKind, times: u32) {
        self.state.lock().unwrap().faults.push(Fault {
            method: method.map(str::to_owned),
            path_contains: path_contains.into(),
            kind,
            times,
        });
    }

    /// Removes all faults.
    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// The request log.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fake_sha(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().take(20).map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: Value) -> Self {
        Self {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: serde_json::to_vec(&value).unwrap(),
        }
    }
    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut r = Self::json(status, json!({ "error": message }));
        r.headers.push(("X-Error-Code".into(), code.into()));
        r.headers.push(("X-Error-Message".into(), message.into()));
        r
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = Vec::new();
    if let Some(len) = headers.get("content-length") {
        let len: usize = len.parse().unwrap_or(0);
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target, String::new()),
    };
    Ok(Some(Request {
        method,
        path,
        query,
        headers,
        body,
    }))
}

fn handle(conn: TcpStream, base: SocketAddr, state: &Mutex<State>) -> std::io::Result<()> {
    // Head and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms.
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let Some(req) = read_request(&mut reader)? else {
        return Ok(());
    };
    let fault = {
        let mut s = state.lock().unwrap();
        s.log.push(format!("{} {}", req.method, req.path));
        if let Some(a) = req.headers.get("authorization") {
            s.auth_seen.push(a.clone());
        }
        let mut hit = None;
        for f in s.faults.iter_mut() {
            if f.times > 0
                && f.method.as_deref().is_none_or(|m| m == req.method)
                && req.path.contains(&f.path_contains)
            {
                if f.times != u32::MAX {
                    f.times -= 1;
                }
                hit = Some(f.kind.clone());
                break;
            }
        }
        hit
    };
    let mut resp = match &fault {
        Some(FaultKind::Status(code)) => {
            Response::error(*code, "Injected", &format!("injected HTTP {code}"))
        }
        Some(FaultKind::Stall(d)) => {
            std::thread::sleep(*d);
            return Ok(());
        }
        Some(FaultKind::Body(body)) => Response {
            status: 200,
            headers: vec![],
            body: body.clone().into_bytes(),
        },
        _ => route(&req, base, state),
    };
    let head_only = req.method == "HEAD";
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    let len = resp.body.len();
    if !resp.headers.iter().any(|(k, _)| k == "Content-Length") {
        resp.headers
            .push(("Content-Length".into(), len.to_string()));
    }
    resp.headers.push(("Connection".into(), "close".into()));
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if head_only {
        return out.flush();
    }
    match fault {
        Some(FaultKind::DropAfter(n)) => {
            out.write_all(&resp.body[..n.min(len)])?;
            out.flush()?;
            let _ = out.shutdown(std::net::Shutdown::Both);
            Ok(())
        }
        _ => {
            out.write_all(&resp.body)?;
            out.flush()
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        416 => "Range Not Satisfiable",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        _ => "Status",
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Who is calling: `None` without a token, `Err` for an unknown token.
fn caller(req: &Request, state: &State) -> Result<Option<TokenInfo>, Response> {
    match req.headers.get("authorization") {
        None => Ok(None),
        Some(v) => {
            let token = v.strip_prefix("Bearer ").unwrap_or(v);
            state.tokens.get(token).cloned().map(Some).ok_or_else(|| {
                Response::error(
                    401,
                    "InvalidToken",
                    "Invalid credentials in Authorization header",
                )
            })
        }
    }
}

fn can_read(repo: &Repo, id: &str, who: &Option<TokenInfo>) -> bool {
    !repo.private
        || who
            .as_ref()
            .is_some_and(|t| id.starts_with(&format!("{}/", t.user)))
}

fn route(req: &Request, base: SocketAddr, state: &Mutex<State>) -> Response {
    let mut s = state.lock().unwrap();
    let who = match caller(req, &s) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let segs: Vec<String> = req.path.split('/').skip(1).map(percent_decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let not_found_repo = |who: &Option<TokenInfo>| {
        if who.is_none() {
            Response::error(
                401,
                "RepoNotFound",
                "Repository not found (authentication required)",
            )
        } else {
            Response::error(404, "RepoNotFound", "Repository not found")
        }
    };
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["api", "whoami-v2"]) => match who {
            None => Response::error(401, "Unauthorized", "Invalid username or password."),
            Some(t) => Response::json(
                200,
                json!({"type": "user", "name": t.user, "fullname": t.user, "orgs": [],
                       "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": if t.write {"write"} else {"read"}}}}),
            ),
        },
        ("POST", ["api", "repos", "create"]) => {
            let Some(t) = who else {
                return Response::error(401, "Unauthorized", "You must be authenticated");
            };
            if !t.write {
                return Response::error(403, "Forbidden", "token has read access only");
            }
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let name = body["name"].as_str().unwrap_or("");
            let org = body["organization"].as_str().unwrap_or(&t.user);
            if org != t.user {
                return Response::error(
                    403,
                    "Forbidden",
                    "You don't have the rights to create a model under this namespace",
                );
            }
            let id = format!("{org}/{name}");
            if s.repos.contains_key(&id) {
                return Response::json(
                    409,
                    json!({"error": "You already created this model repo", "url": format!("http://{base}/{id}")}),
                );
            }
            s.repos.insert(
                id.clone(),
                Repo {
                    // hf-hub sends `private: bool`; huggingface_hub 1.x+ sends `visibility`.
                    private: body["private"].as_bool().unwrap_or(false)
                        || body["visibility"].as_str() == Some("private"),
                    commit: fake_sha(id.as_bytes()),
                    ..Default::default()
                },
            );
            Response::json(
                200,
                json!({"url": format!("http://{base}/{id}"), "name": id, "id": id}),
            )
        }
        ("GET", ["api", "models", org, name, rest @ ..]) => {
            let id = format!("{org}/{name}");
            let Some(repo) = s.repos.get(&id) else {
                return not_found_repo(&who);
            };
            if !can_read(repo, &id, &who) {
                return not_found_repo(&who);
            }
            match rest {
                [] | ["revision", _] => Response::json(
                    200,
                    json!({"id": id, "modelId": id, "_id": id, "author": org, "private": repo.private,
                           "sha": repo.commit, "disabled": false, "gated": false, "downloads": 0, "likes": 0,
                           "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
                           "siblings": repo.files.keys().map(|p| json!({"rfilename": p})).collect::<Vec<_>>()}),
                ),
                ["tree", _rev, path @ ..] => {
                    let prefix = path.join("/");
                    let recursive = req.query.split('&').any(|q| {
                        q == "recursive=true" || q == "recursive=True" || q == "recursive=1"
                    });
                    tree(repo, &prefix, recursive)
                }
                _ => Response::error(404, "NotFound", "unknown endpoint"),
            }
        }
        ("POST", ["api", "models", org, name, op, _rev])
            if *op == "preupload" || *op == "commit" =>
        {
            let id = format!("{org}/{name}");
            let Some(repo) = s.repos.get(&id) else {
                return not_found_repo(&who);
            };
            if !can_read(repo, &id, &who) {
                return not_found_repo(&who);
            }
            let Some(t) = &who else {
                return Response::error(401, "Unauthorized", "authentication required");
            };
            if !t.write || !id.starts_with(&format!("{}/", t.user)) {
                return Response::error(
                    403,
                    "Forbidden",
                    "You don't have write access to this repo",
                );
            }
            if *op == "preupload" {
                let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                let files: Vec<Value> = body["files"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|f| {
                        let size = f["size"].as_u64().unwrap_or(0) as usize;
                        let mode = if size > 0 && size >= s.lfs.threshold { "lfs" } else { "regular" };
                        json!({"path": f["path"], "uploadMode": mode, "shouldIgnore": false, "oid": null})
                    })
                    .collect();
                return Response::json(200, json!({"files": files, "commitOid": repo.commit}));
            }
            let threshold = s.lfs.threshold;
            let lfs_objects = s.lfs_objects.clone();
            let repo = s.repos.get_mut(&id).unwrap();
            let mut summary = String::new();
            // A commit applies all its operations or none, like the Hub's.
            let mut files = repo.files.clone();
            for line in req.body.split(|b| *b == b'\n') {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<Value>(line) else {
                    return Response::error(400, "BadRequest", "invalid NDJSON line");
                };
                let path = v["value"]["path"].as_str().unwrap_or("").to_owned();
                let bad_path = path.is_empty()
                    || path.starts_with('/')
                    || path.split('/').any(|p| p == ".." || p.is_empty());
                match v["key"].as_str() {
                    Some("header") => summary = v["value"]["summary"].as_str().unwrap_or("").into(),
                    Some("file") => {
                        let Some(bytes) =
                            base64_decode(v["value"]["content"].as_str().unwrap_or(""))
                        else {
                            return Response::error(400, "BadRequest", "invalid base64");
                        };
                        if bad_path {
                            return Response::error(400, "BadRequest", "invalid path");
                        }
                        if bytes.len() >= threshold {
                            return Response::error(
                                400,
                                "BadRequest",
                                &format!(
                                    "{path} is {} bytes: files of {} bytes or more must be uploaded with LFS",
                                    bytes.len(),
                                    threshold
                                ),
                            );
                        }
                        files.insert(path, Blob::stored(bytes, false));
                    }
                    // A file uploaded to LFS before, named by its SHA-256.
                    Some("lfsFile") => {
                        let oid = v["value"]["oid"].as_str().unwrap_or("");
                        let Some(blob) = lfs_objects.get(oid) else {
                            return Response::error(
                                400,
                                "BadRequest",
                                &format!("LFS object {oid} of {path} was never uploaded"),
                            );
                        };
                        let size = v["value"]["size"].as_u64();
                        if bad_path
                            || v["value"]["algo"] != "sha256"
                            || size.is_some_and(|n| n as usize != blob.bytes.len())
                        {
                            return Response::error(400, "BadRequest", "invalid lfsFile entry");
                        }
                        files.insert(path, blob.clone());
                    }
                    // `huggingface_hub`'s CommitOperationDelete of a file (hf-hub sends one per
                    // file); deleting a missing file fails the whole commit with a 404.
                    Some("deletedFile") => {
                        if files.remove(&path).is_none() {
                            return Response::error(
                                404,
                                "EntryNotFound",
                                &format!("cannot delete {path}: entry not found"),
                            );
                        }
                    }
                    // CommitOperationDelete of a folder (`path` ending in `/` or not): every
                    // file under it.
                    Some("deletedFolder") => {
                        let prefix = format!("{}/", path.trim_end_matches('/'));
                        let before = files.len();
                        files.retain(|p, _| !p.starts_with(&prefix));
                        if files.len() == before {
                            return Response::error(
                                404,
                                "EntryNotFound",
                                &format!("cannot delete folder {path}: entry not found"),
                            );
                        }
                    }
                    other => {
                        return Response::error(
                            400,
                            "BadRequest",
                            &format!("unsupported commit key {other:?}"),
                        );
                    }
                }
            }
            repo.files = files;
            repo.commits += 1;
            repo.commit = fake_sha(format!("{}{}{summary}", repo.commit, repo.commits).as_bytes());
            Response::json(
                200,
                json!({"commitUrl": format!("http://{base}/{id}/commit/{}", repo.commit), "commitOid": repo.commit,
                       "commitMessage": summary, "pullRequestUrl": null, "success": true}),
            )
        }
        (
            "POST",
            [
                org,
                repo_git,
                "info",
                "lfs",
                "objects",
                op @ ("batch" | "verify"),
            ],
        ) => {
            let Some(name) = repo_git.strip_suffix(".git") else {
                return Response::error(404, "NotFound", "not a git endpoint");
            };
            let id = format!("{org}/{name}");
            let Some(repo) = s.repos.get(&id) else {
                return not_found_repo(&who);
            };
            if !can_read(repo, &id, &who) {
                return not_found_repo(&who);
            }
            let Some(t) = &who else {
                return Response::error(401, "Unauthorized", "authentication required");
            };
            if !t.write || !id.starts_with(&format!("{}/", t.user)) {
                return Response::error(
                    403,
                    "Forbidden",
                    "You don't have write access to this repo",
                );
            }
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return Response::error(400, "BadRequest", "invalid JSON");
            };
            if *op == "verify" {
                let oid = body["oid"].as_str().unwrap_or("");
                let size = body["size"].as_u64();
                return match s.lfs_objects.get(oid) {
                    Some(blob) if size == Some(blob.bytes.len() as u64) => {
                        s.lfs_verified.push(oid.to_owned());
                        Response::json(200, json!({"success": true}))
                    }
                    _ => Response::error(404, "NotFound", &format!("LFS object {oid} not found")),
                };
            }
            lfs_batch(&s, base, &id, &body)
        }
        ("PUT", ["lfs-upload", oid]) => {
            if sha256_hex(&req.body) != *oid {
                return Response::error(
                    400,
                    "BadRequest",
                    "the body does not hash to the object id",
                );
            }
            s.lfs_objects
                .insert((*oid).to_owned(), Blob::stored(req.body.clone(), true));
            Response::json(200, json!({}))
        }
        ("PUT", ["lfs-upload", oid, "part", number]) => {
            let Ok(number) = number.parse::<usize>() else {
                return Response::error(400, "BadRequest", "bad part number");
            };
            let etag = format!("\"{}\"", &sha256_hex(&req.body)[..32]);
            s.lfs_parts
                .insert(((*oid).to_owned(), number), req.body.clone());
            let mut r = Response::json(200, json!({}));
            r.headers.push(("ETag".into(), etag));
            r
        }
        // Completion of a multipart upload: the parts in order, each with the ETag it got.
        ("POST", ["lfs-upload", oid]) => {
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return Response::error(400, "BadRequest", "invalid JSON");
            };
            let parts = body["parts"].as_array().cloned().unwrap_or_default();
            let mut bytes = Vec::new();
            for (i, part) in parts.iter().enumerate() {
                let key = ((*oid).to_owned(), i + 1);
                let Some(data) = s.lfs_parts.get(&key) else {
                    return Response::error(400, "BadRequest", &format!("part {} missing", i + 1));
                };
                let etag = format!("\"{}\"", &sha256_hex(data)[..32]);
                if part["partNumber"].as_u64() != Some(i as u64 + 1)
                    || part["etag"] != etag.as_str()
                {
                    return Response::error(
                        400,
                        "BadRequest",
                        &format!("part {} does not match", i + 1),
                    );
                }
                bytes.extend_from_slice(data);
            }
            if body["oid"] != *oid || sha256_hex(&bytes) != *oid {
                return Response::error(
                    400,
                    "BadRequest",
                    "the parts do not hash to the object id",
                );
            }
            s.lfs_parts.retain(|(o, _), _| o != oid);
            s.lfs_objects
                .insert((*oid).to_owned(), Blob::stored(bytes, true));
            Response::json(200, json!({}))
        }
        ("GET" | "HEAD", [org, name, "resolve", _rev, path @ ..]) => {
            if let Some(range) = req.headers.get("range") {
                let seen = format!("{} {range}", path.join("/"));
                s.ranges_seen.push(seen);
            }
            let id = format!("{org}/{name}");
            let Some(repo) = s.repos.get(&id) else {
                return not_found_repo(&who);
            };
            if !can_read(repo, &id, &who) {
                return not_found_repo(&who);
            }
            let path = path.join("/");
            let Some(blob) = repo.files.get(&path) else {
                let mut r = Response::error(404, "EntryNotFound", "Entry not found");
                r.headers
                    .push(("X-Repo-Commit".into(), repo.commit.clone()));
                return r;
            };
            let etag = blob.sha256.clone();
            let mut headers = vec![
                ("Content-Type".into(), "application/octet-stream".into()),
                ("ETag".into(), format!("\"{etag}\"")),
                ("X-Repo-Commit".into(), repo.commit.clone()),
                ("Accept-Ranges".into(), "bytes".into()),
            ];
            if req.method == "HEAD" {
                headers.push(("Content-Length".into(), blob.bytes.len().to_string()));
                Response {
                    status: 200,
                    headers,
                    body: Vec::new(),
                }
            } else if let Some(range) = req.headers.get("range") {
                // One `bytes=FIRST-[LAST]` range, as the Hub (and its CDN) serve it.
                let len = blob.bytes.len();
                let parsed = range.strip_prefix("bytes=").and_then(|r| {
                    let (first, last) = r.split_once('-')?;
                    let first: usize = first.trim().parse().ok()?;
                    let last = match last.trim() {
                        "" => usize::MAX,
                        l => l.parse().ok()?,
                    };
                    Some((first, last))
                });
                match parsed {
                    Some((first, last)) if first < len && first <= last => {
                        let end = last.min(len - 1);
                        headers
                            .push(("Content-Range".into(), format!("bytes {first}-{end}/{len}")));
                        Response {
                            status: 206,
                            headers,
                            body: blob.bytes[first..=end].to_vec(),
                        }
                    }
                    _ => Response {
                        status: 416,
                        headers: vec![("Content-Range".into(), format!("bytes */{len}"))],
                        body: Vec::new(),
                    },
                }
            } else {
                Response {
                    status: 200,
                    headers,
                    body: blob.bytes.clone(),
                }
            }
        }
        _ => Response::error(
            404,
            "NotFound",
            &format!("no route for {} {}", req.method, req.path),
        ),
    }
}

/// The LFS batch API's answer to an upload request: per object, nothing when it is stored
/// already, an error when its id or size is invalid, else an upload action (whole, or in parts
/// above the part size, with the completion URL) and a verify action.
fn lfs_batch(s: &State, base: SocketAddr, id: &str, body: &Value) -> Response {
    if body["operation"] != "upload" {
        return Response::error(422, "Unprocessable", "only uploads are supported");
    }
    let offered = |t: &str| {
        body["transfers"]
            .as_array()
            .is_some_and(|ts| ts.iter().any(|x| x == t))
    };
    if !offered("basic") {
        return Response::error(422, "Unprocessable", "no supported transfer (basic)");
    }
    let Some(objects) = body["objects"].as_array() else {
        return Response::error(422, "Unprocessable", "objects missing");
    };
    let mut multipart = false;
    let mut answers = Vec::new();
    for object in objects {
        let oid = object["oid"].as_str().unwrap_or("");
        let size = object["size"].as_u64();
        let valid = oid.len() == 64 && oid.bytes().all(|b| b.is_ascii_hexdigit());
        let Some(size) = size.filter(|_| valid) else {
            answers.push(
                json!({"oid": oid, "size": object["size"].as_u64().unwrap_or(0),
                "error": {"code": 422, "message": "invalid object id or size"}}),
            );
            continue;
        };
        if s.lfs_objects
            .get(oid)
            .is_some_and(|b| b.bytes.len() as u64 == size)
        {
            answers.push(json!({"oid": oid, "size": size, "authenticated": true}));
            continue;
        }
        let upload = format!("http://{base}/lfs-upload/{oid}");
        let mut header = serde_json::Map::new();
        if let Some(part) = s
            .lfs
            .part_size
            .filter(|&p| size as usize > p && offered("multipart"))
        {
            multipart = true;
            header.insert("chunk_size".into(), json!(part.to_string()));
            for n in 1..=(size as usize).div_ceil(part) {
                header.insert(format!("{n:05}"), json!(format!("{upload}/part/{n}")));
            }
        }
        answers.push(json!({"oid": oid, "size": size, "authenticated": true, "actions": {
            "upload": {"href": upload, "header": header},
            "verify": {"href": format!("http://{base}/{id}.git/info/lfs/objects/verify"), "header": {}},
        }}));
    }
    let transfer = if multipart { "multipart" } else { "basic" };
    let mut r = Response::json(
        200,
        json!({"transfer": transfer, "objects": answers, "hash_algo": "sha256"}),
    );
    r.headers[0].1 = "application/vnd.git-lfs+json".into();
    r
}

fn tree(repo: &Repo, prefix: &str, recursive: bool) -> Response {
    let under = |p: &str| prefix.is_empty() || p.starts_with(&format!("{prefix}/"));
    if !prefix.is_empty() && !repo.files.keys().any(|p| under(p)) {
        return Response::error(
            404,
            "EntryNotFound",
            &format!("{prefix} does not exist on \"main\""),
        );
    }
    let mut out = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (path, blob) in &repo.files {
        let bytes = &blob.bytes;
        if !under(path) {
            continue;
        }
        let rel = if prefix.is_empty() {
            path.as_str()
        } else {
            &path[prefix.len() + 1..]
        };
        let parts: Vec<&str> = rel.split('/').collect();
        for i in 1..parts.len() {
            if recursive || i == 1 {
                let dir = parts[..i].join("/");
                dirs.insert(if prefix.is_empty() {
                    dir
                } else {
                    format!("{prefix}/{dir}")
                });
            }
        }
        if recursive || parts.len() == 1 {
            let mut entry =
                json!({"type": "file", "oid": &blob.git_oid, "size": bytes.len(), "path": path});
            if blob.lfs {
                let sha = &blob.sha256;
                let pointer = lfs_pointer(sha, bytes.len()).len();
                entry["lfs"] =
                    json!({"oid": sha, "sha256": sha, "size": bytes.len(), "pointerSize": pointer});
            }
            out.push(entry);
        }
    }
    let mut all: Vec<Value> = dirs
        .into_iter()
        .map(|d| json!({"type": "directory", "oid": fake_sha(d.as_bytes()), "size": 0, "path": d}))
        .collect();
    all.extend(out);
    Response::json(200, Value::Array(all))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pad]);
    }
    Some(out)
}
