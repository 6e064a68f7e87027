//! The `flamingo` binary as an operator runs it: `flamingo serve` / `flamingo download` with a
//! released checkpoint's name (the real `config/models/OpenFlamingo-3B-vitl-mpt1b.toml`), the
//! three repos it names served by a fake Hugging Face hub (`common/fake_hub.rs`) from the tiny
//! `mosaicgpt_x1` fixture, JSON and text logs read from the real stderr, and real SIGTERMs.

mod common {
    pub mod fake_hub;
    pub mod process;
}

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::fake_hub::{fixture, read, release_repos, FakeHub};
use common::process::{
    client, flamingo, json_listening, root, run, runtime, sigterm, strip_ansi, text_listening, wait_healthy, Server, TempDir, EXIT_TIMEOUT,
};
use serde_json::{json, Value};

/// The released checkpoint the tests ask for, and the repos its manifest names.
const MODEL: &str = "openflamingo/OpenFlamingo-3B-vitl-mpt1b";
const CLIP_REPO: &str = "timm/vit_large_patch14_clip_224.openai";
const LM_REPO: &str = "anas-awadalla/mpt-1b-redpajama-200b";
const CKPT_REPO: &str = "openflamingo/OpenFlamingo-3B-vitl-mpt1b";
/// Where `flamingo download` lays the model out, under `$HF_HOME`.
const MODEL_SUBDIR: &str = "flamingo/models/openflamingo--OpenFlamingo-3B-vitl-mpt1b";

/// Generous: the CI machine is a loaded 2-core box.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

fn small_png() -> PathBuf {
    root().join("tests/fixtures/images/small.png")
}

/// The environment pointing the binary at the fake hub, with a fresh cache and no token.
fn hub_env(endpoint: &str, hf_home: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("HF_ENDPOINT", endpoint.to_string()),
        ("HF_HOME", hf_home.display().to_string()),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1".to_string()),
    ]
}

/// `flamingo generate --json` on `model` with small.png and "<image>Output:", 5 tokens.
fn generate_ids(model: &Path, cwd: &Path) -> Vec<u64> {
    let model = model.to_str().expect("utf-8 path");
    let image = small_png();
    let image = image.to_str().expect("utf-8 path");
    let args = ["generate", "--json", "--model", model, "--image", image, "--prompt", "<image>Output:", "--max-new-tokens", "5"];
    let out = run(flamingo(&args, &[], cwd), COMMAND_TIMEOUT);
    assert!(out.status.success(), "flamingo generate on {model}: {}\n{}", out.status, out.stderr);
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("generate --json output {:?}: {e}", out.stdout));
    ids(&v["token_ids"])
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("token_ids is an array: {v}"))
        .iter()
        .map(|x| x.as_u64().expect("token ids are integers"))
        .collect()
}

/// The `message` of a JSON log line.
fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or("")
}

/// The request id of a JSON log line: the `request` span's field (`with_current_span`), or a
/// top-level field.
fn request_id(v: &Value) -> Option<&str> {
    v["span"]["request_id"].as_str().or_else(|| v["request_id"].as_str())
}

/// The real manifest names the repos the fake hub serves.
fn check_manifest() {
    let m = flamingo_server::hub::manifest(MODEL).unwrap_or_else(|e| panic!("manifest {MODEL}: {e}"));
    assert_eq!(m.name, MODEL);
    let s = &m.sources;
    let (Some(clip), Some(lm), Some(ck)) = (&s.clip, &s.lm, &s.checkpoint) else { panic!("{MODEL} has OpenFlamingo's three sources") };
    assert_eq!((clip.repo.as_str(), lm.repo.as_str(), ck.repo.as_str()), (CLIP_REPO, LM_REPO, CKPT_REPO));
    for src in [clip, lm, ck] {
        assert!(src.revision.as_deref().unwrap_or("main") == "main", "the fake hub serves `main` only: {src:?}");
    }
}

