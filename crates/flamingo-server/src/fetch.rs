//! Media URL fetching: the one place request media URLs are turned into bytes.
//!
//! Supported forms:
//! * `data:<mediatype>;base64,<payload>` — decoded in memory, size-capped before decoding.
//! * `http://` / `https://` — fetched with SSRF protection: every address actually connected
//!   to (including on each redirect hop) must be publicly routable unless allow-listed.
//! * `file://` — only below a configured directory, with `..` and symlink escapes refused.
//!
//! Every [`FetchError`] except [`FetchError::Config`] is the client's fault, and no error
//! message ever contains payload bytes.

use std::borrow::Cow;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

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
// Address classification
// ---------------------------------------------------------------------------------------------

/// IPv4 ranges that are never fetched from unless allow-listed.
const BLOCKED_V4: &[Ipv4Net] = &[
    v4net(0, 0, 0, 0, 8),       // "this network", includes unspecified 0.0.0.0
    v4net(10, 0, 0, 0, 8),      // RFC 1918 private
    v4net(100, 64, 0, 0, 10),   // shared address space / CGNAT
    v4net(127, 0, 0, 0, 8),     // loopback
    v4net(169, 254, 0, 0, 16),  // link-local (cloud metadata lives here)
    v4net(172, 16, 0, 0, 12),   // RFC 1918 private
    v4net(192, 0, 0, 0, 24),    // IETF protocol assignments
    v4net(192, 0, 2, 0, 24),    // documentation TEST-NET-1
    v4net(192, 88, 99, 0, 24),  // deprecated 6to4 relay anycast
    v4net(192, 168, 0, 0, 16),  // RFC 1918 private
    v4net(198, 18, 0, 0, 15),   // benchmarking
    v4net(198, 51, 100, 0, 24), // documentation TEST-NET-2
    v4net(203, 0, 113, 0, 24),  // documentation TEST-NET-3
    v4net(224, 0, 0, 0, 4),     // multicast
    v4net(240, 0, 0, 0, 4),     // reserved, includes broadcast 255.255.255.255
];

