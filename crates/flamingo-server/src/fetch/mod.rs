//! Media URL fetching: the one place request media URLs are turned into bytes.
//!
//! Supported forms:
//! * `data:<mediatype>;base64,<payload>` — decoded in memory, size-capped before decoding.
//! * `http://` / `https://` — fetched with SSRF protection: every address actually connected
//!   to (including on each redirect hop) must be publicly routable unless allow-listed.
//! * `file://` — only below a configured directory, with `..` and symlink escapes refused.
//!
//! Every [`FetchError`] except [`FetchError::Config`] is the client's fault, and no error
//! message ever contains payload bytes. The address policy is in `ssrf`, `data:` and
//! `file://` in `local`.

mod local;
mod ssrf;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use local::{decode_data_url, read_confined, resolve_file_root, FileRoot};
pub use ssrf::is_blocked_ip;
use ssrf::{redirect_policy, unfollowable_redirect_scheme, AllowList, GuardedResolver, TargetPolicy};

/// Default per-item size cap: 20 MiB.
pub const DEFAULT_MAX_BYTES: usize = 20 * 1024 * 1024;

/// Media types accepted in `data:` URLs (the empty media type is accepted too).
pub const DATA_URL_MEDIA_TYPES: &[&str] =
    &["image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "application/octet-stream"];

/// How media URLs may be fetched.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Whether `http(s)` URLs are fetched at all (default `true`).
    pub allow_http: bool,
    /// Budget for a whole `http(s)` fetch, redirects and body included (default 5 s).
    pub timeout: Duration,
    /// Maximum size of one media item, also applied to decoded `data:` URLs (default 20 MiB).
    pub max_bytes: usize,
    /// Maximum number of redirects followed (default 3).
    pub max_redirects: usize,
    /// Targets allowed even though their address is not public: CIDR (`10.0.0.0/8`),
    /// single IP (`127.0.0.1`, `::1`) or exact hostname (`images.internal`).
    pub allow_list: Vec<String>,
    /// Directory `file://` URLs are confined to; `None` refuses `file://` URLs.
    pub file_dir: Option<PathBuf>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            allow_http: true,
            timeout: Duration::from_secs(5),
            max_bytes: DEFAULT_MAX_BYTES,
            max_redirects: 3,
            allow_list: Vec::new(),
            file_dir: None,
        }
    }
}

/// Why a media URL could not be turned into bytes.
///
/// All variants except [`FetchError::Config`] describe a bad client request (HTTP 400).
/// Messages never contain payload bytes; user-supplied fragments are clipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The fetch configuration is invalid (server-side problem, raised by [`Fetcher::new`]).
    #[error("invalid media fetch configuration: {0}")]
    Config(String),
    /// The URL could not be parsed or is not usable.
    #[error("invalid media URL: {0}")]
    InvalidUrl(String),
    /// The URL scheme is not one of `data:`, `http:`, `https:`, `file:`.
    #[error("unsupported URL scheme `{0}` (expected data:, http:, https: or file:)")]
    UnsupportedScheme(String),
    /// `http(s)` URLs are disabled by configuration.
    #[error("URL fetching is disabled on this server; send media inline as base64 data: URLs")]
    HttpDisabled,
    /// `file://` URLs are disabled by configuration.
    #[error("file:// URLs are disabled on this server")]
    FileDisabled,
    /// A `data:` URL is malformed.
    #[error("invalid data URL: {0}")]
    InvalidDataUrl(&'static str),
    /// A `data:` URL is not base64-encoded.
    #[error("data URL must be base64-encoded (data:<media type>;base64,<payload>)")]
    DataNotBase64,
    /// A `data:` URL has a media type that is not an accepted image type.
    #[error(
        "unsupported data URL media type `{0}` (expected image/png, image/jpeg, image/webp, \
         image/gif, image/bmp or application/octet-stream)"
    )]
    UnsupportedMediaType(String),
    /// A `data:` URL payload is not valid base64.
    #[error("invalid base64 in data URL payload")]
    InvalidBase64,
    /// The media item exceeds the size cap.
    #[error("media item is larger than the {limit}-byte limit")]
    TooLarge {
        /// The configured cap in bytes.
        limit: usize,
    },
    /// The target host resolves only to (or is) a non-public address.
    #[error("refusing to fetch from `{host}`: it is a private, loopback or otherwise non-public address")]
    Blocked {
        /// Host as written in the (possibly redirected) URL.
        host: String,
    },
    /// The redirect limit was exceeded.
    #[error("too many redirects (limit {limit})")]
    TooManyRedirects {
        /// The configured maximum.
        limit: usize,
    },
    /// A redirect pointed to a scheme other than `http` / `https`.
    #[error("refusing redirect to unsupported scheme `{0}`")]
    RedirectScheme(String),
    /// The host name could not be resolved.
    #[error("could not resolve host `{host}`")]
    Resolve {
        /// Host that failed to resolve.
        host: String,
    },
    /// The upstream server answered with a non-success status.
    #[error("fetching from `{host}` failed: upstream returned HTTP {status}")]
    Status {
        /// Host that answered.
        host: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The fetch did not finish within the configured timeout.
    #[error("fetching from `{host}` timed out after {} s", .timeout.as_secs_f64())]
    Timeout {
        /// Host of the original URL.
        host: String,
        /// The configured budget.
        timeout: Duration,
    },
    /// No connection could be made.
    #[error("could not connect to `{host}`")]
    Connect {
        /// Host that could not be reached.
        host: String,
    },
    /// The request failed for another reason (protocol error, broken body, ...).
    #[error("request to `{host}` failed")]
    Request {
        /// Host the request was made to.
        host: String,
    },
    /// A `file://` URL names a file that does not exist.
    #[error("file not found")]
    FileNotFound,
    /// A `file://` URL points outside the allowed directory.
    #[error("file is outside the allowed media directory")]
    FileOutsideDir,
    /// A `file://` URL names something that is not a regular file.
    #[error("not a regular file")]
    NotAFile,
    /// A `file://` URL names a file that could not be read.
    #[error("could not read file")]
    FileRead,
}

