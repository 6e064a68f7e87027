//! # flamingo-engine
//!
//! The scheduler between the model and the HTTP layer. A request ([`ValidRequest`], checked
//! against the model's [`ModelSpec`]) is submitted to an [`Engine`] and answered by a stream of
//! [`Event`]s. One thread owns the model and runs a loop of steps ([`Scheduler::step`], in
//! named phases: cancel, admit, plan, forward, donate, pick, finish); each step batches one new
//! token of every decoding sequence together with prefill chunks of newly admitted ones (under
//! a token budget), so every weight matrix is read once per step for all of them. It is the one
//! decode loop: the server and `flamingo generate` both run through it.
//!
//! Caches, all exact by OpenFlamingo's masking rule (a token depends only on earlier tokens and
//! images):
//! - vision features: each image's cross-attention K/V for every gated layer, by image content
//!   hash + preprocessing, LRU by bytes ([`LruBytes`]), shared by the sequences that show it;
//! - prompt-prefix KV (`prefix.rs`): a hash chain over token ids and the image hashes they
//!   introduce, block-granular with partial-block hits, LRU by bytes.
//!
//! Errors are typed ([`EngineError`]): a request's own mistakes ([`RequestError`]) are told
//! apart from overload, shutdown and failures inside the model. The model is reached through
//! the [`Backend`] trait, so the scheduling logic is tested against a fake model.

mod backend;
mod cache;
mod engine;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod metrics;
mod prefix;
mod request;
mod scheduler;
mod sequence;

pub use backend::{Backend, Row};
pub use cache::{LruBytes, Pinned};
pub use engine::{on_compute_pool, panic_message, Engine, EngineConfig, EngineStats, EventStream};
pub use error::{BackendError, EngineError, RequestError};
pub use prefix::BlockHash;
pub use request::{
    media_key, Event, MediaKey, ModelSpec, PreparedMedia, SamplingParams, StopParams, Task, TokenEvent, Usage, ValidRequest, MAX_BEAMS,
};
pub use scheduler::{Scheduler, SchedulerConfig, StepReport};
