//! Loading a model directory as a user lays it out from the three released sources:
//!
//! ```text
//! DIR/clip/open_clip_config.json + open_clip_model.safetensors | open_clip_pytorch_model.bin
//! DIR/lm/config.json, tokenizer.json, model*.safetensors | pytorch_model*.bin (sharded or not)
//! DIR/checkpoint.pt | checkpoint.safetensors      (OpenFlamingo's trained weights)
//! DIR/flamingo.toml                                (optional overrides)
//! ```
//!
//! Rules (from the reference, see `shared/reference/OPENFLAMINGO.md`): an optional `module.`
//! prefix is stripped; both alias forms of the gated layers are accepted
//! (`<layers>.{i}.gated_cross_attn_layer.*` and `gated_cross_attn_layers.{i}.*`, decoder weights
//! under `<layers>.{i}.decoder_layer.*` or `old_decoder_blocks.{i}.*`); non-float buffers are
//! skipped; checkpoint `lang_encoder.*` keys override the base LM's; vocabulary rows follow the
//! tokenizer length (the checkpoint's trained embedding when present).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::config::{infer_interval, LmFamily, MediaRule, ModelFamily, Overrides, ResolvedConfig};
use crate::error::{Error, Result};
use crate::lm;
use crate::model::Flamingo;
use crate::perceiver::{PerceiverConfig, PerceiverResampler};
use crate::tokenizer::FlamingoTokenizer;
use crate::vision::{OpenClipVisionCfg, VisionConfig, VisionTransformer};
use crate::weights::WeightStore;
use crate::xattn::{GatedCrossAttentionBlock, XattnConfig};

/// The files of a model directory, resolved.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub clip_config: PathBuf,
    pub clip_weights: PathBuf,
    pub lm_dir: PathBuf,
    pub lm_config: PathBuf,
    pub lm_weights: Vec<PathBuf>,
    pub checkpoint: PathBuf,
    pub overrides: Option<PathBuf>,
}

pub(crate) fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

pub(crate) fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::file(index, e))?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| Error::file(index, format!("invalid index: {e}")))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&String> = idx.weight_map.values().collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

impl ModelFiles {
    pub fn resolve(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "model directory not found"));
        }
        let clip = dir.join("clip");
        let clip_config = clip.join("open_clip_config.json");
        if !clip_config.is_file() {
            return Err(Error::file(&clip_config, "file not found (expected the open_clip model's config)"));
        }
        let clip_weights = first_existing(&clip, &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
            .ok_or_else(|| Error::file(&clip, "no open_clip_model.safetensors or open_clip_pytorch_model.bin"))?;
        let lm_dir = dir.join("lm");
        let lm_config = lm_dir.join("config.json");
        if !lm_config.is_file() {
            return Err(Error::file(&lm_config, "file not found (expected the HF language model's config)"));
        }
        let lm_weights = if let Some(p) = first_existing(&lm_dir, &["model.safetensors"]) {
            vec![p]
        } else if let Some(i) = first_existing(&lm_dir, &["model.safetensors.index.json"]) {
            shards_from_index(&i)?
        } else if let Some(p) = first_existing(&lm_dir, &["pytorch_model.bin"]) {
            vec![p]
        } else if let Some(i) = first_existing(&lm_dir, &["pytorch_model.bin.index.json"]) {
            shards_from_index(&i)?
        } else {
            return Err(Error::file(&lm_dir, "no model.safetensors, pytorch_model.bin or sharded index"));
        };
        let checkpoint = first_existing(dir, &["checkpoint.safetensors", "checkpoint.pt"])
            .ok_or_else(|| Error::file(dir, "no checkpoint.pt or checkpoint.safetensors (OpenFlamingo's trained weights)"))?;
        let overrides = first_existing(dir, &["flamingo.toml"]);
        Ok(Self { dir: dir.into(), clip_config, clip_weights, lm_dir, lm_config, lm_weights, checkpoint, overrides })
    }
}

