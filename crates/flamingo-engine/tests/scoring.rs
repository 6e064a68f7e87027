//! Scoring through the engine on every model family's tiny fixtures (OpenFlamingo MPT,
//! MosaicGPT, GPT-NeoX, LLaMA; IDEFICS), with both K/V layouts: teacher-forced scores of a
//! greedy continuation equal the log-probabilities the greedy generation reported for the same
//! tokens (two different code paths, the all-positions forward and the step-by-step decode),
//! and a prompt's echo (its tokens scored after the first) equals its scoring split anywhere.
//! Agreement with the PyTorch reference's own log-likelihoods is tested over HTTP
//! (`flamingo-server/tests/fewshot.rs`, `tests/fixtures/fewshot/scores.json`).

mod common;
use common::{ids, media_of};
use std::path::PathBuf;

use flamingo_engine::{Engine, EngineConfig, Event, PreparedMedia, SamplingParams, StopParams, TokenEvent, ValidRequest};
use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::sampling::Strategy;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Greedy tokens with their log-probabilities.
fn greedy(engine: &Engine, prompt: &[u32], media: &[PreparedMedia], max_new: usize) -> Vec<TokenEvent> {
    let sampling = SamplingParams { strategy: Strategy::Greedy, repetition_penalty: 1.0, logprobs: Some(0) };
    let stop = StopParams { max_new_tokens: max_new, stop_token_ids: vec![], min_new_tokens: 0 };
    let mut rx = engine.submit(ValidRequest::new(prompt.to_vec(), media.to_vec(), sampling, stop, engine.spec()).unwrap()).unwrap();
    let mut out = Vec::new();
    loop {
        match rx.blocking_recv().expect("a finish event") {
            Event::Token(t) => out.push(t),
            Event::Finished { .. } => return out,
            Event::Prefilled { .. } => {}
            other => panic!("{other:?}"),
        }
    }
}

fn score(engine: &Engine, prompt: &[u32], media: &[PreparedMedia], cands: Vec<Vec<u32>>) -> Vec<Vec<TokenEvent>> {
    let mut rx = engine.submit(ValidRequest::score(prompt.to_vec(), media.to_vec(), cands, 1, engine.spec()).unwrap()).unwrap();
    loop {
        match rx.blocking_recv().expect("a result") {
            Event::Scored { scores, .. } => return scores,
            Event::Prefilled { .. } => {}
            other => panic!("{other:?}"),
        }
    }
}

fn lp(t: &TokenEvent) -> f32 {
    t.logprob.expect("a log-probability")
}

/// `prompts`: (name, input ids, pixels) of the case.
fn check(case: &str, dir: PathBuf, prompts: Vec<(String, Vec<u32>, Tensor)>, paged: bool) {
    let loaded = flamingo_model::load(&dir, &Device::Cpu, DType::F32, &()).unwrap_or_else(|e| panic!("{case}: {e}"));
    let mut model = loaded.model;
    model.set_paged_kv(paged);
    // No prefix cache: each request computes its prompt in one chunk.
    let engine = Engine::start(model, EngineConfig { prefix_cache_bytes: 0, ..Default::default() });
    let mut tested = 0;
    for (name, prompt, pixels) in prompts {
        let what = format!("{case}/{name} (paged {paged})");
        let media = media_of(&pixels, &name);
        // A random model may generate the `<image>` token, which in a scored text would
        // introduce an image: the continuation stops before it.
        let image_token = engine.spec().media_token_id;
        let mut gen = greedy(&engine, &prompt, &media, 6);
        gen.truncate(gen.iter().position(|t| Some(t.id) == image_token).unwrap_or(gen.len()));
        if gen.len() < 2 {
            continue;
        }
        tested += 1;
        let cont: Vec<u32> = gen.iter().map(|t| t.id).collect();
        // The greedy continuation and a perturbed one (its second token changed).
        let mut other = cont.clone();
        other[1] = (other[1] + 1) % 50;
        if Some(other[1]) == image_token {
            other[1] = (other[1] + 1) % 50;
        }
        let scores = score(&engine, &prompt, &media, vec![cont.clone(), other.clone(), cont[..1].to_vec()]);
        assert_eq!(scores[0].iter().map(|t| t.id).collect::<Vec<_>>(), cont);
        for (j, (s, g)) in scores[0].iter().zip(&gen).enumerate() {
            assert!((lp(s) - lp(g)).abs() <= 1e-5 * lp(g).abs().max(1.0), "{what}: token {j}: scored {} vs generated {}", lp(s), lp(g));
            // Greedy tokens are the argmax: the best alternative is the token itself.
            assert_eq!(s.top_logprobs.first().map(|a| a.0), Some(s.id), "{what}: token {j}");
        }
        assert_eq!(lp(&scores[2][0]), lp(&scores[0][0]), "{what}: a one-token candidate reads the prompt's last row");
        assert_eq!(lp(&scores[1][0]), lp(&scores[0][0]), "{what}: the same first token");
        assert!(lp(&scores[1][1]) < lp(&scores[0][1]), "{what}: a non-greedy token scores lower");

        // The prompt echoed (scored after its first token) equals scoring it split later.
        let full = [prompt.as_slice(), &cont].concat();
        let echo = score(&engine, &full[..1], &media, vec![full[1..].to_vec()]).remove(0);
        let cut = prompt.len();
        let tail = score(&engine, &full[..cut], &media, vec![full[cut..].to_vec()]).remove(0);
        for (j, (a, b)) in echo[cut - 1..].iter().zip(&tail).enumerate() {
            assert!((lp(a) - lp(b)).abs() <= 1e-5 * lp(b).abs().max(1.0), "{what}: echo token {j}: {} vs {}", lp(a), lp(b));
        }
    }
    assert!(tested >= 2, "{case}: only {tested} prompts had a continuation to score");
}

fn openflamingo(case: &str, paged: bool) {
    let dir = fixtures().join("models").join(case);
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tensors = flamingo_model::candle::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let prompts = exp["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap().to_string();
            let px = tensors[&format!("{name}.vision_x")].clone();
            (name, ids(&p["input_ids"]), px)
        })
        .collect();
    check(case, dir, prompts, paged);
}

fn idefics(case: &str, paged: bool) {
    let dir = fixtures().join("idefics").join(case);
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tensors = flamingo_model::candle::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let prompts = exp["prompts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, p)| (name.clone(), ids(&p["input_ids"]), tensors[&format!("{name}.pixel_values")].clone()))
        .collect();
    check(case, dir, prompts, paged);
}

#[test]
fn mpt() {
    openflamingo("mpt_x1", false);
    openflamingo("mpt_x2", true);
}

#[test]
fn mosaicgpt() {
    openflamingo("mosaicgpt_x2", false);
}

#[test]
fn gptneox() {
    openflamingo("gptneox_x1", true);
}

#[test]
fn llama() {
    openflamingo("llama_x2", false);
    openflamingo("llama_x1", true);
}

#[test]
fn idefics_family() {
    idefics("idefics_x1", false);
    idefics("idefics_x2_qk", true);
}
