//! Request media -> preprocessed pixels: fetched through [`Fetcher`] on the async side, decoded
//! and preprocessed on the blocking pool, content-hashed for the engine's vision cache.

use std::sync::Arc;

use flamingo_engine::{media_key, PreparedMedia};
use flamingo_model::candle::{Device, Tensor};
use flamingo_model::preprocess::{self, ImageLimits, PilImage, PilMode, Resize};
use flamingo_model::Flamingo;
use image::AnimationDecoder;

use crate::error::ApiError;
use crate::fetch::Fetcher;
use crate::template::MediaRef;

/// What the server knows about the model's image input.
#[derive(Debug, Clone)]
pub struct MediaSpec {
    pub image_size: usize,
    /// How images and frames are brought to `image_size` (the model directory's
    /// `[preprocess] resize`).
    pub resize: Resize,
    /// Frames a video may have (`None`: the Perceiver has no frame embeddings, no video).
    pub max_frames: Option<usize>,
    pub device: Device,
    pub limits: ImageLimits,
    pub max_video_frames: usize,
}

impl MediaSpec {
    /// The image input of `model`, under these limits.
    pub fn of_model(model: &Flamingo, limits: ImageLimits, max_video_frames: usize) -> Self {
        let cfg = model.config();
        Self {
            image_size: cfg.vision.image_size,
            resize: cfg.resize,
            max_frames: cfg.perceiver.max_num_frames,
            device: model.device().clone(),
            limits,
            max_video_frames,
        }
    }

    /// Preprocessing settings that, with the bytes, determine the pixels (part of the cache key).
    fn preprocessing(&self) -> String {
        match self.resize {
            Resize::Crop => format!("openclip-bicubic-center-crop-{}", self.image_size),
            Resize::Stretch => format!("rgb-bicubic-stretch-{}", self.image_size),
            Resize::StretchOnWhite => format!("rgb-on-white-bicubic-stretch-{}", self.image_size),
        }
    }

    /// One image file's bytes decoded and preprocessed as the model wants: `[3, H, W]`.
    fn pixels(&self, bytes: &[u8]) -> Result<Tensor, flamingo_model::Error> {
        preprocess::preprocess_with(bytes, self.image_size, self.resize, &self.limits, &self.device)
    }

    /// One still image (PNG, JPEG, WebP, GIF's first frame, BMP): its pixels `[1, 3, H, W]` as
    /// the model's preprocessing makes them (open_clip's, or the stretch), and its key.
    pub fn image(&self, bytes: &[u8]) -> Result<PreparedMedia, flamingo_model::Error> {
        let px = self.pixels(bytes)?;
        Ok(PreparedMedia { key: media_key(bytes, &self.preprocessing()), pixels: px.unsqueeze(0)? })
    }
}

/// One media item of a request and where it came from (`param` names it in errors).
pub struct MediaItem {
    pub source: MediaRef,
    pub param: String,
}

/// Fetches and preprocesses every item, in order.
pub async fn prepare(fetcher: &Fetcher, spec: &Arc<MediaSpec>, items: Vec<MediaItem>) -> Result<Vec<PreparedMedia>, ApiError> {
    check(spec, &items)?;
    let fetched = fetch_all(fetcher, &items).await?;
    decode(spec, &items, fetched).await
}

/// Videos only where the model takes them, within the frame limit.
pub fn check(spec: &MediaSpec, items: &[MediaItem]) -> Result<(), ApiError> {
    for it in items {
        if matches!(it.source, MediaRef::Video(_) | MediaRef::Animation(_)) {
            let Some(max) = spec.max_frames else {
                return Err(ApiError::bad_request(
                    "this model cannot take video: its Perceiver has no frame embeddings; send the frames as separate images",
                )
                .param(it.param.clone()));
            };
            let n = if let MediaRef::Video(frames) = &it.source { frames.len() } else { 1 };
            if n > max.min(spec.max_video_frames) {
                return Err(ApiError::bad_request(format!("a video may have at most {} frames", max.min(spec.max_video_frames)))
                    .param(it.param.clone()));
            }
        }
    }
    Ok(())
}