#[derive(Deserialize)]
struct OpenClipConfig {
    vision_cfg: Option<OpenClipVisionCfg>,
    #[serde(default)]
    quick_gelu: bool,
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

fn vision_config(path: &Path, ov: &Overrides) -> Result<VisionConfig> {
    let raw = read_json(path)?;
    // HF-hub open_clip repos nest the model config under "model_cfg".
    let raw = match raw.get("model_cfg") {
        Some(m) if raw.get("vision_cfg").is_none() => m.clone(),
        _ => raw,
    };
    let cfg: OpenClipConfig = serde_json::from_value(raw).map_err(|e| Error::file(path, format!("invalid open_clip config: {e}")))?;
    let v = cfg.vision_cfg.ok_or_else(|| Error::file(path, "no vision_cfg"))?;
    let mut vc = VisionConfig::from_open_clip(&v, ov.vision.quick_gelu.unwrap_or(cfg.quick_gelu)).map_err(|e| Error::file(path, e))?;
    vc.ln_post_on_tokens = ov.vision.ln_post_on_tokens.unwrap_or(false);
    Ok(vc)
}

/// Maps a checkpoint key to the model-side name, or `None` for keys the model does not use.
fn map_checkpoint_key(key: &str, layers: &str) -> Option<String> {
    let key = key.strip_prefix("module.").unwrap_or(key);
    if key.starts_with("perceiver.") {
        return Some(key.to_string());
    }
    if let Some(rest) = key.strip_prefix("vision_encoder.") {
        return Some(format!("visual.{rest}"));
    }
    let rest = key.strip_prefix("lang_encoder.")?;
    let aliased = |alias: &str, insert: &str| -> Option<String> {
        let tail = rest.strip_prefix(alias)?;
        let (i, tail) = tail.split_once('.')?;
        i.parse::<usize>().ok()?;
        Some(format!("{layers}.{i}.{insert}{tail}"))
    };
    if let Some(k) = aliased("gated_cross_attn_layers.", "gated_cross_attn_layer.") {
        return Some(k);
    }
    if let Some(k) = aliased("old_decoder_blocks.", "") {
        return Some(k);
    }
    Some(rest.replacen(".decoder_layer.", ".", 1))
}

/// Progress of [`load`], for a progress indicator.
pub trait LoadProgress {
    fn stage(&self, _message: &str) {}
}

impl LoadProgress for () {}

/// The files a model was loaded from, by layout.
#[derive(Debug, Clone)]
pub enum LoadedFiles {
    OpenFlamingo(ModelFiles),
    Idefics(crate::idefics::IdeficsFiles),
}

/// A loaded model with its tokenizer.
pub struct Loaded {
    pub model: Flamingo,
    pub tokenizer: FlamingoTokenizer,
    pub files: LoadedFiles,
}

/// Loads a model directory onto `device` in `dtype`, whatever its family's layout: an IDEFICS
/// directory (`config.json` with `model_type: idefics`) or OpenFlamingo's three sources.
pub fn load(dir: &Path, device: &Device, dtype: DType, progress: &dyn LoadProgress) -> Result<Loaded> {
    if crate::idefics::is_idefics_dir(dir) {
        let l = crate::idefics::load(dir, device, dtype, progress)?;
        return Ok(Loaded { model: l.model, tokenizer: l.tokenizer, files: LoadedFiles::Idefics(l.files) });
    }
    let (model, tokenizer, files) = load_openflamingo(dir, device, dtype, progress)?;
    Ok(Loaded { model, tokenizer, files: LoadedFiles::OpenFlamingo(files) })
}

/// Loads an OpenFlamingo directory (the layout above).
pub fn load_openflamingo(
    dir: &Path,
    device: &Device,
    dtype: DType,
    progress: &dyn LoadProgress,
) -> Result<(Flamingo, FlamingoTokenizer, ModelFiles)> {
    crate::device::check_supported(device, dtype)?;
    let files = ModelFiles::resolve(dir)?;
    let overrides = read_overrides(&files)?;

    progress.stage("reading configs and tokenizer");
    let lm_config = read_json(&files.lm_config)?;
    let family = lm_family(&lm_config, &files.lm_config)?;
    let layers_path = family.decoder_layers_path();
    let mut vision_cfg = vision_config(&files.clip_config, &overrides)?;
    let tokenizer = FlamingoTokenizer::from_lm_dir(&files.lm_dir)?;

    progress.stage("indexing weights");
    let (store, gated) = index_weights(&files, layers_path)?;
    vision_cfg.width = vision_width(&store, &files, vision_cfg.width)?;
    let perceiver_cfg = perceiver_config(&store, &files, vision_cfg.width, &overrides)?;
    let Some(&first_gated) = gated.first() else {
        return Err(Error::file(
            &files.checkpoint,
            format!("no gated cross-attention layers (keys lang_encoder.{layers_path}.N.gated_cross_attn_layer.*)"),
        ));
    };
    let x_prefix = format!("{layers_path}.{first_gated}.gated_cross_attn_layer");
    let x_inner = store.rows(&format!("{x_prefix}.attn.to_q.weight"), 2)?;
    let x_ff = store.rows(&format!("{x_prefix}.ff.1.weight"), 2)?;

    progress.stage("loading language model");
    let vocab_rows = tokenizer.len();
    let vb = VarBuilder::from_backend(Box::new(store), dtype, device.clone());
    let lm_load = match family {
        LmFamily::MosaicGpt => lm::mosaic_gpt::load,
        LmFamily::Mpt => lm::mpt::load,
        LmFamily::GptNeoX => lm::gpt_neox::load,
        LmFamily::Llama => lm::llama::load,
    };
    let lm = lm_load(&lm_config, vocab_rows, vb.clone()).map_err(|e| load_error(e, &files.lm_config))?;
    let num_layers = lm.num_layers();
    let (gated, interval) = gated_placement(gated, num_layers, &overrides, &files)?;
    let (heads, dim_head) = heads(x_inner, overrides.xattn.dim_head, "xattn")?;
    let xattn_cfg = XattnConfig {
        dim: lm.hidden_size(),
        dim_visual: vision_cfg.width,
        heads,
        dim_head,
        ff_mult: multiple(x_ff, lm.hidden_size(), "the cross-attention feed-forward width", &files.checkpoint)?,
    };

    progress.stage("loading cross-attention, perceiver and vision tower");
    let mut xattn: Vec<Option<GatedCrossAttentionBlock>> = (0..num_layers).map(|_| None).collect();
    for &i in &gated {
        let b = GatedCrossAttentionBlock::new(&xattn_cfg, vb.pp(format!("{layers_path}.{i}.gated_cross_attn_layer")))
            .map_err(|e| load_error(e, &files.checkpoint))?;
        xattn[i] = Some(b);
    }
    let perceiver = PerceiverResampler::new(&perceiver_cfg, vb.pp("perceiver")).map_err(|e| load_error(e, &files.checkpoint))?;
    let vision = VisionTransformer::new(&vision_cfg, vb.pp("visual")).map_err(|e| load_error(e, &files.clip_weights))?;

    let config = ResolvedConfig {
        model_family: ModelFamily::OpenFlamingo,
        family,
        vision: vision_cfg,
        perceiver: perceiver_cfg,
        xattn: xattn_cfg,
        resize: overrides.preprocess.resize.unwrap_or_default(),
        media_rule: MediaRule::Cumulative { media: tokenizer.media_token_id() },
        gated_layers: gated,
        cross_attn_every_n_layers: interval,
        media_token_id: tokenizer.media_token_id(),
        eoc_token_id: tokenizer.eoc_token_id(),
        eos_token_id: tokenizer.eos_token_id(),
        vocab_rows,
    };
    let mut model = Flamingo { vision, perceiver, xattn, lm, config, device: device.clone(), dtype, kv_pool: None };
    model.set_paged_kv(Flamingo::default_paged(device));
    Ok((model, tokenizer, files))
}

/// `DIR/flamingo.toml`, if there is one.
fn read_overrides(files: &ModelFiles) -> Result<Overrides> {
    match &files.overrides {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::file(p, e))?;
            toml::from_str(&text).map_err(|e| Error::file(p, e))
        }
        None => Ok(Overrides::default()),
    }
}