/// IPv6 ranges that are never fetched from unless allow-listed. Ranges that embed an IPv4
/// address are handled separately in [`is_blocked_v6`].
const BLOCKED_V6: &[Ipv6Net] = &[
    v6net([0, 0, 0, 0, 0, 0, 0, 0], 96),          // IPv4-compatible (deprecated), incl. :: and ::1
    v6net([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),  // local-use NAT64
    v6net([0x100, 0, 0, 0, 0, 0, 0, 0], 64),      // discard-only
    v6net([0x2001, 0, 0, 0, 0, 0, 0, 0], 32),     // Teredo (embeds an obfuscated IPv4)
    v6net([0x2001, 2, 0, 0, 0, 0, 0, 0], 48),     // benchmarking
    v6net([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
    v6net([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),     // documentation (RFC 9637)
    v6net([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),      // unique local
    v6net([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),     // link-local
    v6net([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),     // site-local (deprecated)
    v6net([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),      // multicast
];

const fn v4net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6net(s: [u16; 8], prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]), prefix)
}

/// `true` if `ip` is not a publicly routable unicast address and must not be fetched from
/// (loopback, private, CGNAT, link-local, unspecified, broadcast, multicast, documentation,
/// reserved, unique-local, and IPv6 forms embedding such an IPv4 address).
pub fn is_blocked_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_blocked_v4(v4),
        IpAddr::V6(v6) => is_blocked_v6(v6),
    }
}

fn is_blocked_v4(ip: Ipv4Addr) -> bool {
    BLOCKED_V4.iter().any(|net| net.contains(&ip))
}

fn is_blocked_v6(ip: Ipv6Addr) -> bool {
    let bits = u128::from(ip);
    // Forms that carry an IPv4 address: judge them by that address.
    let embedded = |net: [u16; 8], prefix: u8, shift: u32| v6net(net, prefix).contains(&ip).then(|| Ipv4Addr::from((bits >> shift) as u32));
    let embedded_v4 = embedded([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, 0) // IPv4-mapped
        .or_else(|| embedded([0, 0, 0, 0, 0xffff, 0, 0, 0], 96, 0)) // IPv4-translated (SIIT)
        .or_else(|| embedded([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, 0)) // NAT64 well-known
        .or_else(|| embedded([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, 80)); // 6to4
    if let Some(v4) = embedded_v4 {
        return is_blocked_v4(v4);
    }
    BLOCKED_V6.iter().any(|net| net.contains(&ip))
}

// ---------------------------------------------------------------------------------------------
// Allow list and target policy
// ---------------------------------------------------------------------------------------------

/// Parsed [`FetchConfig::allow_list`].
#[derive(Debug, Default)]
struct AllowList {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
}

impl AllowList {
    fn parse(entries: &[String]) -> Result<Self, FetchError> {
        let mut list = AllowList::default();
        for raw in entries {
            let entry = raw.trim();
            let bare = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).unwrap_or(entry);
            if let Ok(net) = bare.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = bare.parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else if let Some(host) = normalize_hostname(entry) {
                list.hosts.push(host);
            } else {
                return Err(FetchError::Config(format!("allow_list entry `{raw}` is not a CIDR, IP address or hostname")));
            }
        }
        Ok(list)
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip) || net.contains(&canonical))
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// Lower-cases a DNS hostname and strips a trailing dot; `None` if it is not a valid name.
fn normalize_hostname(entry: &str) -> Option<String> {
    let host = entry.strip_suffix('.').unwrap_or(entry).to_ascii_lowercase();
    let valid_label = |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(valid_label)
        // All-numeric dotted names are IP-like, not hostnames (e.g. a mistyped `10.0.0.1/`).
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    valid.then_some(host)
}

/// Decides which targets may be contacted; shared by the resolver and the redirect policy.
#[derive(Debug)]
struct TargetPolicy {
    allow: AllowList,
}

impl TargetPolicy {
    fn ip_permitted(&self, ip: IpAddr) -> bool {
        !is_blocked_ip(ip) || self.allow.allows_ip(ip)
    }

    /// Checks the host of an `http(s)` URL that is about to be requested. IP-literal hosts are
    /// judged here because they never reach the resolver; names are judged by the resolver.
    fn check_host(&self, url: &Url) -> Result<(), FetchError> {
        let ip = match url.host() {
            None => return Err(FetchError::InvalidUrl("URL has no host".into())),
            Some(Host::Domain(_)) => return Ok(()),
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        };
        if self.ip_permitted(ip) {
            Ok(())
        } else {
            tracing::debug!(%ip, "refusing media fetch from non-public address");
            Err(FetchError::Blocked { host: host_label(url) })
        }
    }
}

/// DNS resolver that only hands reqwest addresses the [`TargetPolicy`] permits, so the check
/// applies to the address actually connected to (no check-then-connect race).
struct GuardedResolver {
    policy: Arc<TargetPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(addrs) => addrs.collect(),
                Err(_) => return Err(FetchError::Resolve { host: clip(&host) }.into()),
            };
            if resolved.is_empty() {
                return Err(FetchError::Resolve { host: clip(&host) }.into());
            }
            let host_allowed = policy.allow.allows_host(&host);
            let permitted: Vec<SocketAddr> = resolved.into_iter().filter(|addr| host_allowed || policy.ip_permitted(addr.ip())).collect();
            if permitted.is_empty() {
                tracing::debug!(host = %host, "refusing media fetch: host resolves to non-public addresses");
                return Err(FetchError::Blocked { host: clip(&host) }.into());
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// Redirect policy: bounded count, http(s) only, IP-literal hosts re-checked on every hop
/// (named hosts are re-checked by [`GuardedResolver`] when connecting).
fn redirect_policy(policy: Arc<TargetPolicy>, max_redirects: usize) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` holds the original URL plus every URL already redirected to.
        if attempt.previous().len() > max_redirects {
            return attempt.error(FetchError::TooManyRedirects { limit: max_redirects });
        }
        let next = attempt.url();
        if !matches!(next.scheme(), "http" | "https") {
            let scheme = clip(next.scheme());
            return attempt.error(FetchError::RedirectScheme(scheme));
        }
        match policy.check_host(next) {
            Ok(()) => attempt.follow(),
            Err(err) => attempt.error(err),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Fetcher
// ---------------------------------------------------------------------------------------------

/// `file_dir` resolved once at construction.
#[derive(Debug)]
struct FileRoot {
    /// Absolute form of the configured path (may contain symlinks).
    absolute: PathBuf,
    /// Fully canonicalized path.
    canonical: PathBuf,
}

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

/// The scheme of a redirect response's `Location` if it is neither `http` nor `https`.
fn unfollowable_redirect_scheme(response: &reqwest::Response) -> Option<String> {
    let location = response.headers().get(reqwest::header::LOCATION)?.to_str().ok()?;
    let target = response.url().join(location).ok()?;
    (!matches!(target.scheme(), "http" | "https")).then(|| clip(target.scheme()))
}

/// Resolves `file_dir` to absolute and canonical forms; it must be an existing directory.
fn resolve_file_root(dir: &Path) -> Result<FileRoot, FetchError> {
    let bad = |why: &str| FetchError::Config(format!("file_dir `{}` {why}", dir.display()));
    let absolute = std::path::absolute(dir).map_err(|_| bad("cannot be made absolute"))?;
    let canonical = std::fs::canonicalize(dir).map_err(|_| bad("does not exist"))?;
    if !canonical.is_dir() {
        return Err(bad("is not a directory"));
    }
    Ok(FileRoot { absolute, canonical })
}

/// Reads `path` if its canonical form lies inside `root_canon`, capped at `limit` bytes.
///
/// The directory is assumed to be operator-controlled: a concurrent symlink swap between the
/// canonicalization and the open is not defended against.
fn read_confined(root_abs: &Path, root_canon: &Path, path: &Path, limit: usize) -> Result<Vec<u8>, FetchError> {
    let canonical = match std::fs::canonicalize(path) {
        Ok(p) => p,
        // Do not reveal whether paths outside the directory exist.
        Err(_) if !(path.starts_with(root_abs) || path.starts_with(root_canon)) => return Err(FetchError::FileOutsideDir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FetchError::FileNotFound),
        Err(_) => return Err(FetchError::FileRead),
    };
    if !canonical.starts_with(root_canon) {
        return Err(FetchError::FileOutsideDir);
    }
    let file = std::fs::File::open(&canonical).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FetchError::FileNotFound,
        _ => FetchError::FileRead,
    })?;
    let meta = file.metadata().map_err(|_| FetchError::FileRead)?;
    if !meta.is_file() {
        return Err(FetchError::NotAFile);
    }
    if meta.len() > limit as u64 {
        return Err(FetchError::TooLarge { limit });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // `take` guards against the file growing after the metadata check.
    file.take(limit as u64 + 1).read_to_end(&mut bytes).map_err(|_| FetchError::FileRead)?;
    if bytes.len() > limit {
        return Err(FetchError::TooLarge { limit });
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// data: URLs
// ---------------------------------------------------------------------------------------------

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
/// Standard alphabet, padding optional.
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
/// URL-safe alphabet, padding optional.
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Decodes the part of a `data:` URL after `data:` (`<mediatype>[;params];base64,<payload>`).
fn decode_data_url(rest: &str, limit: usize) -> Result<Vec<u8>, FetchError> {
    let (header, payload) = rest.split_once(',').ok_or(FetchError::InvalidDataUrl("missing ',' before the payload"))?;
    let mut params = header.split(';');
    let media_type = params.next().unwrap_or_default().trim().to_ascii_lowercase();
    if !media_type.is_empty() && !DATA_URL_MEDIA_TYPES.contains(&media_type.as_str()) {
        return Err(FetchError::UnsupportedMediaType(clip(&media_type)));
    }
    if !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(FetchError::DataNotBase64);
    }

    // Size check on the encoded length, before any decoding work or allocation.
    let significant = payload.bytes().filter(|b| !b.is_ascii_whitespace()).count();
    if significant > limit.div_ceil(3).saturating_mul(4) {
        return Err(FetchError::TooLarge { limit });
    }
    if significant == 0 {
        return Err(FetchError::InvalidDataUrl("empty payload"));
    }
    let encoded: Cow<'_, [u8]> = if significant == payload.len() {
        Cow::Borrowed(payload.as_bytes())
    } else {
        Cow::Owned(payload.bytes().filter(|b| !b.is_ascii_whitespace()).collect())
    };
    let engine = if encoded.iter().any(|&b| b == b'-' || b == b'_') { &URL_SAFE_LENIENT } else { &STANDARD_LENIENT };
    let bytes = engine.decode(&encoded).map_err(|_| FetchError::InvalidBase64)?;
    if bytes.len() > limit {
        return Err(FetchError::TooLarge { limit });
    }
    Ok(bytes)
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
    fn classifier_table() {
        let cases: &[(&str, bool)] = &[
            // IPv4 blocked
            ("0.0.0.0", true),
            ("0.1.2.3", true),
            ("10.0.0.1", true),
            ("10.255.255.255", true),
            ("100.64.0.1", true),
            ("100.127.255.254", true),
            ("127.0.0.1", true),
            ("127.1.2.3", true),
            ("169.254.169.254", true),
            ("172.16.0.1", true),
            ("172.31.255.255", true),
            ("192.0.0.8", true),
            ("192.0.2.1", true),
            ("192.168.1.1", true),
            ("198.18.0.1", true),
            ("198.51.100.7", true),
            ("203.0.113.9", true),
            ("224.0.0.1", true),
            ("239.255.255.250", true),
            ("240.0.0.1", true),
            ("255.255.255.255", true),
            // IPv4 public (including neighbours of blocked ranges)
            ("1.1.1.1", false),
            ("8.8.8.8", false),
            ("9.255.255.255", false),
            ("11.0.0.0", false),
            ("100.63.255.255", false),
            ("100.128.0.0", false),
            ("126.255.255.255", false),
            ("128.0.0.1", false),
            ("172.15.255.255", false),
            ("172.32.0.0", false),
            ("192.169.0.1", false),
            ("223.255.255.255", false),
            // IPv6 blocked
            ("::", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.1.2.3", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:0.0.0.0", true),
            ("::127.0.0.1", true),
            ("::8.8.8.8", true), // IPv4-compatible form is deprecated: always refused
            ("::ffff:0:192.168.0.1", true),
            ("64:ff9b::10.0.0.1", true),
            ("64:ff9b:1::1", true),
            ("100::1", true),
            ("2001::1", true),
            ("2001:db8::1", true),
            ("2002:7f00:1::1", true),  // 6to4 of 127.0.0.1
            ("2002:c0a8:101::", true), // 6to4 of 192.168.1.1
            ("3fff::1", true),
            ("fc00::1", true),
            ("fd12:3456::1", true),
            ("fe80::1", true),
            ("febf::1", true),
            ("fec0::1", true),
            ("ff02::1", true),
            // IPv6 public
            ("2606:4700:4700::1111", false),
            ("2001:4860:4860::8888", false),
            ("::ffff:8.8.8.8", false),
            ("64:ff9b::8.8.8.8", false),
            ("2002:808:808::1", false), // 6to4 of 8.8.8.8
            ("2a00:1450::1", false),
        ];
        for &(addr, blocked) in cases {
            let ip: IpAddr = addr.parse().expect("test table address parses");
            assert_eq!(is_blocked_ip(ip), blocked, "{addr}");
        }
    }

    #[test]
    fn allow_list_parsing_and_matching() {
        let list =
            AllowList::parse(&["10.0.0.0/8".into(), " 127.0.0.1 ".into(), "[::1]".into(), "fd00::/8".into(), "Images.Internal.".into()])
                .expect("valid entries");
        let ip = |s: &str| s.parse::<IpAddr>().expect("valid ip");
        assert!(list.allows_ip(ip("10.9.8.7")));
        assert!(list.allows_ip(ip("127.0.0.1")));
        assert!(!list.allows_ip(ip("127.0.0.2")));
        assert!(list.allows_ip(ip("::ffff:127.0.0.1")), "mapped form of an allowed v4");
        assert!(list.allows_ip(ip("::1")));
        assert!(list.allows_ip(ip("fd00::5")));
        assert!(!list.allows_ip(ip("192.168.0.1")));
        assert!(list.allows_host("images.internal"));
        assert!(list.allows_host("IMAGES.internal."));
        assert!(!list.allows_host("evil.images.internal"));

        for bad in ["10.0.0.0/33", "", "not a host", "1.2.3", "http://x", "a..b", "1.2.3.4/"] {
            let err = AllowList::parse(&[bad.to_string()]).expect_err(bad);
            assert!(err.is_config_error(), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }

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