/// The URLs of an item (one, or one per frame).
pub fn urls(source: &MediaRef) -> Vec<&str> {
    match source {
        MediaRef::Image(u) | MediaRef::Animation(u) => vec![u.as_str()],
        MediaRef::Video(v) => v.iter().map(String::as_str).collect(),
    }
}

/// Every item's bytes (one entry per URL), fetched concurrently.
pub async fn fetch_all(fetcher: &Fetcher, items: &[MediaItem]) -> Result<Vec<Vec<Vec<u8>>>, ApiError> {
    let fetches = items.iter().map(|it| async move {
        let urls = urls(&it.source);
        let mut out = Vec::with_capacity(urls.len());
        for (k, u) in urls.iter().enumerate() {
            let bytes = fetcher.fetch(u).await.map_err(|e| {
                let what = if urls.len() > 1 { format!("frame {k} of {}", it.param) } else { it.param.clone() };
                ApiError::bad_request(format!("cannot read the media at {what}: {e}")).param(it.param.clone())
            })?;
            out.push(bytes);
        }
        Ok::<_, ApiError>(out)
    });
    futures::future::try_join_all(fetches).await
}

/// Decodes and preprocesses fetched items (on the blocking pool).
pub async fn decode(spec: &Arc<MediaSpec>, items: &[MediaItem], fetched: Vec<Vec<Vec<u8>>>) -> Result<Vec<PreparedMedia>, ApiError> {
    let spec = spec.clone();
    let kinds: Vec<(Kind, String)> = items
        .iter()
        .map(|it| {
            let k = match it.source {
                MediaRef::Image(_) => Kind::Image,
                MediaRef::Animation(_) => Kind::Animation,
                MediaRef::Video(_) => Kind::Frames,
            };
            (k, it.param.clone())
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        fetched.into_iter().zip(kinds).map(|(bytes, (kind, param))| prepare_one(&spec, bytes, kind, &param)).collect()
    })
    .await
    .map_err(|e| ApiError::internal(format!("media worker failed: {e}")))?
}

/// What a media item's fetched bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One image file.
    Image,
    /// One animated GIF whose frames are a video's.
    Animation,
    /// A video's frames, one image file each.
    Frames,
}

/// One item's fetched bytes decoded and preprocessed (`param` names it in errors). A file that
/// cannot be used is the client's mistake (a 400); the fuzz target `media` holds it to that.
pub fn prepare_one(spec: &MediaSpec, bytes: Vec<Vec<u8>>, kind: Kind, param: &str) -> Result<PreparedMedia, ApiError> {
    let bad = |e: String| ApiError::bad_request(format!("the media at {param} cannot be used: {e}")).param(param.to_string());
    let internal = |e: flamingo_model::candle::Error| ApiError::internal(e.to_string());
    let frames: Vec<Tensor> = match (kind, bytes.as_slice()) {
        (Kind::Image, [one]) => return spec.image(one).map_err(|e| bad(e.to_string())),
        (Kind::Animation, [one]) => {
            // One URL: an animated image whose frames are the video's frames.
            let max = spec.max_frames.unwrap_or(1).min(spec.max_video_frames);
            let size = spec.image_size;
            // Each frame preprocessed as it is decoded: one full-size frame in memory at a time.
            let frames = gif_frames(one, &spec.limits, max, |img| preprocess::pixels(&img, size, spec.resize)).map_err(bad)?;
            if frames.len() > max {
                return Err(bad(format!("the animation has {} frames; at most {max} are allowed", frames.len())));
            }
            frames.into_iter().map(|px| Tensor::from_vec(px, (3, size, size), &spec.device)).collect::<Result<_, _>>().map_err(internal)?
        }
        (Kind::Frames, frames) if !frames.is_empty() => {
            frames.iter().map(|b| spec.pixels(b).map_err(|e| bad(e.to_string()))).collect::<Result<_, _>>()?
        }
        _ => return Err(ApiError::internal(format!("{param}: no media fetched"))),
    };
    let pixels = Tensor::stack(&frames, 0).map_err(internal)?;
    // The key covers every frame's bytes (and the frame boundaries).
    let mut all = Vec::new();
    for b in &bytes {
        all.extend_from_slice(&(b.len() as u64).to_le_bytes());
        all.extend_from_slice(b);
    }
    let tag = if kind == Kind::Animation { "animation" } else { "frames" };
    Ok(PreparedMedia { key: media_key(&all, &format!("{}-{tag}", spec.preprocessing())), pixels })
}

