//! The HTTP server: routes, request handling on top of the engine, SSE streaming, auth, metrics,
//! request ids and graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flamingo_engine::{Engine, EngineError, Event, EventStream, SamplingParams, StopParams, ValidRequest};
use flamingo_model::generate::{FinishReason, Strategy};
use flamingo_model::preprocess::ImageLimits;
use flamingo_model::tokenizer::Segment;
use flamingo_model::FlamingoTokenizer;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use crate::api::{self, ApiError, ChatRequest, CompletionRequest, GenParams, PromptSpec, TokenLogprob, TopLogprob, UsageBody};
use crate::config::Config;
use crate::fetch::Fetcher;
use crate::media::{self, MediaItem, MediaSpec};
use crate::template::{self, MediaRef, Piece};
use crate::textstream::TextStream;

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// The tiny reference model embedded in the binary.
    Embedded,
    /// A model directory.
    Dir(PathBuf),
    /// A name from `config/models/`, downloaded to the HF cache.
    Hub(String),
}

impl ModelSource {
    /// `model.path` of the configuration: empty = embedded; an existing directory; else a name.
    pub fn from_config(path: &str) -> Self {
        if path.is_empty() {
            ModelSource::Embedded
        } else if std::path::Path::new(path).is_dir() {
            ModelSource::Dir(path.into())
        } else {
            ModelSource::Hub(path.into())
        }
    }

    /// The id clients use when none is configured.
    pub fn default_name(&self) -> String {
        match self {
            ModelSource::Embedded => crate::embedded::NAME.into(),
            ModelSource::Dir(d) => {
                let d = d.canonicalize().unwrap_or_else(|_| d.clone());
                d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "flamingo".into())
            }
            ModelSource::Hub(n) => n.clone(),
        }
    }
}

/// The loaded model as the handlers use it.
pub struct Runtime {
    engine: Engine,
    tokenizer: FlamingoTokenizer,
    media_token: u32,
    stop_ids: Vec<u32>,
    vocab: usize,
    kv_bytes_per_token: usize,
    media: Arc<MediaSpec>,
}

pub struct AppState {
    cfg: Config,
    served_name: String,
    runtime: OnceLock<Runtime>,
    shutting_down: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
    fetcher: Fetcher,
    prometheus: PrometheusHandle,
    started: u64,
}

/// Counts a request as in flight until dropped (held by handlers and by SSE tasks).
struct Inflight(Arc<AppState>);

