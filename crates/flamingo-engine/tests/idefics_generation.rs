//! IDEFICS generation against transformers' `IdeficsForVisionText2Text.generate` (4.46.3),
//! through the engine, on the tiny fixture models of `tests/fixtures/idefics/` (see
//! `tests/reference/make_idefics_fixtures.py`): greedy ids, beam search with 3 beams, greedy
//! ids with blank images, each alone and with both K/V layouts; every request of a case at once
//! in one batch; and prefix-cache and vision-cache hits equal to misses, including a cached
//! prefix that ends after a `</s>` (the tokens after it attend to no image until the next).

mod common;
use common::{ids, media_of};
use std::path::PathBuf;

use flamingo_engine::{Engine, EngineConfig, Event, EventStream, PreparedMedia, SamplingParams, StopParams, ValidRequest};
use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::sampling::Strategy;

fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics").join(case)
}

struct Case {
    exp: serde_json::Value,
    tensors: std::collections::HashMap<String, Tensor>,
    model: flamingo_model::Flamingo,
    eos: u32,
}

fn load(case: &str) -> Case {
    let dir = case_dir(case);
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tensors = flamingo_model::candle::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let loaded = flamingo_model::load(&dir, &Device::Cpu, DType::F32, &()).unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
    // transformers' generate() stops at the config's eos only.
    let eos = loaded.tokenizer.eos_token_id().expect("eos");
    Case { exp, tensors, model: loaded.model, eos }
}

fn request(engine: &Engine, prompt: &[u32], media: &[PreparedMedia], strategy: Strategy, max_new: usize, stop: u32) -> EventStream {
    let sampling = SamplingParams { strategy, repetition_penalty: 1.0, logprobs: None };
    let stop = StopParams { max_new_tokens: max_new, stop_token_ids: vec![stop], min_new_tokens: 0 };
    let req = ValidRequest::new(prompt.to_vec(), media.to_vec(), sampling, stop, engine.spec()).expect("valid request");
    engine.submit(req).expect("submitted")
}

/// The generated ids and the prompt tokens served from the prefix cache.
fn collect(mut rx: EventStream) -> (Vec<u32>, usize) {
    let (mut out, mut cached) = (Vec::new(), 0);
    loop {
        match rx.blocking_recv().expect("stream ended without a finish event") {
            Event::Token(t) => out.push(t.id),
            Event::Prefilled { cached_tokens } => cached = cached_tokens,
            Event::Finished { .. } => return (out, cached),
            Event::Error(e) => panic!("generation failed: {e}"),
            other => panic!("unexpected event {other:?}"),
        }
    }
}

fn check_alone(case: &str, paged: bool) {
    let mut c = load(case);
    c.model.set_paged_kv(paged);
    let greedy_new = c.exp["greedy_max_new_tokens"].as_u64().unwrap() as usize;
    let beam = &c.exp["beam"];
    let (num_beams, beam_new) = (beam["num_beams"].as_u64().unwrap() as usize, beam["max_new_tokens"].as_u64().unwrap() as usize);
    let length_penalty = beam["length_penalty"].as_f64().unwrap() as f32;
    // The prefix cache off: every request here is a miss (hits are tested below).
    let engine = Engine::start(c.model, EngineConfig { prefix_cache_bytes: 0, ..Default::default() });
    assert_eq!(engine.spec().media_token_id, Some(c.exp["image_token_id"].as_u64().unwrap() as u32));
    for (name, p) in c.exp["prompts"].as_object().unwrap() {
        let what = |s: &str| format!("{case}/{name} (paged {paged}): {s}");
        let prompt = ids(&p["input_ids"]);
        let pixels = &c.tensors[&format!("{name}.pixel_values")];
        let media = media_of(pixels, name);
        let (got, _) = collect(request(&engine, &prompt, &media, Strategy::Greedy, greedy_new, c.eos));
        assert_eq!(got, ids(&p["greedy"]), "{}", what("greedy ids"));
        let strategy = Strategy::Beam { num_beams, length_penalty, early_stopping: false };
        let (got, _) = collect(request(&engine, &prompt, &media, strategy, beam_new, c.eos));
        assert_eq!(got, ids(&p["beam3"]), "{}", what("beam-3 ids"));
        let blank = media_of(&pixels.zeros_like().unwrap(), &format!("{name}-blank"));
        let (got, _) = collect(request(&engine, &prompt, &blank, Strategy::Greedy, greedy_new, c.eos));
        assert_eq!(got, ids(&p["greedy_blank"]), "{}", what("blank-image greedy ids"));
        assert_ne!(ids(&p["greedy_blank"]), ids(&p["greedy"]), "{}", what("fixture must be discriminating"));
    }
}

