//! Server-Sent Events: every choice of a request streamed as OpenAI streams, chunk by chunk,
//! then `data: [DONE]`. A task owns the engine streams and stops, cancelling them, as soon as
//! the client goes away.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use flamingo_engine::{Event, EventStream};
use tokio::sync::mpsc;

use crate::api::{ChunkBody, UsageBody};
use crate::error::ApiError;
use crate::respond::{ChoiceError, ChoiceStream, Endpoint, LogprobEntry, Meta, Progress};
use crate::state::{AppState, Inflight, Runtime};
use crate::validate::Plan;

/// The SSE response; the generation runs in a task that holds `guard` (the request stays in
/// flight for a graceful shutdown until the stream ends).
pub fn respond<E: Endpoint>(st: Arc<AppState>, guard: Inflight, streams: Vec<EventStream>, plan: Plan, meta: Meta) -> Response {
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let _guard = guard;
        let closed = tx.clone();
        tokio::select! {
            _ = contained(drive::<E>(&st, streams, &plan, &meta, &tx), &tx) => {}
            _ = closed.closed() => tracing::info!("client disconnected; generation cancelled"),
        }
    });
    sse(rx)
}

fn sse(rx: mpsc::Receiver<SseEvent>) -> Response {
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// Runs a stream's writer. Its headers are sent, so a panic inside it (a bug) can no longer be a
/// 500: the stream ends with an error event in OpenAI's shape, as an engine error mid-stream
/// does; the panic is logged and counted (`flamingo_panics_total{where="http"}`), and its
/// sequences are cancelled as the writer's state is dropped.
async fn contained(writer: impl std::future::Future<Output = ()>, tx: &mpsc::Sender<SseEvent>) {
    use futures::FutureExt;
    if let Err(payload) = std::panic::AssertUnwindSafe(writer).catch_unwind().await {
        let message = flamingo_engine::panic_message(payload.as_ref());
        tracing::error!(panic = %message, "a response stream panicked; it ends with an error event");
        metrics::counter!(flamingo_engine::metrics::PANICS, "where" => "http").increment(1);
        let error = ApiError::internal("internal error: the server failed while streaming this response");
        let _ = tx.send(SseEvent::default().data(error.to_json())).await;
    }
}

/// The client went away: stop (dropping the engine streams cancels their sequences).
struct Gone;

/// Writes one request's chunks.
struct Out<'a> {
    tx: &'a mpsc::Sender<SseEvent>,
    meta: &'a Meta,
    include_usage: bool,
}

impl Out<'_> {
    async fn send(&self, data: String) -> Result<(), Gone> {
        self.tx.send(SseEvent::default().data(data)).await.map_err(|_| Gone)
    }

    async fn chunk<E: Endpoint>(&self, choices: Vec<E::ChunkChoice>, usage: Option<UsageBody>) -> Result<(), Gone> {
        let m = self.meta;
        let body = ChunkBody {
            id: m.id.clone(),
            object: E::CHUNK_OBJECT,
            created: m.created,
            model: m.model.clone(),
            system_fingerprint: None,
            choices,
            usage: self.include_usage.then_some(usage),
        };
        self.send(serde_json::to_string(&body).unwrap_or_default()).await
    }

    async fn error(&self, e: ApiError) -> Result<(), Gone> {
        self.send(e.to_json()).await
    }
}

/// Per-choice state of a stream.
struct Choice<'a> {
    rx: Option<EventStream>,
    answer: ChoiceStream<'a>,
    /// Bytes of text sent (completions' `text_offset`).
    sent: usize,
}

