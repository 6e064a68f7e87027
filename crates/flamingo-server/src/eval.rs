//! `flamingo eval`: the shapes world's held-out evaluation set ([`world::eval_set`]) through a
//! model exactly as API users meet it: every example is a `/v1/chat/completions` body (its
//! media as base64 `data:` URLs, the `openflamingo` template, greedy, at most 20 new tokens,
//! stopping at the model's stop tokens) answered in process by the server's own path
//! ([`chat_in_process`]: validation, template, media preparation, engine, response), all
//! submitted to one engine, which batches them. Each reply is scored with
//! [`world::is_correct`]; the table has one row per [`world::EVAL_ROWS`] entry.
//!
//! Two more modes measure what the paper measures beside open-ended generation:
//! - `--mode classify`: the examples whose task has a closed answer set
//!   ([`world::Task::answer_set`]) also as a classification, every candidate answer scored as
//!   the assistant's reply by `/v1/score` ([`score_in_process`]) and the best one taken
//!   (OpenFlamingo's `get_rank_classifications`), next to the generated answer's score on the
//!   same examples.
//! - `--mode rices`: few-shot episodes whose demonstrations come from a pool of training-split
//!   examples registered once as a demonstration set ([`register_in_process`]): the k most
//!   similar to the query's image chosen by the server (`"demonstrations": {"id", "k"}`,
//!   RICES), against k drawn at random from the same pool and sent inline; both generated and
//!   classified.
//!
//! The in-process server stores demonstration sets under a temporary directory, removed at the
//! end: an evaluation never writes into the user's storage.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use base64::Engine as _;
use clap::Args;
use flamingo_server::config::Config;
use flamingo_server::media::MediaItem;
use flamingo_server::routes::{chat_in_process, register_in_process, score_in_process};
use flamingo_server::state::{AppState, ModelSource};
use flamingo_server::template::MediaRef;
use flamingo_server::world::{self, Example, Media, Split, Task, Turn, FEW_SHOT_PROMPT};
use futures::StreamExt;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// New tokens per reply (every answer of the shapes world is shorter).
const MAX_TOKENS: u64 = 20;

#[derive(Args)]
pub struct EvalArgs {
    /// Model directory, or a released checkpoint's name. Default: the model `flamingo serve`
    /// serves without `--model` (the one embedded in the binary).
    #[arg(long)]
    model: Option<String>,
    /// Examples per row (`flamingo shapes --split eval` with the same --n and --seed writes
    /// the same examples).
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// Seed of the evaluation set.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also print up to K wrong replies per row, with the expected answer.
    #[arg(long, value_name = "K")]
    show_errors: Option<usize>,
    /// cpu, cuda or cuda:N (default: the server's, cpu).
    #[arg(long)]
    device: Option<String>,
    /// f32, f16 or bf16 (default: the server's, f32).
    #[arg(long)]
    dtype: Option<String>,
    /// Linear-layer weights: none, f16, q8_0 or q8_0_head (default: the server's, none).
    #[arg(long)]
    quantize: Option<String>,
    /// `generate`: the table of every row, answers generated. `classify`: the rows' examples
    /// with a closed answer set, every candidate answer scored (/v1/score) and the best taken,
    /// beside the generated answers. `rices`: few-shot with demonstrations from a registered
    /// pool, the k most similar to the query's image (RICES) against k at random.
    #[arg(long, value_enum, default_value_t = Mode::Generate)]
    mode: Mode,
    /// classify, rices: how candidates are ranked: `mean` (the mean log-prob of a candidate's
    /// tokens, OpenFlamingo's `normalize_length`; the default) or `sum`.
    #[arg(long, value_enum)]
    rank_by: Option<RankBy>,
    /// rices: demonstrations per query, comma-separated (default 2,4).
    #[arg(long, value_delimiter = ',', value_name = "K,...")]
    shots: Vec<usize>,
    /// rices: training-split examples in each task's demonstration pool (default 32).
    #[arg(long, value_name = "P")]
    pool: Option<usize>,
}

/// What `flamingo eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    Generate,
    Classify,
    Rices,
}

/// How `/v1/score` ranks the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RankBy {
    /// The mean log-prob of the candidate's tokens (`normalized_logprob`).
    Mean,
    /// The sum (`logprob`).
    Sum,
}

impl RankBy {
    fn api(self) -> &'static str {
        match self {
            RankBy::Mean => "normalized_logprob",
            RankBy::Sum => "logprob",
        }
    }

    fn name(self) -> &'static str {
        match self {
            RankBy::Mean => "mean",
            RankBy::Sum => "sum",
        }
    }
}

/// Demonstrations per query in `--mode rices` unless `--shots` says.
const DEFAULT_SHOTS: [usize; 2] = [2, 4];
/// Examples in each task's pool unless `--pool` says.
const DEFAULT_POOL: usize = 32;

/// One example's outcome.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// The reply's text.
    Text(String),
    /// The request was refused as a client's mistake (e.g. a video for a model without frame
    /// embeddings): scored as wrong.
    Refused(String),
}

/// A wrong reply kept for `--show-errors`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Wrong {
    prompt: String,
    expected: String,
    reply: String,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RowTally {
    #[serde(skip)]
    row: &'static str,
    n: usize,
    correct: usize,
    /// Fraction correct, 0 to 1.
    accuracy: f64,
    /// Requests the server refused (counted as wrong).
    failed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<Vec<Wrong>>,
    #[serde(skip)]
    refusals: Vec<String>,
}

/// Scores every example's reply, one tally per row of [`world::EVAL_ROWS`] in that order;
/// keeps up to `keep_errors` wrong replies per row.
pub(crate) fn tally(set: &[(&'static str, Example)], replies: &[Reply], keep_errors: Option<usize>) -> Vec<RowTally> {
    world::EVAL_ROWS
        .iter()
        .map(|&row| {
            let mut t =
                RowTally { row, n: 0, correct: 0, accuracy: 0.0, failed: 0, errors: keep_errors.map(|_| Vec::new()), refusals: Vec::new() };
            for ((_, ex), reply) in set.iter().zip(replies).filter(|((r, _), _)| *r == row) {
                t.n += 1;
                let text = match reply {
                    Reply::Text(text) if world::is_correct(ex.task, text, &ex.answer) => {
                        t.correct += 1;
                        continue;
                    }
                    Reply::Text(text) => text.clone(),
                    Reply::Refused(msg) => {
                        t.failed += 1;
                        if !t.refusals.contains(msg) {
                            t.refusals.push(msg.clone());
                        }
                        format!("(refused: {msg})")
                    }
                };
                if let (Some(errors), Some(k)) = (t.errors.as_mut(), keep_errors) {
                    if errors.len() < k {
                        errors.push(Wrong { prompt: ex.prompt(), expected: ex.answer.clone(), reply: text });
                    }
                }
            }
            t.accuracy = if t.n == 0 { 0.0 } else { t.correct as f64 / t.n as f64 };
            t
        })
        .collect()
}

/// The rows as a JSON object in table order (serde_json's own map would sort them).
struct Rows<'a>(&'a [RowTally]);

impl Serialize for Rows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for t in self.0 {
            m.serialize_entry(t.row, t)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct Report<'a> {
    model: &'a str,
    seed: u64,
    n: usize,
    rows: Rows<'a>,
}

pub(crate) fn report_json(model: &str, seed: u64, n: usize, rows: &[RowTally]) -> Result<String> {
    Ok(serde_json::to_string(&Report { model, seed, n, rows: Rows(rows) })?)
}

pub(crate) fn report_table(rows: &[RowTally]) -> String {
    let width = rows.iter().map(|t| t.row.len()).chain(["row".len()]).max().unwrap_or(3);
    let mut out = format!("{:<width$}  {:>5}  {:>7}  {:>8}\n", "row", "n", "correct", "accuracy");
    for t in rows {
        out += &format!("{:<width$}  {:>5}  {:>7}  {:>7.1}%\n", t.row, t.n, t.correct, 100.0 * t.accuracy);
    }
    for t in rows.iter().filter(|t| t.failed > 0) {
        out += &format!("\n{}: {} of {} requests refused: {}\n", t.row, t.failed, t.n, t.refusals.join("; "));
    }
    for t in rows {
        for w in t.errors.iter().flatten() {
            out += &format!("\n[{}] {}\n  expected: {}\n  reply:    {:?}\n", t.row, w.prompt, w.expected, w.reply);
        }
    }
    out
}

/// The media of `ex` as `data:` URLs, one per item.
fn data_urls(ex: &Example) -> Vec<String> {
    ex.media
        .iter()
        .map(|m| {
            let mime = match m {
                Media::Image(_) => "image/png",
                Media::Video(_) => "image/gif",
            };
            format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(m.encode()))
        })
        .collect()
}

