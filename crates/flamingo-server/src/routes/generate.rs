//! `POST /v1/chat/completions` and `POST /v1/completions`: read the body, validate, fetch the
//! media, submit every choice to the engine, answer whole or as a stream.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;

use flamingo_engine::EventStream;

use crate::api::{ChatChoice, CompletionBody};
use crate::error::ApiError;
use crate::media;
use crate::respond::{self, Chat, Completion, Endpoint, Meta};
use crate::state::{AppState, Inflight, Runtime};
use crate::validate::{self, Generation, Plan};

pub(super) async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    generate::<Chat>(st, headers, body, Which::Chat).await
}

pub(super) async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    generate::<Completion>(st, headers, body, Which::Completion).await
}

/// Which endpoint's body is validated.
#[derive(Clone, Copy)]
enum Which {
    Chat,
    Completion,
}

/// Reads the body under the configured limit (413 above it) within the client timeout (408).
pub(super) async fn read_body(body: Body, headers: &HeaderMap, st: &AppState) -> Result<axum::body::Bytes, ApiError> {
    let limit = st.cfg.limits.max_body_bytes;
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    // A body trickled in slowly holds its request no longer than the client timeout.
    let timeout = std::time::Duration::from_secs(st.cfg.server.client_timeout_seconds);
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::request_timeout(format!("the request body did not arrive within {} s", timeout.as_secs())))?;
    read.map_err(|e| {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if s.to_string().contains("length limit exceeded") {
                return ApiError::too_large(limit);
            }
            src = s.source();
        }
        ApiError::bad_request(format!("cannot read the request body: {e}"))
    })
}

/// Every choice of a validated request, submitted.
struct Submitted {
    streams: Vec<EventStream>,
    plan: Plan,
    prompt_tokens: usize,
    echo: Option<respond::Echo>,
}

/// Validates the body, prepares the media and submits every choice to the engine.
async fn submit(st: &AppState, rt: &Runtime, bytes: &[u8], which: Which) -> Result<Submitted, ApiError> {
    let g = match which {
        Which::Chat => validate::chat_with_demonstrations(st, rt, bytes).await?,
        Which::Completion => validate::completion_with_demonstrations(st, rt, bytes).await?,
    };
    let Generation { prompt, prepared, media, plan, echo } = g;
    let mut all = prepared;
    all.extend(media::prepare(&st.fetcher, &rt.media, media).await?);
    let media = all;
    let echo = match echo {
        Some(text) => {
            // The prompt's tokens after the first, scored after it (all its images attached).
            let scores = match (plan.logprobs, prompt.split_first()) {
                (Some(k), Some((first, rest))) if !rest.is_empty() => {
                    let req = flamingo_engine::ValidRequest::score(vec![*first], media.clone(), vec![rest.to_vec()], k, rt.engine.spec())
                        .map_err(|e| ApiError::bad_request(e.to_string()))?;
                    Some(rt.engine.submit(req).map_err(|e| ApiError::from_engine(&e, st.retry_after()))?)
                }
                _ => None,
            };
            Some(respond::Echo { text, prompt: prompt.clone(), scores })
        }
        None => None,
    };
    if plan.max_new == 0 {
        return Ok(Submitted { streams: Vec::new(), plan, prompt_tokens: prompt.len(), echo });
    }
    let mut streams = Vec::with_capacity(plan.choices.len());
    for req in validate::requests(&prompt, media, &plan, &rt.stop_ids, rt.engine.spec())? {
        streams.push(rt.engine.submit(req).map_err(|e| ApiError::from_engine(&e, st.retry_after()))?);
    }
    Ok(Submitted { streams, plan, prompt_tokens: prompt.len(), echo })
}

/// Reads and validates the body, prepares the media, submits every choice and answers (JSON
/// or SSE).
async fn generate<E: Endpoint>(st: Arc<AppState>, headers: HeaderMap, body: Body, which: Which) -> Result<Response, ApiError> {
    let guard = Inflight::new(&st);
    let rt = st.runtime()?;
    let bytes = read_body(body, &headers, &st).await?;
    let Submitted { streams, plan, prompt_tokens, echo } = submit(&st, rt, &bytes, which).await?;
    if let Some(echo) = echo {
        let meta = Meta::new::<Completion>(&st.served_name, prompt_tokens);
        let body = respond::echo(rt, streams, &plan, meta, echo, st.retry_after()).await?;
        drop(guard);
        return Ok(Json(body).into_response());
    }
    let meta = Meta::new::<E>(&st.served_name, prompt_tokens);
    if plan.stream {
        return Ok(crate::stream::respond::<E>(st.clone(), guard, streams, plan, meta));
    }
    let body = respond::whole::<E>(rt, streams, &plan, meta, st.retry_after()).await?;
    drop(guard);
    Ok(Json(body).into_response())
}

/// A `/v1/chat/completions` body answered in process, exactly as the endpoint answers it
/// without streaming (the same validation, template, media preparation, engine and response;
/// no HTTP, no middleware): what `flamingo eval` runs. A body asking for a stream gets the
/// whole response.
pub async fn chat_in_process(st: &Arc<AppState>, body: &[u8]) -> Result<CompletionBody<ChatChoice>, ApiError> {
    let guard = Inflight::new(st);
    let rt = st.runtime()?;
    if body.len() > st.cfg.limits.max_body_bytes {
        return Err(ApiError::too_large(st.cfg.limits.max_body_bytes));
    }
    let Submitted { streams, plan, prompt_tokens, .. } = submit(st, rt, body, Which::Chat).await?;
    let meta = Meta::new::<Chat>(&st.served_name, prompt_tokens);
    let out = respond::whole::<Chat>(rt, streams, &plan, meta, st.retry_after()).await;
    drop(guard);
    out
}
