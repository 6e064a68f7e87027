//! `flamingo bench --url URL --soak-seconds S`: load above a server's capacity for a bounded
//! time, with slow clients, and what the server did about it.
//!
//! `clients` closed-loop clients send streamed chat requests with an image back to back (a
//! refused one waits 200 ms, then tries again) until the time is up. Beside them,
//! `slow` clients of each kind: readers that leave a stream unread for a while after its first
//! chunk, and connections that trickle a request's body or its headers one byte at a time.
//! The server's resident memory is sampled throughout (with its pid, on the same machine).
//!
//! What a server that keeps its promises shows: every accepted request completes (its stream
//! ends with a finish reason and `[DONE]`); every refusal is a 429 with `Retry-After`; nothing
//! else fails; requests keep completing while the slow readers sit on their streams (they hold
//! no engine slot); trickled bodies get 408 and trickled headers a closed connection within the
//! client timeout; memory stops growing once the caches have filled (a plateau).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::loadgen::{chat_body, stream_one, Percentiles, Sample, Stall};

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub url: String,
    pub api_key: Option<String>,
    /// Closed-loop clients (more than the server admits and queues, to be above capacity).
    pub clients: usize,
    pub duration: Duration,
    pub max_tokens: usize,
    /// Slow clients of each kind (readers, bodies, headers).
    pub slow: usize,
    /// How long a slow reader leaves its stream unread.
    pub stall: Duration,
    /// The server's process id, to sample its memory.
    pub server_pid: Option<u32>,
}

/// The server's resident memory during the run, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Before the load started.
    pub start: u64,
    /// The highest sample in the first and in the second half of the run.
    pub first_half_peak: u64,
    pub second_half_peak: u64,
    /// After the load, once the server was idle again.
    pub end: u64,
    pub samples: usize,
    /// (seconds into the load, bytes) every 5 s.
    pub timeline: Vec<(f64, u64)>,
}

/// What the slow clients met.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlowClients {
    /// Readers whose stream completed in full after their stall.
    pub readers_completed: usize,
    /// Requests of the other clients that completed while every slow reader's request was open
    /// (the readers stall at once, so this is mostly while none of them read).
    pub completed_during_stall: usize,
    /// Trickled bodies answered 408.
    pub bodies_408: usize,
    /// Trickled headers whose connection the server closed (or answered 408).
    pub headers_closed: usize,
    /// The longest a trickling connection was held, in seconds.
    pub longest_held_s: f64,
}

/// The run's result.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub duration_s: f64,
    pub clients: usize,
    /// Responses 200.
    pub accepted: usize,
    /// Accepted requests whose stream ended with a finish reason and `[DONE]`.
    pub completed: usize,
    /// 429 answers, and those without `Retry-After`.
    pub refused: usize,
    pub refused_without_retry_after: usize,
    /// Anything else (other statuses, errors inside streams, broken connections).
    pub failed: usize,
    pub first_failure: Option<String>,
    pub output_tokens: usize,
    pub output_throughput: f64,
    pub ttft: Option<Percentiles>,
    pub itl: Option<Percentiles>,
    pub e2e: Option<Percentiles>,
    pub slow: SlowClients,
    pub memory: Option<Memory>,
}

/// A process's resident set size now (`VmRSS` in `/proc/PID/status`), in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Host and port of an `http://` URL.
fn authority(url: &str) -> Result<String> {
    let u = url::Url::parse(url).context("the URL")?;
    let host = u.host_str().context("the URL has no host")?;
    Ok(format!("{host}:{}", u.port_or_known_default().unwrap_or(80)))
}