impl Inflight {
    fn new(st: &Arc<AppState>) -> Self {
        st.inflight.fetch_add(1, Ordering::SeqCst);
        Self(st.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    format!("{prefix}{:016x}{:08x}", r.gen::<u64>(), r.gen::<u32>())
}

/// The process-wide Prometheus recorder (installed once; later servers in the same process share it).
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder is installed (then that one receives the metrics).
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

const HTTP_REQUESTS: &str = "flamingo_http_requests_total";
const HTTP_DURATION: &str = "flamingo_http_request_duration_seconds";

impl AppState {
    pub fn new(cfg: Config, served_name: String) -> anyhow::Result<Arc<Self>> {
        let fetcher = Fetcher::new(cfg.fetch.to_fetch_config()).map_err(|e| anyhow::anyhow!("[fetch] configuration: {e}"))?;
        let prometheus = prometheus();
        metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests by route, method and status");
        metrics::describe_histogram!(
            HTTP_DURATION,
            metrics::Unit::Seconds,
            "HTTP request latency by route (until the response head; streams continue)"
        );
        Ok(Arc::new(Self {
            cfg,
            served_name,
            runtime: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            fetcher,
            prometheus,
            started: now_secs(),
        }))
    }

    /// Loads the model (blocking: call from a blocking thread) and starts the engine.
    pub fn load(&self, source: &ModelSource) -> anyhow::Result<()> {
        use anyhow::Context;
        let dir = match source {
            ModelSource::Embedded => crate::embedded::materialize(&std::env::temp_dir()).context("writing the embedded model")?,
            ModelSource::Dir(d) => d.clone(),
            ModelSource::Hub(name) => {
                let opts = crate::hub::HubOptions::from_env();
                crate::hub::resolve(name, &opts).with_context(|| format!("getting model {name}"))?
            }
        };
        let device = flamingo_model::device::parse_device(&self.cfg.model.device)?;
        let dtype = flamingo_model::device::parse_dtype(&self.cfg.model.dtype)?;
        flamingo_model::device::check_supported(&device, dtype)?;
        tracing::info!(dir = %dir.display(), device = %self.cfg.model.device, dtype = %self.cfg.model.dtype, "loading model");
        let t = Instant::now();
        let loaded =
            flamingo_model::load(&dir, &device, dtype, &LogProgress).with_context(|| format!("loading model {}", dir.display()))?;
        let model = loaded.model;
        let tok = loaded.tokenizer;
        let (vocab, kv_bytes_per_token) = (model.vocab_size(), model.kv_bytes_per_token());
        let l = &self.cfg.limits;
        let media = Arc::new(MediaSpec {
            image_size: model.config().vision.image_size,
            max_frames: model.config().perceiver.max_num_frames,
            device: model.device().clone(),
            limits: ImageLimits { max_pixels: l.max_image_pixels, max_side: l.max_image_side },
            max_video_frames: l.max_video_frames,
        });
        let mut stop_ids = vec![tok.eoc_token_id()];
        stop_ids.extend(tok.eos_token_id());
        let engine = Engine::start(model, self.cfg.engine.to_engine_config(), Some(tok.media_token_id()));
        let rt = Runtime { media_token: tok.media_token_id(), vocab, kv_bytes_per_token, stop_ids, media, tokenizer: tok, engine };
        if self.runtime.set(rt).is_err() {
            anyhow::bail!("the model is already loaded");
        }
        tracing::info!(seconds = t.elapsed().as_secs_f64(), model = %self.served_name, "model ready");
        Ok(())
    }

    /// The engine's counters, once the model is loaded.
    pub fn engine_stats(&self) -> Option<&flamingo_engine::EngineStats> {
        self.runtime.get().map(|r| r.engine.stats())
    }

    fn runtime(&self) -> Result<&Runtime, ApiError> {
        let retry = self.cfg.server.retry_after_seconds;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down", retry));
        }
        self.runtime.get().ok_or_else(|| ApiError::unavailable("the model is still loading", retry))
    }
}

struct LogProgress;

impl flamingo_model::loader::LoadProgress for LogProgress {
    fn stage(&self, message: &str) {
        tracing::info!("{message}");
    }
}

/// The router with every route and middleware.
pub fn router(st: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model_one))
        .route_layer(middleware::from_fn_with_state(st.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(observe))
        .with_state(st)
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::method_not_allowed(format!("{} is not allowed on {}", req.method(), req.uri().path()))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

/// Request ids, access logs and HTTP metrics.
async fn observe(req: Request, next: Next) -> Response {
    let t = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        .map(String::from)
        .unwrap_or_else(|| random_id(""));
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

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
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

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let (code, status) = if st.shutting_down.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    } else if st.runtime.get().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    } else {
        (StatusCode::OK, "ok")
    };
    let mut r = (code, Json(json!({"status": status, "model": st.served_name}))).into_response();
    if code != StatusCode::OK {
        if let Ok(v) = HeaderValue::from_str(&st.cfg.server.retry_after_seconds.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.prometheus.render()).into_response()
}

fn model_card(st: &AppState) -> Value {
    json!({"id": st.served_name, "object": "model", "created": st.started, "owned_by": "flamingo"})
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [model_card(&st)]})).into_response()
}

async fn model_one(State(st): State<Arc<AppState>>, axum::extract::Path(id): axum::extract::Path<String>) -> Result<Response, ApiError> {
    if id != st.served_name {
        return Err(ApiError::model_not_found(&id, &st.served_name));
    }
    Ok(Json(model_card(&st)).into_response())
}

/// Reads the body under the configured limit (413 above it).
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
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

fn check_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != st.served_name => Err(ApiError::model_not_found(m, &st.served_name)),
        _ => Ok(()),
    }
}

