//! HTTP requests -> what the engine runs: the one place a request body is parsed, checked
//! against the server's limits and the model, tokenized, and turned into the engine's
//! validated requests. `flamingo generate` checks its flags through the same [`plan`].

use flamingo_engine::{ModelSpec, PreparedMedia, SamplingParams, StopParams, ValidRequest, MAX_BEAMS};
use flamingo_model::sampling::Strategy;
use flamingo_model::FlamingoTokenizer;

use crate::api::{ChatRequest, CompletionRequest, GenParams, PromptSpec};
use crate::config::Limits;
use crate::error::ApiError;
use crate::media::MediaItem;
use crate::state::{AppState, Runtime};
use crate::template::{ChatTemplate, MediaRef};

/// Parses a JSON body, naming the offending field in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let syntax = inner.is_syntax() || inner.is_eof();
        let msg = if syntax {
            format!("the body is not valid JSON: {inner}")
        } else if path == "." {
            format!("invalid request: {inner}")
        } else {
            format!("invalid value for `{path}`: {inner}")
        };
        let err = ApiError::bad_request(msg);
        if syntax || path == "." || path == "?" || path.is_empty() {
            err
        } else {
            err.param(path)
        }
    })
}

/// The two generation endpoints: their defaults and parameter names differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// What a generation's parameters are checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    pub max_tokens: usize,
    /// `max_tokens` of a chat request that gives none (completions: 16, as OpenAI's).
    pub default_chat_tokens: usize,
    pub max_n: usize,
    pub max_beams: usize,
    pub max_stop: usize,
    pub max_logprobs: usize,
    pub max_temperature: f64,
}

impl Bounds {
    /// The server's configured limits (and OpenAI's temperature range).
    pub fn of(l: &Limits) -> Self {
        Self {
            max_tokens: l.max_tokens,
            default_chat_tokens: l.default_max_tokens,
            max_n: l.max_n,
            max_beams: l.max_beams,
            max_stop: l.max_stop,
            max_logprobs: l.max_logprobs,
            max_temperature: 2.0,
        }
    }

    /// `flamingo generate`: only the engine's own limits.
    pub fn cli() -> Self {
        Self {
            max_tokens: usize::MAX,
            default_chat_tokens: 20,
            max_n: 1,
            max_beams: MAX_BEAMS,
            max_stop: usize::MAX,
            max_logprobs: 0,
            max_temperature: f64::INFINITY,
        }
    }
}

/// A validated generation plan for one request (all its choices).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Each choice's sampling (choice `i` samples with seed + `i`).
    pub choices: Vec<SamplingParams>,
    pub max_new: usize,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Top alternatives per token when log-probabilities were asked for.
    pub logprobs: Option<usize>,
    pub return_ids: bool,
    /// New tokens before the end tokens may end a choice (and stop strings apply).
    pub min_new: usize,
    /// The end tokens do not end a choice.
    pub ignore_eos: bool,
}

fn bad(message: String, param: &str) -> ApiError {
    ApiError::bad_request(message).param(param)
}

/// `max_completion_tokens`, else `max_tokens`, else the endpoint's default.
fn max_new_tokens(p: &GenParams, kind: Kind, b: &Bounds) -> Result<usize, ApiError> {
    let (v, param) = match (p.max_completion_tokens, p.max_tokens) {
        (Some(v), _) => (v, "max_completion_tokens"),
        (None, Some(v)) => (v, "max_tokens"),
        (None, None) => (if kind == Kind::Chat { b.default_chat_tokens as u64 } else { 16 }, "max_tokens"),
    };
    match usize::try_from(v) {
        Ok(n) if n >= 1 && n <= b.max_tokens => Ok(n),
        _ if b.max_tokens == usize::MAX => Err(bad(format!("`{param}` must be at least 1"), param)),
        _ => Err(bad(format!("`{param}` must be between 1 and {}", b.max_tokens), param)),
    }
}

/// The sampling fields of a request, each checked on its own.
struct Sampling {
    temperature: f64,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repetition_penalty: f64,
    num_beams: u64,
    length_penalty: f64,
    seed: Option<i64>,
}

