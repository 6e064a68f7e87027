//! The scheduling state: a plain struct the engine thread drives one [`Scheduler::step`] at a
//! time, and tests drive directly against a fake model.
//!
//! Each step: drop cancelled sequences; admit waiting requests first-come-first-served while the
//! running-sequence limit and the KV byte budget allow (vision features from the cache or
//! encoded, prefix KV restored from the cache); then one ragged forward with one decode token of
//! every generating sequence plus prefill chunks of the others, first come first served, under
//! the batched-token budget; then sampling and events per sequence.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use flamingo_model::generate::{apply_repetition_penalty, log_softmax, reorder_beams, BeamSearch, FinishReason, Sampler, Strategy};
use flamingo_model::Input;
use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use crate::backend::Backend;
use crate::cache::LruBytes;
use crate::metrics as m;
use crate::request::{Event, MediaKey, TokenEvent, Usage, ValidRequest};
use crate::EngineError;

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
    pub prefix_cache_bytes: usize,
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
        }
    }
}

type BlockHash = [u8; 32];

/// The beams of one request: they share its images and its prefilled prompt (each beam starts
/// as a copy of the prompt's state) and advance together, one batched row each per step.
struct Beams<S> {
    search: BeamSearch,
    states: Vec<S>,
    next: Vec<u32>,
}

impl<S> Sequence<S> {
    /// Rows this sequence puts into the next decode step (0 while prefilling).
    fn decode_rows(&self) -> usize {
        match &self.beams {
            Some(b) => b.states.len(),
            None => usize::from(self.next.is_some()),
        }
    }
}

struct Waiting {
    id: u64,
    req: ValidRequest,
    tx: UnboundedSender<Event>,
    submitted: Instant,
}

struct Sequence<S> {
    id: u64,
    req: ValidRequest,
    tx: UnboundedSender<Event>,
    state: S,
    prefilled: usize,
    cached_tokens: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    /// The token to feed in the next decode step (sampling).
    next: Option<u32>,
    /// Beam search: the running beams' states and next tokens (empty until the prompt is done).
    beams: Option<Beams<S>>,
    reserved: usize,
    block_hashes: Vec<BlockHash>,
    submitted: Instant,
    last_token: Option<Instant>,
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

pub struct Scheduler<B: Backend> {
    backend: B,
    cfg: SchedulerConfig,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence<B::State>>,
    vision: LruBytes<(MediaKey, usize), B::Media>,
    prefix: LruBytes<BlockHash, B::Block>,
    /// Cached blocks by parent hash (zero for a prompt's first block), for partial hits: a
    /// prompt that diverges inside a block reuses the rows before the divergence.
    children: HashMap<BlockHash, Vec<Child>>,
    reserved: usize,
    next_id: u64,
}

/// Generated positions a restored sequence's caches get room for up front (beyond that they
/// grow by doubling).
const RESERVE_GENERATED: usize = 64;

/// Hash of one block (full, or a prompt's partial tail): the previous block's hash, its token
/// ids, and the keys of the images its `<image>` tokens introduce. With the masking rule this
/// determines the block's K/V exactly.
fn hash_block(prev: &BlockHash, tokens: &[u32], keys: &[MediaKey]) -> BlockHash {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(prev);
    h.update((tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        h.update(t.to_le_bytes());
    }
    for k in keys {
        h.update(k);
    }
    h.finalize().into()
}

/// The media keys introduced by each `block`-sized chunk of the prompt (the last one partial).
fn block_media<'a>(prompt: &[u32], media: &'a [MediaKey], media_token: Option<u32>, block: usize) -> Vec<&'a [MediaKey]> {
    let mut out = Vec::new();
    let mut k = 0;
    for chunk in prompt.chunks(block) {
        let n = media_token.map_or(0, |mt| chunk.iter().filter(|&&t| t == mt).count());
        let end = (k + n).min(media.len());
        out.push(&media[k.min(end)..end]);
        k += n;
    }
    out
}

/// Hash chain over the full prompt blocks.
fn block_hashes(prompt: &[u32], media: &[MediaKey], media_token: Option<u32>, block: usize) -> Vec<BlockHash> {
    let keys = block_media(prompt, media, media_token, block);
    let mut out = Vec::with_capacity(prompt.len() / block);
    let mut prev = [0u8; 32];
    for (chunk, keys) in prompt.chunks_exact(block).zip(keys) {
        prev = hash_block(&prev, chunk, keys);
        out.push(prev);
    }
    out
}

