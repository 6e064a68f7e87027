//! Engine events -> OpenAI responses. [`ChoiceStream`] turns one choice's events into text
//! (through the incremental [`TextStream`], which cuts at stop strings), log-probabilities and
//! a finish reason, for whole responses, SSE streams and `flamingo generate` alike; an
//! [`Endpoint`] says how each endpoint writes them.

use flamingo_engine::{EngineError, Event, EventStream};
use flamingo_model::sampling::FinishReason;
use flamingo_model::FlamingoTokenizer;

use crate::api::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatDelta, ChatLogprobs, CompletionBody, CompletionLogprobs, TextChoice, TokenLogprob,
    TopLogprob, UsageBody,
};
use crate::error::ApiError;
use crate::state::{now_secs, random_id, Runtime};
use crate::textstream::TextStream;
use crate::validate::Plan;

/// A generated token's log-probability and alternatives (ids resolved to text when written).
#[derive(Debug, Clone)]
pub struct LogprobEntry {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One finished choice.
#[derive(Debug, Clone)]
pub struct ChoiceOut {
    pub text: String,
    /// The generated ids (up to the one that completed a stop string, if one did).
    pub ids: Vec<u32>,
    pub finish: FinishReason,
    pub cached_tokens: usize,
    pub logprobs: Vec<LogprobEntry>,
}

/// What one event meant for a choice.
#[derive(Debug)]
pub enum Progress {
    /// Nothing to show.
    Pending,
    /// Text that can be shown now, and the log-probability of the token that made it (none for
    /// a stop token, or when not asked).
    Text { text: String, logprobs: Vec<LogprobEntry> },
    /// A stop string appeared: the text before it; the choice is over.
    Stopped { text: String, logprobs: Vec<LogprobEntry> },
    /// Generation ended: text held back until now (a partial character, a possible start of
    /// a stop string), and why.
    Ended { rest: String, reason: FinishReason },
}

/// Why a choice could not be completed.
#[derive(Debug)]
pub enum ChoiceError {
    /// The engine refused or failed the request.
    Engine(EngineError),
    /// The event stream ended without a finish (the engine stopped).
    Gone,
    Detokenize(flamingo_model::Error),
}

impl ChoiceError {
    pub fn to_api(&self, retry_after: u64) -> ApiError {
        match self {
            ChoiceError::Engine(e) => ApiError::from_engine(e, retry_after),
            ChoiceError::Gone => ApiError::unavailable("the engine stopped", retry_after),
            ChoiceError::Detokenize(e) => ApiError::internal(format!("detokenization failed: {e}")),
        }
    }
}

/// One choice's events turned into its answer.
pub struct ChoiceStream<'a> {
    text: TextStream<'a>,
    stop_ids: &'a [u32],
    cached: usize,
    finish: Option<FinishReason>,
}

impl<'a> ChoiceStream<'a> {
    /// `stops`: the stop strings; `stop_ids`: the stop tokens (they get no log-probability
    /// entry, as OpenAI shows none for its end token).
    pub fn new(tok: &'a FlamingoTokenizer, stops: Vec<String>, stop_ids: &'a [u32]) -> Self {
        Self { text: TextStream::new(tok, stops), stop_ids, cached: 0, finish: None }
    }

    /// A choice of `plan`: its stop strings, and `min_tokens` before they apply.
    pub fn for_plan(tok: &'a FlamingoTokenizer, plan: &Plan, stop_ids: &'a [u32]) -> Self {
        let mut c = Self::new(tok, plan.stops.clone(), stop_ids);
        c.text.set_min_tokens(plan.min_new);
        c
    }

    /// Prompt tokens served from the prefix cache (known from the first token on).
    pub fn cached_tokens(&self) -> usize {
        self.cached
    }

