//! Scheduling-state tests against a fake model, driven step by step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use flamingo_engine::{
    media_key, Backend, BackendError, Engine, EngineError, Event, ModelSpec, PreparedMedia, RequestError, SamplingParams, Scheduler,
    StopParams, ValidRequest,
};
use flamingo_model::candle::{Device, Tensor};
use flamingo_model::sampling::{FinishReason, Strategy};
use flamingo_model::Input;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const VOCAB: usize = 97;
const MEDIA: u32 = 96;
const EOS: u32 = 95;
/// What the fake's requests are checked against (the KV size of `Fake::default()`).
const SPEC: ModelSpec = ModelSpec { vocab_size: VOCAB, media_token_id: Some(MEDIA), kv_bytes_per_token: 0 };

/// A deterministic fake: the "next token" is a hash of everything the sequence has seen
/// (tokens and attached media), so any mistake in state handling changes the output.
#[derive(Clone, Default)]
struct Fake {
    encodes: Arc<AtomicUsize>,
    batches: Arc<Mutex<Vec<Vec<usize>>>>,
    bytes_per_token: usize,
    /// An image the fake model cannot take (as the real one refuses, e.g., too many frames).
    refused: Option<flamingo_engine::MediaKey>,
    /// Every forward fails (a failure inside the model).
    broken: bool,
    /// A forward over this token panics (a bug inside the model).
    panics_on: Option<u32>,
}

struct FakeState {
    seen: Vec<u32>,
    media: Vec<u32>,
}

impl Backend for Fake {
    type State = FakeState;
    type Media = u32;
    type Block = Vec<u32>;

    fn spec(&self) -> ModelSpec {
        ModelSpec { vocab_size: VOCAB, media_token_id: Some(MEDIA), kv_bytes_per_token: self.bytes_per_token }
    }
    fn new_state(&self) -> FakeState {
        FakeState { seen: vec![], media: vec![] }
    }
    fn media_depends_on_position(&self) -> bool {
        false
    }
    fn encode(&self, media: &PreparedMedia, _position: usize) -> Result<u32, BackendError> {
        self.encodes.fetch_add(1, Ordering::SeqCst);
        if self.refused == Some(media.key) {
            return Err(BackendError::Input("this model cannot take that image".into()));
        }
        Ok(media.key[0] as u32)
    }
    fn media_bytes(&self, _m: &u32) -> usize {
        100
    }
    fn attach(&self, state: &mut FakeState, media: &[&u32]) -> Result<(), BackendError> {
        state.media.extend(media.iter().map(|m| **m));
        Ok(())
    }
    fn forward(&self, states: &mut [&mut FakeState], inputs: &[Input]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.batches.lock().unwrap().push(inputs.iter().map(|i| i.len()).collect());
        if self.broken {
            return Err(BackendError::Internal("out of device memory".into()));
        }
        if let Some(t) = self.panics_on {
            if inputs.iter().any(|i| matches!(i, Input::Prompt(p) if p.contains(&t))) {
                panic!("the fake model met token {t}");
            }
        }
        Ok(states
            .iter_mut()
            .zip(inputs)
            .map(|(st, inp)| {
                match inp {
                    Input::Prompt(t) => st.seen.extend_from_slice(t),
                    Input::Generated(t) => st.seen.push(*t),
                }
                let mut h: u64 = 1469598103934665603;
                for &t in st.seen.iter().chain(&st.media) {
                    h = (h ^ t as u64).wrapping_mul(1099511628211);
                }
                let mut row = vec![0f32; VOCAB];
                row[(h % 90) as usize] = 5.0;
                row
            })
            .collect())
    }
    fn fork(&self, s: &FakeState) -> Result<FakeState, BackendError> {
        Ok(FakeState { seen: s.seen.clone(), media: s.media.clone() })
    }
    fn state_bytes(&self, s: &FakeState) -> usize {
        s.seen.len() * self.bytes_per_token
    }
    fn snapshot(&self, s: &FakeState, start: usize, len: usize, _media: usize) -> Result<Vec<u32>, BackendError> {
        Ok(s.seen[start..start + len].to_vec())
    }
    fn block_bytes(&self, b: &Vec<u32>) -> usize {
        b.len() * 4
    }
    fn restore(&self, s: &mut FakeState, blocks: &[&Vec<u32>], _prefix: &[u32], _capacity: usize) -> Result<(), BackendError> {
        for b in blocks {
            s.seen.extend_from_slice(b);
        }
        Ok(())
    }
}

