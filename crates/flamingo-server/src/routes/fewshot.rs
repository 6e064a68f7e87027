//! `POST /v1/score` and the demonstration-set routes (`/v1/demonstrations`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flamingo_engine::{Event, PreparedMedia, ValidRequest};
use serde::{Deserialize, Serialize};

use crate::api::{ChatMessage, ImageRef, MessageContent, UsageBody};
use crate::demos::{self, Deleted, DemoRef, RegisterRequest, SetList};
use crate::error::ApiError;
use crate::media::{self, MediaItem};
use crate::state::{AppState, Inflight, Runtime};
use crate::template::MediaRef;
use crate::validate::parse_json;

use super::generate::read_body;

/// `POST /v1/score`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub prompt: Option<String>,
    #[serde(default)]
    pub images: Vec<ImageRef>,
    pub demonstrations: Option<DemoRef>,
    pub candidates: Vec<String>,
    /// Chat form: score the reply's end-of-chunk token too.
    pub include_end: Option<bool>,
    /// Alternatives reported per candidate token.
    #[serde(default, deserialize_with = "crate::jsonint::opt_u64")]
    pub top_logprobs: Option<u64>,
    /// `logprob` (default) or `normalized_logprob`.
    pub rank_by: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ScoreBody {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub data: Vec<Scored>,
    pub ranking: Vec<usize>,
    pub usage: UsageBody,
}

#[derive(Debug, Serialize)]
pub struct Scored {
    pub index: usize,
    pub candidate: String,
    pub logprob: f64,
    pub normalized_logprob: f64,
    pub tokens: Vec<String>,
    pub token_ids: Vec<u32>,
    pub token_logprobs: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<serde_json::Map<String, serde_json::Value>>>,
}

/// The context every candidate follows (its token ids and media) and each candidate's tokens.
struct Scoring {
    context: Vec<u32>,
    media: Vec<PreparedMedia>,
    continuations: Vec<Vec<u32>>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

async fn raw_scoring(st: &AppState, rt: &Runtime, req: &ScoreRequest, prompt: &str) -> Result<Scoring, ApiError> {
    let (context, media) = match &req.demonstrations {
        Some(d) => demos::raw_prompt(st, rt, prompt, &req.images, d).await?,
        None => {
            let ids = rt.tokenizer.encode_prompt(prompt).map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))?;
            let slots = ids.iter().filter(|&&t| t == rt.tokenizer.media_token_id()).count();
            if slots != req.images.len() {
                return Err(ApiError::bad_request(format!(
                    "the prompt has {slots} <image> markers but {} images were given",
                    req.images.len()
                ))
                .param("images"));
            }
            let items = req
                .images
                .iter()
                .enumerate()
                .map(|(i, im)| MediaItem { source: MediaRef::Image(im.url().to_string()), param: format!("images[{i}]") })
                .collect();
            (ids, media::prepare(&st.fetcher, &rt.media, items).await?)
        }
    };
    // Each candidate on its own, without special tokens, after the prompt's ids (OpenFlamingo's
    // classification evaluation).
    let continuations = req
        .candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rt.tokenizer
                .encode_text(c)
                .map_err(|e| ApiError::bad_request(format!("cannot tokenize: {e}")).param(format!("candidates[{i}]")))
        })
        .collect::<Result<_, _>>()?;
    Ok(Scoring { context, media, continuations })
}

