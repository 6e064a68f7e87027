//! Shared helpers for the reference-parity tests. Fixtures live in `tests/fixtures/` at the
//! workspace root, made by `tests/reference/make_fixtures.py` with the real reference code.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use flamingo_model::candle::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn model_dir(case: &str) -> PathBuf {
    fixtures().join("models").join(case)
}

pub fn expected_json(case: &str) -> serde_json::Value {
    let p = model_dir(case).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("read expected.json")).expect("parse expected.json")
}

pub fn expected_tensors(path: PathBuf) -> HashMap<String, Tensor> {
    flamingo_model::candle::safetensors::load(&path, &Device::Cpu).expect("read expected tensors")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// max |a - b| and max |b|.
pub fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let m = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    assert!(a.iter().all(|x| x.is_finite()), "non-finite values");
    (d, m)
}

/// Asserts `max|a-b| <= rel * max(1, max|b|)` (the "1e-4 relative in f32").
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, rel: f32) {
    let (d, m) = diff(a, b);
    let tol = rel * m.max(1.0);
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e} (max |expected| {m})");
    eprintln!("{what}: max abs diff {d:e} (max |expected| {m})");
}
