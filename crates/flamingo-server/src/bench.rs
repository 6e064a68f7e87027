//! `flamingo bench`: throughput and cache effects of the engine on a random model of a real
//! architecture shape, built in memory (no download). Drives the scheduler directly so the
//! timings contain model work only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use flamingo_engine::{media_key, Backend, EngineConfig, Event, PreparedMedia, SamplingParams, Scheduler, StopParams, ValidRequest};
use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::random::{build, RandomSpec};
use flamingo_model::sampling::Strategy;
use flamingo_model::Flamingo;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

#[derive(Args)]
pub struct BenchArgs {
    /// Model size: `mid` (~0.4 B parameters), `of3b` (OpenFlamingo-3B's shapes: ViT-L/14, a
    /// 24-layer 2048-wide MPT, cross-attention every layer; ~3 B parameters), `of9b`
    /// (OpenFlamingo-9B's: MPT-7B's 32 x 4096 layers, cross-attention every 4; 36 GB in f32, so
    /// with `--quantize` on a small host) or `tiny` (for a quick smoke run).
    #[arg(long, default_value = "mid")]
    size: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// auto (bf16 on CUDA, f32 on the CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Linear-layer weights: none, f16, q8_0 or q8_0_head; several (comma-separated) build one model each
    /// and interleave their decode rounds, to compare them in one run.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    quantize: Vec<String>,
    /// Where sequences keep their self-attention K/V: `auto` (paged on a GPU, per-sequence
    /// caches on the CPU), `paged` or `own`.
    #[arg(long, default_value = "auto")]
    kv: String,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Concurrent sequences for the decode-throughput table.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    concurrency: Vec<usize>,
    /// Decode steps timed per concurrency level.
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Repetitions of each measurement (the median is reported; decode rounds interleave the
    /// concurrency levels).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Which measurements to run: any of `decode`, `prefix`, `vision`.
    #[arg(long, value_delimiter = ',', default_value = "decode,prefix,vision")]
    sections: Vec<Section>,
    /// Benchmark a running server over HTTP instead (`http://HOST:PORT`): streamed chat
    /// requests with an image, as vLLM's serving benchmark (TTFT, ITL, throughput).
    #[arg(long)]
    url: Option<String>,
    /// With --url: requests to send.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// With --url: Poisson arrivals at this many requests per second (default: all at once,
    /// `--concurrency`'s first value in flight).
    #[arg(long)]
    request_rate: Option<f64>,
    /// With --url: new tokens per request (fixed with ignore_eos).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// With --url: the API key, if the server needs one.
    #[arg(long)]
    api_key: Option<String>,
    /// With --url: the server's process id, to report its peak RSS (Linux, same machine).
    #[arg(long)]
    server_pid: Option<u32>,
    /// With --url: a soak instead: `--concurrency`'s first value of clients send requests back
    /// to back for this many seconds, above the server's capacity, with slow clients beside
    /// them; reports refusals, completions, latency, slow clients and the server's memory.
    #[arg(long)]
    soak_seconds: Option<u64>,
    /// With --soak-seconds: slow clients of each kind (readers that leave a stream unread,
    /// connections that trickle a body, connections that trickle headers).
    #[arg(long, default_value_t = 2)]
    slow_clients: usize,
    /// With --soak-seconds: how long a slow reader leaves its stream unread.
    #[arg(long, default_value_t = 5)]
    stall_seconds: u64,
    /// Sample every token at temperature 1 with this top-p (seeded) instead of
    /// greedy decoding, to include sampling's cost in the figures.
    #[arg(long)]
    top_p: Option<f32>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Decode,
    Prefix,
    Vision,
}

struct Bench {
    model: Arc<Flamingo>,
    media: u32,
    eoc: u32,
    vocab: u32,
    top_p: Option<f32>,
}

fn image(seed: u64, size: usize) -> Result<PreparedMedia> {
    let px = Tensor::randn(0f32, 1.0, (1, 3, size, size), &Device::Cpu)?;
    Ok(PreparedMedia { key: media_key(&seed.to_le_bytes(), "bench"), pixels: px })
}

impl Bench {
    fn request(&self, prompt: Vec<u32>, media: Vec<PreparedMedia>, max_new: usize) -> Result<ValidRequest> {
        Ok(ValidRequest::new(
            prompt,
            media,
            match self.top_p {
                Some(p) => SamplingParams {
                    strategy: Strategy::Sample { temperature: 1.0, top_k: None, top_p: Some(p), seed: 0 },
                    ..SamplingParams::default()
                },
                None => SamplingParams::default(),
            },
            // No stop token: every request runs to its length.
            StopParams { max_new_tokens: max_new, stop_token_ids: vec![], min_new_tokens: 0 },
            &self.model.spec(),
        )?)
    }