/// A connection that sends a request's headers (whole, or only their start) and then one
/// byte every 200 ms. Returns what the server did (`Some(status)` for an answer, `None` when
/// it closed the connection) and how long the connection was held.
async fn trickle(addr: &str, api_key: Option<&str>, headers_whole: bool, limit: Duration) -> (Option<u16>, f64) {
    let t0 = Instant::now();
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else { return (None, 0.0) };
    let auth = api_key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: 100000\r\n\r\n"
    );
    let (first, rest) =
        if headers_whole { (head.as_str(), "{\"messages\": [".repeat(8000)) } else { ("POST /v1/chat/completions HTTP/1.1\r\n", head) };
    if tcp.write_all(first.as_bytes()).await.is_err() {
        return (None, t0.elapsed().as_secs_f64());
    }
    let mut reply = Vec::new();
    for b in rest.bytes() {
        if t0.elapsed() > limit {
            break;
        }
        let mut buf = [0u8; 512];
        tokio::select! {
            n = tcp.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => { reply.extend_from_slice(&buf[..n]); break; }
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if tcp.write_all(&[b]).await.is_err() {
                    break;
                }
            }
        }
    }
    let held = t0.elapsed().as_secs_f64();
    let status = std::str::from_utf8(&reply).ok().and_then(|r| r.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
    (status, held)
}

/// Runs the soak.
pub async fn run(spec: &SoakSpec) -> Result<SoakReport> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(spec.clients + spec.slow).build().context("HTTP client")?;
    let stop = Arc::new(AtomicBool::new(false));

    // Memory, sampled every 250 ms until the load and the idle time after it are over.
    let sampler = spec.server_pid.map(|pid| {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(Instant, u64)> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Some(r) = rss(pid) {
                    samples.push((Instant::now(), r));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            samples
        })
    });

    // The slow readers go first and stall together on their streams; the load starts once they
    // all do, and what others complete meanwhile is counted.
    let stalled = Arc::new(AtomicUsize::new(0));
    let during_stall = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..spec.slow)
        .map(|i| {
            let (http, url, key) = (http.clone(), spec.url.clone(), spec.api_key.clone());
            let body = chat_body(1000 + i as u64, spec.max_tokens, i);
            let stall = Stall { duration: spec.stall, now: stalled.clone() };
            tokio::spawn(async move { stream_one(&http, &url, key.as_deref(), body, Some(stall)).await })
        })
        .collect();
    let wait = Instant::now();
    while stalled.load(Ordering::SeqCst) < spec.slow && wait.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let load_start = Instant::now();
    let deadline = load_start + spec.duration;
    let addr = authority(&spec.url)?;
    let limit = spec.duration + Duration::from_secs(60);
    let tricklers: Vec<_> = (0..2 * spec.slow)
        .map(|i| {
            let (addr, key) = (addr.clone(), spec.api_key.clone());
            tokio::spawn(async move { (i % 2 == 0, trickle(&addr, key.as_deref(), i % 2 == 0, limit).await) })
        })
        .collect();

    // The closed loop.
    let clients: Vec<_> = (0..spec.clients)
        .map(|c| {
            let (http, url, key) = (http.clone(), spec.url.clone(), spec.api_key.clone());
            let (stalled, during_stall, slow, max_tokens) = (stalled.clone(), during_stall.clone(), spec.slow, spec.max_tokens);
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let s = stream_one(&http, &url, key.as_deref(), chat_body(((c as u64) << 20) | i, max_tokens, c), None).await;
                    i += 1;
                    if s.finished && slow > 0 && stalled.load(Ordering::SeqCst) == slow {
                        during_stall.fetch_add(1, Ordering::SeqCst);
                    }
                    if s.status == Some(429) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    samples.push(s);
                }
                samples
            })
        })
        .collect();

    let mut samples: Vec<Sample> = Vec::new();
    for c in clients {
        samples.extend(c.await.context("a client task")?);
    }
    let duration = load_start.elapsed().as_secs_f64();
    let mut slow = SlowClients::default();
    for r in readers {
        let s = r.await.context("a slow reader")?;
        slow.readers_completed += usize::from(s.finished && s.tokens == spec.max_tokens);
    }
    slow.completed_during_stall = during_stall.load(Ordering::SeqCst);
    for t in tricklers {
        let (body, (status, held)) = t.await.context("a slow connection")?;
        match (body, status) {
            (true, Some(408)) => slow.bodies_408 += 1,
            (false, None | Some(408)) => slow.headers_closed += 1,
            _ => {}
        }
        slow.longest_held_s = slow.longest_held_s.max(held);
    }
    // Idle for a moment, then the memory after the load.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let memory = match sampler {
        Some(task) => {
            let samples = task.await.context("the memory sampler")?;
            // Seconds into the load (negative before it).
            let at = |i: Instant| i.checked_duration_since(load_start).map_or(-1.0, |d| d.as_secs_f64());
            let half = spec.duration.as_secs_f64() / 2.0;
            let peak = |f: &dyn Fn(f64) -> bool| samples.iter().filter(|(t, _)| f(at(*t))).map(|s| s.1).max().unwrap_or(0);
            samples.first().map(|first| Memory {
                start: first.1,
                first_half_peak: peak(&|t| (0.0..half).contains(&t)),
                second_half_peak: peak(&|t| t >= half && t <= duration),
                end: samples.last().map_or(0, |s| s.1),
                samples: samples.len(),
                timeline: samples.iter().step_by(20).map(|&(t, b)| ((at(t) * 10.0).round() / 10.0, b)).collect(),
            })
        }
        None => None,
    };

    let accepted: Vec<&Sample> = samples.iter().filter(|s| s.status == Some(200)).collect();
    let ok: Vec<&Sample> = accepted.iter().copied().filter(|s| s.finished && s.tokens == spec.max_tokens).collect();
    let refused: Vec<&Sample> = samples.iter().filter(|s| s.status == Some(429)).collect();
    let failures: Vec<&Sample> = samples.iter().filter(|s| s.status != Some(429) && !(s.finished && s.tokens == spec.max_tokens)).collect();
    let output_tokens: usize = ok.iter().map(|s| s.tokens).sum();
    Ok(SoakReport {
        duration_s: duration,
        clients: spec.clients,
        accepted: accepted.len(),
        completed: ok.len(),
        refused: refused.len(),
        refused_without_retry_after: refused.iter().filter(|s| !s.retry_after).count(),
        failed: failures.len(),
        first_failure: failures.first().map(|s| s.error.clone().unwrap_or_else(|| format!("{} of {} tokens", s.tokens, spec.max_tokens))),
        output_tokens,
        output_throughput: output_tokens as f64 / duration,
        ttft: Percentiles::of(ok.iter().filter_map(|s| s.ttft).collect()),
        itl: Percentiles::of(ok.iter().flat_map(|s| s.itl.iter().copied()).collect()),
        e2e: Percentiles::of(ok.iter().map(|s| s.e2e).collect()),
        slow,
        memory,
    })
}

