//! Helpers the engine's fixture tests share.

use flamingo_engine::{media_key, PreparedMedia};
use flamingo_model::candle::Tensor;

/// A JSON list of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The prompt's images as the engine takes them, from the reference's pixels `[n, 3, H, W]`
/// (`tag` keeps different pixels apart in the vision cache).
pub fn media_of(pixels: &Tensor, tag: &str) -> Vec<PreparedMedia> {
    let n = pixels.dim(0).expect("pixels");
    (0..n)
        .map(|i| PreparedMedia {
            key: media_key(format!("{tag}-{i}").as_bytes(), "reference pixels"),
            pixels: pixels.get(i).and_then(|p| p.unsqueeze(0)).expect("one image"),
        })
        .collect()
}