    /// Deterministic text tokens (never special ids).
    fn text(&self, n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 7919)) % (self.vocab - 10)).collect()
    }

    fn scheduler(&self, cfg: EngineConfig) -> Scheduler<Arc<Flamingo>> {
        Scheduler::new(self.model.clone(), cfg)
    }

    /// Aggregate decode tokens/s with `n` sequences decoding together.
    fn decode_throughput(&self, n: usize, steps: usize) -> Result<f64> {
        let cfg = EngineConfig { max_running: n, max_batched_tokens: 4096, ..Default::default() };
        let mut s = self.scheduler(cfg);
        let size = self.model.config().vision.image_size;
        let img = image(1, size)?;
        let mut streams = Vec::new();
        for i in 0..n {
            let mut p = vec![self.media];
            p.extend(self.text(8, i as u32));
            let (tx, rx) = unbounded_channel();
            s.submit(self.request(p, vec![img.clone()], steps + 4)?, tx)?;
            streams.push(rx);
        }
        // Until every sequence is decoding.
        while s.step().decode_tokens < n {}
        let t = Instant::now();
        let mut tokens = 0;
        for _ in 0..steps {
            let r = s.step();
            if r.prefill_tokens > 0 {
                bail!("prefill during the timed decode window");
            }
            tokens += r.decode_tokens;
        }
        Ok(tokens as f64 / t.elapsed().as_secs_f64())
    }

    /// Time from submission to the first token of `req` on scheduler `s`.
    fn ttft(&self, s: &mut Scheduler<Arc<Flamingo>>, req: ValidRequest) -> Result<Duration> {
        Ok(self.ttft_cached(s, req)?.0)
    }

    /// [`Self::ttft`] and the prompt tokens the prefix cache supplied.
    fn ttft_cached(&self, s: &mut Scheduler<Arc<Flamingo>>, req: ValidRequest) -> Result<(Duration, usize)> {
        let (tx, mut rx): (_, UnboundedReceiver<Event>) = unbounded_channel();
        let t = Instant::now();
        s.submit(req, tx)?;
        let mut cached = 0;
        'outer: loop {
            s.step();
            while let Ok(e) = rx.try_recv() {
                match e {
                    Event::Prefilled { cached_tokens } => cached = cached_tokens,
                    Event::Token(_) => break 'outer,
                    _ => {}
                }
            }
        }
        let took = t.elapsed();
        drop(rx);
        s.step(); // cancels and frees it
        Ok((took, cached))
    }

    /// A 4-shot captioning prompt: 4 x (<image> + caption + <|endofchunk|>) + <image> + query.
    fn few_shot(&self, shots: usize, caption: usize, query_seed: u32) -> Vec<u32> {
        let mut p = Vec::new();
        for k in 0..shots {
            p.push(self.media);
            p.extend(self.text(caption, 100 + k as u32));
            p.push(self.eoc);
        }
        p.push(self.media);
        p.extend(self.text(3, query_seed));
        p
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn run(a: BenchArgs) -> Result<()> {
    if let (Some(url), Some(secs)) = (&a.url, a.soak_seconds) {
        let spec = flamingo_server::soak::SoakSpec {
            url: url.clone(),
            api_key: a.api_key.clone(),
            clients: a.concurrency.first().copied().unwrap_or(1),
            duration: Duration::from_secs(secs),
            max_tokens: a.max_tokens,
            slow: a.slow_clients,
            stall: Duration::from_secs(a.stall_seconds),
            server_pid: a.server_pid,
        };
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let report = rt.block_on(flamingo_server::soak::run(&spec))?;
        flamingo_server::soak::print(&spec, &report);
        if let Some(path) = &a.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        }
        return Ok(());
    }
    if let Some(url) = &a.url {
        let spec = flamingo_server::loadgen::LoadSpec {
            url: url.clone(),
            api_key: a.api_key.clone(),
            requests: a.requests,
            concurrency: a.concurrency.first().copied().unwrap_or(1),
            rate: a.request_rate,
            max_tokens: a.max_tokens,
            seed: 0,
        };
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let report = rt.block_on(flamingo_server::loadgen::run(&spec))?;
        flamingo_server::loadgen::print(&spec, &report, a.server_pid.and_then(flamingo_server::loadgen::peak_rss));
        if let Some(path) = &a.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        }
        return Ok(());
    }
    // On a compute pool as the server's engine thread runs, so the figures are the server's.
    flamingo_engine::on_compute_pool(move || run_here(a))
}

