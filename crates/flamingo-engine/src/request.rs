//! What goes into the engine (already validated) and what comes out of it.

use flamingo_model::candle::Tensor;
use flamingo_model::sampling::{FinishReason, Strategy};

use crate::error::{EngineError, RequestError};

/// Content hash of an image's bytes plus the preprocessing settings that produced its pixels.
pub type MediaKey = [u8; 32];

/// Builds a [`MediaKey`] from an image's bytes and a description of the preprocessing.
pub fn media_key(bytes: &[u8], preprocessing: &str) -> MediaKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((preprocessing.len() as u64).to_le_bytes());
    h.update(preprocessing.as_bytes());
    h.update(bytes);
    h.finalize().into()
}

/// One preprocessed media item of a request: `[frames, 3, H, W]` pixels and their key.
#[derive(Debug, Clone)]
pub struct PreparedMedia {
    pub key: MediaKey,
    pub pixels: Tensor,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub strategy: Strategy,
    pub repetition_penalty: f32,
    /// Report the chosen token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { strategy: Strategy::Greedy, repetition_penalty: 1.0, logprobs: None }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StopParams {
    pub max_new_tokens: usize,
    /// Ids that end generation (included in the output, as HF does).
    pub stop_token_ids: Vec<u32>,
    /// The stop ids cannot be generated before this many new tokens (vLLM's `min_tokens`).
    pub min_new_tokens: usize,
}

/// The largest beam count a request may ask for.
pub const MAX_BEAMS: usize = 16;

/// What requests are checked against, from the served model ([`Backend::spec`](crate::Backend::spec)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    pub vocab_size: usize,
    /// The `<image>` token, whose occurrences introduce the request's media in order.
    pub media_token_id: Option<u32>,
    /// Self-attention KV bytes one token adds (for admission).
    pub kv_bytes_per_token: usize,
}

impl ModelSpec {
    /// KV bytes a request reserves while it runs: its prompt, and `max_new_tokens` for each of
    /// its beams.
    pub fn kv_reservation(&self, prompt_tokens: usize, sampling: &SamplingParams, max_new_tokens: usize) -> usize {
        let beams = sampling.strategy.rows();
        prompt_tokens.saturating_add(beams.saturating_mul(max_new_tokens)).saturating_mul(self.kv_bytes_per_token)
    }

    /// Refuses a request whose KV reservation is larger than the whole `budget` (it could
    /// never be admitted).
    pub fn check_budget(
        &self,
        prompt_tokens: usize,
        sampling: &SamplingParams,
        max_new_tokens: usize,
        budget: usize,
    ) -> Result<(), RequestError> {
        let need = self.kv_reservation(prompt_tokens, sampling, max_new_tokens);
        if need <= budget {
            return Ok(());
        }
        let beams = sampling.strategy.rows();
        Err(RequestError::OverBudget {
            prompt_tokens,
            max_new_tokens,
            beams,
            new_tokens: beams.saturating_mul(max_new_tokens),
            need,
            budget,
        })
    }
}

/// What a request asks of the engine once its prompt is in the KV cache.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Generate tokens (sampling, greedy or beams).
    Generate,
    /// The log-probability of every token of each continuation after the prompt, as one
    /// forward over prompt + continuation gives it (teacher forcing): the prompt is computed
    /// once and the continuations are scored together in one batch.
    Score {
        continuations: Vec<Vec<u32>>,
        /// Alternatives reported per scored token.
        top_logprobs: usize,
    },
    /// Compute the prompt and pin its prefix blocks and its media's cross-attention K/V under
    /// this id: exempt from LRU eviction until [`Engine::unpin`](crate::Engine::unpin), counted
    /// against the pinned byte budget.
    Pin(String),
}

/// A request the engine accepts: built only through [`ValidRequest::new`],
/// [`ValidRequest::score`] or [`ValidRequest::pin`], which check it.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub(crate) prompt: Vec<u32>,
    pub(crate) media: Vec<PreparedMedia>,
    pub(crate) sampling: SamplingParams,
    pub(crate) stop: StopParams,
    pub(crate) task: Task,
    /// A token never generated: the media token (`<image>`) of a request without images,
    /// which would have no image to attend to; it is left out of every choice (its logit
    /// stays the model's own in reported log-probabilities).
    pub(crate) never: Option<u32>,
}