/// A registered demonstration set and how many of its examples a request retrieves.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Retrieve {
    id: String,
    k: usize,
}

fn demonstrations(v: &mut serde_json::Value, demos: Option<&Retrieve>) {
    if let (Some(d), Some(obj)) = (demos, v.as_object_mut()) {
        obj.insert("demonstrations".into(), serde_json::json!({"id": d.id, "k": d.k}));
    }
}

/// The chat body an API user would send for `ex` (with `demos`: its demonstrations retrieved
/// from a registered set).
pub(crate) fn chat_body(ex: &Example, demos: Option<&Retrieve>) -> Result<Vec<u8>> {
    let mut body = serde_json::json!({"messages": ex.messages(&data_urls(ex)), "max_tokens": MAX_TOKENS, "temperature": 0});
    demonstrations(&mut body, demos);
    Ok(serde_json::to_vec(&body)?)
}

/// The `/v1/score` body that ranks `candidates` as the assistant's reply to `ex`'s chat.
pub(crate) fn score_body(ex: &Example, candidates: &[&str], rank_by: RankBy, demos: Option<&Retrieve>) -> Result<Vec<u8>> {
    let mut body = serde_json::json!({"messages": ex.messages(&data_urls(ex)), "candidates": candidates, "rank_by": rank_by.api()});
    demonstrations(&mut body, demos);
    Ok(serde_json::to_vec(&body)?)
}

/// One request of an evaluation (its body is built on the runtime, in parallel).
#[derive(Debug, Clone)]
pub(crate) enum Job {
    /// The reply generated for the chat.
    Chat { ex: Example, demos: Option<Retrieve> },
    /// The best of the task's answer set, ranked by `/v1/score` (its reply is that candidate).
    Classify { ex: Example, rank_by: RankBy, demos: Option<Retrieve> },
}

impl Job {
    fn example(&self) -> &Example {
        match self {
            Job::Chat { ex, .. } | Job::Classify { ex, .. } => ex,
        }
    }
}

/// A client-side refusal (4xx other than 429) is the example's outcome; anything else
/// (overload, shutdown, an internal failure) ends the run.
fn outcome<T>(r: Result<T, flamingo_server::error::ApiError>, reply: impl FnOnce(T) -> String) -> Result<Reply> {
    match r {
        Ok(v) => Ok(Reply::Text(reply(v))),
        Err(e) if e.status.is_client_error() && e.status.as_u16() != 429 => Ok(Reply::Refused(e.message)),
        Err(e) => anyhow::bail!("{} ({})", e.message, e.status),
    }
}

/// One request through the server's own path (chat or score).
async fn answer(st: Arc<AppState>, job: Job) -> Result<Reply> {
    match job {
        Job::Chat { ex, demos } => {
            let body = chat_body(&ex, demos.as_ref())?;
            outcome(chat_in_process(&st, &body).await, |r| r.choices.into_iter().next().map(|c| c.message.content).unwrap_or_default())
        }
        Job::Classify { ex, rank_by, demos } => {
            let candidates = ex.task.answer_set().with_context(|| format!("the {} task has no closed answer set", ex.task.name()))?;
            let body = score_body(&ex, &candidates, rank_by, demos.as_ref())?;
            outcome(score_in_process(&st, &body).await, |r| {
                r.ranking.first().and_then(|&i| r.data.get(i)).map(|d| d.candidate.clone()).unwrap_or_default()
            })
        }
    }
}

/// Every job through one engine, with a progress bar; the replies in the jobs' order.
fn drive(rt: &tokio::runtime::Runtime, st: &Arc<AppState>, label: &str, jobs: &[Job]) -> Result<Vec<Reply>> {
    // Enough requests in flight to keep the engine's batch full while the next ones' media are
    // prepared, well under its waiting queue.
    let engine = &Config::defaults().engine;
    let in_flight = (2 * engine.max_running).clamp(1, engine.max_running + engine.max_waiting);
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{label} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}]"))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let replies = rt.block_on(async {
        // Each job is spawned when the stream pulls it: at most `in_flight` at a time.
        let tasks = jobs.iter().enumerate().map(|(i, job)| {
            let task = tokio::spawn(answer(st.clone(), job.clone()));
            async move { (i, task.await) }
        });
        let mut out: Vec<Option<Reply>> = vec![None; jobs.len()];
        let mut results = futures::stream::iter(tasks).buffer_unordered(in_flight);
        while let Some((i, r)) = results.next().await {
            let reply = r.context("an evaluation task failed")??;
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(reply);
            }
            bar.inc(1);
        }
        out.into_iter().map(|r| r.context("an example got no reply")).collect::<Result<Vec<_>>>()
    });
    bar.finish_and_clear();
    replies
}

/// A fresh directory under the system's temporary one, removed when dropped: where the
/// evaluation's server stores demonstration sets.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("flamingo-eval-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The evaluation's configuration: the server's defaults, the flags' device and dtype, storage
/// under `storage`, and room for a pool of `pool` examples in one set.
fn eval_config(a: &EvalArgs, storage: &Path, pool: usize) -> Config {
    let mut cfg = Config::defaults();
    if let Some(d) = &a.device {
        cfg.model.device = d.clone();
    }
    if let Some(d) = &a.dtype {
        cfg.model.dtype = d.clone();
    }
    if let Some(q) = &a.quantize {
        cfg.model.quantize = q.clone();
    }
    cfg.storage.dir = storage.to_string_lossy().into_owned();
    cfg.limits.max_demonstration_examples = cfg.limits.max_demonstration_examples.max(pool);
    cfg
}

