//! Faults an operator's server meets, survived: a panic inside the engine (a bug) fails the
//! requests it was running with a 500 (a stream under way with an error event), is logged and
//! counted, and the server keeps serving; a full disk refuses a demonstration set with a clear
//! error and loses none already stored; the logs never carry an API key or an image; SIGTERM
//! under load drains every in-flight stream and refuses new requests with 503.

mod common {
    pub mod process;
}

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::process::{client, flamingo, json_listening, root, runtime, sigterm, wait_healthy, Server, TempDir, EXIT_TIMEOUT};
use flamingo_engine::fault::PanicOnToken;
use flamingo_server::config::Config;
use flamingo_server::server::{router, AppState};
use flamingo_server::state::Runtime;
use serde_json::{json, Value};

fn model_dir() -> PathBuf {
    root().join("tests/fixtures/models/mosaicgpt_x1")
}

fn data_url(name: &str) -> String {
    let bytes = std::fs::read(root().join("tests/fixtures/images").join(name)).expect("fixture image");
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn chat_with_image(text: &str, image: &str) -> Value {
    json!({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": text},
    ]}]})
}

/// The log lines the test process writes (the in-process server's), kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_inside_the_engine_is_a_500_and_the_server_goes_on() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).init();

    // The model panics when the token of "@" reaches it.
    let dir = model_dir();
    let tokenizer = flamingo_model::FlamingoTokenizer::from_lm_dir(&dir.join("lm")).expect("tokenizer");
    let trigger = tokenizer.encode_text("@").expect("encode");
    let &[trigger] = trigger.as_slice() else { panic!("`@` is one token: {trigger:?}") };
    let normal = tokenizer.encode_text("Output: a photo of a cat dog").expect("encode");
    assert!(!normal.contains(&trigger), "the normal prompts do not hold the trigger");

    let mut cfg = Config::defaults();
    cfg.server.served_model_name = "m".into();
    let st = AppState::new(cfg.clone(), "m".into()).expect("state");
    let rt = Runtime::load_with(&dir, &cfg, &(), |model| PanicOnToken { inner: model, trigger }).expect("model loads");
    st.install(rt).expect("installed");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = router(st.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let post = |path: &'static str, body: Value| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http.post(format!("{base}{path}")).json(&body).send().await.expect("request");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let image = data_url("small.png");

    let (status, v) = post("/v1/chat/completions", chat_with_image("Output: @", &image)).await;
    assert_eq!(status, 500, "{v}");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("panicked"), "{v}");
    // The server goes on: chat, completions and scoring are served, again after a second panic.
    for round in 0..2 {
        let (status, v) = post("/v1/chat/completions", chat_with_image("Output: a photo of", &image)).await;
        assert_eq!(status, 200, "round {round}: {v}");
        let (status, v) = post("/v1/completions", json!({"prompt": "A photo of", "max_tokens": 3})).await;
        assert_eq!(status, 200, "round {round}: {v}");
        let (status, v) = post("/v1/completions", json!({"prompt": "A photo of @", "max_tokens": 3})).await;
        assert_eq!(status, 500, "round {round}: {v}");
    }
    let (status, v) = post("/v1/score", json!({"prompt": "A photo of", "candidates": [" a cat", " @ cat"]})).await;
    assert_eq!(status, 500, "a scoring pass over the trigger panics too: {v}");
    let (status, v) = post("/v1/score", json!({"prompt": "A photo of", "candidates": [" a cat", " a dog"]})).await;
    assert_eq!(status, 200, "{v}");
    // A stream is under way (headers sent) when the step panics: it ends with an error event.
    let mut streamed = chat_with_image("Output: @", &image);
    streamed["stream"] = json!(true);
    let r = http.post(format!("{base}/v1/chat/completions")).json(&streamed).send().await.expect("request");
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.expect("stream");
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let last: Value = serde_json::from_str(events.last().copied().unwrap_or("null")).unwrap_or(Value::Null);
    assert_eq!(last["error"]["type"], "server_error", "{text}");
    assert!(last["error"]["message"].as_str().unwrap_or("").contains("panicked"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");

    // Counted and logged; nothing left running or waiting.
    let metrics = http.get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("text");
    let panics: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("flamingo_panics_total{") && l.contains("where=\"engine\""))
        .filter_map(|l| l.rsplit(" ").next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(panics, 5.0, "{metrics}");
    let text = logs.text();
    assert_eq!(text.matches("the engine panicked in a scheduling step").count(), 5, "{text}");
    assert!(text.contains("fault injection"), "the panic's message is logged: {text}");
    // The engine thread updates its counts just after it answers the step's last request, so
    // the test waits (a bounded time) for it to settle.
    let stats = st.engine_stats().expect("loaded");
    let engine = &st.model().expect("loaded").engine;
    let settled = async {
        while stats.running.load(std::sync::atomic::Ordering::SeqCst) != 0 || engine.waiting() != 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let idle = tokio::time::timeout(std::time::Duration::from_secs(10), settled).await;
    assert!(
        idle.is_ok(),
        "nothing left running ({}) or waiting ({})",
        stats.running.load(std::sync::atomic::Ordering::SeqCst),
        engine.waiting()
    );
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// The binary, as an operator runs it.

/// `flamingo ARGS` started by bash after `prelude` (e.g. `ulimit`), in the same scrubbed
/// environment as [`flamingo`].
fn flamingo_after(prelude: &str, args: &[&str], env: &[(&str, String)], cwd: &Path) -> Command {
    let bin = flamingo(args, env, cwd);
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!("{prelude}; exec \"$0\" \"$@\"")).arg(bin.get_program()).args(bin.get_args()).current_dir(cwd);
    for (k, v) in bin.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.stdin(std::process::Stdio::null());
    cmd
}

fn stored_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("demonstrations"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn example(image: &str, answer: &str) -> Value {
    json!({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Output:"}]},
        {"role": "assistant", "content": answer},
    ]})
}

/// The disk fills up: `ulimit -f` caps the size of every file the server writes (with SIGXFSZ
/// ignored, a write past it fails with EFBIG as one on a full disk fails with ENOSPC). A set
/// too large to write is refused with 507 and nothing registered; the set stored before it is
/// still served, no partial or temporary file is left, and a restarted server restores it.
#[test]
fn a_full_disk_refuses_a_set_and_loses_none_stored() {
    let tmp = TempDir::new("disk-full");
    let data = tmp.join("data");
    let model = model_dir();
    let args = ["serve", "--model", model.to_str().expect("utf-8"), "--port", "0", "--log-format", "json"];
    let env = [("FLAMINGO_STORAGE_DIR", data.display().to_string())];
    // 160 KiB per file: a set with one small image fits, one with two large ones does not.
    let cmd = flamingo_after("trap '' XFSZ; ulimit -f 160", &args, &env, &tmp.0);
    let mut server = Server::spawn(cmd, json_listening);
    let rt = runtime();
    let small = rt.block_on(async {
        let http = client();
        wait_healthy(&http, &server).await;
        let register = |examples: Value| {
            let http = http.clone();
            let url = server.url("/v1/demonstrations");
            async move {
                let r = http.post(url).json(&json!({"examples": examples})).send().await.expect("register");
                (r.status().as_u16(), r.json::<Value>().await.expect("JSON"))
            }
        };
        let (status, small) = register(json!([example(&data_url("small.png"), "a thing.")])).await;
        assert_eq!(status, 201, "{small}");
        let big = json!([example(&data_url("chelsea.png"), "a cat."), example(&data_url("coffee.png"), "a cup.")]);
        let (status, e) = register(big).await;
        assert_eq!(status, 507, "{e}");
        let message = e["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("could not be stored") && message.contains("nothing was registered"), "{e}");
        // Only the first set is known, and it is served.
        let list: Value = http.get(server.url("/v1/demonstrations")).send().await.expect("list").json().await.expect("JSON");
        let ids: Vec<&str> = list["data"].as_array().expect("data").iter().filter_map(|s| s["id"].as_str()).collect();
        assert_eq!(ids, [small["id"].as_str().expect("id")], "{list}");
        let mut body = chat_with_image("Output:", &data_url("camera.png"));
        body["demonstrations"] = json!({"id": small["id"]});
        let r = http.post(server.url("/v1/chat/completions")).json(&body).send().await.expect("chat");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        small
    });
    let id = small["id"].as_str().expect("id").to_string();
    assert_eq!(stored_files(&data), [format!("{id}.json")], "one whole file; no partial or temporary one");
    sigterm(server.child.pid());
    let (status, lines) = server.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "{status}: {}", lines.join("\n"));

    // A restart (without the limit) restores the stored set.
    let mut server = Server::start(&args, &env, &tmp.0, json_listening);
    rt.block_on(async {
        let http = client();
        wait_healthy(&http, &server).await;
        let r = http.get(server.url(&format!("/v1/demonstrations/{id}"))).send().await.expect("get");
        assert_eq!(r.status(), 200);
        let mut body = chat_with_image("Output:", &data_url("camera.png"));
        body["demonstrations"] = json!({"id": id});
        let r = http.post(server.url("/v1/chat/completions")).json(&body).send().await.expect("chat");
        assert_eq!(r.status(), 200);
    });
    sigterm(server.child.pid());
    server.wait_exit(EXIT_TIMEOUT);
}

/// With debug logging on, nothing a client sends as a secret or as media reaches the logs: not
/// the API keys (right or wrong), not image bytes (valid, broken or in a registered set), not
/// a password in an image URL.
#[test]
fn logs_never_carry_api_keys_or_media() {
    const KEY: &str = "sk-first-7f3a9c1e5b";
    const OTHER: &str = "sk-second-0b5d88a2";
    const WRONG: &str = "sk-guess-44e2c6d1f0";
    const PASSWORD: &str = "hunter2-pw-9d1c";
    let tmp = TempDir::new("secrets");
    let model = model_dir();
    let args = ["serve", "--model", model.to_str().expect("utf-8"), "--port", "0", "--log-format", "json"];
    let env = [
        ("RUST_LOG", "debug".to_string()),
        ("FLAMINGO_SERVER_API_KEYS", format!("{KEY},{OTHER}")),
        ("FLAMINGO_STORAGE_DIR", tmp.join("data").display().to_string()),
    ];
    let mut server = Server::start(&args, &env, &tmp.0, json_listening);
    let image = data_url("small.png");
    let payload = image.split_once(',').map(|(_, p)| p.to_string()).expect("payload");
    let broken = format!("data:image/png;base64,{}", &payload[..payload.len() / 2]);
    let rt = runtime();
    rt.block_on(async {
        let http = client();
        wait_healthy(&http, &server).await;
        let post = |path: &str, key: &str, body: Value| http.post(server.url(path)).bearer_auth(key).json(&body).send();
        let status = |r: reqwest::Response| r.status().as_u16();
        assert_eq!(status(http.get(server.url("/v1/models")).bearer_auth(WRONG).send().await.expect("models")), 401);
        assert_eq!(status(http.get(server.url("/metrics")).send().await.expect("metrics")), 401);
        assert_eq!(status(post("/v1/chat/completions", KEY, chat_with_image("Output:", &image)).await.expect("chat")), 200);
        assert_eq!(status(post("/v1/chat/completions", OTHER, chat_with_image("Output:", &broken)).await.expect("chat")), 400);
        let url = format!("http://user:{PASSWORD}@127.0.0.1:9/x.png");
        assert_eq!(status(post("/v1/chat/completions", KEY, chat_with_image("Output:", &url)).await.expect("chat")), 400);
        let set = json!({"examples": [example(&image, "a thing.")]});
        assert_eq!(status(post("/v1/demonstrations", KEY, set).await.expect("register")), 201);
        let r = post("/v1/completions", OTHER, json!({"prompt": "<image>Output:", "images": [image], "max_tokens": 2})).await;
        assert_eq!(status(r.expect("completion")), 200);
    });
    sigterm(server.child.pid());
    let (_, lines) = server.wait_exit(EXIT_TIMEOUT);
    let all = lines.join("\n");
    assert!(lines.len() > 10 && all.contains("\"level\":\"DEBUG\""), "debug logging was on:\n{all}");
    for secret in [KEY, OTHER, WRONG, PASSWORD] {
        assert!(!all.contains(secret), "`{secret}` was logged:\n{all}");
    }
    for (i, chunk) in payload.as_bytes().chunks(32).enumerate().filter(|(_, c)| c.len() == 32) {
        let chunk = std::str::from_utf8(chunk).expect("base64 is ASCII");
        assert!(!all.contains(chunk), "image bytes were logged (chunk {i}: {chunk})");
    }
    assert!(!all.contains("base64,"), "a data URL was logged");
}

/// SIGTERM with several streams in flight: every one of them runs to its end, new requests get
/// 503 meanwhile, and the server exits cleanly.
#[test]
fn sigterm_under_load_drains_every_stream() {
    const STREAMS: usize = 6;
    const TOKENS: usize = 1000;
    let tmp = TempDir::new("drain-load");
    let model = model_dir();
    let args = ["serve", "--model", model.to_str().expect("utf-8"), "--port", "0", "--log-format", "json"];
    let mut server = Server::start(&args, &[], &tmp.0, json_listening);
    let rt = runtime();
    rt.block_on(async {
        let http = client();
        wait_healthy(&http, &server).await;
        let mut streams = Vec::new();
        for i in 0..STREAMS {
            let body = json!({"messages": [{"role": "user", "content": format!("stream {i}")}], "max_tokens": TOKENS, "ignore_eos": true, "stream": true});
            let mut r = http.post(server.url("/v1/chat/completions")).json(&body).send().await.expect("stream");
            assert_eq!(r.status(), 200);
            let first = r.chunk().await.expect("chunk").expect("a first chunk");
            streams.push(tokio::spawn(async move {
                let mut text = first.to_vec();
                while let Some(c) = r.chunk().await.expect("stream chunk") {
                    text.extend_from_slice(&c);
                }
                String::from_utf8_lossy(&text).into_owned()
            }));
        }
        sigterm(server.child.pid());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = http
                .post(server.url("/v1/chat/completions"))
                .json(&json!({"messages": [{"role": "user", "content": "late"}], "max_tokens": 1}))
                .send()
                .await
                .expect("a late request is answered");
            if r.status() == 503 {
                assert!(r.headers().get("retry-after").is_some());
                break;
            }
            assert_eq!(r.status(), 200, "before the signal is handled");
            assert!(Instant::now() < deadline, "no 503 after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (i, s) in streams.into_iter().enumerate() {
            let text = tokio::time::timeout(Duration::from_secs(120), s).await.expect("stream ends").expect("reader");
            assert!(text.trim_end().ends_with("data: [DONE]"), "stream {i} ran to its end: ...{}", &text[text.len().saturating_sub(200)..]);
            assert!(!text.contains("\"error\""), "stream {i} carried an error");
            assert!(text.contains("\"finish_reason\":\"length\""), "stream {i} generated all its tokens");
        }
    });
    let (status, lines) = server.wait_exit(EXIT_TIMEOUT);
    let all = lines.join("\n");
    assert!(status.success(), "{status}: {all}");
    // The drain began with every stream in flight (and perhaps a late request sent just before
    // the signal was handled).
    let drain = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"].as_str().is_some_and(|m| m.starts_with("shutting down")))
        .unwrap_or_else(|| panic!("no shutdown line:\n{all}"));
    assert!(drain["inflight"].as_u64().is_some_and(|n| n >= STREAMS as u64), "{drain}");
}