/// The next event of any choice still running (`None` when every choice is done).
async fn next_event(ch: &mut [Choice<'_>]) -> Option<(usize, Option<Event>)> {
    futures::future::poll_fn(|cx| {
        let mut any = false;
        for (i, c) in ch.iter_mut().enumerate() {
            if let Some(rx) = c.rx.as_mut() {
                any = true;
                if let Poll::Ready(e) = rx.poll_recv(cx) {
                    return Poll::Ready(Some((i, e)));
                }
            }
        }
        if any {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    })
    .await
}

async fn drive<E: Endpoint>(st: &AppState, streams: Vec<EventStream>, plan: &Plan, meta: &Meta, tx: &mpsc::Sender<SseEvent>) {
    let Some(rt) = st.model() else { return };
    let out = Out { tx, meta, include_usage: plan.include_usage };
    let _ = run::<E>(st, rt, streams, plan, &out).await;
}

async fn run<E: Endpoint>(st: &AppState, rt: &Runtime, streams: Vec<EventStream>, plan: &Plan, out: &Out<'_>) -> Result<(), Gone> {
    for i in 0..streams.len() {
        if let Some(c) = E::opening(i) {
            out.chunk::<E>(vec![c], None).await?;
        }
    }
    let mut ch: Vec<Choice> = streams
        .into_iter()
        .map(|rx| Choice { rx: Some(rx), answer: ChoiceStream::for_plan(&rt.tokenizer, plan, &rt.stop_ids), sent: 0 })
        .collect();
    let mut completion_tokens = 0;
    while let Some((i, ev)) = next_event(&mut ch).await {
        let Some(ev) = ev else {
            return out.error(ChoiceError::Gone.to_api(st.retry_after())).await;
        };
        completion_tokens += usize::from(matches!(ev, Event::Token(_)));
        let c = &mut ch[i];
        let progress = match c.answer.on_event(ev) {
            Ok(p) => p,
            Err(e) => return out.error(e.to_api(st.retry_after())).await,
        };
        match progress {
            Progress::Pending => {}
            Progress::Text { text, logprobs } => text_chunk::<E>(out, rt, plan, i, c, text, &logprobs).await?,
            Progress::Stopped { text, logprobs } => {
                text_chunk::<E>(out, rt, plan, i, c, text, &logprobs).await?;
                c.rx = None; // cancels the sequence
                out.chunk::<E>(vec![E::finish(i, flamingo_model::sampling::FinishReason::Stop)], None).await?;
            }
            Progress::Ended { rest, reason } => {
                c.rx = None;
                if !rest.is_empty() {
                    out.chunk::<E>(vec![E::text(i, rest, None)], None).await?;
                }
                out.chunk::<E>(vec![E::finish(i, reason)], None).await?;
            }
        }
    }
    if plan.include_usage {
        let cached = ch.first().map(|c| c.answer.cached_tokens()).unwrap_or(0);
        out.chunk::<E>(Vec::new(), Some(UsageBody::new(out.meta.prompt_tokens, completion_tokens, cached))).await?;
    }
    out.send("[DONE]".into()).await
}

/// Sends new text (or a token's log-probability) of choice `i`, if there is any.
async fn text_chunk<E: Endpoint>(
    out: &Out<'_>,
    rt: &Runtime,
    plan: &Plan,
    i: usize,
    c: &mut Choice<'_>,
    text: String,
    logprobs: &[LogprobEntry],
) -> Result<(), Gone> {
    if text.is_empty() && logprobs.is_empty() {
        return Ok(());
    }
    let lp = plan.logprobs.map(|_| E::logprobs(&rt.tokenizer, logprobs, c.sent));
    c.sent += text.len();
    out.chunk::<E>(vec![E::text(i, text, lp)], None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that panics after sending a chunk: the client gets the chunk, then an error
    /// event in OpenAI's shape, and the stream ends (no `[DONE]`).
    #[tokio::test]
    async fn a_panicking_stream_writer_ends_its_stream_with_an_error_event() {
        let (tx, rx) = mpsc::channel::<SseEvent>(8);
        let writer = async {
            let _ = tx.send(SseEvent::default().data("{\"first\":1}")).await;
            panic!("deliberate panic in a test stream");
        };
        contained(writer, &tx).await;
        drop(tx);
        let body = axum::body::to_bytes(sse(rx).into_body(), 1 << 16).await.expect("body");
        let text = String::from_utf8_lossy(&body);
        let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(events.len(), 2, "{text}");
        assert_eq!(events[0], "{\"first\":1}");
        let error: serde_json::Value = serde_json::from_str(events[1]).expect("JSON");
        assert_eq!(error["error"]["type"], "server_error", "{error}");
    }

    /// A writer that finishes normally sends nothing more.
    #[tokio::test]
    async fn a_stream_writer_that_returns_adds_nothing() {
        let (tx, rx) = mpsc::channel::<SseEvent>(8);
        contained(async { drop(tx.send(SseEvent::default().data("[DONE]")).await) }, &tx).await;
        drop(tx);
        let body = axum::body::to_bytes(sse(rx).into_body(), 1 << 16).await.expect("body");
        assert_eq!(String::from_utf8_lossy(&body), "data: [DONE]\n\n");
    }
}
