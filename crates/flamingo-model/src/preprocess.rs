//! Image preprocessing that reproduces open_clip's validation transform on PIL images, bit for
//! bit where PIL's integer arithmetic allows:
//!
//! `Resize(size, BICUBIC)` (shortest side; PIL's antialiased two-pass convolution with 22-bit
//! fixed-point coefficients and 8-bit rounding between passes, the passes in Pillow's order)
//! -> `CenterCrop(size)` ->
//! `convert("RGB")` -> `/255` -> normalise with CLIP's mean and std.
//!
//! Note the order: open_clip resizes *before* converting to RGB, so PIL's mode decides how the
//! resize runs: RGBA / LA are resized premultiplied by alpha and un-premultiplied after;
//! palette images ("P", GIF) are resized with nearest neighbour; greyscale is resized on one
//! channel and replicated. Those rules are reproduced from the decoded image's original mode.
//! Sources: Pillow `libImaging/Resample.c`, `Convert.c`, `Geometry.c`, `Image.resize`;
//! torchvision `transforms.functional.resize` / `center_crop`; open_clip `transform.py`.
//!
//! A model directory can declare the other preprocessing its model was trained with
//! (`[preprocess] resize = "stretch"` in `flamingo.toml`, [`Resize::Stretch`]):
//! `convert("RGB")` -> `resize((size, size), BICUBIC)` of the whole image (no crop, the aspect
//! ratio not kept) -> `/255` -> the same normalisation.
//!
//! IDEFICS (transformers' `IdeficsImageProcessor`, [`Resize::StretchOnWhite`]) composites the
//! image on opaque white instead of dropping alpha: an RGB image as is, any other mode
//! `convert("RGBA")` -> `Image.alpha_composite(white, ·)` -> `convert("RGB")` (Pillow's integer
//! arithmetic, `libImaging/AlphaComposite.c`) -> the same stretch, `/255` and normalisation.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageFormat, ImageReader};

use crate::error::{Error, Result};

/// open_clip's OPENAI_DATASET_MEAN / _STD, written as open_clip writes them (the nearest f32 is
/// what runs, as in the reference's float32 tensors).
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Limits applied before an image is decoded (decompression bombs are refused before any large
/// allocation).
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_pixels: u64,
    pub max_side: u32,
}

impl ImageLimits {
    /// The `image` crate's limits for a decoder under these: each side, and every buffer it
    /// allocates (a frame's included, whatever the file's header says) at most 16 bytes per
    /// allowed pixel.
    pub fn decoder_limits(&self) -> image::Limits {
        let mut lim = image::Limits::default();
        lim.max_image_width = Some(self.max_side);
        lim.max_image_height = Some(self.max_side);
        lim.max_alloc = Some(self.max_pixels.saturating_mul(16));
        lim
    }
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_pixels: 40_000_000, max_side: 16_384 }
    }
}

/// PIL's image mode of a decoded image, which decides how it is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilMode {
    L,
    La,
    Rgb,
    Rgba,
    /// Palette ("P"): resized with nearest neighbour. Held expanded through its palette as RGBA,
    /// the alpha being the palette's (PNG `tRNS`, GIF transparency; 255 without), which is
    /// what PIL's `convert("RGBA")` gives; `convert("RGB")` drops it.
    P,
}

/// How an image is brought to the model's square input size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Resize {
    /// open_clip's validation transform: the shortest side to the size (in the image's own
    /// mode), a centre crop, then RGB.
    #[default]
    Crop,
    /// The whole image converted to RGB, then resized to size x size (PIL bicubic).
    Stretch,
    /// IDEFICS's: the image composited on opaque white (an RGB image as is), then resized to
    /// size x size (PIL bicubic).
    StretchOnWhite,
}

