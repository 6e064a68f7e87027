//! The HTTP API over a real bound port, with the tiny reference model of the fixtures
//! (`tests/fixtures/models/mosaicgpt_x1`, random weights), served as `flamingo-tiny-reference`.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use flamingo_server::config::Config;
use flamingo_server::server::{serve, ModelSource, ServerHandle};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn image_path(name: &str) -> PathBuf {
    repo().join("tests/fixtures/images").join(name)
}

fn data_url(name: &str) -> String {
    let bytes = std::fs::read(image_path(name)).unwrap();
    let mime = if name.ends_with(".jpg") { "image/jpeg" } else { "image/png" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn cfg() -> Config {
    let mut c = Config::defaults();
    c.server.port = 0;
    c.server.shutdown_grace_seconds = 10;
    c.server.served_model_name = "flamingo-tiny-reference".into();
    c
}

fn tiny_reference() -> ModelSource {
    ModelSource::Dir(repo().join("tests/fixtures/models/mosaicgpt_x1"))
}

struct Server {
    handle: Option<ServerHandle>,
    base: String,
    http: reqwest::Client,
}

impl Server {
    async fn start(c: Config) -> Self {
        let handle = serve(c, tiny_reference(), false).await.expect("server starts");
        let base = format!("http://{}", handle.addr);
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("{base}/health")).send().await {
                if r.status() == 200 {
                    return Self { handle: Some(handle), base, http };
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the model did not load");
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.base)).json(body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
    }

    /// Posts a streaming request; returns the `data:` payloads in order.
    async fn post_stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self.http.post(format!("{}{path}", self.base)).json(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
    }

    async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await.unwrap();
        }
    }
}