fn lm_family(lm_config: &serde_json::Value, path: &Path) -> Result<LmFamily> {
    let model_type = lm_config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    LmFamily::from_model_type(model_type).ok_or_else(|| {
        Error::file(path, format!("unknown language-model family `{model_type}` (model_type); supported: {}", LmFamily::SUPPORTED))
    })
}

/// Every tensor of the three sources under its model-side name (the vision tower's from the
/// open_clip file, the LM's, then the checkpoint's, which override the LM's), and the decoder
/// layers the checkpoint has gated cross-attention blocks for, in order.
fn index_weights(files: &ModelFiles, layers_path: &str) -> Result<(WeightStore, Vec<usize>)> {
    let mut store = WeightStore::new();
    let (clip_idx, clip_names) = store.open(&files.clip_weights)?;
    for n in clip_names {
        if n.starts_with("visual.") {
            store.insert(n.clone(), clip_idx, n);
        }
    }
    store.set_home("visual.", "visual.", files.clip_weights.display().to_string());
    let lm_list = files.lm_weights.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    for p in &files.lm_weights {
        let (idx, names) = store.open(p)?;
        for n in names {
            store.insert(n.clone(), idx, n);
        }
    }
    store.set_home("", "", lm_list);
    let (ck_idx, ck_names) = store.open(&files.checkpoint)?;
    let mut gated = BTreeSet::new();
    for n in ck_names {
        if let Some(m) = map_checkpoint_key(&n, layers_path) {
            if let Some((i, tail)) = m.strip_prefix(layers_path).and_then(|r| r.strip_prefix('.')).and_then(|r| r.split_once('.')) {
                if tail.starts_with("gated_cross_attn_layer.") {
                    if let Ok(i) = i.parse::<usize>() {
                        gated.insert(i);
                    }
                }
            }
            store.insert(m, ck_idx, n);
        }
    }
    let ck = files.checkpoint.display().to_string();
    store.set_home("perceiver.", "perceiver.", ck.clone());
    // Gated-layer keys live in the checkpoint, under the decoder-layer path.
    store.set_home_containing(".gated_cross_attn_layer.", "lang_encoder.", ck);
    Ok((store, gated.into_iter().collect()))
}

