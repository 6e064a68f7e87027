//! The HTTP routes: one table ([`Route::ALL`]) that the router is built from and that tests
//! compare with `openapi.yaml`, so the two cannot drift.

mod fewshot;
mod generate;
mod info;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::Method;
use axum::middleware;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;

use crate::error::ApiError;
use crate::state::AppState;

pub use fewshot::{register_in_process, score_in_process, ScoreBody, ScoreRequest, Scored, CANDIDATES};
pub use generate::chat_in_process;

/// Every route the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    ChatCompletions,
    Completions,
    Score,
    CreateDemonstrations,
    ListDemonstrations,
    GetDemonstration,
    DeleteDemonstration,
    Models,
    Model,
    Health,
    Metrics,
}

impl Route {
    pub const ALL: [Route; 11] = [
        Route::ChatCompletions,
        Route::Completions,
        Route::Score,
        Route::CreateDemonstrations,
        Route::ListDemonstrations,
        Route::GetDemonstration,
        Route::DeleteDemonstration,
        Route::Models,
        Route::Model,
        Route::Health,
        Route::Metrics,
    ];

    /// The path as axum matches it (`{*id}`: the rest of the path, slashes included).
    pub fn path(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Score => "/v1/score",
            Route::CreateDemonstrations | Route::ListDemonstrations => "/v1/demonstrations",
            Route::GetDemonstration | Route::DeleteDemonstration => "/v1/demonstrations/{id}",
            Route::Models => "/v1/models",
            Route::Model => "/v1/models/{*id}",
            Route::Health => "/health",
            Route::Metrics => "/metrics",
        }
    }

    fn verb(self) -> Verb {
        match self {
            Route::ChatCompletions | Route::Completions | Route::Score | Route::CreateDemonstrations => Verb::Post,
            Route::DeleteDemonstration => Verb::Delete,
            Route::ListDemonstrations | Route::GetDemonstration | Route::Models | Route::Model | Route::Health | Route::Metrics => {
                Verb::Get
            }
        }
    }

    pub fn method(self) -> Method {
        match self.verb() {
            Verb::Get => Method::GET,
            Verb::Post => Method::POST,
            Verb::Delete => Method::DELETE,
        }
    }

    /// Whether the route takes an API key when keys are configured: every route but the
    /// readiness probe, and `/metrics` unless `server.public_metrics` opens it.
    pub fn needs_key(self, cfg: &crate::config::ServerSection) -> bool {
        match self {
            Route::Health => false,
            Route::Metrics => !cfg.public_metrics,
            _ => true,
        }
    }

    fn handler(self) -> MethodRouter<Arc<AppState>> {
        let filter = match self.verb() {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Delete => MethodFilter::DELETE,
        };
        match self {
            Route::ChatCompletions => on(filter, generate::chat),
            Route::Completions => on(filter, generate::completions),
            Route::Score => on(filter, fewshot::score),
            Route::CreateDemonstrations => on(filter, fewshot::create_set),
            Route::ListDemonstrations => on(filter, fewshot::list_sets),
            Route::GetDemonstration => on(filter, fewshot::get_set),
            Route::DeleteDemonstration => on(filter, fewshot::delete_set),
            Route::Models => on(filter, info::models),
            Route::Model => on(filter, info::model),
            Route::Health => on(filter, info::health),
            Route::Metrics => on(filter, info::metrics),
        }
    }
}

/// The methods the routes use (one place that gives both axum's filter and the `Method`).
#[derive(Debug, Clone, Copy)]
enum Verb {
    Get,
    Post,
    Delete,
}

/// The router with every route and middleware.
pub fn router(st: Arc<AppState>) -> Router {
    let table = |keyed: bool| {
        Route::ALL
            .into_iter()
            .filter(|r| r.needs_key(&st.cfg.server) == keyed)
            .fold(Router::new(), |r, route| r.route(route.path(), route.handler()))
    };
    let keyed = table(true).route_layer(middleware::from_fn_with_state(st.clone(), crate::middleware::auth));
    Router::new()
        .merge(keyed)
        .merge(table(false))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(crate::middleware::contain_panics))
        .layer(middleware::from_fn(crate::middleware::observe))
        .with_state(st)
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::method_not_allowed(format!("{} is not allowed on {}", req.method(), req.uri().path()))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}
