//! `min_tokens` and `ignore_eos` (vLLM's request extensions) on the embedded model, whose
//! answers end at `<|endofchunk|>` after a word or two: with them a reply has a fixed length.

mod common {
    pub mod ready;
}

use base64::Engine as _;
use flamingo_server::config::Config;
use flamingo_server::server::ModelSource;
use serde_json::{json, Value};

fn image() -> String {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/flamingo-mini/media/0000080.png");
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_tokens_and_ignore_eos_fix_the_length() {
    let mut c = Config::defaults();
    c.storage.dir = std::env::temp_dir().join(format!("flamingo-lengths-{}", std::process::id())).display().to_string();
    let (handle, base) = common::ready::start_ready(c, ModelSource::Embedded).await;
    let http = reqwest::Client::new();
    let messages = json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image()}}, {"type": "text", "text": "How many shapes are there?"}]}]);
    let ask = |extra: Value| {
        let mut body = json!({"messages": messages, "max_tokens": 12, "return_token_ids": true});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (http, url) = (http.clone(), format!("{base}/v1/chat/completions"));
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, plain) = ask(json!({})).await;
    assert_eq!(status, 200, "{plain}");
    let plain_ids = plain["choices"][0]["token_ids"].as_array().unwrap().clone();
    assert_eq!(plain["choices"][0]["finish_reason"], "stop", "the model ends its short answer: {plain}");
    assert!(plain_ids.len() < 6, "{plain}");
    let stop_id = plain_ids.last().unwrap().clone();

    // min_tokens: the end token is held back until 8 tokens; the reply starts as before.
    let (status, v) = ask(json!({"min_tokens": 8})).await;
    assert_eq!(status, 200, "{v}");
    let ids = v["choices"][0]["token_ids"].as_array().unwrap();
    assert!(ids.len() >= 8, "{v}");
    assert!(!ids[..8].contains(&stop_id), "no end token before min_tokens: {v}");
    assert_eq!(ids[..plain_ids.len() - 1], plain_ids[..plain_ids.len() - 1], "the same reply up to where it used to end");
    // min_tokens = max_tokens: exactly that many.
    let (_, v) = ask(json!({"min_tokens": 12})).await;
    assert_eq!((v["usage"]["completion_tokens"].as_u64(), v["choices"][0]["finish_reason"].as_str()), (Some(12), Some("length")), "{v}");
    // ignore_eos: the end token is generated but does not end the reply.
    let (_, v) = ask(json!({"ignore_eos": true})).await;
    assert_eq!((v["usage"]["completion_tokens"].as_u64(), v["choices"][0]["finish_reason"].as_str()), (Some(12), Some("length")), "{v}");
    let ids = v["choices"][0]["token_ids"].as_array().unwrap();
    assert_eq!(ids[..plain_ids.len()], plain_ids[..], "greedy as before, through the end token");
    // A stop string before min_tokens does not cut the reply.
    let text = plain["choices"][0]["message"]["content"].as_str().unwrap().trim().to_string();
    let (_, v) = ask(json!({"min_tokens": 6, "stop": [text]})).await;
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 6, "{v}");
    // Mistakes are 400s naming the field.
    for bad in [json!({"min_tokens": 13}), json!({"min_tokens": 2, "num_beams": 2})] {
        let (status, e) = ask(bad.clone()).await;
        assert_eq!((status, e["error"]["param"].as_str()), (400, Some("min_tokens")), "{bad}: {e}");
    }
    handle.shutdown().await.unwrap();
}