fn fake_hub() -> FakeHub {
    check_manifest();
    FakeHub::start(release_repos(CLIP_REPO, LM_REPO, CKPT_REPO), None)
}

/// The model directory a download laid out holds the fixture's files, and the manifest's
/// overrides in flamingo.toml.
fn check_model_dir(dir: &Path) {
    for sub in ["clip", "lm"] {
        assert!(dir.join(sub).is_dir(), "{}/{sub}/ is a directory", dir.display());
    }
    for file in ["checkpoint.pt", "flamingo.toml"] {
        assert!(dir.join(file).is_file(), "{}/{file} is a file", dir.display());
    }
    for rel in
        ["checkpoint.pt", "clip/open_clip_config.json", "clip/open_clip_pytorch_model.bin", "lm/pytorch_model.bin", "lm/tokenizer.json"]
    {
        assert_eq!(read(&dir.join(rel)), read(&fixture().join(rel)), "{rel} is the fixture's");
    }
    assert!(!dir.join("clip/open_clip_model.safetensors").exists(), "the missing safetensors alternative is not laid out");
    let text = String::from_utf8(read(&dir.join("flamingo.toml"))).expect("utf-8 flamingo.toml");
    let t: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("flamingo.toml: {e}\n{text}"));
    assert_eq!(t.get("vision").and_then(|v| v.get("quick_gelu")), Some(&toml::Value::Boolean(true)), "{text}");
    assert_eq!(t.get("cross_attn_every_n_layers"), Some(&toml::Value::Integer(1)), "{text}");
}