/// Decodes every frame of an animated GIF (composited, as displayed) as RGB and hands it to
/// `each`. Decodes at most `max + 1` frames (enough to tell that there are too many).
fn gif_frames<T>(bytes: &[u8], limits: &ImageLimits, max: usize, mut each: impl FnMut(PilImage) -> T) -> Result<Vec<T>, String> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    if reader.format() != Some(image::ImageFormat::Gif) {
        return Err("a video given as one URL must be an animated GIF (or give a list of frame URLs)".into());
    }
    let (w, h) = reader.into_dimensions().map_err(|e| e.to_string())?;
    if w == 0 || h == 0 {
        return Err("the animation has zero size".into());
    }
    if w > limits.max_side || h > limits.max_side || (w as u64) * (h as u64) > limits.max_pixels {
        return Err(format!("the animation is {w}x{h}, larger than the limits allow"));
    }
    let mut dec = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(bytes)).map_err(|e| e.to_string())?;
    // A frame's own size is in its header, apart from the screen's: the decoder's limits
    // bound the buffers it allocates for it.
    image::ImageDecoder::set_limits(&mut dec, limits.decoder_limits()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for f in dec.into_frames().take(max + 1) {
        let f = f.map_err(|e| e.to_string())?;
        let rgba = f.into_buffer();
        let data: Vec<u8> = rgba.pixels().flat_map(|p| [p.0[0], p.0[1], p.0[2]]).collect();
        out.push(each(PilImage { mode: PilMode::Rgb, width: rgba.width() as usize, height: rgba.height() as usize, data }));
    }
    if out.is_empty() {
        return Err("the animation has no frames".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(resize: Resize) -> MediaSpec {
        MediaSpec { image_size: 96, resize, max_frames: Some(4), device: Device::Cpu, limits: ImageLimits::default(), max_video_frames: 8 }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().and_then(|t| t.to_vec1()).unwrap()
    }

    /// Regression (found by the `media` fuzz target): a GIF whose screen is 8 x 0 went on to
    /// the resize, which divided by its zero height and panicked.
    #[test]
    fn a_zero_sized_animation_is_refused() {
        let gif = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/regressions/media/gif-zero-height")).unwrap();
        let e = prepare_one(&spec(Resize::Crop), vec![gif[1..].to_vec()], Kind::Animation, "v").unwrap_err();
        assert!(e.status.is_client_error() && e.message.contains("zero size"), "{}", e.message);
    }

    #[test]
    fn the_model_directorys_resize_is_used_for_images_and_every_frame() {
        let png = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/stretch/wide_300x200.png")).unwrap();
        let (crop, stretch) = (spec(Resize::Crop), spec(Resize::Stretch));
        let a = crop.image(&png).unwrap();
        let b = stretch.image(&png).unwrap();
        assert_ne!(a.key, b.key, "the preprocessing is part of the vision-cache key");
        let img = preprocess::decode(&png, &ImageLimits::default()).unwrap();
        assert_eq!(values(&a.pixels), preprocess::clip_pixels(&img, 96));
        assert_eq!(values(&b.pixels), preprocess::stretch_pixels(&img, 96));

        // A video as frame URLs and as an animated GIF: each frame stretched.
        let frames = prepare_one(&stretch, vec![png.clone(), png.clone()], Kind::Frames, "v").unwrap();
        assert_eq!(frames.pixels.dims(), &[2, 3, 96, 96]);
        assert_eq!(values(&frames.pixels.get(1).unwrap()), preprocess::stretch_pixels(&img, 96));
        let mut rng = crate::world::rng(0, crate::world::Split::Eval);
        let video = crate::world::Media::Video(crate::world::scene::sample_video(&mut rng));
        let gif = video.encode();
        let anim = prepare_one(&stretch, vec![gif.clone()], Kind::Animation, "v").unwrap();
        let decoded = gif_frames(&gif, &ImageLimits::default(), 8, |img| img).unwrap();
        assert_eq!(anim.pixels.dims()[0], decoded.len());
        assert_eq!(values(&anim.pixels.get(0).unwrap()), preprocess::stretch_pixels(&decoded[0], 96));
    }
}
