//! Stage-by-stage parity with transformers' `IdeficsForVisionText2Text` (4.46.3) on tiny random
//! IDEFICS models: cross-attention every 1 and 2 layers, `alpha_type` float and vector,
//! `qk_layer_norms` on and off (perceiver and gated blocks), one file and sharded safetensors.
//! Prompts built by the real `IdeficsProcessor`: text before the first image, two and three
//! images (two consecutive ones sharing a fake token), and `</s>` between turns (the tokens after
//! it attend to no image until the next). See `tests/reference/make_idefics_fixtures.py`; the
//! generated ids are checked through the engine (`crates/flamingo-engine/tests/`).

mod common;

use common::*;
use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::{load, Input, LoadedFiles, Logits, ModelFamily};

const REL: f32 = 1e-4;

fn case_dir(case: &str) -> std::path::PathBuf {
    fixtures().join("idefics").join(case)
}

fn check_case(case: &str) {
    let dir = case_dir(case);
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tensors = expected_tensors(dir.join("expected.safetensors"));
    let loaded = load(&dir, &Device::Cpu, DType::F32, &()).unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
    assert!(matches!(loaded.files, LoadedFiles::Idefics(_)), "{case}: loaded as another layout");
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let cfg = model.config();
    assert_eq!(cfg.model_family, ModelFamily::Idefics);
    assert_eq!(tok.media_token_id() as u64, exp["image_token_id"].as_u64().unwrap(), "{case}: <image> id");
    assert_eq!(tok.eoc_token_id() as u64, exp["end_of_utterance_id"].as_u64().unwrap(), "{case}: <end_of_utterance> id");
    assert_eq!(model.vocab_size() as u64, exp["vocab_size"].as_u64().unwrap() + 2, "{case}: embedding rows");
    let interval = exp["cross_layer_interval"].as_u64().unwrap() as usize;
    let want_gated: Vec<usize> = (0..model.num_layers()).filter(|i| i % interval == 0).collect();
    assert_eq!(cfg.gated_layers, want_gated, "{case}: gated layers (i % n == 0)");

    // The vision tower (class token kept) and the perceiver on the first prompt's images.
    let pv = &tensors["text_first.pixel_values"];
    let hidden = model.vision_tokens(pv).unwrap();
    assert_close(&format!("{case}: vision last_hidden_state"), &hidden, &tensors["vision.last_hidden_state"], REL);
    let (n, c, h, w) = pv.dims4().unwrap();
    let latents = model.encode_media(&pv.reshape((n, 1, c, h, w)).unwrap(), 0).unwrap();
    assert_close(&format!("{case}: perceiver latents"), &latents, &tensors["perceiver.latents"], REL);

    for (name, p) in exp["prompts"].as_object().unwrap() {
        let what = |s: &str| format!("{case}/{name}: {s}");
        let want_ids = ids(&p["input_ids"]);
        // The processor writes `<s>` and encodes without the post-processor; the raw prompt is
        // the rest of that text.
        let text = p["text"].as_str().unwrap();
        let raw = text.strip_prefix("<s>").expect("the processor's text starts with <s>");
        assert_eq!(tok.encode_prompt(raw).unwrap(), want_ids, "{}", what("input ids"));

        let pv = &tensors[&format!("{name}.pixel_values")];
        // The model's own preprocessing of the prompt's image files gives the processor's pixels.
        let files: Vec<&str> = p["items"].as_array().unwrap().iter().filter_map(|i| i.as_str()).filter(|i| i.ends_with(".png")).collect();
        let size = cfg.vision.image_size;
        for (k, f) in files.iter().enumerate() {
            let bytes = std::fs::read(fixtures().join("images").join(f)).unwrap();
            let img = flamingo_model::preprocess::decode(&bytes, &Default::default()).unwrap();
            let ours = Tensor::from_vec(flamingo_model::preprocess::pixels(&img, size, cfg.resize), (3, size, size), &Device::Cpu).unwrap();
            assert_close(&what(&format!("pixels of {f}")), &ours, &pv.get(k).unwrap(), 1e-6);
        }
        assert_eq!(files.len(), pv.dim(0).unwrap(), "{}", what("one pixel tensor per image"));
        let (n, c, h, w) = pv.dims4().unwrap();
        let latents = model.encode_media(&pv.reshape((n, 1, c, h, w)).unwrap(), 0).unwrap();
        let want = &tensors[&format!("{name}.logits")];
        let mut st = model.new_state();
        model.attach_media(&mut st, &latents).unwrap();
        let logits = model.forward(&mut [&mut st], &[Input::Prompt(&want_ids)], Logits::All).unwrap();
        assert_close(&what("logits"), &logits, want, REL);

        // In chunks (the media state, `</s>` reset included, carries across them).
        for size in [1, 3, 5] {
            let mut st = model.new_state();
            model.attach_media(&mut st, &latents).unwrap();
            let rows: Vec<Tensor> =
                want_ids.chunks(size).map(|c| model.forward(&mut [&mut st], &[Input::Prompt(c)], Logits::All).unwrap()).collect();
            assert_close(&what(&format!("logits in chunks of {size}")), &Tensor::cat(&rows, 0).unwrap(), want, REL);
        }

        // Greedy decoding by hand (the engine's loop is tested in flamingo-engine): each step's
        // argmax is the reference's id.
        let mut st = model.new_state();
        model.attach_media(&mut st, &latents).unwrap();
        let mut last = model.forward(&mut [&mut st], &[Input::Prompt(&want_ids)], Logits::Last).unwrap();
        let mut got = Vec::new();
        for _ in 0..exp["greedy_max_new_tokens"].as_u64().unwrap() {
            let t = last.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
            got.push(t);
            if Some(t) == tok.eos_token_id() {
                break;
            }
            last = model.forward(&mut [&mut st], &[Input::Generated(t)], Logits::Last).unwrap();
        }
        assert_eq!(got, ids(&p["greedy"]), "{}", what("greedy ids"));
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

cases!(idefics_x1, idefics_x2, idefics_x2_qk);

/// Load errors name the file and the key.
#[test]
fn a_missing_tensor_names_the_key_and_the_file() {
    let tmp = copy_case("idefics_x1");
    // Drop one gated block's alpha from the weights.
    let w = tmp.join("model.safetensors");
    let mut t = flamingo_model::candle::safetensors::load(&w, &Device::Cpu).unwrap();
    t.remove("model.gated_cross_attn_layers.1.alpha_dense").expect("key present");
    flamingo_model::candle::safetensors::save(&t, &w).unwrap();
    let err = load(&tmp, &Device::Cpu, DType::F32, &()).err().expect("must fail").to_string();
    assert!(err.contains("model.gated_cross_attn_layers.1.alpha_dense") && err.contains("model.safetensors"), "{err}");
    // A config the model cannot run is refused naming config.json and the key.
    let cfg = tmp.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"alpha_type\": \"float\"", "\"alpha_type\": \"matrix\"");
    std::fs::write(&cfg, text).unwrap();
    let err = load(&tmp, &Device::Cpu, DType::F32, &()).err().expect("must fail").to_string();
    assert!(err.contains("config.json") && err.contains("alpha_type"), "{err}");
}

/// A scratch copy of a fixture case's directory.
fn copy_case(case: &str) -> std::path::PathBuf {
    let tmp = tempdir();
    for f in std::fs::read_dir(case_dir(case)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.join(f.file_name().unwrap())).unwrap();
    }
    tmp
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("idefics-test-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Half-precision weight files (as the releases ship bf16) are converted to the run's dtype:
/// the f16 copy of a fixture loads in f32 and its logits stay within f16 rounding of the
/// reference's.
#[test]
fn half_precision_weight_files_are_converted() {
    let src = case_dir("idefics_x1");
    let tmp = copy_case("idefics_x1");
    let w = tmp.join("model.safetensors");
    let t = flamingo_model::candle::safetensors::load(&w, &Device::Cpu).unwrap();
    let half: std::collections::HashMap<String, Tensor> = t.into_iter().map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap())).collect();
    flamingo_model::candle::safetensors::save(&half, &w).unwrap();
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("expected.json")).unwrap()).unwrap();
    let tensors = expected_tensors(src.join("expected.safetensors"));
    let loaded = load(&tmp, &Device::Cpu, DType::F32, &()).unwrap_or_else(|e| panic!("f16 files: {e}"));
    let m = &loaded.model;
    let p = &exp["prompts"]["two_images"];
    let pv = &tensors["two_images.pixel_values"];
    let (n, c, h, w) = pv.dims4().unwrap();
    let latents = m.encode_media(&pv.reshape((n, 1, c, h, w)).unwrap(), 0).unwrap();
    let mut st = m.new_state();
    m.attach_media(&mut st, &latents).unwrap();
    let logits = m.forward(&mut [&mut st], &[Input::Prompt(&ids(&p["input_ids"]))], Logits::All).unwrap();
    let (d, _) = diff(&logits, &tensors["two_images.logits"]);
    assert!(d > 0.0 && d < 0.1, "f16-rounded weights: max logit diff {d}");
}