fn load(a: &EvalArgs, cfg: Config) -> Result<(Arc<AppState>, String)> {
    let source = ModelSource::from_config(a.model.as_deref().unwrap_or(&cfg.model.path));
    let name = a.model.clone().unwrap_or_else(|| source.default_name());
    let st = AppState::new(cfg, source.default_name())?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} loading {prefix} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    spinner.set_prefix(name.clone());
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let loaded = st.load(&source);
    spinner.finish_and_clear();
    loaded?;
    Ok((st, name))
}

// ---- --mode classify ----

/// Correct answers out of `n`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Acc {
    correct: usize,
    /// Fraction correct, 0 to 1.
    accuracy: f64,
}

/// Scores replies to examples, counting refusals (as wrong).
#[derive(Debug, Clone, Default)]
struct Counter {
    n: usize,
    correct: usize,
    failed: usize,
    refusals: Vec<String>,
}

impl Counter {
    fn add(&mut self, ex: &Example, reply: &Reply) {
        self.n += 1;
        match reply {
            Reply::Text(text) => self.correct += usize::from(world::is_correct(ex.task, text, &ex.answer)),
            Reply::Refused(msg) => {
                self.failed += 1;
                if !self.refusals.contains(msg) {
                    self.refusals.push(msg.clone());
                }
            }
        }
    }

    fn acc(&self) -> Acc {
        Acc { correct: self.correct, accuracy: if self.n == 0 { 0.0 } else { self.correct as f64 / self.n as f64 } }
    }
}

/// One row of the classification table: the row's examples with a closed answer set, scored
/// generated and classified.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClassifyRow {
    #[serde(skip)]
    row: &'static str,
    n: usize,
    generate: Acc,
    classify: Acc,
    /// Requests the server refused (counted as wrong).
    failed: usize,
    #[serde(skip)]
    refusals: Vec<String>,
}