/// A cached block as seen from its parent: enough to match a prompt against a prefix of it.
struct Child {
    hash: BlockHash,
    tokens: Vec<u32>,
    keys: Vec<MediaKey>,
}

/// Children kept per parent block (the oldest are forgotten first).
const MAX_CHILDREN: usize = 64;

impl<B: Backend> Scheduler<B> {
    pub fn new(backend: B, cfg: SchedulerConfig) -> Self {
        let vision = LruBytes::new(cfg.vision_cache_bytes);
        let prefix = LruBytes::new(cfg.prefix_cache_bytes);
        Self {
            backend,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            vision,
            prefix,
            children: HashMap::new(),
            reserved: 0,
            next_id: 0,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
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
        &self.prefix
    }

    /// Queues a request. Fails with `Overloaded` when the waiting queue is full.
    pub fn submit(&mut self, req: ValidRequest, tx: UnboundedSender<Event>) -> Result<u64, EngineError> {
        if self.waiting.len() >= self.cfg.max_waiting {
            metrics::counter!(m::REJECTIONS).increment(1);
            return Err(EngineError::Overloaded(self.waiting.len()));
        }
        self.next_id += 1;
        self.waiting.push_back(Waiting { id: self.next_id, req, tx, submitted: Instant::now() });
        Ok(self.next_id)
    }

    fn estimate(&self, req: &ValidRequest) -> usize {
        let beams = match req.sampling.strategy {
            Strategy::Beam { num_beams, .. } => num_beams.max(1),
            _ => 1,
        };
        (req.prompt.len() + beams * req.stop.max_new_tokens) * self.backend.kv_bytes_per_token()
    }

    /// The cached child of `parent` sharing the longest prefix with `rest` (tokens and the
    /// images they introduce): `(hash, rows, media tokens in those rows)`. Forgets children
    /// that were evicted.
    fn best_child(
        &mut self,
        parent: &BlockHash,
        rest: &[u32],
        keys: &[MediaKey],
        media_token: Option<u32>,
    ) -> Option<(BlockHash, usize, usize)> {
        let prefix = &self.prefix;
        let kids = self.children.get_mut(parent)?;
        kids.retain(|c| prefix.contains(&c.hash));
        let mut best: Option<(BlockHash, usize, usize)> = None;
        for c in kids.iter() {
            let (mut rows, mut media) = (0, 0);
            for (a, b) in c.tokens.iter().zip(rest) {
                if a != b {
                    break;
                }
                if Some(*a) == media_token {
                    if c.keys.get(media) != keys.get(media) || keys.get(media).is_none() {
                        break;
                    }
                    media += 1;
                }
                rows += 1;
            }
            if rows > best.map_or(0, |b| b.1) {
                best = Some((c.hash, rows, media));
            }
        }
        if kids.is_empty() {
            self.children.remove(parent);
        }
        best
    }

    /// Turns a waiting request into a running sequence: media encoded (or from the vision
    /// cache) and attached, cached prefix blocks restored.
    fn admit(&mut self, w: Waiting, reserved: usize, media_token: Option<u32>) -> Result<Sequence<B::State>, String> {
        let by_pos = self.backend.media_depends_on_position();
        let mut media = Vec::with_capacity(w.req.media.len());
        for (i, item) in w.req.media.iter().enumerate() {
            let key = (item.key, if by_pos { i } else { 0 });
            metrics::counter!(m::CACHE_QUERIES, "cache" => m::VISION_CACHE).increment(1);
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
            media.push(enc);
        }
        metrics::gauge!(m::CACHE_BYTES, "cache" => m::VISION_CACHE).set(self.vision.bytes() as f64);
        let mut state = self.backend.new_state();
        let refs: Vec<&B::Media> = media.iter().map(|a| a.as_ref()).collect();
        self.backend.attach(&mut state, &refs)?;

        let keys: Vec<MediaKey> = w.req.media.iter().map(|m| m.key).collect();
        let hashes = block_hashes(&w.req.prompt, &keys, media_token, self.cfg.block_size);
        // Keep at least one prompt token to compute: its logits give the first new token.
        let usable = (w.req.prompt.len() - 1) / self.cfg.block_size;
        let mut blocks = Vec::new();
        for h in hashes.iter().take(usable) {
            metrics::counter!(m::CACHE_QUERIES, "cache" => m::PREFIX_CACHE).increment(1);
            match self.prefix.get(h) {
                Some(b) => {
                    metrics::counter!(m::CACHE_HITS, "cache" => m::PREFIX_CACHE).increment(1);
                    blocks.push(b)
                }
                None => break,
            }
        }
        let mut cached = blocks.len() * self.cfg.block_size;
        // Partial hit: the longest prefix of a cached child of the last matched block (a
        // prompt that diverges mid-block, or a cached prompt's tail).
        let mut head = None;
        {
            let parent = if blocks.is_empty() { [0u8; 32] } else { hashes[blocks.len() - 1] };
            let rest = &w.req.prompt[cached..w.req.prompt.len() - 1];
            let before = media_token.map_or(0, |mt| w.req.prompt[..cached].iter().filter(|&&t| t == mt).count());
            let rest_keys = &keys[before.min(keys.len())..];
            if let Some((hash, rows, media)) = self.best_child(&parent, rest, rest_keys, media_token) {
                metrics::counter!(m::CACHE_QUERIES, "cache" => m::PREFIX_CACHE).increment(1);
                if let Some(b) = self.prefix.get(&hash).and_then(|b| self.backend.block_head(&b, rows, media)) {
                    metrics::counter!(m::CACHE_HITS, "cache" => m::PREFIX_CACHE).increment(1);
                    head = Some(b);
                    cached += rows;
                }
            }
        }
        let mut brefs: Vec<&B::Block> = blocks.iter().map(|b| b.as_ref()).collect();
        if let Some(h) = &head {
            brefs.push(h);
        }
        // Room for the prompt and the start of the generation, allocated once.
        let capacity = w.req.prompt.len() + w.req.stop.max_new_tokens.min(RESERVE_GENERATED);
        self.backend.restore(&mut state, &brefs, capacity)?;
        let sampler = Sampler::new(&w.req.sampling.strategy, w.req.sampling.repetition_penalty);
        let beams = match &w.req.sampling.strategy {
            Strategy::Beam { num_beams, length_penalty, early_stopping } => Some(Beams {
                search: BeamSearch::new(
                    *num_beams,
                    *length_penalty,
                    *early_stopping,
                    w.req.stop.max_new_tokens,
                    w.req.stop.stop_token_ids.clone(),
                ),
                states: Vec::new(),
                next: Vec::new(),
            }),
            _ => None,
        };
        Ok(Sequence {
            id: w.id,
            req: w.req,
            tx: w.tx,
            state,
            prefilled: cached,
            cached_tokens: cached,
            generated: Vec::new(),
            sampler,
            next: None,
            beams,
            reserved,
            block_hashes: hashes,
            submitted: w.submitted,
            last_token: None,
        })
    }

    /// One scheduling step. `media_token` is the model's `<image>` id (for prefix hashing).
    pub fn step(&mut self, media_token: Option<u32>) -> StepReport {
        let mut report = StepReport::default();

        // 1. Cancellation: a dropped event stream frees the sequence now.
        let waiting_before = self.waiting.len();
        self.waiting.retain(|w| !w.tx.is_closed());
        let cancelled_waiting = waiting_before - self.waiting.len();
        report.left_waiting += cancelled_waiting;
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

        // 2. Admission, first come first served.
        while let Some(front) = self.waiting.front() {
            if self.running.len() >= self.cfg.max_running {
                break;
            }
            let need = self.estimate(&front.req);
            if need > self.cfg.kv_budget_bytes {
                let w = self.waiting.pop_front().expect("front exists");
                let _ = w.tx.send(Event::Error(format!(
                    "the request needs {need} bytes of KV cache, more than the engine's budget of {}",
                    self.cfg.kv_budget_bytes
                )));
                report.left_waiting += 1;
                continue;
            }
            if self.reserved + need > self.cfg.kv_budget_bytes {
                break;
            }
            let w = self.waiting.pop_front().expect("front exists");
            report.left_waiting += 1;
            let tx = w.tx.clone();
            match self.admit(w, need, media_token) {
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

        // 3. Plan: every decoding sequence contributes one token (a beam search one per beam);
        // prefill chunks fill the rest of the token budget in arrival order.
        let decoding: usize = self.running.iter().map(|s| s.decode_rows()).sum();
        let mut budget = self.cfg.max_batched_tokens.saturating_sub(decoding);
        let mut planned = vec![0usize; self.running.len()]; // prompt tokens, or decode rows
        for (i, s) in self.running.iter().enumerate() {
            let rows = s.decode_rows();
            if rows > 0 {
                planned[i] = rows;
            } else if budget > 0 {
                let n = (s.req.prompt.len() - s.prefilled).min(budget);
                budget -= n;
                planned[i] = n;
            }
        }
        if planned.iter().all(|&n| n == 0) {
            self.publish_gauges();
            return report;
        }

        // 4. One ragged forward.
        let mut states = Vec::new();
        let mut inputs = Vec::new();
        for (s, &n) in self.running.iter_mut().zip(&planned) {
            if n == 0 {
                continue;
            }
            let decoding = s.decode_rows() > 0;
            let Sequence { state, req, next, prefilled, id, beams, .. } = s;
            match (beams, *next) {
                (Some(b), _) if decoding => {
                    for (st, &t) in b.states.iter_mut().zip(&b.next) {
                        inputs.push(Input::Generated(t));
                        states.push(st);
                    }
                    report.decode_tokens += n;
                }
                (_, Some(t)) => {
                    inputs.push(Input::Generated(t));
                    states.push(state);
                    report.decode_tokens += 1;
                }
                _ => {
                    inputs.push(Input::Prompt(&req.prompt[*prefilled..*prefilled + n]));
                    states.push(state);
                    report.prefill_tokens += n;
                }
            }
            report.batch.push((*id, n));
        }
        report.sequences = states.len();
        let result = self.backend.forward(&mut states, &inputs);
        drop(states);
        drop(inputs);
        metrics::histogram!(m::BATCH_SIZE).record(report.sequences as f64);
        metrics::histogram!(m::STEP_TOKENS).record((report.prefill_tokens + report.decode_tokens) as f64);
        metrics::counter!(m::PREFILL_TOKENS).increment(report.prefill_tokens as u64);
        metrics::counter!(m::DECODE_TOKENS).increment(report.decode_tokens as u64);

        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The batch's states may be half-updated: fail those sequences, keep the rest.
                let mut keep = Vec::new();
                for (s, &n) in std::mem::take(&mut self.running).into_iter().zip(&planned) {
                    if n > 0 {
                        let _ = s.tx.send(Event::Error(format!("model error: {e}")));
                        self.reserved -= s.reserved;
                        report.finished += 1;
                        metrics::counter!(m::REQUESTS_FINISHED, "reason" => "error").increment(1);
                    } else {
                        keep.push(s);
                    }
                }
                self.running = keep;
                self.publish_gauges();
                return report;
            }
        };

        // 5. Sample and report per sequence.
        let now = Instant::now();
        // Each sequence's rows of logits: one per beam while decoding, one after a prompt chunk.
        let mut rows = logits.into_iter();
        let groups: Vec<Vec<Vec<f32>>> = self
            .running
            .iter()
            .zip(&planned)
            .map(|(s, &n)| {
                let take = match n {
                    0 => 0,
                    n if s.decode_rows() > 0 => n,
                    _ => 1,
                };
                rows.by_ref().take(take).collect()
            })
            .collect();
        // The sequences that get a token now choose it in parallel: sampling is per-sequence
        // work over the whole vocabulary (~1.7 ms per token for top-p over 50k logits), which
        // run one after another would leave the other cores idle at every step.
        let picks: Vec<Option<TokenEvent>> = self
            .running
            .par_iter_mut()
            .zip(groups.par_iter().zip(planned.par_iter()))
            .map(|(s, (group, &n))| {
                let first_token = s.decode_rows() > 0 || s.prefilled + n >= s.req.prompt.len();
                match group.first() {
                    Some(row) if n > 0 && s.beams.is_none() && first_token => Some(pick(s, row)),
                    _ => None,
                }
            })
            .collect();
        // Per running sequence: None = continues, Some(true) = finished, Some(false) = cancelled.
        let mut done: Vec<Option<bool>> = vec![None; self.running.len()];
        let block = self.cfg.block_size;
        for (i, (s, (group, picked))) in self.running.iter_mut().zip(groups.into_iter().zip(picks)).enumerate() {
            let n = planned[i];
            if n == 0 {
                continue;
            }
            if group.is_empty() {
                break;
            }
            let decoding = s.decode_rows() > 0;
            if !decoding {
                s.prefilled += n;
                if s.prefilled < s.req.prompt.len() {
                    continue;
                }
                // Prompt complete: donate its blocks (the full ones and the partial tail) to
                // the prefix cache.
                let keys: Vec<MediaKey> = s.req.media.iter().map(|m| m.key).collect();
                let per_block = block_media(&s.req.prompt, &keys, media_token, block);
                let mut parent = [0u8; 32];
                for (b, chunk) in s.req.prompt.chunks(block).enumerate() {
                    let h = match s.block_hashes.get(b) {
                        Some(h) => *h,
                        None => hash_block(&parent, chunk, per_block[b]),
                    };
                    let media = media_token.map_or(0, |mt| chunk.iter().filter(|&&t| t == mt).count());
                    if !self.prefix.contains(&h) {
                        if let Ok(blk) = self.backend.snapshot(&s.state, b * block, chunk.len(), media) {
                            let bytes = self.backend.block_bytes(&blk);
                            let ev = self.prefix.insert(h, Arc::new(blk), bytes);
                            metrics::counter!(m::CACHE_EVICTIONS, "cache" => m::PREFIX_CACHE).increment(ev as u64);
                            let kids = self.children.entry(parent).or_default();
                            kids.retain(|c| c.hash != h);
                            if kids.len() >= MAX_CHILDREN {
                                kids.remove(0);
                            }
                            kids.push(Child { hash: h, tokens: chunk.to_vec(), keys: per_block[b].to_vec() });
                        }
                    } else {
                        self.prefix.get(&h);
                    }
                    parent = h;
                }
                metrics::gauge!(m::CACHE_BYTES, "cache" => m::PREFIX_CACHE).set(self.prefix.bytes() as f64);
            }
            if s.beams.is_some() {
                done[i] = beam_step(&self.backend, s, group, decoding);
                continue;
            }
            // Every sequence that gets here had its token picked above; should that ever differ,
            // pick it now rather than leave the sequence without a next token.
            let ev = match picked {
                Some(ev) => ev,
                None => pick(s, &group[0]),
            };
            let tok = ev.id;
            match s.last_token {
                None => {
                    metrics::histogram!(m::TIME_TO_FIRST_TOKEN).record((now - s.submitted).as_secs_f64());
                    let _ = s.tx.send(Event::Prefilled { cached_tokens: s.cached_tokens });
                }
                Some(t) => metrics::histogram!(m::INTER_TOKEN_LATENCY).record((now - t).as_secs_f64()),
            }
            s.last_token = Some(now);
            s.generated.push(tok);
            let delivered = s.tx.send(Event::Token(ev)).is_ok();
            let finish = if s.req.stop.stop_token_ids.contains(&tok) {
                Some(FinishReason::Stop)
            } else if s.generated.len() >= s.req.stop.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = finish {
                let usage =
                    Usage { prompt_tokens: s.req.prompt.len(), completion_tokens: s.generated.len(), cached_tokens: s.cached_tokens };
                let _ = s.tx.send(Event::Finished { reason, usage });
                let label = if reason == FinishReason::Stop { "stop" } else { "length" };
                metrics::counter!(m::REQUESTS_FINISHED, "reason" => label).increment(1);
                done[i] = Some(true);
            } else if !delivered {
                metrics::counter!(m::CANCELLATIONS).increment(1);
                done[i] = Some(false);
            } else {
                s.next = Some(tok);
            }
        }
        let mut i = 0;
        self.running.retain(|s| {
            let d = done[i];
            i += 1;
            match d {
                Some(finished) => {
                    self.reserved -= s.reserved;
                    if finished {
                        report.finished += 1;
                    } else {
                        report.cancelled += 1;
                    }
                    false
                }
                None => true,
            }
        });
        self.publish_gauges();
        report
    }

    fn publish_gauges(&self) {
        metrics::gauge!(m::WAITING).set(self.waiting.len() as f64);
        metrics::gauge!(m::RUNNING).set(self.running.len() as f64);
        metrics::gauge!(m::KV_BYTES).set(self.state_bytes() as f64);
    }

    /// Ids of the running sequences in admission order (for tests).
    pub fn running_ids(&self) -> Vec<u64> {
        self.running.iter().map(|s| s.id).collect()
    }
}

/// Chooses a sequence's next token from its row of logits (sampling or greedy, with the
/// repetition penalty over prompt and generated ids), with its log-probability and the top
/// log-probabilities when the request asks for them.
fn pick<S>(s: &mut Sequence<S>, row: &[f32]) -> TokenEvent {
    // Only the repetition penalty reads the history; avoid copying it otherwise.
    let tok = if s.req.sampling.repetition_penalty == 1.0 {
        s.sampler.next(row, &[])
    } else {
        let mut history = s.req.prompt.clone();
        history.extend_from_slice(&s.generated);
        s.sampler.next(row, &history)
    };
    let mut ev = TokenEvent { id: tok, logprob: None, top_logprobs: Vec::new() };
    if let Some(k) = s.req.sampling.logprobs {
        let lp = log_softmax(row);
        ev.logprob = lp.get(tok as usize).copied();
        let mut idx: Vec<usize> = (0..lp.len()).collect();
        let k = k.min(lp.len());
        idx.select_nth_unstable_by(k.saturating_sub(1).min(lp.len() - 1), |&a, &b| lp[b].total_cmp(&lp[a]));
        let mut top: Vec<(u32, f32)> = idx[..k].iter().map(|&i| (i as u32, lp[i])).collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ev.top_logprobs = top;
    }
    ev
}

/// Advances one request's beam search with its rows of logits (one row right after the prompt,
/// then one per running beam). Returns `Some(true)` when the request finished.
fn beam_step<B: Backend>(backend: &B, s: &mut Sequence<B::State>, rows: Vec<Vec<f32>>, decoding: bool) -> Option<bool> {
    let prompt = &s.req.prompt;
    let penalty = s.req.sampling.repetition_penalty;
    let b = s.beams.as_mut()?;
    let process = |row: &[f32], generated: &[u32]| -> Vec<f32> {
        let mut lp = log_softmax(row);
        if penalty != 1.0 {
            let mut hist = prompt.clone();
            hist.extend_from_slice(generated);
            apply_repetition_penalty(&mut lp, &hist, penalty);
        }
        lp
    };
    let k = b.search.num_beams();
    let processed: Vec<Vec<f32>> = if decoding {
        rows.iter().enumerate().map(|(i, r)| process(r, b.search.running_tokens(i))).collect()
    } else {
        // Every beam starts as the prompt (only beam 0 has a finite score, as in HF).
        vec![process(&rows[0], &[]); k]
    };
    let step = b.search.step(&processed);
    let fail = |s: &Sequence<B::State>, e: String| {
        let _ = s.tx.send(Event::Error(e));
        metrics::counter!(m::REQUESTS_FINISHED, "reason" => "error").increment(1);
        Some(true)
    };
    if step.done {
        let best = b.search.best();
        let reason = if best.tokens.last().is_some_and(|t| s.req.stop.stop_token_ids.contains(t)) {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        let _ = s.tx.send(Event::Prefilled { cached_tokens: s.cached_tokens });
        for &id in &best.tokens {
            let _ = s.tx.send(Event::Token(TokenEvent { id, logprob: None, top_logprobs: Vec::new() }));
        }
        s.generated = best.tokens;
        let usage = Usage { prompt_tokens: s.req.prompt.len(), completion_tokens: s.generated.len(), cached_tokens: s.cached_tokens };
        let _ = s.tx.send(Event::Finished { reason, usage });
        let label = if reason == FinishReason::Stop { "stop" } else { "length" };
        metrics::counter!(m::REQUESTS_FINISHED, "reason" => label).increment(1);
        return Some(true);
    }
    // The new running beams: the last child of a parent takes its state, earlier ones copy it.
    let mut old: Vec<B::State> = if decoding {
        std::mem::take(&mut b.states)
    } else {
        match backend.fork(&s.state) {
            Ok(st) => vec![st],
            Err(e) => return fail(s, e),
        }
    };
    // Right after the prompt every beam descends from the prompt's state.
    let parents: Vec<usize> = if decoding { step.parents.clone() } else { vec![0; step.parents.len()] };
    match reorder_beams(std::mem::take(&mut old), &parents, |st| backend.fork(st)) {
        Ok(states) => b.states = states,
        Err(e) => return fail(s, e),
    }
    b.next = step.tokens;
    None
}
