//! IDEFICS's image preprocessing (`[preprocess] resize = "stretch_on_white"`) against
//! transformers 4.46.3's `IdeficsImageProcessor(image_size=224, image_mean=CLIP mean,
//! image_std=CLIP std)` on `PIL.Image.open(file)` (Pillow 13.0.0): `convert_to_rgb` (RGB as is,
//! any other mode `convert("RGBA")` composited on opaque white) -> PIL bicubic resize to
//! 224 x 224 (aspect ratio not kept) -> `/255` -> CLIP normalisation.
//! Fixture: `tests/fixtures/idefics/pixels.safetensors`, inputs `tests/fixtures/images/`.

mod common;

use common::*;
use flamingo_model::candle::Device;
use flamingo_model::preprocess::{composite_on_white, decode, preprocess_with, ImageLimits, PilMode, Resize};

const IMAGES: [&str; 7] = ["camera.png", "chelsea.png", "coffee.jpg", "coffee.png", "palette.png", "rgba.png", "small.png"];

#[test]
fn stretch_on_white_matches_idefics_image_processor() {
    let dir = fixtures().join("images");
    let expected = expected_tensors(fixtures().join("idefics").join("pixels.safetensors"));
    let mut names: Vec<_> = expected.keys().cloned().collect();
    names.sort();
    assert_eq!(names, IMAGES, "the fixture's images");
    for name in names {
        let bytes = std::fs::read(dir.join(&name)).unwrap();
        let got = preprocess_with(&bytes, 224, Resize::StretchOnWhite, &ImageLimits::default(), &Device::Cpu).unwrap();
        assert_eq!(got.dims(), &[3, 224, 224]);
        let (d, _) = diff(&got, &expected[&name]);
        eprintln!("{name} (stretch_on_white): max abs diff {d:e}");
        // The bound of the other parity tests (`preprocess_parity.rs`), JPEG included: we decode
        // JPEG with libjpeg-turbo's decoder as Pillow does. One pixel level is
        // 1 / 255 / std >= 0.0142 after normalisation, so a max abs diff <= 1e-6 (float rounding
        // of `/255` and the normalisation only) means no level of any pixel differs.
        assert!(d <= 1e-6, "{name}: pixels should match transformers exactly, max abs diff {d}");

        // RGB images are not composited (the plain stretch); the others are, and for the RGBA
        // image with varied alpha that is not the same as dropping alpha.
        let stretch = preprocess_with(&bytes, 224, Resize::Stretch, &ImageLimits::default(), &Device::Cpu).unwrap();
        let from_stretch = diff(&stretch, &expected[&name]).0;
        match name.as_str() {
            "rgba.png" => assert!(from_stretch > 0.1, "{name}: compositing on white made no difference"),
            // Opaque (L, palette without transparency): compositing changes nothing.
            _ => assert!(from_stretch <= 1e-6, "{name}: {from_stretch}"),
        }
    }
}

/// A palette PNG with a `tRNS` chunk (shorter than the palette, as PNG allows: the rest
/// opaque) keeps its palette's alpha through decoding, as PIL's `convert("RGBA")` does, and is
/// composited on white with it.
#[test]
fn palette_transparency_is_composited_on_white() {
    let palette = [10u8, 20, 30, 200, 100, 0, 0, 0, 0, 7, 8, 9];
    let trns = [0u8, 128, 255]; // index 3: not in tRNS, opaque
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, 4, 1);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(&palette[..]);
        enc.set_trns(&trns[..]);
        enc.write_header().unwrap().write_image_data(&[0, 1, 2, 3]).unwrap();
    }
    let img = decode(&buf, &ImageLimits::default()).unwrap();
    assert_eq!((img.mode, img.width, img.height), (PilMode::P, 4, 1));
    assert_eq!(img.data, vec![10, 20, 30, 0, 200, 100, 0, 128, 0, 0, 0, 255, 7, 8, 9, 255]);
    let out = composite_on_white(&img);
    assert_eq!(out.mode, PilMode::Rgb);
    // Index 0: transparent -> white. Index 1 at alpha 128: round((v 128 + 255 127) / 255):
    // 200 -> 227, 100 -> 177, 0 -> 127. Indices 2, 3: opaque -> their colours.
    assert_eq!(out.data, vec![255, 255, 255, 227, 177, 127, 0, 0, 0, 7, 8, 9]);
}