async fn chat_scoring(st: &AppState, rt: &Runtime, req: &ScoreRequest, messages: &[ChatMessage]) -> Result<Scoring, ApiError> {
    let (ids, media, all) = match &req.demonstrations {
        Some(d) => demos::chat_parts(st, rt, messages, d).await?,
        None => {
            let prompt = rt.template.apply(messages)?;
            let ids = rt
                .tokenizer
                .encode_segments(&prompt.segments())
                .map_err(|e| ApiError::bad_request(format!("cannot tokenize the messages: {e}")))?;
            let items = prompt.media.into_iter().zip(prompt.media_params).map(|(source, param)| MediaItem { source, param }).collect();
            (ids, media::prepare(&st.fetcher, &rt.media, items).await?, messages.to_vec())
        }
    };
    // Each candidate as the assistant reply the template writes for it.
    let mut fulls = Vec::with_capacity(req.candidates.len());
    for c in &req.candidates {
        let mut msgs = all.clone();
        msgs.push(ChatMessage { role: "assistant".into(), content: Some(MessageContent::Text(c.clone())) });
        let p = rt.template.apply(&msgs)?;
        fulls.push(rt.tokenizer.encode_segments(&p.segments()).map_err(|e| ApiError::bad_request(format!("cannot tokenize: {e}")))?);
    }
    // What every candidate's prompt shares with the request's (a tokenizer may merge across the
    // boundary; then the shared part is shorter and the rest is scored with the candidate).
    let ctx = fulls.iter().map(|f| common_prefix(&ids, f)).min().unwrap_or(0).max(1).min(ids.len());
    let stops = rt.stop_ids.clone();
    let include_end = req.include_end.unwrap_or(false);
    let continuations = fulls
        .into_iter()
        .map(|f| {
            let rest = f.get(ctx..).unwrap_or_default();
            // The reply ends at the template's end token (kept only with `include_end`).
            match rest.iter().position(|t| stops.contains(t)) {
                Some(end) => rest[..end + usize::from(include_end)].to_vec(),
                None => rest.to_vec(),
            }
        })
        .collect();
    Ok(Scoring { context: ids[..ctx].to_vec(), media, continuations })
}

pub(super) async fn score(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let _guard = Inflight::new(&st);
    let bytes = read_body(body, &headers, &st).await?;
    Ok(Json(score_in_process(&st, &bytes).await?).into_response())
}

