//! The `flamingo` server: OpenAI-compatible HTTP API over the engine, configuration, media
//! fetching, model download.

pub mod api;
pub mod config;
pub mod embedded;
pub mod fetch;
pub mod hub;
pub mod media;
pub mod server;
pub mod template;
pub mod textstream;