/// The hub saw the requests a fresh download makes: each file of the manifest, the preferred
/// CLIP safetensors (which 404s) before the .bin, weights through the LFS redirect.
fn check_download_requests(log: &[String]) {
    let get = |repo: &str, file: &str| format!("GET /{repo}/resolve/main/{file}");
    for (repo, file) in [
        (CLIP_REPO, "open_clip_config.json"),
        (CLIP_REPO, "open_clip_model.safetensors"),
        (CLIP_REPO, "open_clip_pytorch_model.bin"),
        (LM_REPO, "config.json"),
        (LM_REPO, "tokenizer.json"),
        (LM_REPO, "tokenizer_config.json"),
        (LM_REPO, "special_tokens_map.json"),
        (LM_REPO, "pytorch_model.bin"),
        (CKPT_REPO, "checkpoint.pt"),
    ] {
        assert!(log.contains(&get(repo, file)), "no request for {repo}/{file}: {log:#?}");
    }
    let pos = |file: &str| log.iter().position(|r| r == &get(CLIP_REPO, file)).expect("requested");
    assert!(pos("open_clip_model.safetensors") < pos("open_clip_pytorch_model.bin"), "{log:#?}");
    assert!(log.iter().any(|r| r.starts_with("GET /cdn/")), "weights came through the LFS redirect: {log:#?}");
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn serve_by_manifest_name_downloads_then_answers() {
    let hub = fake_hub();
    let tmp = TempDir::new("serve-by-name");
    let hf_home = tmp.join("hf");
    // A working directory without an `openflamingo/OpenFlamingo-3B-vitl-mpt1b` directory in it.
    let cwd = tmp.join("cwd");
    std::fs::create_dir_all(&cwd).expect("mkdir cwd");
    let env = hub_env(&hub.url, &hf_home);
    let model_dir = hf_home.join(MODEL_SUBDIR);

    let png = read(&small_png());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    assert!(b64.len() > 100, "small.png is a real image");
    const REQUEST_ID: &str = "serve-cli-chat-1";

    let mut server = Server::start(&["serve", "--model", MODEL, "--port", "0", "--log-format", "json"], &env, &cwd, json_listening);
    let rt = runtime();
    let server_ids = rt.block_on(async {
        let http = client();
        // 503 (loading) while downloading and loading, then 200: whichever was seen, it ends at 200.
        let seen = wait_healthy(&http, &server).await;
        assert_eq!(seen.last(), Some(&200));
        assert!(seen.iter().all(|&s| s == 503 || s == 200), "{seen:?}");
        eprintln!("/health statuses until ready: {seen:?}");
        let health: Value = http.get(server.url("/health")).send().await.expect("GET /health").json().await.expect("JSON");
        assert_eq!(health, json!({"status": "ok", "model": MODEL}));

        let r = http.get(server.url("/v1/models")).send().await.expect("GET /v1/models");
        assert_eq!(r.status(), 200);
        let models: Value = r.json().await.expect("JSON");
        assert_eq!(models["object"], "list", "{models}");
        let listed: Vec<&str> = models["data"].as_array().expect("data").iter().map(|m| m["id"].as_str().expect("id")).collect();
        assert_eq!(listed, [MODEL], "{models}");

        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}},
                {"type": "text", "text": "Output:"},
            ]}],
            "max_tokens": 5,
            "return_token_ids": true,
        });
        let r = http
            .post(server.url("/v1/chat/completions"))
            .header("x-request-id", REQUEST_ID)
            .json(&body)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .expect("POST /v1/chat/completions");
        let status = r.status();
        let echoed = r.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        let v: Value = r.json().await.expect("JSON");
        assert_eq!(status, 200, "{v}");
        assert_eq!(echoed.as_deref(), Some(REQUEST_ID), "the request id is echoed");
        assert_eq!(v["model"], MODEL, "{v}");
        let choice = &v["choices"][0];
        assert!(choice["message"]["content"].is_string(), "{v}");
        let got = ids(&choice["token_ids"]);
        assert!(!got.is_empty() && got.len() <= 5, "{v}");
        assert_eq!(v["usage"]["completion_tokens"].as_u64(), Some(got.len() as u64), "{v}");
        got
    });

    // The server loaded the directory the download laid out.
    check_model_dir(&model_dir);
    check_download_requests(&hub.requests());

    // The server's answer is `flamingo generate`'s on the downloaded model (whose flamingo.toml
    // adds quick_gelu = true, which the fixture directory lacks).
    let want = generate_ids(&model_dir, &cwd);
    assert_eq!(server_ids, want, "server vs `flamingo generate --model {}`", model_dir.display());
    let fixture_ids = generate_ids(&fixture(), &cwd);
    if fixture_ids == want {
        eprintln!("the fixture directory (quick_gelu unset) gives the same ids: {fixture_ids:?}");
    } else {
        eprintln!("the fixture directory (quick_gelu unset) gives other ids: {fixture_ids:?} vs {want:?}");
    }

    sigterm(server.child.pid());
    let (status, lines) = server.wait_exit(EXIT_TIMEOUT);
    let all = lines.join("\n");
    assert!(status.success(), "exit status after SIGTERM: {status}; stderr:\n{all}");
    drop(rt);

    // Every stderr line is a JSON log object.
    let logs: Vec<Value> = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    for v in &logs {
        assert!(v.is_object() && v["level"].is_string() && v["message"].is_string(), "log line shape: {v}");
    }
    let find = |msg: &str| logs.iter().find(|v| message(v) == msg).unwrap_or_else(|| panic!("no `{msg}` log line:\n{all}"));
    assert_eq!(find("listening")["model"], MODEL);
    assert_eq!(
        find("loading model")["dir"].as_str().map(PathBuf::from),
        Some(model_dir.clone()),
        "the server loaded the downloaded directory"
    );
    find("model ready");
    let stop = logs.iter().find(|v| message(v).starts_with("shutting down")).unwrap_or_else(|| panic!("no shutdown line:\n{all}"));
    assert_eq!(stop["reason"], "signal received", "{stop}");

    // Access logs carry a request id; the chat request's is the one the client sent.
    let access: Vec<&Value> = logs.iter().filter(|v| message(v) == "request").collect();
    assert!(access.len() >= 4, "access lines for /health (x2), /v1/models and the chat:\n{all}");
    for v in &access {
        let id = request_id(v).unwrap_or_else(|| panic!("access log line without a request_id: {v}"));
        assert!(!id.is_empty(), "{v}");
    }
    let chat = access
        .iter()
        .find(|v| request_id(v) == Some(REQUEST_ID))
        .unwrap_or_else(|| panic!("no access line with request_id {REQUEST_ID}:\n{all}"));
    assert_eq!(chat["status"], 200, "{chat}");
    assert_eq!(chat["span"]["route"], "/v1/chat/completions", "{chat}");
    // Every line logged inside a request span has its id.
    for v in logs.iter().filter(|v| v["span"]["name"] == "request") {
        assert!(request_id(v).is_some_and(|id| !id.is_empty()), "{v}");
    }

    // The image never reaches the logs.
    assert!(!all.contains(&b64[..48]) && !all.contains(&b64[b64.len() - 48..]), "the base64 image payload was logged");
    assert!(!all.contains("base64,"), "a data URL was logged");
}

