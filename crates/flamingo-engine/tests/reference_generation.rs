//! Generation against the PyTorch reference, through the engine (the one decode loop, which
//! `flamingo generate` and the server both run), on every tiny fixture model: greedy ids, beam
//! search with 3 beams (length penalty 1 and 0), and greedy ids with blank images, from the
//! reference's own pixels, each request alone; with the CPU's per-sequence caches and with the
//! paged pool of the batched device path. Stage-by-stage numerics (pixels, vision tokens,
//! latents, logits) are tested in the model crate; see `tests/reference/make_fixtures.py`.

mod common;
use common::{ids, media_of};
use std::path::PathBuf;

use flamingo_engine::{Backend, Engine, EngineConfig, Event, PreparedMedia, SamplingParams, StopParams, ValidRequest};
use flamingo_model::candle::{DType, Device};
use flamingo_model::sampling::Strategy;

fn model_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(case)
}

/// The generated ids of one request, submitted alone.
fn generate(engine: &Engine, prompt: &[u32], media: &[PreparedMedia], strategy: Strategy, max_new: usize, stop: u32) -> Vec<u32> {
    let sampling = SamplingParams { strategy, repetition_penalty: 1.0, logprobs: None };
    let stop = StopParams { max_new_tokens: max_new, stop_token_ids: vec![stop], min_new_tokens: 0 };
    let req = ValidRequest::new(prompt.to_vec(), media.to_vec(), sampling, stop, engine.spec()).expect("valid request");
    let mut rx = engine.submit(req).expect("submitted");
    let mut out = Vec::new();
    loop {
        match rx.blocking_recv().expect("stream ended without a finish event") {
            Event::Token(t) => out.push(t.id),
            Event::Prefilled { .. } => {}
            Event::Finished { .. } => return out,
            Event::Error(e) => panic!("generation failed: {e}"),
            other => panic!("unexpected event {other:?}"),
        }
    }
}

/// `paged`: sequences keep their K/V in the model's paged pool (the batched device path, run
/// here on the CPU device) instead of the CPU's per-sequence caches.
fn check_case(case: &str, paged: bool) {
    let dir = model_dir(case);
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tensors = flamingo_model::candle::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let loaded = flamingo_model::load(&dir, &Device::Cpu, DType::F32, &()).unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
    // The reference's generate() stops only at <|endofchunk|>.
    let eoc = loaded.tokenizer.eoc_token_id();
    assert_eq!(loaded.model.spec().media_token_id, Some(loaded.tokenizer.media_token_id()));
    let mut model = loaded.model;
    model.set_paged_kv(paged);
    let engine = Engine::start(model, EngineConfig::default());
    for p in exp["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let what = |s: &str| format!("{case}/{name}: {s}");
        let prompt = ids(&p["input_ids"]);
        let pixels = &tensors[&format!("{name}.vision_x")];
        let media = media_of(pixels, name);

        let g = &p["greedy"];
        let max_new = g["max_new_tokens"].as_u64().unwrap() as usize;
        assert_eq!(generate(&engine, &prompt, &media, Strategy::Greedy, max_new, eoc), ids(&g["ids"]), "{}", what("greedy ids"));

        for key in ["beam3", "beam3_lp0"] {
            let b = &p[key];
            let strategy = Strategy::Beam {
                num_beams: b["num_beams"].as_u64().unwrap() as usize,
                length_penalty: b["length_penalty"].as_f64().unwrap() as f32,
                early_stopping: false,
            };
            let max_new = b["max_new_tokens"].as_u64().unwrap() as usize;
            assert_eq!(generate(&engine, &prompt, &media, strategy, max_new, eoc), ids(&b["ids"]), "{}", what(key));
        }

        // Blank images: the reference's greedy ids with all-zero pixels (they differ from the
        // real images' ids, so the vision path is exercised).
        let blank = media_of(&pixels.zeros_like().unwrap(), &format!("{name}-blank"));
        let got = generate(&engine, &prompt, &blank, Strategy::Greedy, max_new, eoc);
        assert_eq!(got, ids(&p["blank_greedy_ids"]), "{}", what("blank-image greedy ids"));
        assert_ne!(ids(&p["blank_greedy_ids"]), ids(&g["ids"]), "{}", what("fixture must be discriminating"));
    }
}

macro_rules! cases {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn per_sequence_caches() {
                super::check_case(stringify!($name), false);
            }
            #[test]
            fn paged_pool() {
                super::check_case(stringify!($name), true);
            }
        }
    )*};
}

cases!(mosaicgpt_x1, mosaicgpt_x2, mpt_x1, mpt_x2, gptneox_x1, gptneox_x2, llama_x1, llama_x2);
