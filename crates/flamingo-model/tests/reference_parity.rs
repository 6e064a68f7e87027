//! Stage-by-stage parity with the PyTorch reference (open_flamingo 2.0.1, open_clip 2.20.0,
//! transformers 4.57) on tiny random models of every LM family, with cross-attention every 1 and
//! 2 layers, and prompts with 1 and 3 images. See `tests/reference/make_fixtures.py`. The
//! generated ids (greedy, beam search, blank images) are checked through the engine, the one
//! decode loop: `crates/flamingo-engine/tests/reference_generation.rs`.

mod common;

use common::*;
use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::{load, Input, Logits};

const REL: f32 = 1e-4;

fn check_case(case: &str) {
    let dir = model_dir(case);
    let exp = expected_json(case);
    let tensors = expected_tensors(dir.join("expected.safetensors"));
    let loaded = load(&dir, &Device::Cpu, DType::F32, &()).unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
    let (model, tok) = (&loaded.model, &loaded.tokenizer);

    assert_eq!(tok.media_token_id() as u64, exp["media_token_id"].as_u64().unwrap(), "{case}: <image> id");
    assert_eq!(tok.eoc_token_id() as u64, exp["eoc_token_id"].as_u64().unwrap(), "{case}: <|endofchunk|> id");
    assert_eq!(tok.pad_token_id() as u64, exp["pad_token_id"].as_u64().unwrap(), "{case}: <PAD> id");
    assert_eq!(model.vocab_size() as u64, exp["vocab_rows"].as_u64().unwrap(), "{case}: vocab rows");
    assert_eq!(
        model.config().cross_attn_every_n_layers.map(|n| n as u64),
        exp["cross_attn_every_n_layers"].as_u64(),
        "{case}: inferred cross_attn_every_n_layers"
    );

    for p in exp["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let what = |s: &str| format!("{case}/{name}: {s}");
        let want_ids = ids(&p["input_ids"]);
        let got_ids = tok.encode_prompt(p["text"].as_str().unwrap()).unwrap();
        assert_eq!(got_ids, want_ids, "{}", what("input ids"));

        // Vision tower on the reference's pixels.
        let vision_x = &tensors[&format!("{name}.vision_x")];
        let tokens = model.vision_tokens(vision_x).unwrap();
        assert_close(&what("vision tokens"), &tokens, &tensors[&format!("{name}.vision_tokens")], REL);

        // Vision + perceiver on the reference's pixels.
        let (n, c, h, w) = vision_x.dims4().unwrap();
        let latents = model.encode_media(&vision_x.reshape((n, 1, c, h, w)).unwrap(), 0).unwrap();
        let want_latents = &tensors[&format!("{name}.latents")];
        assert_close(&what("perceiver latents"), &latents, want_latents, REL);

        // Logits at every prompt position, from the reference latents (isolates the LM stage).
        let mut st = model.new_state();
        model.attach_media(&mut st, want_latents).unwrap();
        let logits = model.forward(&mut [&mut st], &[Input::Prompt(&want_ids)], Logits::All).unwrap();
        assert_close(&what("logits"), &logits, &tensors[&format!("{name}.logits")], REL);

        // The same prompt fed in chunks (prefill in pieces + KV cache) gives the same logits.
        let mut st = model.new_state();
        model.attach_media(&mut st, want_latents).unwrap();
        let mut rows = Vec::new();
        for chunk in want_ids.chunks(4) {
            rows.push(model.forward(&mut [&mut st], &[Input::Prompt(chunk)], Logits::All).unwrap());
        }
        let chunked = Tensor::cat(&rows, 0).unwrap();
        assert_close(&what("chunked-prefill logits"), &chunked, &tensors[&format!("{name}.logits")], REL);
    }
}

macro_rules! cases {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            check_case(stringify!($name));
        }
    )*};
}

cases!(mosaicgpt_x1, mosaicgpt_x2, mpt_x1, mpt_x2, gptneox_x1, gptneox_x2, llama_x1, llama_x2);
