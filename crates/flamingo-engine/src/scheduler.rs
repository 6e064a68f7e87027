//! The scheduling state: a plain struct the engine thread drives one [`Scheduler::step`] at a
//! time, and tests drive directly against a fake model.
//!
//! A step runs these phases, each a method below:
//! 1. **cancel**: sequences whose event stream was dropped are freed;
//! 2. **admit**: waiting requests, first come first served, while the running-sequence limit
//!    and the KV byte budget allow (media from the vision cache or encoded, prompt KV restored
//!    from the prefix cache);
//! 3. **plan**: one decode token of every generating sequence (one per beam), then prefill
//!    chunks of the others in arrival order under the batched-token budget;
//! 4. **forward**: one ragged forward of the whole batch;
//! 5. **donate**: prompts completed in this step give their blocks to the prefix cache;
//! 6. **pick**: sequences with a new token choose it (in parallel: sampling is per-sequence work
//!    over the whole vocabulary), beam searches advance;
//! 7. **finish**: finished and cancelled sequences leave, their reservations are released.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use crate::backend::{Backend, Row};
use crate::cache::{LruBytes, Pinned};
use crate::error::{EngineError, RequestError};
use crate::metrics as m;
use crate::prefix::{BlockHash, PinError, PrefixCache};
use crate::request::{Event, MediaKey, ModelSpec, Task, TokenEvent, Usage, ValidRequest};
use crate::sequence::{Outcome, Sequence, Waiting, Work};

/// Limits of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences prefilled or decoded at once.
    pub max_running: usize,
    /// Tokens (decode + prefill) in one forward step.
    pub max_batched_tokens: usize,
    /// Bytes of KV state that running sequences may reserve (prompt + max new tokens each).
    pub kv_budget_bytes: usize,
    /// Requests that may wait for admission; beyond it `submit` fails with `Overloaded`.
    pub max_waiting: usize,
    /// Tokens per prefix-cache block.
    pub block_size: usize,
    pub vision_cache_bytes: usize,
    /// 0 turns the prefix cache off (nothing is copied into it).
    pub prefix_cache_bytes: usize,
    /// Bytes that pinned demonstration sets may hold (their prefix blocks and their media's
    /// cross-attention K/V), apart from both caches.
    pub pinned_bytes: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running: 32,
            max_batched_tokens: 512,
            kv_budget_bytes: 4 << 30,
            max_waiting: 256,
            block_size: 16,
            vision_cache_bytes: 512 << 20,
            prefix_cache_bytes: 1 << 30,
            pinned_bytes: 256 << 20,
        }
    }
}

/// What one step did (for tests, metrics and the engine's bookkeeping).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Requests moved from waiting to running (or failed at admission).
    pub left_waiting: usize,
    pub sequences: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub finished: usize,
    pub cancelled: usize,
    /// Ids of the sequences in this step's batch, in batch order, with their token counts.
    pub batch: Vec<(u64, usize)>,
}

/// Generated positions a restored sequence's caches get room for up front (beyond that they
/// grow by doubling).
const RESERVE_GENERATED: usize = 64;

/// What one pinned set holds a reference to.
#[derive(Debug, Default)]
struct SetPins {
    set: String,
    media: Vec<(MediaKey, usize)>,
    blocks: Vec<BlockHash>,
    bytes: usize,
}

pub struct Scheduler<B: Backend> {
    backend: B,
    spec: ModelSpec,
    cfg: SchedulerConfig,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence<B::State>>,
    vision: LruBytes<(MediaKey, usize), B::Media>,
    /// Media of pinned sets (looked up before the vision cache).
    pinned_media: Pinned<(MediaKey, usize), B::Media>,
    prefix: PrefixCache<B::Block>,
    /// Pinned sets by id.
    sets: HashMap<String, SetPins>,
    /// Pin requests admitted and not yet done, by sequence id: the media they pinned so far.
    pending_pins: HashMap<u64, SetPins>,
    reserved: usize,
    next_id: u64,
    /// Requests that have left the waiting queue (admitted, failed at admission or cancelled),
    /// counted as they leave, so the count survives a step that panics half-way.
    left_waiting: usize,
}

