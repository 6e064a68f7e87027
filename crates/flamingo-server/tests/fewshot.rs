//! Few-shot serving over a real bound port: log-likelihood scoring against the reference
//! (`tests/fixtures/fewshot/scores.json`, from OpenFlamingo 2.0.1's forward over prompt +
//! candidate), RICES selection against OpenFlamingo's `open_flamingo/eval/rices.py`
//! (`rices.json`), and demonstration sets: a request naming a set equals the request with the
//! examples inline, sets survive a restart, replicas on one directory share them, and bad input
//! is a 4xx that loses nothing stored. See `tests/reference/make_fewshot_fixtures.py`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use flamingo_server::config::Config;
use flamingo_server::server::{serve, ModelSource, ServerHandle};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/fewshot").join(name)).unwrap()).unwrap()
}

fn data_url(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mime = if path.extension().is_some_and(|e| e == "jpg") { "image/jpeg" } else { "image/png" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn image(name: &str) -> String {
    data_url(&repo().join("tests/fixtures/images").join(name))
}

fn pool_image(name: &str) -> String {
    data_url(&repo().join("tests/fixtures/fewshot/images").join(name))
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flamingo-fewshot-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

struct Server {
    handle: ServerHandle,
    base: String,
    http: reqwest::Client,
}

impl Server {
    async fn start(model: ModelSource, data: &Path) -> Self {
        Self::start_with(model, data, |_| {}).await
    }

    async fn start_with(model: ModelSource, data: &Path, edit: impl FnOnce(&mut Config)) -> Self {
        let mut c = Config::defaults();
        c.server.port = 0;
        c.server.served_model_name = "m".into();
        c.storage.dir = data.display().to_string();
        edit(&mut c);
        let handle = serve(c, model, false).await.expect("server starts");
        let base = format!("http://{}", handle.addr);
        let http = reqwest::Client::new();
        for _ in 0..800 {
            if http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
                return Self { handle, base, http };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the server did not become ready");
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap();
        text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }

    /// This server's engine counters (the Prometheus metrics are shared by every server in the
    /// test process).
    fn stats(&self) -> &flamingo_engine::EngineStats {
        self.handle.state.engine_stats().expect("loaded")
    }

    async fn stop(self) {
        let _ = self.handle.shutdown().await;
    }
}

fn model(case: &str) -> ModelSource {
    ModelSource::Dir(repo().join("tests/fixtures/models").join(case))
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-4 * want.abs().max(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_scores_equal_the_references_log_likelihoods() {
    let fx = fixture("scores.json");
    for case in fx["cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let data = temp_dir(&format!("scores-{name}"));
        let s = Server::start(model(name), &data).await;
        for p in case["prompts"].as_array().unwrap() {
            let images: Vec<String> = p["images"].as_array().unwrap().iter().map(|f| image(f.as_str().unwrap())).collect();
            let cands = p["candidates"].as_array().unwrap();
            let texts: Vec<&str> = cands.iter().map(|c| c["text"].as_str().unwrap()).collect();
            let body = json!({"prompt": p["text"], "images": images, "candidates": texts, "rank_by": "normalized_logprob"});
            let (status, v) = s.post("/v1/score", body).await;
            assert_eq!(status, 200, "{name}: {v}");
            assert_eq!(v["usage"]["prompt_tokens"], p["prompt_ids"].as_array().unwrap().len(), "{name}: the prompt's tokens");
            for (c, got) in cands.iter().zip(v["data"].as_array().unwrap()) {
                let what = format!("{name} {} {:?}", p["name"], c["text"]);
                assert_eq!(got["token_ids"], c["ids"], "{what}: the candidate tokenized on its own");
                for (g, w) in got["token_logprobs"].as_array().unwrap().iter().zip(c["logprobs"].as_array().unwrap()) {
                    assert!(close(g.as_f64().unwrap(), w.as_f64().unwrap()), "{what}: {g} vs {w}");
                }
                assert!(close(got["logprob"].as_f64().unwrap(), c["sum"].as_f64().unwrap()), "{what}: sum");
                assert!(close(got["normalized_logprob"].as_f64().unwrap(), c["mean"].as_f64().unwrap()), "{what}: mean");
            }
            assert_eq!(v["ranking"], p["ranking_by_mean"], "{name} {}", p["name"]);

            // `echo` with `max_tokens: 0`: the prompt's own log-probabilities (the first null).
            let body = json!({"prompt": p["text"], "images": images, "echo": true, "max_tokens": 0, "logprobs": 1});
            let (status, e) = s.post("/v1/completions", body).await;
            assert_eq!(status, 200, "{name}: {e}");
            let choice = &e["choices"][0];
            assert_eq!(choice["text"], p["text"]);
            let lps = choice["logprobs"]["token_logprobs"].as_array().unwrap();
            assert_eq!(lps.len(), p["prompt_ids"].as_array().unwrap().len());
            assert!(lps[0].is_null() && choice["logprobs"]["top_logprobs"][0].is_null());
            for (g, w) in lps[1..].iter().zip(p["echo_logprobs"].as_array().unwrap()) {
                assert!(close(g.as_f64().unwrap(), w.as_f64().unwrap()), "{name} echo: {g} vs {w}");
            }
            // And with a generation after it: the prompt, then the reply.
            let body = json!({"prompt": p["text"], "images": images, "echo": true, "max_tokens": 3, "logprobs": 0});
            let (status, g) = s.post("/v1/completions", body).await;
            assert_eq!(status, 200, "{name}: {g}");
            assert!(g["choices"][0]["text"].as_str().unwrap().starts_with(p["text"].as_str().unwrap()));
            let n = g["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len();
            assert_eq!(
                n,
                lps.len() + g["usage"]["completion_tokens"].as_u64().unwrap() as usize
                    - usize::from(g["choices"][0]["finish_reason"] == "stop")
            );

            // Each candidate scored alone gives what it got among the others (to float rounding:
            // the prompt now comes from the prefix cache, computed in other chunks).
            for (i, t) in texts.iter().enumerate() {
                let body = json!({"prompt": p["text"], "images": images, "candidates": [t]});
                let (_, one) = s.post("/v1/score", body).await;
                let (a, b) = (one["data"][0]["token_logprobs"].clone(), v["data"][i]["token_logprobs"].clone());
                for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
                    let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                    assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{name}: {t} alone {a} vs together {b}");
                }
            }
        }
        s.stop().await;
        let _ = std::fs::remove_dir_all(&data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_candidates_cost_one_prompt_prefill() {
    let data = temp_dir("prefill");
    let s = Server::start(model("mpt_x1"), &data).await;
    let prompt = "<image>Output: a cat.<|endofchunk|><image>Output:";
    let images = [image("chelsea.png"), image("coffee.png")];
    let before = s.stats().prefill_tokens.load(Ordering::SeqCst) as f64;
    let cands: Vec<String> = (0..12).map(|i| format!(" answer number {i}")).collect();
    let (status, v) = s.post("/v1/score", json!({"prompt": prompt, "images": images, "candidates": cands})).await;
    assert_eq!(status, 200, "{v}");
    let prompt_tokens = v["usage"]["prompt_tokens"].as_f64().unwrap();
    // The engine counts a step just after sending its events: wait for the count to land.
    let mut after = before;
    for _ in 0..200 {
        after = s.stats().prefill_tokens.load(Ordering::SeqCst) as f64;
        if after != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(after - before, prompt_tokens, "twelve candidates, one prompt prefill");
    assert!(s.metric("flamingo_scored_tokens_total").await > 0.0);
    s.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

/// A chat example: an image, a question, the answer.
fn example(url: &str, answer: &str) -> Value {
    json!({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Output:"}]},
        {"role": "assistant", "content": answer},
    ]})
}

fn query(url: &str) -> Value {
    json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Output:"}]}])
}

fn inline(examples: &[Value], order: &[usize], q: &Value) -> Value {
    let mut msgs: Vec<Value> = order.iter().flat_map(|&i| examples[i]["messages"].as_array().unwrap().clone()).collect();
    msgs.extend(q.as_array().unwrap().iter().cloned());
    Value::Array(msgs)
}

fn chat(messages: Value, demos: Option<Value>) -> Value {
    let mut b = json!({"messages": messages, "max_tokens": 6, "logprobs": true, "top_logprobs": 2, "return_token_ids": true});
    if let Some(d) = demos {
        b["demonstrations"] = d;
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_by_id_is_the_examples_inline_and_survives_restarts_and_replicas() {
    let data = temp_dir("sets");
    let names = ["chelsea.png", "coffee.png", "camera.png"];
    let examples: Vec<Value> = names.iter().zip(["a cat.", "a cup.", "a man."]).map(|(n, a)| example(&image(n), a)).collect();
    let q = query(&image("small.png"));

    let a = Server::start(model("mpt_x1"), &data).await;
    let (status, set) = a.post("/v1/demonstrations", json!({"name": "things", "examples": examples})).await;
    assert_eq!(status, 201, "{set}");
    let id = set["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("demo-") && set["examples"] == 3 && set["images"] == 3, "{set}");
    let pinned = set["prompt_tokens"].as_u64().unwrap();
    assert!(pinned > 0);
    // Registering the same content again: the same id, nothing new.
    let (status, again) = a.post("/v1/demonstrations", json!({"name": "things", "examples": examples})).await;
    assert_eq!((status, &again["id"]), (200, &set["id"]));
    assert!(a.stats().pinned_bytes.load(Ordering::SeqCst) > 0);

    // Server A answers the examples inline; server B (the same directory, started after the
    // registration) answers by id. Both start from the same pinned prefix, so they compute the
    // same tokens in the same chunks: equal ids and log-probabilities.
    let (status, by_inline) = a.post("/v1/chat/completions", chat(inline(&examples, &[0, 1, 2], &q), None)).await;
    assert_eq!(status, 200, "{by_inline}");
    let b = Server::start(model("mpt_x1"), &data).await;
    let (status, by_id) = b.post("/v1/chat/completions", chat(q.clone(), Some(json!({"id": id})))).await;
    assert_eq!(status, 200, "{by_id}");
    assert_eq!(by_id["choices"][0]["token_ids"], by_inline["choices"][0]["token_ids"]);
    assert_eq!(by_id["choices"][0]["logprobs"], by_inline["choices"][0]["logprobs"]);
    assert_eq!(by_id["usage"]["prompt_tokens"], by_inline["usage"]["prompt_tokens"]);
    assert_eq!(by_id["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(pinned), "the set is served from its pin");
    assert_eq!(by_inline["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(pinned));

    // Deleted through B: gone for A too at its next use.
    let (status, del) = b.call(reqwest::Method::DELETE, &format!("/v1/demonstrations/{id}"), None).await;
    assert_eq!((status, &del["deleted"]), (200, &json!(true)));
    let (status, e) = a.post("/v1/chat/completions", chat(q.clone(), Some(json!({"id": id})))).await;
    assert_eq!(status, 404, "{e}");
    assert_eq!(e["error"]["param"], "demonstrations.id");
    let (status, _) = a.call(reqwest::Method::GET, &format!("/v1/demonstrations/{id}"), None).await;
    assert_eq!(status, 404);
    a.stop().await;
    b.stop().await;

    // Registered again, then a restart: the set is re-pinned at start-up and still served.
    let c = Server::start(model("mpt_x1"), &data).await;
    let (status, _) = c.post("/v1/demonstrations", json!({"name": "things", "examples": examples})).await;
    assert_eq!(status, 201);
    c.stop().await;
    let d = Server::start(model("mpt_x1"), &data).await;
    assert!(d.stats().pinned_bytes.load(Ordering::SeqCst) > 0, "re-pinned at start-up");
    let (status, list) = d.call(reqwest::Method::GET, "/v1/demonstrations", None).await;
    assert_eq!((status, list["data"].as_array().map(Vec::len)), (200, Some(1)), "{list}");
    let (status, again) = d.post("/v1/chat/completions", chat(q.clone(), Some(json!({"id": id})))).await;
    assert_eq!(status, 200);
    assert_eq!(again["choices"][0]["token_ids"], by_inline["choices"][0]["token_ids"]);
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(pinned));
    d.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rices_selects_as_open_flamingo_does() {
    let fx = fixture("rices.json");
    let data = temp_dir("rices");
    let s = Server::start(model(fx["vision_encoder"]["case"].as_str().unwrap()), &data).await;
    let pool = fx["pool"].as_array().unwrap();
    let examples: Vec<Value> =
        pool.iter().map(|p| example(&pool_image(p["file"].as_str().unwrap()), &format!("picture {}.", p["index"]))).collect();
    let (status, set) = s.post("/v1/demonstrations", json!({"name": "pool", "examples": examples})).await;
    assert_eq!(status, 201, "{set}");
    let id = set["id"].as_str().unwrap();
    for q in fx["queries"].as_array().unwrap() {
        let query = query(&pool_image(q["file"].as_str().unwrap()));
        for f in q["find"].as_array().unwrap() {
            let k = f["k"].as_u64().unwrap();
            let order: Vec<usize> = f["indices"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect();
            let (status, by_k) = s.post("/v1/chat/completions", chat(query.clone(), Some(json!({"id": id, "k": k})))).await;
            assert_eq!(status, 200, "{by_k}");
            let (_, want) = s.post("/v1/chat/completions", chat(inline(&examples, &order, &query), None)).await;
            let what = format!("query {} k {k}: RICES order {order:?}", q["index"]);
            assert_eq!(by_k["usage"]["prompt_tokens"], want["usage"]["prompt_tokens"], "{what}");
            assert_eq!(by_k["choices"][0]["token_ids"], want["choices"][0]["token_ids"], "{what}");
            let lp = |v: &Value| -> Vec<f64> {
                v["choices"][0]["logprobs"]["content"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()).collect()
            };
            for (x, y) in lp(&by_k).iter().zip(lp(&want)) {
                assert!((x - y).abs() <= 1e-5, "{what}: {x} vs {y}");
            }
        }
    }
    // k out of range, and k without a query image.
    let q = query(&pool_image("query_0_circle.png"));
    let (status, e) = s.post("/v1/chat/completions", chat(q, Some(json!({"id": id, "k": 11})))).await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("demonstrations.k")), "{e}");
    let text_only = json!([{"role": "user", "content": "Output:"}]);
    let (status, e) = s.post("/v1/chat/completions", chat(text_only, Some(json!({"id": id, "k": 2})))).await;
    assert_eq!(status, 400, "{e}");
    s.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_client_error_and_a_corrupt_stored_set_is_skipped() {
    let data = temp_dir("bad");
    let s = Server::start(model("mpt_x1"), &data).await;
    let good = example(&image("chelsea.png"), "a cat.");
    let (status, set) = s.post("/v1/demonstrations", json!({"examples": [good]})).await;
    assert_eq!(status, 201, "{set}");
    let id = set["id"].as_str().unwrap().to_string();
    for (body, param) in [
        (json!({"examples": []}), Some("examples")),
        (json!({"examples": [{"prompt": "x"}, good]}), Some("examples[1]")),
        (
            json!({"examples": [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}]}),
            None,
        ),
        (json!({"examples": [good], "extra": 1}), None),
    ] {
        let (status, e) = s.post("/v1/demonstrations", body.clone()).await;
        assert_eq!(status, 400, "{body}: {e}");
        if let Some(p) = param {
            assert_eq!(e["error"]["param"], p, "{e}");
        }
    }
    let q = query(&image("coffee.png"));
    let (status, _) = s.post("/v1/chat/completions", chat(q.clone(), Some(json!({"id": "demo-000000000000000000000000"})))).await;
    assert_eq!(status, 404);
    let (status, _) = s.post("/v1/chat/completions", chat(q.clone(), Some(json!({"id": "../etc/passwd"})))).await;
    assert_eq!(status, 404);
    let many: Vec<String> = (0..65).map(|i| format!("c{i}")).collect();
    let (status, e) = s.post("/v1/score", json!({"messages": q, "candidates": many})).await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("candidates")));
    let (status, _) = s.post("/v1/score", json!({"messages": q, "candidates": []})).await;
    assert_eq!(status, 400);
    let (status, _) = s.post("/v1/score", json!({"messages": q, "prompt": "x", "candidates": ["a"]})).await;
    assert_eq!(status, 400);
    // The server still serves the stored set.
    let (status, _) = s.post("/v1/chat/completions", chat(q.clone(), Some(json!({"id": id})))).await;
    assert_eq!(status, 200);
    s.stop().await;

    // A torn stored file next to the good one: skipped at start-up (logged and counted), the
    // good set still served, nothing lost.
    let torn = data.join("demonstrations").join("demo-0123456789abcdef01234567.json");
    std::fs::write(&torn, b"{\"format\": 1, \"id\": \"demo-0123456789abc").unwrap();
    let s = Server::start(model("mpt_x1"), &data).await;
    assert!(s.metric("flamingo_demonstration_sets_skipped_total").await >= 1.0);
    let (status, _) = s.post("/v1/chat/completions", chat(q.clone(), Some(json!({"id": id})))).await;
    assert_eq!(status, 200);
    let (status, e) = s.post("/v1/chat/completions", chat(q, Some(json!({"id": "demo-0123456789abcdef01234567"})))).await;
    assert_eq!(status, 404, "{e}");
    assert!(torn.exists(), "a corrupt file is left for the operator, not deleted");
    s.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pinned_budget_and_an_unwritable_store_refuse_a_set_and_keep_serving() {
    let examples = json!([example(&image("chelsea.png"), "a cat."), example(&image("coffee.png"), "a cup.")]);
    // Pinned memory too small for the set: a 400 naming the budget, nothing stored.
    let data = temp_dir("budget");
    let s = Server::start_with(model("mpt_x1"), &data, |c| c.engine.pinned_bytes = 1000).await;
    let (status, e) = s.post("/v1/demonstrations", json!({"examples": examples})).await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("pinned"), "{e}");
    assert_eq!(s.stats().pinned_bytes.load(Ordering::SeqCst), 0, "nothing left pinned");
    let (_, list) = s.call(reqwest::Method::GET, "/v1/demonstrations", None).await;
    assert_eq!(list["data"], json!([]));
    let (status, _) = s.post("/v1/chat/completions", chat(query(&image("small.png")), None)).await;
    assert_eq!(status, 200, "still serving");
    s.stop().await;
    let _ = std::fs::remove_dir_all(&data);

    // The data directory cannot be created (a file is in the way): 507, nothing registered.
    let blocker = temp_dir("blocked");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let s = Server::start(model("mpt_x1"), &blocker.join("data")).await;
    let (status, e) = s.post("/v1/demonstrations", json!({"examples": examples})).await;
    assert_eq!(status, 507, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("could not be stored"), "{e}");
    assert_eq!(s.stats().pinned_bytes.load(Ordering::SeqCst), 0, "unpinned again");
    let (status, _) = s.post("/v1/chat/completions", chat(query(&image("small.png")), None)).await;
    assert_eq!(status, 200, "still serving");
    s.stop().await;
    let _ = std::fs::remove_file(&blocker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idefics_sets_and_scores_follow_its_instruct_template() {
    let data = temp_dir("idefics");
    let s = Server::start(ModelSource::Dir(repo().join("tests/fixtures/idefics/idefics_x1")), &data).await;
    let examples = vec![example(&image("chelsea.png"), "a cat."), example(&image("coffee.png"), "a cup.")];
    let (status, set) = s.post("/v1/demonstrations", json!({"examples": examples})).await;
    assert_eq!(status, 201, "{set}");
    let (id, pinned) = (set["id"].clone(), set["prompt_tokens"].as_u64().unwrap());
    assert!(pinned > 0);
    let q = query(&image("camera.png"));
    // By id first (computing the query after the pinned prefix), then inline (the same tokens).
    let (status, by_id) = s.post("/v1/chat/completions", chat(q.clone(), Some(json!({"id": id})))).await;
    assert_eq!(status, 200, "{by_id}");
    assert_eq!(by_id["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(pinned));
    let (_, inline) = s.post("/v1/chat/completions", chat(inline(&examples, &[0, 1], &q), None)).await;
    assert_eq!(by_id["usage"]["prompt_tokens"], inline["usage"]["prompt_tokens"]);
    assert_eq!(by_id["choices"][0]["token_ids"], inline["choices"][0]["token_ids"]);
    // Scoring the reply the template writes: with include_end its last token is <end_of_utterance>.
    let body = json!({"messages": q, "demonstrations": {"id": id}, "candidates": ["a man.", "a dog."], "include_end": true});
    let (status, v) = s.post("/v1/score", body).await;
    assert_eq!(status, 200, "{v}");
    let eou = v["data"][0]["tokens"].as_array().unwrap().last().cloned();
    assert_eq!(eou, Some(json!("<end_of_utterance>")), "{v}");
    let body = json!({"messages": q, "demonstrations": {"id": id}, "candidates": ["a man.", "a dog."]});
    let (_, without) = s.post("/v1/score", body).await;
    let n = |v: &Value| v["data"][0]["token_ids"].as_array().unwrap().len();
    assert_eq!(n(&without) + 1, n(&v), "the end token only with include_end");
    s.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_embeddings_are_open_clips_encode_image() {
    let fx = fixture("rices.json");
    let data = temp_dir("embed");
    let s = Server::start(model(fx["vision_encoder"]["case"].as_str().unwrap()), &data).await;
    let rt = s.handle.state.model().expect("loaded");
    for item in fx["pool"].as_array().unwrap().iter().chain(fx["queries"].as_array().unwrap()) {
        let file = item["file"].as_str().unwrap();
        let bytes = std::fs::read(repo().join("tests/fixtures/fewshot/images").join(file)).unwrap();
        let media = rt.media.image(&bytes).unwrap();
        let got = rt.engine.embed(vec![media]).await.unwrap().remove(0);
        let want: Vec<f64> = item["feature"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want.len(), "{file}");
        let worst = got.iter().zip(&want).map(|(g, w)| (f64::from(*g) - w).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-5, "{file}: max difference {worst}");
    }
    s.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_sets_serve_completions_and_raw_scores_as_the_prompt_inline() {
    let data = temp_dir("raw");
    let s = Server::start_with(model("llama_x1"), &data, |c| c.limits.max_demonstration_examples = 2).await;
    let shots = ["<image>Output: a cat.<|endofchunk|>", "<image>Output: a cup.<|endofchunk|>"];
    let imgs = [image("chelsea.png"), image("coffee.png")];
    let examples: Vec<Value> = shots.iter().zip(&imgs).map(|(p, i)| json!({"prompt": p, "images": [i]})).collect();
    let (status, set) = s.post("/v1/demonstrations", json!({"name": "raw", "examples": examples})).await;
    assert_eq!(status, 201, "{set}");
    assert_eq!(set["kind"], "raw");
    let id = set["id"].clone();
    let (q, qimg) = ("<image>Output:", image("camera.png"));
    let whole = format!("{}{}{q}", shots[0], shots[1]);
    let body = |prompt: &str, images: Vec<String>, demos: Option<&Value>| {
        let mut b = json!({"prompt": prompt, "images": images, "max_tokens": 5, "logprobs": 1, "return_token_ids": true});
        if let Some(d) = demos {
            b["demonstrations"] = json!({"id": d});
        }
        b
    };
    let (status, by_id) = s.post("/v1/completions", body(q, vec![qimg.clone()], Some(&id))).await;
    assert_eq!(status, 200, "{by_id}");
    let all = vec![imgs[0].clone(), imgs[1].clone(), qimg.clone()];
    let (_, inline) = s.post("/v1/completions", body(&whole, all.clone(), None)).await;
    assert_eq!(by_id["choices"][0]["token_ids"], inline["choices"][0]["token_ids"]);
    assert_eq!(by_id["usage"]["prompt_tokens"], inline["usage"]["prompt_tokens"]);
    assert!(by_id["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= set["prompt_tokens"].as_u64().unwrap() - 1);
    // The raw form of /v1/score with the set.
    let (status, a) =
        s.post("/v1/score", json!({"prompt": q, "images": [qimg], "demonstrations": {"id": id}, "candidates": [" a man."]})).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = s.post("/v1/score", json!({"prompt": whole, "images": all, "candidates": [" a man."]})).await;
    for (x, y) in a["data"][0]["token_logprobs"].as_array().unwrap().iter().zip(b["data"][0]["token_logprobs"].as_array().unwrap()) {
        assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= 1e-5, "{a} vs {b}");
    }
    // A chat request cannot use a raw set; a set over the configured size is refused.
    let (status, e) = s.post("/v1/chat/completions", chat(query(&image("small.png")), Some(json!({"id": id})))).await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("demonstrations.id")), "{e}");
    let three = json!({"examples": [examples[0], examples[1], examples[0]]});
    let (status, e) = s.post("/v1/demonstrations", three).await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("examples")), "{e}");
    s.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}