/// A `/v1/score` body answered in process, exactly as the endpoint answers it (what `flamingo
/// eval` runs).
pub async fn score_in_process(st: &Arc<AppState>, bytes: &[u8]) -> Result<ScoreBody, ApiError> {
    let rt = st.runtime()?;
    let req: ScoreRequest = parse_json(bytes)?;
    if let Some(m) = req.model.as_deref() {
        if m != st.served_name {
            return Err(ApiError::model_not_found(m, &st.served_name));
        }
    }
    let l = &st.cfg.limits;
    if req.candidates.is_empty() || req.candidates.len() > l.max_candidates {
        return Err(ApiError::bad_request(format!("give between 1 and {} candidates", l.max_candidates)).param("candidates"));
    }
    if let Some(i) = req.candidates.iter().position(String::is_empty) {
        return Err(ApiError::bad_request("a candidate must not be empty").param(format!("candidates[{i}]")));
    }
    let top = req.top_logprobs.unwrap_or(0);
    if top > l.max_logprobs as u64 {
        return Err(ApiError::bad_request(format!("`top_logprobs` must be at most {}", l.max_logprobs)).param("top_logprobs"));
    }
    let by_mean = match req.rank_by.as_deref() {
        None | Some("logprob") => false,
        Some("normalized_logprob") => true,
        Some(_) => return Err(ApiError::bad_request("`rank_by` is `logprob` or `normalized_logprob`").param("rank_by")),
    };
    let s = match (&req.messages, &req.prompt) {
        (Some(_), None) if !req.images.is_empty() => {
            return Err(ApiError::bad_request("`images` belongs to the raw form (`prompt`): in the chat form the images are in `messages`")
                .param("images"))
        }
        (Some(m), None) => chat_scoring(st, rt, &req, m).await?,
        (None, Some(p)) if !p.is_empty() => raw_scoring(st, rt, &req, p).await?,
        (None, Some(_)) => return Err(ApiError::bad_request("`prompt` must not be empty").param("prompt")),
        _ => return Err(ApiError::bad_request("give either `messages` or `prompt`")),
    };
    if let Some(i) = s.continuations.iter().position(|c| c.is_empty()) {
        return Err(ApiError::bad_request("the candidate has no tokens to score").param(format!("candidates[{i}]")));
    }
    if let Some(i) = s.continuations.iter().position(|c| c.len() > l.max_tokens) {
        return Err(
            ApiError::bad_request(format!("a candidate may have at most {} tokens", l.max_tokens)).param(format!("candidates[{i}]"))
        );
    }
    let images = s.media.len();
    if images > l.max_images_per_request {
        return Err(ApiError::bad_request(format!("at most {} images per request are allowed (got {images})", l.max_images_per_request)));
    }
    if s.context.len() > l.max_prompt_tokens {
        return Err(ApiError::bad_request(format!(
            "the prompt is {} tokens long; at most {} are allowed",
            s.context.len(),
            l.max_prompt_tokens
        )));
    }
    let prompt_tokens = s.context.len();
    let vr = ValidRequest::score(s.context, s.media, s.continuations, top as usize, rt.engine.spec())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut events = rt.engine.submit(vr).map_err(|e| ApiError::from_engine(&e, st.retry_after()))?;
    let (scores, usage) = loop {
        match events.recv().await {
            Some(Event::Scored { scores, usage }) => break (scores, usage),
            Some(Event::Error(e)) => return Err(ApiError::from_engine(&e, st.retry_after())),
            Some(_) => {}
            None => return Err(st.unavailable("the engine stopped")),
        }
    };
    let mut data = Vec::with_capacity(scores.len());
    for (index, (cand, toks)) in req.candidates.iter().zip(scores).enumerate() {
        let lps: Vec<f64> = toks.iter().map(|t| f64::from(t.logprob.unwrap_or(f32::NEG_INFINITY))).collect();
        let sum: f64 = lps.iter().sum();
        let top_logprobs = (top > 0).then(|| {
            toks.iter()
                .map(|t| {
                    t.top_logprobs
                        .iter()
                        .map(|&(id, lp)| (rt.tokenizer.token_display(id).0, serde_json::Value::from(f64::from(lp))))
                        .collect()
                })
                .collect()
        });
        data.push(Scored {
            index,
            candidate: cand.clone(),
            logprob: sum,
            normalized_logprob: sum / lps.len().max(1) as f64,
            tokens: toks.iter().map(|t| rt.tokenizer.token_display(t.id).0).collect(),
            token_ids: toks.iter().map(|t| t.id).collect(),
            token_logprobs: lps,
            top_logprobs,
        });
    }
    let key = |d: &Scored| if by_mean { d.normalized_logprob } else { d.logprob };
    let mut ranking: Vec<usize> = (0..data.len()).collect();
    ranking.sort_by(|&a, &b| key(&data[b]).total_cmp(&key(&data[a])).then(a.cmp(&b)));
    let body = ScoreBody {
        id: crate::state::random_id("score-"),
        object: "score",
        created: crate::state::now_secs(),
        model: st.served_name.clone(),
        data,
        ranking,
        usage: UsageBody::new(prompt_tokens, 0, usage.cached_tokens),
    };
    metrics::histogram!(CANDIDATES).record(body.data.len() as f64);
    Ok(body)
}

/// Candidates per `/v1/score` request.
pub const CANDIDATES: &str = "flamingo_score_candidates";

pub(super) async fn create_set(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let _guard = Inflight::new(&st);
    let bytes = read_body(body, &headers, &st).await?;
    let (card, created) = register_in_process(&st, &bytes).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(card)).into_response())
}

/// A `/v1/demonstrations` registration in process: the set and whether it is new.
pub async fn register_in_process(st: &Arc<AppState>, bytes: &[u8]) -> Result<(demos::SetCard, bool), ApiError> {
    let rt = st.runtime()?;
    let req: RegisterRequest = parse_json(bytes)?;
    let (set, created) = st.demos.register(st, rt, req).await?;
    Ok((set.card(), created))
}

pub(super) async fn list_sets(State(st): State<Arc<AppState>>) -> Result<Json<SetList>, ApiError> {
    let rt = st.runtime()?;
    Ok(Json(SetList { object: "list", data: st.demos.list(&st, rt).await }))
}

pub(super) async fn get_set(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let rt = st.runtime()?;
    let set = st.demos.get(&st, rt, &id).await.map_err(|e| ApiError { param: Some("id".into()), ..e })?;
    Ok(Json(set.card()).into_response())
}

pub(super) async fn delete_set(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Deleted>, ApiError> {
    let rt = st.runtime()?;
    st.demos.delete(rt, &id).await?;
    Ok(Json(Deleted { id, object: "demonstration_set.deleted", deleted: true }))
}