/// Which endpoint a generation answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// A validated generation plan for one request (all its choices).
struct Plan {
    kind: Kind,
    choices: Vec<SamplingParams>,
    max_new: usize,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Top alternatives per token when log-probabilities were asked for.
    logprobs: Option<usize>,
    return_ids: bool,
}

fn plan(st: &AppState, kind: Kind, p: &GenParams, logprobs: Option<usize>) -> Result<Plan, ApiError> {
    let l = &st.cfg.limits;
    let bad = |m: String, param: &str| ApiError::bad_request(m).param(param);
    let max_new = match (p.max_completion_tokens, p.max_tokens) {
        (Some(v), _) => (v, "max_completion_tokens"),
        (None, Some(v)) => (v, "max_tokens"),
        (None, None) => (if kind == Kind::Chat { l.default_max_tokens as u64 } else { 16 }, "max_tokens"),
    };
    if max_new.0 == 0 || max_new.0 > l.max_tokens as u64 {
        return Err(bad(format!("`{}` must be between 1 and {}", max_new.1, l.max_tokens), max_new.1));
    }
    let n = p.n.unwrap_or(1);
    if n == 0 || n > l.max_n as u64 {
        return Err(bad(format!("`n` must be between 1 and {}", l.max_n), "n"));
    }
    let temperature = p.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad("`temperature` must be between 0 and 2".into(), "temperature"));
    }
    if let Some(tp) = p.top_p {
        if !(tp > 0.0 && tp <= 1.0) {
            return Err(bad("`top_p` must be in (0, 1]".into(), "top_p"));
        }
    }
    let top_k = match p.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(_) => return Err(bad("`top_k` must be positive (or 0 / -1 for no limit)".into(), "top_k")),
    };
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(bad("`repetition_penalty` must be a positive number".into(), "repetition_penalty"));
    }
    let num_beams = p.num_beams.unwrap_or(1);
    if num_beams == 0 || num_beams > l.max_beams as u64 {
        return Err(bad(format!("`num_beams` must be between 1 and {}", l.max_beams), "num_beams"));
    }
    let length_penalty = p.length_penalty.unwrap_or(1.0);
    if !length_penalty.is_finite() {
        return Err(bad("`length_penalty` must be a finite number".into(), "length_penalty"));
    }
    let stops = p.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > l.max_stop {
        return Err(bad(format!("at most {} stop sequences are allowed", l.max_stop), "stop"));
    }
    if stops.iter().any(String::is_empty) {
        return Err(bad("stop sequences must not be empty".into(), "stop"));
    }
    if let Some(k) = logprobs {
        if k > l.max_logprobs {
            let param = if kind == Kind::Chat { "top_logprobs" } else { "logprobs" };
            return Err(bad(format!("`{param}` must be at most {}", l.max_logprobs), param));
        }
    }
    let base_seed = p.seed.map(|s| s as u64).unwrap_or_else(rand::random);
    let strategy = |i: u64| -> Strategy {
        if num_beams > 1 {
            Strategy::Beam { num_beams: num_beams as usize, length_penalty: length_penalty as f32, early_stopping: false }
        } else if temperature > 0.0 {
            Strategy::Sample { temperature: temperature as f32, top_k, top_p: p.top_p.map(|v| v as f32), seed: base_seed.wrapping_add(i) }
        } else {
            Strategy::Greedy
        }
    };
    if num_beams > 1 {
        if temperature > 0.0 {
            return Err(bad("beam search (`num_beams` > 1) cannot be combined with sampling (`temperature` > 0)".into(), "num_beams"));
        }
        if n > 1 {
            return Err(bad("beam search returns one sequence: use `n` = 1 with `num_beams` > 1".into(), "n"));
        }
        if logprobs.is_some() {
            return Err(bad("log-probabilities are not available with beam search".into(), "num_beams"));
        }
    }
    let choices =
        (0..n).map(|i| SamplingParams { strategy: strategy(i), repetition_penalty: repetition_penalty as f32, logprobs }).collect();
    Ok(Plan {
        kind,
        choices,
        max_new: max_new.0 as usize,
        stops,
        stream: p.stream.unwrap_or(false),
        include_usage: p.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        logprobs,
        return_ids: p.return_token_ids.unwrap_or(false),
    })
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let guard = Inflight::new(&st);
    let rt = st.runtime()?;
    let bytes = read_body(body, &headers, st.cfg.limits.max_body_bytes).await?;
    let req: ChatRequest = api::parse_json(&bytes)?;
    let params: GenParams = api::parse_json(&bytes)?;
    check_model(&st, req.model.as_deref())?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, Some(k)) if k > 0 => return Err(ApiError::bad_request("`top_logprobs` needs `logprobs: true`").param("top_logprobs")),
        (false, _) => None,
    };
    let plan = plan(&st, Kind::Chat, &params, logprobs)?;
    let prompt = template::openflamingo(&req.messages)?;
    let segments: Vec<Segment> = prompt
        .pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => Segment::Text(t),
            Piece::Media => Segment::Media,
            Piece::EndOfChunk => Segment::EndOfChunk,
        })
        .collect();
    let ids = rt.tokenizer.encode_segments(&segments).map_err(|e| ApiError::bad_request(format!("cannot tokenize the messages: {e}")))?;
    let items = prompt.media.into_iter().zip(prompt.media_params).map(|(source, param)| MediaItem { source, param }).collect();
    generate(st.clone(), guard, ids, items, plan).await
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let guard = Inflight::new(&st);
    let rt = st.runtime()?;
    let bytes = read_body(body, &headers, st.cfg.limits.max_body_bytes).await?;
    let req: CompletionRequest = api::parse_json(&bytes)?;
    let params: GenParams = api::parse_json(&bytes)?;
    check_model(&st, req.model.as_deref())?;
    if req.echo.unwrap_or(false) {
        return Err(ApiError::bad_request("`echo` is not supported").param("echo"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("`suffix` is not supported").param("suffix"));
    }
    let prompt = match req.prompt {
        PromptSpec::One(p) => p,
        PromptSpec::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptSpec::Many(_) => return Err(ApiError::bad_request("send one prompt per request").param("prompt")),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_request("`prompt` must not be empty").param("prompt"));
    }
    let plan = plan(&st, Kind::Completion, &params, req.logprobs.map(|k| k as usize))?;
    // The exact-control path: special tokens in the prompt are special, as with `flamingo generate`.
    let ids = rt.tokenizer.encode_prompt(&prompt).map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))?;
    let slots = ids.iter().filter(|&&t| t == rt.media_token).count();
    if slots != req.images.len() {
        return Err(ApiError::bad_request(format!("the prompt has {slots} <image> markers but {} images were given", req.images.len()))
            .param("images"));
    }
    let items = req
        .images
        .iter()
        .enumerate()
        .map(|(i, im)| MediaItem { source: MediaRef::Image(im.url().to_string()), param: format!("images[{i}]") })
        .collect();
    generate(st.clone(), guard, ids, items, plan).await
}

