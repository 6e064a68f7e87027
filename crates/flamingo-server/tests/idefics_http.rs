//! An IDEFICS model served over a real bound port (`tests/fixtures/idefics/idefics_x1`, a tiny
//! random model with an instruct tokenizer): `/v1/chat/completions` with the model's own
//! `idefics_instruct` template gives the ids IDEFICS' processor builds for the same chat and
//! transformers' greedy answer (`chat.json`, made by `tests/reference/make_idefics_fixtures.py`),
//! and `/v1/completions` takes the raw prompt in the model's own form.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use flamingo_server::config::Config;
use flamingo_server::server::{serve, ModelSource};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn case() -> PathBuf {
    repo().join("tests/fixtures/idefics/idefics_x1")
}

fn data_url(name: &str) -> String {
    let bytes = std::fs::read(repo().join("tests/fixtures/images").join(name)).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The reference's greedy ids up to (not including) the first stop id, as text.
fn expected_text(greedy: &[u32]) -> String {
    let tok = flamingo_model::FlamingoTokenizer::from_idefics_dir(&case()).unwrap();
    let stops = tok.stop_token_ids();
    let end = greedy.iter().position(|t| stops.contains(t)).unwrap_or(greedy.len());
    tok.decode(&greedy[..end]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_the_instruct_template_is_the_processors_prompt_and_transformers_answer() {
    let chat: Value = serde_json::from_str(&std::fs::read_to_string(case().join("chat.json")).unwrap()).unwrap();
    let mut c = Config::defaults();
    c.server.port = 0;
    c.server.served_model_name = "idefics-tiny".into();
    let handle = serve(c, ModelSource::Dir(case()), false).await.expect("server starts");
    let base = format!("http://{}", handle.addr);
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..400 {
        if http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "the model did not load");
    let post = |path: &'static str, body: Value| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let greedy = ids(&chat["greedy"]);
    let prompt_ids = ids(&chat["input_ids"]);
    let want = expected_text(&greedy);

    // The chat as a user writes it; the template adds User:/Assistant:, <end_of_utterance> and
    // the images' fake tokens.
    let messages = json!([
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": data_url("chelsea.png")}}]},
        {"role": "assistant", "content": "a cat."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("coffee.png")}}, {"type": "text", "text": "And this?"}]},
    ]);
    let body = json!({"model": "idefics-tiny", "messages": messages, "max_tokens": greedy.len(), "temperature": 0});
    let (status, v) = post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(prompt_ids.len() as u64), "the processor's prompt length");
    assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(want.as_str()), "transformers' greedy answer");

    // The same prompt written raw in the model's own form (the processor's text without <s>).
    let raw = chat["text"].as_str().unwrap().strip_prefix("<s>").unwrap();
    let body = json!({"model": "idefics-tiny", "prompt": raw, "max_tokens": greedy.len(), "temperature": 0,
        "images": [data_url("chelsea.png"), data_url("coffee.png")]});
    let (status, v) = post("/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(prompt_ids.len() as u64));
    assert_eq!(v["choices"][0]["text"].as_str(), Some(want.as_str()));

    // Text that spells the special tokens stays text: no image slot, no 4xx for a missing image.
    let body = json!({"model": "idefics-tiny", "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "user", "content": "<fake_token_around_image><image><fake_token_around_image><end_of_utterance>"}]});
    let (status, v) = post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    handle.shutdown().await.unwrap();
}
