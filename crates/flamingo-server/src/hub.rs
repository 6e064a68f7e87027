//! Downloading released checkpoints by manifest name from the Hugging Face hub.
//!
//! The manifests of `config/models/*.toml` are embedded in the binary. [`download`] fetches a
//! manifest's three sources (CLIP, language model, OpenFlamingo checkpoint) into the ordinary
//! Hugging Face cache (`$HF_HOME/hub`, shared with Python's `huggingface_hub`) through `hf-hub`,
//! then lays out a model directory the loader accepts under [`HubOptions::models_dir`]
//! (`$HF_HOME/flamingo/models/<org>--<name>/` by default):
//!
//! ```text
//! clip/   open_clip_config.json, open_clip_*            -> symlinks into the hub cache
//! lm/     config.json, tokenizer files, weights/shards  -> symlinks into the hub cache
//! checkpoint.pt | checkpoint.safetensors                -> symlink into the hub cache
//! flamingo.toml                                         (written from the manifest's overrides)
//! ```
//!
//! Where symlinks cannot be made, files are hard-linked, or else copied. Files already in the
//! cache are not fetched again, so a second [`download`] works offline.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use flamingo_model::manifest::{Manifest, Source};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

/// The released-checkpoint manifests, as `(file name, TOML text)`.
const EMBEDDED: &[(&str, &str)] = &[
    ("OpenFlamingo-3B-vitl-mpt1b.toml", include_str!("../../../config/models/OpenFlamingo-3B-vitl-mpt1b.toml")),
    ("OpenFlamingo-3B-vitl-mpt1b-langinstruct.toml", include_str!("../../../config/models/OpenFlamingo-3B-vitl-mpt1b-langinstruct.toml")),
    ("OpenFlamingo-4B-vitl-rpj3b.toml", include_str!("../../../config/models/OpenFlamingo-4B-vitl-rpj3b.toml")),
    ("OpenFlamingo-4B-vitl-rpj3b-langinstruct.toml", include_str!("../../../config/models/OpenFlamingo-4B-vitl-rpj3b-langinstruct.toml")),
    ("OpenFlamingo-9B-vitl-mpt7b.toml", include_str!("../../../config/models/OpenFlamingo-9B-vitl-mpt7b.toml")),
    ("idefics-9b.toml", include_str!("../../../config/models/idefics-9b.toml")),
    ("idefics-9b-instruct.toml", include_str!("../../../config/models/idefics-9b-instruct.toml")),
    ("idefics-80b.toml", include_str!("../../../config/models/idefics-80b.toml")),
    ("idefics-80b-instruct.toml", include_str!("../../../config/models/idefics-80b-instruct.toml")),
];

/// The organisation prefix that may be left out when naming a released model.
const ORG_PREFIX: &str = "openflamingo/";

/// The revision fetched when a source names none.
pub const DEFAULT_REVISION: &str = "main";

/// Why a model could not be resolved or downloaded.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Neither an existing directory nor the name of an embedded manifest.
    #[error(
        "`{name}`: model directory not found, and not a known model name; known models: {}",
        .known.join(", ")
    )]
    UnknownModel { name: String, known: Vec<String> },

    /// An embedded or supplied manifest does not parse.
    #[error("invalid manifest: {0}")]
    Manifest(String),

    /// The repository does not exist (or is private/gated and no accepted token was sent).
    #[error("repository `{repo}` not found on {endpoint} (if it is private or gated, set HF_TOKEN to a token with access)")]
    RepoNotFound { repo: String, endpoint: String },

    /// The repository exists but not the requested revision.
    #[error("revision `{revision}` of `{repo}` not found on {endpoint}")]
    RevisionNotFound { repo: String, revision: String, endpoint: String },

    /// A required file is missing from the repository.
    #[error("file `{file}` not found in `{repo}` (revision `{revision}`) on {endpoint}")]
    FileNotFound { repo: String, revision: String, file: String, endpoint: String },

    /// None of a source's weight alternatives exists in the repository.
    #[error(
        "none of the weight files [{}] found in `{repo}` (revision `{revision}`) on {endpoint}",
        .tried.join(", ")
    )]
    NoWeights { repo: String, revision: String, tried: Vec<String>, endpoint: String },

    /// The hub answered 401/403 (or reported a gated repository).
    #[error(
        "{endpoint} refused access to `{file}` in `{repo}` (HTTP {status}{}): {}",
        detail(.message),
        auth_hint(.token_sent)
    )]
    Auth { repo: String, file: String, status: u16, message: Option<String>, token_sent: bool, endpoint: String },

    /// The hub could not be reached.
    #[error(
        "network error fetching `{file}` from `{repo}` at {endpoint}: {message} (check the connection, or set \
         HF_ENDPOINT to a reachable hub or mirror)"
    )]
    Network { repo: String, file: String, message: String, endpoint: String },

    /// Any other HTTP error status.
    #[error("{endpoint} answered HTTP {status} for `{file}` in `{repo}`{}", detail(.message))]
    Http { repo: String, file: String, status: u16, message: Option<String>, endpoint: String },

    /// A response that does not look like the Hugging Face hub's (missing headers and the like).
    #[error("unexpected response from {endpoint} for `{file}` in `{repo}`: {message} (is HF_ENDPOINT a Hugging Face hub?)")]
    Protocol { repo: String, file: String, message: String, endpoint: String },

    /// The HTTP client could not be set up.
    #[error("cannot create the HTTP client: {0}")]
    Client(String),

    /// A file name (from a manifest or a shard index) that is not a plain relative path.
    #[error("invalid file name `{file}` for `{repo}`: {reason}")]
    InvalidFileName { repo: String, file: String, reason: &'static str },

    /// A sharded-weights index that cannot be read.
    #[error("{}: invalid weights index: {message}", path.display())]
    BadIndex { path: PathBuf, message: String },

    /// A filesystem error, with the path involved.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn detail(message: &Option<String>) -> String {
    message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
}

