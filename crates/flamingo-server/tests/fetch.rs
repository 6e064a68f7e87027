//! Integration tests for `flamingo_server::fetch`: data:, http(s) with SSRF protection
//! against local test servers on 127.0.0.x, and file:// confinement.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;
use flamingo_server::fetch::{FetchConfig, FetchError, Fetcher};

// ---------------------------------------------------------------------------------------------
// Test server
// ---------------------------------------------------------------------------------------------

/// A small HTTP server on one loopback address, counting the requests it receives.
struct TestServer {
    /// `http://ip:port`
    base: String,
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl TestServer {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    label: String,
    hits: Arc<AtomicUsize>,
}

/// Routes (all GET):
/// `/ok` -> `hello <ip>`; `/bytes/N` -> N bytes with Content-Length; `/chunked/N` -> N bytes
/// streamed without Content-Length; `/sleep` -> answers after 10 s; `/status/N` -> status N;
/// `/redirect?<url>` -> 302 to url; `/chain/N` -> N redirects then `end of chain`.
async fn handle(State(app): State<AppState>, uri: Uri) -> Response {
    app.hits.fetch_add(1, Ordering::SeqCst);
    let path = uri.path();
    let number = |prefix: &str| path.strip_prefix(prefix).and_then(|n| n.parse::<usize>().ok());
    let builder = Response::builder();
    let response = if path == "/ok" {
        builder.body(Body::from(format!("hello {}", app.label)))
    } else if let Some(n) = number("/bytes/") {
        builder.header(header::CONTENT_LENGTH, n).body(Body::from(vec![b'x'; n]))
    } else if let Some(n) = number("/chunked/") {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..n).step_by(100).map(|i| Ok(vec![b'y'; (n - i).min(100)])).collect();
        builder.body(Body::from_stream(futures::stream::iter(chunks)))
    } else if path == "/sleep" {
        tokio::time::sleep(Duration::from_secs(10)).await;
        builder.body(Body::from("late"))
    } else if let Some(code) = number("/status/") {
        builder.status(StatusCode::from_u16(code as u16).unwrap_or(StatusCode::IM_A_TEAPOT)).body(Body::from("status page"))
    } else if path == "/redirect" {
        builder.status(StatusCode::FOUND).header(header::LOCATION, uri.query().unwrap_or("/ok")).body(Body::empty())
    } else if let Some(n) = number("/chain/") {
        if n == 0 {
            builder.body(Body::from("end of chain"))
        } else {
            builder.status(StatusCode::FOUND).header(header::LOCATION, format!("/chain/{}", n - 1)).body(Body::empty())
        }
    } else {
        builder.status(StatusCode::NOT_FOUND).body(Body::empty())
    };
    response.expect("test response builds")
}

/// Starts a [`TestServer`] on `ip` (any 127.0.0.x works on Linux) with an ephemeral port.
async fn serve(ip: [u8; 4]) -> TestServer {
    let addr = SocketAddr::from((Ipv4Addr::from(ip), 0));
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind test server");
    let local = listener.local_addr().expect("local addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let state = AppState { label: local.ip().to_string(), hits: Arc::clone(&hits) };
    let app = axum::Router::new().fallback(handle).with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    TestServer { base: format!("http://{local}"), port: local.port(), hits }
}

/// A port on 127.0.0.1 that nothing listens on.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    drop(listener);
    port
}

fn fetcher(cfg: FetchConfig) -> Fetcher {
    Fetcher::new(cfg).expect("valid fetch config")
}

fn allowing(entries: &[&str]) -> Fetcher {
    fetcher(FetchConfig { allow_list: entries.iter().map(|s| s.to_string()).collect(), ..FetchConfig::default() })
}

#[test]
fn fetcher_is_clone_send_sync() {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    assert_traits::<Fetcher>();
    assert_traits::<FetchError>();
}

