//! The engine on the tiny reference models: batching, the vision cache and the prefix cache
//! must not change a single greedy token, and greedy in the engine equals the reference.

use std::path::PathBuf;

use flamingo_engine::{media_key, Backend, Engine, EngineConfig, Event, PreparedMedia, SamplingParams, StopParams, ValidRequest};
use flamingo_model::candle::{DType, Device};
use flamingo_model::preprocess::{preprocess, ImageLimits};
use flamingo_model::sampling::{FinishReason, Strategy};
use flamingo_model::Loaded;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(case: &str) -> (Loaded, serde_json::Value) {
    let dir = root().join("models").join(case);
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (flamingo_model::load(&dir, &Device::Cpu, DType::F32, &()).unwrap(), exp)
}

fn media(name: &str) -> PreparedMedia {
    let bytes = std::fs::read(root().join("images").join(name)).unwrap();
    let px = preprocess(&bytes, 224, &ImageLimits::default(), &Device::Cpu).unwrap();
    PreparedMedia { key: media_key(&bytes, "open_clip-224"), pixels: px.unsqueeze(0).unwrap() }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

struct Req {
    prompt: Vec<u32>,
    images: Vec<&'static str>,
    sampling: SamplingParams,
    max_new: usize,
}

fn build(l: &Loaded, r: &Req, stop: Vec<u32>) -> ValidRequest {
    ValidRequest::new(
        r.prompt.clone(),
        r.images.iter().map(|n| media(n)).collect(),
        r.sampling.clone(),
        StopParams { max_new_tokens: r.max_new, stop_token_ids: stop, min_new_tokens: 0 },
        &l.model.spec(),
    )
    .unwrap()
}

/// Collects a stream to (tokens, finish event).
fn collect(mut rx: flamingo_engine::EventStream) -> (Vec<u32>, Event) {
    let mut toks = vec![];
    loop {
        match rx.blocking_recv().expect("stream ended without a finish event") {
            Event::Token(t) => toks.push(t.id),
            Event::Prefilled { .. } => {}
            e => return (toks, e),
        }
    }
}

fn greedy() -> SamplingParams {
    SamplingParams { strategy: Strategy::Greedy, repetition_penalty: 1.0, logprobs: None }
}

/// The model with its K/V in the paged pool of the batched device path (on the CPU device).
fn paged_model(case: &str) -> flamingo_model::Flamingo {
    let mut m = load(case).0.model;
    m.set_paged_kv(true);
    m
}

#[test]
fn engine_greedy_matches_reference_alone_and_in_a_batch_of_32() {
    greedy_alone_and_in_a_batch_of_32(false);
}

/// The same with paged K/V: greedy rows come back from the forward as their argmax alone,
/// sampled and penalised ones in full, in one batch.
#[test]
fn paged_engine_greedy_matches_reference_alone_and_in_a_batch_of_32() {
    greedy_alone_and_in_a_batch_of_32(true);
}

fn greedy_alone_and_in_a_batch_of_32(paged: bool) {
    let model = |case: &str| if paged { paged_model(case) } else { load(case).0.model };
    for case in ["mpt_x1", "gptneox_x2", "llama_x1"] {
        let (l, exp) = load(case);
        let tok = &l.tokenizer;
        let eoc = tok.eoc_token_id();
        let p3 = &exp["prompts"][1];
        let target = Req {
            prompt: ids(&p3["input_ids"]),
            images: vec!["chelsea.png", "coffee.png", "camera.png"],
            sampling: greedy(),
            max_new: p3["greedy"]["max_new_tokens"].as_u64().unwrap() as usize,
        };
        let want = ids(&p3["greedy"]["ids"]);
        let stop = vec![eoc];
        let cfg = EngineConfig { max_running: 32, max_batched_tokens: 256, ..Default::default() };

        // Alone.
        let engine = Engine::start(model(case), cfg.clone());
        let (alone, fin) = collect(engine.submit(build(&l, &target, stop.clone())).unwrap());
        assert_eq!(alone, want, "{case}: engine greedy vs reference");
        assert!(matches!(fin, Event::Finished { .. }));
        drop(engine);

        // In a batch of 32 mixed requests: other images, lengths, sampling settings.
        let engine = Engine::start(model(case), cfg.clone());
        let others = ["small.png", "rgba.png", "palette.png", "coffee.jpg", "camera.png"];
        let mut streams = Vec::new();
        let mut target_index = 0;
        for i in 0..32usize {
            if i == 13 {
                target_index = streams.len();
                streams.push(engine.submit(build(&l, &target, stop.clone())).unwrap());
                continue;
            }
            let text = format!("{}<image>Output: {}", "a photo of ".repeat(i % 4), "x".repeat(i % 7));
            let prompt = tok.encode_prompt(&text).unwrap();
            let sampling = match i % 3 {
                0 => greedy(),
                1 => SamplingParams {
                    strategy: Strategy::Sample { temperature: 0.8, top_k: Some(20), top_p: Some(0.9), seed: i as u64 },
                    repetition_penalty: 1.1,
                    logprobs: Some(3),
                },
                _ => SamplingParams { strategy: Strategy::Greedy, repetition_penalty: 1.3, logprobs: None },
            };
            let r = Req { prompt, images: vec![others[i % others.len()]], sampling, max_new: 3 + i % 11 };
            streams.push(engine.submit(build(&l, &r, stop.clone())).unwrap());
        }
        let results: Vec<_> = streams.into_iter().map(collect).collect();
        assert_eq!(results[target_index].0, want, "{case}: same tokens inside a batch of 32");
        for (toks, fin) in &results {
            assert!(!toks.is_empty());
            assert!(matches!(fin, Event::Finished { reason: FinishReason::Stop | FinishReason::Length, .. }), "{fin:?}");
        }
    }
}

#[test]
fn cache_hits_give_identical_tokens() {
    let (l, exp) = load("mosaicgpt_x1");
    let p3 = &exp["prompts"][1];
    let r = Req { prompt: ids(&p3["input_ids"]), images: vec!["chelsea.png", "coffee.png", "camera.png"], sampling: greedy(), max_new: 12 };
    let stop = vec![l.tokenizer.eoc_token_id()];
    let cfg = EngineConfig { block_size: 8, ..Default::default() };
    let engine = Engine::start(load("mosaicgpt_x1").0.model, cfg);
    let (miss, fin_miss) = collect(engine.submit(build(&l, &r, stop.clone())).unwrap());
    let (hit, fin_hit) = collect(engine.submit(build(&l, &r, stop.clone())).unwrap());
    assert_eq!(miss, ids(&p3["greedy"]["ids"]));
    assert_eq!(hit, miss, "prefix + vision cache hit vs miss");
    let cached = |e: &Event| match e {
        Event::Finished { usage, .. } => usage.cached_tokens,
        other => panic!("{other:?}"),
    };
    assert_eq!(cached(&fin_miss), 0);
    let n = r.prompt.len();
    assert_eq!(cached(&fin_hit), n - 1, "every prompt token but the last (whose logits are needed)");
}

#[test]
fn a_prompt_diverging_mid_block_reuses_the_shared_rows_exactly() {
    let (l, exp) = load("mosaicgpt_x1");
    let p3 = &exp["prompts"][1];
    let base = ids(&p3["input_ids"]);
    let n = base.len();
    let images = vec!["chelsea.png", "coffee.png", "camera.png"];
    let stop = vec![l.tokenizer.eoc_token_id()];
    // The same images, the prompt's last two tokens replaced: it diverges inside a block.
    let mut other = base[..n - 2].to_vec();
    other.extend([5, 6, 7]);
    let first = Req { prompt: other, images: images.clone(), sampling: greedy(), max_new: 4 };
    let second = Req { prompt: base.clone(), images: images.clone(), sampling: greedy(), max_new: 12 };
    let cfg = EngineConfig { block_size: 8, ..Default::default() };
    assert_ne!((n - 2) % 8, 0, "the divergence must fall inside a block for this test");
    let engine = Engine::start(load("mosaicgpt_x1").0.model, cfg);
    let _ = collect(engine.submit(build(&l, &first, stop.clone())).unwrap());
    let (hit, fin) = collect(engine.submit(build(&l, &second, stop.clone())).unwrap());
    assert_eq!(hit, ids(&p3["greedy"]["ids"]), "a partial-block hit gives the reference's tokens");
    match fin {
        Event::Finished { usage, .. } => assert_eq!(usage.cached_tokens, n - 2, "all the shared tokens are reused"),
        other => panic!("{other:?}"),
    }
    // A different image at the same token position must not be reused.
    let mut swapped = images.clone();
    swapped[2] = "chelsea.png";
    let third = Req { prompt: base, images: swapped, sampling: greedy(), max_new: 2 };
    let (_, fin) = collect(engine.submit(build(&l, &third, stop)).unwrap());
    let last_image = ids(&p3["input_ids"]).iter().rposition(|&t| t == l.tokenizer.media_token_id()).unwrap();
    match fin {
        Event::Finished { usage, .. } => {
            assert!(usage.cached_tokens <= last_image, "{} cached past the changed image at {last_image}", usage.cached_tokens)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn engine_beam_search_matches_reference() {
    for case in ["mpt_x2", "gptneox_x1", "mosaicgpt_x1"] {
        let (l, exp) = load(case);
        let stop = vec![l.tokenizer.eoc_token_id()];
        let engine = Engine::start(load(case).0.model, EngineConfig::default());
        for (pi, images) in [(0usize, vec!["chelsea.png"]), (1, vec!["chelsea.png", "coffee.png", "camera.png"])] {
            let p = &exp["prompts"][pi];
            // Submit both beam settings and a greedy request together: beams share the batch.
            let mut streams = Vec::new();
            for key in ["beam3", "beam3_lp0"] {
                let b = &p[key];
                let r = Req {
                    prompt: ids(&p["input_ids"]),
                    images: images.clone(),
                    sampling: SamplingParams {
                        strategy: Strategy::Beam {
                            num_beams: b["num_beams"].as_u64().unwrap() as usize,
                            length_penalty: b["length_penalty"].as_f64().unwrap() as f32,
                            early_stopping: false,
                        },
                        repetition_penalty: 1.0,
                        logprobs: None,
                    },
                    max_new: b["max_new_tokens"].as_u64().unwrap() as usize,
                };
                streams.push((key, ids(&b["ids"]), engine.submit(build(&l, &r, stop.clone())).unwrap()));
            }
            let g = Req { prompt: ids(&p["input_ids"]), images: images.clone(), sampling: greedy(), max_new: 12 };
            let greedy_stream = engine.submit(build(&l, &g, stop.clone())).unwrap();
            for (key, want, rx) in streams {
                let (got, fin) = collect(rx);
                assert_eq!(got, want, "{case} prompt {pi} {key}");
                assert!(matches!(fin, Event::Finished { .. }));
            }
            assert_eq!(collect(greedy_stream).0, ids(&p["greedy"]["ids"]), "{case} prompt {pi} greedy next to beams");
        }
    }
}

/// A paged model's forward returns the rows marked for argmax as their argmax (equal to the
/// host's pick from the full row) and the others in full, in input order.
#[test]
fn paged_forward_rows_send_greedy_rows_as_their_argmax() {
    use flamingo_engine::Row;
    use flamingo_model::Input;
    let (_, exp) = load("llama_x1");
    let m = paged_model("llama_x1");
    let prompt = ids(&exp["prompts"][1]["input_ids"]);
    let run = |argmax: &[bool]| {
        let mut states: Vec<_> = (0..3).map(|_| m.new_state()).collect();
        for st in states.iter_mut() {
            let media: Vec<_> = ["chelsea.png", "coffee.png", "camera.png"].iter().map(|n| m.encode(&media(n), 0).unwrap()).collect();
            m.attach(st, &media.iter().collect::<Vec<_>>()).unwrap();
        }
        let mut refs: Vec<_> = states.iter_mut().collect();
        let inputs = [Input::Prompt(&prompt), Input::Prompt(&prompt[..5]), Input::Prompt(&prompt[..9])];
        m.forward_rows(&mut refs, &inputs, argmax).unwrap()
    };
    let full = run(&[false, false, false]);
    let mixed = run(&[true, false, true]);
    for (i, (f, g)) in full.iter().zip(&mixed).enumerate() {
        let Row::Logits(row) = f else { panic!("row {i}: asked for logits") };
        let want = flamingo_model::sampling::argmax(row);
        match (i, g) {
            (1, Row::Logits(r)) => assert_eq!(r, row, "row 1 in full"),
            (0 | 2, Row::Argmax(id)) => assert_eq!(*id, want, "row {i}: device argmax"),
            _ => panic!("row {i}: {g:?}"),
        }
    }
}