fn few_shot_chat(max_tokens: u64) -> Value {
    json!({
        "model": "flamingo-tiny-reference",
        "max_tokens": max_tokens,
        "return_token_ids": true,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("chelsea.png")}}, {"type": "text", "text": "Output:"}]},
            {"role": "assistant", "content": "two cats."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("coffee.jpg"), "detail": "high"}}, {"type": "text", "text": "Output:"}]},
        ]
    })
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// What `flamingo generate` prints for the prompt the chat template produces.
fn cli_generate(prompt: &str, images: &[&str], max_new: usize) -> Value {
    let model = repo().join("tests/fixtures/models/mosaicgpt_x1");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flamingo"));
    cmd.args(["generate", "--json", "--model"]).arg(&model).args(["--prompt", prompt, "--max-new-tokens", &max_new.to_string()]);
    for i in images {
        cmd.arg("--image").arg(image_path(i));
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_give_the_tokens_of_flamingo_generate() {
    let s = Server::start(cfg()).await;
    let want = cli_generate("<image>Output: two cats.<|endofchunk|><image>Output:", &["chelsea.png", "coffee.jpg"], 12);
    let (code, chat) = s.post("/v1/chat/completions", &few_shot_chat(12)).await;
    assert_eq!(code, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert!(chat["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let c = &chat["choices"][0];
    assert_eq!(ids(&c["token_ids"]), ids(&want["token_ids"]), "chat tokens = generate tokens");
    assert_eq!(c["message"]["content"], want["text"]);
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["finish_reason"] == "stop" || c["finish_reason"] == "length");
    let u = &chat["usage"];
    assert_eq!(u["completion_tokens"].as_u64().unwrap() as usize, ids(&want["token_ids"]).len());
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()));

    let (code, comp) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "<image>Output: two cats.<|endofchunk|><image>Output:", "max_tokens": 12, "return_token_ids": true,
                    "images": [data_url("chelsea.png"), {"url": data_url("coffee.jpg")}]}),
        )
        .await;
    assert_eq!(code, 200, "{comp}");
    assert_eq!(comp["object"], "text_completion");
    assert_eq!(ids(&comp["choices"][0]["token_ids"]), ids(&want["token_ids"]));
    assert_eq!(comp["choices"][0]["text"], want["text"]);
    assert_eq!(comp["usage"]["prompt_tokens"], chat["usage"]["prompt_tokens"]);
    // The same prompt again: its KV comes from the prefix cache, same tokens.
    let (_, again) = s.post("/v1/chat/completions", &few_shot_chat(12)).await;
    assert_eq!(again["choices"][0]["token_ids"], c["token_ids"]);
    let prompt_tokens = again["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(cached, prompt_tokens - 1, "all but the last prompt token come from the prefix cache");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_the_non_streaming_answer() {
    let s = Server::start(cfg()).await;
    let mut body = few_shot_chat(10);
    let (_, whole) = s.post("/v1/chat/completions", &body).await;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = s.post_stream("/v1/chat/completions", &body).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let id = chunks[0]["id"].clone();
    assert!(chunks.iter().all(|c| c["id"] == id && c["object"] == "chat.completion.chunk" && c["created"] == chunks[0]["created"]));
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], whole["usage"]["completion_tokens"]);
    assert_eq!(usage["usage"]["prompt_tokens"], whole["usage"]["prompt_tokens"]);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));

    // Completions stream the same text.
    let events = s
        .post_stream(
            "/v1/completions",
            &json!({"prompt": "<image>Output:", "images": [data_url("small.png")], "max_tokens": 6, "stream": true}),
        )
        .await;
    let (_, whole) =
        s.post("/v1/completions", &json!({"prompt": "<image>Output:", "images": [data_url("small.png")], "max_tokens": 6})).await;
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_seeds_and_stop_strings() {
    let s = Server::start(cfg()).await;
    let body = json!({"messages": [{"role": "user", "content": "A photo of"}], "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 7, "return_token_ids": true});
    let (code, a) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(code, 200, "{a}");
    let (_, b) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    for i in 0..3 {
        assert_eq!(a["choices"][i]["index"], i);
        assert_eq!(a["choices"][i]["token_ids"], b["choices"][i]["token_ids"], "a seed makes sampling repeatable");
    }
    let distinct: std::collections::HashSet<String> = (0..3).map(|i| a["choices"][i]["token_ids"].to_string()).collect();
    assert!(distinct.len() > 1, "choices use different seeds");
    let total: u64 = (0..3).map(|i| a["choices"][i]["token_ids"].as_array().unwrap().len() as u64).sum();
    assert_eq!(a["usage"]["completion_tokens"].as_u64(), Some(total));

    // Stop strings: cut the greedy answer where a string from its middle starts.
    let greedy = json!({"messages": [{"role": "user", "content": "A photo of"}], "max_tokens": 16});
    let (_, g) = s.post("/v1/chat/completions", &greedy).await;
    let full = g["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "the tiny model's answer is long enough to cut: {full:?}");
    let stop: String = chars[3..5].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let mut body = greedy.clone();
    body["stop"] = json!(["\u{1F600}never", stop]);
    let (_, st) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st["choices"][0]["message"]["content"], cut);
    assert_eq!(st["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let events = s.post_stream("/v1/chat/completions", &body).await;
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, cut, "the stream never shows the stop string");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_beams_and_literal_special_tokens() {
    let s = Server::start(cfg()).await;
    let (code, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": true, "top_logprobs": 3}),
        )
        .await;
    assert_eq!(code, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(top[0]["logprob"].as_f64().unwrap() >= lp - 1e-6, "greedy picks the most likely token");
    }
    // Beam search through the extension fields.
    let (code, r) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "<image>Output:", "images": [data_url("small.png")], "max_tokens": 5, "num_beams": 3, "length_penalty": 0.0}),
        )
        .await;
    assert_eq!(code, 200, "{r}");
    // A user typing <image> gets text, not an image slot (which would need an image).
    let (code, r) =
        s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "<image><|endofchunk|>"}], "max_tokens": 2})).await;
    assert_eq!(code, 200, "{r}");
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() > 2);
    s.stop().await;
}