impl FetchError {
    /// `true` for the one server-side variant ([`FetchError::Config`]); everything else is
    /// the client's fault.
    pub fn is_config_error(&self) -> bool {
        matches!(self, FetchError::Config(_))
    }
}

// ---------------------------------------------------------------------------------------------
// Fetcher
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Inner {
    cfg: FetchConfig,
    client: reqwest::Client,
    policy: Arc<TargetPolicy>,
    file_root: Option<FileRoot>,
}

/// Turns media URLs into bytes. Cheap to clone; share one per server.
#[derive(Debug, Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl Fetcher {
    /// Validates `cfg` and builds the HTTP client.
    ///
    /// Fails with [`FetchError::Config`] on an invalid allow-list entry (named in the
    /// message), a zero timeout or size cap, or a `file_dir` that is not a directory.
    pub fn new(cfg: FetchConfig) -> Result<Self, FetchError> {
        if cfg.timeout.is_zero() {
            return Err(FetchError::Config("timeout must be greater than zero".into()));
        }
        if cfg.max_bytes == 0 {
            return Err(FetchError::Config("max_bytes must be greater than zero".into()));
        }
        let policy = Arc::new(TargetPolicy { allow: AllowList::parse(&cfg.allow_list)? });
        let file_root = cfg.file_dir.as_deref().map(resolve_file_root).transpose()?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { policy: Arc::clone(&policy) }))
            .redirect(redirect_policy(Arc::clone(&policy), cfg.max_redirects))
            .referer(false)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("flamingo-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Config(format!("could not build HTTP client: {e}")))?;
        Ok(Self { inner: Arc::new(Inner { cfg, client, policy, file_root }) })
    }

    /// The configuration this fetcher was built with.
    pub fn config(&self) -> &FetchConfig {
        &self.inner.cfg
    }

    /// Fetches the media behind `url` (`data:`, `http(s):` or `file:`), returning its bytes.
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let url = url.trim();
        let Some((scheme, rest)) = split_scheme(url) else {
            return Err(FetchError::InvalidUrl(
                "missing URL scheme (expected data:, http:, https: or file:; raw base64 must be \
                 sent as data:<media type>;base64,<payload>)"
                    .into(),
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "data" => decode_data_url(rest, self.inner.cfg.max_bytes),
            "http" | "https" => self.fetch_http(url).await,
            "file" => self.fetch_file(url).await,
            _ => Err(FetchError::UnsupportedScheme(clip(scheme))),
        }
    }

    async fn fetch_http(&self, raw: &str) -> Result<Vec<u8>, FetchError> {
        let cfg = &self.inner.cfg;
        if !cfg.allow_http {
            return Err(FetchError::HttpDisabled);
        }
        let url = Url::parse(raw).map_err(|e| FetchError::InvalidUrl(e.to_string()))?;
        self.inner.policy.check_host(&url)?;
        let host = host_label(&url);
        match tokio::time::timeout(cfg.timeout, self.download(url, &host)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(FetchError::Timeout { host, timeout: cfg.timeout }),
        }
    }

    /// Sends the request and streams the body, enforcing the size cap.
    async fn download(&self, url: Url, host: &str) -> Result<Vec<u8>, FetchError> {
        let limit = self.inner.cfg.max_bytes;
        let mut response = self.inner.client.get(url).send().await.map_err(|e| self.map_reqwest_error(e, host))?;
        let status = response.status();
        if status.is_redirection() {
            // Redirects the client could not follow (e.g. `Location: file:///...`) surface here.
            if let Some(scheme) = unfollowable_redirect_scheme(&response) {
                return Err(FetchError::RedirectScheme(scheme));
            }
        }
        if !status.is_success() {
            return Err(FetchError::Status { host: host_label(response.url()), status: status.as_u16() });
        }
        let declared = response.content_length();
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(FetchError::TooLarge { limit });
        }
        let capacity = declared.map_or(0, |len| len as usize).min(limit);
        let mut body = Vec::with_capacity(capacity);
        while let Some(chunk) = response.chunk().await.map_err(|e| self.map_reqwest_error(e, host))? {
            if chunk.len() > limit - body.len() {
                return Err(FetchError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Maps a reqwest error to a [`FetchError`] without leaking internal details. Refusals
    /// raised by the resolver or redirect policy travel inside the error chain.
    fn map_reqwest_error(&self, err: reqwest::Error, host: &str) -> FetchError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = source {
            if let Some(fetch_err) = e.downcast_ref::<FetchError>() {
                return fetch_err.clone();
            }
            source = e.source();
        }
        let host = err.url().map_or_else(|| host.to_owned(), host_label);
        if err.is_timeout() {
            FetchError::Timeout { host, timeout: self.inner.cfg.timeout }
        } else if err.is_connect() {
            FetchError::Connect { host }
        } else {
            FetchError::Request { host }
        }
    }

    async fn fetch_file(&self, raw: &str) -> Result<Vec<u8>, FetchError> {
        let Some(root) = self.inner.file_root.as_ref() else {
            return Err(FetchError::FileDisabled);
        };
        let url = Url::parse(raw).map_err(|e| FetchError::InvalidUrl(e.to_string()))?;
        // The URL parser has already resolved `.` / `..` segments (also percent-encoded ones).
        let path = url.to_file_path().map_err(|()| FetchError::InvalidUrl("file:// URL must be an absolute local path".into()))?;
        let root_abs = root.absolute.clone();
        let root_canon = root.canonical.clone();
        let limit = self.inner.cfg.max_bytes;
        tokio::task::spawn_blocking(move || read_confined(&root_abs, &root_canon, &path, limit)).await.map_err(|_| FetchError::FileRead)?
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Splits `scheme:rest` if the part before the first `:` is a syntactically valid scheme.
fn split_scheme(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let valid =
        chars.next().is_some_and(|c| c.is_ascii_alphabetic()) && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some((scheme, rest))
}

/// Longest user-supplied fragment echoed in an error message.
const MAX_ECHO: usize = 64;

/// Clips a user-supplied fragment for error messages, replacing control characters.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_ECHO).map(|c| if c.is_control() { '?' } else { c }).collect();
    if s.chars().nth(MAX_ECHO).is_some() {
        out.push('…');
    }
    out
}

/// The host of `url` for error messages (IPv6 in brackets), clipped.
fn host_label(url: &Url) -> String {
    url.host().map_or_else(String::new, |h| clip(&h.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_scheme_and_clip() {
        assert_eq!(split_scheme("data:x"), Some(("data", "x")));
        assert_eq!(split_scheme("HTTP://a"), Some(("HTTP", "//a")));
        assert_eq!(split_scheme("iVBORw0KGgo"), None);
        assert_eq!(split_scheme("/tmp/a:b"), None);
        assert_eq!(split_scheme(":x"), None);
        assert_eq!(clip("ab\ncd"), "ab?cd");
        assert_eq!(clip(&"x".repeat(100)).chars().count(), MAX_ECHO + 1);
    }
}
