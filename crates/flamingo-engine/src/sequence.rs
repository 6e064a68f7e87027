//! One request inside the scheduler: while it waits, and while it runs (its state, progress
//! through the prompt, sampler or beams), and how it takes its next token from a row of logits.

use std::time::Instant;

use flamingo_model::sampling::{beam_logprobs, reorder_beams, token_logprobs, BeamSearch, FinishReason, Sampler, Strategy};
use tokio::sync::mpsc::UnboundedSender;

use crate::backend::Backend;
use crate::error::EngineError;
use crate::metrics as m;
use crate::prefix::PromptBlocks;
use crate::request::{Event, Task, TokenEvent, Usage, ValidRequest};

/// A submitted request waiting for admission.
pub(crate) struct Waiting {
    pub id: u64,
    pub req: ValidRequest,
    pub tx: UnboundedSender<Event>,
    pub submitted: Instant,
}

/// The beams of one request: they share its images and its prefilled prompt (each beam starts
/// as a copy of the prompt's state) and advance together, one batched row each per step.
pub(crate) struct Beams<S> {
    search: BeamSearch,
    states: Vec<S>,
    next: Vec<u32>,
}

/// A running request.
pub(crate) struct Sequence<S> {
    pub id: u64,
    pub req: ValidRequest,
    pub tx: UnboundedSender<Event>,
    pub state: S,
    /// Prompt tokens whose K/V are in `state`.
    pub prefilled: usize,
    pub cached_tokens: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    /// The token to feed in the next decode step (sampling).
    next: Option<u32>,
    /// Beam search: the running beams' states and next tokens (empty until the prompt is done).
    beams: Option<Beams<S>>,
    /// KV bytes reserved for this sequence at admission.
    pub reserved: usize,
    /// The prompt's blocks for the prefix cache.
    pub blocks: PromptBlocks,
    submitted: Instant,
    last_token: Option<Instant>,
    /// A pin request's result, set when its prompt is done.
    pub pinned: Option<Result<usize, EngineError>>,
}

/// What a sequence does in one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    /// Nothing this step (no room in the token budget).
    Idle,
    /// This many more prompt tokens.
    Prefill(usize),
    /// One new token per row (one row, or one per beam).
    Decode(usize),
}

impl Work {
    /// Inputs (and so rows of logits) this work adds to the forward.
    pub fn inputs(self) -> usize {
        match self {
            Work::Idle => 0,
            Work::Prefill(_) => 1,
            Work::Decode(rows) => rows,
        }
    }

    pub fn tokens(self) -> usize {
        match self {
            Work::Idle => 0,
            Work::Prefill(n) | Work::Decode(n) => n,
        }
    }
}

/// Where a sequence stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Running,
    /// Finished (stop, length or error): its events are sent.
    Finished,
    /// Its client went away.
    Cancelled,
}

impl<S> Sequence<S> {
    pub fn new(w: Waiting, state: S, cached_tokens: usize, blocks: PromptBlocks, reserved: usize) -> Self {
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
        Self {
            id: w.id,
            req: w.req,
            tx: w.tx,
            state,
            prefilled: cached_tokens,
            cached_tokens,
            generated: Vec::new(),
            sampler,
            next: None,
            beams,
            reserved,
            blocks,
            submitted: w.submitted,
            last_token: None,
            pinned: None,
        }
    }

    /// Whether the request generates tokens (not a scoring or pin request).
    pub fn generates(&self) -> bool {
        self.req.task == Task::Generate
    }

    pub fn is_pin(&self) -> bool {
        matches!(self.req.task, Task::Pin(_))
    }

    fn usage(&self) -> Usage {
        Usage { prompt_tokens: self.req.prompt.len(), completion_tokens: self.generated.len(), cached_tokens: self.cached_tokens }
    }

    /// A pin request whose prompt is done: its result is sent.
    pub fn finish_pin(&mut self) -> Outcome {
        match self.pinned.take() {
            Some(Ok(bytes)) => {
                let _ = self.tx.send(Event::Pinned { bytes, usage: self.usage() });
                metrics::counter!(m::REQUESTS_FINISHED, "reason" => "pinned").increment(1);
                Outcome::Finished
            }
            Some(Err(e)) => self.fail(e),
            None => self.fail(EngineError::Internal("a pin request ended before its prompt was pinned".into())),
        }
    }

    /// Rows this sequence puts into the next decode step (0 while prefilling).
    pub fn decode_rows(&self) -> usize {
        match &self.beams {
            Some(b) => b.states.len(),
            None => usize::from(self.next.is_some()),
        }
    }

    pub fn is_beam_search(&self) -> bool {
        self.beams.is_some()
    }

    /// Prompt tokens still to compute.
    pub fn prompt_left(&self) -> usize {
        self.req.prompt.len() - self.prefilled
    }