#[test]
fn download_subcommand_prints_the_model_dir() {
    let hub = fake_hub();
    let tmp = TempDir::new("download");
    let hf_home = tmp.join("hf");
    let cwd = tmp.join("cwd");
    std::fs::create_dir_all(&cwd).expect("mkdir cwd");
    let env = hub_env(&hub.url, &hf_home);

    let out = run(flamingo(&["download", MODEL], &env, &cwd), COMMAND_TIMEOUT);
    assert!(out.status.success(), "flamingo download: {}\n{}", out.status, out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is one line: {:?}", out.stdout);
    let dir = PathBuf::from(lines[0]);
    assert!(dir.is_dir(), "{} exists", dir.display());
    assert_eq!(dir, hf_home.join(MODEL_SUBDIR), "the model directory under $HF_HOME");
    check_model_dir(&dir);
    let first = hub.requests();
    check_download_requests(&first);

    // Again: everything is cached, so the hub sees no request at all.
    let again = run(flamingo(&["download", MODEL], &env, &cwd), COMMAND_TIMEOUT);
    assert!(again.status.success(), "second flamingo download: {}\n{}", again.status, again.stderr);
    assert_eq!(again.stdout, out.stdout, "the same directory");
    let log = hub.requests();
    assert_eq!(log.len(), first.len(), "the second download made requests: {:#?}", &log[first.len()..]);
    check_model_dir(&dir);
}

#[test]
fn unknown_model_name_fails_clearly() {
    let hub = fake_hub();
    let tmp = TempDir::new("unknown");
    let hf_home = tmp.join("hf");
    let env = hub_env(&hub.url, &hf_home);

    let started = Instant::now();
    let out = run(flamingo(&["serve", "--model", "no/such-model", "--port", "0"], &env, &tmp.0), Duration::from_secs(20));
    assert!(!out.status.success(), "exit status {}; stderr:\n{}", out.status, out.stderr);
    assert_eq!(out.status.code(), Some(1), "an error exit, not a crash; stderr:\n{}", out.stderr);
    eprintln!("exited with {} after {:?}", out.status, started.elapsed());
    let err = strip_ansi(&out.stderr);
    assert!(err.contains("no/such-model") && err.contains("not a known model name"), "{err}");
    let known = flamingo_server::hub::manifests().expect("embedded manifests");
    assert_eq!(known.len(), 9);
    for m in &known {
        assert!(err.contains(&m.name), "stderr names the known model {}:\n{err}", m.name);
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(hub.requests().is_empty(), "an unknown name makes no hub request: {:?}", hub.requests());
    assert!(!hf_home.join("flamingo").exists(), "nothing laid out");
}

#[test]
fn sigterm_drains_an_inflight_stream() {
    let tmp = TempDir::new("drain");
    // The tiny random model (it does not stop early), default (text) logs.
    let model = root().join("tests/fixtures/models/mosaicgpt_x1");
    let model = model.to_string_lossy();
    let mut server = Server::start(&["serve", "--model", &model, "--port", "0"], &[], &tmp.0, text_listening);
    let rt = runtime();
    let (first, rest, health_body, late_chat) = rt.block_on(async {
        let http = client();
        wait_healthy(&http, &server).await;

        let body = json!({"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 1000, "stream": true});
        let mut resp = http.post(server.url("/v1/chat/completions")).json(&body).send().await.expect("POST stream");
        assert_eq!(resp.status(), 200);
        let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        assert!(ctype.starts_with("text/event-stream"), "{ctype}");
        let first = resp.chunk().await.expect("first chunk").expect("the stream has a first chunk");
        let first = String::from_utf8_lossy(&first).into_owned();
        assert!(first.starts_with("data: {"), "{first}");

        sigterm(server.child.pid());

        // Read the rest of the stream concurrently.
        let reader = tokio::spawn(async move {
            let mut text = Vec::new();
            while let Some(chunk) = resp.chunk().await.expect("stream chunk") {
                text.extend_from_slice(&chunk);
            }
            String::from_utf8_lossy(&text).into_owned()
        });

        // New requests now get 503; the signal takes a moment to arrive.
        let deadline = Instant::now() + Duration::from_secs(10);
        let health_body = loop {
            let r = http
                .get(server.url("/health"))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET /health while draining: {e}; stderr:\n{}", server.stderr()));
            let status = r.status().as_u16();
            if status == 503 {
                assert!(r.headers().get("retry-after").is_some(), "503 carries Retry-After");
                break r.json::<Value>().await.expect("JSON");
            }
            assert_eq!(status, 200, "before the signal is handled /health is 200");
            assert!(Instant::now() < deadline, "/health never answered 503 after SIGTERM; stderr:\n{}", server.stderr());
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        assert!(!reader.is_finished(), "the stream was still running when /health said 503");
        let late = http
            .post(server.url("/v1/chat/completions"))
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("POST while draining");
        let late = (late.status().as_u16(), late.json::<Value>().await.expect("JSON"));
        let rest = tokio::time::timeout(Duration::from_secs(120), reader).await.expect("stream ends").expect("reader task");
        (first, rest, health_body, late)
    });
    drop(rt);

    assert_eq!(health_body["status"], "shutting_down", "{health_body}");
    assert_eq!(late_chat.0, 503, "a new request while draining: {}", late_chat.1);

    // The stream ran to its end: content after the signal, a finish reason, then [DONE].
    let stream = format!("{first}{rest}");
    let events: Vec<&str> = stream
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data event: {e:?}")))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "the stream ends with [DONE]; last events: {:?}", &events[events.len().saturating_sub(3)..]);
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("chunk {e}: {err}"))).collect();
    for c in &chunks {
        assert!(c.get("error").is_none(), "an error in the stream: {c}");
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
    }
    let finish = &chunks.last().expect("chunks")["choices"][0]["finish_reason"];
    assert!(finish == "length" || finish == "stop", "the last chunk carries the finish reason: {finish}");
    let after_signal = rest.matches("\"content\":").count();
    assert!(after_signal > 10, "generation continued after SIGTERM ({after_signal} content chunks)");

    let (status, lines) = server.wait_exit(EXIT_TIMEOUT);
    let text: Vec<String> = lines.iter().map(|l| strip_ansi(l)).collect();
    let all = text.join("\n");
    assert!(status.success(), "exit status after SIGTERM: {status}; stderr:\n{all}");
    let stop = text.iter().find(|l| l.contains("shutting down")).unwrap_or_else(|| panic!("no shutdown line:\n{all}"));
    assert!(stop.contains("reason=\"signal received\"") || stop.contains("reason=signal received"), "{stop}");
    assert!(stop.contains("inflight=1"), "the stream was in flight when draining started: {stop}");
    assert!(!text.iter().any(|l| l.contains("grace period over")), "the stream finished within the grace period:\n{all}");
}
