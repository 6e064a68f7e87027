//! The one map from every error a request can meet to an HTTP status and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}`: a client's mistake is a 4xx, never a 5xx.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use flamingo_engine::EngineError;
use serde::Serialize;

/// An error as OpenAI returns it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self { code: Some("invalid_api_key"), ..Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message) }
    }
    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self {
            code: Some("model_not_found"),
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("the model `{model}` does not exist; this server serves `{served}`"),
            )
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", message)
    }
    pub fn too_large(limit: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("the request body is larger than {limit} bytes"))
        }
    }
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self { code: Some("request_timeout"), ..Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", message) }
    }
    pub fn overloaded(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            code: Some("overloaded"),
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            code: Some("unavailable"),
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable_error", message)
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody { error: ErrorDetail { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code } }
    }

    /// The body as JSON text (also what a stream sends as `data: {"error": ...}`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_else(|_| String::from(r#"{"error":{"message":"error","type":"server_error"}}"#))
    }

    /// The answer to an engine error: the request's own mistakes are 400s, a full queue 429,
    /// a stopped engine 503 (both with `Retry-After`), only a failure inside the model a 500.
    pub fn from_engine(e: &EngineError, retry_after: u64) -> Self {
        match e {
            EngineError::Request(r) => ApiError::bad_request(r.to_string()),
            EngineError::Overloaded(_) => ApiError::overloaded(format!("{e}; retry later"), retry_after),
            EngineError::Stopped => ApiError::unavailable("the server is shutting down", retry_after),
            EngineError::Internal(m) => ApiError::internal(format!("generation failed: {m}")),
        }
    }
}

/// The OpenAI error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'a str>,
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flamingo_engine::RequestError;

    #[test]
    fn engine_errors_map_to_their_status() {
        let cases = [
            (EngineError::Request(RequestError::EmptyPrompt), 400, None),
            (EngineError::Request(RequestError::Media("no video".into())), 400, None),
            (EngineError::Overloaded(3), 429, Some(7)),
            (EngineError::Stopped, 503, Some(7)),
            (EngineError::Internal("boom".into()), 500, None),
        ];
        for (e, status, retry) in cases {
            let a = ApiError::from_engine(&e, 7);
            assert_eq!((a.status.as_u16(), a.retry_after), (status, retry), "{e:?}");
            let body: serde_json::Value = serde_json::from_str(&a.to_json()).unwrap();
            assert_eq!(body["error"]["message"].as_str().map(|m| !m.is_empty()), Some(true));
            assert!(body["error"].get("param").is_some() && body["error"].get("code").is_some());
        }
    }
}
