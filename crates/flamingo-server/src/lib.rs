//! The `flamingo` server: the OpenAI-compatible HTTP API over the engine, configuration, media
//! fetching, model download.
//!
//! A request's path through the crate: [`routes`] (the route table and handlers) -> [`validate`]
//! (the body parsed and checked against the limits and the model, tokenized through
//! [`template`] for chat) -> [`media`] (images fetched by [`fetch`] and preprocessed) -> the
//! engine -> [`respond`] (events to text through [`textstream`], whole responses) or
//! [`stream`] (SSE). [`error`] maps every error to its status and OpenAI body; [`api`] holds
//! the wire types; [`state`] the loaded model; [`server`] binds, serves and drains.

pub mod api;
pub mod config;
pub mod demos;
pub mod embedded;
pub mod error;
pub mod fetch;
pub mod hub;
mod jsonint;
pub mod loadgen;
pub mod media;
mod middleware;
pub mod respond;
pub mod routes;
pub mod server;
pub mod soak;
pub mod state;
pub mod store;
pub mod stream;
pub mod template;
pub mod textstream;
pub mod validate;
pub mod world;
