//! Our decoding + PIL-exact resize/crop/normalise against open_clip's transform on PIL images
//! (real photographs, RGBA, greyscale, palette, JPEG, an upscaled small image), and the stretch
//! preprocessing (`[preprocess] resize = "stretch"`) against PIL's
//! `convert("RGB").resize((96, 96), BICUBIC)` + the same normalisation.

mod common;

use common::*;
use flamingo_model::candle::Device;
use flamingo_model::preprocess::{preprocess, preprocess_with, ImageLimits, Resize};

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

#[test]
fn stretch_matches_pil() {
    let dir = fixtures().join("stretch");
    let expected = expected_tensors(dir.join("pixels.safetensors"));
    let mut names: Vec<_> = expected.keys().cloned().collect();
    names.sort();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        let bytes = std::fs::read(dir.join(&name)).unwrap();
        let got = preprocess_with(&bytes, 96, Resize::Stretch, &ImageLimits::default(), &Device::Cpu).unwrap();
        let (d, _) = diff(&got, &expected[&name]);
        eprintln!("{name} (stretch): max abs diff {d:e}");
        // The same bounds as the crop path above.
        assert!(d <= 0.02, "{name}: max abs diff {d} > 0.02");
        assert!(d <= 1e-6, "{name}: pixels should match PIL exactly, max abs diff {d}");
        // And the crop path is not what was recorded (the fixture tells the two apart).
        let crop = preprocess(&bytes, 96, &ImageLimits::default(), &Device::Cpu).unwrap();
        assert!(diff(&crop, &expected[&name]).0 > 0.1, "{name}: crop and stretch agree");
    }
}

/// Pillow runs the vertical pass first when an image shrinks vertically by more than twice what
/// it shrinks horizontally: a portrait image more than 2:1 tall, downscaled, under open_clip's
/// own transform (the 224 fixtures above have no such image).
#[test]
fn crop_of_a_tall_portrait_matches_open_clip() {
    let dir = fixtures().join("stretch");
    let expected = expected_tensors(dir.join("crop.safetensors"));
    assert!(!expected.is_empty());
    for (name, want) in &expected {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let got = preprocess(&bytes, 96, &ImageLimits::default(), &Device::Cpu).unwrap();
        let (d, _) = diff(&got, want);
        eprintln!("{name} (crop at 96): max abs diff {d:e}");
        assert!(d <= 0.02, "{name}: max abs diff {d} > 0.02");
        assert!(d <= 1e-6, "{name}: pixels should match PIL exactly, max abs diff {d}");
    }
}