impl Resize {
    /// The values `[preprocess] resize` takes (worded so that the earlier `"crop" or "stretch"`
    /// still reads in it: `tests/loader_errors.rs` looks for it in the error).
    pub const VALUES: &'static str = "\"crop\" or \"stretch\", or \"stretch_on_white\" (IDEFICS's)";

    pub fn name(self) -> &'static str {
        match self {
            Resize::Crop => "crop",
            Resize::Stretch => "stretch",
            Resize::StretchOnWhite => "stretch_on_white",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "crop" => Some(Resize::Crop),
            "stretch" => Some(Resize::Stretch),
            "stretch_on_white" => Some(Resize::StretchOnWhite),
            _ => None,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Resize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Resize::from_name(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("[preprocess] resize = {s:?} is not a preprocessing; expected {}", Resize::VALUES))
        })
    }
}

/// An 8-bit image in PIL's channel layout for its mode.
#[derive(Debug, Clone)]
pub struct PilImage {
    pub mode: PilMode,
    pub width: usize,
    pub height: usize,
    /// Interleaved channels: 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA, P expanded to RGBA).
    pub data: Vec<u8>,
}

impl PilImage {
    pub fn channels(&self) -> usize {
        match self.mode {
            PilMode::L => 1,
            PilMode::La => 2,
            PilMode::Rgb => 3,
            PilMode::Rgba | PilMode::P => 4,
        }
    }
}

/// Decodes an image file's bytes (PNG, JPEG, WebP, GIF, BMP) into PIL's mode and layout.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<PilImage> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| Error::Image(format!("cannot read image: {e}")))?;
    let format = reader.format().ok_or_else(|| Error::Image("unknown image format".into()))?;
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| Error::Image(format!("cannot read image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(Error::Image("image has zero size".into()));
    }
    if w > limits.max_side || h > limits.max_side || (w as u64) * (h as u64) > limits.max_pixels {
        return Err(Error::Image(format!(
            "image is {w}x{h}, larger than the limit ({} pixels, {} per side)",
            limits.max_pixels, limits.max_side
        )));
    }
    if format == ImageFormat::Jpeg {
        if let Some(img) = decode_jpeg(bytes)? {
            return Ok(img);
        }
    }
    if format == ImageFormat::Png {
        check_png_chunks(bytes)?;
    }
    let mut reader = reader;
    reader.limits(limits.decoder_limits());
    // A decoder that panics on a file it should refuse (a bug of its own) is contained: the
    // image is refused like any other it cannot decode.
    let img = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode()))
        .map_err(|_| Error::Image("cannot decode image: the decoder failed on it".into()))?
        .map_err(|e| Error::Image(format!("cannot decode image: {e}")))?;

    // PIL's mode: from the PNG header where the decoder expands (palette, tRNS), else from the
    // decoded colour type.
    let png_mode = if format == ImageFormat::Png { png_mode(bytes) } else { None };
    let mode = match (format, png_mode) {
        (_, Some(m)) => m,
        (ImageFormat::Gif, _) => PilMode::P,
        _ => match &img {
            DynamicImage::ImageLuma8(_) | DynamicImage::ImageLuma16(_) => PilMode::L,
            DynamicImage::ImageLumaA8(_) | DynamicImage::ImageLumaA16(_) => PilMode::La,
            DynamicImage::ImageRgba8(_) | DynamicImage::ImageRgba16(_) | DynamicImage::ImageRgba32F(_) => PilMode::Rgba,
            _ => PilMode::Rgb,
        },
    };
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = match mode {
        PilMode::L => img.to_luma8().into_raw(),
        PilMode::La => img.to_luma_alpha8().into_raw(),
        PilMode::Rgb => img.to_rgb8().into_raw(),
        PilMode::Rgba | PilMode::P => img.to_rgba8().into_raw(),
    };
    Ok(PilImage { mode, width, height, data })
}