fn auth_hint(token_sent: &bool) -> &'static str {
    if *token_sent {
        "the token (HF_TOKEN or the token file) was not accepted; check that it has access to this repository"
    } else {
        "authentication required; set HF_TOKEN to a Hugging Face token with access (for gated models, accept the \
         terms on the model page first)"
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> HubError + '_ {
    move |source| HubError::Io { path: path.to_path_buf(), source }
}

/// The manifests embedded in the binary, sorted by name.
pub fn manifests() -> Result<Vec<Manifest>, HubError> {
    let mut out = EMBEDDED
        .iter()
        .map(|(file, text)| {
            let origin = Path::new("config/models").join(file);
            Manifest::from_toml_str(text, &origin).map_err(|e| HubError::Manifest(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn normalized(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    match lower.strip_prefix(ORG_PREFIX) {
        Some(rest) => rest.to_string(),
        None => lower,
    }
}

/// Finds a manifest by name: case-insensitive, with or without the `openflamingo/` prefix; a
/// name without an organisation also finds the one manifest of that name under another
/// (`idefics-9b-instruct` is `HuggingFaceM4/idefics-9b-instruct`).
pub fn find_manifest<'a>(manifests: &'a [Manifest], name: &str) -> Option<&'a Manifest> {
    let wanted = normalized(name);
    if let Some(m) = manifests.iter().find(|m| normalized(&m.name) == wanted) {
        return Some(m);
    }
    if wanted.contains('/') {
        return None;
    }
    let mut by_tail = manifests.iter().filter(|m| normalized(&m.name).rsplit_once('/').is_some_and(|(_, tail)| tail == wanted));
    match (by_tail.next(), by_tail.next()) {
        (Some(m), None) => Some(m),
        _ => None,
    }
}

/// The embedded manifest named `name` (see [`find_manifest`]).
pub fn manifest(name: &str) -> Result<Manifest, HubError> {
    let all = manifests()?;
    match find_manifest(&all, name) {
        Some(m) => Ok(m.clone()),
        None => Err(unknown(name, &all)),
    }
}

fn unknown(name: &str, manifests: &[Manifest]) -> HubError {
    HubError::UnknownModel { name: name.to_string(), known: manifests.iter().map(|m| m.name.clone()).collect() }
}

/// Where and how to download.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Hub base URL, without a trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The Hugging Face hub cache (`$HF_HOME/hub`, or `HF_HUB_CACHE`).
    pub cache_dir: PathBuf,
    /// Bearer token sent to the hub (`HF_TOKEN`, or the token file).
    pub token: Option<String>,
    /// Show download progress bars (on stderr, when it is a terminal).
    pub progress: bool,
}

impl HubOptions {
    /// The public Hugging Face hub.
    pub const DEFAULT_ENDPOINT: &'static str = "https://huggingface.co";

    /// Options from the process environment; see [`HubOptions::from_vars`].
    pub fn from_env() -> Self {
        Self::from_vars(|key| std::env::var(key).ok())
    }

    /// Options from environment variables looked up with `var`, as `huggingface_hub` reads them:
    ///
    /// - `HF_ENDPOINT` (default `https://huggingface.co`);
    /// - `HF_HOME` (default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`);
    /// - cache at `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), default `$HF_HOME/hub`;
    /// - token from `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the file at
    ///   `HF_TOKEN_PATH` (default `$HF_HOME/token`) when present;
    /// - progress bars unless `HF_HUB_DISABLE_PROGRESS_BARS` is set to a true value.
    ///
    /// Empty variables count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |key: &str| var(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = get("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                let home = get("HOME").or_else(|| get("USERPROFILE")).unwrap_or_else(|| ".".into());
                Path::new(&home).join(".cache")
            });
            cache.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE").or_else(|| get("HUGGINGFACE_HUB_CACHE")).map(PathBuf::from).unwrap_or(hf_home.join("hub"));
        let endpoint =
            get("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string()).unwrap_or_else(|| Self::DEFAULT_ENDPOINT.to_string());
        let token = get("HF_TOKEN").or_else(|| get("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = get("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or(hf_home.join("token"));
            let text = std::fs::read_to_string(path).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        });
        let progress =
            !get("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Self { endpoint, cache_dir, token, progress }
    }

    /// Where model directories are laid out: `flamingo/models` next to the hub cache, i.e.
    /// `$HF_HOME/flamingo/models` with the default cache location.
    pub fn models_dir(&self) -> PathBuf {
        match self.cache_dir.parent() {
            Some(parent) => parent.join("flamingo").join("models"),
            None => self.cache_dir.join("flamingo-models"),
        }
    }

    /// The model directory [`download`] lays out for `manifest`.
    pub fn model_dir(&self, manifest: &Manifest) -> PathBuf {
        self.models_dir().join(dir_name(&manifest.name))
    }
}

/// A directory name for a model name: `org/name` becomes `org--name`; characters outside
/// `[A-Za-z0-9._-]` become `_`.
fn dir_name(name: &str) -> String {
    let safe = name
        .trim()
        .split('/')
        .map(|part| part.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect::<String>())
        .collect::<Vec<_>>()
        .join("--");
    let safe = safe.trim_start_matches('.');
    if safe.is_empty() {
        "model".to_string()
    } else {
        safe.to_string()
    }
}

/// `arg` as a model directory: an existing directory as is, else the model the embedded manifest
/// of that name describes, downloaded with [`download`].
pub fn resolve(arg: &str, opts: &HubOptions) -> Result<PathBuf, HubError> {
    resolve_with(arg, &manifests()?, opts)
}

/// [`resolve`] against the given manifests.
pub fn resolve_with(arg: &str, manifests: &[Manifest], opts: &HubOptions) -> Result<PathBuf, HubError> {
    let path = Path::new(arg);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    match find_manifest(manifests, arg) {
        Some(m) => download(m, opts),
        None => Err(unknown(arg, manifests)),
    }
}

/// Which part of the model directory a source fills.
#[derive(Debug, Clone, Copy)]
enum Part {
    Clip,
    Lm,
    Checkpoint,
    /// A single-repository model (IDEFICS): its files at the directory's root.
    Root,
}

/// Downloads what `manifest` names into the hub cache (files already cached are not fetched
/// again) and lays out its model directory ([`HubOptions::model_dir`]), which it returns.
pub fn download(manifest: &Manifest, opts: &HubOptions) -> Result<PathBuf, HubError> {
    let cache = Cache::new(opts.cache_dir.clone());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(opts.endpoint.trim_end_matches('/').to_string())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .with_user_agent("flamingo", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| HubError::Client(e.to_string()))?;
    let fetcher = Fetcher { api, cache, opts };

    // Destination inside the model directory (relative) -> file in the hub cache.
    let mut links = BTreeMap::new();
    let sources = &manifest.sources;
    let parts =
        [(Part::Clip, &sources.clip), (Part::Lm, &sources.lm), (Part::Checkpoint, &sources.checkpoint), (Part::Root, &sources.model)];
    for (part, source) in parts.iter().filter_map(|(p, s)| s.as_ref().map(|s| (*p, s))) {
        let fetched = fetcher.fetch_source(source)?;
        for (name, path) in fetched.files {
            links.insert(destination(part, &name, false), path);
        }
        for (i, (name, path)) in fetched.weights.into_iter().enumerate() {
            links.insert(destination(part, &name, i == 0), path);
        }
    }
    let dir = opts.model_dir(manifest);
    let toml = (!manifest.single_repo()).then(|| manifest.flamingo_toml());
    write_layout(&dir, &links, toml.as_deref())?;
    Ok(dir)
}

/// Where a repository file goes in the model directory. The checkpoint's weight file takes the
/// name the loader looks for.
fn destination(part: Part, name: &str, main_weight: bool) -> PathBuf {
    match part {
        Part::Clip => Path::new("clip").join(name),
        Part::Lm => Path::new("lm").join(name),
        Part::Checkpoint if main_weight && !name.ends_with(".index.json") => {
            if name.ends_with(".safetensors") {
                PathBuf::from("checkpoint.safetensors")
            } else {
                PathBuf::from("checkpoint.pt")
            }
        }
        Part::Checkpoint | Part::Root => PathBuf::from(name),
    }
}

/// What one source brought: its `files`, then the chosen weight file followed by its shards.
struct Fetched {
    files: Vec<(String, PathBuf)>,
    weights: Vec<(String, PathBuf)>,
}

struct Fetcher<'a> {
    api: Api,
    cache: Cache,
    opts: &'a HubOptions,
}

