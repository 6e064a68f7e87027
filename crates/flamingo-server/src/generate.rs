//! `flamingo generate`: one interleaved image/text prompt through the engine (a one-request
//! engine: the same decode loop, sampling and stop-string handling as the server), its flags
//! checked by the server's own validator.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use flamingo_engine::{Engine, EngineConfig};
use flamingo_model::preprocess::ImageLimits;
use flamingo_model::{device, loader};
use flamingo_server::api::{GenParams, StopSpec};
use flamingo_server::error::ApiError;
use flamingo_server::media::MediaSpec;
use flamingo_server::respond::ChoiceStream;
use flamingo_server::validate::{self, Bounds, Kind};

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (clip/, lm/, checkpoint.pt).
    #[arg(long)]
    model: PathBuf,
    /// An image file, once per `<image>` in the prompt, in order.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The prompt, with one `<image>` marker per image, e.g. "<image>Output:".
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// Beam search with this many beams (1 = off).
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Beam-search length penalty (HF semantics: score / generated_len^length_penalty).
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,
    /// Sample with this temperature (greedy when absent).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop when the generated text contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Print one JSON object {"text": ..., "token_ids": [...]} (generated tokens only).
    #[arg(long)]
    json: bool,
    /// auto (bf16 on CUDA, f32 on the CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Linear-layer weights on the CPU: none, f16 (half the bytes, computed in f32), q8_0 (8-bit blocks, the output head in f16) or q8_0_head (the head in 8 bits too).
    #[arg(long, default_value = "none")]
    quantize: String,
}

impl GenerateArgs {
    /// The flags as the generation fields of a completions request.
    fn params(&self) -> GenParams {
        GenParams {
            max_tokens: Some(self.max_new_tokens as u64),
            temperature: self.temperature.map(f64::from),
            top_p: self.top_p.map(f64::from),
            top_k: self.top_k.map(|k| i64::try_from(k).unwrap_or(i64::MAX)),
            seed: Some(self.seed as i64),
            repetition_penalty: Some(f64::from(self.repetition_penalty)),
            num_beams: Some(self.num_beams as u64),
            length_penalty: Some(f64::from(self.length_penalty)),
            stop: Some(StopSpec::Many(self.stop.clone())),
            ..GenParams::default()
        }
    }
}

/// A validation error in the words of the command line (the flag that carries the value).
fn flag_error(e: ApiError) -> anyhow::Error {
    let flag = match e.param.as_deref() {
        Some("max_tokens") => "--max-new-tokens",
        Some("num_beams") => "--num-beams",
        Some("length_penalty") => "--length-penalty",
        Some("temperature") => "--temperature",
        Some("top_p") => "--top-p",
        Some("top_k") => "--top-k",
        Some("repetition_penalty") => "--repetition-penalty",
        Some("stop") => "--stop",
        _ => return anyhow::anyhow!("{}", e.message),
    };
    anyhow::anyhow!("{flag}: {}", e.message)
}

struct Spinner(indicatif::ProgressBar);

impl loader::LoadProgress for Spinner {
    fn stage(&self, message: &str) {
        self.0.set_message(message.to_string());
    }
}

fn load(a: &GenerateArgs) -> Result<flamingo_model::Loaded> {
    let dev = device::parse_device(&a.device)?;
    let dtype = device::dtype_for(&a.dtype, &dev)?;
    device::check_supported(&dev, dtype)?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} loading {prefix}: {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    spinner.set_prefix(a.model.display().to_string());
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let quantize = flamingo_model::nn::Quantization::from_name(&a.quantize).map_err(|e| anyhow::anyhow!("--quantize: {e}"))?;
    let loaded = flamingo_model::nn::quantize_linear_weights(quantize, || loader::load(&a.model, &dev, dtype, &Spinner(spinner.clone())));
    spinner.finish_and_clear();
    loaded.with_context(|| format!("loading model {}", a.model.display()))
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let plan = validate::plan(&a.params(), Kind::Completion, None, &Bounds::cli()).map_err(flag_error)?;
    let loaded = load(&a)?;
    let (model, tok) = (loaded.model, loaded.tokenizer);
    let ids = tok.encode_prompt(&a.prompt)?;
    let n_media = ids.iter().filter(|&&t| t == tok.media_token_id()).count();
    if n_media != a.images.len() {
        anyhow::bail!("the prompt has {n_media} <image> markers but {} --image files were given", a.images.len());
    }
    let spec = MediaSpec::of_model(&model, ImageLimits::default(), 1);
    let mut media = Vec::with_capacity(a.images.len());
    for p in &a.images {
        let bytes = std::fs::read(p).with_context(|| format!("reading image {}", p.display()))?;
        media.push(spec.image(&bytes).with_context(|| format!("image {}", p.display()))?);
    }
    // One request: no KV budget to share, nothing to cache for a later request.
    let cfg = EngineConfig { kv_budget_bytes: usize::MAX, vision_cache_bytes: 0, prefix_cache_bytes: 0, ..EngineConfig::default() };
    let engine = Engine::start(model, cfg);
    let stop_ids = tok.stop_token_ids();
    // One choice: the CLI's bounds allow n = 1 only.
    let req =
        validate::requests(&ids, media, &plan, &stop_ids, engine.spec()).map_err(flag_error)?.into_iter().next().context("no request")?;
    let rx = engine.submit(req)?;
    let answer = ChoiceStream::for_plan(&tok, &plan, &stop_ids);
    let out = answer.collect_blocking(rx).map_err(|e| anyhow::anyhow!("{}", e.to_api(0).message))?;
    if a.json {
        println!("{}", serde_json::json!({"text": out.text, "token_ids": out.ids}));
    } else {
        println!("{}", out.text);
    }
    Ok(())
}