    pub fn on_event(&mut self, ev: Event) -> Result<Progress, ChoiceError> {
        match ev {
            Event::Prefilled { cached_tokens } => {
                self.cached = cached_tokens;
                Ok(Progress::Pending)
            }
            Event::Token(t) => {
                let logprobs = match t.logprob {
                    Some(logprob) if !self.stop_ids.contains(&t.id) => vec![LogprobEntry { id: t.id, logprob, top: t.top_logprobs }],
                    _ => Vec::new(),
                };
                let d = self.text.push(t.id).map_err(ChoiceError::Detokenize)?;
                if d.stop_hit {
                    self.finish = Some(FinishReason::Stop);
                    Ok(Progress::Stopped { text: d.text, logprobs })
                } else {
                    Ok(Progress::Text { text: d.text, logprobs })
                }
            }
            Event::Finished { reason, usage } => {
                self.cached = usage.cached_tokens;
                let rest = self.text.finish().map_err(ChoiceError::Detokenize)?;
                self.finish = Some(reason);
                Ok(Progress::Ended { rest, reason })
            }
            Event::Error(e) => Err(ChoiceError::Engine(e)),
            Event::Scored { .. } | Event::Pinned { .. } => {
                Err(ChoiceError::Engine(flamingo_engine::EngineError::Internal("a generation got another task's result".into())))
            }
        }
    }

    /// Takes one event of a whole (non-streamed) answer, keeping its log-probabilities in
    /// `kept`; the answer once the choice is over.
    fn absorb(&mut self, ev: Event, kept: &mut Vec<LogprobEntry>) -> Result<Option<ChoiceOut>, ChoiceError> {
        if let Progress::Text { logprobs, .. } | Progress::Stopped { logprobs, .. } = self.on_event(ev)? {
            kept.extend(logprobs);
        }
        let Some(finish) = self.finish else { return Ok(None) };
        let (text, ids) = (self.text.shown().to_string(), self.text.ids().to_vec());
        Ok(Some(ChoiceOut { text, ids, finish, cached_tokens: self.cached, logprobs: std::mem::take(kept) }))
    }

    /// Drives a choice to its end (non-streaming). Dropping `rx` after a stop string cancels
    /// the sequence in the engine.
    pub async fn collect(mut self, mut rx: EventStream) -> Result<ChoiceOut, ChoiceError> {
        let mut kept = Vec::new();
        while let Some(ev) = rx.recv().await {
            if let Some(out) = self.absorb(ev, &mut kept)? {
                return Ok(out);
            }
        }
        Err(ChoiceError::Gone)
    }

    /// [`collect`](Self::collect) for a caller outside an async runtime.
    pub fn collect_blocking(mut self, mut rx: EventStream) -> Result<ChoiceOut, ChoiceError> {
        let mut kept = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            if let Some(out) = self.absorb(ev, &mut kept)? {
                return Ok(out);
            }
        }
        Err(ChoiceError::Gone)
    }
}

/// The id, time and model a response carries, and its prompt's length.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: usize,
}

impl Meta {
    pub fn new<E: Endpoint>(model: &str, prompt_tokens: usize) -> Self {
        Self { id: random_id(E::ID_PREFIX), created: now_secs(), model: model.to_string(), prompt_tokens }
    }
}

/// How an endpoint writes choices, stream chunks and log-probabilities.
pub trait Endpoint: Send + 'static {
    /// `object` of a whole response.
    const OBJECT: &'static str;
    /// `object` of a stream chunk.
    const CHUNK_OBJECT: &'static str;
    const ID_PREFIX: &'static str;
    type Choice: serde::Serialize + Send;
    type ChunkChoice: serde::Serialize + Send;
    type Logprobs: Send;

    /// The log-probabilities of `entries`; `offset`: bytes of the choice's text before them.
    fn logprobs(tok: &FlamingoTokenizer, entries: &[LogprobEntry], offset: usize) -> Self::Logprobs;
    fn choice(index: usize, out: ChoiceOut, logprobs: Option<Self::Logprobs>, token_ids: Option<Vec<u32>>) -> Self::Choice;
    /// The chunk that opens a choice's stream, if the endpoint sends one.
    fn opening(index: usize) -> Option<Self::ChunkChoice>;
    fn text(index: usize, text: String, logprobs: Option<Self::Logprobs>) -> Self::ChunkChoice;
    fn finish(index: usize, reason: FinishReason) -> Self::ChunkChoice;
}

/// `/v1/chat/completions`.
pub struct Chat;

/// `/v1/completions`.
pub struct Completion;

impl Endpoint for Chat {
    const OBJECT: &'static str = "chat.completion";
    const CHUNK_OBJECT: &'static str = "chat.completion.chunk";
    const ID_PREFIX: &'static str = "chatcmpl-";
    type Choice = ChatChoice;
    type ChunkChoice = ChatChunkChoice;
    type Logprobs = ChatLogprobs;