/// Checks sizes, prepares media, submits every choice and answers (JSON or SSE).
async fn generate(st: Arc<AppState>, guard: Inflight, ids: Vec<u32>, items: Vec<MediaItem>, plan: Plan) -> Result<Response, ApiError> {
    let rt = st.runtime()?;
    let l = &st.cfg.limits;
    if items.len() > l.max_images_per_request {
        return Err(ApiError::bad_request(format!(
            "at most {} images per request are allowed (got {})",
            l.max_images_per_request,
            items.len()
        )));
    }
    if ids.len() > l.max_prompt_tokens {
        return Err(ApiError::bad_request(format!("the prompt is {} tokens long; at most {} are allowed", ids.len(), l.max_prompt_tokens)));
    }
    let need = (ids.len() + plan.max_new) * rt.kv_bytes_per_token;
    if need > st.cfg.engine.kv_cache_bytes {
        return Err(ApiError::bad_request(format!(
            "the prompt ({} tokens) plus max_tokens ({}) needs more KV-cache memory than this server has",
            ids.len(),
            plan.max_new
        )));
    }
    let media = media::prepare(&st.fetcher, &rt.media, items).await?;
    let mut streams = Vec::with_capacity(plan.choices.len());
    for sampling in &plan.choices {
        let req = ValidRequest::new(
            ids.clone(),
            media.clone(),
            sampling.clone(),
            StopParams { max_new_tokens: plan.max_new, stop_token_ids: rt.stop_ids.clone() },
            rt.media_token,
            rt.vocab,
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        streams.push(rt.engine.submit(req).map_err(|e| engine_error(&st, e))?);
    }
    drop(media);
    let meta = Meta {
        id: random_id(if plan.kind == Kind::Chat { "chatcmpl-" } else { "cmpl-" }),
        created: now_secs(),
        model: st.served_name.clone(),
        prompt_tokens: ids.len(),
    };
    if plan.stream {
        Ok(stream_response(st.clone(), guard, streams, plan, meta))
    } else {
        let mut outs = Vec::with_capacity(streams.len());
        for s in streams {
            outs.push(collect(rt, s, &plan).await?);
        }
        drop(guard);
        Ok(Json(final_body(rt, &plan, &meta, &outs)).into_response())
    }
}

fn engine_error(st: &AppState, e: EngineError) -> ApiError {
    let retry = st.cfg.server.retry_after_seconds;
    match e {
        EngineError::Overloaded(_) => ApiError::overloaded(format!("{e}; retry later"), retry),
        EngineError::Stopped => ApiError::unavailable("the server is shutting down", retry),
        EngineError::Invalid(m) => ApiError::bad_request(m),
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

/// One finished choice.
struct ChoiceOut {
    text: String,
    ids: Vec<u32>,
    finish: &'static str,
    cached_tokens: usize,
    logprobs: Vec<LogprobEntry>,
}

/// A generated token's log-probability and alternatives (ids resolved to text later).
#[derive(Clone)]
struct LogprobEntry {
    id: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Drives one choice to its end (non-streaming).
async fn collect(rt: &Runtime, mut rx: EventStream, plan: &Plan) -> Result<ChoiceOut, ApiError> {
    let mut ts = TextStream::new(&rt.tokenizer, plan.stops.clone());
    let mut text = String::new();
    let mut cached = 0;
    let mut lps = Vec::new();
    let internal = |e: flamingo_model::Error| ApiError::internal(format!("detokenization failed: {e}"));
    loop {
        match rx.recv().await {
            None => return Err(ApiError::unavailable("the engine stopped", 1)),
            Some(Event::Prefilled { cached_tokens }) => cached = cached_tokens,
            Some(Event::Token(t)) => {
                if let (Some(lp), false) = (t.logprob, rt.stop_ids.contains(&t.id)) {
                    lps.push(LogprobEntry { id: t.id, logprob: lp, top: t.top_logprobs.clone() });
                }
                let d = ts.push(t.id).map_err(internal)?;
                text.push_str(&d.text);
                if d.stop_hit {
                    // Dropping the stream cancels the sequence in the engine.
                    return Ok(ChoiceOut { text, ids: ts.ids().to_vec(), finish: "stop", cached_tokens: cached, logprobs: lps });
                }
            }
            Some(Event::Finished { reason, usage }) => {
                text.push_str(&ts.finish().map_err(internal)?);
                return Ok(ChoiceOut {
                    text,
                    ids: ts.ids().to_vec(),
                    finish: finish_str(reason),
                    cached_tokens: usage.cached_tokens,
                    logprobs: lps,
                });
            }
            Some(Event::Error(e)) => return Err(ApiError::internal(format!("generation failed: {e}"))),
        }
    }
}

fn token_text(tok: &FlamingoTokenizer, id: u32) -> String {
    tok.inner().decode(&[id], false).unwrap_or_default()
}

/// A token as logprobs show it: its text, or `bytes:\xNN...` when it is not whole UTF-8 (part
/// of a character), as OpenAI writes such tokens.
fn token_label(tok: &FlamingoTokenizer, id: u32) -> String {
    let text = token_text(tok, id);
    if !text.contains('\u{FFFD}') {
        return text;
    }
    let bytes = token_bytes(tok, id);
    match String::from_utf8(bytes.clone()) {
        Ok(t) => t,
        Err(_) => "bytes:".to_string() + &bytes.iter().map(|b| format!("\\x{b:02x}")).collect::<String>(),
    }
}

/// The inverse of GPT-2's byte-level alphabet (printable bytes map to themselves, the other 68
/// bytes to U+0100.. in order).
fn byte_level_inverse(c: char) -> Option<u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let cp = c as u32;
    if cp < 256 && printable(cp as u8) {
        return Some(cp as u8);
    }
    let k = cp.checked_sub(256)? as usize;
    (0u8..=255).filter(|&b| !printable(b)).nth(k)
}

/// A token's raw bytes (a byte-level or byte-fallback token may be part of a UTF-8 character).
fn token_bytes(tok: &FlamingoTokenizer, id: u32) -> Vec<u8> {
    let text = token_text(tok, id);
    if !text.contains('\u{FFFD}') {
        return text.into_bytes();
    }
    let Some(piece) = tok.id_to_token(id) else { return text.into_bytes() };
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    piece.chars().map(byte_level_inverse).collect::<Option<Vec<u8>>>().unwrap_or_else(|| text.into_bytes())
}

fn chat_logprobs(tok: &FlamingoTokenizer, entries: &[LogprobEntry]) -> Vec<TokenLogprob> {
    entries
        .iter()
        .map(|e| {
            let token = token_label(tok, e.id);
            TokenLogprob {
                bytes: token_bytes(tok, e.id),
                token,
                logprob: e.logprob,
                top_logprobs: e
                    .top
                    .iter()
                    .map(|&(id, lp)| {
                        let token = token_label(tok, id);
                        TopLogprob { bytes: token_bytes(tok, id), token, logprob: lp }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The legacy completions `logprobs` object for `entries`, with text offsets from `offset`.
fn completion_logprobs(tok: &FlamingoTokenizer, entries: &[LogprobEntry], offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    let mut at = offset;
    for e in entries {
        offsets.push(at);
        at += token_bytes(tok, e.id).len();
        tokens.push(token_label(tok, e.id));
        lps.push(e.logprob);
        let top: serde_json::Map<String, Value> = e.top.iter().map(|&(id, lp)| (token_label(tok, id), json!(lp))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

fn usage_of(meta: &Meta, outs: &[ChoiceOut]) -> UsageBody {
    let completion = outs.iter().map(|o| o.ids.len()).sum();
    UsageBody::new(meta.prompt_tokens, completion, outs.first().map(|o| o.cached_tokens).unwrap_or(0))
}

fn final_body(rt: &Runtime, plan: &Plan, meta: &Meta, outs: &[ChoiceOut]) -> Value {
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let mut c = match plan.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": o.text},
                    "logprobs": plan.logprobs.map(|_| json!({"content": chat_logprobs(&rt.tokenizer, &o.logprobs)})),
                    "finish_reason": o.finish,
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": o.text,
                    "logprobs": plan.logprobs.map(|_| completion_logprobs(&rt.tokenizer, &o.logprobs, 0)),
                    "finish_reason": o.finish,
                }),
            };
            if plan.return_ids {
                c["token_ids"] = json!(o.ids);
            }
            c
        })
        .collect();
    let object = if plan.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": choices,
        "usage": usage_of(meta, outs),
    })
}

/// Streams every choice as SSE chunks; a task owns the engine streams and stops (cancelling
/// them) when the client goes away.
fn stream_response(st: Arc<AppState>, guard: Inflight, streams: Vec<EventStream>, plan: Plan, meta: Meta) -> Response {
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let _guard = guard;
        let closed = tx.clone();
        tokio::select! {
            _ = drive_stream(&st, streams, &plan, &meta, &tx) => {}
            _ = closed.closed() => tracing::info!("client disconnected; generation cancelled"),
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// Per-choice state of a stream.
struct StreamChoice<'a> {
    rx: Option<EventStream>,
    text: TextStream<'a>,
    cached: usize,
    /// Bytes of text sent (completions' `text_offset`).
    sent: usize,
}

async fn drive_stream(st: &AppState, streams: Vec<EventStream>, plan: &Plan, meta: &Meta, tx: &mpsc::Sender<SseEvent>) {
    let Some(rt) = st.runtime.get() else { return };
    let object = if plan.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = |choices: Value, usage: Option<Value>| -> SseEvent {
        let mut v = json!({
            "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
            "system_fingerprint": null, "choices": choices,
        });
        if plan.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        SseEvent::default().data(v.to_string())
    };
    macro_rules! send {
        ($e:expr) => {
            if tx.send($e).await.is_err() {
                return; // the client left: dropping the streams cancels the sequences
            }
        };
    }
    if plan.kind == Kind::Chat {
        for i in 0..streams.len() {
            send!(chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                None
            ));
        }
    }
    let mut ch: Vec<StreamChoice> = streams
        .into_iter()
        .map(|rx| StreamChoice { rx: Some(rx), text: TextStream::new(&rt.tokenizer, plan.stops.clone()), cached: 0, sent: 0 })
        .collect();
    let finish_chunk = |i: usize, reason: &str| match plan.kind {
        Kind::Chat => json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": reason}]),
        Kind::Completion => json!([{"index": i, "text": "", "logprobs": null, "finish_reason": reason}]),
    };
    let mut completion_tokens = 0;
    loop {
        let next = futures::future::poll_fn(|cx| {
            let mut any = false;
            for (i, c) in ch.iter_mut().enumerate() {
                if let Some(rx) = c.rx.as_mut() {
                    any = true;
                    if let std::task::Poll::Ready(e) = rx.poll_recv(cx) {
                        return std::task::Poll::Ready(Some((i, e)));
                    }
                }
            }
            if any {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(None)
            }
        })
        .await;
        let Some((i, ev)) = next else { break };
        match ev {
            None => {
                ch[i].rx = None;
                send!(SseEvent::default().data(ApiError::unavailable("the engine stopped", 1).body().to_string()));
                return;
            }
            Some(Event::Prefilled { cached_tokens }) => ch[i].cached = cached_tokens,
            Some(Event::Token(t)) => {
                completion_tokens += 1;
                let lp: Vec<LogprobEntry> = match t.logprob {
                    Some(l) if !rt.stop_ids.contains(&t.id) => vec![LogprobEntry { id: t.id, logprob: l, top: t.top_logprobs.clone() }],
                    _ => vec![],
                };
                let d = match ch[i].text.push(t.id) {
                    Ok(d) => d,
                    Err(e) => {
                        send!(SseEvent::default().data(ApiError::internal(format!("detokenization failed: {e}")).body().to_string()));
                        return;
                    }
                };
                if !d.text.is_empty() || !lp.is_empty() {
                    let choices = match plan.kind {
                        Kind::Chat => json!([{
                            "index": i, "delta": {"content": d.text},
                            "logprobs": plan.logprobs.map(|_| json!({"content": chat_logprobs(&rt.tokenizer, &lp)})),
                            "finish_reason": null,
                        }]),
                        Kind::Completion => json!([{
                            "index": i, "text": d.text,
                            "logprobs": plan.logprobs.map(|_| completion_logprobs(&rt.tokenizer, &lp, ch[i].sent)),
                            "finish_reason": null,
                        }]),
                    };
                    ch[i].sent += d.text.len();
                    send!(chunk(choices, None));
                }
                if d.stop_hit {
                    ch[i].rx = None; // cancels the sequence
                    send!(chunk(finish_chunk(i, "stop"), None));
                }
            }
            Some(Event::Finished { reason, usage }) => {
                ch[i].rx = None;
                ch[i].cached = usage.cached_tokens;
                let rest = ch[i].text.finish().unwrap_or_default();
                if !rest.is_empty() {
                    let choices = match plan.kind {
                        Kind::Chat => json!([{"index": i, "delta": {"content": rest}, "logprobs": null, "finish_reason": null}]),
                        Kind::Completion => json!([{"index": i, "text": rest, "logprobs": null, "finish_reason": null}]),
                    };
                    send!(chunk(choices, None));
                }
                send!(chunk(finish_chunk(i, finish_str(reason)), None));
            }
            Some(Event::Error(e)) => {
                send!(SseEvent::default().data(ApiError::internal(format!("generation failed: {e}")).body().to_string()));
                return;
            }
        }
    }
    if plan.include_usage {
        let usage = UsageBody::new(meta.prompt_tokens, completion_tokens, ch.first().map(|c| c.cached).unwrap_or(0));
        send!(chunk(json!([]), Some(json!(usage))));
    }
    send!(SseEvent::default().data("[DONE]"));
}

pub use self::run::{serve, ServerHandle};

mod run {
    use super::*;

    /// A running server (tests start one in-process on a real port).
    pub struct ServerHandle {
        pub addr: SocketAddr,
        pub state: Arc<AppState>,
        shutdown: Arc<Notify>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl ServerHandle {
        /// Waits until the server stops (after a signal, or when the model fails to load).
        pub async fn wait(self) -> anyhow::Result<()> {
            self.task.await?
        }

        /// Starts graceful shutdown (as SIGTERM does) and waits for the server to stop.
        pub async fn shutdown(self) -> anyhow::Result<()> {
            self.shutdown.notify_one();
            self.task.await?
        }
    }

    /// Binds, starts loading the model in the background (/health says 503 until it is ready)
    /// and serves until `shutdown` or a signal.
    pub async fn serve(cfg: Config, source: ModelSource, handle_signals: bool) -> anyhow::Result<ServerHandle> {
        let served = if cfg.server.served_model_name.is_empty() { source.default_name() } else { cfg.server.served_model_name.clone() };
        let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr()?;
        let st = AppState::new(cfg, served)?;
        tracing::info!(%addr, model = %st.served_name, "listening");
        let shutdown = Arc::new(Notify::new());
        let loader_state = st.clone();
        let load_failed = Arc::new(Notify::new());
        let failed = load_failed.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = loader_state.load(&source) {
                tracing::error!("{e:#}");
                failed.notify_one();
            }
        });
        let app = router(st.clone());
        let handle_state = st.clone();
        let signal = shutdown.clone();
        let drain_state = st.clone();
        let task = tokio::spawn(async move {
            let stop = async move {
                let reason = tokio::select! {
                    _ = signal.notified() => "shutdown requested",
                    _ = wait_for_signal(handle_signals) => "signal received",
                    _ = load_failed.notified() => "model failed to load",
                };
                drain(&drain_state, reason).await;
            };
            axum::serve(listener, app).with_graceful_shutdown(stop).await?;
            if drain_state_failed(&st) {
                anyhow::bail!("the model failed to load");
            }
            Ok(())
        });
        Ok(ServerHandle { addr, state: handle_state, shutdown, task })
    }

    fn drain_state_failed(st: &AppState) -> bool {
        st.runtime.get().is_none()
    }

    /// New requests get 503 from now on; wait for in-flight ones (up to the grace period).
    async fn drain(st: &AppState, reason: &str) {
        st.shutting_down.store(true, Ordering::SeqCst);
        let grace = Duration::from_secs(st.cfg.server.shutdown_grace_seconds);
        tracing::info!(reason, inflight = st.inflight.load(Ordering::SeqCst), "shutting down: draining in-flight requests");
        let wait = async {
            while st.inflight.load(Ordering::SeqCst) > 0 {
                let n = st.idle.notified();
                if st.inflight.load(Ordering::SeqCst) == 0 {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), n).await;
            }
        };
        if tokio::time::timeout(grace, wait).await.is_err() {
            tracing::warn!(inflight = st.inflight.load(Ordering::SeqCst), "grace period over; stopping with requests in flight");
        }
    }

    async fn wait_for_signal(enabled: bool) {
        if !enabled {
            return std::future::pending().await;
        }
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_level_alphabet_inverts() {
        assert_eq!(super::byte_level_inverse('A'), Some(b'A'));
        assert_eq!(super::byte_level_inverse('\u{0120}'), Some(b' ')); // 'Ġ'
        assert_eq!(super::byte_level_inverse('\u{010A}'), Some(b'\n')); // 'Ċ'
        assert_eq!(super::byte_level_inverse('\u{0100}'), Some(0));
        assert_eq!(super::byte_level_inverse('\u{0143}'), Some(0xAD));
        assert_eq!(super::byte_level_inverse('\u{0144}'), None);
    }
}
