//! `flamingo bench --url`: a serving benchmark over real HTTP, reported as vLLM's
//! `benchmark_serving` reports it. Streamed chat requests with an image (the shapes world's,
//! as base64 PNG) are sent at a fixed concurrency (closed loop) or at a request rate (Poisson
//! arrivals); each records its time to first token (TTFT), the gaps between later tokens (ITL)
//! and its end-to-end latency. `ignore_eos` with `max_tokens` fixes every reply's length.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: String,
    pub api_key: Option<String>,
    pub requests: usize,
    /// Requests in flight at once (closed loop) when `rate` is `None`; the cap otherwise.
    pub concurrency: usize,
    /// Requests per second (Poisson arrivals).
    pub rate: Option<f64>,
    pub max_tokens: usize,
    pub seed: u64,
}

/// One request's timings and how it ended.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    pub(crate) ttft: Option<f64>,
    pub(crate) itl: Vec<f64>,
    pub(crate) e2e: f64,
    pub(crate) tokens: usize,
    pub(crate) error: Option<String>,
    /// The response's status (none when no response came).
    pub(crate) status: Option<u16>,
    /// The refusal carried `Retry-After`.
    pub(crate) retry_after: bool,
    /// The stream ended with a finish reason and `[DONE]`.
    pub(crate) finished: bool,
}

/// Percentiles of a list of seconds, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

impl Percentiles {
    pub(crate) fn of(mut v: Vec<f64>) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] * 1e3;
        Some(Self { mean_ms: v.iter().sum::<f64>() / v.len() as f64 * 1e3, p50_ms: at(0.5), p90_ms: at(0.9), p99_ms: at(0.99) })
    }
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub requests: usize,
    pub completed: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_tokens: usize,
    pub output_throughput: f64,
    pub ttft: Option<Percentiles>,
    pub itl: Option<Percentiles>,
    pub e2e: Option<Percentiles>,
}

/// The chat body every request sends: an image of the shapes world and a question.
fn body(spec: &LoadSpec, i: usize) -> Value {
    chat_body(spec.seed.wrapping_add(i as u64), spec.max_tokens, i)
}

/// A streamed chat request of `max_tokens` new tokens about image `seed` of the shapes world.
pub(crate) fn chat_body(seed: u64, max_tokens: usize, i: usize) -> Value {
    let mut rng = crate::world::rng(seed, crate::world::Split::Eval);
    let image = crate::world::Media::Image(crate::world::scene::sample_scene(&mut rng, 1 + i % 4)).encode();
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(image));
    json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}, "temperature": 0,
    })
}

/// One streamed request: its TTFT, ITLs and end-to-end latency.
async fn one(http: &reqwest::Client, spec: &LoadSpec, body: Value) -> Sample {
    stream_one(http, &spec.url, spec.api_key.as_deref(), body, None).await
}