/// JPEG through libjpeg-turbo's decoder (as Pillow does: islow IDCT, fancy upsampling), so
/// pixels match PIL's exactly. `None` for colour spaces left to the `image` crate (CMYK/YCCK).
fn decode_jpeg(bytes: &[u8]) -> Result<Option<PilImage>> {
    let res = std::panic::catch_unwind(|| -> std::io::Result<Option<PilImage>> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        let (width, height) = (d.width(), d.height());
        match d.color_space() {
            mozjpeg::ColorSpace::JCS_GRAYSCALE => {
                let mut img = d.grayscale()?;
                let data: Vec<u8> = img.read_scanlines()?;
                img.finish()?;
                Ok(Some(PilImage { mode: PilMode::L, width, height, data }))
            }
            mozjpeg::ColorSpace::JCS_YCbCr | mozjpeg::ColorSpace::JCS_RGB => {
                let mut img = d.rgb()?;
                let px: Vec<[u8; 3]> = img.read_scanlines()?;
                img.finish()?;
                Ok(Some(PilImage { mode: PilMode::Rgb, width, height, data: px.into_iter().flatten().collect() }))
            }
            _ => Ok(None),
        }
    });
    match res {
        Ok(Ok(img)) => Ok(img.filter(|i| i.data.len() == i.width * i.height * i.channels())),
        Ok(Err(e)) => Err(Error::Image(format!("cannot decode JPEG: {e}"))),
        Err(_) => Err(Error::Image("cannot decode JPEG".into())),
    }
}

/// Refuses a PNG that the decoder behind `image` (png 0.18.1) panics on instead of refusing: a
/// PLTE chunk whose length is not a multiple of 3 (image-rs/image-png#694; the PNG spec makes
/// it 3 bytes per entry). Walks the chunk headers only.
fn check_png_chunks(bytes: &[u8]) -> Result<()> {
    let mut at = 8usize;
    while let Some(head) = bytes.get(at..at.saturating_add(8)) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if &head[4..8] == b"PLTE" && !len.is_multiple_of(3) {
            return Err(Error::Image(format!("invalid PNG: its palette has {len} bytes, not 3 per colour")));
        }
        at = at.saturating_add(12).saturating_add(len);
    }
    Ok(())
}