fn image(tag: u8) -> PreparedMedia {
    PreparedMedia { key: media_key(&[tag], "test"), pixels: Tensor::zeros(1, flamingo_model::candle::DType::F32, &Device::Cpu).unwrap() }
}

fn request(prompt: Vec<u32>, media: Vec<PreparedMedia>, max_new: usize) -> ValidRequest {
    ValidRequest::new(
        prompt,
        media,
        SamplingParams::default(),
        StopParams { max_new_tokens: max_new, stop_token_ids: vec![EOS], min_new_tokens: 0 },
        &SPEC,
    )
    .unwrap()
}

fn cfg() -> flamingo_engine::EngineConfig {
    flamingo_engine::EngineConfig {
        max_running: 4,
        max_batched_tokens: 64,
        kv_budget_bytes: 1 << 30,
        max_waiting: 100,
        block_size: 8,
        vision_cache_bytes: 1000,
        prefix_cache_bytes: 1 << 20,
        pinned_bytes: 1 << 20,
    }
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7 + seed * 13) % 90).collect()
}

/// Runs until idle; returns each stream's tokens and finish event.
fn drain(s: &mut Scheduler<Fake>, rx: &mut [UnboundedReceiver<Event>]) -> Vec<(Vec<u32>, Option<Event>)> {
    let mut guard = 0;
    while s.has_work() {
        s.step();
        guard += 1;
        assert!(guard < 10_000, "scheduler does not finish");
    }
    rx.iter_mut()
        .map(|r| {
            let mut toks = vec![];
            let mut fin = None;
            while let Ok(e) = r.try_recv() {
                match e {
                    Event::Token(t) => toks.push(t.id),
                    Event::Prefilled { .. } => {}
                    other => fin = Some(other),
                }
            }
            (toks, fin)
        })
        .collect()
}

fn submit(s: &mut Scheduler<Fake>, req: ValidRequest) -> UnboundedReceiver<Event> {
    let (tx, rx) = unbounded_channel();
    s.submit(req, tx).unwrap();
    rx
}

#[test]
fn budgets_are_respected_and_prefill_is_chunked() {
    let fake = Fake::default();
    let mut s = Scheduler::new(fake.clone(), cfg());
    let mut rx: Vec<_> = (0..10).map(|i| submit(&mut s, request(prompt(40, i), vec![], 5))).collect();
    let mut max_running = 0;
    while s.has_work() {
        let r = s.step();
        assert!(r.prefill_tokens + r.decode_tokens <= 64, "{r:?}");
        assert!(r.sequences <= 4);
        max_running = max_running.max(s.running_len());
    }
    assert_eq!(max_running, 4);
    // A 40-token prompt in a 64-token budget is split: some batch has a partial prefill.
    assert!(fake.batches.lock().unwrap().iter().any(|b| b.iter().any(|&n| n > 1 && n < 40)));
    for (toks, fin) in drain(&mut s, &mut rx) {
        assert!(!toks.is_empty());
        assert!(matches!(fin, Some(Event::Finished { .. })));
    }
}