    /// The states and inputs of `work`, appended to a step's batch.
    pub fn inputs<'a>(&'a mut self, work: Work, states: &mut Vec<&'a mut S>, inputs: &mut Vec<flamingo_model::Input<'a>>) {
        use flamingo_model::Input;
        match work {
            Work::Idle => {}
            Work::Prefill(n) => {
                inputs.push(Input::Prompt(&self.req.prompt[self.prefilled..self.prefilled + n]));
                states.push(&mut self.state);
            }
            Work::Decode(_) => match (&mut self.beams, self.next) {
                (Some(b), _) => {
                    for (st, &t) in b.states.iter_mut().zip(&b.next) {
                        inputs.push(Input::Generated(t));
                        states.push(st);
                    }
                }
                (None, Some(t)) => {
                    inputs.push(Input::Generated(t));
                    states.push(&mut self.state);
                }
                (None, None) => {}
            },
        }
    }

    /// Whether the next token is the plain argmax of the logits (greedy, no repetition penalty,
    /// no log-probabilities), which a device can find without sending the row to the host.
    pub fn picks_argmax(&self) -> bool {
        let r = &self.req.sampling;
        self.generates()
            && self.beams.is_none()
            && self.generated.len() >= self.req.stop.min_new_tokens
            && matches!(r.strategy, flamingo_model::sampling::Strategy::Greedy)
            && r.repetition_penalty == 1.0
            && r.logprobs.is_none()
    }

    /// [`Self::pick`] from a forward's row, which may be the argmax alone.
    pub fn pick_row(&mut self, row: &crate::backend::Row) -> TokenEvent {
        match row {
            crate::backend::Row::Logits(l) => self.pick(l),
            crate::backend::Row::Argmax(id) => TokenEvent { id: *id, logprob: None, top_logprobs: Vec::new() },
        }
    }

    /// Chooses the next token from a row of logits (sampling or greedy, with the repetition
    /// penalty over prompt and generated ids), with its log-probability and the top
    /// log-probabilities when the request asks for them.
    pub fn pick(&mut self, row: &[f32]) -> TokenEvent {
        // The media token is never a candidate, and before `min_new_tokens` neither are the
        // stop ids (the reported log-probabilities stay the model's own).
        let early = self.generated.len() < self.req.stop.min_new_tokens;
        let banned = self.req.never.filter(|&t| row.get(t as usize).is_some_and(|l| *l > f32::NEG_INFINITY));
        let id = if early || banned.is_some() {
            let mut masked = row.to_vec();
            let stops = if early { self.req.stop.stop_token_ids.as_slice() } else { &[] };
            for &t in stops.iter().chain(&banned) {
                if let Some(l) = masked.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            self.sampler.next(&masked, self.req.prompt.iter().chain(&self.generated))
        } else {
            self.sampler.next(row, self.req.prompt.iter().chain(&self.generated))
        };
        let mut ev = TokenEvent { id, logprob: None, top_logprobs: Vec::new() };
        if let Some(k) = self.req.sampling.logprobs {
            (ev.logprob, ev.top_logprobs) = token_logprobs(row, id, k);
        }
        ev
    }

    /// Sends a picked token and decides whether the sequence goes on.
    pub fn emit(&mut self, ev: TokenEvent, now: Instant) -> Outcome {
        let tok = ev.id;
        match self.last_token {
            None => {
                metrics::histogram!(m::TIME_TO_FIRST_TOKEN).record((now - self.submitted).as_secs_f64());
                let _ = self.tx.send(Event::Prefilled { cached_tokens: self.cached_tokens });
            }
            Some(t) => metrics::histogram!(m::INTER_TOKEN_LATENCY).record((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
        self.generated.push(tok);
        let delivered = self.tx.send(Event::Token(ev)).is_ok();
        let finish = if self.req.stop.stop_token_ids.contains(&tok) {
            Some(FinishReason::Stop)
        } else if self.generated.len() >= self.req.stop.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        match finish {
            Some(reason) => {
                self.finish(reason);
                Outcome::Finished
            }
            None if !delivered => {
                metrics::counter!(m::CANCELLATIONS).increment(1);
                Outcome::Cancelled
            }
            None => {
                self.next = Some(tok);
                Outcome::Running
            }
        }
    }

    /// Sends `Finished` with the usage.
    fn finish(&self, reason: FinishReason) {
        let _ = self.tx.send(Event::Finished { reason, usage: self.usage() });
        let label = if reason == FinishReason::Stop { "stop" } else { "length" };
        metrics::counter!(m::REQUESTS_FINISHED, "reason" => label).increment(1);
    }

    /// Sends an error; nothing follows it.
    pub fn fail(&self, e: EngineError) -> Outcome {
        let _ = self.tx.send(Event::Error(e));
        metrics::counter!(m::REQUESTS_FINISHED, "reason" => "error").increment(1);
        Outcome::Finished
    }
}

impl<S> Sequence<S> {
    /// Advances the beam search with this step's rows of logits: one row right after the
    /// prompt, then one per running beam. When the search ends, the best hypothesis is sent
    /// (its tokens at once, then `Finished`).
    pub fn beam_step<B: Backend<State = S>>(&mut self, backend: &B, rows: &[Vec<f32>], decoding: bool) -> Outcome {
        match self.try_beam_step(backend, rows, decoding) {
            Ok(outcome) => outcome,
            Err(e) => self.fail(e),
        }
    }

    fn try_beam_step<B: Backend<State = S>>(&mut self, backend: &B, rows: &[Vec<f32>], decoding: bool) -> Result<Outcome, EngineError> {
        let prompt = &self.req.prompt;
        let penalty = self.req.sampling.repetition_penalty;
        let Some(b) = self.beams.as_mut() else { return Err(EngineError::Internal("not a beam search".into())) };
        let k = b.search.num_beams();
        let mut scores: Vec<Vec<f32>> = if decoding {
            rows.iter().enumerate().map(|(i, r)| beam_logprobs(r, prompt.iter().chain(b.search.running_tokens(i)), penalty)).collect()
        } else {
            // Every beam starts as the prompt (only beam 0 has a finite score, as in HF).
            let first = rows.first().ok_or_else(|| EngineError::Internal("no logits after the prompt".into()))?;
            vec![beam_logprobs(first, prompt, penalty); k]
        };
        if let Some(t) = self.req.never {
            for s in scores.iter_mut().filter_map(|row| row.get_mut(t as usize)) {
                *s = f32::NEG_INFINITY;
            }
        }
        let step = b.search.step(&scores);
        if step.done {
            let best = b.search.best();
            let reason = if best.tokens.last().is_some_and(|t| self.req.stop.stop_token_ids.contains(t)) {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            let _ = self.tx.send(Event::Prefilled { cached_tokens: self.cached_tokens });
            for &id in &best.tokens {
                let _ = self.tx.send(Event::Token(TokenEvent { id, logprob: None, top_logprobs: Vec::new() }));
            }
            self.generated = best.tokens;
            self.finish(reason);
            return Ok(Outcome::Finished);
        }
        // The new running beams: the last child of a parent takes its state, earlier ones copy
        // it. Right after the prompt every beam descends from the prompt's state.
        let (old, parents) = if decoding {
            (std::mem::take(&mut b.states), step.parents.clone())
        } else {
            (vec![backend.fork(&self.state)?], vec![0; step.parents.len()])
        };
        b.states = reorder_beams(old, &parents, |st| backend.fork(st))?;
        b.next = step.tokens;
        Ok(Outcome::Running)
    }
}

impl<S> Sequence<S> {
    /// A scoring request whose prompt is done (`row`: the logits after its last token): each
    /// continuation's first token is read from `row`, the rest from one batched forward of
    /// every continuation on its own copy of the prompt's state (the last one takes the
    /// original). Sends the scores and finishes.
    pub fn score<B: Backend<State = S>>(&mut self, backend: &B, row: &[f32]) -> Outcome {
        match self.try_score(backend, row) {
            Ok(scores) => {
                metrics::histogram!(m::TIME_TO_FIRST_TOKEN).record(self.submitted.elapsed().as_secs_f64());
                let _ = self.tx.send(Event::Prefilled { cached_tokens: self.cached_tokens });
                let _ = self.tx.send(Event::Scored { scores, usage: self.usage() });
                metrics::counter!(m::REQUESTS_FINISHED, "reason" => "scored").increment(1);
                Outcome::Finished
            }
            Err(e) => self.fail(e),
        }
    }

    fn try_score<B: Backend<State = S>>(&mut self, backend: &B, row: &[f32]) -> Result<Vec<Vec<TokenEvent>>, EngineError> {
        let Task::Score { continuations, top_logprobs } = &self.req.task else {
            return Err(EngineError::Internal("not a scoring request".into()));
        };
        let k = *top_logprobs;
        let mut out: Vec<Vec<TokenEvent>> = continuations
            .iter()
            .map(|c| {
                let id = c.first().copied().unwrap_or(0);
                let (logprob, top_logprobs) = token_logprobs(row, id, k);
                vec![TokenEvent { id, logprob, top_logprobs }]
            })
            .collect();
        let longer: Vec<usize> = (0..continuations.len()).filter(|&i| continuations[i].len() > 1).collect();
        if longer.is_empty() {
            return Ok(out);
        }
        let mut states = Vec::with_capacity(longer.len());
        for _ in 1..longer.len() {
            states.push(backend.fork(&self.state)?);
        }
        states.push(std::mem::replace(&mut self.state, backend.new_state()));
        let inputs: Vec<flamingo_model::Input> =
            longer.iter().map(|&i| flamingo_model::Input::Prompt(&continuations[i][..continuations[i].len() - 1])).collect();
        let targets: Vec<&[u32]> = longer.iter().map(|&i| &continuations[i][1..]).collect();
        let mut refs: Vec<&mut S> = states.iter_mut().collect();
        let scored = backend.score(&mut refs, &inputs, &targets, k)?;
        metrics::counter!(m::SCORED_TOKENS).increment(inputs.iter().map(|i| i.len() as u64).sum());
        if scored.len() != longer.len() || scored.iter().zip(&targets).any(|(s, t)| s.len() != t.len()) {
            return Err(EngineError::Internal("the model scored a different number of tokens".into()));
        }
        for (&i, rows) in longer.iter().zip(scored) {
            out[i].extend(rows);
        }
        Ok(out)
    }
}
