//! `flamingo parity`: the reference-parity cases (the tiny fixture models of every LM family,
//! made by `tests/reference/make_fixtures.py` with the PyTorch reference) on any device and
//! dtype, through the engine: greedy ids, beam-search ids (3 beams, length penalty 1 and 0) and
//! blank-image greedy ids against the reference's, and the largest logit drift of a whole prompt
//! (from the reference's latents) against the reference's logits. It is what the test suite
//! checks on the CPU, runnable where no Rust toolchain is, e.g. on a GPU host
//! (`scripts/gpu-check.sh`). Exit status 1 when an id differs and `--exact` is given.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use flamingo_engine::{media_key, Engine, EngineConfig, Event, PreparedMedia, SamplingParams, StopParams, ValidRequest};
use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::sampling::Strategy;
use flamingo_model::{Input, Logits};

#[derive(Args)]
pub struct ParityArgs {
    /// The fixture models' folder (each case a model directory with expected.json and
    /// expected.safetensors), e.g. tests/fixtures/models.
    #[arg(long)]
    fixtures: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (auto: bf16 on CUDA).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Where sequences keep their K/V: auto, paged or own.
    #[arg(long, default_value = "auto")]
    kv: String,
    /// Fail (exit 1) unless every id equals the reference's.
    #[arg(long)]
    exact: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn ids(v: &serde_json::Value) -> Result<Vec<u32>> {
    v.as_array().context("an id list")?.iter().map(|x| x.as_u64().map(|i| i as u32).context("an id")).collect()
}

fn generate(engine: &Engine, prompt: &[u32], media: &[PreparedMedia], strategy: Strategy, max_new: usize, stop: u32) -> Result<Vec<u32>> {
    let sampling = SamplingParams { strategy, repetition_penalty: 1.0, logprobs: None };
    let stop = StopParams { max_new_tokens: max_new, stop_token_ids: vec![stop], min_new_tokens: 0 };
    let req = ValidRequest::new(prompt.to_vec(), media.to_vec(), sampling, stop, engine.spec())?;
    let mut rx = engine.submit(req)?;
    let mut out = Vec::new();
    loop {
        match rx.blocking_recv() {
            Some(Event::Token(t)) => out.push(t.id),
            Some(Event::Prefilled { .. }) => {}
            Some(Event::Finished { .. }) => return Ok(out),
            Some(Event::Error(e)) => bail!("generation failed: {e}"),
            Some(Event::Scored { .. } | Event::Pinned { .. }) => bail!("a generation got another task's result"),
            None => bail!("the engine stopped"),
        }
    }
}

fn media_of(pixels: &Tensor, tag: &str) -> Result<Vec<PreparedMedia>> {
    (0..pixels.dim(0)?)
        .map(|i| {
            Ok(PreparedMedia { key: media_key(format!("{tag}-{i}").as_bytes(), "reference pixels"), pixels: pixels.get(i)?.unsqueeze(0)? })
        })
        .collect()
}

/// One case's checks: `(check, equal)` rows and the largest relative logit drift.
fn check_case(dir: &Path, device: &Device, dtype: DType, kv: &str) -> Result<(Vec<(String, bool)>, f32)> {
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let tensors = flamingo_model::candle::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    let tensor = |k: &str| tensors.get(k).with_context(|| format!("{}: no tensor {k}", dir.display()));
    let loaded = flamingo_model::load(dir, device, dtype, &())?;
    let eoc = loaded.tokenizer.eoc_token_id();
    let mut model = loaded.model;
    match kv {
        "auto" => {}
        "paged" => model.set_paged_kv(true),
        "own" => model.set_paged_kv(false),
        other => bail!("unknown --kv {other} (auto, paged or own)"),
    }
    let prompts = exp["prompts"].as_array().context("prompts")?;
    // Logit drift first (the model is moved into the engine afterwards).
    let mut drift = 0f32;
    for p in prompts {
        let name = p["name"].as_str().context("prompt name")?;
        let mut st = model.new_state();
        model.attach_media(&mut st, tensor(&format!("{name}.latents"))?)?;
        let got = model.forward(&mut [&mut st], &[Input::Prompt(&ids(&p["input_ids"])?)], Logits::All)?.to_device(&Device::Cpu)?;
        let want = tensor(&format!("{name}.logits"))?;
        let d = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let m = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
        drift = drift.max(d / m);
    }
    let engine = Engine::start(model, EngineConfig::default());
    let mut rows = Vec::new();
    for p in prompts {
        let name = p["name"].as_str().context("prompt name")?;
        let prompt = ids(&p["input_ids"])?;
        let pixels = tensor(&format!("{name}.vision_x"))?;
        let media = media_of(pixels, name)?;
        let g = &p["greedy"];
        let max_new = g["max_new_tokens"].as_u64().context("max_new_tokens")? as usize;
        rows.push((format!("{name} greedy"), generate(&engine, &prompt, &media, Strategy::Greedy, max_new, eoc)? == ids(&g["ids"])?));
        for key in ["beam3", "beam3_lp0"] {
            let b = &p[key];
            let strategy = Strategy::Beam {
                num_beams: b["num_beams"].as_u64().context("num_beams")? as usize,
                length_penalty: b["length_penalty"].as_f64().context("length_penalty")? as f32,
                early_stopping: false,
            };
            let max_new = b["max_new_tokens"].as_u64().context("max_new_tokens")? as usize;
            rows.push((format!("{name} {key}"), generate(&engine, &prompt, &media, strategy, max_new, eoc)? == ids(&b["ids"])?));
        }
        let blank = media_of(&pixels.zeros_like()?, &format!("{name}-blank"))?;
        rows.push((
            format!("{name} blank greedy"),
            generate(&engine, &prompt, &blank, Strategy::Greedy, max_new, eoc)? == ids(&p["blank_greedy_ids"])?,
        ));
    }
    Ok((rows, drift))
}

pub fn run(a: ParityArgs) -> Result<()> {
    flamingo_engine::on_compute_pool(move || run_here(a))
}

fn run_here(a: ParityArgs) -> Result<()> {
    let device = flamingo_model::device::parse_device(&a.device)?;
    let dtype = flamingo_model::device::dtype_for(&a.dtype, &device)?;
    flamingo_model::device::check_supported(&device, dtype)?;
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&a.fixtures)
        .with_context(|| format!("reading {}", a.fixtures.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.json").is_file() && p.join("expected.safetensors").is_file())
        .collect();
    cases.sort();
    if cases.is_empty() {
        bail!("no fixture cases (folders with expected.json and expected.safetensors) in {}", a.fixtures.display());
    }
    println!("## Reference parity on {} in {dtype:?} (K/V: {})\n", a.device, a.kv);
    println!("| case | ids equal | checks | max logit drift (relative) |");
    println!("|---|---|---|---|");
    let (mut all_equal, mut worst) = (true, 0f32);
    let mut report = Vec::new();
    for dir in &cases {
        let case = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (rows, drift) = check_case(dir, &device, dtype, &a.kv).with_context(|| format!("case {case}"))?;
        let equal = rows.iter().filter(|(_, e)| *e).count();
        let differ: Vec<&str> = rows.iter().filter(|(_, e)| !e).map(|(n, _)| n.as_str()).collect();
        all_equal &= differ.is_empty();
        worst = worst.max(drift);
        let note = if differ.is_empty() { String::new() } else { format!(" (differ: {})", differ.join(", ")) };
        println!("| {case} | {equal}/{} | greedy, beam3, beam3_lp0, blank{note} | {drift:.2e} |", rows.len());
        report.push(serde_json::json!({"case": case, "equal": equal, "checks": rows.len(), "differ": differ, "max_logit_drift": drift}));
    }
    println!("\nall ids equal: {all_equal}; largest logit drift: {worst:.2e}");
    if let Some(path) = &a.json {
        let out = serde_json::json!({"device": a.device, "dtype": format!("{dtype:?}").to_lowercase(), "kv": a.kv,
            "all_ids_equal": all_equal, "max_logit_drift": worst, "cases": report});
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    if a.exact && !all_equal {
        bail!("some ids differ from the reference's");
    }
    Ok(())
}
