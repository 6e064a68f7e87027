//! # flamingo-model
//!
//! Flamingo-family visual language models (DeepMind's Flamingo, NeurIPS 2022; OpenFlamingo) in
//! pure candle: a CLIP ViT vision tower, the Perceiver Resampler, tanh-gated cross-attention
//! layers interleaved into a language model (MosaicGPT, MPT, GPT-NeoX, LLaMA), exact loading of
//! the released checkpoints, PIL-exact preprocessing, the tokenizer with OpenFlamingo's special
//! tokens, and the decoding logic ([`sampling`]: logits processors, greedy and seeded sampling,
//! log-probabilities, HF's beam search as a state machine).
//!
//! Design: weights are immutable and shared; per-request state ([`SequenceState`]: self-attention
//! KV, cross-attention K/V computed once per request, media count) is owned by the caller, and
//! [`Flamingo::forward`] runs a ragged batch of sequences so a serving engine can batch decode
//! steps across requests. The decode loop itself is the engine's (`flamingo-engine`), the one
//! the server and `flamingo generate` share. No async runtime, no HTTP.

pub mod config;
pub mod device;
pub mod error;
pub mod f16w;
pub mod idefics;
pub mod lm;
pub mod loader;
pub mod manifest;
pub mod model;
pub mod nn;
pub mod paged;
pub mod perceiver;
pub mod preprocess;
pub mod pth;
pub mod q8;
pub mod random;
pub mod sampling;
pub mod skinny;
pub mod state;
pub mod tokenizer;
pub mod vision;
pub mod weights;
pub mod xattn;

pub use candle_core as candle;
pub use candle_nn;
pub use config::{MediaRule, ModelFamily};
pub use error::{Error, Result};
pub use loader::{load, Loaded, LoadedFiles, ModelFiles};
pub use model::{Flamingo, Input, Logits, MediaKv};
pub use state::{KvBlock, SequenceState};
pub use tokenizer::FlamingoTokenizer;