/// The vision width, from the tower's weights (it must agree with `vision_cfg.width`).
fn vision_width(store: &WeightStore, files: &ModelFiles, configured: usize) -> Result<usize> {
    let conv = store.shape("visual.conv1.weight")?;
    match conv.first() {
        Some(&w) if conv.len() == 4 && w == configured && w > 0 => Ok(w),
        _ => Err(Error::file(&files.clip_weights, format!("visual.conv1.weight has shape {conv:?}, but vision_cfg.width is {configured}"))),
    }
}

/// The Perceiver's geometry from its weights.
fn perceiver_config(store: &WeightStore, files: &ModelFiles, dim: usize, overrides: &Overrides) -> Result<PerceiverConfig> {
    let latents = store.shape("perceiver.latents")?;
    if latents.len() != 2 || latents[1] != dim {
        return Err(Error::file(&files.checkpoint, format!("perceiver.latents has shape {latents:?}, expected [n, {dim}]")));
    }
    // Depth: one past the highest layer index of any perceiver key (so a missing tensor inside a
    // layer is reported instead of silently shortening the resampler).
    let depth = store
        .names()
        .filter_map(|n| n.strip_prefix("perceiver.layers.")?.split_once('.')?.0.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    if depth == 0 {
        return Err(Error::file(&files.checkpoint, "no perceiver layers (keys perceiver.layers.N.*)"));
    }
    let (heads, dim_head) = heads(store.rows("perceiver.layers.0.0.to_q.weight", 2)?, overrides.perceiver.dim_head, "perceiver")?;
    let ff = store.rows("perceiver.layers.0.1.1.weight", 2)?;
    let rows = |name: &str, rank: usize| -> Result<Option<usize>> {
        if store.contains(name) {
            store.rows(name, rank).map(Some)
        } else {
            Ok(None)
        }
    };
    Ok(PerceiverConfig {
        dim,
        depth,
        heads,
        dim_head,
        num_latents: latents[0],
        ff_mult: multiple(ff, dim, "the perceiver feed-forward width", &files.checkpoint)?,
        // `frame_embs` is [F, d], `media_time_embs` [T, 1, d] in the reference.
        max_num_frames: rows("perceiver.frame_embs", 2)?,
        max_num_media: rows("perceiver.media_time_embs", 3)?,
    })
}

/// `(heads, dim_head)` for an attention of `inner` width, `dim_head` from `[section]` of
/// flamingo.toml (default 64, as in OpenFlamingo): it must divide the width.
fn heads(inner: usize, dim_head: Option<usize>, section: &str) -> Result<(usize, usize)> {
    let dim_head = dim_head.unwrap_or(64);
    if dim_head == 0 || inner < dim_head || !inner.is_multiple_of(dim_head) {
        return Err(Error::Config(format!(
            "[{section}] dim_head = {dim_head} does not divide the {section} attention width {inner} (set `dim_head` in flamingo.toml)"
        )));
    }
    Ok((inner / dim_head, dim_head))
}

/// `total / unit` when `total` is a positive multiple of `unit`.
fn multiple(total: usize, unit: usize, what: &str, file: &Path) -> Result<usize> {
    if unit == 0 || total == 0 || !total.is_multiple_of(unit) {
        return Err(Error::file(file, format!("{what} {total} is not a multiple of the model width {unit}")));
    }
    Ok(total / unit)
}

/// The gated layers as flamingo.toml's `cross_attn_every_n_layers` says (it must agree with
/// the checkpoint's keys), and the interval they follow, if any.
fn gated_placement(gated: Vec<usize>, num_layers: usize, overrides: &Overrides, files: &ModelFiles) -> Result<(Vec<usize>, Option<usize>)> {
    if let Some(&bad) = gated.iter().find(|&&i| i >= num_layers) {
        return Err(Error::file(&files.checkpoint, format!("gated cross-attention layer {bad} but the LM has {num_layers} layers")));
    }
    let interval = infer_interval(&gated, num_layers);
    match overrides.cross_attn_every_n_layers {
        Some(n) if n > 0 => {
            let want: Vec<usize> = (0..num_layers).filter(|i| (i + 1) % n == 0).collect();
            if want != gated {
                return Err(Error::Config(format!(
                    "flamingo.toml says cross_attn_every_n_layers = {n}, but the checkpoint has gated layers {gated:?}"
                )));
            }
            Ok((want, interval))
        }
        Some(_) => Err(Error::Config("cross_attn_every_n_layers must be >= 1".into())),
        None => Ok((gated, interval)),
    }
}

/// Errors from building modules come back as candle errors. Those raised by the weight store
/// (missing key, bad shape, unreadable tensor) already name their file; others (a bad config
/// value) get the file they were read for.
pub(crate) fn load_error(e: candle_core::Error, file: &Path) -> Error {
    let msg = e.to_string();
    if msg.contains("missing tensor") || msg.contains("cannot read tensor") || msg.contains(", expected [") {
        Error::Weights(msg)
    } else {
        Error::file(file, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::map_checkpoint_key;

    #[test]
    fn checkpoint_key_aliases() {
        let l = "transformer.blocks";
        assert_eq!(map_checkpoint_key("module.perceiver.latents", l).as_deref(), Some("perceiver.latents"));
        assert_eq!(
            map_checkpoint_key("lang_encoder.transformer.blocks.3.gated_cross_attn_layer.attn_gate", l).as_deref(),
            Some("transformer.blocks.3.gated_cross_attn_layer.attn_gate")
        );
        assert_eq!(
            map_checkpoint_key("lang_encoder.gated_cross_attn_layers.3.ff_gate", l).as_deref(),
            Some("transformer.blocks.3.gated_cross_attn_layer.ff_gate")
        );
        assert_eq!(
            map_checkpoint_key("lang_encoder.transformer.blocks.0.decoder_layer.ln_1.weight", l).as_deref(),
            Some("transformer.blocks.0.ln_1.weight")
        );
        assert_eq!(
            map_checkpoint_key("lang_encoder.old_decoder_blocks.2.attn.Wqkv.weight", l).as_deref(),
            Some("transformer.blocks.2.attn.Wqkv.weight")
        );
        assert_eq!(map_checkpoint_key("lang_encoder.transformer.wte.weight", l).as_deref(), Some("transformer.wte.weight"));
        assert_eq!(map_checkpoint_key("something.else", l), None);
    }
}