#[test]
fn decode_interleaves_with_chunked_prefill() {
    let fake = Fake::default();
    let mut s = Scheduler::new(fake.clone(), flamingo_engine::EngineConfig { max_batched_tokens: 16, ..cfg() });
    let _a = submit(&mut s, request(prompt(4, 1), vec![], 50));
    s.step(); // A prefilled, first token
    let _b = submit(&mut s, request(prompt(100, 2), vec![], 5));
    let r = s.step();
    // A decodes one token while B prefills a 15-token chunk in the same forward.
    assert_eq!(r.decode_tokens, 1);
    assert_eq!(r.prefill_tokens, 15);
    let r = s.step();
    assert_eq!((r.decode_tokens, r.prefill_tokens), (1, 15));
}

#[test]
fn admission_is_first_come_first_served() {
    let mut s = Scheduler::new(Fake::default(), flamingo_engine::EngineConfig { max_running: 1, ..cfg() });
    let mut rx: Vec<_> = (0..5).map(|i| submit(&mut s, request(prompt(10, i), vec![], 3))).collect();
    let mut order = vec![];
    while s.has_work() {
        s.step();
        for id in s.running_ids() {
            if order.last() != Some(&id) {
                order.push(id);
            }
        }
    }
    assert_eq!(order, vec![1, 2, 3, 4, 5]);
    drain(&mut s, &mut rx);
}

#[test]
fn kv_budget_holds_requests_back() {
    let fake = Fake { bytes_per_token: 10, ..Default::default() };
    // Each request reserves (10 + 10) * 10 = 200 bytes; the budget fits two.
    let mut s = Scheduler::new(fake, flamingo_engine::EngineConfig { kv_budget_bytes: 450, ..cfg() });
    let mut rx: Vec<_> = (0..4).map(|i| submit(&mut s, request(prompt(10, i), vec![], 10))).collect();
    s.step();
    assert_eq!(s.running_len(), 2);
    assert_eq!(s.reserved_bytes(), 400);
    assert_eq!(s.waiting_len(), 2);
    // A request larger than the whole budget is refused at once instead of blocking the queue
    // forever (and nothing is reserved for it).
    let (tx, _big) = unbounded_channel();
    let refused = s.submit(request(prompt(100, 9), vec![], 10), tx);
    assert!(matches!(&refused, Err(EngineError::Request(RequestError::OverBudget { need: 1100, budget: 450, .. }))), "{refused:?}");
    assert!(refused.unwrap_err().to_string().contains("KV cache"));
    assert_eq!(s.waiting_len(), 2);
    drain(&mut s, &mut rx);
    assert_eq!(s.reserved_bytes(), 0);
}

#[test]
fn overload_is_rejected_at_once() {
    let mut s = Scheduler::new(Fake::default(), flamingo_engine::EngineConfig { max_waiting: 2, ..cfg() });
    let _a = submit(&mut s, request(prompt(5, 1), vec![], 3));
    let _b = submit(&mut s, request(prompt(5, 2), vec![], 3));
    let (tx, _rx) = unbounded_channel();
    assert_eq!(s.submit(request(prompt(5, 3), vec![], 3), tx), Err(EngineError::Overloaded(2)));
}

#[test]
fn dropping_the_stream_cancels_and_frees_memory() {
    let fake = Fake { bytes_per_token: 10, ..Default::default() };
    let mut s = Scheduler::new(fake, cfg());
    let a = submit(&mut s, request(prompt(10, 1), vec![], 1000));
    let mut b = submit(&mut s, request(prompt(10, 2), vec![], 10));
    s.step();
    s.step();
    assert_eq!(s.running_len(), 2);
    assert!(s.state_bytes() > 0);
    drop(a);
    let r = s.step();
    assert_eq!(r.cancelled, 1);
    assert_eq!(s.running_len(), 1);
    assert_eq!(s.reserved_bytes(), (10 + 10) * 10);
    drain(&mut s, std::slice::from_mut(&mut b));
    assert_eq!((s.reserved_bytes(), s.state_bytes()), (0, 0));
}