fn run_here(a: BenchArgs) -> Result<()> {
    let spec = match a.size.as_str() {
        "mid" => RandomSpec::mid(),
        "tiny" => RandomSpec {
            vision_width: 128,
            vision_layers: 2,
            image_size: 224,
            patch_size: 14,
            d_model: 128,
            n_heads: 4,
            n_layers: 4,
            vocab: 1000,
            cross_attn_every_n_layers: 2,
            perceiver_depth: 2,
        },
        "of3b" => RandomSpec::openflamingo_3b(),
        "of9b" => RandomSpec::openflamingo_9b(),
        other => bail!("unknown --size {other} (mid, of3b, of9b or tiny)"),
    };
    let device = flamingo_model::device::parse_device(&a.device)?;
    let dtype = flamingo_model::device::dtype_for(&a.dtype, &device)?;
    flamingo_model::device::check_supported(&device, dtype)?;
    let kinds = a
        .quantize
        .iter()
        .map(|q| flamingo_model::nn::Quantization::from_name(q).map_err(|e| anyhow::anyhow!("--quantize: {e}")))
        .collect::<Result<Vec<_>>>()?;
    if kinds.is_empty() {
        bail!("--quantize needs at least one of none, f16, q8_0");
    }
    let mut benches = Vec::new();
    for &quantize in &kinds {
        let t = Instant::now();
        let mut model = flamingo_model::nn::quantize_linear_weights(quantize, || build(&spec, &device, dtype))?;
        match a.kv.as_str() {
            "auto" => {}
            "paged" => model.set_paged_kv(true),
            "own" => model.set_paged_kv(false),
            other => bail!("unknown --kv {other} (auto, paged or own)"),
        }
        let kv = if model.kv_pool().is_some() { "paged" } else { "own" };
        let model = Arc::new(model);
        let params = Flamingo::describe_size(&spec);
        let weight_bytes = decode_weight_bytes(&spec, dtype, quantize);
        println!(
            "model: random OpenFlamingo-style, about {:.0} M parameters by shape (ViT {}x{}, MPT {}x{}, xattn every {}), {dtype:?}, linear weights {}, {}, K/V {kv}, built in {:.1} s",
            params as f64 / 1e6,
            spec.vision_layers,
            spec.vision_width,
            spec.n_layers,
            spec.d_model,
            spec.cross_attn_every_n_layers,
            quantize.name(),
            a.device,
            t.elapsed().as_secs_f64()
        );
        println!("weights read per decode step (LM, gated blocks, head): {:.2} GB", weight_bytes as f64 / 1e9);
        let cfg = model.config().clone();
        let b = Bench { model, media: cfg.media_token_id, eoc: cfg.eoc_token_id, vocab: cfg.vocab_rows as u32, top_p: a.top_p };
        let report = serde_json::json!({
            "size": a.size, "device": a.device, "dtype": format!("{dtype:?}").to_lowercase(), "kv": kv, "quantize": quantize.name(),
            "parameters": params, "decode_weight_bytes": weight_bytes,
        });
        benches.push((quantize, b, weight_bytes, report));
    }
    if a.sections.contains(&Section::Decode) {
        let runs: Vec<(&Bench, usize)> = benches.iter().map(|(_, b, w, _)| (b, *w)).collect();
        let tables = decode_tables(&runs, &a)?;
        for ((_, _, _, report), (rows, roofline)) in benches.iter_mut().zip(tables) {
            report["decode"] = rows;
            if let (serde_json::Value::Object(extra), Some(r)) = (roofline, report.as_object_mut()) {
                r.extend(extra);
            }
        }
        if benches.len() > 1 {
            compare_precisions(&benches.iter().map(|(q, _, _, r)| (*q, r)).collect::<Vec<_>>());
        }
    }
    for (q, b, _, report) in &mut benches {
        if kinds.len() > 1 && (a.sections.contains(&Section::Prefix) || a.sections.contains(&Section::Vision)) {
            println!("\n# linear weights {}", q.name());
        }
        if a.sections.contains(&Section::Prefix) {
            report["prefix"] = prefix_table(b, &a)?;
        }
        if a.sections.contains(&Section::Vision) {
            report["vision"] = vision_table(b, &a)?;
        }
    }
    // One precision: the report itself (the shape it has always had); several: one per entry.
    let report = match benches.len() {
        1 => benches.pop().map(|(_, _, _, r)| r).unwrap_or_default(),
        _ => serde_json::json!({ "precisions": benches.into_iter().map(|(_, _, _, r)| r).collect::<Vec<_>>() }),
    };
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// Bytes of the weights one decode step reads whatever the batch: every LM layer, the gated
/// blocks' query/output projections and feed-forwards (their K/V projections run once per
/// image, not per step) and the output head. The batch-1 roofline is this over the device's
/// memory bandwidth.
fn decode_weight_bytes(spec: &RandomSpec, dtype: DType, q: flamingo_model::nn::Quantization) -> usize {
    let d = spec.d_model;
    let inner = 8 * 64;
    let lm = spec.n_layers * 12 * d * d;
    let gated = spec.n_layers / spec.cross_attn_every_n_layers.max(1);
    let xattn = gated * (2 * d * inner + 8 * d * d);
    let (linear, head) = q.bytes_per_weight();
    // Unquantized weights stay in the load dtype.
    let (linear, head) = match q {
        flamingo_model::nn::Quantization::None => (dtype.size_in_bytes() as f64, dtype.size_in_bytes() as f64),
        _ => (linear, head),
    };
    ((lm + xattn) as f64 * linear + (spec.vocab * d) as f64 * head) as usize
}

/// The host's memory read bandwidth, measured now: every thread of rayon's pool (the one the
/// kernels use) sums its chunks of a buffer far larger than the caches (wrapping u64 adds,
/// which vectorise); the best of `passes` full reads, in bytes per second.
fn read_bandwidth(bytes: usize, passes: usize) -> f64 {
    use rayon::prelude::*;
    let buf: Vec<u64> = (0..(bytes / 8) as u64).collect();
    let mut best = 0f64;
    for _ in 0..passes {
        let t = Instant::now();
        let sum = buf.par_chunks(1 << 15).map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((buf.len() * 8) as f64 / secs);
    }
    best
}

/// The decode rows, and (on the CPU) the measured bandwidth and batch-1 roofline.
/// Decode throughput for each model at each concurrency level, with the host's read bandwidth
/// measured before and after (the CPU's roofline: a batch-1 step reads every weight once).
/// Rounds interleave the models and the levels, so a slow phase of a shared machine affects
/// every entry alike; each reports its median round. One `(rows, roofline)` per model.
fn decode_tables(runs: &[(&Bench, usize)], a: &BenchArgs) -> Result<Vec<(serde_json::Value, serde_json::Value)>> {
    let cpu = runs.first().is_some_and(|(b, _)| b.model.device().is_cpu());
    let mut bandwidth = Vec::new();
    if cpu {
        bandwidth.push(read_bandwidth(1 << 30, 5));
    }
    let rounds = a.repeats.max(1);
    let mut measured: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); a.concurrency.len()]; runs.len()];
    for _ in 0..rounds {
        for (m, (b, _)) in runs.iter().enumerate() {
            for (i, &n) in a.concurrency.iter().enumerate() {
                measured[m][i].push(b.decode_throughput(n, a.decode_steps)?);
            }
        }
    }
    if cpu {
        bandwidth.push(read_bandwidth(1 << 30, 5));
    }
    let mode = match a.top_p {
        Some(p) => format!("sampling at temperature 1, top-p {p}"),
        None => "greedy".to_string(),
    };
    let mut out = Vec::new();
    for (&weight_bytes, runs) in runs.iter().map(|(_, w)| w).zip(measured) {
        println!(
            "\n## Aggregate decode throughput ({} steps, {mode}, {:.2} GB of weights per step, median of {rounds} interleaved rounds)\n",
            a.decode_steps,
            weight_bytes as f64 / 1e9
        );
        println!("| sequences | tokens/s | vs first | step time | weight reads | rounds (tokens/s) |");
        println!("|---|---|---|---|---|---|");
        let mut base = None;
        let mut rows = Vec::new();
        for (&n, mut r) in a.concurrency.iter().zip(runs) {
            let all = r.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>().join(", ");
            r.sort_by(f64::total_cmp);
            let tps = r[r.len() / 2];
            let b1 = *base.get_or_insert(tps);
            let step = n as f64 / tps;
            // The weights' bytes over the step time: the bandwidth a memory-bound step would need.
            let gbps = weight_bytes as f64 / step / 1e9;
            println!("| {n} | {tps:.1} | {:.2}x | {:.2} ms | {gbps:.0} GB/s | {all} |", tps / b1, step * 1e3);
            rows.push(serde_json::json!({"sequences": n, "tokens_per_s": tps, "vs_first": tps / b1, "step_ms": step * 1e3, "weight_gb_per_s": gbps, "rounds": r}));
        }
        let rows = serde_json::Value::Array(rows);
        let mut roofline = serde_json::json!({});
        if let (Some(lo), Some(hi)) = (bandwidth.iter().copied().reduce(f64::min), bandwidth.iter().copied().reduce(f64::max)) {
            // The batch-1 roofline: every weight read once per token at the measured bandwidth.
            let roof = hi / weight_bytes as f64;
            println!(
                "\nmemory read bandwidth, measured in this run (before / after the decode rounds, best of 5 reads of 1 GiB each): {:.1} / {:.1} GB/s",
                bandwidth[0] / 1e9,
                bandwidth[bandwidth.len() - 1] / 1e9
            );
            let one = a.concurrency.iter().position(|&n| n == 1).and_then(|i| rows[i]["tokens_per_s"].as_f64());
            match one {
                Some(tps) => println!(
                    "batch-1 roofline: {:.1} GB/s / {:.2} GB per token = {roof:.1} tokens/s; reached {tps:.1} tokens/s = {:.0}% ({:.0}% of the lower bandwidth figure)",
                    hi / 1e9,
                    weight_bytes as f64 / 1e9,
                    100.0 * tps / roof,
                    100.0 * tps / (lo / weight_bytes as f64)
                ),
                None => println!("batch-1 roofline: {roof:.1} tokens/s (no 1-sequence row was measured)"),
            }
            if weight_bytes < 64 << 20 {
                println!("(the weights fit in the CPU caches, so main-memory bandwidth does not bound this size)");
            }
            roofline["read_bandwidth_bytes_per_s"] = serde_json::json!(bandwidth);
            roofline["roofline_tokens_per_s"] = serde_json::json!(roof);
            if let Some(tps) = one {
                roofline["roofline_fraction"] = serde_json::json!(tps / roof);
            }
        }
        out.push((rows, roofline));
    }
    Ok(out)
}

