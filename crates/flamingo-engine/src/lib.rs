//! # flamingo-engine
//!
//! The scheduler between the model and the HTTP layer. A request ([`ValidRequest`]) is
//! submitted to an [`Engine`] and answered by a stream of [`Event`]s. One thread owns the model
//! and runs a loop of steps; each step batches one new token of every decoding sequence together
//! with prefill chunks of newly admitted ones (under a token budget), so every weight matrix is
//! read once per step for all of them.
//!
//! Caches, all exact by OpenFlamingo's masking rule (a token depends only on earlier tokens and
//! images):
//! - vision features (Perceiver latents) by image content hash + preprocessing, LRU by bytes;
//! - cross-attention K/V of each gated layer, computed once per sequence when its images are
//!   attached, reused at every step;
//! - prompt-prefix KV by a hash chain over token ids and the image hashes they attend to,
//!   block-granular, LRU by bytes.
//!
//! The model is reached through the [`Backend`] trait, so the scheduling logic is tested
//! against a fake model.

mod backend;
mod cache;
mod engine;
pub mod metrics;
mod request;
mod scheduler;

pub use backend::Backend;
pub use cache::LruBytes;
pub use engine::{on_compute_pool, Engine, EngineConfig, EngineStats, EventStream};
pub use request::{media_key, Event, MediaKey, PreparedMedia, SamplingParams, StopParams, TokenEvent, Usage, ValidRequest, MAX_BEAMS};
pub use scheduler::{Scheduler, StepReport};

/// Errors a caller of the engine sees.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    /// The waiting queue is full; retry later (HTTP 429 with Retry-After).
    #[error("the server is overloaded: {0} requests are waiting")]
    Overloaded(usize),
    /// The engine has stopped (shutting down).
    #[error("the engine is not running")]
    Stopped,
    #[error("{0}")]
    Invalid(String),
}