impl Fetcher<'_> {
    fn fetch_source(&self, source: &Source) -> Result<Fetched, HubError> {
        let revision = source.revision.as_deref().unwrap_or(DEFAULT_REVISION);
        for name in source.files.iter().chain(&source.weights) {
            check_file_name(&source.repo, name)?;
        }
        let repo = Repo::with_revision(source.repo.clone(), RepoType::Model, revision.to_string());
        let remote = self.api.repo(repo.clone());
        let cached = self.cache.repo(repo);
        let fetch = |file: &str| remote.get(file).map_err(|e| self.classify(e, &source.repo, revision, file));

        let files = source.files.iter().map(|f| Ok((f.clone(), fetch(f)?))).collect::<Result<Vec<_>, HubError>>()?;

        // An alternative already in the cache goes first (a second run needs no network); then
        // the manifest's order of preference.
        let first_cached = source.weights.iter().position(|w| cached.get(w).is_some());
        let order = first_cached.into_iter().chain((0..source.weights.len()).filter(|&i| Some(i) != first_cached));
        for i in order {
            let name = &source.weights[i];
            let path = match fetch(name) {
                Ok(path) => path,
                Err(HubError::FileNotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let mut weights = vec![(name.clone(), path.clone())];
            if name.ends_with(".index.json") {
                let dir = name.rsplit_once('/').map(|(d, _)| format!("{d}/")).unwrap_or_default();
                for shard in shards(&path)? {
                    let shard = format!("{dir}{shard}");
                    check_file_name(&source.repo, &shard)?;
                    let p = fetch(&shard)?;
                    weights.push((shard, p));
                }
            }
            return Ok(Fetched { files, weights });
        }
        Err(HubError::NoWeights {
            repo: source.repo.clone(),
            revision: revision.to_string(),
            tried: source.weights.clone(),
            endpoint: self.opts.endpoint.clone(),
        })
    }

    /// Turns an `hf-hub` error for `file` into a [`HubError`], reading the hub's
    /// `X-Error-Code` / `X-Error-Message` headers when there was a response.
    fn classify(&self, err: ApiError, repo: &str, revision: &str, file: &str) -> HubError {
        let (repo, file, endpoint) = (repo.to_string(), file.to_string(), self.opts.endpoint.clone());
        match err {
            ApiError::RequestError(e) => {
                let text = e.to_string();
                let Some(response) = (*e).into_response() else {
                    return HubError::Network { repo, file, message: text, endpoint };
                };
                let status = response.status();
                let code = response.header("x-error-code").unwrap_or_default().to_string();
                let message = response.header("x-error-message").map(str::to_string);
                match (status, code.as_str()) {
                    (_, "RepoNotFound") => HubError::RepoNotFound { repo, endpoint },
                    (_, "RevisionNotFound") => HubError::RevisionNotFound { repo, revision: revision.into(), endpoint },
                    (_, "EntryNotFound") | (404, _) => HubError::FileNotFound { repo, revision: revision.into(), file, endpoint },
                    (_, "GatedRepo") | (401 | 403, _) => {
                        HubError::Auth { repo, file, status, message, token_sent: self.opts.token.is_some(), endpoint }
                    }
                    _ => HubError::Http { repo, file, status, message, endpoint },
                }
            }
            ApiError::TooManyRetries(inner) => self.classify(*inner, &repo, revision, &file),
            ApiError::IoError(source) => HubError::Io { path: self.opts.cache_dir.clone(), source },
            ApiError::LockAcquisition(path) => {
                HubError::Io { path, source: io::Error::new(io::ErrorKind::WouldBlock, "locked by another download; try again later") }
            }
            other => HubError::Protocol { repo, file, message: other.to_string(), endpoint },
        }
    }
}

/// Rejects names that are not plain relative paths (they come from manifests and from shard
/// indexes served by the hub, and become paths on disk).
fn check_file_name(repo: &str, file: &str) -> Result<(), HubError> {
    let bad = |reason| Err(HubError::InvalidFileName { repo: repo.to_string(), file: file.to_string(), reason });
    if file.is_empty() {
        return bad("empty");
    }
    if file.contains('\\') || file.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return bad("must be a relative `/`-separated path without empty, `.` or `..` components");
    }
    if !Path::new(file).components().all(|c| matches!(c, Component::Normal(_))) {
        return bad("must be a relative path");
    }
    Ok(())
}