fn png_mode(bytes: &[u8]) -> Option<PilMode> {
    let dec = png::Decoder::new(Cursor::new(bytes));
    let reader = dec.read_info().ok()?;
    Some(match reader.info().color_type {
        png::ColorType::Indexed => PilMode::P,
        png::ColorType::Grayscale => PilMode::L,
        png::ColorType::GrayscaleAlpha => PilMode::La,
        png::ColorType::Rgb => PilMode::Rgb,
        png::ColorType::Rgba => PilMode::Rgba,
    })
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's per-output-pixel (first input index, fixed-point weights) for one axis.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    let v = k * (1u32 << PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// The horizontal pass: rows `first..first + rows` of `src` (`w` wide) to `hc.len()` wide.
fn pass_horizontal(src: &[u8], w: usize, c: usize, first: usize, rows: usize, hc: &[(usize, Vec<i32>)]) -> Vec<u8> {
    let ow = hc.len();
    let mut out = vec![0u8; rows * ow * c];
    for y in 0..rows {
        let line = &src[(y + first) * w * c..(y + first + 1) * w * c];
        for (xx, (xmin, k)) in hc.iter().enumerate() {
            for ch in 0..c {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (i, &kv) in k.iter().enumerate() {
                    ss += line[(xmin + i) * c + ch] as i32 * kv;
                }
                out[(y * ow + xx) * c + ch] = clip8(ss);
            }
        }
    }
    out
}

/// The vertical pass: `src` (`tw` wide, its first row being row `row0` of the coefficients'
/// input) to `vc.len()` rows.
fn pass_vertical(src: &[u8], tw: usize, c: usize, row0: usize, vc: &[(usize, Vec<i32>)]) -> Vec<u8> {
    let mut out = vec![0u8; vc.len() * tw * c];
    for (yy, (ymin, k)) in vc.iter().enumerate() {
        let ymin = ymin - row0;
        for x in 0..tw {
            for ch in 0..c {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (i, &kv) in k.iter().enumerate() {
                    ss += src[((ymin + i) * tw + x) * c + ch] as i32 * kv;
                }
                out[(yy * tw + x) * c + ch] = clip8(ss);
            }
        }
    }
    out
}

/// Whether Pillow (13, the reference) runs the vertical pass first: when the image shrinks
/// vertically by more than twice what it shrinks horizontally (found by comparing its output
/// with both orders over 400+ random size pairs, up- and downscaling; every one agrees). The
/// order matters: each pass rounds to 8 bits.
fn vertical_first(w: usize, h: usize, ow: usize, oh: usize) -> bool {
    let (w, h, ow, oh) = (w as i64, h as i64, ow as i64, oh as i64);
    oh < h && h - oh > 2 * (w - ow)
}

/// PIL's `resize((w, h), BICUBIC)` on an 8-bit interleaved buffer with `c` channels.
fn resize_bicubic(src: &[u8], w: usize, h: usize, c: usize, ow: usize, oh: usize) -> Vec<u8> {
    let hc = coefficients(w, ow);
    let vc = coefficients(h, oh);
    match (ow != w, oh != h) {
        (false, false) => src.to_vec(),
        (true, false) => pass_horizontal(src, w, c, 0, h, &hc),
        (false, true) => pass_vertical(src, w, c, 0, &vc),
        (true, true) if vertical_first(w, h, ow, oh) => {
            let tmp = pass_vertical(src, w, c, 0, &vc);
            pass_horizontal(&tmp, w, c, 0, oh, &hc)
        }
        (true, true) => {
            // Only the rows the vertical pass will read.
            let first = vc.first().map_or(0, |(m, _)| *m);
            let last = vc.last().map_or(h, |(m, k)| m + k.len());
            let tmp = pass_horizontal(src, w, c, first, last - first, &hc);
            pass_vertical(&tmp, ow, c, first, &vc)
        }
    }
}

/// PIL's `resize((w, h), NEAREST)` (scale-affine nearest neighbour).
fn resize_nearest(src: &[u8], w: usize, h: usize, c: usize, ow: usize, oh: usize) -> Vec<u8> {
    let ax = w as f64 / ow as f64;
    let ay = h as f64 / oh as f64;
    let coord = |v: f64| if v < 0.0 { -1i64 } else { v as i64 };
    let mut xin = Vec::with_capacity(ow);
    let mut xo = ax * 0.5;
    for _ in 0..ow {
        xin.push(coord(xo).clamp(0, w as i64 - 1) as usize);
        xo += ax;
    }
    let mut out = vec![0u8; ow * oh * c];
    for y in 0..oh {
        let yi = coord(ay * (y as f64 + 0.5)).clamp(0, h as i64 - 1) as usize;
        for (x, &xi) in xin.iter().enumerate() {
            out[(y * ow + x) * c..(y * ow + x + 1) * c].copy_from_slice(&src[(yi * w + xi) * c..(yi * w + xi + 1) * c]);
        }
    }
    out
}

/// PIL's `MULDIV255`.
fn muldiv255(a: u32, b: u32) -> u8 {
    let t = a * b + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// PIL's mode-aware `Image.resize(size, BICUBIC)`.
pub fn pil_resize(img: &PilImage, ow: usize, oh: usize) -> PilImage {
    let c = img.channels();
    let (w, h) = (img.width, img.height);
    let data = if ow == w && oh == h {
        img.data.clone()
    } else {
        match img.mode {
            PilMode::P => resize_nearest(&img.data, w, h, c, ow, oh),
            PilMode::L | PilMode::Rgb => resize_bicubic(&img.data, w, h, c, ow, oh),
            PilMode::La | PilMode::Rgba => {
                // RGBA -> RGBa (premultiply), resize, RGBa -> RGBA.
                let mut pre = img.data.clone();
                for px in pre.chunks_exact_mut(c) {
                    let a = px[c - 1] as u32;
                    for v in &mut px[..c - 1] {
                        *v = muldiv255(*v as u32, a);
                    }
                }
                let mut out = resize_bicubic(&pre, w, h, c, ow, oh);
                for px in out.chunks_exact_mut(c) {
                    let a = px[c - 1] as u32;
                    if a != 0 && a != 255 {
                        for v in &mut px[..c - 1] {
                            *v = ((255 * *v as u32) / a).min(255) as u8;
                        }
                    }
                }
                out
            }
        }
    };
    PilImage { mode: img.mode, width: ow, height: oh, data }
}

/// torchvision's `Resize(size)` output size for an int size: shortest side to `size`.
pub fn shortest_side_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size * long) as f64 / short as f64;
    let new_long = new_long as usize;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Python's `round` (half to even) for the non-negative halves torchvision's crop produces.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.floor() - 0.5).abs() < 1e-12 && (r as i64) % 2 != 0 { r - 1.0 } else { r };
    r.max(0.0) as usize
}