/// With several precisions: each one's decode tokens/s against the first's, level by level.
fn compare_precisions(reports: &[(flamingo_model::nn::Quantization, &serde_json::Value)]) {
    let Some((_, first)) = reports.first() else { return };
    let levels: Vec<u64> =
        first["decode"].as_array().map(|r| r.iter().filter_map(|x| x["sequences"].as_u64()).collect()).unwrap_or_default();
    println!("\n## Precisions compared (decode tokens/s, and the ratio to {})\n", reports[0].0.name());
    let head: Vec<String> = levels.iter().map(|n| format!("{n} seq")).collect();
    println!("| weights | GB per step | {} | batch-1 roofline reached |", head.join(" | "));
    println!("|---|---:|{}---:|", "---:|".repeat(levels.len()));
    let tps = |r: &serde_json::Value, i: usize| r["decode"][i]["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    for (q, r) in reports {
        let cells: Vec<String> = (0..levels.len()).map(|i| format!("{:.1} ({:.2}x)", tps(r, i), tps(r, i) / tps(first, i))).collect();
        let roof = r["roofline_fraction"].as_f64().map(|f| format!("{:.0}%", 100.0 * f)).unwrap_or_else(|| "-".into());
        println!("| {} | {:.2} | {} | {roof} |", q.name(), r["decode_weight_bytes"].as_f64().unwrap_or(0.0) / 1e9, cells.join(" | "));
    }
}