    fn logprobs(tok: &FlamingoTokenizer, entries: &[LogprobEntry], _offset: usize) -> ChatLogprobs {
        let top = |&(id, lp): &(u32, f32)| {
            let (token, bytes) = tok.token_display(id);
            TopLogprob { token, logprob: f64::from(lp), bytes }
        };
        let content = entries
            .iter()
            .map(|e| {
                let (token, bytes) = tok.token_display(e.id);
                TokenLogprob { token, logprob: f64::from(e.logprob), bytes, top_logprobs: e.top.iter().map(top).collect() }
            })
            .collect();
        ChatLogprobs { content }
    }

    fn choice(index: usize, out: ChoiceOut, logprobs: Option<ChatLogprobs>, token_ids: Option<Vec<u32>>) -> ChatChoice {
        let message = AssistantMessage { role: "assistant", content: out.text };
        ChatChoice { index, message, logprobs, finish_reason: out.finish, token_ids }
    }

    fn opening(index: usize) -> Option<ChatChunkChoice> {
        let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()) };
        Some(ChatChunkChoice { index, delta, logprobs: None, finish_reason: None })
    }

    fn text(index: usize, text: String, logprobs: Option<ChatLogprobs>) -> ChatChunkChoice {
        ChatChunkChoice { index, delta: ChatDelta { role: None, content: Some(text) }, logprobs, finish_reason: None }
    }

    fn finish(index: usize, reason: FinishReason) -> ChatChunkChoice {
        ChatChunkChoice { index, delta: ChatDelta::default(), logprobs: None, finish_reason: Some(reason) }
    }
}

impl Endpoint for Completion {
    const OBJECT: &'static str = "text_completion";
    const CHUNK_OBJECT: &'static str = "text_completion";
    const ID_PREFIX: &'static str = "cmpl-";
    type Choice = TextChoice;
    type ChunkChoice = TextChoice;
    type Logprobs = CompletionLogprobs;

    fn logprobs(tok: &FlamingoTokenizer, entries: &[LogprobEntry], offset: usize) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        let mut at = offset;
        for e in entries {
            let (token, bytes) = tok.token_display(e.id);
            out.text_offset.push(at);
            at += bytes.len();
            out.tokens.push(token);
            out.token_logprobs.push(Some(f64::from(e.logprob)));
            out.top_logprobs
                .push(Some(e.top.iter().map(|&(id, lp)| (tok.token_display(id).0, serde_json::Value::from(f64::from(lp)))).collect()));
        }
        out
    }

    fn choice(index: usize, out: ChoiceOut, logprobs: Option<CompletionLogprobs>, token_ids: Option<Vec<u32>>) -> TextChoice {
        TextChoice { index, text: out.text, logprobs, finish_reason: Some(out.finish), token_ids }
    }

    fn opening(_index: usize) -> Option<TextChoice> {
        None
    }

    fn text(index: usize, text: String, logprobs: Option<CompletionLogprobs>) -> TextChoice {
        TextChoice { index, text, logprobs, finish_reason: None, token_ids: None }
    }

    fn finish(index: usize, reason: FinishReason) -> TextChoice {
        TextChoice { index, text: String::new(), logprobs: None, finish_reason: Some(reason), token_ids: None }
    }
}

/// The whole (non-streamed) response: every choice driven to its end, in order.
pub async fn whole<E: Endpoint>(
    rt: &Runtime,
    streams: Vec<EventStream>,
    plan: &Plan,
    meta: Meta,
    retry_after: u64,
) -> Result<CompletionBody<E::Choice>, ApiError> {
    let mut outs = Vec::with_capacity(streams.len());
    for rx in streams {
        let choice = ChoiceStream::for_plan(&rt.tokenizer, plan, &rt.stop_ids);
        outs.push(choice.collect(rx).await.map_err(|e| e.to_api(retry_after))?);
    }
    let completion = outs.iter().map(|o| o.ids.len()).sum();
    let usage = UsageBody::new(meta.prompt_tokens, completion, outs.first().map(|o| o.cached_tokens).unwrap_or(0));
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, mut o)| {
            let logprobs = plan.logprobs.map(|_| E::logprobs(&rt.tokenizer, &o.logprobs, 0));
            let ids = plan.return_ids.then(|| std::mem::take(&mut o.ids));
            E::choice(i, o, logprobs, ids)
        })
        .collect();
    Ok(CompletionBody {
        id: meta.id,
        object: E::OBJECT,
        created: meta.created,
        model: meta.model,
        system_fingerprint: None,
        choices,
        usage,
    })
}

