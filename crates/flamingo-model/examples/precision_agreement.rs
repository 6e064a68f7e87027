//! How far f16 and q8_0 weights move the reference fixtures' models from f32: for every tiny
//! model in `tests/fixtures/models` (four LM families, cross-attention every 1 and 2 layers)
//! and both of its prompts (1 and 3 images, the reference's pixels), the 12 greedy tokens
//! against the f32 model's, and the largest logit difference over the prompt's positions
//! (absolute, and relative to the largest f32 logit).
//!
//! `cargo run --release -p flamingo-model --example precision_agreement`

use std::path::PathBuf;

use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::nn::{quantize_linear_weights, Quantization};
use flamingo_model::{load, Flamingo, Input, Logits};

const NEW_TOKENS: usize = 12;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Run {
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn run(model: &Flamingo, ids: &[u32], pixels: &Tensor) -> Res<Run> {
    let (n, c, h, w) = pixels.dims4()?;
    let latents = model.encode_media(&pixels.reshape((n, 1, c, h, w))?, 0)?;
    let mut st = model.new_state();
    model.attach_media(&mut st, &latents)?;
    let all = model.forward(&mut [&mut st], &[Input::Prompt(ids)], Logits::All)?;
    let rows = all.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut next = argmax(rows.last().ok_or("no logits")?);
    let mut greedy = vec![next];
    while greedy.len() < NEW_TOKENS {
        let l = model.forward(&mut [&mut st], &[Input::Generated(next)], Logits::Last)?;
        next = argmax(&l.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        greedy.push(next);
    }
    Ok(Run { logits: rows.concat(), greedy })
}

fn main() -> Res<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
    let mut cases: Vec<_> = std::fs::read_dir(&root)?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    cases.sort();
    let precisions = [Quantization::F16, Quantization::Q8_0];
    // Per precision: (prompts with all 12 ids equal, prompts with the first id equal, max abs
    // logit drift, max relative drift).
    let mut totals = vec![(0usize, 0usize, 0f32, 0f32); precisions.len()];
    let mut prompts = 0;
    println!(
        "| case / prompt | {} |",
        precisions.iter().map(|q| format!("{} ids equal | {} max logit drift", q.name(), q.name())).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---|---|".repeat(precisions.len()));
    for dir in &cases {
        let case = dir.file_name().and_then(|s| s.to_str()).unwrap_or("?").to_string();
        let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
        let tensors = flamingo_model::candle::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
        let base = load(dir, &Device::Cpu, DType::F32, &())?;
        let others: Vec<_> = precisions
            .iter()
            .map(|&q| quantize_linear_weights(q, || load(dir, &Device::Cpu, DType::F32, &())))
            .collect::<Result<_, _>>()?;
        for p in exp["prompts"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or("?");
            let ids: Vec<u32> = p["input_ids"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).map(|v| v as u32).collect();
            let pixels = tensors.get(&format!("{name}.vision_x")).ok_or_else(|| format!("{case}: no {name}.vision_x"))?;
            let want = run(&base.model, &ids, pixels)?;
            let scale = want.logits.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let mut cells = Vec::new();
            for (i, other) in others.iter().enumerate() {
                let got = run(&other.model, &ids, pixels)?;
                let drift = got.logits.iter().zip(&want.logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let same = got.greedy.iter().zip(&want.greedy).take_while(|(a, b)| a == b).count();
                let t = &mut totals[i];
                t.0 += usize::from(same == NEW_TOKENS);
                t.1 += usize::from(same > 0);
                t.2 = t.2.max(drift);
                t.3 = t.3.max(drift / scale);
                cells.push(format!("{same}/{NEW_TOKENS} | {drift:.2e} ({:.2}%)", 100.0 * drift / scale));
            }
            prompts += 1;
            println!("| {case} / {name} | {} |", cells.join(" | "));
        }
    }
    println!();
    for (q, t) in precisions.iter().zip(&totals) {
        println!(
            "{}: all {NEW_TOKENS} greedy ids equal to f32 on {}/{prompts} prompts ({:.0}%), the first id on {}/{prompts}; max logit drift {:.2e} ({:.2}% of the largest logit)",
            q.name(),
            t.0,
            100.0 * t.0 as f64 / prompts as f64,
            t.1,
            t.2,
            100.0 * t.3
        );
    }
    Ok(())
}