/// Examples with their rows of [`world::EVAL_ROWS`].
pub(crate) type Rowed = Vec<(&'static str, Example)>;

/// The examples of the evaluation set that a classification can score (a closed answer set),
/// with their rows.
pub(crate) fn closed_examples(set: &[(&'static str, Example)]) -> Rowed {
    set.iter().filter(|(_, ex)| ex.task.answer_set().is_some()).cloned().collect()
}

/// The classification run's jobs: every example generated, then every example classified.
pub(crate) fn classify_jobs(examples: &[(&'static str, Example)], rank_by: RankBy) -> Vec<Job> {
    let chat = examples.iter().map(|(_, ex)| Job::Chat { ex: ex.clone(), demos: None });
    chat.chain(examples.iter().map(|(_, ex)| Job::Classify { ex: ex.clone(), rank_by, demos: None })).collect()
}

/// One row per row of [`world::EVAL_ROWS`] that has examples; `replies` as [`classify_jobs`]
/// orders them (generated, then classified).
pub(crate) fn classify_tally(examples: &[(&'static str, Example)], replies: &[Reply]) -> Vec<ClassifyRow> {
    let (generated, classified) = replies.split_at(examples.len().min(replies.len()));
    world::EVAL_ROWS
        .iter()
        .filter_map(|&row| {
            let (mut g, mut c) = (Counter::default(), Counter::default());
            for (((_, ex), gr), cr) in examples.iter().zip(generated).zip(classified).filter(|(((r, _), _), _)| *r == row) {
                g.add(ex, gr);
                c.add(ex, cr);
            }
            let mut refusals = g.refusals.clone();
            refusals.extend(c.refusals.iter().filter(|m| !g.refusals.contains(m)).cloned());
            (g.n > 0).then(|| ClassifyRow { row, n: g.n, generate: g.acc(), classify: c.acc(), failed: g.failed + c.failed, refusals })
        })
        .collect()
}

/// The candidates of every task that has them, in task order.
fn answer_sets() -> Vec<(&'static str, Vec<&'static str>)> {
    Task::ALL.iter().filter_map(|t| t.answer_set().map(|s| (t.name(), s))).collect()
}

/// Pairs in a given order as a JSON object (serde_json's own map would sort them).
struct Ordered<'a, V>(Vec<(&'a str, &'a V)>);

impl<V: Serialize> Serialize for Ordered<'_, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct ClassifyReport<'a> {
    model: &'a str,
    mode: &'static str,
    seed: u64,
    n: usize,
    rank_by: &'static str,
    candidates: Ordered<'a, Vec<&'static str>>,
    rows: Ordered<'a, ClassifyRow>,
}

pub(crate) fn classify_json(model: &str, seed: u64, n: usize, rank_by: RankBy, rows: &[ClassifyRow]) -> Result<String> {
    let sets = answer_sets();
    Ok(serde_json::to_string(&ClassifyReport {
        model,
        mode: "classify",
        seed,
        n,
        rank_by: rank_by.name(),
        candidates: Ordered(sets.iter().map(|(t, s)| (*t, s)).collect()),
        rows: Ordered(rows.iter().map(|r| (r.row, r)).collect()),
    })?)
}

fn refusal_lines(rows: impl Iterator<Item = (String, usize, usize, Vec<String>)>) -> String {
    let mut out = String::new();
    for (row, failed, of, refusals) in rows.filter(|r| r.1 > 0) {
        out += &format!("\n{row}: {failed} of {of} requests refused: {}\n", refusals.join("; "));
    }
    out
}

pub(crate) fn classify_table(rank_by: RankBy, rows: &[ClassifyRow]) -> String {
    let width = rows.iter().map(|t| t.row.len()).chain(["row".len()]).max().unwrap_or(3);
    let mut out = format!("{:<width$}  {:>5}  {:>8}  {:>8}\n", "row", "n", "generate", "classify");
    for t in rows {
        out += &format!("{:<width$}  {:>5}  {:>7.1}%  {:>7.1}%\n", t.row, t.n, 100.0 * t.generate.accuracy, 100.0 * t.classify.accuracy);
    }
    out += &format!(
        "\nclassify: the best of each task's answers by the {} log-prob of its tokens; candidates: {}\n",
        rank_by.name(),
        answer_sets().iter().map(|(t, s)| format!("{t} {}", s.join("/"))).collect::<Vec<_>>().join(", ")
    );
    out += &refusal_lines(rows.iter().map(|t| (t.row.to_string(), t.failed, 2 * t.n, t.refusals.clone())));
    out
}

// ---- --mode rices ----

/// An image (a video for motion) of a task and its answer.
pub(crate) type Shot = (Media, String);

/// `count` new images of `task` and their answers from `rng`.
fn shots_of(rng: &mut ChaCha8Rng, task: Task, count: usize) -> Vec<Shot> {
    (0..count)
        .map(|_| {
            let mut q = Example::question(rng, task, 0);
            (q.media.swap_remove(0), q.answer)
        })
        .collect()
}

/// Each few-shot task's demonstration pool: `size` examples of the training split (`seed`),
/// never evaluation examples, in [`Task::FEW_SHOT`] order.
pub(crate) fn pools(seed: u64, tasks: &[Task], size: usize) -> Vec<Vec<Shot>> {
    let mut rng = world::rng(seed, Split::Train);
    tasks.iter().map(|&t| shots_of(&mut rng, t, size)).collect()
}

/// Each task's `n` queries from the evaluation split (`seed`).
pub(crate) fn queries(seed: u64, tasks: &[Task], n: usize) -> Vec<Vec<Shot>> {
    let mut rng = world::rng(seed, Split::Eval);
    tasks.iter().map(|&t| shots_of(&mut rng, t, n)).collect()
}

/// A few-shot episode of `task`: `demos` under the `Output:` prompt with their answers, then
/// the query's media; the expected reply is the query's answer.
pub(crate) fn episode(task: Task, demos: &[&Shot], query: &Shot) -> Example {
    let media: Vec<Media> = demos.iter().map(|d| d.0.clone()).chain([query.0.clone()]).collect();
    let mut turns: Vec<Turn> =
        demos.iter().enumerate().map(|(i, d)| Turn { media: i, text: FEW_SHOT_PROMPT.to_string(), reply: Some(d.1.clone()) }).collect();
    turns.push(Turn { media: demos.len(), text: FEW_SHOT_PROMPT.to_string(), reply: None });
    Example { task, shots: Some(demos.len()), question: None, media, turns, answer: query.1.clone() }
}

/// The `/v1/demonstrations` body of a pool: one chat per example (user [image, "Output:"],
/// assistant the answer).
pub(crate) fn pool_body(task: Task, pool: &[Shot]) -> Result<Vec<u8>> {
    let examples: Vec<serde_json::Value> = pool
        .iter()
        .map(|(m, a)| {
            let mut ex = episode(task, &[], &(m.clone(), a.clone()));
            ex.turns[0].reply = Some(a.clone());
            serde_json::json!({"messages": ex.messages(&data_urls(&ex))})
        })
        .collect();
    Ok(serde_json::to_vec(&serde_json::json!({"name": format!("flamingo-eval-{}-pool", task.name()), "examples": examples}))?)
}

/// `k` distinct examples of a pool of `size`, in random order (OpenFlamingo's random
/// demonstrations: `random.sample` of the query set for each query).
pub(crate) fn random_demos(rng: &mut ChaCha8Rng, size: usize, k: usize) -> Vec<usize> {
    rand::seq::index::sample(rng, size, k.min(size)).into_vec()
}

/// How an episode's demonstrations were chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pick {
    Random,
    Rices,
}

/// Where a reply of the RICES run is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    row: usize,
    pick: Pick,
    classify: bool,
}

/// Per task, per query, per entry of `--shots`: the pool examples an episode uses, in order.
pub(crate) type Draws = Vec<Vec<Vec<Vec<usize>>>>;

/// The random demonstrations of every episode, from their own stream (not the pools' or the
/// queries'): `k` distinct examples of the task's pool for each query and `k` of `shots`.
pub(crate) fn random_draws(seed: u64, pools: &[Vec<Shot>], queries: &[Vec<Shot>], shots: &[usize]) -> Draws {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5241_4e44_4f4d_0000);
    pools
        .iter()
        .zip(queries)
        .map(|(pool, qs)| qs.iter().map(|_| shots.iter().map(|&k| random_demos(&mut rng, pool.len(), k)).collect()).collect())
        .collect()
}

/// The examples the server's RICES picks (`demonstrations` with `k`), from the same normalised
/// image embeddings: the `k` of the pool most similar to the query, most similar last.
pub(crate) fn rices_draws(pool_embeddings: &[Vec<Vec<f32>>], query_embeddings: &[Vec<Vec<f32>>], shots: &[usize]) -> Draws {
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    pool_embeddings
        .iter()
        .zip(query_embeddings)
        .map(|(pool, qs)| {
            qs.iter()
                .map(|q| {
                    let sims: Vec<(usize, f32)> = pool.iter().enumerate().map(|(i, e)| (i, dot(e, q))).collect();
                    shots.iter().map(|&k| flamingo_server::demos::rices_order(&sims, k)).collect()
                })
                .collect()
        })
        .collect()
}

/// The fraction of the demonstrations whose answer is the query's, per entry of `--shots`, for
/// one task.
pub(crate) fn same_answer(task: Task, pool: &[Shot], queries: &[Shot], draws: &[Vec<Vec<usize>>], shots: usize) -> Vec<f64> {
    (0..shots)
        .map(|si| {
            let (mut same, mut all) = (0usize, 0usize);
            for (q, d) in queries.iter().zip(draws) {
                for &i in d.get(si).into_iter().flatten() {
                    all += 1;
                    same += usize::from(pool.get(i).is_some_and(|p| world::is_correct(task, &p.1, &q.1)));
                }
            }
            if all == 0 {
                0.0
            } else {
                same as f64 / all as f64
            }
        })
        .collect()
}

/// One row of the RICES table: a task at a number of demonstrations.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RicesRow {
    task: &'static str,
    shots: usize,
    n: usize,
    generate: Picks,
    /// None for a task without a closed answer set.
    classify: Option<Picks>,
    /// The fraction of the demonstrations whose answer is the query's (0 to 1).
    same_answer: Shares,
    /// Requests the server refused (counted as wrong).
    failed: usize,
    #[serde(skip)]
    refusals: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Picks {
    random: Acc,
    rices: Acc,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Shares {
    random: f64,
    rices: f64,
}

/// The RICES run's jobs and where each is scored: for every task, query and number of
/// demonstrations, the episode with the `random` draw of the pool (inline) and the query
/// alone with `{"id": sets[task], "k": k}`, generated and (for a closed answer set)
/// classified. Rows are task-major, then `shots` in order.
pub(crate) fn rices_jobs(
    tasks: &[Task],
    pools: &[Vec<Shot>],
    queries: &[Vec<Shot>],
    sets: &[String],
    shots: &[usize],
    random: &Draws,
    rank_by: RankBy,
) -> Vec<(Job, Slot)> {
    let mut out = Vec::new();
    for (ti, &task) in tasks.iter().enumerate() {
        let (pool, id) = (&pools[ti], &sets[ti]);
        let closed = task.answer_set().is_some();
        for (qi, q) in queries[ti].iter().enumerate() {
            for (si, &k) in shots.iter().enumerate() {
                let row = ti * shots.len() + si;
                let demos: Vec<&Shot> = random[ti][qi][si].iter().filter_map(|&i| pool.get(i)).collect();
                let random = episode(task, &demos, q);
                let alone = episode(task, &[], q);
                let retrieve = Some(Retrieve { id: id.clone(), k });
                out.push((Job::Chat { ex: random.clone(), demos: None }, Slot { row, pick: Pick::Random, classify: false }));
                out.push((Job::Chat { ex: alone.clone(), demos: retrieve.clone() }, Slot { row, pick: Pick::Rices, classify: false }));
                if closed {
                    out.push((Job::Classify { ex: random, rank_by, demos: None }, Slot { row, pick: Pick::Random, classify: true }));
                    out.push((Job::Classify { ex: alone, rank_by, demos: retrieve }, Slot { row, pick: Pick::Rices, classify: true }));
                }
            }
        }
    }
    out
}

/// One row per task and entry of `shots`; `same` holds each row's [`Shares`].
pub(crate) fn rices_tally(tasks: &[Task], shots: &[usize], jobs: &[(Job, Slot)], replies: &[Reply], same: &[Shares]) -> Vec<RicesRow> {
    let mut counters = vec![[Counter::default(), Counter::default(), Counter::default(), Counter::default()]; tasks.len() * shots.len()];
    for ((job, slot), reply) in jobs.iter().zip(replies) {
        if let Some(c) = counters.get_mut(slot.row) {
            c[usize::from(slot.classify) * 2 + usize::from(slot.pick == Pick::Rices)].add(job.example(), reply);
        }
    }
    counters
        .into_iter()
        .enumerate()
        .map(|(row, [gr, gk, cr, ck])| {
            let task = tasks[row / shots.len()];
            let mut refusals = Vec::new();
            for m in [&gr, &gk, &cr, &ck].iter().flat_map(|c| c.refusals.iter()) {
                if !refusals.contains(m) {
                    refusals.push(m.clone());
                }
            }
            RicesRow {
                task: task.name(),
                shots: shots[row % shots.len()],
                n: gr.n,
                generate: Picks { random: gr.acc(), rices: gk.acc() },
                classify: (cr.n > 0).then(|| Picks { random: cr.acc(), rices: ck.acc() }),
                same_answer: same.get(row).copied().unwrap_or(Shares { random: 0.0, rices: 0.0 }),
                failed: gr.failed + gk.failed + cr.failed + ck.failed,
                refusals,
            }
        })
        .collect()
}

#[derive(Serialize)]
struct RicesReport<'a> {
    model: &'a str,
    mode: &'static str,
    seed: u64,
    n: usize,
    pool: usize,
    shots: &'a [usize],
    rank_by: &'static str,
    rows: &'a [RicesRow],
}

pub(crate) fn rices_json(
    model: &str,
    seed: u64,
    n: usize,
    pool: usize,
    shots: &[usize],
    rank_by: RankBy,
    rows: &[RicesRow],
) -> Result<String> {
    Ok(serde_json::to_string(&RicesReport { model, mode: "rices", seed, n, pool, shots, rank_by: rank_by.name(), rows })?)
}

pub(crate) fn rices_table(pool: usize, rank_by: RankBy, rows: &[RicesRow]) -> String {
    let width = rows.iter().map(|t| t.task.len()).chain(["task".len()]).max().unwrap_or(4);
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let pair = |random: f64, rices: f64| format!("{} / {}", pct(random), pct(rices));
    let mut out = format!(
        "{:<width$}  {:>5}  {:>5}  {:>15}  {:>15}  {:>15}\n{:<width$}  {:>5}  {:>5}  {:>15}  {:>15}  {:>15}\n",
        "", "", "", "generate", "classify", "same answer", "task", "shots", "n", "random / RICES", "random / RICES", "random / RICES"
    );
    for t in rows {
        let c = t.classify.map_or("-".to_string(), |c| pair(c.random.accuracy, c.rices.accuracy));
        out += &format!(
            "{:<width$}  {:>5}  {:>5}  {:>15}  {:>15}  {:>15}\n",
            t.task,
            t.shots,
            t.n,
            pair(t.generate.random.accuracy, t.generate.rices.accuracy),
            c,
            pair(t.same_answer.random, t.same_answer.rices)
        );
    }
    out += &format!(
        "\ndemonstrations from a pool of {pool} training-split examples per task: k at random (sent inline) or the k most similar \
         to the query's image (RICES: the pool registered as a demonstration set, used with \"k\"); classify: the best of the \
         task's answers by the {} log-prob of its tokens; same answer: the demonstrations whose answer is the query's\n",
        rank_by.name()
    );
    out += &refusal_lines(rows.iter().map(|t| (format!("{} {}-shot", t.task, t.shots), t.failed, t.n, t.refusals.clone())));
    out
}

// ---- the command ----

/// The flags checked against the mode: the mode's own settings.
struct Settings {
    rank_by: RankBy,
    shots: Vec<usize>,
    pool: usize,
}

fn settings(a: &EvalArgs, cfg: &Config) -> Result<Settings> {
    if a.n == 0 {
        anyhow::bail!("--n: must be at least 1");
    }
    let rices = a.mode == Mode::Rices;
    if a.mode == Mode::Generate && a.rank_by.is_some() {
        anyhow::bail!("--rank-by applies to --mode classify and --mode rices");
    }
    if !rices && (!a.shots.is_empty() || a.pool.is_some()) {
        anyhow::bail!("--shots and --pool apply to --mode rices");
    }
    if a.mode != Mode::Generate && a.show_errors.is_some() {
        anyhow::bail!("--show-errors applies to --mode generate");
    }
    let shots = if a.shots.is_empty() { DEFAULT_SHOTS.to_vec() } else { a.shots.clone() };
    let pool = a.pool.unwrap_or(DEFAULT_POOL);
    if rices {
        if pool == 0 {
            anyhow::bail!("--pool: must be at least 1");
        }
        let most = cfg.limits.max_images_per_request.saturating_sub(1);
        if let Some(k) = shots.iter().find(|&&k| k == 0 || k > pool || k > most) {
            anyhow::bail!("--shots: {k} is not between 1 and the pool ({pool}) or the images a request may have less one ({most})");
        }
    }
    Ok(Settings { rank_by: a.rank_by.unwrap_or(RankBy::Mean), shots, pool })
}

pub fn run(a: EvalArgs) -> Result<()> {
    let storage = TempDir::new()?;
    let pool = if a.mode == Mode::Rices { a.pool.unwrap_or(DEFAULT_POOL) } else { 0 };
    let cfg = eval_config(&a, storage.path(), pool);
    let s = settings(&a, &cfg)?;
    let (st, name) = load(&a, cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match a.mode {
        Mode::Generate => {
            let set = world::eval_set(a.seed, a.n);
            let jobs: Vec<Job> = set.iter().map(|(_, ex)| Job::Chat { ex: ex.clone(), demos: None }).collect();
            let replies = drive(&rt, &st, "eval", &jobs)?;
            let rows = tally(&set, &replies, a.show_errors);
            if a.json {
                println!("{}", report_json(&name, a.seed, a.n, &rows)?);
            } else {
                print!("{}", report_table(&rows));
            }
        }
        Mode::Classify => {
            let (examples, replies) = run_classify(&rt, &st, a.seed, a.n, s.rank_by)?;
            let rows = classify_tally(&examples, &replies);
            if a.json {
                println!("{}", classify_json(&name, a.seed, a.n, s.rank_by, &rows)?);
            } else {
                print!("{}", classify_table(s.rank_by, &rows));
            }
        }
        Mode::Rices => {
            let rows = run_rices(&rt, &st, a.seed, a.n, &s)?;
            if a.json {
                println!("{}", rices_json(&name, a.seed, a.n, s.pool, &s.shots, s.rank_by, &rows)?);
            } else {
                print!("{}", rices_table(s.pool, s.rank_by, &rows));
            }
        }
    }
    // The runtime, then the server, before the storage directory goes.
    drop(rt);
    drop(st);
    drop(storage);
    Ok(())
}

/// The closed-answer examples of the evaluation set and their replies, as [`classify_jobs`]
/// orders them.
fn run_classify(rt: &tokio::runtime::Runtime, st: &Arc<AppState>, seed: u64, n: usize, rank_by: RankBy) -> Result<(Rowed, Vec<Reply>)> {
    let examples = closed_examples(&world::eval_set(seed, n));
    let replies = drive(rt, st, "classify", &classify_jobs(&examples, rank_by))?;
    Ok((examples, replies))
}

/// Each shot's normalised image embedding, as the server computes them for RICES.
async fn embeddings(st: &AppState, shots: &[Shot]) -> Result<Vec<Vec<f32>>> {
    let rt = st.runtime().map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let items: Vec<MediaItem> = shots.iter().map(|_| MediaItem { source: MediaRef::Image(String::new()), param: "eval".into() }).collect();
    let fetched = shots.iter().map(|(m, _)| vec![m.encode()]).collect();
    let prepared = flamingo_server::media::decode(&rt.media, &items, fetched).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    rt.engine.embed(prepared).await.map_err(|e| anyhow::anyhow!("embedding the images: {e}"))
}

/// Registers each task's pool as a demonstration set: the sets' ids.
fn register_pools(rt: &tokio::runtime::Runtime, st: &Arc<AppState>, tasks: &[Task], pools: &[Vec<Shot>]) -> Result<Vec<String>> {
    let mut sets = Vec::with_capacity(tasks.len());
    for (task, pool) in tasks.iter().zip(pools) {
        let body = pool_body(*task, pool)?;
        let (card, _) = rt
            .block_on(register_in_process(st, &body))
            .map_err(|e| anyhow::anyhow!("registering the {} pool: {} ({})", task.name(), e.message, e.status))?;
        sets.push(card.id);
    }
    Ok(sets)
}

/// Registers each few-shot task's pool, then runs every episode of [`rices_jobs`].
fn run_rices(rt: &tokio::runtime::Runtime, st: &Arc<AppState>, seed: u64, n: usize, s: &Settings) -> Result<Vec<RicesRow>> {
    let tasks = Task::FEW_SHOT;
    let pools = pools(seed, &tasks, s.pool);
    let queries = queries(seed, &tasks, n);
    let sets = register_pools(rt, st, &tasks, &pools)?;
    let random = random_draws(seed, &pools, &queries, &s.shots);
    // Which examples RICES uses (the server's selection, recomputed): how often they share the
    // query's answer, beside the random draw's.
    let (pool_emb, query_emb) = rt.block_on(async {
        let (mut p, mut q) = (Vec::new(), Vec::new());
        for (pool, qs) in pools.iter().zip(&queries) {
            p.push(embeddings(st, pool).await?);
            q.push(embeddings(st, qs).await?);
        }
        Ok::<_, anyhow::Error>((p, q))
    })?;
    let rices = rices_draws(&pool_emb, &query_emb, &s.shots);
    let mut same = Vec::with_capacity(tasks.len() * s.shots.len());
    for (ti, &task) in tasks.iter().enumerate() {
        let r = same_answer(task, &pools[ti], &queries[ti], &random[ti], s.shots.len());
        let k = same_answer(task, &pools[ti], &queries[ti], &rices[ti], s.shots.len());
        same.extend(r.into_iter().zip(k).map(|(random, rices)| Shares { random, rices }));
    }
    let jobs = rices_jobs(&tasks, &pools, &queries, &sets, &s.shots, &random, s.rank_by);
    let list: Vec<Job> = jobs.iter().map(|(j, _)| j.clone()).collect();
    let replies = drive(rt, st, "rices", &list)?;
    Ok(rices_tally(&tasks, &s.shots, &jobs, &replies, &same))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_replies_are_scored_per_row() {
        let set = world::eval_set(4, 2);
        // Every expected answer given back is right; an empty reply or a refusal is wrong.
        let right: Vec<Reply> = set.iter().map(|(_, e)| Reply::Text(format!(" {}.", e.answer))).collect();
        let rows = tally(&set, &right, Some(3));
        assert_eq!(rows.iter().map(|t| t.row).collect::<Vec<_>>(), world::EVAL_ROWS);
        for t in &rows {
            assert_eq!((t.n, t.correct, t.failed, t.accuracy), (2, 2, 0, 1.0), "{}", t.row);
            assert_eq!(t.errors.as_ref().map(Vec::len), Some(0));
        }
        let mut mixed: Vec<Reply> = set.iter().map(|_| Reply::Text(String::new())).collect();
        mixed[0] = right[0].clone();
        if let Some(last) = mixed.last_mut() {
            *last = Reply::Refused("no video".into());
        }
        let rows = tally(&set, &mixed, Some(1));
        assert_eq!((rows[0].correct, rows[0].accuracy), (1, 0.5));
        assert_eq!(rows[0].errors.as_ref().map(Vec::len), Some(1), "one wrong reply kept");
        let last = rows.last().map(|t| (t.correct, t.failed, t.refusals.clone()));
        assert_eq!(last, Some((0, 1, vec!["no video".to_string()])));

        let v: serde_json::Value = serde_json::from_str(&report_json("m", 4, 2, &rows).unwrap()).unwrap();
        assert_eq!((v["model"].as_str(), v["seed"].as_u64(), v["n"].as_u64()), (Some("m"), Some(4), Some(2)));
        let obj = v["rows"].as_object().unwrap();
        assert_eq!(obj.len(), world::EVAL_ROWS.len());
        assert_eq!(v["rows"]["colour"]["accuracy"].as_f64(), Some(0.5));
        assert_eq!(v["rows"]["colour"]["errors"][0]["expected"].as_str(), Some(set[1].1.answer.as_str()));
        let table = report_table(&rows);
        assert!(table.contains("colour") && table.contains("50.0%") && table.contains("refused: no video"), "{table}");
    }

    #[test]
    fn bodies_are_chat_requests_with_data_urls() {
        let set = world::eval_set(1, 1);
        for (_, ex) in set.iter().filter(|(r, _)| ["motion", "4-shot"].contains(r)) {
            let v: serde_json::Value = serde_json::from_slice(&chat_body(ex, None).unwrap()).unwrap();
            assert_eq!(v["max_tokens"].as_u64(), Some(MAX_TOKENS));
            let msgs: Vec<flamingo_server::api::ChatMessage> = serde_json::from_value(v["messages"].clone()).unwrap();
            let prompt = flamingo_server::template::openflamingo(&msgs).unwrap();
            assert_eq!(prompt.to_prompt_string(), ex.prompt());
            assert_eq!(prompt.media.len(), ex.media.len());
            let text = v.to_string();
            assert!(text.contains("data:image/png;base64,") || text.contains("data:image/gif;base64,"));
        }
    }

    /// `flamingo eval` and its flags as the command line gives them.
    fn args(line: &[&str]) -> EvalArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: EvalArgs,
        }
        Cli::parse_from(std::iter::once("eval").chain(line.iter().copied())).a
    }

    #[test]
    fn flags_are_checked_against_the_mode() {
        let cfg = Config::defaults();
        let d = settings(&args(&[]), &cfg).unwrap();
        assert_eq!((d.rank_by, d.shots.clone(), d.pool), (RankBy::Mean, DEFAULT_SHOTS.to_vec(), DEFAULT_POOL));
        let r = settings(&args(&["--mode", "rices", "--shots", "1,3", "--pool", "5", "--rank-by", "sum"]), &cfg).unwrap();
        assert_eq!((r.rank_by, r.shots, r.pool), (RankBy::Sum, vec![1, 3], 5));
        for bad in [
            &["--rank-by", "sum"][..],
            &["--mode", "classify", "--shots", "2"],
            &["--mode", "classify", "--pool", "8"],
            &["--mode", "rices", "--show-errors", "2"],
            &["--mode", "rices", "--shots", "0"],
            &["--mode", "rices", "--shots", "9", "--pool", "8"],
            &["--mode", "rices", "--shots", "16"],
            &["--mode", "rices", "--pool", "0"],
            &["--mode", "classify", "--n", "0"],
        ] {
            assert!(settings(&args(bad), &cfg).is_err(), "{bad:?}");
        }
        // A pool larger than a set may hold by default is allowed to this evaluation's server only.
        let dir = Path::new("/nonexistent");
        assert_eq!(eval_config(&args(&[]), dir, 200).limits.max_demonstration_examples, 200);
        assert_eq!(eval_config(&args(&[]), dir, 8).limits.max_demonstration_examples, cfg.limits.max_demonstration_examples);
        assert_eq!(eval_config(&args(&[]), dir, 0).storage.dir(), dir);
    }

    #[test]
    fn closed_answer_sets_cover_every_answer_and_only_they_are_classified() {
        assert_eq!(Task::Colour.answer_set().map(|s| s.len()), Some(6));
        assert_eq!(Task::Shape.answer_set(), Some(vec!["circle", "square", "triangle"]));
        assert_eq!(Task::Count.answer_set(), Some(vec!["1", "2", "3", "4"]));
        assert_eq!(Task::Motion.answer_set(), Some(vec!["left", "right", "up", "down"]));
        assert_eq!(Task::Describe.answer_set(), None);
        let set = world::eval_set(3, 8);
        let mut rng = world::rng(3, Split::Train);
        let train: Vec<Example> = (0..300).map(|_| world::training_example(&mut rng)).collect();
        for ex in set.iter().map(|(_, e)| e).chain(&train) {
            if let Some(s) = ex.task.answer_set() {
                assert!(s.contains(&ex.answer.as_str()), "{:?}: {} not in {s:?}", ex.task, ex.answer);
                // Every candidate is an answer the generated reply could be scored right with.
                assert_eq!(s.iter().filter(|c| world::is_correct(ex.task, c, &ex.answer)).count(), 1);
            }
        }
        let closed = closed_examples(&set);
        assert!(closed.iter().all(|(_, e)| e.task != Task::Describe));
        assert_eq!(closed.iter().filter(|(r, _)| *r == "colour").count(), 8);
        assert!(!closed.iter().any(|(r, _)| *r == "description"));
        assert_eq!(closed.iter().filter(|(r, _)| *r == "4-shot").count(), 6, "colour, shape, count of the 4 cycled tasks");
        let jobs = classify_jobs(&closed, RankBy::Mean);
        assert_eq!(jobs.len(), 2 * closed.len());
        assert!(matches!(jobs[0], Job::Chat { .. }) && matches!(jobs[closed.len()], Job::Classify { .. }));

        // The score body: the example's chat, every candidate, the ranking asked for.
        let ex = &closed[0].1;
        let retrieve = Retrieve { id: "ds-x".into(), k: 2 };
        let v: serde_json::Value =
            serde_json::from_slice(&score_body(ex, &["red", "blue"], RankBy::Sum, Some(&retrieve)).unwrap()).unwrap();
        assert_eq!(v["candidates"], serde_json::json!(["red", "blue"]));
        assert_eq!((v["rank_by"].as_str(), v["demonstrations"]["k"].as_u64()), (Some("logprob"), Some(2)));
        assert_eq!(v["messages"], serde_json::json!(ex.messages(&data_urls(ex))));

        // Scoring: a right generated reply and a wrong classification, a refusal, per row.
        let mut replies: Vec<Reply> = closed.iter().map(|(_, e)| Reply::Text(e.answer.clone())).collect();
        replies.extend(closed.iter().map(|_| Reply::Text("nothing".into())));
        replies[closed.len()] = Reply::Text(closed[0].1.answer.clone());
        replies[1] = Reply::Refused("busy".into());
        let rows = classify_tally(&closed, &replies);
        assert_eq!(
            rows.iter().map(|r| r.row).collect::<Vec<_>>(),
            ["colour", "shape", "count", "motion", "paraphrases", "0-shot", "2-shot", "4-shot"]
        );
        assert_eq!((rows[0].n, rows[0].generate.correct, rows[0].classify.correct, rows[0].failed), (8, 7, 1, 1));
        assert_eq!(rows[0].refusals, ["busy"]);
        let table = classify_table(RankBy::Mean, &rows);
        assert!(table.contains("87.5%") && table.contains("12.5%") && table.contains("colour: 1 of 16 requests refused: busy"), "{table}");
        let text = classify_json("m", 3, 8, RankBy::Mean, &rows).unwrap();
        let at = |key: &str| text.find(&format!("\"{key}\":{{\"n\"")).unwrap_or_else(|| panic!("{key} in {text}"));
        assert!(at("colour") < at("shape") && at("shape") < at("0-shot"), "table order: {text}");
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j["rows"]["colour"]["classify"]["accuracy"].as_f64(), Some(0.125));
        assert_eq!(j["candidates"]["count"], serde_json::json!(["1", "2", "3", "4"]));
    }

    #[test]
    fn pools_come_from_the_training_split_and_random_draws_from_the_pool() {
        let tasks = Task::FEW_SHOT;
        let p = pools(7, &tasks, 10);
        let q = queries(7, &tasks, 5);
        assert_eq!(p, pools(7, &tasks, 10), "seeded");
        assert_eq!((p.len(), p[0].len(), q[2].len()), (4, 10, 5));
        let all_queries: Vec<&Media> = q.iter().flatten().map(|s| &s.0).collect();
        assert!(p.iter().flatten().all(|s| !all_queries.contains(&&s.0)), "no pool example is a query");
        // The queries are the evaluation split's: the colour ones are the colour row's images.
        let set = world::eval_set(7, 5);
        assert!(q[0].iter().zip(&set).all(|(s, (_, e))| e.media[0] == s.0 && e.answer == s.1));

        let shots = [1, 3, 10];
        let draws = random_draws(7, &p, &q, &shots);
        assert_eq!(draws, random_draws(7, &p, &q, &shots));
        for per_task in &draws {
            for per_query in per_task {
                for (d, &k) in per_query.iter().zip(&shots) {
                    let distinct: std::collections::BTreeSet<_> = d.iter().collect();
                    assert_eq!((d.len(), distinct.len()), (k, k));
                    assert!(d.iter().all(|&i| i < 10));
                }
            }
        }
        assert!(draws[0].iter().any(|qd| qd[1] != draws[0][0][1]), "each query draws anew");

        // An episode: the demonstrations under `Output:`, then the query.
        let (a, b) = (&p[0][0], &p[0][1]);
        let ep = episode(Task::Colour, &[a, b], &q[0][0]);
        assert_eq!(ep.prompt(), format!("<image>Output: {}<|endofchunk|><image>Output: {}<|endofchunk|><image>Output:", a.1, b.1));
        assert_eq!((ep.answer.as_str(), ep.media.len(), ep.shots), (q[0][0].1.as_str(), 3, Some(2)));
        assert_eq!(ep.media[2], q[0][0].0);

        // The registered pool: one [image, "Output:"] / answer chat per example.
        let v: serde_json::Value = serde_json::from_slice(&pool_body(Task::Count, &p[2]).unwrap()).unwrap();
        let examples = v["examples"].as_array().unwrap();
        assert_eq!(examples.len(), 10);
        for (e, s) in examples.iter().zip(&p[2]) {
            let m = e["messages"].as_array().unwrap();
            assert_eq!(m.len(), 2);
            assert_eq!((m[0]["role"].as_str(), m[0]["content"][1]["text"].as_str()), (Some("user"), Some(FEW_SHOT_PROMPT)));
            assert!(m[0]["content"][0]["image_url"]["url"].as_str().unwrap().starts_with("data:image/png;base64,"));
            assert_eq!((m[1]["role"].as_str(), m[1]["content"].as_str()), (Some("assistant"), Some(s.1.as_str())));
        }

        // RICES: the most similar last; the share of demonstrations with the query's answer.
        let pool_emb = vec![vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.8, 0.6], vec![0.6, 0.8]]];
        let query_emb = vec![vec![vec![1.0, 0.0]]];
        assert_eq!(rices_draws(&pool_emb, &query_emb, &[1, 3]), vec![vec![vec![vec![0], vec![3, 2, 0]]]]);
        let pool: Vec<Shot> = ["red", "blue", "red", "green"].iter().map(|c| (p[0][0].0.clone(), c.to_string())).collect();
        let query: Vec<Shot> = vec![(q[0][0].0.clone(), "red".into())];
        let same = same_answer(Task::Colour, &pool, &query, &[vec![vec![0], vec![3, 2, 0]]], 2);
        assert_eq!(same, vec![1.0, 2.0 / 3.0]);

        // The jobs: per task, query and k, random and RICES generated, and classified where
        // the answer set is closed; rows task-major.
        let sets: Vec<String> = (0..4).map(|i| format!("ds-{i}")).collect();
        let jobs = rices_jobs(&tasks, &p, &q, &sets, &shots, &draws, RankBy::Mean);
        assert_eq!(jobs.len(), 5 * shots.len() * (4 + 4 + 4 + 2));
        let rices: Vec<&(Job, Slot)> = jobs.iter().filter(|(_, s)| s.pick == Pick::Rices).collect();
        assert!(rices.iter().all(|(j, _)| matches!(j, Job::Chat { demos: Some(_), .. } | Job::Classify { demos: Some(_), .. })));
        assert!(rices.iter().all(|(j, _)| j.example().media.len() == 1));
        let (job, slot) = &jobs[4 * 2 + 1];
        assert_eq!((slot.row, slot.pick, slot.classify), (2, Pick::Rices, false));
        assert!(matches!(job, Job::Chat { demos: Some(Retrieve { k: 10, .. }), .. }));
        let (job, _) = &jobs[0];
        assert_eq!(job.example().media.len(), 2, "1 random demonstration and the query");
        let replies: Vec<Reply> = jobs.iter().map(|(j, _)| Reply::Text(j.example().answer.clone())).collect();
        let same: Vec<Shares> = (0..12).map(|i| Shares { random: 0.0, rices: f64::from(i) }).collect();
        let rows = rices_tally(&tasks, &shots, &jobs, &replies, &same);
        assert_eq!(rows.len(), 12);
        assert_eq!((rows[4].task, rows[4].shots, rows[4].n, rows[4].same_answer.rices), ("shape", 3, 5, 4.0));
        assert!(rows.iter().all(|r| r.generate.rices.accuracy == 1.0 && r.generate.random.accuracy == 1.0));
        assert!(rows.iter().all(|r| r.classify.is_some() == (r.task != "description")));
        let table = rices_table(10, RankBy::Mean, &rows);
        assert!(table.contains("description") && table.contains("100.0% / 100.0%"), "{table}");
    }

    /// The embedded model through the new paths: classification gives one candidate of the
    /// task's set per example; the RICES selection recomputed here is the server's (the score
    /// of the server's `{"id", "k"}` equals that of the recomputed examples sent inline); the
    /// RICES run gives every row.
    #[test]
    fn classification_and_rices_on_the_embedded_model() {
        let storage = TempDir::new().unwrap();
        let a = args(&["--mode", "rices"]);
        let (st, _) = load(&a, eval_config(&a, storage.path(), 0)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();

        let (examples, replies) = run_classify(&rt, &st, 2, 1, RankBy::Mean).unwrap();
        assert_eq!(replies.len(), 2 * examples.len());
        // One example per row, the 0-shot and mixed rows' first task the colour: every row but the description.
        assert_eq!(examples.len(), world::EVAL_ROWS.len() - 1);
        for ((_, ex), r) in examples.iter().zip(&replies[examples.len()..]) {
            match r {
                Reply::Text(c) => assert!(ex.task.answer_set().unwrap().contains(&c.as_str()), "{c:?} for {:?}", ex.task),
                Reply::Refused(m) => panic!("refused: {m}"),
            }
        }
        let rows = classify_tally(&examples, &replies);
        assert_eq!(rows.iter().map(|r| r.n).sum::<usize>(), examples.len());
        assert!(rows[0].classify.correct == 1, "the colour question is the model's easiest");

        // The server's RICES selection is the one recomputed here.
        let tasks = [Task::Colour];
        let pool = pools(1, &tasks, 6);
        let query = queries(1, &tasks, 2);
        let sets = register_pools(&rt, &st, &tasks, &pool).unwrap();
        assert!(std::fs::read_dir(storage.path()).unwrap().next().is_some(), "stored under the temporary directory");
        let (pe, qe) = rt.block_on(async { (embeddings(&st, &pool[0]).await.unwrap(), embeddings(&st, &query[0]).await.unwrap()) });
        let picks = rices_draws(&[pe], &[qe], &[2]);
        for (q, pick) in query[0].iter().zip(&picks[0]) {
            let demos: Vec<&Shot> = pick[0].iter().map(|&i| &pool[0][i]).collect();
            let inline = score_body(&episode(Task::Colour, &demos, q), &["red", "blue"], RankBy::Mean, None).unwrap();
            let retrieve = Retrieve { id: sets[0].clone(), k: 2 };
            let by_id = score_body(&episode(Task::Colour, &[], q), &["red", "blue"], RankBy::Mean, Some(&retrieve)).unwrap();
            let (x, y) =
                rt.block_on(async { (score_in_process(&st, &inline).await.unwrap(), score_in_process(&st, &by_id).await.unwrap()) });
            for (a, b) in x.data.iter().zip(&y.data) {
                assert!((a.logprob - b.logprob).abs() < 1e-4, "{} vs {}", a.logprob, b.logprob);
            }
        }

        let s = Settings { rank_by: RankBy::Mean, shots: vec![1, 2], pool: 4 };
        let rows = run_rices(&rt, &st, 0, 1, &s).unwrap();
        assert_eq!(rows.len(), Task::FEW_SHOT.len() * 2);
        assert!(rows.iter().all(|r| r.n == 1 && r.failed == 0));
        drop(rt);
        drop(st);
        let path = storage.path().to_path_buf();
        drop(storage);
        assert!(!path.exists(), "the temporary storage is removed");
    }
}