impl Sampling {
    fn parse(p: &GenParams, b: &Bounds) -> Result<Self, ApiError> {
        let temperature = p.temperature.unwrap_or(0.0);
        if !(0.0..=b.max_temperature).contains(&temperature) {
            return Err(bad(format!("`temperature` must be between 0 and {}", b.max_temperature), "temperature"));
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
        // Both penalties are applied in f32 (as the reference's float32 logits): a value outside
        // f32's normal range would become 0 or infinite there.
        if !(repetition_penalty >= f64::from(f32::MIN_POSITIVE) && repetition_penalty <= f64::from(f32::MAX)) {
            return Err(bad("`repetition_penalty` must be a positive number from 1.2e-38 to 3.4e38".into(), "repetition_penalty"));
        }
        let num_beams = p.num_beams.unwrap_or(1);
        if num_beams == 0 || num_beams > b.max_beams as u64 {
            return Err(bad(format!("`num_beams` must be between 1 and {}", b.max_beams), "num_beams"));
        }
        let length_penalty = p.length_penalty.unwrap_or(1.0);
        if length_penalty.is_nan() || length_penalty.abs() > f64::from(f32::MAX) {
            return Err(bad("`length_penalty` must be a finite number of at most 3.4e38 in size".into(), "length_penalty"));
        }
        Ok(Self { temperature, top_p: p.top_p, top_k, repetition_penalty, num_beams, length_penalty, seed: p.seed })
    }

    /// Every choice's settings: one beam search, or `n` seeded samplers (seed + `i`), or `n`
    /// greedy choices.
    fn choices(&self, n: u64, logprobs: Option<usize>) -> Result<Vec<SamplingParams>, ApiError> {
        let strategies = if self.num_beams > 1 {
            if self.temperature > 0.0 {
                return Err(bad("beam search (`num_beams` > 1) cannot be combined with sampling (`temperature` > 0)".into(), "num_beams"));
            }
            if n > 1 {
                return Err(bad("beam search returns one sequence: use `n` = 1 with `num_beams` > 1".into(), "n"));
            }
            if logprobs.is_some() {
                return Err(bad("log-probabilities are not available with beam search".into(), "num_beams"));
            }
            vec![Strategy::Beam { num_beams: self.num_beams as usize, length_penalty: self.length_penalty as f32, early_stopping: false }]
        } else if self.temperature as f32 > 0.0 {
            // (A temperature below f32's smallest value is 0 there: greedy, the limit it tends to.)
            let seed = self.seed.map(|s| s as u64).unwrap_or_else(rand::random);
            // A `top_p` below f32's smallest normal keeps the most likely token only, as it would.
            let top_p = self.top_p.map(|v| (v as f32).max(f32::MIN_POSITIVE));
            let (temperature, top_k) = (self.temperature as f32, self.top_k);
            (0..n).map(|i| Strategy::Sample { temperature, top_k, top_p, seed: seed.wrapping_add(i) }).collect()
        } else {
            (0..n).map(|_| Strategy::Greedy).collect()
        };
        let repetition_penalty = self.repetition_penalty as f32;
        Ok(strategies.into_iter().map(|strategy| SamplingParams { strategy, repetition_penalty, logprobs }).collect())
    }
}

/// Checks the sampling and stopping fields and turns them into every choice's settings.
/// `logprobs`: the top alternatives asked for per token, if any.
pub fn plan(p: &GenParams, kind: Kind, logprobs: Option<usize>, b: &Bounds) -> Result<Plan, ApiError> {
    let max_new = max_new_tokens(p, kind, b)?;
    let n = p.n.unwrap_or(1);
    if n == 0 || n > b.max_n as u64 {
        return Err(bad(format!("`n` must be between 1 and {}", b.max_n), "n"));
    }
    let sampling = Sampling::parse(p, b)?;
    let min_new = match p.min_tokens {
        None => 0,
        Some(m) if m as usize <= max_new => m as usize,
        Some(_) => return Err(bad(format!("`min_tokens` must be at most `max_tokens` ({max_new})"), "min_tokens")),
    };
    if min_new > 0 && sampling.num_beams > 1 {
        return Err(bad("`min_tokens` is not available with beam search".into(), "min_tokens"));
    }
    let stops = p.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > b.max_stop {
        return Err(bad(format!("at most {} stop sequences are allowed", b.max_stop), "stop"));
    }
    if stops.iter().any(String::is_empty) {
        return Err(bad("stop sequences must not be empty".into(), "stop"));
    }
    if let Some(k) = logprobs {
        if k > b.max_logprobs {
            let param = if kind == Kind::Chat { "top_logprobs" } else { "logprobs" };
            return Err(bad(format!("`{param}` must be at most {}", b.max_logprobs), param));
        }
    }
    Ok(Plan {
        choices: sampling.choices(n, logprobs)?,
        max_new,
        stops,
        stream: p.stream.unwrap_or(false),
        include_usage: p.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        logprobs,
        return_ids: p.return_token_ids.unwrap_or(false),
        min_new,
        ignore_eos: p.ignore_eos.unwrap_or(false),
    })
}

/// A request checked and tokenized; its media are fetched next.
pub struct Generation {
    pub prompt: Vec<u32>,
    /// Media already prepared (a demonstration set's, and the query's when they were needed
    /// to select examples): the prompt's first ones.
    pub prepared: Vec<PreparedMedia>,
    /// The prompt's other media, fetched next.
    pub media: Vec<MediaItem>,
    pub plan: Plan,
    /// Completions with `echo`: the prompt as given, returned before each choice's text (with
    /// its tokens' log-probabilities when `logprobs` is set).
    pub echo: Option<String>,
}

fn check_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != st.served_name => Err(ApiError::model_not_found(m, &st.served_name)),
        _ => Ok(()),
    }
}

