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
        Some(k) if keys.iter().any(|key| constant_time_eq(key.as_bytes(), k.as_bytes())) => next.run(req).await,
        Some(_) => ApiError::unauthorized("invalid API key").into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
