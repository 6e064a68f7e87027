//! A fake Hugging Face hub on 127.0.0.1, shared by the integration tests (`tests/hub.rs`,
//! `tests/serve_cli.rs`). It answers the requests hf-hub's sync API makes:
//! `GET {endpoint}/{repo}/resolve/{revision}/{file}` with `Range: bytes=0-0` (metadata: `ETag` or
//! `X-Linked-ETag`, `X-Repo-Commit`, `Content-Range`), then with `Range: bytes=0-` (the content);
//! LFS files (weights) answer 302 with an absolute `Location` to a CDN path, as the real hub does.
//! Missing repos, revisions and files answer 404 with the hub's `X-Error-Code` header.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use sha2::{Digest, Sha256};

/// The tiny `mosaicgpt_x1` fixture the fake repos are built from.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/mosaicgpt_x1")
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A git-like commit id for a fake repo.
pub fn commit_of(repo: &str) -> String {
    sha256_hex(format!("commit of {repo}").as_bytes())[..40].to_string()
}

/// A repo's files: `(path in the repo, content)`.
pub type RepoFiles = Vec<(String, Vec<u8>)>;

/// Files `names` of the fixture's subdirectory `dir` ("" for the fixture itself).
pub fn repo_files(dir: &str, names: &[&str]) -> RepoFiles {
    names.iter().map(|n| (n.to_string(), read(&fixture().join(dir).join(n)))).collect()
}

/// The three repos of the release layout (CLIP, language model, checkpoint), from the fixture,
/// under the given repo names. The CLIP repo has only `open_clip_pytorch_model.bin` (no
/// `open_clip_model.safetensors`) and the LM repo only `pytorch_model.bin`.
pub fn release_repos<'a>(clip: &'a str, lm: &'a str, checkpoint: &'a str) -> Vec<(&'a str, RepoFiles)> {
    vec![
        (clip, repo_files("clip", &["open_clip_config.json", "open_clip_pytorch_model.bin"])),
        (lm, repo_files("lm", &["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "pytorch_model.bin"])),
        (checkpoint, repo_files("", &["checkpoint.pt"])),
    ]
}

struct FakeRepo {
    commit: String,
    files: BTreeMap<String, Vec<u8>>,
}

struct HubState {
    repos: HashMap<String, FakeRepo>,
    /// Content-addressed LFS blobs, served under `/cdn/{sha256}`.
    blobs: HashMap<String, Vec<u8>>,
    /// When set, `/resolve/` requests need `Authorization: Bearer <token>`.
    token: Option<String>,
    /// Every request, as `METHOD /path`.
    log: Mutex<Vec<String>>,
}

pub struct FakeHub {
    pub url: String,
    state: Arc<HubState>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeHub {
    /// Starts the hub on 127.0.0.1 (a free port) on its own runtime; it stops when dropped
    /// (drop it outside any async context).
    pub fn start(repos: Vec<(&str, RepoFiles)>, token: Option<&str>) -> Self {
        let mut blobs = HashMap::new();
        let repos = repos
            .into_iter()
            .map(|(name, files)| {
                for (file, bytes) in &files {
                    if is_lfs(file) {
                        blobs.insert(sha256_hex(bytes), bytes.clone());
                    }
                }
                (name.to_string(), FakeRepo { commit: commit_of(name), files: files.into_iter().collect() })
            })
            .collect();
        let state = Arc::new(HubState { repos, blobs, token: token.map(str::to_string), log: Mutex::new(Vec::new()) });

        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let app = Router::new().fallback(handle).with_state(state.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            axum::serve(listener, app).await.expect("fake hub serves");
        });
        Self { url, state, _runtime: runtime }
    }

    /// Every request so far, as `METHOD /path`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.log.lock().expect("log lock").clone()
    }

    pub fn commit(&self, repo: &str) -> String {
        self.state.repos[repo].commit.clone()
    }
}

/// Files the hub stores in LFS (served through a redirect), as it does for weights.
fn is_lfs(file: &str) -> bool {
    [".bin", ".pt", ".safetensors"].iter().any(|ext| file.ends_with(ext))
}

async fn handle(State(hub): State<Arc<HubState>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_string();
    hub.log.lock().expect("log lock").push(format!("{method} {path}"));

    if let Some(sha) = path.strip_prefix("/cdn/") {
        return match hub.blobs.get(sha) {
            Some(bytes) => ranged(&headers, bytes, sha, None),
            None => hub_error(StatusCode::NOT_FOUND, None, "no such blob"),
        };
    }
    let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return hub_error(StatusCode::NOT_FOUND, None, "not a resolve URL");
    };
    let Some((revision, file)) = rest.split_once('/') else {
        return hub_error(StatusCode::NOT_FOUND, None, "no file in URL");
    };
    if let Some(token) = &hub.token {
        let sent = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if sent != Some(format!("Bearer {token}").as_str()) {
            return hub_error(StatusCode::UNAUTHORIZED, None, "Invalid credentials in Authorization header");
        }
    }
    let Some(r) = hub.repos.get(repo) else {
        return hub_error(StatusCode::NOT_FOUND, Some("RepoNotFound"), "Repository not found");
    };
    if revision != "main" && revision != r.commit {
        return hub_error(StatusCode::NOT_FOUND, Some("RevisionNotFound"), "Invalid rev id");
    }
    let Some(bytes) = r.files.get(file) else {
        return hub_error(StatusCode::NOT_FOUND, Some("EntryNotFound"), "Entry not found");
    };
    let sha = sha256_hex(bytes);
    if is_lfs(file) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1");
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("http://{host}/cdn/{sha}"))
            .header("x-repo-commit", &r.commit)
            .header("x-linked-etag", format!("\"{sha}\""))
            .header("x-linked-size", bytes.len())
            .header(header::ETAG, format!("\"{}\"", &sha[..40]))
            .body(Body::empty())
            .expect("response");
    }
    ranged(&headers, bytes, &sha[..40], Some(&r.commit))
}

/// Serves `bytes`, honouring a `Range: bytes=a-[b]` header.
fn ranged(headers: &HeaderMap, bytes: &[u8], etag: &str, commit: Option<&str>) -> Response {
    let len = bytes.len();
    let mut builder = Response::builder().header(header::ETAG, format!("\"{etag}\"")).header(header::ACCEPT_RANGES, "bytes");
    if let Some(commit) = commit {
        builder = builder.header("x-repo-commit", commit);
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(parse_range);
    let response = match range {
        None => builder.status(StatusCode::OK).body(Body::from(bytes.to_vec())),
        Some((start, end)) => {
            let end = end.unwrap_or(usize::MAX).min(len.saturating_sub(1));
            if start >= len || start > end {
                builder
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                    .body(Body::empty())
            } else {
                builder
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                    .body(Body::from(bytes[start..=end].to_vec()))
            }
        }
    };
    response.expect("response")
}

fn parse_range(value: &str) -> Option<(usize, Option<usize>)> {
    let (start, end) = value.strip_prefix("bytes=")?.split_once('-')?;
    let end = if end.is_empty() { None } else { Some(end.parse().ok()?) };
    Some((start.parse().ok()?, end))
}

fn hub_error(status: StatusCode, code: Option<&str>, message: &str) -> Response {
    let mut builder = Response::builder().status(status).header("x-error-message", message);
    if let Some(code) = code {
        builder = builder.header("x-error-code", code);
    }
    builder.body(Body::from(format!("{{\"error\":\"{message}\"}}"))).expect("response")
}