/// The full open_clip validation transform: image -> normalised `[3, size, size]` f32 values
/// (row-major, channel first).
pub fn clip_pixels(img: &PilImage, size: usize) -> Vec<f32> {
    let (rw, rh) = shortest_side_size(img.width, img.height, size);
    let r = pil_resize(img, rw, rh);
    let top = round_half_even((rh as f64 - size as f64) / 2.0);
    let left = round_half_even((rw as f64 - size as f64) / 2.0);
    let c = r.channels();
    let mut out = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let sy = y + top;
            let sx = x + left;
            let px = if sy < rh && sx < rw { &r.data[(sy * rw + sx) * c..(sy * rw + sx + 1) * c] } else { &[0u8; 4][..c] };
            let rgb = match r.mode {
                PilMode::L | PilMode::La => [px[0]; 3],
                _ => [px[0], px[1], px[2]],
            };
            for ch in 0..3 {
                let v = rgb[ch] as f32 / 255.0;
                out[ch * size * size + y * size + x] = (v - CLIP_MEAN[ch]) / CLIP_STD[ch];
            }
        }
    }
    out
}

/// PIL's `convert("RGB")`: greyscale replicated, alpha dropped (no compositing), a palette
/// image's colours (already expanded by [`decode`]).
pub fn to_rgb(img: &PilImage) -> PilImage {
    let c = img.channels();
    let data = match img.mode {
        PilMode::Rgb => img.data.clone(),
        PilMode::L | PilMode::La => img.data.chunks_exact(c).flat_map(|px| [px[0]; 3]).collect(),
        PilMode::Rgba | PilMode::P => img.data.chunks_exact(c).flat_map(|px| [px[0], px[1], px[2]]).collect(),
    };
    PilImage { mode: PilMode::Rgb, width: img.width, height: img.height, data }
}

/// PIL's `convert("RGBA")`: greyscale replicated, alpha 255 where the mode has none; a palette
/// image's colours with the palette's alpha (already expanded by [`decode`]).
///
/// Not kept by [`decode`], so not reproduced: the transparency key of an L or RGB PNG (`tRNS`
/// outside palette images), which PIL's `convert("RGBA")` would turn into alpha 0 (for RGB it
/// does not matter to [`composite_on_white`]: an RGB image is left as is).
pub fn to_rgba(img: &PilImage) -> PilImage {
    let c = img.channels();
    let data = match img.mode {
        PilMode::Rgba | PilMode::P => img.data.clone(),
        PilMode::Rgb => img.data.chunks_exact(c).flat_map(|px| [px[0], px[1], px[2], 255]).collect(),
        PilMode::L => img.data.iter().flat_map(|&v| [v, v, v, 255]).collect(),
        PilMode::La => img.data.chunks_exact(c).flat_map(|px| [px[0], px[0], px[0], px[1]]).collect(),
    };
    PilImage { mode: PilMode::Rgba, width: img.width, height: img.height, data }
}

/// Pillow's `Image.alpha_composite(dst, src)` for one channel of one pixel, `dst` opaque white
/// (`libImaging/AlphaComposite.c`, its scalar path, 7 bits of extra precision; with
/// `dst = (255, 255, 255, 255)`: `blend = 255 (255 - a)`, `outa255 = 255 a + blend = 255 * 255`).
fn over_white(v: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    let (v, a) = (v as u32, a as u32);
    if a == 0 {
        return 255;
    }
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = v * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    // SHIFTFORDIV255
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}

