//! A model directory whose configuration an operator wrote or downloaded: one of its
//! configuration files replaced by the input, the rest a real tiny model of one family (MPT,
//! MosaicGPT, LLaMA, GPT-NeoX in OpenFlamingo's layout; IDEFICS in its own), then loaded as
//! `flamingo serve` loads it. Whatever the file says, the answer is a model or an error; no
//! allocation is sized by a number in a configuration that the weights do not back.
//!
//! The first byte chooses the family and the file; the rest is the file's text.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use flamingo_model::candle::{DType, Device};

/// The fixtures (under `tests/fixtures/`) and the configuration files each may have.
const FIXTURES: [(&str, &[&str]); 5] = [
    ("models/mpt_x1", OPENFLAMINGO),
    ("models/mosaicgpt_x1", OPENFLAMINGO),
    ("models/llama_x1", OPENFLAMINGO),
    ("models/gptneox_x1", OPENFLAMINGO),
    ("idefics/idefics_x1", IDEFICS),
];
const OPENFLAMINGO: &[&str] =
    &["flamingo.toml", "lm/config.json", "clip/open_clip_config.json", "lm/special_tokens_map.json", "lm/tokenizer_config.json"];
const IDEFICS: &[&str] = &["flamingo.toml", "config.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer_config.json"];

/// Each fixture mirrored into a scratch directory of links (a configuration file's link is
/// replaced by a file of its own before each input, by `restore`).
fn mirrors() -> &'static Vec<PathBuf> {
    static MIRRORS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    MIRRORS.get_or_init(|| {
        let base = crate::scratch("model-dir");
        FIXTURES
            .iter()
            .map(|(fixture, _)| {
                let src = crate::repo().join("tests/fixtures").join(fixture);
                let dst = base.join(fixture.replace('/', "-"));
                if let Err(e) = mirror(&src, &dst) {
                    panic!("mirroring {}: {e}", src.display());
                }
                dst
            })
            .collect()
    })
}

fn mirror(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            mirror(&from, &to)?;
        } else if !to.exists() {
            std::os::unix::fs::symlink(&from, &to)?;
        }
    }
    Ok(())
}

/// Puts the fixture's own configuration files back (and removes those it does not have).
fn restore(fixture: &str, dir: &Path, configs: &[&str]) -> std::io::Result<()> {
    let src = crate::repo().join("tests/fixtures").join(fixture);
    for name in configs {
        let (from, to) = (src.join(name), dir.join(name));
        let _ = std::fs::remove_file(&to);
        if from.is_file() {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

pub fn run(data: &[u8]) {
    let _ = load(data);
}

/// Loads the directory the input makes: `Err` with the loader's message when it does not.
pub fn load(data: &[u8]) -> Result<(), String> {
    let Some((&sel, text)) = data.split_first() else { return Err("no input".into()) };
    // One input at a time in a process (the replay test runs tests on several threads).
    static BUSY: Mutex<()> = Mutex::new(());
    let _busy = BUSY.lock().unwrap_or_else(|p| p.into_inner());
    let which = usize::from(sel) % FIXTURES.len();
    let (fixture, configs) = FIXTURES[which];
    let dir = &mirrors()[which];
    let file = configs[usize::from(sel) / FIXTURES.len() % configs.len()];
    let written = restore(fixture, dir, configs).and_then(|()| std::fs::write(dir.join(file), text));
    if let Err(e) = written {
        panic!("preparing {}: {e}", dir.display());
    }
    flamingo_model::load(dir, &Device::Cpu, DType::F32, &()).map(|_| ()).map_err(|e| e.to_string())
}