/// The shard file names a `*.index.json` names in its `weight_map`, sorted and deduplicated.
fn shards(index: &Path) -> Result<Vec<String>, HubError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(io_err(index))?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| HubError::BadIndex { path: index.to_path_buf(), message: e.to_string() })?;
    Ok(idx.weight_map.into_values().collect::<BTreeSet<_>>().into_iter().collect())
}

/// Builds the model directory in a staging directory next to it, then swaps it in, so stale
/// entries from an earlier layout do not survive and a reader never sees a half-built directory.
fn write_layout(dir: &Path, links: &BTreeMap<PathBuf, PathBuf>, flamingo_toml: Option<&str>) -> Result<(), HubError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let base = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    // Unique per process and call, so concurrent downloads of one model do not collide.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let id = format!("{}-{}", std::process::id(), CALLS.fetch_add(1, Ordering::Relaxed));
    let staging = parent.join(format!(".{base}.partial-{id}"));
    let build = || -> Result<(), HubError> {
        remove_dir_if_present(&staging)?;
        std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        for (rel, src) in links {
            let dst = staging.join(rel);
            if let Some(p) = dst.parent() {
                std::fs::create_dir_all(p).map_err(io_err(p))?;
            }
            place(src, &dst)?;
        }
        match flamingo_toml {
            Some(text) => {
                let toml_path = staging.join("flamingo.toml");
                std::fs::write(&toml_path, text).map_err(io_err(&toml_path))
            }
            None => Ok(()),
        }
    };
    if let Err(e) = build() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }

    let old = parent.join(format!(".{base}.old-{id}"));
    if dir.exists() {
        remove_dir_if_present(&old)?;
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
    }
    if let Err(e) = std::fs::rename(&staging, dir) {
        // Another process may have laid out the same model meanwhile; its layout is as good.
        remove_dir_if_present(&staging)?;
        if !dir.is_dir() {
            return Err(HubError::Io { path: dir.to_path_buf(), source: e });
        }
    }
    remove_dir_if_present(&old)
}

fn remove_dir_if_present(path: &Path) -> Result<(), HubError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(HubError::Io { path: path.to_path_buf(), source: e }),
        _ => Ok(()),
    }
}

/// Puts the cached file `src` at `dst`: a symlink, else a hard link to the blob, else a copy.
fn place(src: &Path, dst: &Path) -> Result<(), HubError> {
    let src = std::path::absolute(src).map_err(io_err(src))?;
    if symlink(&src, dst).is_ok() {
        return Ok(());
    }
    // Hard links and copies need the blob itself, not the cache's (relative) snapshot symlink.
    let blob = std::fs::canonicalize(&src).map_err(io_err(&src))?;
    if std::fs::hard_link(&blob, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(&blob, dst).map(|_| ()).map_err(io_err(dst))
}

#[cfg(unix)]
fn symlink(src: &Path, dst: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(src, dst)
}

#[cfg(windows)]
fn symlink(src: &Path, dst: &Path) -> io::Result<()> {
    std::os::windows::fs::symlink_file(src, dst)
}

#[cfg(not(any(unix, windows)))]
fn symlink(_src: &Path, _dst: &Path) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no symlinks on this platform"))
}