/// transformers' IDEFICS `convert_to_rgb`, as PIL computes it: an RGB image unchanged; any
/// other `convert("RGBA")` ([`to_rgba`]), `Image.alpha_composite` over an opaque white
/// `Image.new("RGBA", size, (255, 255, 255))`, then `convert("RGB")`.
pub fn composite_on_white(img: &PilImage) -> PilImage {
    if img.mode == PilMode::Rgb {
        return img.clone();
    }
    let rgba = to_rgba(img);
    let data =
        rgba.data.chunks_exact(4).flat_map(|px| [over_white(px[0], px[3]), over_white(px[1], px[3]), over_white(px[2], px[3])]).collect();
    PilImage { mode: PilMode::Rgb, width: img.width, height: img.height, data }
}

/// `/255` then CLIP's normalisation of an RGB image's pixels: `[3, H, W]` values.
fn normalise_rgb(img: &PilImage) -> Vec<f32> {
    debug_assert_eq!(img.mode, PilMode::Rgb);
    let plane = img.width * img.height;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.data.chunks_exact(3).take(plane).enumerate() {
        for ch in 0..3 {
            let v = px[ch] as f32 / 255.0;
            out[ch * plane + i] = (v - CLIP_MEAN[ch]) / CLIP_STD[ch];
        }
    }
    out
}

/// The stretch transform: `convert("RGB")` -> `resize((size, size), BICUBIC)` -> `/255` ->
/// normalise; `[3, size, size]` f32 values (row-major, channel first).
pub fn stretch_pixels(img: &PilImage, size: usize) -> Vec<f32> {
    normalise_rgb(&pil_resize(&to_rgb(img), size, size))
}

/// IDEFICS's transform (transformers' `IdeficsImageProcessor`): [`composite_on_white`] ->
/// `resize((size, size), BICUBIC)` -> `/255` -> normalise; `[3, size, size]` f32 values
/// (row-major, channel first).
pub fn stretch_on_white_pixels(img: &PilImage, size: usize) -> Vec<f32> {
    normalise_rgb(&pil_resize(&composite_on_white(img), size, size))
}

/// `[3, size, size]` normalised values of `img` under `resize`.
pub fn pixels(img: &PilImage, size: usize, resize: Resize) -> Vec<f32> {
    match resize {
        Resize::Crop => clip_pixels(img, size),
        Resize::Stretch => stretch_pixels(img, size),
        Resize::StretchOnWhite => stretch_on_white_pixels(img, size),
    }
}

/// Decodes and preprocesses one image file's bytes to a `[3, size, size]` tensor (open_clip's
/// transform, [`Resize::Crop`]).
pub fn preprocess(bytes: &[u8], size: usize, limits: &ImageLimits, device: &Device) -> Result<Tensor> {
    preprocess_with(bytes, size, Resize::Crop, limits, device)
}

/// Decodes and preprocesses one image file's bytes to a `[3, size, size]` tensor under `resize`.
pub fn preprocess_with(bytes: &[u8], size: usize, resize: Resize, limits: &ImageLimits, device: &Device) -> Result<Tensor> {
    let img = decode(bytes, limits)?;
    Ok(Tensor::from_vec(pixels(&img, size, resize), (3, size, size), device)?)
}

#[cfg(test)]
mod tests {
    /// Regression (found by the `media` fuzz target): a PNG whose palette chunk has 4 bytes made
    /// the png decoder behind `image` panic (image-rs/image-png#694); it is refused first.
    #[test]
    fn a_palette_not_3_bytes_per_colour_is_refused() {
        let file =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/regressions/media/png-palette-not-3-per-colour")).unwrap();
        let e = super::decode(&file[1..], &super::ImageLimits::default()).unwrap_err().to_string();
        assert!(e.contains("not 3 per colour"), "{e}");
    }

    use super::*;

    #[test]
    fn resize_size_follows_torchvision() {
        assert_eq!(shortest_side_size(451, 300, 224), (336, 224));
        assert_eq!(shortest_side_size(300, 451, 224), (224, 336));
        assert_eq!(shortest_side_size(150, 100, 224), (336, 224));
    }

