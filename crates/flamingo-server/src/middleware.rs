//! Middleware: request ids, access logs and HTTP metrics around every route; API-key auth
//! around the `/v1` routes.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::{random_id, AppState};

const HTTP_REQUESTS: &str = "flamingo_http_requests_total";
const HTTP_DURATION: &str = "flamingo_http_request_duration_seconds";

/// Registers the HTTP metrics' descriptions with the installed recorder.
pub(crate) fn describe_metrics() {
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests by route, method and status");
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request latency by route (until the response head; streams continue)"
    );
}

/// The client's `X-Request-Id` when it is sane (1-128 characters of `[A-Za-z0-9._-]`).
fn client_request_id(req: &Request) -> Option<String> {
    let v = req.headers().get("x-request-id")?.to_str().ok()?;
    let sane = !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    sane.then(|| v.to_string())
}

/// Request ids, access logs and HTTP metrics.
pub(crate) async fn observe(req: Request, next: Next) -> Response {
    let t = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let id = client_request_id(&req).unwrap_or_else(|| random_id(""));
    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route);
    let mut resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let status = resp.status().as_u16();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let secs = t.elapsed().as_secs_f64();
    metrics::counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method.clone(), "status" => status.to_string()).increment(1);
    metrics::histogram!(HTTP_DURATION, "route" => route.clone()).record(secs);
    span.in_scope(|| tracing::info!(status, latency_ms = (secs * 1e3) as u64, "request"));
    resp
}

/// A panic inside a handler (a bug) becomes a 500 in OpenAI's error shape, logged with its
/// message and counted (`flamingo_panics_total{where="http"}`); the server goes on serving.
pub(crate) async fn contain_panics(req: Request, next: Next) -> Response {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(payload) => {
            let message = flamingo_engine::panic_message(payload.as_ref());
            tracing::error!(panic = %message, "a request handler panicked; the request fails with 500");
            metrics::counter!(flamingo_engine::metrics::PANICS, "where" => "http").increment(1);
            ApiError::internal("internal error: the server failed while handling this request").into_response()
        }
    }
}

/// `Authorization: Bearer <key>` against the configured keys (none configured: no auth).
pub(crate) async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let keys = &st.cfg.server.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    match given {
        None => ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`").into_response(),
        Some(k) if key_matches(keys, k) => next.run(req).await,
        Some(_) => ApiError::unauthorized("invalid API key").into_response(),
    }
}

/// Whether `given` is one of `keys`, in time that depends on neither the keys' contents nor
/// their lengths: both sides are hashed (SHA-256) and every key's digest is compared in full
/// with the given one's, without an early exit.
fn key_matches(keys: &[String], given: &str) -> bool {
    use sha2::{Digest, Sha256};
    let g = Sha256::digest(given.as_bytes());
    keys.iter().fold(false, |found, key| found | constant_time_eq(&Sha256::digest(key.as_bytes()), &g))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::key_matches;

    /// Regression guard: a handler that panics answers 500 in OpenAI's shape and counts the
    /// panic; the next request on the same router is served.
    #[tokio::test]
    async fn a_panicking_handler_is_a_500_and_the_router_goes_on() {
        use axum::body::Body;
        use axum::http::Request;
        use tower::ServiceExt;
        async fn boom() -> &'static str {
            panic!("deliberate panic in a test handler")
        }
        let app = axum::Router::new()
            .route("/boom", axum::routing::get(boom))
            .route("/fine", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(super::contain_panics));
        let r = app.clone().oneshot(Request::get("/boom").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(r.status(), 500);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "server_error", "{v}");
        let r = app.oneshot(Request::get("/fine").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(r.status(), 200);
    }

    #[test]
    fn every_configured_key_is_accepted_and_nothing_else() {
        let keys = vec!["sk-one".to_string(), "sk-two-longer".to_string()];
        assert!(key_matches(&keys, "sk-one"));
        assert!(key_matches(&keys, "sk-two-longer"));
        for wrong in ["", "sk-on", "sk-one ", "sk-onf", "sk-two-longe", "SK-ONE"] {
            assert!(!key_matches(&keys, wrong), "{wrong:?}");
        }
    }
}
