//! flamingo-mini, the default model, on held-out prompts of the shapes world recorded by
//! `training/train.py` with the reference itself (`tests/fixtures/flamingo-mini/expected.json`):
//! `flamingo generate` and the HTTP API (the embedded model, no `--model`) give the reference's
//! greedy token ids, and the replies are the world's answers.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use flamingo_server::config::Config;
use flamingo_server::server::{serve, ModelSource};
use flamingo_server::world::text::parse_description;
use flamingo_server::world::{is_correct, Motion, Task};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    root().join("tests/fixtures/flamingo-mini")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn cases() -> Vec<Value> {
    expected()["cases"].as_array().unwrap().clone()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn task(case: &Value) -> Task {
    serde_json::from_value(case["task"].clone()).unwrap()
}

fn media(case: &Value) -> Vec<String> {
    case["media"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect()
}

/// The reference generates until <|endofchunk|> or 20 tokens; the engine also stops at the
/// LM's end-of-text, which the reference never produced on these prompts (checked here).
fn reference_ids(case: &Value, eos: u64) -> Vec<u64> {
    let v = ids(&case["greedy_ids"]);
    assert!(!v.contains(&eos), "the reference produced <|endoftext|>: {case}");
    v
}

fn eos_id() -> u64 {
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("models/flamingo-mini/lm/tokenizer.json")).unwrap()).unwrap();
    tok["added_tokens"].as_array().unwrap().iter().find(|t| t["content"] == "<|endoftext|>").and_then(|t| t["id"].as_u64()).unwrap()
}

/// Checks a reply: right for the tasks the model has learnt (colour, shape and count questions
/// and the 2-shot colour episode: 77-100% on the held-out set, and these cases are the first
/// held-out example of each); for descriptions and motion (38% and 27%, see the model card) only
/// that it is an answer of the right kind, since the fixture's cases are wrong there.
fn check_answer(case: &Value, reply: &str) {
    let (t, want) = (task(case), case["answer"].as_str().unwrap());
    match t {
        Task::Describe => assert!(parse_description(reply).is_some(), "{} -> {reply:?}: not a description", case["prompt"]),
        Task::Motion => assert!(Motion::ALL.iter().any(|m| reply.trim() == m.word()), "{} -> {reply:?}: not a direction", case["prompt"]),
        _ => assert!(is_correct(t, reply, want), "{} -> {reply:?}, want {want}", case["prompt"]),
    }
}

#[test]
fn the_reference_replies_are_answers() {
    let cs = cases();
    assert!(cs.len() >= 6, "colour, shape, count, description, motion, few-shot");
    assert!(cs.iter().any(|c| c["media"][0].as_str().unwrap().ends_with(".gif")), "a video");
    assert!(cs.iter().any(|c| c["shots"].as_u64() == Some(2)), "a 2-shot episode");
    for c in &cs {
        check_answer(c, c["text"].as_str().unwrap().trim_end_matches("<|endofchunk|>"));
    }
}

#[test]
fn generate_gives_the_references_greedy_ids() {
    let eos = eos_id();
    let done = generate_each_case(&[]);
    assert!(done.len() >= 5);
    for (c, v) in &done {
        assert_eq!(ids(&v["token_ids"]), reference_ids(c, eos), "{}", c["prompt"]);
    }
}

/// `flamingo generate` on every still-image case with `extra` arguments: (case, JSON output).
fn generate_each_case(extra: &[&str]) -> Vec<(Value, Value)> {
    let mut done = Vec::new();
    for c in cases() {
        let files = media(&c);
        if files.iter().any(|f| f.ends_with(".gif")) {
            continue; // `flamingo generate` takes still images; the video is checked over HTTP.
        }
        let mut args: Vec<String> = vec!["generate".into(), "--model".into(), "models/flamingo-mini".into()];
        args.extend(extra.iter().map(|a| a.to_string()));
        for f in &files {
            args.push("--image".into());
            args.push(fixtures().join(f).to_string_lossy().into_owned());
        }
        args.extend(["--prompt".into(), c["prompt"].as_str().unwrap().into(), "--max-new-tokens".into(), "20".into(), "--json".into()]);
        let out = Command::new(env!("CARGO_BIN_EXE_flamingo")).args(&args).current_dir(root()).output().expect("run flamingo");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        done.push((c, v));
    }
    done
}

#[test]
fn smaller_weights_keep_the_answers() {
    // f16 weights computed in f32 give the reference's greedy ids; q8_0 (8-bit weights and
    // inputs) still gives the reference's answer on every case.
    let eos = eos_id();
    let f16 = generate_each_case(&["--quantize", "f16"]);
    assert!(f16.len() >= 5);
    for (c, v) in &f16 {
        assert_eq!(ids(&v["token_ids"]), reference_ids(c, eos), "f16: {}", c["prompt"]);
    }
    for (c, v) in generate_each_case(&["--quantize", "q8_0"]) {
        check_answer(&c, v["text"].as_str().unwrap_or_default());
    }
}

fn data_url(path: &str) -> String {
    let bytes = std::fs::read(fixtures().join(path)).unwrap();
    let mime = if path.ends_with(".gif") { "image/gif" } else { "image/png" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The case's chat, its `{"media": i}` placeholders replaced by data URLs.
fn chat(case: &Value) -> Vec<Value> {
    let files = media(case);
    let mut msgs = case["messages"].as_array().unwrap().clone();
    for m in &mut msgs {
        if let Some(parts) = m["content"].as_array_mut() {
            for p in parts {
                if let Some(i) = p.get("media").and_then(Value::as_u64) {
                    let url = data_url(&files[i as usize]);
                    let kind = p["type"].as_str().unwrap().to_string();
                    *p = json!({"type": kind, kind.clone(): {"url": url}});
                }
            }
        }
    }
    msgs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_model_answers_over_http() {
    let mut c = Config::defaults();
    c.server.port = 0;
    let handle = serve(c, ModelSource::Embedded, false).await.expect("server starts");
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
    assert!(ready, "the embedded model did not load");
    let models: Value = http.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "flamingo-mini");
    let eos = eos_id();
    for case in cases() {
        let body = json!({"messages": chat(&case), "max_tokens": 20, "return_token_ids": true});
        let r = http.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{v}");
        // The generated ids, the closing <|endofchunk|> included, as the reference's.
        assert_eq!(ids(&choice["token_ids"]), reference_ids(&case, eos), "{}", case["prompt"]);
        check_answer(&case, choice["message"]["content"].as_str().unwrap());
    }
    handle.shutdown().await.unwrap();
}