    #[test]
    fn python_rounding_in_center_crop() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(56.0), 56);
    }

    #[test]
    fn bicubic_weights_sum_to_one_in_fixed_point() {
        for (w, o) in [(451, 336), (100, 224), (224, 224)] {
            for (_, k) in coefficients(w, o) {
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{s}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = PilImage { mode: PilMode::Rgb, width: 50, height: 30, data: vec![200; 50 * 30 * 3] };
        let r = pil_resize(&img, 37, 22);
        assert!(r.data.iter().all(|&v| v == 200));
    }

    #[test]
    fn pass_order_follows_pillow() {
        // Observed in Pillow 13 (tests/fixtures/stretch/ pins two of them bit for bit).
        assert!(vertical_first(64, 128, 96, 96));
        assert!(vertical_first(100, 100, 61, 20));
        assert!(!vertical_first(100, 100, 60, 20));
        assert!(!vertical_first(97, 61, 96, 96));
        assert!(!vertical_first(100, 100, 190, 110), "never when the height grows");
        assert!(!vertical_first(451, 300, 336, 224));
    }

    #[test]
    fn stretch_converts_to_rgb_first_and_keeps_no_aspect_ratio() {
        // RGBA: alpha is dropped before the resize (no premultiplication), so colour under
        // alpha 0 survives.
        let img = PilImage { mode: PilMode::Rgba, width: 40, height: 10, data: [10u8, 200, 30, 0].repeat(400) };
        let px = stretch_pixels(&img, 8);
        assert_eq!(px.len(), 3 * 64);
        for ch in 0..3 {
            let want = ([10u8, 200, 30][ch] as f32 / 255.0 - CLIP_MEAN[ch]) / CLIP_STD[ch];
            assert!(px[ch * 64..(ch + 1) * 64].iter().all(|&v| v == want));
        }
        // Greyscale is replicated.
        let grey = PilImage { mode: PilMode::L, width: 3, height: 5, data: vec![77; 15] };
        assert_eq!(to_rgb(&grey).data, vec![77; 45]);
        // A left/right split stays a left/right split over the whole width (no crop).
        let mut data = Vec::new();
        for _y in 0..10 {
            for x in 0..40 {
                data.extend_from_slice(&if x < 20 { [0u8; 3] } else { [255u8; 3] });
            }
        }
        let img = PilImage { mode: PilMode::Rgb, width: 40, height: 10, data };
        let px = stretch_pixels(&img, 8);
        let black = -CLIP_MEAN[0] / CLIP_STD[0];
        let white = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert_eq!(px[0], black);
        assert_eq!(px[7], white);
        assert_eq!(Resize::from_name("stretch"), Some(Resize::Stretch));
        assert_eq!(Resize::from_name("Stretch"), None);
    }

    #[test]
    fn composite_on_white_by_hand() {
        // 2x2 RGBA over opaque white: out = round((v a + 255 (255 - a)) / 255).
        let img = PilImage {
            mode: PilMode::Rgba,
            width: 2,
            height: 2,
            data: vec![
                10, 200, 30, 0, // transparent: white, whatever the colour
                10, 200, 30, 255, // opaque: the colour
                0, 100, 200, 128, // 0 -> 32385/255 = 127; 100 -> 45185/255 = 177.2; 200 -> 57985/255 = 227.4
                13, 255, 1, 77, // 13 -> 46391/255 = 181.9; 255 -> 255; 1 -> 45467/255 = 178.3
            ],
        };
        let out = composite_on_white(&img);
        assert_eq!((out.mode, out.width, out.height), (PilMode::Rgb, 2, 2));
        assert_eq!(out.data, vec![255, 255, 255, 10, 200, 30, 127, 177, 227, 182, 255, 178]);
        // LA: grey replicated, composited; L: replicated (alpha 255); P: its palette's alpha.
        let la = PilImage { mode: PilMode::La, width: 3, height: 1, data: vec![50, 0, 50, 255, 0, 128] };
        assert_eq!(composite_on_white(&la).data, vec![255, 255, 255, 50, 50, 50, 127, 127, 127]);
        let l = PilImage { mode: PilMode::L, width: 2, height: 1, data: vec![0, 77] };
        assert_eq!(composite_on_white(&l).data, vec![0, 0, 0, 77, 77, 77]);
        let p = PilImage { mode: PilMode::P, width: 2, height: 1, data: vec![9, 8, 7, 0, 0, 100, 200, 128] };
        assert_eq!(composite_on_white(&p).data, vec![255, 255, 255, 127, 177, 227]);
        // RGB is left as is (transformers returns it unchanged).
        let rgb = PilImage { mode: PilMode::Rgb, width: 1, height: 1, data: vec![1, 2, 3] };
        assert_eq!(composite_on_white(&rgb).data, vec![1, 2, 3]);
    }

    #[test]
    fn over_white_is_pillows_alpha_composite_for_every_value_and_alpha() {
        // FNV-1a 64 of PIL 13's `Image.alpha_composite(Image.new("RGBA", (65536, 1),
        // (255, 255, 255)), src).convert("RGB")` red channel, src pixel `a * 256 + v` being
        // (v, _, _, a), read in that order (every (value, alpha) pair; Pillow's SIMD and scalar
        // paths agree with the same formula on 65536x1, 1x65536 and 1x1 images).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for a in 0..=255u8 {
            for v in 0..=255u8 {
                let got = over_white(v, a);
                // The closed form: rounded (v a + 255 (255 - a)) / 255 (255 is odd: no ties).
                let x = v as u32 * a as u32 + 255 * (255 - a as u32);
                assert_eq!(got as u32, (2 * x + 255) / 510, "v {v} a {a}");
                h ^= got as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        assert_eq!(h, 0x5546_cee1_5493_f6a7);
    }

    #[test]
    fn stretch_on_white_differs_from_stretch_only_under_alpha() {
        let rgba = PilImage { mode: PilMode::Rgba, width: 40, height: 10, data: [10u8, 200, 30, 0].repeat(400) };
        let white: Vec<f32> = (0..3).flat_map(|ch| [(1.0 - CLIP_MEAN[ch]) / CLIP_STD[ch]; 64]).collect();
        assert_eq!(stretch_on_white_pixels(&rgba, 8), white);
        assert_eq!(pixels(&rgba, 8, Resize::StretchOnWhite), white);
        let mut data = Vec::new();
        for i in 0..400u32 {
            data.extend_from_slice(&[(i % 251) as u8, (i * 7 % 256) as u8, (i / 2) as u8]);
        }
        let rgb = PilImage { mode: PilMode::Rgb, width: 40, height: 10, data };
        assert_eq!(stretch_on_white_pixels(&rgb, 8), stretch_pixels(&rgb, 8));
    }

    #[test]
    fn resize_names() {
        use serde::de::IntoDeserializer;
        for r in [Resize::Crop, Resize::Stretch, Resize::StretchOnWhite] {
            assert_eq!(Resize::from_name(r.name()), Some(r));
            assert!(Resize::VALUES.contains(&format!("\"{}\"", r.name())), "{}", Resize::VALUES);
            let de: serde::de::value::StrDeserializer<serde::de::value::Error> = r.name().into_deserializer();
            assert_eq!(<Resize as serde::Deserialize>::deserialize(de).unwrap(), r);
        }
        assert_eq!(Resize::StretchOnWhite.name(), "stretch_on_white");
        let de: serde::de::value::StrDeserializer<serde::de::value::Error> = "on_white".into_deserializer();
        let err = <Resize as serde::Deserialize>::deserialize(de).unwrap_err().to_string();
        assert!(err.contains("\"stretch_on_white\""), "{err}");
    }

    #[test]
    fn bombs_are_refused_before_decoding() {
        // A valid 1x1 PNG header claiming 100000 x 100000 pixels.
        let mut buf = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut buf, 1, 1);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.write_header().unwrap().write_image_data(&[1, 2, 3]).unwrap();
        }
        // Patch IHDR width/height (bytes 16..24) and its CRC (over type + data, bytes 12..29).
        buf[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        buf[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = {
            let mut c = 0xFFFF_FFFFu32;
            for &b in &buf[12..29] {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                }
            }
            !c
        };
        buf[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode(&buf, &ImageLimits::default()).unwrap_err();
        assert!(err.to_string().contains("larger than the limit"), "{err}");
        assert!(decode(b"not an image", &ImageLimits::default()).is_err());
    }
}