fn prefix_table(b: &Bench, a: &BenchArgs) -> Result<serde_json::Value> {
    let size = b.model.config().vision.image_size;

    // Time to first token, 4-shot prompt, all images already in the vision cache.
    let shots = 4;
    let demos: Vec<PreparedMedia> = (0..shots as u64).map(|k| image(10 + k, size)).collect::<Result<_>>()?;
    let query = image(99, size)?;
    let media = |q: &PreparedMedia| -> Vec<PreparedMedia> {
        let mut m = demos.clone();
        m.push(q.clone());
        m
    };
    let prompt = b.few_shot(shots, 20, 1);
    println!("\n## Time to first token, {shots}-shot prompt ({} tokens, {} images), median of {}\n", prompt.len(), shots + 1, a.repeats);
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut cached_tokens = 0;
    for r in 0..a.repeats {
        // Prefix cache off; vision cache warmed by a first request.
        let mut s = b.scheduler(EngineConfig { prefix_cache_bytes: 0, ..Default::default() });
        b.ttft(&mut s, b.request(b.few_shot(shots, 20, 50 + r as u32), media(&query), 1)?)?;
        cold.push(b.ttft(&mut s, b.request(b.few_shot(shots, 20, 1 + r as u32), media(&query), 1)?)?);
        // Prefix cache on: the same demonstrations, another question.
        let mut s = b.scheduler(EngineConfig::default());
        b.ttft(&mut s, b.request(b.few_shot(shots, 20, 50 + r as u32), media(&query), 1)?)?;
        let (t, c) = b.ttft_cached(&mut s, b.request(b.few_shot(shots, 20, 1 + r as u32), media(&query), 1)?)?;
        warm.push(t);
        cached_tokens = c;
    }
    let (c, w) = (median(cold), median(warm));
    println!("| prefix cache | time to first token | |");
    println!("|---|---|---|");
    println!("| miss (cache off) | {:.0} ms | |", c.as_secs_f64() * 1e3);
    println!("| hit ({cached_tokens} tokens reused) | {:.0} ms | {:.1}x lower |", w.as_secs_f64() * 1e3, c.as_secs_f64() / w.as_secs_f64());
    Ok(serde_json::json!({
        "prompt_tokens": prompt.len(), "miss_ms": c.as_secs_f64() * 1e3, "hit_ms": w.as_secs_f64() * 1e3,
        "cached_tokens": cached_tokens, "hit_speedup": c.as_secs_f64() / w.as_secs_f64(),
    }))
}