impl ValidRequest {
    /// Checks the request against the model: a non-empty prompt with ids inside the vocabulary,
    /// one media item per `<image>` token, sane sampling and stopping parameters.
    pub fn new(
        prompt: Vec<u32>,
        media: Vec<PreparedMedia>,
        sampling: SamplingParams,
        stop: StopParams,
        spec: &ModelSpec,
    ) -> Result<Self, RequestError> {
        if prompt.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        let tokens = spec.media_token_id.map_or(0, |mt| prompt.iter().filter(|&&t| t == mt).count());
        if tokens != media.len() {
            return Err(RequestError::MediaCount { tokens, media: media.len() });
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= spec.vocab_size) {
            return Err(RequestError::UnknownToken(t));
        }
        let bad = |m: &str| Err(RequestError::Sampling(m.into()));
        if stop.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1");
        }
        if stop.min_new_tokens > stop.max_new_tokens {
            return bad("min_tokens must not be larger than max_tokens");
        }
        if stop.min_new_tokens > 0 && sampling.strategy.rows() > 1 {
            return bad("min_tokens is not available with beam search");
        }
        if !(sampling.repetition_penalty > 0.0 && sampling.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be a positive number");
        }
        if sampling.strategy.rows() > MAX_BEAMS {
            return Err(RequestError::Sampling(format!("num_beams must be at most {MAX_BEAMS}")));
        }
        sampling.strategy.check().map_err(RequestError::Sampling)?;
        // Without images, a generated media token would have nothing to attend to (the reference
        // cannot run such a prompt at all); with images, it keeps the reference's behaviour.
        let never = spec.media_token_id.filter(|_| media.is_empty());
        Ok(Self { prompt, media, sampling, stop, task: Task::Generate, never })
    }

    /// A scoring request: the log-probabilities of each continuation's tokens after `prompt`.
    /// A continuation may hold `<image>` tokens (the echo of a prompt): the media count is
    /// checked against the prompt's and each continuation's together.
    pub fn score(
        prompt: Vec<u32>,
        media: Vec<PreparedMedia>,
        continuations: Vec<Vec<u32>>,
        top_logprobs: usize,
        spec: &ModelSpec,
    ) -> Result<Self, RequestError> {
        if continuations.is_empty() || continuations.iter().any(|c| c.is_empty()) {
            return Err(RequestError::Sampling("every candidate needs at least one token".into()));
        }
        let count = |t: &[u32]| spec.media_token_id.map_or(0, |mt| t.iter().filter(|&&x| x == mt).count());
        for c in &continuations {
            let tokens = count(&prompt) + count(c);
            if tokens != media.len() {
                return Err(RequestError::MediaCount { tokens, media: media.len() });
            }
            if let Some(&t) = c.iter().find(|&&t| t as usize >= spec.vocab_size) {
                return Err(RequestError::UnknownToken(t));
            }
        }
        // The prompt's own checks (not empty, ids in the vocabulary); its media were counted above.
        let text_only = ModelSpec { media_token_id: None, ..*spec };
        let mut req = Self::new(
            prompt,
            Vec::new(),
            SamplingParams::default(),
            StopParams { max_new_tokens: 1, stop_token_ids: vec![], min_new_tokens: 0 },
            &text_only,
        )?;
        req.media = media;
        req.task = Task::Score { continuations, top_logprobs };
        Ok(req)
    }

    /// A request that computes `prompt` and pins it (and its media) under `id`.
    pub fn pin(id: String, prompt: Vec<u32>, media: Vec<PreparedMedia>, spec: &ModelSpec) -> Result<Self, RequestError> {
        let mut req = Self::new(
            prompt,
            media,
            SamplingParams::default(),
            StopParams { max_new_tokens: 1, stop_token_ids: vec![], min_new_tokens: 0 },
            spec,
        )?;
        req.task = Task::Pin(id);
        Ok(req)
    }

    /// Refuses a request whose KV reservation ([`Self::kv_tokens`]) is larger than `budget`.
    pub(crate) fn check_budget(&self, spec: &ModelSpec, budget: usize) -> Result<(), RequestError> {
        let need = self.kv_tokens().saturating_mul(spec.kv_bytes_per_token);
        if need <= budget {
            return Ok(());
        }
        let beams = self.sampling.strategy.rows();
        Err(RequestError::OverBudget {
            prompt_tokens: self.prompt.len(),
            max_new_tokens: self.stop.max_new_tokens,
            beams,
            new_tokens: self.kv_tokens() - self.prompt.len(),
            need,
            budget,
        })
    }

    pub fn task(&self) -> &Task {
        &self.task
    }

    /// Positions of KV cache the request may hold at once: its prompt and every beam's new
    /// tokens; a scoring request's prompt once per continuation (each is scored on its own
    /// copy of the prompt's state) plus the continuations.
    pub fn kv_tokens(&self) -> usize {
        let p = self.prompt.len();
        match &self.task {
            Task::Generate => p.saturating_add(self.sampling.strategy.rows().saturating_mul(self.stop.max_new_tokens)),
            Task::Score { continuations, .. } => continuations.iter().fold(p, |acc, c| acc.saturating_add(p).saturating_add(c.len())),
            Task::Pin(_) => p,
        }
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// The content keys of the request's media, in order.
    pub(crate) fn media_keys(&self) -> Vec<MediaKey> {
        self.media.iter().map(|m| m.key).collect()
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV state came from the prefix cache.
    pub cached_tokens: usize,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Log-probability of the token under the model's distribution (before the repetition
    /// penalty and the sampling warpers), when asked.
    pub logprob: Option<f32>,
    /// The most likely alternatives `(id, logprob)`, when asked.
    pub top_logprobs: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt is in the KV cache (sent once, before the first token): how many of its
    /// tokens came from the prefix cache. Lets a caller that stops early (a stop string) still
    /// report usage.
    Prefilled {
        cached_tokens: usize,
    },
    Token(TokenEvent),
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    /// A scoring request's result (its last event): per continuation, each token with its
    /// log-probability and alternatives.
    Scored {
        scores: Vec<Vec<TokenEvent>>,
        usage: Usage,
    },
    /// A pin request's result (its last event): the bytes newly pinned for it.
    Pinned {
        bytes: usize,
        usage: Usage,
    },
    /// The request failed in the engine; nothing more follows.
    Error(EngineError),
}
