//! Running the `flamingo` binary as an operator does, for tests: scratch directories, a
//! scrubbed environment, a `flamingo serve` process whose stderr is read line by line, signals,
//! and waiting until it is healthy.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Generous: the CI machine is a loaded 2-core box.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ---------------------------------------------------------------------------------------------
// Scratch directories and commands.

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name = format!("flamingo-serve-cli-{tag}-{}-{nanos}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self(path)
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Variables that would change what the binary does, removed from its environment: the server's
/// configuration, the hub's (endpoint, cache, token), the log filter, proxies (the fake hub and
/// the server are on 127.0.0.1).
pub fn is_scrubbed(key: &str) -> bool {
    let k = key.to_ascii_uppercase();
    k.starts_with("FLAMINGO_")
        || k.starts_with("HF_")
        || k.starts_with("HUGGING_FACE_")
        || k.starts_with("HUGGINGFACE_")
        || k == "RUST_LOG"
        || k.ends_with("_PROXY")
}

/// `flamingo ARGS` in `cwd` with a scrubbed environment plus `env`.
pub fn flamingo(args: &[&str], env: &[(&str, String)], cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flamingo"));
    cmd.args(args).current_dir(cwd).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(is_scrubbed) {
            cmd.env_remove(&key);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Kills (SIGKILL) and reaps the child when dropped, unless it already exited: a failing test
/// leaves no server behind.
pub struct Guard(pub Child);

impl Guard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to completion, killing it (and failing) after `timeout`.
pub fn run(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = Guard(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn flamingo"));
    let drain = |r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut r = r;
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.0.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.0.stderr.take().expect("stderr")));
    let status = child.wait_timeout(timeout);
    let Some(status) = status else {
        drop(child); // kills it, which closes the pipes
        let stderr = err.join().unwrap_or_default();
        panic!("{cmd:?} did not finish within {timeout:?}; stderr:\n{stderr}");
    };
    Output { status, stdout: out.join().expect("stdout reader"), stderr: err.join().expect("stderr reader") }
}

/// Sends SIGTERM, as `kill -TERM PID` does.
pub fn sigterm(pid: u32) {
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed: {status}");
}

// ---------------------------------------------------------------------------------------------
// A `flamingo serve` process.

pub struct Server {
    pub child: Guard,
    pub addr: SocketAddr,
    /// Every stderr line so far.
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Server {
    /// Spawns `flamingo ARGS` and reads its stderr line by line until `listening` finds the
    /// bound address in a line.
    pub fn start(args: &[&str], env: &[(&str, String)], cwd: &Path, listening: fn(&str) -> Option<SocketAddr>) -> Self {
        Self::spawn(flamingo(args, env, cwd), listening)
    }

    /// [`Server::start`] for a command made by the caller (e.g. the binary under a shell that
    /// sets limits first).
    pub fn spawn(mut cmd: Command, listening: fn(&str) -> Option<SocketAddr>) -> Self {
        let args = format!("{cmd:?}");
        let mut child = Guard(cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn flamingo serve"));
        let stderr = child.0.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                        sink.lock().expect("lines lock").push(line.clone());
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) => {
                    if let Some(addr) = listening(&line) {
                        break addr;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait_timeout(Duration::from_secs(5));
                    panic!("{args} exited ({status:?}) before listening; stderr:\n{}", lines.lock().expect("lock").join("\n"));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{args}: no `listening` line within {START_TIMEOUT:?}; stderr:\n{}", lines.lock().expect("lock").join("\n"));
                }
            }
        };
        Self { child, addr, lines, reader: Some(reader) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn stderr(&self) -> String {
        self.lines.lock().expect("lines lock").join("\n")
    }

    /// Waits for the process to exit (failing after `timeout`), then for the end of its stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let Some(status) = self.child.wait_timeout(timeout) else {
            panic!("the server did not exit within {timeout:?} of SIGTERM; stderr:\n{}", self.stderr());
        };
        if let Some(r) = self.reader.take() {
            r.join().expect("stderr reader");
        }
        (status, self.lines.lock().expect("lines lock").clone())
    }
}

/// The bound address from the JSON `listening` line (`--log-format json`: the event's fields
/// are top-level keys).
pub fn json_listening(line: &str) -> Option<SocketAddr> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["message"] != "listening" {
        return None;
    }
    Some(v["addr"].as_str().expect("`listening` has an addr field").parse().expect("addr is host:port"))
}

/// `line` without ANSI escape sequences (the text format colours its output).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The bound address from the text-format `listening` line: `... listening addr=IP:PORT model=...`.
pub fn text_listening(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains(" listening ") {
        return None;
    }
    let addr = line.split_whitespace().find_map(|w| w.strip_prefix("addr="))?;
    Some(addr.parse().expect("addr is host:port"))
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().connect_timeout(Duration::from_secs(10)).build().expect("HTTP client")
}

/// Polls GET /health until 200 (failing after [`READY_TIMEOUT`]); returns every status seen.
pub async fn wait_healthy(http: &reqwest::Client, server: &Server) -> Vec<u16> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let r = http
            .get(server.url("/health"))
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /health: {e}; stderr:\n{}", server.stderr()));
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").is_some();
        let body: Value = r.json().await.expect("/health answers JSON");
        seen.push(status);
        match status {
            200 => {
                assert_eq!(body["status"], "ok", "{body}");
                return seen;
            }
            503 => {
                assert_eq!(body["status"], "loading", "{body}");
                assert!(retry_after, "a 503 from /health carries Retry-After");
            }
            other => panic!("/health answered {other}: {body}; stderr:\n{}", server.stderr()),
        }
        assert!(Instant::now() < deadline, "not healthy within {READY_TIMEOUT:?} (statuses {seen:?}); stderr:\n{}", server.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
