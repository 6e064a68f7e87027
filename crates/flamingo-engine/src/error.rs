//! The engine's errors, typed so a caller can tell the client's mistakes ([`RequestError`]:
//! an HTTP 4xx) from overload, shutdown and failures inside the model (a 5xx).

/// A request the engine cannot serve as asked: the caller's mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} <image> tokens but {media} images were given")]
    MediaCount { tokens: usize, media: usize },
    #[error("token id {0} is outside the vocabulary")]
    UnknownToken(u32),
    /// A sampling or stopping parameter out of its range (the message names it).
    #[error("{0}")]
    Sampling(String),
    /// The request's KV reservation (its prompt, and its new tokens for every beam) is larger
    /// than the engine's whole KV budget, so it could never be admitted.
    #[error(
        "the prompt ({prompt_tokens} tokens) plus {new_tokens} new tokens ({beams} x {max_new_tokens}) need {need} bytes of KV cache, \
         more than this server's budget of {budget} bytes"
    )]
    OverBudget { prompt_tokens: usize, max_new_tokens: usize, beams: usize, new_tokens: usize, need: usize, budget: usize },
    /// Pinning would take the pinned bytes over their budget.
    #[error("pinning needs {need} more bytes, but only {free} of the {budget} bytes for pinned demonstration sets are free")]
    PinnedBudget { need: usize, free: usize, budget: usize },
    /// The model cannot take one of the request's media (e.g. too many frames).
    #[error("{0}")]
    Media(String),
}

/// Why the engine refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request itself is wrong (HTTP 400).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The waiting queue is full; retry later (HTTP 429 with Retry-After).
    #[error("the server is overloaded: {0} requests are waiting")]
    Overloaded(usize),
    /// The engine has stopped or is shutting down (HTTP 503).
    #[error("the engine is not running")]
    Stopped,
    /// A failure inside the model (HTTP 500).
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    /// Whether the request caused it (as opposed to the server's state or a failure inside it).
    pub fn is_request_error(&self) -> bool {
        matches!(self, EngineError::Request(_))
    }
}

/// A [`Backend`](crate::Backend) failure: caused by the request's input, or internal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The model cannot process this input (an unsupported media, an invalid request).
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Internal(String),
}

impl From<flamingo_model::Error> for BackendError {
    fn from(e: flamingo_model::Error) -> Self {
        use flamingo_model::Error as E;
        match e {
            E::Unsupported(_) | E::Invalid(_) | E::Image(_) => BackendError::Input(e.to_string()),
            other => BackendError::Internal(other.to_string()),
        }
    }
}

impl From<flamingo_model::candle::Error> for BackendError {
    fn from(e: flamingo_model::candle::Error) -> Self {
        BackendError::Internal(e.to_string())
    }
}

impl From<BackendError> for EngineError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Input(m) => EngineError::Request(RequestError::Media(m)),
            BackendError::Internal(m) => EngineError::Internal(m),
        }
    }
}

/// `reorder_beams` reports a beam bookkeeping error as a message.
impl From<String> for BackendError {
    fn from(m: String) -> Self {
        BackendError::Internal(m)
    }
}