/// `POST /v1/chat/completions`: the messages through the chat template (text is literal, images
/// are `<image>` slots).
pub fn chat(st: &AppState, rt: &Runtime, body: &[u8]) -> Result<Generation, ApiError> {
    chat_parsed(st, rt, &parse_json(body)?, &parse_json(body)?)
}

fn chat_parsed(st: &AppState, rt: &Runtime, req: &ChatRequest, params: &GenParams) -> Result<Generation, ApiError> {
    check_model(st, req.model.as_deref())?;
    let g = chat_generation(req, params, &Bounds::of(&st.cfg.limits), rt.template, &rt.tokenizer)?;
    checked(st, rt, g)
}

/// The checks of a chat request that need no engine: its generation plan, the messages
/// through `template`, the prompt tokenized, its media listed. Every error is the client's (a
/// 4xx); the fuzz target `request` holds it to that.
pub fn chat_generation(
    req: &ChatRequest,
    params: &GenParams,
    bounds: &Bounds,
    template: ChatTemplate,
    tokenizer: &FlamingoTokenizer,
) -> Result<Generation, ApiError> {
    let plan = plan(params, Kind::Chat, chat_logprobs(req)?, bounds)?;
    let prompt = template.apply(&req.messages)?;
    let ids =
        tokenizer.encode_segments(&prompt.segments()).map_err(|e| ApiError::bad_request(format!("cannot tokenize the messages: {e}")))?;
    let media = prompt.media.into_iter().zip(prompt.media_params).map(|(source, param)| MediaItem { source, param }).collect();
    Ok(Generation { prompt: ids, prepared: Vec::new(), media, plan, echo: None })
}

/// The chat request's `logprobs` / `top_logprobs` as the alternatives per token asked for.
fn chat_logprobs(req: &ChatRequest) -> Result<Option<usize>, ApiError> {
    match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, k) => Ok(Some(k.unwrap_or(0) as usize)),
        (false, Some(k)) if k > 0 => Err(ApiError::bad_request("`top_logprobs` needs `logprobs: true`").param("top_logprobs")),
        (false, _) => Ok(None),
    }
}

/// `POST /v1/chat/completions` with `demonstrations`: the set's (selected) examples' messages
/// in front of the request's, every media item prepared.
pub async fn chat_with_demonstrations(st: &AppState, rt: &Runtime, body: &[u8]) -> Result<Generation, ApiError> {
    let req: ChatRequest = parse_json(body)?;
    let params: GenParams = parse_json(body)?;
    let Some(d) = &req.demonstrations else { return chat_parsed(st, rt, &req, &params) };
    check_model(st, req.model.as_deref())?;
    let plan = plan(&params, Kind::Chat, chat_logprobs(&req)?, &Bounds::of(&st.cfg.limits))?;
    let (ids, prepared) = crate::demos::chat_prompt(st, rt, &req.messages, d).await?;
    checked(st, rt, Generation { prompt: ids, prepared, media: Vec::new(), plan, echo: None })
}