/// A completions request with `echo`: the prompt text, and (when log-probabilities were asked
/// for) the scoring of its tokens after the first.
pub struct Echo {
    pub text: String,
    pub prompt: Vec<u32>,
    pub scores: Option<EventStream>,
}

/// The whole response of a completions request with `echo`: each choice's text after the
/// prompt's, and the prompt's tokens first in its log-probabilities (the first one `null`), as
/// OpenAI's legacy API answers it. With `max_new` 0 the choices are the prompt alone.
pub async fn echo(
    rt: &Runtime,
    streams: Vec<EventStream>,
    plan: &Plan,
    meta: Meta,
    echo: Echo,
    retry_after: u64,
) -> Result<CompletionBody<TextChoice>, ApiError> {
    let tok = &rt.tokenizer;
    let mut prompt_lp = CompletionLogprobs::default();
    if plan.logprobs.is_some() {
        // A one-token prompt has nothing scored: its token's entry is null.
        let scored = match echo.scores {
            Some(mut rx) => loop {
                match rx.recv().await {
                    Some(Event::Scored { mut scores, .. }) => break scores.pop().unwrap_or_default(),
                    Some(Event::Error(e)) => return Err(ApiError::from_engine(&e, retry_after)),
                    Some(_) => {}
                    None => return Err(ApiError::unavailable("the engine stopped", retry_after)),
                }
            },
            None => Vec::new(),
        };
        let mut at = 0;
        for (i, &id) in echo.prompt.iter().enumerate() {
            let (token, bytes) = tok.token_display(id);
            prompt_lp.text_offset.push(at);
            at += bytes.len();
            prompt_lp.tokens.push(token);
            let ev = i.checked_sub(1).and_then(|j| scored.get(j));
            prompt_lp.token_logprobs.push(ev.and_then(|e| e.logprob).map(f64::from));
            prompt_lp.top_logprobs.push(ev.map(|e| {
                e.top_logprobs.iter().map(|&(id, lp)| (tok.token_display(id).0, serde_json::Value::from(f64::from(lp)))).collect()
            }));
        }
    }
    let mut outs = Vec::with_capacity(plan.choices.len());
    for rx in streams {
        let choice = ChoiceStream::for_plan(tok, plan, &rt.stop_ids);
        outs.push(Some(choice.collect(rx).await.map_err(|e| e.to_api(retry_after))?));
    }
    if outs.is_empty() {
        outs = plan.choices.iter().map(|_| None).collect();
    }
    let completion: usize = outs.iter().flatten().map(|o| o.ids.len()).sum();
    let cached = outs.iter().flatten().next().map(|o| o.cached_tokens).unwrap_or(0);
    let usage = UsageBody::new(meta.prompt_tokens, completion, cached);
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(index, o)| {
            let logprobs = plan.logprobs.map(|_| {
                let mut lp = prompt_lp.clone();
                if let Some(o) = &o {
                    let rest = Completion::logprobs(tok, &o.logprobs, echo.text.len());
                    lp.tokens.extend(rest.tokens);
                    lp.token_logprobs.extend(rest.token_logprobs);
                    lp.top_logprobs.extend(rest.top_logprobs);
                    lp.text_offset.extend(rest.text_offset);
                }
                lp
            });
            match o {
                Some(mut o) => {
                    let ids = plan.return_ids.then(|| std::mem::take(&mut o.ids));
                    o.text = format!("{}{}", echo.text, o.text);
                    Completion::choice(index, o, logprobs, ids)
                }
                None => TextChoice {
                    index,
                    text: echo.text.clone(),
                    logprobs,
                    finish_reason: Some(FinishReason::Length),
                    token_ids: plan.return_ids.then(Vec::new),
                },
            }
        })
        .collect();
    Ok(CompletionBody {
        id: meta.id,
        object: Completion::OBJECT,
        created: meta.created,
        model: meta.model,
        system_fingerprint: None,
        choices,
        usage,
    })
}
