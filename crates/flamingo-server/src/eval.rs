//! `flamingo eval`: the shapes world's held-out evaluation set ([`world::eval_set`]) through a
//! model exactly as API users meet it: every example is a `/v1/chat/completions` body (its
//! media as base64 `data:` URLs, the `openflamingo` template, greedy, at most 20 new tokens,
//! stopping at the model's stop tokens) answered in process by the server's own path
//! ([`chat_in_process`]: validation, template, media preparation, engine, response), all
//! submitted to one engine, which batches them. Each reply is scored with
//! [`world::is_correct`]; the table has one row per [`world::EVAL_ROWS`] entry.

use std::sync::Arc;

use anyhow::{Context, Result};
use base64::Engine as _;
use clap::Args;
use flamingo_server::config::Config;
use flamingo_server::routes::chat_in_process;
use flamingo_server::state::{AppState, ModelSource};
use flamingo_server::world::{self, Example, Media};
use futures::StreamExt;
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
}

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

/// The chat body an API user would send for `ex`.
pub(crate) fn body(ex: &Example) -> Result<Vec<u8>> {
    let urls: Vec<String> = ex
        .media
        .iter()
        .map(|m| {
            let mime = match m {
                Media::Image(_) => "image/png",
                Media::Video(_) => "image/gif",
            };
            format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(m.encode()))
        })
        .collect();
    let body = serde_json::json!({"messages": ex.messages(&urls), "max_tokens": MAX_TOKENS, "temperature": 0});
    Ok(serde_json::to_vec(&body)?)
}

/// One example through the server's chat path. A client-side refusal (4xx other than 429) is
/// the example's outcome; anything else (overload, shutdown, an internal failure) ends the run.
async fn answer(st: Arc<AppState>, ex: Example) -> Result<Reply> {
    let body = body(&ex)?;
    match chat_in_process(&st, &body).await {
        Ok(r) => Ok(Reply::Text(r.choices.into_iter().next().map(|c| c.message.content).unwrap_or_default())),
        Err(e) if e.status.is_client_error() && e.status.as_u16() != 429 => Ok(Reply::Refused(e.message)),
        Err(e) => anyhow::bail!("{} ({})", e.message, e.status),
    }
}

fn load(a: &EvalArgs) -> Result<(Arc<AppState>, String)> {
    let mut cfg = Config::defaults();
    if let Some(d) = &a.device {
        cfg.model.device = d.clone();
    }
    if let Some(d) = &a.dtype {
        cfg.model.dtype = d.clone();
    }
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

pub fn run(a: EvalArgs) -> Result<()> {
    if a.n == 0 {
        anyhow::bail!("--n: must be at least 1");
    }
    let (st, name) = load(&a)?;
    let set = world::eval_set(a.seed, a.n);
    // Enough requests in flight to keep the engine's batch full while the next ones' media are
    // prepared, well under its waiting queue.
    let engine = &Config::defaults().engine;
    let in_flight = (2 * engine.max_running).clamp(1, engine.max_running + engine.max_waiting);

    let bar = indicatif::ProgressBar::new(set.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("eval {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let replies: Vec<Reply> = rt.block_on(async {
        // Each example is spawned when the stream pulls it: at most `in_flight` at a time.
        let tasks = set.iter().enumerate().map(|(i, (_, ex))| {
            let task = tokio::spawn(answer(st.clone(), ex.clone()));
            async move { (i, task.await) }
        });
        let mut out: Vec<Option<Reply>> = vec![None; set.len()];
        let mut results = futures::stream::iter(tasks).buffer_unordered(in_flight);
        while let Some((i, r)) = results.next().await {
            let reply = r.context("an evaluation task failed")??;
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(reply);
            }
            bar.inc(1);
        }
        out.into_iter().map(|r| r.context("an example got no reply")).collect::<Result<Vec<_>>>()
    })?;
    bar.finish_and_clear();

    let rows = tally(&set, &replies, a.show_errors);
    if a.json {
        println!("{}", report_json(&name, a.seed, a.n, &rows)?);
    } else {
        print!("{}", report_table(&rows));
    }
    Ok(())
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
            let v: serde_json::Value = serde_json::from_slice(&body(ex).unwrap()).unwrap();
            assert_eq!(v["max_tokens"].as_u64(), Some(MAX_TOKENS));
            let msgs: Vec<flamingo_server::api::ChatMessage> = serde_json::from_value(v["messages"].clone()).unwrap();
            let prompt = flamingo_server::template::openflamingo(&msgs).unwrap();
            assert_eq!(prompt.to_prompt_string(), ex.prompt());
            assert_eq!(prompt.media.len(), ex.media.len());
            let text = v.to_string();
            assert!(text.contains("data:image/png;base64,") || text.contains("data:image/gif;base64,"));
        }
    }
}