/// The report as a table.
pub fn print(spec: &SoakSpec, r: &SoakReport) {
    let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "## Soak: {} clients for {:.0} s, {} tokens each (ignore_eos), {} slow clients of each kind, {}\n",
        spec.clients,
        spec.duration.as_secs_f64(),
        spec.max_tokens,
        spec.slow,
        spec.url
    );
    println!("| | |\n|---|---|");
    println!("| accepted (200) / completed | {} / {} |", r.accepted, r.completed);
    println!("| refused (429) / without Retry-After | {} / {} |", r.refused, r.refused_without_retry_after);
    println!("| failed | {}{} |", r.failed, r.first_failure.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default());
    println!("| output token throughput | {:.1} tokens/s |", r.output_throughput);
    for (name, p) in [("TTFT", &r.ttft), ("ITL", &r.itl), ("end-to-end", &r.e2e)] {
        if let Some(p) = p {
            println!("| {name} mean / p50 / p90 / p99 | {:.1} / {:.1} / {:.1} / {:.1} ms |", p.mean_ms, p.p50_ms, p.p90_ms, p.p99_ms);
        }
    }
    let s = &r.slow;
    println!("| slow readers completed / others completed while they stalled | {} / {} |", s.readers_completed, s.completed_during_stall);
    println!("| trickled bodies answered 408 / trickled headers closed | {} / {} |", s.bodies_408, s.headers_closed);
    println!("| longest a trickling connection was held | {:.1} s |", s.longest_held_s);
    if let Some(m) = &r.memory {
        println!(
            "| server RSS: start / first-half peak / second-half peak / end | {:.0} / {:.0} / {:.0} / {:.0} MiB |",
            mb(m.start),
            mb(m.first_half_peak),
            mb(m.second_half_peak),
            mb(m.end)
        );
    }
}
