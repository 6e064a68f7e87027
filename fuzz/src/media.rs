//! Media as a request brings it: a `data:` URL (media type, base64 in either alphabet, with or
//! without padding and whitespace) or fetched bytes, decoded (PNG, JPEG through libjpeg-turbo,
//! GIF, WebP, BMP) and preprocessed as each model family wants, as a still image, an animated
//! GIF (a video's frames) or a list of frames. Limits are the server's kind, smaller: 1 Mpixel
//! and 2048 per side per image, 1 MiB per item, 4 frames. Whatever the bytes, the answer is
//! pixels or a 4xx.
//!
//! The first byte chooses the resize (crop, stretch, stretch on white) and the form; the rest
//! is the item.

use std::sync::OnceLock;

use flamingo_model::candle::Device;
use flamingo_model::preprocess::{ImageLimits, Resize};
use flamingo_server::fetch::{FetchConfig, Fetcher};
use flamingo_server::media::{prepare_one, Kind, MediaSpec};

use crate::client_error;

/// Bytes one item may have (the fetcher's `max_bytes`).
const MAX_BYTES: usize = 1 << 20;

struct Context {
    fetcher: Fetcher,
    runtime: tokio::runtime::Runtime,
}

fn context() -> &'static Context {
    static CONTEXT: OnceLock<Context> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let cfg = FetchConfig { allow_http: false, max_bytes: MAX_BYTES, ..FetchConfig::default() };
        let fetcher = match Fetcher::new(cfg) {
            Ok(f) => f,
            Err(e) => panic!("the fetcher: {e}"),
        };
        let runtime = match tokio::runtime::Builder::new_current_thread().build() {
            Ok(r) => r,
            Err(e) => panic!("the runtime: {e}"),
        };
        Context { fetcher, runtime }
    })
}

fn spec(resize: Resize) -> MediaSpec {
    MediaSpec {
        image_size: 64,
        resize,
        max_frames: Some(4),
        device: Device::Cpu,
        limits: ImageLimits { max_pixels: 1 << 20, max_side: 2048 },
        max_video_frames: 4,
    }
}

pub fn run(data: &[u8]) {
    let Some((&mode, item)) = data.split_first() else { return };
    let spec = spec([Resize::Crop, Resize::Stretch, Resize::StretchOnWhite][usize::from(mode % 3)]);
    match (mode / 3) % 4 {
        0 => client_error(prepare_one(&spec, vec![item.to_vec()], Kind::Image, "image")),
        1 => client_error(prepare_one(&spec, vec![item.to_vec()], Kind::Animation, "video")),
        2 => {
            // Two frames: the item cut where its first byte says.
            let cut = item.first().map_or(0, |&b| usize::from(b) * item.len() / 256);
            let (a, b) = item.split_at(cut);
            client_error(prepare_one(&spec, vec![a.to_vec(), b.to_vec()], Kind::Frames, "video"));
        }
        _ => {
            let url = format!("data:{}", String::from_utf8_lossy(item));
            let c = context();
            match c.runtime.block_on(c.fetcher.fetch(&url)) {
                Ok(bytes) => {
                    assert!(bytes.len() <= MAX_BYTES, "a data URL decoded past the size limit");
                    client_error(prepare_one(&spec, vec![bytes], Kind::Image, "image"));
                }
                Err(e) => assert!(!e.is_config_error(), "{e}"),
            }
        }
    }
}