#[test]
fn vision_cache_encodes_each_image_once_and_evicts_by_bytes() {
    let fake = Fake::default();
    // Room for 10 encodings of 100 bytes.
    let mut s = Scheduler::new(fake.clone(), cfg());
    let p = vec![MEDIA, 1, 2, MEDIA, 3];
    let mut rx = vec![
        submit(&mut s, request(p.clone(), vec![image(1), image(2)], 3)),
        submit(&mut s, request(p.clone(), vec![image(1), image(2)], 3)),
    ];
    let out = drain(&mut s, &mut rx);
    assert_eq!(fake.encodes.load(Ordering::SeqCst), 2, "the second request must hit the cache");
    assert_eq!(out[0].0, out[1].0, "a vision-cache hit gives the same tokens");
    // Eleven distinct images overflow the 1000-byte cache: the oldest is evicted.
    for i in 0..11u8 {
        let mut r = vec![submit(&mut s, request(vec![MEDIA, 5], vec![image(10 + i)], 1))];
        drain(&mut s, &mut r);
    }
    assert_eq!(s.vision_cache().len(), 10);
    assert!(s.vision_cache().evictions() >= 3);
    assert!(s.vision_cache().bytes() <= 1000);
}

#[test]
fn prefix_cache_hit_skips_prefill_and_gives_identical_tokens() {
    let fake = Fake::default();
    let mut s = Scheduler::new(fake.clone(), cfg());
    // A 4-shot-like prompt: 36 shared tokens (with two images), then a different tail.
    let mut shared = prompt(36, 3);
    shared[0] = MEDIA;
    shared[20] = MEDIA;
    let mk = |tail: u32| {
        let mut p = shared.clone();
        p.extend([tail, tail + 1, tail + 2]);
        request(p, vec![image(1), image(2)], 6)
    };
    let mut first = vec![submit(&mut s, mk(40))];
    let miss = drain(&mut s, &mut first);
    let mut second = vec![submit(&mut s, mk(40))];
    let hit = drain(&mut s, &mut second);
    assert_eq!(hit[0].0, miss[0].0, "a prefix-cache hit must give the same tokens as a miss");
    let cached = |e: &Option<Event>| match e {
        Some(Event::Finished { usage, .. }) => usage.cached_tokens,
        other => panic!("{other:?}"),
    };
    assert_eq!(cached(&miss[0].1), 0);
    assert_eq!(cached(&hit[0].1), 32, "4 full blocks of 8 (of 39 tokens)");
    // The prefill of the hit only computed the uncached tail.
    let batches = fake.batches.lock().unwrap();
    assert!(batches.iter().any(|b| b == &vec![7]));
    drop(batches);
    // Different images under the same tokens must not hit.
    let mut other = vec![submit(&mut s, request(mk(40).prompt().to_vec(), vec![image(1), image(3)], 6))];
    let o = drain(&mut s, &mut other);
    assert_eq!(cached(&o[0].1), 16, "blocks before the changed image's block still hit");
}

#[test]
fn stop_token_and_length_finish_reasons() {
    let mut s = Scheduler::new(Fake::default(), cfg());
    let mut rx = vec![submit(&mut s, request(prompt(5, 1), vec![], 2))];
    let out = drain(&mut s, &mut rx);
    assert_eq!(out[0].0.len(), 2);
    assert!(
        matches!(out[0].1, Some(Event::Finished { reason: FinishReason::Length, usage }) if usage.completion_tokens == 2 && usage.prompt_tokens == 5)
    );
    let _ = Strategy::Greedy;
}

