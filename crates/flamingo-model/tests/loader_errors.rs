//! Load errors are errors (naming the file and the key), never panics.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use flamingo_model::candle::{DType, Device, Tensor};
use flamingo_model::load;

/// A private copy of a fixture model directory.
fn copy_model(case: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("flamingo-test-{}-{case}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&model_dir(case), &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn load_err(dir: &Path) -> String {
    match load(dir, &Device::Cpu, DType::F32, &()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites the checkpoint as `checkpoint.safetensors` (which takes precedence) after `edit`.
fn rewrite_checkpoint(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut tensors = flamingo_model::candle::pickle::read_all(dir.join("checkpoint.pt")).unwrap();
    edit(&mut tensors);
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    flamingo_model::candle::safetensors::save(&map, dir.join("checkpoint.safetensors")).unwrap();
}

#[test]
fn missing_key_names_the_key_and_the_file() {
    let dir = copy_model("mpt_x1", "missing");
    rewrite_checkpoint(&dir, |t| t.retain(|(k, _)| k != "perceiver.layers.2.0.to_q.weight"));
    let e = load_err(&dir);
    assert!(e.contains("perceiver.layers.2.0.to_q.weight") && e.contains("checkpoint.safetensors"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn missing_gated_layer_key_points_at_the_checkpoint() {
    let dir = copy_model("mpt_x1", "missing-xattn");
    rewrite_checkpoint(&dir, |t| t.retain(|(k, _)| !k.ends_with("blocks.2.gated_cross_attn_layer.ff_gate")));
    let e = load_err(&dir);
    assert!(e.contains("lang_encoder.transformer.blocks.2.gated_cross_attn_layer.ff_gate"), "{e}");
    assert!(e.contains("checkpoint.safetensors"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn wrong_shape_names_the_key_and_both_shapes() {
    let dir = copy_model("mpt_x1", "shape");
    rewrite_checkpoint(&dir, |t| {
        for (k, v) in t.iter_mut() {
            if k == "perceiver.norm.weight" {
                *v = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
            }
        }
    });
    let e = load_err(&dir);
    assert!(e.contains("perceiver.norm.weight") && e.contains("[3]") && e.contains("checkpoint.safetensors"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn truncated_files_are_errors() {
    for file in ["clip/open_clip_model.safetensors", "checkpoint.pt", "lm/model.safetensors"] {
        let dir = copy_model("mpt_x1", "trunc");
        let p = dir.join(file);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_err(&dir);
        let name = Path::new(file).file_name().unwrap().to_str().unwrap();
        assert!(e.contains(name), "{file}: {e}");
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn missing_files_and_unknown_family() {
    let dir = copy_model("mpt_x1", "files");
    std::fs::remove_file(dir.join("checkpoint.pt")).unwrap();
    assert!(load_err(&dir).contains("checkpoint.pt"));
    std::fs::remove_dir_all(&dir).ok();

    let dir = copy_model("mpt_x1", "family");
    let cfg = dir.join("lm/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"mpt\"", "\"gpt2\"");
    std::fs::write(&cfg, text).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("unknown language-model family `gpt2`") && e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();

    assert!(load_err(Path::new("/nonexistent/model")).contains("not found"));
}

#[test]
fn vocabulary_rows_follow_the_tokenizer_not_the_lm_file() {
    // The MosaicGPT fixture's LM file has more `wte` rows than the tokenizer (as the real
    // mpt-1b-redpajama-200b: 50432 vs 50280); the reference truncates.
    let exp = expected_json("mosaicgpt_x1");
    let file_rows = exp["lm_file_vocab_rows"].as_u64().unwrap();
    let rows = exp["vocab_rows"].as_u64().unwrap();
    assert!(file_rows > rows, "fixture must exercise truncation");
    let loaded = load(&model_dir("mosaicgpt_x1"), &Device::Cpu, DType::F32, &()).unwrap();
    assert_eq!(loaded.model.vocab_size() as u64, rows);
    assert_eq!(loaded.tokenizer.len() as u64, rows);
}

#[test]
fn cross_attn_interval_override_must_match_the_checkpoint() {
    let dir = copy_model("mpt_x2", "toml");
    std::fs::write(dir.join("flamingo.toml"), "cross_attn_every_n_layers = 1\n").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("cross_attn_every_n_layers = 1"), "{e}");
    std::fs::write(dir.join("flamingo.toml"), "cross_attn_every_n_layers = 2\n[vision]\nln_post_on_tokens = true\n").unwrap();
    let m = load(&dir, &Device::Cpu, DType::F32, &()).unwrap();
    assert_eq!(m.model.config().gated_layers, vec![1, 3]);
    assert!(m.model.config().vision.ln_post_on_tokens);
    std::fs::write(dir.join("flamingo.toml"), "bogus = 1\n").unwrap();
    assert!(load_err(&dir).contains("flamingo.toml"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn preprocess_resize_is_read_and_an_unknown_value_is_an_error() {
    use flamingo_model::preprocess::Resize;
    let dir = copy_model("mpt_x1", "resize");
    assert_eq!(load(&dir, &Device::Cpu, DType::F32, &()).unwrap().model.config().resize, Resize::Crop);
    std::fs::write(dir.join("flamingo.toml"), "[preprocess]\nresize = \"stretch\"\n").unwrap();
    assert_eq!(load(&dir, &Device::Cpu, DType::F32, &()).unwrap().model.config().resize, Resize::Stretch);
    std::fs::write(dir.join("flamingo.toml"), "[preprocess]\nresize = \"crop\"\n").unwrap();
    assert_eq!(load(&dir, &Device::Cpu, DType::F32, &()).unwrap().model.config().resize, Resize::Crop);
    std::fs::write(dir.join("flamingo.toml"), "[preprocess]\nresize = \"squash\"\n").unwrap();
    let e = load_err(&dir);
    for want in ["flamingo.toml", "[preprocess] resize", "squash", "\"crop\" or \"stretch\""] {
        assert!(e.contains(want), "{want:?} not in {e}");
    }
    std::fs::write(dir.join("flamingo.toml"), "[preprocess]\nsize = 96\n").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("flamingo.toml") && e.contains("size"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Regression (bug: the loader read `shape()?[0]` of several checkpoint tensors, so a
/// 0-dimensional tensor panicked instead of failing with the file and the key).
#[test]
fn zero_dimensional_tensor_is_an_error_naming_the_file_and_key() {
    for key in [
        "perceiver.layers.0.0.to_q.weight",
        "perceiver.layers.0.1.1.weight",
        "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn.to_q.weight",
        "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.ff.1.weight",
    ] {
        let dir = copy_model("mpt_x1", "scalar");
        rewrite_checkpoint(&dir, |t| {
            let slot = t.iter_mut().find(|(k, _)| k == key).unwrap_or_else(|| panic!("fixture has no {key}"));
            slot.1 = Tensor::new(1f32, &Device::Cpu).unwrap();
        });
        let e = load_err(&dir);
        assert!(e.contains("checkpoint.safetensors") && e.contains(key.trim_start_matches("lang_encoder.")), "{key}: {e}");
        std::fs::remove_dir_all(dir).ok();
    }
}

/// Regression (bug: `dim_head = 0` in flamingo.toml divided by zero, and a `dim_head` that does
/// not divide the cross-attention width was accepted). Both are configuration errors.
#[test]
fn dim_head_zero_or_not_dividing_the_width_is_a_config_error() {
    let inner = |dir: &Path, key: &str| -> usize {
        let t = flamingo_model::candle::pickle::read_all(dir.join("checkpoint.pt")).unwrap();
        t.into_iter().find(|(k, _)| k == key).unwrap().1.dim(0).unwrap()
    };
    let fixture = model_dir("mpt_x1");
    let p_inner = inner(&fixture, "perceiver.layers.0.0.to_q.weight");
    let x_inner = inner(&fixture, "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn.to_q.weight");
    for (section, dim_head) in [("perceiver", 0), ("xattn", 0), ("perceiver", p_inner + 1), ("xattn", x_inner + 1)] {
        let dir = copy_model("mpt_x1", "dim-head");
        std::fs::write(dir.join("flamingo.toml"), format!("[{section}]\ndim_head = {dim_head}\n")).unwrap();
        let e = load_err(&dir);
        assert!(e.contains("dim_head") && e.contains(section), "[{section}] dim_head = {dim_head}: {e}");
        std::fs::remove_dir_all(dir).ok();
    }
}

/// Regression (found by the `model_dir` fuzz target: GPT-NeoX with `num_attention_heads: 0`
/// divided by zero). Head counts that are zero or do not divide the width are configuration
/// errors naming the file, in every family.
#[test]
fn head_counts_that_do_not_divide_the_width_are_config_errors() {
    let cases: [(&str, &str, &str); 6] = [
        ("gptneox_x1", "lm/config.json", "num_attention_heads"),
        ("llama_x1", "lm/config.json", "num_attention_heads"),
        ("llama_x1", "lm/config.json", "num_key_value_heads"),
        ("mpt_x1", "lm/config.json", "n_heads"),
        ("mosaicgpt_x1", "lm/config.json", "n_heads"),
        ("mpt_x1", "clip/open_clip_config.json", "head_width"),
    ];
    for (case, file, key) in cases {
        for value in [0u64, 7] {
            let dir = copy_model(case, "heads");
            let path = dir.join(file);
            let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let slot = if key == "head_width" { &mut v["vision_cfg"][key] } else { &mut v[key] };
            *slot = serde_json::json!(value);
            std::fs::write(&path, v.to_string()).unwrap();
            let e = load_err(&dir);
            assert!(e.contains(file.rsplit('/').next().unwrap()), "{case} {key} = {value}: {e}");
            std::fs::remove_dir_all(dir).ok();
        }
    }
}