impl<B: Backend> Scheduler<B> {
    pub fn new(backend: B, cfg: SchedulerConfig) -> Self {
        let spec = backend.spec();
        let vision = LruBytes::new(cfg.vision_cache_bytes);
        let prefix = PrefixCache::new(cfg.block_size, cfg.prefix_cache_bytes, spec.media_token_id);
        Self {
            backend,
            spec,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            vision,
            pinned_media: Pinned::default(),
            prefix,
            sets: HashMap::new(),
            pending_pins: HashMap::new(),
            reserved: 0,
            next_id: 0,
            left_waiting: 0,
        }
    }

    /// Bytes held by pinned sets (prefix blocks and media; shared ones counted once).
    pub fn pinned_bytes(&self) -> usize {
        self.prefix.pinned().bytes() + self.pinned_media.bytes()
    }

    /// Ids of the pinned sets.
    pub fn pinned_sets(&self) -> Vec<String> {
        let mut v: Vec<String> = self.sets.keys().cloned().collect();
        v.sort();
        v
    }

    /// Releases a pinned set: its blocks and media are no longer pinned by it (those no other
    /// set pins move to the LRU caches). Returns whether it was pinned.
    pub fn unpin(&mut self, set: &str) -> bool {
        let Some(p) = self.sets.remove(set) else { return false };
        self.release(p);
        self.publish_pins();
        true
    }

    fn release(&mut self, p: SetPins) {
        self.prefix.unpin(&p.blocks);
        release_media(&mut self.pinned_media, &mut self.vision, &p.media);
    }