/// `POST /v1/completions` with `demonstrations`: the raw set's (selected) example prompts in
/// front of the request's prompt.
pub async fn completion_with_demonstrations(st: &AppState, rt: &Runtime, body: &[u8]) -> Result<Generation, ApiError> {
    let req: CompletionRequest = parse_json(body)?;
    let params: GenParams = parse_json(body)?;
    let Some(d) = req.demonstrations.clone() else { return completion_parsed(st, rt, &req, params) };
    let mut g = completion_parsed(st, rt, &req, params)?;
    let prompt = single_prompt(req.prompt)?;
    let (ids, prepared) = crate::demos::raw_prompt(st, rt, &prompt, &req.images, &d).await?;
    g.prompt = ids;
    g.prepared = prepared;
    g.media = Vec::new();
    checked(st, rt, g)
}

fn single_prompt(p: PromptSpec) -> Result<String, ApiError> {
    let prompt = match p {
        PromptSpec::One(p) => p,
        PromptSpec::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptSpec::Many(_) => return Err(ApiError::bad_request("send one prompt per request").param("prompt")),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_request("`prompt` must not be empty").param("prompt"));
    }
    Ok(prompt)
}

/// `POST /v1/completions`: the exact-control path, a raw prompt whose special tokens are
/// special (as with `flamingo generate`) and one image per `<image>`.
pub fn completion(st: &AppState, rt: &Runtime, body: &[u8]) -> Result<Generation, ApiError> {
    completion_parsed(st, rt, &parse_json(body)?, parse_json(body)?)
}

fn completion_parsed(st: &AppState, rt: &Runtime, req: &CompletionRequest, params: GenParams) -> Result<Generation, ApiError> {
    check_model(st, req.model.as_deref())?;
    let g = completion_generation(req, params, &Bounds::of(&st.cfg.limits), &rt.tokenizer)?;
    checked(st, rt, g)
}

/// The checks of a completion request that need no engine: `echo` and its combinations, the
/// generation plan, the raw prompt tokenized (its special tokens parsed), one image per
/// `<image>`. Every error is the client's (a 4xx).
pub fn completion_generation(
    req: &CompletionRequest,
    mut params: GenParams,
    bounds: &Bounds,
    tokenizer: &FlamingoTokenizer,
) -> Result<Generation, ApiError> {
    let echo = req.echo.unwrap_or(false);
    if echo && params.stream.unwrap_or(false) {
        return Err(ApiError::bad_request("`echo` is supported without `stream` only").param("echo"));
    }
    if echo && req.demonstrations.is_some() {
        return Err(ApiError::bad_request("`echo` cannot be combined with `demonstrations`").param("echo"));
    }
    // `max_tokens: 0` with `echo`: the prompt's log-probabilities only (OpenAI's legacy scoring).
    let score_only = echo && params.max_tokens == Some(0) && params.max_completion_tokens.is_none();
    if score_only {
        params.max_tokens = Some(1);
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("`suffix` is not supported").param("suffix"));
    }
    let prompt = single_prompt(req.prompt.clone())?;
    let mut plan = plan(&params, Kind::Completion, req.logprobs.map(|k| k as usize), bounds)?;
    if score_only {
        plan.max_new = 0;
    }
    let ids = tokenizer.encode_prompt(&prompt).map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))?;
    let slots = ids.iter().filter(|&&t| t == tokenizer.media_token_id()).count();
    if slots != req.images.len() {
        return Err(ApiError::bad_request(format!("the prompt has {slots} <image> markers but {} images were given", req.images.len()))
            .param("images"));
    }
    let media = req
        .images
        .iter()
        .enumerate()
        .map(|(i, im)| MediaItem { source: MediaRef::Image(im.url().to_string()), param: format!("images[{i}]") })
        .collect();
    Ok(Generation { prompt: ids, prepared: Vec::new(), media, plan, echo: echo.then_some(prompt) })
}

