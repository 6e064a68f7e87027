//! OpenAI wire types: requests as clients send them, and every response body (and stream
//! chunk) as clients parse them, serialised by serde. Log-probabilities are written as f64
//! numbers (the f32 value widened), as OpenAI's are.

use flamingo_model::sampling::FinishReason;
use serde::{Deserialize, Serialize};
use serde_json::Value;

// ---- requests ----

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling and stopping fields shared by both endpoints (OpenAI's and the extensions), parsed
/// from the same body as the endpoint's own fields (not flattened, so errors name the field).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenParams {
    #[serde(default, deserialize_with = "crate::jsonint::opt_u64")]
    pub max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::jsonint::opt_u64")]
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "crate::jsonint::opt_u64")]
    pub n: Option<u64>,
    #[serde(default, deserialize_with = "crate::jsonint::opt_i64")]
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Extension: sample from the k most likely tokens only.
    #[serde(default, deserialize_with = "crate::jsonint::opt_i64")]
    pub top_k: Option<i64>,
    /// Extension: HF's repetition penalty (1.0 = off).
    pub repetition_penalty: Option<f64>,
    /// Extension: beam search with this many beams (1 = off).
    #[serde(default, deserialize_with = "crate::jsonint::opt_u64")]
    pub num_beams: Option<u64>,
    /// Extension: beam-search length penalty (HF semantics).
    pub length_penalty: Option<f64>,
    /// Extension: also return the generated token ids in each choice.
    pub return_token_ids: Option<bool>,
    /// Extension (vLLM's): the end tokens cannot end the reply before this many new tokens,
    /// nor stop strings cut it.
    #[serde(default, deserialize_with = "crate::jsonint::opt_u64")]
    pub min_tokens: Option<u64>,
    /// Extension (vLLM's): the end tokens do not end the reply; it runs to `max_tokens` (or a
    /// stop string).
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub logprobs: Option<bool>,
    #[serde(default, deserialize_with = "crate::jsonint::opt_u64")]
    pub top_logprobs: Option<u64>,
    /// Extension: a registered demonstration set put in front of `messages`.
    pub demonstrations: Option<crate::demos::DemoRef>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// A message's content: a string, or a list of parts (checked by the template, which names the
/// offending part).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptSpec,
    /// Extension: one image per `<image>` in the prompt, as URLs (data:, http(s):, file:) or
    /// `{"url": ...}` objects.
    #[serde(default)]
    pub images: Vec<ImageRef>,
    /// OpenAI's legacy form: the number of top alternatives per token.
    #[serde(default, deserialize_with = "crate::jsonint::opt_u64")]
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    /// Extension: a registered raw demonstration set put in front of `prompt`.
    pub demonstrations: Option<crate::demos::DemoRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ImageRef {
    Url(String),
    Object { url: String },
}

impl ImageRef {
    pub fn url(&self) -> &str {
        match self {
            ImageRef::Url(u) | ImageRef::Object { url: u } => u,
        }
    }
}

// ---- responses ----

#[derive(Debug, Clone, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl UsageBody {
    pub fn new(prompt: usize, completion: usize, cached: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: cached },
        }
    }
}

/// A whole (non-streamed) completion: `chat.completion` or `text_completion`.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionBody<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// Always null (no fingerprint is kept).
    pub system_fingerprint: Option<String>,
    pub choices: Vec<C>,
    pub usage: UsageBody,
}

/// One streamed chunk: `chat.completion.chunk` or `text_completion`.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkBody<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<C>,
    /// Present only when the client asked for usage (`stream_options.include_usage`): null on
    /// every chunk but the last, which has no choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageBody>>,
}

/// A chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
    /// Extension (`return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

/// A streamed chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// What a chat chunk adds: the role (first chunk), text, or nothing (the finish chunk).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Chat log-probabilities: one entry per generated token.
#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

/// One token's log-probability in the chat format.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

/// A completions choice (whole or streamed: the same fields).
#[derive(Debug, Clone, Serialize)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
    /// Extension (`return_token_ids`); never in stream chunks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// The legacy completions log-probabilities: parallel lists, one entry per generated token,
/// with the byte offset of each token in the choice's text.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` for an echoed prompt's first token (nothing comes before it).
    pub token_logprobs: Vec<Option<f64>>,
    /// Each token's alternatives as `{token: logprob}` (`null` where `token_logprobs` is).
    pub top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub model: String,
}