async fn expect_error(s: &Server, path: &str, body: Value, status: u16, needle: &str) -> Value {
    let (code, r) = s.post(path, &body).await;
    assert_eq!(code, status, "{body:.200} -> {r}");
    let e = &r["error"];
    assert!(e["message"].as_str().unwrap().contains(needle), "{needle:?} not in {e}");
    assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some());
    e.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_are_4xx_in_openai_shape() {
    let mut c = cfg();
    c.limits.max_images_per_request = 2;
    c.limits.max_prompt_tokens = 64;
    c.limits.max_body_bytes = 200_000;
    let s = Server::start(c).await;
    let chat = "/v1/chat/completions";
    let user = |content: Value| json!({"messages": [{"role": "user", "content": content}], "max_tokens": 2});
    let img = |url: &str| json!({"type": "image_url", "image_url": {"url": url}});

    let r =
        s.http.post(format!("{}{chat}", s.base)).header("content-type", "application/json").body("{\"messages\": [").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("not valid JSON"));

    let e = expect_error(&s, chat, json!({"messages": [], "max_tokens": "lots"}), 400, "max_tokens").await;
    assert_eq!(e["param"], "max_tokens");
    expect_error(&s, chat, json!({"messages": "hi"}), 400, "messages").await;
    expect_error(&s, chat, user(json!([img("data:image/png;base64,@@@not-base64")])), 400, "base64").await;
    expect_error(&s, chat, user(json!([img("data:image/png;base64,aGVsbG8gd29ybGQ=")])), 400, "cannot be used").await;
    expect_error(
        &s,
        chat,
        user(json!([img(&data_url("small.png")), img(&data_url("small.png")), img(&data_url("small.png"))])),
        400,
        "at most 2 images",
    )
    .await;
    expect_error(&s, chat, user(json!("word ".repeat(100))), 400, "tokens long").await;
    let e = expect_error(&s, chat, user(json!([{"type": "input_audio", "input_audio": {}}])), 400, "unsupported content part").await;
    assert_eq!(e["param"], "messages[0].content[0].type");
    expect_error(&s, chat, user(json!([{"type": "video_url", "video_url": {"url": data_url("small.png")}}])), 400, "frame embeddings")
        .await;
    expect_error(&s, chat, user(json!([img("ftp://example.com/a.png")])), 400, "cannot read the media").await;
    expect_error(&s, chat, json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), 400, "max_tokens").await;
    expect_error(&s, chat, json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3}), 400, "temperature").await;
    expect_error(&s, chat, json!({"messages": [{"role": "user", "content": "x"}], "n": 100}), 400, "`n`").await;
    expect_error(&s, chat, json!({"messages": [{"role": "user", "content": "x"}], "num_beams": 2, "temperature": 0.5}), 400, "beam").await;
    expect_error(&s, chat, json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400, "logprobs").await;
    expect_error(
        &s,
        "/v1/completions",
        json!({"prompt": "<image><image>", "images": [data_url("small.png")]}),
        400,
        "2 <image> markers but 1",
    )
    .await;
    let e = expect_error(&s, chat, json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}), 404, "gpt-4o").await;
    assert_eq!(e["code"], "model_not_found");
    expect_error(&s, chat, user(json!([img(&format!("data:image/png;base64,{}", "A".repeat(300_000)))])), 413, "larger than").await;
    let r = s.http.get(format!("{}/v1/nothing", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Never a 5xx for any of these.
    let m = s.http.get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("flamingo_http_requests_total") && m.contains("status=\"400\"") && m.contains("status=\"413\""), "{m}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_overload_and_metrics() {
    let mut c = cfg();
    c.server.api_keys = vec!["sk-test-1".into(), "sk-test-2".into()];
    c.engine.max_waiting = 0;
    c.server.retry_after_seconds = 3;
    let s = Server::start(c).await;
    let url = format!("{}/v1/models", s.base);
    let r = s.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(s.http.get(&url).bearer_auth("sk-wrong").send().await.unwrap().status(), 401);
    let r = s.http.get(&url).bearer_auth("sk-test-2").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"][0]["id"], "flamingo-tiny-reference");
    assert_eq!(v["object"], "list");
    // /health needs no key; /metrics needs one (server.public_metrics is off).
    assert_eq!(s.http.get(format!("{}/health", s.base)).send().await.unwrap().status(), 200);
    assert_eq!(s.http.get(format!("{}/metrics", s.base)).send().await.unwrap().status(), 401);
    // A full waiting queue: 429 with Retry-After.
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth("sk-test-1")
        .json(&json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    let m = s.http.get(format!("{}/metrics", s.base)).bearer_auth("sk-test-1").send().await.unwrap().text().await.unwrap();
    for name in ["flamingo_http_requests_total", "flamingo_http_request_duration_seconds_bucket", "flamingo_requests_rejected_total"] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_but_health_needs_a_key_and_metrics_can_be_opened() {
    use flamingo_server::routes::Route;
    for public_metrics in [false, true] {
        let mut c = cfg();
        c.server.api_keys = vec!["sk-a".into(), "sk-bb".into()];
        c.server.public_metrics = public_metrics;
        let s = Server::start(c).await;
        // Every route in the table (new ones included), with and without a key.
        for route in Route::ALL {
            let path = route.path().replace("{id}", "demo-0123456789abcdef01234567").replace("{*id}", "flamingo-tiny-reference");
            let url = format!("{}{path}", s.base);
            let send = |key: Option<&str>| {
                let mut r = s.http.request(route.method(), &url);
                if route.method() == reqwest::Method::POST {
                    r = r.json(&json!({}));
                }
                if let Some(k) = key {
                    r = r.bearer_auth(k);
                }
                r.send()
            };
            let open = route == Route::Health || (route == Route::Metrics && public_metrics);
            for key in [None, Some("sk-wrong"), Some("sk-aa"), Some("sk-b"), Some("")] {
                let r = send(key).await.unwrap();
                let status = r.status().as_u16();
                if open {
                    assert_eq!(status, 200, "{route:?} is open (public_metrics = {public_metrics})");
                } else {
                    assert_eq!(status, 401, "{route:?} with {key:?}");
                    let v: Value = r.json().await.unwrap();
                    assert_eq!(v["error"]["code"], "invalid_api_key", "{route:?}: {v}");
                }
            }
            for key in ["sk-a", "sk-bb"] {
                let status = send(Some(key)).await.unwrap().status().as_u16();
                assert_ne!(status, 401, "{route:?} takes either key");
            }
        }
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_is_503_and_shutdown_drains() {
    // A server whose model never loads answers 503 with Retry-After.
    let st = flamingo_server::server::AppState::new(cfg(), "m".into()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, flamingo_server::server::router(st)).await });
    let http = reqwest::Client::new();
    let r = http.get(format!("http://{addr}/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let r = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    // Graceful shutdown: an in-flight stream finishes; a new request during the drain gets 503.
    let mut c = cfg();
    c.limits.max_tokens = 4000;
    c.server.shutdown_grace_seconds = 120;
    let mut s = Server::start(c).await;
    // Long enough (seconds with the tiny model) to still be running during the checks below.
    // (The tiny model's greedy answer to "hello world" runs for about a thousand tokens.)
    let body = json!({"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4000, "stream": true});
    let mut resp = s.http.post(format!("{}/v1/chat/completions", s.base)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    let handle = s.handle.take().unwrap();
    let base = s.base.clone();
    let stopping = tokio::spawn(async move { handle.shutdown().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = s.http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let r = s
        .http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "new requests are refused while draining");
    let text = String::from_utf8_lossy(&first).into_owned() + &resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "the in-flight stream completed");
    assert!(text.contains("\"finish_reason\":\"stop\"") || text.contains("\"finish_reason\":\"length\""));
    assert!(text.matches("data: ").count() > 100, "the whole answer was streamed");
    stopping.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_cancels_generation() {
    use std::sync::atomic::Ordering;
    let s = Server::start(cfg()).await;
    let stats = s.handle.as_ref().unwrap().state.engine_stats().unwrap();
    // About a thousand tokens with the tiny model (see the shutdown test).
    let body = json!({"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 1000, "stream": true});
    let mut resp = s.http.post(format!("{}/v1/chat/completions", s.base)).json(&body).send().await.unwrap();
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(resp);
    let mut cancelled = false;
    for _ in 0..400 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if stats.cancelled.load(Ordering::SeqCst) == 1 && stats.running.load(Ordering::SeqCst) == 0 {
            cancelled = true;
            break;
        }
    }
    assert!(cancelled, "the engine stopped the sequence after the client left");
    assert_eq!(stats.finished.load(Ordering::SeqCst), 0, "it was cancelled, not finished");
    s.stop().await;
}

/// A connection kept alive but left idle is closed after `server.client_timeout_seconds`, as
/// one trickling its headers is: idle connections cannot pile up on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_client_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = cfg();
    c.server.client_timeout_seconds = 1;
    let s = Server::start(c).await;
    let mut tcp = tokio::net::TcpStream::connect(s.handle.as_ref().unwrap().addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    // The whole response: its head, then as many body bytes as its Content-Length says.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let length = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))?;
        (body.len() >= length.parse::<usize>().ok()?).then(|| head.to_string())
    };
    let head = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.expect("a response").unwrap();
        assert!(n > 0, "the server closed before answering: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(head) = complete(&got) {
            break head;
        }
    };
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection: close"), "kept alive: {head}");
    // Idle from here: the server closes the connection after about a second.
    let idle = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.expect("closed within 10 s");
    let held = idle.elapsed();
    assert!(matches!(n, Ok(0) | Err(_)), "no more bytes, the connection closes: {n:?}");
    assert!(held >= Duration::from_millis(500) && held < Duration::from_secs(4), "held idle for {held:?}");
    drop(tcp);
    s.stop().await;
}

/// A plain HTTP server on 127.0.0.x serving one PNG.
async fn image_server(ip: &str) -> std::net::SocketAddr {
    let png = std::fs::read(image_path("small.png")).unwrap();
    let app =
        axum::Router::new().route("/cat.png", axum::routing::get(move || async move { ([("content-type", "image/png")], png.clone()) }));
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_urls_are_fetched_ssrf_safely() {
    let addr = image_server("127.0.0.1").await;
    let url = format!("http://{addr}/cat.png");
    let body = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Output:"}]}], "max_tokens": 3, "return_token_ids": true});
    // Loopback is refused by default...
    let s = Server::start(cfg()).await;
    let (code, r) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(code, 400, "{r}");
    assert_eq!(r["error"]["param"], "messages[0].content[0]");
    let localhost = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": format!("http://localhost:{}/cat.png", addr.port())}}]}]});
    assert_eq!(s.post("/v1/chat/completions", &localhost).await.0, 400);
    s.stop().await;
    // ...and allowed when allow-listed; the fetched image gives the data-URL answer.
    let mut c = cfg();
    c.fetch.allow_list = vec!["127.0.0.1/32".into()];
    let s = Server::start(c).await;
    let (code, fetched) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(code, 200, "{fetched}");
    let mut inline = body.clone();
    inline["messages"][0]["content"][0]["image_url"]["url"] = json!(data_url("small.png"));
    let (_, inline) = s.post("/v1/chat/completions", &inline).await;
    assert_eq!(fetched["choices"][0]["token_ids"], inline["choices"][0]["token_ids"]);
    // 127.0.0.2 is not on the list.
    let other = image_server("127.0.0.2").await;
    let mut b2 = body.clone();
    b2["messages"][0]["content"][0]["image_url"]["url"] = json!(format!("http://{other}/cat.png"));
    assert_eq!(s.post("/v1/chat/completions", &b2).await.0, 400);
    s.stop().await;
}

/// A copy of the tiny model whose Perceiver has frame embeddings (video support): the fixture's
/// checkpoint plus `perceiver.frame_embs`, saved as `checkpoint.safetensors`.
fn video_model_dir(frames: usize) -> PathBuf {
    use flamingo_model::candle::{DType, Device, Tensor};
    let src = repo().join("tests/fixtures/models/mosaicgpt_x1");
    let dir = std::env::temp_dir().join(format!("flamingo-video-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for sub in ["clip", "lm"] {
        std::os::unix::fs::symlink(src.join(sub).canonicalize().unwrap(), dir.join(sub)).unwrap();
    }
    let mut tensors: std::collections::HashMap<String, Tensor> =
        flamingo_model::candle::pickle::read_all(src.join("checkpoint.pt")).unwrap().into_iter().collect();
    let dim = tensors["perceiver.latents"].dim(1).unwrap();
    let embs = Tensor::randn(0f32, 0.5, (frames, dim), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    tensors.insert("perceiver.frame_embs".into(), embs);
    flamingo_model::candle::safetensors::save(&tensors, dir.join("checkpoint.safetensors")).unwrap();
    dir
}

fn solid_frames() -> Vec<image::RgbaImage> {
    [[200u8, 30, 30, 255], [30, 30, 200, 255]].iter().map(|c| image::RgbaImage::from_pixel(40, 30, image::Rgba(*c))).collect()
}

fn png_data_url(img: &image::RgbaImage) -> String {
    let rgb = image::DynamicImage::ImageRgba8(img.clone()).to_rgb8();
    let mut out = std::io::Cursor::new(Vec::new());
    rgb.write_to(&mut out, image::ImageFormat::Png).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(out.into_inner()))
}

fn gif_data_url(frames: &[image::RgbaImage]) -> String {
    let mut out = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut out);
        for f in frames {
            enc.encode_frame(image::Frame::new(f.clone())).unwrap();
        }
    }
    format!("data:image/gif;base64,{}", base64::engine::general_purpose::STANDARD.encode(out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_for_models_with_frame_embeddings() {
    let dir = video_model_dir(4);
    let handle = serve(cfg(), ModelSource::Dir(dir.clone()), false).await.unwrap();
    let s = Server { base: format!("http://{}", handle.addr), handle: Some(handle), http: reqwest::Client::new() };
    for _ in 0..400 {
        if s.http.get(format!("{}/health", s.base)).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let frames = solid_frames();
    let video = |url: Value| {
        json!({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Output:"}]}],
               "max_tokens": 6, "return_token_ids": true})
    };
    let (code, listed) = s.post("/v1/chat/completions", &video(json!([png_data_url(&frames[0]), png_data_url(&frames[1])]))).await;
    assert_eq!(code, 200, "{listed}");
    let (code, gif) = s.post("/v1/chat/completions", &video(json!(gif_data_url(&frames)))).await;
    assert_eq!(code, 200, "{gif}");
    assert_eq!(gif["choices"][0]["token_ids"], listed["choices"][0]["token_ids"], "a GIF's frames = the same frames listed");
    // One frame given as a list is a one-frame video (not an animation).
    let (_, one) = s.post("/v1/chat/completions", &video(json!([png_data_url(&frames[0])]))).await;
    assert_eq!(one["choices"][0]["token_ids"].as_array().map(|a| !a.is_empty()), Some(true));
    let too_many: Vec<String> = (0..5).map(|k| png_data_url(&frames[k % 2])).collect();
    let (code, r) = s.post("/v1/chat/completions", &video(json!(too_many))).await;
    assert_eq!(code, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("at most 4 frames"));
    let (code, r) = s.post("/v1/chat/completions", &video(json!(png_data_url(&frames[0])))).await;
    assert_eq!(code, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("animated GIF"));
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regression (bug: a beam-search request whose KV need, x num_beams, exceeds the engine's
/// budget passed the server's check, which ignored beams, and was refused by the scheduler: the
/// client got a 500 for its own mistake). It is a 400 naming the KV-cache budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beam_request_over_the_kv_budget_is_a_400_not_a_500() {
    // The tiny model's KV is 4 layers x 2 x 64 x 4 bytes = 2 KiB per token: room for 200 tokens.
    let mut c = cfg();
    c.engine.kv_cache_bytes = 200 * 2048;
    let s = Server::start(c).await;
    let body = |beams: u64| json!({"messages": [{"role": "user", "content": "A photo of"}], "max_tokens": 100, "num_beams": beams});
    // One beam fits: a few prompt tokens plus 100 new ones.
    let (code, r) = s.post("/v1/chat/completions", &body(1)).await;
    assert_eq!(code, 200, "{r}");
    // Four beams need room for 400 new tokens.
    let e = expect_error(&s, "/v1/chat/completions", body(4), 400, "KV").await;
    assert_eq!(e["type"], "invalid_request_error");
    let e = expect_error(&s, "/v1/completions", json!({"prompt": "A photo of", "max_tokens": 100, "num_beams": 4}), 400, "KV").await;
    assert_eq!(e["type"], "invalid_request_error");
    s.stop().await;
}
