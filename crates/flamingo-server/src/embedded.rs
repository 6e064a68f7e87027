//! The default model embedded in the binary: flamingo-mini (`models/flamingo-mini`, trained by
//! `training/train.sh` on the shapes world; its model card is `models/flamingo-mini/README.md`).
//! It lets `cargo run --release` answer questions about images of flat coloured shapes, videos
//! of a moving shape and few-shot episodes, with no download.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The name `/v1/models` lists for it.
pub const NAME: &str = "flamingo-mini";

macro_rules! fixture {
    ($p:literal) => {
        ($p, include_bytes!(concat!("../../../models/flamingo-mini/", $p)).as_slice())
    };
}

const FILES: &[(&str, &[u8])] = &[
    fixture!("checkpoint.pt"),
    fixture!("flamingo.toml"),
    fixture!("clip/open_clip_config.json"),
    fixture!("clip/open_clip_pytorch_model.bin"),
    fixture!("lm/config.json"),
    fixture!("lm/model.safetensors"),
    fixture!("lm/special_tokens_map.json"),
    fixture!("lm/tokenizer.json"),
    fixture!("lm/tokenizer_config.json"),
];

/// Writes the embedded model directory (once; keyed by its content hash) under `base` and
/// returns it. Written to a temporary directory first and renamed, so a concurrent start never
/// sees half a model.
pub fn materialize(base: &Path) -> std::io::Result<PathBuf> {
    let mut h = Sha256::new();
    for (name, bytes) in FILES {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let digest = h.finalize();
    let tag: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let dir = base.join(format!("flamingo-embedded-{tag}"));
    if dir.join("checkpoint.pt").is_file() {
        return Ok(dir);
    }
    let tmp = base.join(format!("flamingo-embedded-{tag}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (name, bytes) in FILES {
        let p = tmp.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, bytes)?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process finished first.
        Err(_) if dir.join("checkpoint.pt").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}