/// A pause in reading a reply: how long, and a count of the requests pausing now.
pub(crate) struct Stall {
    pub(crate) duration: Duration,
    pub(crate) now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// One streamed chat request to `url`. With `stall`, the reply is left unread for a while
/// after its first chunk (a client reading slowly).
pub(crate) async fn stream_one(http: &reqwest::Client, url: &str, api_key: Option<&str>, body: Value, stall: Option<Stall>) -> Sample {
    let t0 = Instant::now();
    let mut req = http
        .post(format!("{}/v1/chat/completions", url.trim_end_matches('/')))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let mut s = Sample::default();
    let mut resp = match req.send().await {
        Ok(r) if r.status().is_success() => {
            s.status = Some(r.status().as_u16());
            r
        }
        Ok(r) => {
            s.status = Some(r.status().as_u16());
            s.retry_after = r.headers().contains_key(reqwest::header::RETRY_AFTER);
            s.error = Some(format!("HTTP {}", r.status()));
            return s;
        }
        Err(e) => {
            s.error = Some(e.to_string());
            return s;
        }
    };
    let mut buf = Vec::new();
    let mut last: Option<Instant> = None;
    let mut saw_finish = false;
    let mut stall = stall;
    loop {
        let chunk: axum::body::Bytes = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                s.error = Some(e.to_string());
                break;
            }
        };
        buf.extend_from_slice(&chunk);
        if let Some(st) = stall.take() {
            use std::sync::atomic::Ordering;
            st.now.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(st.duration).await;
            st.now.fetch_sub(1, Ordering::SeqCst);
        }
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let Some(data) = std::str::from_utf8(&event).ok().and_then(|e| e.trim().strip_prefix("data: ")) else { continue };
            if data == "[DONE]" {
                s.finished = s.error.is_none() && saw_finish;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if let Some(e) = v.get("error") {
                s.error = Some(e.to_string());
            }
            if v.pointer("/choices/0/finish_reason").is_some_and(|f| !f.is_null()) {
                saw_finish = true;
            }
            if let Some(n) = v.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
                s.tokens = n as usize;
            }
            let text = v.pointer("/choices/0/delta/content").and_then(Value::as_str).unwrap_or("");
            if !text.is_empty() {
                let now = Instant::now();
                match last {
                    None => s.ttft = Some((now - t0).as_secs_f64()),
                    Some(l) => s.itl.push((now - l).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    s.e2e = t0.elapsed().as_secs_f64();
    s
}

/// Runs the benchmark.
pub async fn run(spec: &LoadSpec) -> Result<LoadReport> {
    use futures::StreamExt;
    use rand::{Rng, SeedableRng};
    let http = reqwest::Client::builder().pool_max_idle_per_host(spec.concurrency.max(1)).build().context("HTTP client")?;
    let bodies: Vec<Value> = (0..spec.requests).map(|i| body(spec, i)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    // Arrival offsets: all at once (closed loop, bounded by the concurrency) or Poisson.
    let offsets: Vec<Duration> = match spec.rate {
        Some(r) if r > 0.0 => {
            let mut t = 0.0;
            (0..spec.requests)
                .map(|_| {
                    let d = Duration::from_secs_f64(t);
                    t += -(1.0 - rng.gen::<f64>()).ln() / r;
                    d
                })
                .collect()
        }
        _ => vec![Duration::ZERO; spec.requests],
    };
    let start = Instant::now();
    let samples: Vec<Sample> = futures::stream::iter(bodies.into_iter().zip(offsets))
        .map(|(b, at)| {
            let http = &http;
            async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(start + at)).await;
                one(http, spec, b).await
            }
        })
        .buffer_unordered(spec.concurrency.max(1))
        .collect()
        .await;
    let duration = start.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let output_tokens: usize = ok.iter().map(|s| s.tokens).sum();
    Ok(LoadReport {
        requests: spec.requests,
        completed: ok.len(),
        errors: samples.len() - ok.len(),
        first_error: samples.iter().find_map(|s| s.error.clone()),
        duration_s: duration,
        request_throughput: ok.len() as f64 / duration,
        output_tokens,
        output_throughput: output_tokens as f64 / duration,
        ttft: Percentiles::of(ok.iter().filter_map(|s| s.ttft).collect()),
        itl: Percentiles::of(ok.iter().flat_map(|s| s.itl.iter().copied()).collect()),
        e2e: Percentiles::of(ok.iter().map(|s| s.e2e).collect()),
    })
}

/// The report as vLLM's benchmark prints it, and the server's peak RSS when its pid is given.
pub fn print(spec: &LoadSpec, r: &LoadReport, peak_rss: Option<u64>) {
    let mode = match spec.rate {
        Some(rate) => format!("{rate} requests/s (Poisson), at most {} in flight", spec.concurrency),
        None => format!("{} in flight", spec.concurrency),
    };
    println!("## Serving benchmark: {} requests, {mode}, {} tokens each (ignore_eos), {}\n", spec.requests, spec.max_tokens, spec.url);
    println!("| | |\n|---|---|");
    println!("| successful requests | {} |", r.completed);
    println!("| errors | {}{} |", r.errors, r.first_error.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default());
    println!("| duration | {:.2} s |", r.duration_s);
    println!("| request throughput | {:.2} requests/s |", r.request_throughput);
    println!("| output token throughput | {:.1} tokens/s |", r.output_throughput);
    if let Some(rss) = peak_rss {
        println!("| server peak RSS | {:.2} GB |", rss as f64 / 1e9);
    }
    for (name, p) in [("TTFT", &r.ttft), ("ITL", &r.itl), ("end-to-end", &r.e2e)] {
        if let Some(p) = p {
            println!("| {name} mean / p50 / p90 / p99 | {:.1} / {:.1} / {:.1} / {:.1} ms |", p.mean_ms, p.p50_ms, p.p90_ms, p.p99_ms);
        }
    }
}

/// A process's peak resident set size (`VmHWM` in `/proc/PID/status`), in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