/// Every prompt of the case (greedy, with its images and blank ones) submitted at once: one
/// ragged batch of mixed IDEFICS requests gives each its reference ids.
fn check_batched(case: &str, paged: bool) {
    let mut c = load(case);
    c.model.set_paged_kv(paged);
    let greedy_new = c.exp["greedy_max_new_tokens"].as_u64().unwrap() as usize;
    let engine = Engine::start(c.model, EngineConfig { prefix_cache_bytes: 0, ..Default::default() });
    let mut pending = Vec::new();
    for (name, p) in c.exp["prompts"].as_object().unwrap() {
        let prompt = ids(&p["input_ids"]);
        let pixels = &c.tensors[&format!("{name}.pixel_values")];
        for (media, want) in [
            (media_of(pixels, name), &p["greedy"]),
            (media_of(&pixels.zeros_like().unwrap(), &format!("{name}-blank")), &p["greedy_blank"]),
        ] {
            pending.push((name.clone(), ids(want), request(&engine, &prompt, &media, Strategy::Greedy, greedy_new, c.eos)));
        }
    }
    for (name, want, rx) in pending {
        assert_eq!(collect(rx).0, want, "{case}/{name} (paged {paged}): greedy ids in a mixed batch");
    }
}

/// The same request twice: the second is served from the prefix cache (blocks of 4 tokens, so
/// cached prefixes end anywhere, after the `</s>` too) and the vision cache, with the
/// reference's ids.
fn check_cache_hits(case: &str, paged: bool) {
    let mut c = load(case);
    c.model.set_paged_kv(paged);
    let greedy_new = c.exp["greedy_max_new_tokens"].as_u64().unwrap() as usize;
    let engine = Engine::start(c.model, EngineConfig { block_size: 4, ..Default::default() });
    for (name, p) in c.exp["prompts"].as_object().unwrap() {
        let what = |s: &str| format!("{case}/{name} (paged {paged}): {s}");
        let prompt = ids(&p["input_ids"]);
        let media = media_of(&c.tensors[&format!("{name}.pixel_values")], name);
        let (miss, cached_miss) = collect(request(&engine, &prompt, &media, Strategy::Greedy, greedy_new, c.eos));
        let (hit, cached_hit) = collect(request(&engine, &prompt, &media, Strategy::Greedy, greedy_new, c.eos));
        // (The first may share a few tokens, `<s>` at least, with an earlier prompt.)
        assert!(
            cached_hit >= 4 && cached_hit > cached_miss && cached_hit < prompt.len(),
            "{}",
            what(&format!("second request hits the prefix cache ({cached_hit} tokens, first {cached_miss})"))
        );
        assert_eq!(miss, ids(&p["greedy"]), "{}", what("miss"));
        assert_eq!(hit, miss, "{}", what("hit == miss"));
        if name == "eos_turns" {
            let eos_at = prompt.iter().position(|&t| t == c.eos).expect("the prompt has </s>");
            assert!(cached_hit > eos_at + 1, "{}", what("the cached prefix covers tokens after </s>"));
            // A prompt that stops between the `</s>` and the next image, so the tokens computed
            // after the restored prefix are ones that attend to no image: served from the
            // cache (blocks of the request above), it must equal a miss.
            let image = c.exp["image_token_id"].as_u64().unwrap() as u32;
            let second = prompt.iter().enumerate().filter(|(_, &t)| t == image).nth(1).expect("two images").0;
            let short = &prompt[..second - 1];
            assert!(short.len() > eos_at + 4, "{}", what("the short prompt has tokens after </s>"));
            let (hit, cached) = collect(request(&engine, short, &media[..1], Strategy::Greedy, greedy_new, c.eos));
            assert!(cached > eos_at + 1, "{}", what(&format!("the short prompt's cached prefix ends after </s> ({cached})")));
            let fresh = Engine::start(load(case).model, EngineConfig { prefix_cache_bytes: 0, ..Default::default() });
            let (miss, _) = collect(request(&fresh, short, &media[..1], Strategy::Greedy, greedy_new, c.eos));
            assert_eq!(hit, miss, "{}", what("a prefix cached across </s>: hit == miss"));
        }
    }
}

macro_rules! cases {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn alone_per_sequence_caches() {
                super::check_alone(stringify!($name), false);
            }
            #[test]
            fn alone_paged_pool() {
                super::check_alone(stringify!($name), true);
            }
            #[test]
            fn mixed_batch() {
                super::check_batched(stringify!($name), false);
                super::check_batched(stringify!($name), true);
            }
            #[test]
            fn prefix_and_vision_cache_hits_equal_misses() {
                super::check_cache_hits(stringify!($name), false);
                super::check_cache_hits(stringify!($name), true);
            }
        }
    )*};
}

cases!(idefics_x1, idefics_x2, idefics_x2_qk);
