//! What goes into the engine (already validated) and what comes out of it.

use flamingo_model::candle::Tensor;
use flamingo_model::generate::{FinishReason, Strategy};

use crate::EngineError;

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

#[derive(Debug, Clone, PartialEq)]
pub struct StopParams {
    pub max_new_tokens: usize,
    /// Ids that end generation (included in the output, as HF does).
    pub stop_token_ids: Vec<u32>,
}

/// The largest beam count a request may ask for.
pub const MAX_BEAMS: usize = 16;

/// A request the engine accepts: built only through [`ValidRequest::new`], which checks it.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub(crate) prompt: Vec<u32>,
    pub(crate) media: Vec<PreparedMedia>,
    pub(crate) sampling: SamplingParams,
    pub(crate) stop: StopParams,
}

impl ValidRequest {
    /// Checks the request against the model: one media item per `<image>` token, a non-empty
    /// prompt, ids inside the vocabulary, sane sampling parameters.
    pub fn new(
        prompt: Vec<u32>,
        media: Vec<PreparedMedia>,
        sampling: SamplingParams,
        stop: StopParams,
        media_token_id: u32,
        vocab_size: usize,
    ) -> Result<Self, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        let n = prompt.iter().filter(|&&t| t == media_token_id).count();
        if n != media.len() {
            return Err(EngineError::Invalid(format!("the prompt has {n} <image> tokens but {} images were given", media.len())));
        }
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(EngineError::Invalid(format!("token id {t} is outside the vocabulary")));
        }
        if let Strategy::Beam { num_beams, .. } = sampling.strategy {
            if num_beams > MAX_BEAMS {
                return Err(EngineError::Invalid(format!("num_beams must be at most {MAX_BEAMS}")));
            }
        }
        let cfg = flamingo_model::generate::GenerationConfig {
            strategy: sampling.strategy.clone(),
            max_new_tokens: stop.max_new_tokens,
            repetition_penalty: sampling.repetition_penalty,
            stop_token_ids: stop.stop_token_ids.clone(),
            stop_strings: vec![],
        };
        cfg.validate().map_err(|e| EngineError::Invalid(e.to_string()))?;
        Ok(Self { prompt, media, sampling, stop })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
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
    /// Log-probability of the token under the model (after the repetition penalty), when asked.
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
    /// The request failed inside the engine; nothing more follows.
    Error(String),
}