fn vision_table(b: &Bench, a: &BenchArgs) -> Result<serde_json::Value> {
    let size = b.model.config().vision.image_size;

    // Repeated image: vision cache on and off, 1-image prompt.
    println!("\n## Time to first token, 1-image prompt (9 tokens), median of {}\n", a.repeats);
    let mut miss = Vec::new();
    let mut hit = Vec::new();
    for r in 0..a.repeats {
        let mut s = b.scheduler(EngineConfig { prefix_cache_bytes: 0, vision_cache_bytes: 0, ..Default::default() });
        let mut p = vec![b.media];
        p.extend(b.text(8, 5));
        let img = image(1000 + r as u64, size)?;
        b.ttft(&mut s, b.request(p.clone(), vec![img.clone()], 1)?)?;
        miss.push(b.ttft(&mut s, b.request(p.clone(), vec![img.clone()], 1)?)?);
        let mut s = b.scheduler(EngineConfig { prefix_cache_bytes: 0, ..Default::default() });
        b.ttft(&mut s, b.request(p.clone(), vec![img.clone()], 1)?)?;
        hit.push(b.ttft(&mut s, b.request(p, vec![img], 1)?)?);
    }
    let (m, h) = (median(miss), median(hit));
    println!("| vision cache | time to first token | |");
    println!("|---|---|---|");
    println!("| miss (cache off) | {:.0} ms | |", m.as_secs_f64() * 1e3);
    println!("| hit | {:.0} ms | {:.1}x lower |", h.as_secs_f64() * 1e3, m.as_secs_f64() / h.as_secs_f64());
    Ok(
        serde_json::json!({"miss_ms": m.as_secs_f64() * 1e3, "hit_ms": h.as_secs_f64() * 1e3, "hit_speedup": m.as_secs_f64() / h.as_secs_f64()}),
    )
}