/// The size limits, checked before any media is fetched: images per request, prompt tokens,
/// and the KV-cache reservation of every choice (beams included) against the engine's budget.
fn checked(st: &AppState, rt: &Runtime, g: Generation) -> Result<Generation, ApiError> {
    check_sizes(&st.cfg.limits, &g)?;
    for sampling in &g.plan.choices {
        rt.engine.check_budget(g.prompt.len(), sampling, g.plan.max_new.max(1)).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    Ok(g)
}

/// Images per request and prompt tokens within the limits.
pub fn check_sizes(l: &Limits, g: &Generation) -> Result<(), ApiError> {
    let images = g.media.len() + g.prepared.len();
    if images > l.max_images_per_request {
        return Err(ApiError::bad_request(format!("at most {} images per request are allowed (got {images})", l.max_images_per_request)));
    }
    if g.prompt.len() > l.max_prompt_tokens {
        return Err(ApiError::bad_request(format!(
            "the prompt is {} tokens long; at most {} are allowed",
            g.prompt.len(),
            l.max_prompt_tokens
        )));
    }
    Ok(())
}

/// The engine's requests, one per choice, once the media are prepared.
pub fn requests(
    prompt: &[u32],
    media: Vec<PreparedMedia>,
    plan: &Plan,
    stop_ids: &[u32],
    spec: &ModelSpec,
) -> Result<Vec<ValidRequest>, ApiError> {
    plan.choices
        .iter()
        .map(|sampling| {
            let stop_token_ids = if plan.ignore_eos { Vec::new() } else { stop_ids.to_vec() };
            let stop = StopParams { max_new_tokens: plan.max_new, stop_token_ids, min_new_tokens: plan.min_new };
            ValidRequest::new(prompt.to_vec(), media.clone(), sampling.clone(), stop, spec)
                .map_err(|e| ApiError::bad_request(e.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: serde_json::Value) -> GenParams {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn choices_get_consecutive_seeds_and_beams_one_choice() {
        let b = Bounds::cli();
        let p =
            plan(&params(serde_json::json!({"temperature": 0.5, "seed": 7})), Kind::Completion, None, &Bounds { max_n: 3, ..b.clone() });
        let p = p.unwrap();
        assert!(matches!(p.choices[0].strategy, Strategy::Sample { seed: 7, .. }));
        let p = plan(
            &params(serde_json::json!({"temperature": 0.5, "seed": 7, "n": 3})),
            Kind::Completion,
            None,
            &Bounds { max_n: 3, ..b.clone() },
        )
        .unwrap();
        let seeds: Vec<u64> = p.choices.iter().map(|c| if let Strategy::Sample { seed, .. } = c.strategy { seed } else { 0 }).collect();
        assert_eq!(seeds, vec![7, 8, 9]);
        let p = plan(&params(serde_json::json!({"num_beams": 3})), Kind::Completion, None, &b).unwrap();
        assert_eq!(p.choices.len(), 1);
        assert_eq!(p.max_new, 16, "completions default to 16 new tokens");
        let p = plan(&params(serde_json::json!({})), Kind::Chat, None, &b).unwrap();
        assert_eq!((p.max_new, &p.choices[0].strategy), (20, &Strategy::Greedy));
    }

    #[test]
    fn mistakes_name_their_parameter() {
        let b = Bounds { max_tokens: 100, ..Bounds::cli() };
        for (v, param) in [
            (serde_json::json!({"max_tokens": 0}), "max_tokens"),
            (serde_json::json!({"max_completion_tokens": 101}), "max_completion_tokens"),
            (serde_json::json!({"temperature": -1}), "temperature"),
            (serde_json::json!({"top_p": 0}), "top_p"),
            (serde_json::json!({"top_k": -2}), "top_k"),
            (serde_json::json!({"num_beams": 2, "temperature": 1}), "num_beams"),
            (serde_json::json!({"repetition_penalty": 0}), "repetition_penalty"),
            (serde_json::json!({"stop": [""]}), "stop"),
            (serde_json::json!({"n": 2}), "n"),
        ] {
            let e = plan(&params(v.clone()), Kind::Completion, None, &b).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}");
        }
        let e = plan(&params(serde_json::json!({})), Kind::Chat, Some(3), &b).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
    }
}
