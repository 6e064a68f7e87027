//! `GET /v1/models`, `/v1/models/{id}`, `/health` and `/metrics`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::{Health, ModelCard, ModelList};
use crate::error::ApiError;
use crate::state::AppState;

fn card(st: &AppState) -> ModelCard {
    ModelCard { id: st.served_name.clone(), object: "model", created: st.started, owned_by: "flamingo" }
}

pub(super) async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList { object: "list", data: vec![card(&st)] })
}

pub(super) async fn model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    if id != st.served_name {
        return Err(ApiError::model_not_found(&id, &st.served_name));
    }
    Ok(Json(card(&st)))
}

/// 200 `{"status": "ok"}` once the model is loaded and the stored demonstration sets are
/// pinned; 503 with `Retry-After` while it loads or
/// the server shuts down.
pub(super) async fn health(State(st): State<Arc<AppState>>) -> Response {
    let (code, status) = if st.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    } else if !st.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    } else {
        (StatusCode::OK, "ok")
    };
    let mut r = (code, Json(Health { status, model: st.served_name.clone() })).into_response();
    if code != StatusCode::OK {
        if let Ok(v) = HeaderValue::from_str(&st.retry_after().to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

pub(super) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.prometheus.render()).into_response()
}