    fn publish_pins(&self) {
        metrics::gauge!(m::PINNED_BYTES).set(self.pinned_bytes() as f64);
        metrics::gauge!(m::PINNED_SETS).set(self.sets.len() as f64);
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// What requests are checked against (from the backend).
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Bytes reserved by running sequences.
    pub fn reserved_bytes(&self) -> usize {
        self.reserved
    }

    /// Bytes actually held by running sequences' states.
    pub fn state_bytes(&self) -> usize {
        self.running.iter().map(|s| self.backend.state_bytes(&s.state)).sum()
    }

    pub fn vision_cache(&self) -> &LruBytes<(MediaKey, usize), B::Media> {
        &self.vision
    }

    pub fn prefix_cache(&self) -> &LruBytes<BlockHash, B::Block> {
        self.prefix.lru()
    }

    /// Requests that have left the waiting queue so far (the engine's waiting count is the
    /// requests submitted minus these).
    pub fn left_waiting_total(&self) -> usize {
        self.left_waiting
    }

    /// Ids of the running sequences in admission order (for tests).
    pub fn running_ids(&self) -> Vec<u64> {
        self.running.iter().map(|s| s.id).collect()
    }

    /// The KV bytes `req` reserves while it runs.
    fn reservation(&self, req: &ValidRequest) -> usize {
        req.kv_tokens().saturating_mul(self.spec.kv_bytes_per_token)
    }

    /// Queues a request. Fails at once with `Overloaded` when the waiting queue is full, and
    /// with [`RequestError::OverBudget`](crate::RequestError::OverBudget) when the request could never be admitted.
    pub fn submit(&mut self, req: ValidRequest, tx: UnboundedSender<Event>) -> Result<u64, EngineError> {
        req.check_budget(&self.spec, self.cfg.kv_budget_bytes)?;
        if self.waiting.len() >= self.cfg.max_waiting {
            metrics::counter!(m::REJECTIONS).increment(1);
            return Err(EngineError::Overloaded(self.waiting.len()));
        }
        self.next_id += 1;
        self.waiting.push_back(Waiting { id: self.next_id, req, tx, submitted: Instant::now() });
        Ok(self.next_id)
    }

    /// One scheduling step (the phases in the module docs).
    pub fn step(&mut self) -> StepReport {
        let mut report = StepReport::default();
        self.cancel(&mut report);
        self.admit(&mut report);
        let work = self.plan();
        if work.iter().all(|&w| w == Work::Idle) {
            self.publish_gauges();
            return report;
        }
        let rows = match self.forward(&work, &mut report) {
            Ok(rows) => rows,
            Err(e) => {
                self.fail_batch(&work, e, &mut report);
                self.publish_gauges();
                return report;
            }
        };
        self.donate(&work);
        let outcomes = self.pick(&work, rows);
        self.finish(&outcomes, &mut report);
        self.drop_stale_pins();
        self.publish_gauges();
        report
    }

    /// After a panic inside a step (a bug, in the model or here), the running sequences'
    /// states may be half-updated: each of them fails with `error` and its reservation is
    /// released. Waiting requests stay queued; the caches and pinned sets are kept (an entry
    /// is inserted only once it is whole, so a step that stops half-way leaves none half-made).
    /// Returns how many sequences failed.
    pub fn fail_running(&mut self, error: EngineError) -> usize {
        let failed = std::mem::take(&mut self.running);
        for s in &failed {
            s.fail(error.clone());
        }
        // Only running sequences hold reservations.
        self.reserved = 0;
        self.drop_stale_pins();
        self.publish_gauges();
        failed.len()
    }

    /// Media pinned by pin requests that left without finishing (cancelled, failed) are
    /// released.
    fn drop_stale_pins(&mut self) {
        if self.pending_pins.is_empty() {
            return;
        }
        let stale: Vec<u64> = self.pending_pins.keys().copied().filter(|id| !self.running.iter().any(|s| s.id == *id)).collect();
        for id in stale {
            if let Some(p) = self.pending_pins.remove(&id) {
                self.release(p);
            }
        }
        self.publish_pins();
    }

    /// Phase 1: a dropped event stream frees its request now.
    fn cancel(&mut self, report: &mut StepReport) {
        let waiting_before = self.waiting.len();
        self.waiting.retain(|w| !w.tx.is_closed());
        let cancelled_waiting = waiting_before - self.waiting.len();
        report.left_waiting += cancelled_waiting;
        self.left_waiting += cancelled_waiting;
        let running_before = self.running.len();
        let mut freed = 0;
        self.running.retain(|s| {
            let keep = !s.tx.is_closed();
            if !keep {
                freed += s.reserved;
            }
            keep
        });
        self.reserved -= freed;
        report.cancelled = cancelled_waiting + running_before - self.running.len();
        metrics::counter!(m::CANCELLATIONS).increment(report.cancelled as u64);
    }

    /// Phase 2: admission, first come first served, while there is room. (`submit` refused
    /// every request larger than the whole budget, so the queue cannot stall on one.)
    fn admit(&mut self, report: &mut StepReport) {
        while let Some(front) = self.waiting.front() {
            let need = self.reservation(&front.req);
            if self.running.len() >= self.cfg.max_running || self.reserved + need > self.cfg.kv_budget_bytes {
                break;
            }
            let Some(w) = self.waiting.pop_front() else { break };
            report.left_waiting += 1;
            self.left_waiting += 1;
            let tx = w.tx.clone();
            if let Task::Pin(set) = &w.req.task {
                if self.sets.contains_key(set) {
                    let usage = Usage { prompt_tokens: w.req.prompt.len(), completion_tokens: 0, cached_tokens: w.req.prompt.len() };
                    let _ = tx.send(Event::Pinned { bytes: 0, usage });
                    continue;
                }
            }
            match self.start(w, need) {
                Ok(seq) => {
                    self.reserved += need;
                    self.running.push(seq);
                }
                Err(e) => {
                    let _ = tx.send(Event::Error(e));
                    metrics::counter!(m::REQUESTS_FINISHED, "reason" => "error").increment(1);
                }
            }
        }
    }

    /// A waiting request as a running sequence: its media encoded (or from the vision cache)
    /// and attached, its cached prefix restored.
    fn start(&mut self, w: Waiting, reserved: usize) -> Result<Sequence<B::State>, EngineError> {
        let media = self.encode_media(&w.req)?;
        if let Task::Pin(set) = &w.req.task {
            self.pin_media(w.id, set, &w.req, &media)?;
        }
        let mut state = self.backend.new_state();
        let refs: Vec<&B::Media> = media.iter().map(|a| a.as_ref()).collect();
        self.backend.attach(&mut state, &refs)?;
        let blocks = self.prefix.blocks_of(&w.req.prompt, w.req.media_keys());
        // Keep at least one prompt token to compute: its logits give the first new token.
        let backend = &self.backend;
        let hit = self.prefix.lookup(&blocks, w.req.prompt.len() - 1, |b, rows, media| backend.block_head(b, rows, media));
        // Room for the prompt and the start of the generation, allocated once.
        let capacity = w.req.prompt.len() + w.req.stop.max_new_tokens.min(RESERVE_GENERATED);
        self.backend.restore(&mut state, &hit.refs(), &w.req.prompt[..hit.tokens], capacity)?;
        Ok(Sequence::new(w, state, hit.tokens, blocks, reserved))
    }

    /// A pin request's media pinned at admission (one reference each, as a pending pin until
    /// its prompt is done), within the pinned budget.
    fn pin_media(&mut self, id: u64, set: &str, req: &ValidRequest, media: &[Arc<B::Media>]) -> Result<(), EngineError> {
        let keys = self.media_keys(req);
        let mut need = 0;
        let mut seen = std::collections::HashSet::new();
        for (k, m) in keys.iter().zip(media) {
            if !self.pinned_media.contains(k) && seen.insert(*k) {
                need += self.backend.media_bytes(m);
            }
        }
        let free = self.cfg.pinned_bytes.saturating_sub(self.pinned_bytes());
        if need > free {
            return Err(RequestError::PinnedBudget { need, free, budget: self.cfg.pinned_bytes }.into());
        }
        for (k, m) in keys.iter().zip(media) {
            let bytes = self.backend.media_bytes(m);
            self.pinned_media.pin(*k, m.clone(), bytes);
        }
        self.pending_pins.insert(id, SetPins { set: set.to_string(), media: keys, blocks: Vec::new(), bytes: need });
        Ok(())
    }

    /// The vision-cache keys of a request's media (with their position when encodings depend on it).
    fn media_keys(&self, req: &ValidRequest) -> Vec<(MediaKey, usize)> {
        let by_pos = self.backend.media_depends_on_position();
        req.media.iter().enumerate().map(|(i, item)| (item.key, if by_pos { i } else { 0 })).collect()
    }

    /// Each media item of `req`: pinned, else from the vision cache, else encoded (and cached).
    fn encode_media(&mut self, req: &ValidRequest) -> Result<Vec<Arc<B::Media>>, EngineError> {
        let keys = self.media_keys(req);
        let mut out = Vec::with_capacity(req.media.len());
        for (i, (item, key)) in req.media.iter().zip(keys).enumerate() {
            metrics::counter!(m::CACHE_QUERIES, "cache" => m::VISION_CACHE).increment(1);
            if let Some(e) = self.pinned_media.get(&key) {
                metrics::counter!(m::CACHE_HITS, "cache" => m::VISION_CACHE).increment(1);
                out.push(e);
                continue;
            }
            let enc = match self.vision.get(&key) {
                Some(e) => {
                    metrics::counter!(m::CACHE_HITS, "cache" => m::VISION_CACHE).increment(1);
                    e
                }
                None => {
                    let e = Arc::new(self.backend.encode(item, i)?);
                    let bytes = self.backend.media_bytes(&e);
                    let ev = self.vision.insert(key, e.clone(), bytes);
                    metrics::counter!(m::CACHE_EVICTIONS, "cache" => m::VISION_CACHE).increment(ev as u64);
                    e
                }
            };
            out.push(enc);
        }
        metrics::gauge!(m::CACHE_BYTES, "cache" => m::VISION_CACHE).set(self.vision.bytes() as f64);
        Ok(out)
    }

    /// Phase 3: every decoding sequence contributes its rows (one, or one per beam); prefill
    /// chunks fill the rest of the token budget in arrival order. One entry per running sequence.
    fn plan(&self) -> Vec<Work> {
        let decoding: usize = self.running.iter().map(|s| s.decode_rows()).sum();
        let mut budget = self.cfg.max_batched_tokens.saturating_sub(decoding);
        self.running
            .iter()
            .map(|s| match s.decode_rows() {
                0 if budget > 0 => {
                    let n = s.prompt_left().min(budget);
                    budget -= n;
                    Work::Prefill(n)
                }
                0 => Work::Idle,
                rows => Work::Decode(rows),
            })
            .collect()
    }

    /// Phase 4: one ragged forward of the planned work. Returns each sequence's rows of logits.
    fn forward(&mut self, work: &[Work], report: &mut StepReport) -> Result<Vec<Vec<Row>>, EngineError> {
        let mut states = Vec::new();
        let mut inputs = Vec::new();
        // Rows that need no more than their argmax: greedy picks, and prefill chunks that leave
        // part of the prompt for later (their logits are not used).
        let mut argmax = Vec::new();
        for (s, &w) in self.running.iter_mut().zip(work) {
            match w {
                Work::Idle => continue,
                Work::Prefill(n) => report.prefill_tokens += n,
                Work::Decode(n) => report.decode_tokens += n,
            }
            report.batch.push((s.id, w.tokens()));
            let only_argmax = s.picks_argmax() || matches!(w, Work::Prefill(n) if n < s.prompt_left() || s.is_pin());
            let before = inputs.len();
            s.inputs(w, &mut states, &mut inputs);
            argmax.resize(argmax.len() + inputs.len() - before, only_argmax);
        }
        report.sequences = states.len();
        let result = self.backend.forward_rows(&mut states, &inputs, &argmax);
        let expected = inputs.len();
        drop(states);
        drop(inputs);
        metrics::histogram!(m::BATCH_SIZE).record(report.sequences as f64);
        metrics::histogram!(m::STEP_TOKENS).record((report.prefill_tokens + report.decode_tokens) as f64);
        metrics::counter!(m::PREFILL_TOKENS).increment(report.prefill_tokens as u64);
        metrics::counter!(m::DECODE_TOKENS).increment(report.decode_tokens as u64);
        let logits = result.map_err(|e| EngineError::Internal(format!("model error: {e}")))?;
        if logits.len() != expected {
            return Err(EngineError::Internal(format!("model error: {} rows of logits for {expected} inputs", logits.len())));
        }
        let mut rows = logits.into_iter();
        Ok(work.iter().map(|w| rows.by_ref().take(w.inputs()).collect()).collect())
    }

    /// A failed forward: the batch's states may be half-updated, so its sequences fail; the
    /// others carry on.
    fn fail_batch(&mut self, work: &[Work], e: EngineError, report: &mut StepReport) {
        let mut keep = Vec::with_capacity(self.running.len());
        for (s, &w) in std::mem::take(&mut self.running).into_iter().zip(work) {
            if w == Work::Idle {
                keep.push(s);
            } else {
                s.fail(e.clone());
                self.reserved -= s.reserved;
                report.finished += 1;
            }
        }
        self.running = keep;
    }

    /// Phase 5: prefill progress; a prompt completed in this step donates its blocks (the full
    /// ones and the partial tail) to the prefix cache.
    fn donate(&mut self, work: &[Work]) {
        let mut pinned = false;
        for (s, &w) in self.running.iter_mut().zip(work) {
            let Work::Prefill(n) = w else { continue };
            s.prefilled += n;
            if s.prefilled < s.req.prompt.len() {
                continue;
            }
            let backend = &self.backend;
            let state = &s.state;
            let snapshot = |start, len, media| {
                let block = backend.snapshot(state, start, len, media).ok()?;
                let bytes = backend.block_bytes(&block);
                Some((block, bytes))
            };
            let Some(mut pins) = self.pending_pins.remove(&s.id) else {
                self.prefix.donate(&s.blocks, snapshot);
                continue;
            };
            pinned = true;
            if self.sets.contains_key(&pins.set) {
                // Another request pinned the same set meanwhile: this one holds nothing.
                s.pinned = Some(Ok(0));
                release_media(&mut self.pinned_media, &mut self.vision, &pins.media);
                continue;
            }
            let used = self.prefix.pinned().bytes() + self.pinned_media.bytes();
            let free = self.cfg.pinned_bytes.saturating_sub(used);
            match self.prefix.pin(&s.blocks, free, snapshot) {
                Ok((hashes, added)) => {
                    pins.blocks = hashes;
                    pins.bytes += added;
                    s.pinned = Some(Ok(pins.bytes));
                    self.sets.insert(pins.set.clone(), pins);
                }
                Err(e) => {
                    release_media(&mut self.pinned_media, &mut self.vision, &pins.media);
                    s.pinned = Some(Err(match e {
                        PinError::Budget(need) => {
                            RequestError::PinnedBudget { need: need + pins.bytes, free: free + pins.bytes, budget: self.cfg.pinned_bytes }
                                .into()
                        }
                        PinError::Snapshot => EngineError::Internal("the prompt's K/V could not be copied for pinning".into()),
                    }));
                }
            }
        }
        if pinned {
            self.publish_pins();
        }
    }

    /// Phase 6: sequences with new logits take their token (in parallel), beam searches
    /// advance; events are sent in sequence order. One outcome per running sequence.
    fn pick(&mut self, work: &[Work], mut rows: Vec<Vec<Row>>) -> Vec<Outcome> {
        let decoding: Vec<bool> = work.iter().map(|w| matches!(w, Work::Decode(_))).collect();
        // A prefill chunk's sequence has moved on (`donate`): it yields a token iff its prompt is
        // now complete.
        let takes: Vec<bool> = self
            .running
            .iter()
            .zip(work.iter().zip(&decoding))
            .map(|(s, (&w, &dec))| w != Work::Idle && (dec || s.prompt_left() == 0))
            .collect();
        // Sampling is per-sequence work over the whole vocabulary (~1.7 ms per token for top-p
        // over 50k logits): one after another it would leave the other cores idle every step.
        let picks: Vec<Option<TokenEvent>> = self
            .running
            .par_iter_mut()
            .zip(rows.par_iter().zip(takes.par_iter()))
            .map(|(s, (r, &take))| match r.first() {
                Some(row) if take && !s.is_beam_search() && s.generates() => Some(s.pick_row(row)),
                _ => None,
            })
            .collect();
        let now = Instant::now();
        let mut outcomes = vec![Outcome::Running; self.running.len()];
        for (i, (s, picked)) in self.running.iter_mut().zip(picks).enumerate() {
            if !takes[i] {
                continue;
            }
            if !s.generates() {
                outcomes[i] = match rows[i].first() {
                    _ if s.is_pin() => s.finish_pin(),
                    Some(Row::Logits(row)) => s.score(&self.backend, row),
                    _ => s.fail(EngineError::Internal("no logits for a scoring request".into())),
                };
                continue;
            }
            outcomes[i] = if s.is_beam_search() {
                let full: Option<Vec<Vec<f32>>> = std::mem::take(&mut rows[i])
                    .into_iter()
                    .map(|r| match r {
                        Row::Logits(l) => Some(l),
                        Row::Argmax(_) => None,
                    })
                    .collect();
                match full {
                    Some(full) => s.beam_step(&self.backend, &full, decoding[i]),
                    None => s.fail(EngineError::Internal("a beam search got an argmax instead of logits".into())),
                }
            } else {
                match picked {
                    Some(ev) => s.emit(ev, now),
                    None => s.fail(EngineError::Internal("no logits for a sequence that needed a token".into())),
                }
            };
        }
        outcomes
    }

    /// Phase 7: finished and cancelled sequences leave.
    fn finish(&mut self, outcomes: &[Outcome], report: &mut StepReport) {
        let mut i = 0;
        self.running.retain(|s| {
            let o = outcomes[i];
            i += 1;
            match o {
                Outcome::Running => return true,
                Outcome::Finished => report.finished += 1,
                Outcome::Cancelled => report.cancelled += 1,
            }
            self.reserved -= s.reserved;
            false
        });
    }

    fn publish_gauges(&self) {
        metrics::gauge!(m::WAITING).set(self.waiting.len() as f64);
        metrics::gauge!(m::RUNNING).set(self.running.len() as f64);
        metrics::gauge!(m::KV_BYTES).set(self.state_bytes() as f64);
    }
}

/// Drops one pin reference of each media key; media no longer pinned go to the vision cache.
fn release_media<M>(pinned: &mut Pinned<(MediaKey, usize), M>, vision: &mut LruBytes<(MediaKey, usize), M>, keys: &[(MediaKey, usize)]) {
    for k in keys {
        if let Some((m, bytes)) = pinned.release(k) {
            vision.insert(*k, m, bytes);
        }
    }
}