#[test]
fn invalid_requests_are_refused_before_the_queue() {
    let bad = ValidRequest::new(
        vec![MEDIA, 1],
        vec![],
        SamplingParams::default(),
        StopParams { max_new_tokens: 3, stop_token_ids: vec![], min_new_tokens: 0 },
        &SPEC,
    );
    assert_eq!(bad.as_ref().err(), Some(&RequestError::MediaCount { tokens: 1, media: 0 }));
    assert!(bad.unwrap_err().to_string().contains("1 <image> tokens but 0 images"));
    let bad = ValidRequest::new(
        vec![500],
        vec![],
        SamplingParams::default(),
        StopParams { max_new_tokens: 3, stop_token_ids: vec![], min_new_tokens: 0 },
        &SPEC,
    );
    assert_eq!(bad.err(), Some(RequestError::UnknownToken(500)));
    let bad = ValidRequest::new(
        vec![1],
        vec![],
        SamplingParams::default(),
        StopParams { max_new_tokens: 0, stop_token_ids: vec![], min_new_tokens: 0 },
        &SPEC,
    );
    assert!(matches!(bad, Err(RequestError::Sampling(_))));
}

/// Regression (bug: a beam-search request whose KV need, x num_beams, exceeded the engine's
/// budget was accepted and then failed inside the engine, which the server reported as a 500).
/// The engine refuses it when it is submitted, as the request's own mistake.
#[test]
fn beam_request_over_the_kv_budget_is_refused_at_submit() {
    let fake = Fake { bytes_per_token: 10, ..Default::default() };
    let spec = fake.spec();
    // 10 prompt tokens + 10 new ones fit 300 bytes; with 4 beams the request needs 500.
    let engine = Engine::start(fake, flamingo_engine::EngineConfig { kv_budget_bytes: 300, ..cfg() });
    let beams =
        SamplingParams { strategy: Strategy::Beam { num_beams: 4, length_penalty: 1.0, early_stopping: false }, ..Default::default() };
    let stop = StopParams { max_new_tokens: 10, stop_token_ids: vec![EOS], min_new_tokens: 0 };
    let beam = ValidRequest::new(prompt(10, 1), vec![], beams.clone(), stop.clone(), &spec).unwrap();
    let refused = engine.submit(beam).err();
    assert!(
        matches!(&refused, Some(EngineError::Request(RequestError::OverBudget { beams: 4, need: 500, budget: 300, .. }))),
        "{refused:?}"
    );
    assert!(refused.is_some_and(|e| e.is_request_error()));
    assert_eq!(engine.check_budget(10, &beams, 10).err().map(|e| e.to_string().contains("KV cache")), Some(true));
    // The same request with one sequence runs.
    let one = ValidRequest::new(prompt(10, 1), vec![], SamplingParams::default(), stop, &spec).unwrap();
    let mut rx = engine.submit(one).unwrap();
    loop {
        match rx.blocking_recv().expect("a finish event") {
            Event::Finished { .. } => break,
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
}

/// A failure caused by the request (media the model cannot take) reaches the client as the
/// request's own mistake; a failure inside the model as an internal error. Other requests carry on.
#[test]
fn request_caused_failures_are_told_apart_from_internal_ones() {
    let fake = Fake { refused: Some(image(7).key), ..Default::default() };
    let mut s = Scheduler::new(fake, cfg());
    let mut rx =
        vec![submit(&mut s, request(vec![MEDIA, 1], vec![image(7)], 3)), submit(&mut s, request(vec![MEDIA, 1], vec![image(8)], 3))];
    let out = drain(&mut s, &mut rx);
    match &out[0].1 {
        Some(Event::Error(e)) => {
            assert!(e.is_request_error(), "{e:?}");
            assert!(matches!(e, EngineError::Request(RequestError::Media(m)) if m.contains("cannot take")), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(out[1].1, Some(Event::Finished { .. })), "the other request is served");

    let mut s = Scheduler::new(Fake { broken: true, ..Default::default() }, cfg());
    let mut rx = vec![submit(&mut s, request(prompt(5, 1), vec![], 3))];
    let out = drain(&mut s, &mut rx);
    match &out[0].1 {
        Some(Event::Error(e @ EngineError::Internal(m))) => assert!(!e.is_request_error() && m.contains("out of device memory"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.reserved_bytes(), 0);
}

/// Reads a request's events to its end: `Ok(tokens)` when it finished, `Err(error)` when it
/// failed.
fn outcome(rx: &mut UnboundedReceiver<Event>) -> Result<usize, EngineError> {
    let mut tokens = 0;
    loop {
        match rx.blocking_recv() {
            Some(Event::Token(_)) => tokens += 1,
            Some(Event::Finished { .. }) => return Ok(tokens),
            Some(Event::Error(e)) => return Err(e),
            Some(_) => {}
            None => panic!("the stream ended without a finish or an error"),
        }
    }
}

/// A panic inside the model (a bug) fails the requests of the step it interrupted with an
/// internal error; the engine thread lives on, its waiting count returns to zero, and requests
/// submitted after it (and those waiting meanwhile) are served.
#[test]
fn a_panic_inside_the_model_fails_its_step_and_the_engine_goes_on() {
    let fake = Fake { panics_on: Some(77), ..Default::default() };
    let engine = Engine::start(fake, flamingo_engine::EngineConfig { max_running: 1, ..cfg() });
    // One running at a time: the second waits while the first's step panics.
    let mut poisoned = engine.submit(request(vec![1, 2, 77, 3], vec![], 4)).unwrap();
    let mut waiting = engine.submit(request(prompt(6, 2), vec![], 4)).unwrap();
    match outcome(&mut poisoned) {
        Err(e @ EngineError::Internal(_)) => assert!(e.to_string().contains("panicked"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(outcome(&mut waiting), Ok(4), "the request waiting behind it is served");
    for seed in 3..6 {
        let mut rx = engine.submit(request(prompt(5, seed), vec![], 3)).unwrap();
        assert_eq!(outcome(&mut rx), Ok(3), "a later request is served");
    }
    // A second panic is contained as the first.
    let mut again = engine.submit(request(vec![77], vec![], 2)).unwrap();
    assert!(matches!(outcome(&mut again), Err(EngineError::Internal(_))));
    let mut rx = engine.submit(request(prompt(5, 9), vec![], 3)).unwrap();
    assert_eq!(outcome(&mut rx), Ok(3));
    // The engine thread stores its counts just after it sends a step's events: wait (bounded).
    let running = || engine.stats().running.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (engine.waiting() != 0 || running() != 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(engine.waiting(), 0, "no request is counted as waiting after the panics");
    assert_eq!(running(), 0);
}

/// The fake's logits after a sequence has seen `seen` with `media` attached (its forward, again).
fn fake_row(seen: &[u32], media: &[u32]) -> Vec<f32> {
    let mut h: u64 = 1469598103934665603;
    for &t in seen.iter().chain(media) {
        h = (h ^ t as u64).wrapping_mul(1099511628211);
    }
    let mut row = vec![0f32; VOCAB];
    row[(h % 90) as usize] = 5.0;
    row
}

fn score_request(prompt: Vec<u32>, media: Vec<PreparedMedia>, candidates: Vec<Vec<u32>>) -> ValidRequest {
    ValidRequest::score(prompt, media, candidates, 2, &SPEC).unwrap()
}

/// Runs until idle; returns each stream's scores.
fn scores(s: &mut Scheduler<Fake>, rx: &mut [UnboundedReceiver<Event>]) -> Vec<Vec<Vec<flamingo_engine::TokenEvent>>> {
    drain(s, rx)
        .into_iter()
        .map(|(toks, fin)| {
            assert!(toks.is_empty(), "a scoring request generates nothing");
            match fin {
                Some(Event::Scored { scores, .. }) => scores,
                other => panic!("expected scores, got {other:?}"),
            }
        })
        .collect()
}

#[test]
fn scores_are_the_teacher_forced_log_probabilities_and_do_not_depend_on_the_batch() {
    let fake = Fake::default();
    let mut s = Scheduler::new(fake.clone(), cfg());
    let p = [vec![MEDIA], prompt(12, 3)].concat();
    let cands = vec![vec![5], vec![7, 8, 9], vec![40, 41]];
    let mut rx = vec![submit(&mut s, score_request(p.clone(), vec![image(1)], cands.clone()))];
    let together = scores(&mut s, &mut rx).remove(0);
    assert_eq!(together.len(), 3);
    for (c, got) in cands.iter().zip(&together) {
        assert_eq!(got.iter().map(|t| t.id).collect::<Vec<_>>(), *c);
        for (j, t) in got.iter().enumerate() {
            let seen = [p.as_slice(), &c[..j]].concat();
            let media = image(1).key[0] as u32;
            let (want, top) = flamingo_model::sampling::token_logprobs(&fake_row(&seen, &[media]), c[j], 2);
            assert_eq!((t.logprob, &t.top_logprobs), (want, &top), "candidate {c:?} token {j}");
        }
        // Each candidate alone gives the same scores.
        let mut rx = vec![submit(&mut s, score_request(p.clone(), vec![image(1)], vec![c.clone()]))];
        assert_eq!(scores(&mut s, &mut rx).remove(0), vec![got.clone()]);
    }
}

#[test]
fn many_candidates_cost_one_prompt_prefill() {
    let fake = Fake::default();
    let mut s = Scheduler::new(fake.clone(), flamingo_engine::EngineConfig { prefix_cache_bytes: 0, ..cfg() });
    let p = prompt(30, 4);
    let (tx, mut rx) = unbounded_channel();
    s.submit(score_request(p.clone(), vec![], (0..6).map(|i| vec![i, i + 1]).collect()), tx).unwrap();
    let mut prefill = 0;
    while s.has_work() {
        prefill += s.step().prefill_tokens;
    }
    assert_eq!(prefill, 30, "the prompt once, not once per candidate");
    assert!(matches!(drain(&mut s, std::slice::from_mut(&mut rx)).remove(0).1, Some(Event::Scored { .. })));
    // The candidates' second tokens: one batch of six one-token inputs.
    assert!(fake.batches.lock().unwrap().iter().any(|b| b == &vec![1; 6]), "{:?}", fake.batches.lock().unwrap());
}

#[test]
fn scoring_requests_are_checked() {
    let err = |r: Result<ValidRequest, RequestError>| r.map(|_| ()).unwrap_err();
    assert!(matches!(err(ValidRequest::score(prompt(3, 1), vec![], vec![], 0, &SPEC)), RequestError::Sampling(_)));
    assert!(matches!(err(ValidRequest::score(prompt(3, 1), vec![], vec![vec![]], 0, &SPEC)), RequestError::Sampling(_)));
    assert!(matches!(err(ValidRequest::score(prompt(3, 1), vec![], vec![vec![500]], 0, &SPEC)), RequestError::UnknownToken(500)));
    // An echoed prompt may carry the images in the continuation.
    assert!(ValidRequest::score(vec![1], vec![image(1)], vec![vec![MEDIA, 2]], 0, &SPEC).is_ok());
    assert!(matches!(err(ValidRequest::score(vec![1], vec![image(1)], vec![vec![2]], 0, &SPEC)), RequestError::MediaCount { .. }));
}

fn pin(s: &mut Scheduler<Fake>, set: &str, p: Vec<u32>, media: Vec<PreparedMedia>) -> Option<Event> {
    let mut rx = vec![submit(s, ValidRequest::pin(set.into(), p, media, &SPEC).unwrap())];
    drain(s, &mut rx).remove(0).1
}

#[test]
fn a_pinned_prefix_survives_cache_pressure_until_unpinned() {
    let fake = Fake { bytes_per_token: 1, ..Default::default() };
    // A prefix cache that holds ~2 blocks of 8 tokens (32 bytes each), vision cache off.
    let c = flamingo_engine::EngineConfig { prefix_cache_bytes: 70, vision_cache_bytes: 0, ..cfg() };
    let mut s = Scheduler::new(fake.clone(), c);
    // Four whole blocks (the fake cannot cut a block, so a partial tail would not be reused).
    let demo = [vec![MEDIA], prompt(31, 5)].concat();
    let Some(Event::Pinned { bytes, usage }) = pin(&mut s, "set-a", demo.clone(), vec![image(3)]) else { panic!("not pinned") };
    assert_eq!(bytes, 32 * 4 + 100, "four blocks of the fake's 4 bytes per token, and the image");
    assert_eq!((usage.prompt_tokens, s.pinned_bytes(), s.pinned_sets()), (32, bytes, vec!["set-a".to_string()]));
    let encodes = fake.encodes.load(Ordering::SeqCst);
    // Flood the LRU caches.
    let mut rx: Vec<_> = (0..6).map(|i| submit(&mut s, request(prompt(40, 10 + i), vec![], 2))).collect();
    drain(&mut s, &mut rx);
    // The set's prompt plus a query: the pinned blocks and image are used (the last partial block too).
    let query = [demo.clone(), prompt(5, 9)].concat();
    let (tx, mut rx) = unbounded_channel();
    s.submit(request(query.clone(), vec![image(3)], 3), tx).unwrap();
    let (mut with_pin, mut cached) = (Vec::new(), None);
    while s.has_work() {
        s.step();
    }
    while let Ok(e) = rx.try_recv() {
        match e {
            Event::Token(t) => with_pin.push(t.id),
            Event::Finished { usage, .. } => cached = Some(usage.cached_tokens),
            _ => {}
        }
    }
    assert_eq!(cached, Some(32), "the whole set is reused");
    assert_eq!(fake.encodes.load(Ordering::SeqCst), encodes, "the pinned image is not encoded again");
    // Same tokens as without any cache.
    let mut fresh = Scheduler::new(fake.clone(), flamingo_engine::EngineConfig { prefix_cache_bytes: 0, vision_cache_bytes: 0, ..cfg() });
    let mut rx = vec![submit(&mut fresh, request(query.clone(), vec![image(3)], 3))];
    assert_eq!(drain(&mut fresh, &mut rx).remove(0).0, with_pin);
    // Pinning again is a no-op; unpinning frees the bytes (the blocks become ordinary entries).
    assert!(matches!(pin(&mut s, "set-a", demo.clone(), vec![image(3)]), Some(Event::Pinned { bytes: 0, .. })));
    assert!(s.unpin("set-a"));
    assert!(!s.unpin("set-a"));
    assert_eq!((s.pinned_bytes(), s.pinned_sets().len()), (0, 0));
}

#[test]
fn two_sets_share_blocks_and_the_pinned_budget_is_a_request_error() {
    let fake = Fake { bytes_per_token: 1, ..Default::default() };
    let mut s = Scheduler::new(fake, flamingo_engine::EngineConfig { pinned_bytes: 200, ..cfg() });
    let demo = prompt(16, 6);
    let Some(Event::Pinned { bytes, .. }) = pin(&mut s, "a", demo.clone(), vec![]) else { panic!() };
    assert_eq!(bytes, 64);
    // A second set that starts with the same 16 tokens adds only its own blocks.
    let longer = [demo.clone(), prompt(8, 7)].concat();
    let Some(Event::Pinned { bytes, .. }) = pin(&mut s, "b", longer.clone(), vec![]) else { panic!() };
    assert_eq!((bytes, s.pinned_bytes()), (32, 96));
    // Releasing one keeps what the other still pins.
    assert!(s.unpin("a"));
    assert_eq!(s.pinned_bytes(), 96);
    // Over the budget: refused, nothing pinned, nothing leaked.
    match pin(&mut s, "big", prompt(40, 8), vec![]) {
        Some(Event::Error(EngineError::Request(RequestError::PinnedBudget { need: 160, free: 104, budget: 200 }))) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!((s.pinned_bytes(), s.pinned_sets()), (96, vec!["b".to_string()]));
    assert!(s.unpin("b"));
    assert_eq!(s.pinned_bytes(), 0);
}