// ---------------------------------------------------------------------------------------------
// http(s): SSRF protection
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn loopback_ip_literal_refused_by_default() {
    let server = serve([127, 0, 0, 1]).await;
    let err = fetcher(FetchConfig::default()).fetch(&server.url("/ok")).await.expect_err("loopback must be refused");
    assert_eq!(err, FetchError::Blocked { host: "127.0.0.1".into() });
    assert!(!err.is_config_error());
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    assert_eq!(server.hits(), 0, "no request may reach the server");
}

#[tokio::test]
async fn localhost_hostname_refused_by_default() {
    let server = serve([127, 0, 0, 1]).await;
    let url = format!("http://localhost:{}/ok", server.port);
    let err = fetcher(FetchConfig::default()).fetch(&url).await.expect_err("localhost must be refused");
    assert_eq!(err, FetchError::Blocked { host: "localhost".into() });
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn other_loopback_spellings_refused() {
    let server = serve([127, 0, 0, 1]).await;
    let p = server.port;
    let f = fetcher(FetchConfig::default());
    for url in [
        format!("http://[::ffff:127.0.0.1]:{p}/ok"),
        format!("http://[::1]:{p}/ok"),
        format!("http://[::127.0.0.1]:{p}/ok"),
        format!("http://0.0.0.0:{p}/ok"),
        format!("http://0:{p}/ok"),
        format!("http://2130706433:{p}/ok"), // decimal 127.0.0.1
        format!("http://0x7f.1:{p}/ok"),
        format!("http://127.1:{p}/ok"),
        format!("HTTP://LOCALHOST:{p}/ok"),
    ] {
        let err = f.fetch(&url).await.expect_err(&url);
        assert!(matches!(err, FetchError::Blocked { .. }), "{url}: {err:?}");
    }
    assert_eq!(server.hits(), 0, "no request may reach the server");
}

#[tokio::test]
async fn mapped_ipv6_host_is_reported() {
    let server = serve([127, 0, 0, 1]).await;
    let url = format!("http://[::ffff:127.0.0.1]:{}/ok", server.port);
    let err = allowing(&["127.0.0.2"]).fetch(&url).await.expect_err("mapped loopback");
    // The URL parser normalizes the literal; the host is reported in that form.
    assert_eq!(err, FetchError::Blocked { host: "[::ffff:7f00:1]".into() });
}

#[tokio::test]
async fn allow_listed_cidr_is_fetched() {
    let server = serve([127, 0, 0, 1]).await;
    let bytes = allowing(&["127.0.0.0/8"]).fetch(&server.url("/ok")).await.expect("allow-listed by CIDR");
    assert_eq!(bytes, b"hello 127.0.0.1");
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn allow_listed_single_ip_is_fetched_but_not_its_neighbour() {
    let one = serve([127, 0, 0, 1]).await;
    let two = serve([127, 0, 0, 2]).await;
    let f = allowing(&["127.0.0.1"]);
    assert_eq!(f.fetch(&one.url("/ok")).await.expect("allowed ip"), b"hello 127.0.0.1");
    let err = f.fetch(&two.url("/ok")).await.expect_err("127.0.0.2 not allowed");
    assert_eq!(err, FetchError::Blocked { host: "127.0.0.2".into() });
    assert_eq!(two.hits(), 0);
}

#[tokio::test]
async fn allow_listed_hostname_is_fetched() {
    let server = serve([127, 0, 0, 1]).await;
    let url = format!("http://localhost:{}/ok", server.port);
    let bytes = allowing(&["LocalHost"]).fetch(&url).await.expect("allow-listed host name");
    assert_eq!(bytes, b"hello 127.0.0.1");
    // Allowing a host name does not allow its address written as an IP literal.
    let err = allowing(&["localhost"]).fetch(&server.url("/ok")).await.expect_err("IP literal not covered by the host name");
    assert_eq!(err, FetchError::Blocked { host: "127.0.0.1".into() });
}

#[tokio::test]
async fn redirect_to_non_allowed_ip_is_refused() {
    let a = serve([127, 0, 0, 1]).await;
    let b = serve([127, 0, 0, 2]).await;
    let url = a.url(&format!("/redirect?{}", b.url("/ok")));
    let err = allowing(&["127.0.0.1/32"]).fetch(&url).await.expect_err("redirect hop to 127.0.0.2 must be refused");
    assert_eq!(err, FetchError::Blocked { host: "127.0.0.2".into() });
    assert_eq!(a.hits(), 1);
    assert_eq!(b.hits(), 0, "the redirect target must never be contacted");

    // Other literal spellings of blocked addresses in the Location header.
    for target in
        [format!("http://0.0.0.0:{}/ok", b.port), format!("http://[::ffff:127.0.0.2]:{}/ok", b.port), format!("http://[::1]:{}/ok", b.port)]
    {
        let err = allowing(&["127.0.0.1/32"]).fetch(&a.url(&format!("/redirect?{target}"))).await.expect_err(&target);
        assert!(matches!(err, FetchError::Blocked { .. }), "{target}: {err:?}");
    }
    assert_eq!(b.hits(), 0);

    // Control: the same redirect is followed when both servers are allowed.
    let bytes = allowing(&["127.0.0.0/8"]).fetch(&url).await.expect("redirect followed");
    assert_eq!(bytes, b"hello 127.0.0.2");
    assert_eq!(b.hits(), 1);
}

#[tokio::test]
async fn redirect_to_hostname_resolving_to_blocked_address_is_refused() {
    let a = serve([127, 0, 0, 2]).await;
    let b = serve([127, 0, 0, 1]).await;
    // `localhost` resolves to 127.0.0.1 (and maybe ::1), neither allowed: the resolver refuses.
    let url = a.url(&format!("/redirect?http://localhost:{}/ok", b.port));
    let err = allowing(&["127.0.0.2/32"]).fetch(&url).await.expect_err("redirect to localhost must be refused");
    assert_eq!(err, FetchError::Blocked { host: "localhost".into() });
    assert_eq!(a.hits(), 1);
    assert_eq!(b.hits(), 0);
}

#[tokio::test]
async fn redirect_to_other_scheme_is_refused() {
    let server = serve([127, 0, 0, 1]).await;
    let f = allowing(&["127.0.0.1"]);
    for (target, scheme) in [("file:///etc/passwd", "file"), ("ftp://example.com/x", "ftp")] {
        let err = f.fetch(&server.url(&format!("/redirect?{target}"))).await.expect_err(target);
        assert_eq!(err, FetchError::RedirectScheme(scheme.into()), "{target}");
    }
}

#[tokio::test]
async fn redirect_count_is_limited() {
    let server = serve([127, 0, 0, 1]).await;
    let f = allowing(&["127.0.0.1"]); // default max_redirects = 3
    let bytes = f.fetch(&server.url("/chain/3")).await.expect("3 redirects allowed");
    assert_eq!(bytes, b"end of chain");

    let hits_before = server.hits();
    let err = f.fetch(&server.url("/chain/4")).await.expect_err("4 redirects");
    assert_eq!(err, FetchError::TooManyRedirects { limit: 3 });
    assert_eq!(server.hits() - hits_before, 4, "stops before the 4th redirect is followed");

    let no_redirects = fetcher(FetchConfig { allow_list: vec!["127.0.0.1".into()], max_redirects: 0, ..FetchConfig::default() });
    let err = no_redirects.fetch(&server.url("/chain/1")).await.expect_err("no redirects");
    assert_eq!(err, FetchError::TooManyRedirects { limit: 0 });
    assert_eq!(no_redirects.fetch(&server.url("/chain/0")).await.expect("no redirect needed"), b"end of chain");
}

fn limited(max_bytes: usize) -> Fetcher {
    fetcher(FetchConfig { allow_list: vec!["127.0.0.1".into()], max_bytes, ..FetchConfig::default() })
}

#[tokio::test]
async fn body_over_limit_with_content_length_is_refused() {
    let server = serve([127, 0, 0, 1]).await;
    let f = limited(100);
    let err = f.fetch(&server.url("/bytes/1000")).await.expect_err("too big");
    assert_eq!(err, FetchError::TooLarge { limit: 100 });
    let err = f.fetch(&server.url("/bytes/101")).await.expect_err("one byte too big");
    assert_eq!(err, FetchError::TooLarge { limit: 100 });
    let bytes = f.fetch(&server.url("/bytes/100")).await.expect("exactly at the limit");
    assert_eq!(bytes, vec![b'x'; 100]);
}

#[tokio::test]
async fn body_over_limit_without_content_length_is_refused() {
    let server = serve([127, 0, 0, 1]).await;
    let f = limited(250);
    let err = f.fetch(&server.url("/chunked/100000")).await.expect_err("too big");
    assert_eq!(err, FetchError::TooLarge { limit: 250 });
    let err = f.fetch(&server.url("/chunked/251")).await.expect_err("one byte too big");
    assert_eq!(err, FetchError::TooLarge { limit: 250 });
    let bytes = f.fetch(&server.url("/chunked/250")).await.expect("exactly at the limit");
    assert_eq!(bytes, vec![b'y'; 250]);
}

#[tokio::test]
async fn slow_server_times_out() {
    let server = serve([127, 0, 0, 1]).await;
    let timeout = Duration::from_millis(300);
    let f = fetcher(FetchConfig { allow_list: vec!["127.0.0.1".into()], timeout, ..FetchConfig::default() });
    let started = Instant::now();
    let err = f.fetch(&server.url("/sleep")).await.expect_err("must time out");
    let elapsed = started.elapsed();
    assert_eq!(err, FetchError::Timeout { host: "127.0.0.1".into(), timeout });
    assert!(err.to_string().contains("timed out after 0.3 s"), "{err}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn upstream_error_status_is_reported() {
    let server = serve([127, 0, 0, 1]).await;
    let f = allowing(&["127.0.0.1"]);
    for code in [404u16, 500, 204] {
        let url = server.url(&format!("/status/{code}"));
        match f.fetch(&url).await {
            Ok(bytes) if code == 204 => assert!(bytes.is_empty()),
            Ok(bytes) => panic!("status {code} returned {} bytes", bytes.len()),
            Err(err) => {
                assert_eq!(err, FetchError::Status { host: "127.0.0.1".into(), status: code });
                assert!(err.to_string().contains(&code.to_string()), "{err}");
            }
        }
    }
}

#[tokio::test]
async fn connection_failure_is_reported() {
    let port = closed_port().await;
    let err = allowing(&["127.0.0.1"]).fetch(&format!("http://127.0.0.1:{port}/ok")).await.expect_err("nothing listens");
    assert_eq!(err, FetchError::Connect { host: "127.0.0.1".into() });
    assert_eq!(err.to_string(), "could not connect to `127.0.0.1`");
}

#[tokio::test]
async fn http_disabled_refuses_urls() {
    let server = serve([127, 0, 0, 1]).await;
    let f = fetcher(FetchConfig { allow_http: false, allow_list: vec!["127.0.0.0/8".into()], ..FetchConfig::default() });
    for url in [server.url("/ok"), "https://example.com/cat.png".to_string()] {
        let err = f.fetch(&url).await.expect_err(&url);
        assert_eq!(err, FetchError::HttpDisabled);
        assert!(err.to_string().contains("URL fetching is disabled"), "{err}");
    }
    assert_eq!(server.hits(), 0);
    // data: URLs still work.
    assert_eq!(f.fetch("data:;base64,AAEC").await.expect("data URL"), [0, 1, 2]);
}

// ---------------------------------------------------------------------------------------------
// data: URLs
// ---------------------------------------------------------------------------------------------

fn data_fetcher(max_bytes: usize) -> Fetcher {
    fetcher(FetchConfig { max_bytes, allow_http: false, ..FetchConfig::default() })
}

#[tokio::test]
async fn data_url_happy_paths() {
    let payload: Vec<u8> = (0u8..=255).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&payload);
    let f = data_fetcher(1024);

    // Whitespace and newlines inside the payload are tolerated.
    let wrapped: String = b64.as_bytes().chunks(60).map(|c| std::str::from_utf8(c).expect("ascii")).collect::<Vec<_>>().join("\r\n ");
    for url in [
        format!("data:image/png;base64,{b64}"),
        format!("data:image/png;base64,{wrapped}\n"),
        format!("data:image/jpeg;base64,{b64}"),
        format!("data:image/jpg;base64,{b64}"),
        format!("data:image/webp;base64,{b64}"),
        format!("data:image/gif;base64,{b64}"),
        format!("data:image/bmp;base64,{b64}"),
        format!("data:application/octet-stream;base64,{b64}"),
        format!("data:;base64,{b64}"),
        format!("DATA:IMAGE/PNG;BASE64,{b64}"),
        format!("data:image/png;name=cat.png;base64,{b64}"),
        format!("  data:image/png;base64,{b64}  "),
        format!("data:image/png;base64,{}", b64.trim_end_matches('=')),
        format!("data:image/png;base64,{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&payload)),
    ] {
        let bytes = f.fetch(&url).await.unwrap_or_else(|e| panic!("{}: {e}", &url[..30]));
        assert_eq!(bytes, payload, "{}", &url[..30]);
    }
}

/// A payload marker that must never show up in an error message.
const SECRET: &str = "U0VDUkVUUEFZTE9BRA";

#[tokio::test]
async fn data_url_errors() {
    let f = data_fetcher(1024);
    let cases: Vec<(String, FetchError)> = vec![
        (format!("data:text/plain;base64,{SECRET}"), FetchError::UnsupportedMediaType("text/plain".into())),
        (format!("data:image/svg+xml;base64,{SECRET}"), FetchError::UnsupportedMediaType("image/svg+xml".into())),
        (format!("data:image/png,{SECRET}"), FetchError::DataNotBase64),
        (format!("data:image/png;charset=utf-8,{SECRET}"), FetchError::DataNotBase64),
        (format!("data:image/png;base64,{SECRET}@@"), FetchError::InvalidBase64),
        (format!("data:image/png;base64,{SECRET}+-"), FetchError::InvalidBase64),
        (format!("data:image/png;base64;{SECRET}"), FetchError::InvalidDataUrl("missing ',' before the payload")),
        ("data:image/png;base64,".into(), FetchError::InvalidDataUrl("empty payload")),
        ("data:image/png;base64, \n ".into(), FetchError::InvalidDataUrl("empty payload")),
    ];
    for (url, expected) in cases {
        let err = f.fetch(&url).await.expect_err(&url);
        assert_eq!(err, expected, "{url}");
        let message = err.to_string();
        assert!(!message.contains(SECRET), "payload leaked into `{message}`");
        assert!(!err.is_config_error());
    }
    let err = f.fetch(&format!("data:image/png;base64,{SECRET}!")).await.expect_err("invalid base64");
    assert!(err.to_string().contains("invalid base64"), "{err}");
    let err = f.fetch(&format!("data:text/html;base64,{SECRET}")).await.expect_err("bad type");
    assert!(err.to_string().contains("text/html"), "{err}");
}

#[tokio::test]
async fn data_url_size_limit() {
    let f = data_fetcher(10);
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
    // Exactly at the limit.
    let ok = f.fetch(&format!("data:image/png;base64,{}", b64(10))).await.expect("10 bytes");
    assert_eq!(ok, vec![7u8; 10]);
    // 11 and 12 bytes encode to 16 chars, the same as 10: refused after decoding.
    for n in [11, 12, 13, 1000] {
        let err = f.fetch(&format!("data:image/png;base64,{}", b64(n))).await.expect_err("too large");
        assert_eq!(err, FetchError::TooLarge { limit: 10 }, "{n} bytes");
    }
    // An over-long payload is refused on its encoded length, before decoding: were it
    // decoded, this one would be reported as invalid base64 instead.
    let garbage = "!".repeat(10_000);
    let err = f.fetch(&format!("data:image/png;base64,{garbage}")).await.expect_err("too large");
    assert_eq!(err, FetchError::TooLarge { limit: 10 });
    // Whitespace does not count toward the encoded length.
    let spaced = format!("data:image/png;base64,{}{}", " \n".repeat(1000), b64(10));
    assert_eq!(f.fetch(&spaced).await.expect("whitespace ignored"), vec![7u8; 10]);
}

// ---------------------------------------------------------------------------------------------
// file:// URLs
// ---------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("flamingo-fetch-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn file_url(path: &Path) -> String {
    url::Url::from_file_path(path).expect("absolute path").to_string()
}

/// Layout: `<tmp>/media/{inside.bin, big.bin, sub/, alias -> inside.bin, escape -> ../outside.bin,
/// escape_dir -> ..}` and `<tmp>/outside.bin`.
fn file_layout(tmp: &TempDir) -> PathBuf {
    let media = tmp.0.join("media");
    std::fs::create_dir_all(media.join("sub")).expect("mkdir");
    std::fs::write(media.join("inside.bin"), b"inside bytes").expect("write");
    std::fs::write(media.join("big.bin"), vec![0u8; 2048]).expect("write");
    std::fs::write(tmp.0.join("outside.bin"), b"outside bytes").expect("write");
    std::os::unix::fs::symlink("inside.bin", media.join("alias")).expect("symlink");
    std::os::unix::fs::symlink("../outside.bin", media.join("escape")).expect("symlink");
    std::os::unix::fs::symlink("..", media.join("escape_dir")).expect("symlink");
    media
}

fn file_fetcher(dir: Option<&Path>) -> Fetcher {
    fetcher(FetchConfig { file_dir: dir.map(Path::to_path_buf), max_bytes: 1024, ..FetchConfig::default() })
}

#[tokio::test]
async fn file_urls_inside_dir_are_read() {
    let tmp = TempDir::new("inside");
    let media = file_layout(&tmp);
    let f = file_fetcher(Some(&media));
    let inside = file_url(&media.join("inside.bin"));
    assert_eq!(f.fetch(&inside).await.expect("inside"), b"inside bytes");
    // Symlink that stays inside, `.` / `..` that stay inside, and `localhost` host.
    for url in [
        file_url(&media.join("alias")),
        format!("{}/sub/../inside.bin", file_url(&media)),
        format!("{}/./inside.bin", file_url(&media)),
        format!("file://localhost{}", media.join("inside.bin").display()),
    ] {
        assert_eq!(f.fetch(&url).await.expect(&url), b"inside bytes", "{url}");
    }
    // The directory itself may be configured through a `..` path.
    let roundabout = media.join("sub").join("..");
    let f = file_fetcher(Some(&roundabout));
    assert_eq!(f.fetch(&inside).await.expect("roundabout root"), b"inside bytes");
}

#[tokio::test]
async fn file_url_escapes_are_refused() {
    let tmp = TempDir::new("escape");
    let media = file_layout(&tmp);
    let f = file_fetcher(Some(&media));
    let base = file_url(&media);
    for url in [
        format!("{base}/../outside.bin"),
        format!("{base}/%2e%2e/outside.bin"),
        format!("{base}/sub/../../outside.bin"),
        file_url(&media.join("escape")),
        format!("{base}/escape_dir/outside.bin"),
        file_url(&tmp.0.join("outside.bin")),
        "file:///etc/passwd".to_string(),
        format!("{base}/../does-not-exist.bin"),
    ] {
        let err = f.fetch(&url).await.expect_err(&url);
        assert_eq!(err, FetchError::FileOutsideDir, "{url}");
    }
}

#[tokio::test]
async fn file_url_other_errors() {
    let tmp = TempDir::new("errors");
    let media = file_layout(&tmp);
    let f = file_fetcher(Some(&media));
    let base = file_url(&media);
    let cases = [
        (format!("{base}/missing.bin"), FetchError::FileNotFound),
        (format!("{base}/sub"), FetchError::NotAFile),
        (format!("{base}/big.bin"), FetchError::TooLarge { limit: 1024 }),
    ];
    for (url, expected) in cases {
        assert_eq!(f.fetch(&url).await.expect_err(&url), expected, "{url}");
    }
    let err = f.fetch(&format!("file://remote.example.com{}", media.join("inside.bin").display())).await.expect_err("remote host");
    assert!(matches!(err, FetchError::InvalidUrl(_)), "{err:?}");
}

#[tokio::test]
async fn file_urls_refused_without_file_dir() {
    let tmp = TempDir::new("disabled");
    let media = file_layout(&tmp);
    let err = file_fetcher(None).fetch(&file_url(&media.join("inside.bin"))).await.expect_err("file:// disabled");
    assert_eq!(err, FetchError::FileDisabled);
}

// ---------------------------------------------------------------------------------------------
// Other schemes and configuration
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unsupported_urls_are_refused() {
    let f = fetcher(FetchConfig::default());
    let scheme_cases = [
        ("ftp://example.com/cat.png", "ftp"),
        ("gopher://example.com", "gopher"),
        ("javascript:alert(1)", "javascript"),
        ("C:\\images\\cat.png", "C"),
    ];
    for (url, scheme) in scheme_cases {
        let err = f.fetch(url).await.expect_err(url);
        assert_eq!(err, FetchError::UnsupportedScheme(scheme.into()), "{url}");
        assert!(err.to_string().contains("unsupported URL scheme"), "{err}");
    }
    for url in ["", "   ", "cat.png", "/tmp/cat.png", "iVBORw0KGgoAAAANSUhEUgAA", "://x", "http://", "https://[::1"] {
        let err = f.fetch(url).await.expect_err(url);
        assert!(matches!(err, FetchError::InvalidUrl(_)), "{url:?}: {err:?}");
        assert!(!err.is_config_error());
    }
    let err = f.fetch("iVBORw0KGgoAAAANSUhEUgAA").await.expect_err("raw base64");
    assert!(!err.to_string().contains("iVBORw0KGgo"), "{err}");
}

#[test]
fn invalid_config_is_a_config_error() {
    for entry in ["10.0.0.0/33", "not a host", "", "300.1.1.1"] {
        let err =
            Fetcher::new(FetchConfig { allow_list: vec!["127.0.0.1".into(), entry.into()], ..FetchConfig::default() }).expect_err(entry);
        assert!(err.is_config_error(), "{entry}: {err:?}");
        assert!(err.to_string().contains(&format!("`{entry}`")), "{entry}: {err}");
    }
    let missing = std::env::temp_dir().join("flamingo-fetch-definitely-missing-dir");
    let err = Fetcher::new(FetchConfig { file_dir: Some(missing), ..FetchConfig::default() }).expect_err("missing file_dir");
    assert!(err.is_config_error(), "{err:?}");
    let err = Fetcher::new(FetchConfig { timeout: Duration::ZERO, ..FetchConfig::default() }).expect_err("zero timeout");
    assert!(err.is_config_error(), "{err:?}");

    let cfg = FetchConfig::default();
    assert!(cfg.allow_http);
    assert_eq!(cfg.timeout, Duration::from_secs(5));
    assert_eq!(cfg.max_bytes, 20 * 1024 * 1024);
    assert_eq!(cfg.max_redirects, 3);
    assert!(cfg.allow_list.is_empty() && cfg.file_dir.is_none());
}
