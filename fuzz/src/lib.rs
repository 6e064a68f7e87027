//! Fuzz targets for everything a client or an operator hands the server, each a `run(&[u8])`
//! that must never panic, abort or allocate past [`alloc::CAP`] in one piece, whatever the
//! bytes:
//!
//! - [`request`]: a request body -> the validated request (parse, plan, chat template,
//!   tokenization, size limits); every refusal is a 4xx.
//! - [`media`]: data URLs (base64), image files (PNG, JPEG, GIF, WebP, BMP), animated GIFs as
//!   videos and frame lists -> preprocessed pixels; every refusal is a 4xx.
//! - [`prompt`]: chat messages -> prompt -> tokens; special tokens come only from the template,
//!   never from the text.
//! - [`weights`]: safetensors and PyTorch checkpoint files -> tensors.
//! - [`model_dir`]: the configuration files of a model directory (`flamingo.toml`, the LM's
//!   `config.json`, the open_clip config, IDEFICS' `config.json`) -> a loaded model or an error.
//!
//! `fuzz_targets/` wraps each in libFuzzer (`scripts/fuzz.sh`); `tests/corpus.rs` replays the
//! committed corpus (`corpus/<target>/`) and every input that once failed
//! (`regressions/<target>/`) on each `cargo test`.

pub mod alloc;
pub mod media;
pub mod model_dir;
pub mod prompt;
pub mod request;
pub mod weights;

use std::path::PathBuf;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target, by name (the names of `fuzz_targets/` and of the corpus directories).
pub const TARGETS: [(&str, Target); 5] =
    [("request", request::run), ("media", media::run), ("prompt", prompt::run), ("weights", weights::run), ("model_dir", model_dir::run)];

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A directory of this process's own for scratch files (removed by the OS's temp cleaning).
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flamingo-fuzz-{tag}-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create the scratch directory {}: {e}", dir.display());
    }
    dir
}

/// Asserts that a refusal is the client's mistake (a 4xx), never the server's.
pub fn client_error<T>(r: Result<T, flamingo_server::error::ApiError>) {
    if let Err(e) = r {
        assert!(e.status.is_client_error(), "a {} for bad input: {}", e.status, e.message);
    }
}
