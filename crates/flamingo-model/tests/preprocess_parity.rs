//! Our decoding + PIL-exact resize/crop/normalise against open_clip's transform on PIL images
//! (real photographs, RGBA, greyscale, palette, JPEG, an upscaled small image).

mod common;

use common::*;
use flamingo_model::candle::Device;
use flamingo_model::preprocess::{preprocess, ImageLimits};

fn check(filter: impl Fn(&str) -> bool) {
    let dir = fixtures().join("images");
    let expected = expected_tensors(dir.join("pixels.safetensors"));
    assert!(expected.len() >= 6);
    let mut names: Vec<_> = expected.keys().filter(|n| filter(n)).cloned().collect();
    names.sort();
    assert!(!names.is_empty());
    for name in names {
        let bytes = std::fs::read(dir.join(&name)).unwrap();
        let got = preprocess(&bytes, 224, &ImageLimits::default(), &Device::Cpu).unwrap();
        let (d, _) = diff(&got, &expected[&name]);
        eprintln!("{name}: max abs diff {d:e}");
        // The bound is 0.02; we decode JPEG with libjpeg-turbo's decoder (as Pillow)
        // and reproduce PIL's integer resize, so every input is expected to match exactly.
        assert!(d <= 0.02, "{name}: max abs diff {d} > 0.02");
        assert!(d <= 1e-6, "{name}: pixels should match PIL exactly, max abs diff {d}");
    }
}

#[test]
fn pixels_match_open_clip_transform() {
    check(|_| true);
}
