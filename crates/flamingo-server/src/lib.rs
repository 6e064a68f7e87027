//! The `flamingo` server: OpenAI-compatible HTTP API over the engine, configuration, media
//! fetching, model download.

pub mod fetch;
pub mod hub;
