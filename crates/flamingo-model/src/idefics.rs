//! HF IDEFICS (idefics-9b, idefics-80b and their instruct models): the directory layout, the
//! configuration, and the components under HF's names.
//!
//! ```text
//! DIR/config.json                 model_type "idefics" (LLaMA's fields at the top level,
//!                                 vision_config, perceiver_config)
//! DIR/model.safetensors | model.safetensors.index.json + shards   (pytorch_model*.bin also read)
//! DIR/tokenizer.json              with <fake_token_around_image>, <image> (and <end_of_utterance>)
//! DIR/preprocessor_config.json    image_size (optional: the vision config's)
//! DIR/generation_config.json      optional
//! ```
//!
//! What differs from OpenFlamingo (transformers `models/idefics/`): the vision tower is HF CLIP
//! with separate q/k/v and keeps the class token (257 tokens, no post-layernorm); the perceiver
//! has separate k/v projections, optional LayerNorms on each head of q and k and a ReLU
//! feed-forward; the gated block is LLaMA-shaped (RMSNorm, the LM's heads, optional RMS norms on
//! each head of q and k, no rotary, SwiGLU) with `alpha_cross_attn` / `alpha_dense` gates (one
//! value or one per channel); a block sits before layer `i` iff `i % cross_layer_interval == 0`;
//! the embedding and head have `additional_vocab_size` decoupled rows; a token attends to the
//! latest image at or before it, none after an `eos` until the next image ([`MediaRule`]);
//! images are alpha-composited on white and resized straight to the model's size.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::Deserialize;

use crate::config::{LmFamily, MediaRule, ModelFamily, ResolvedConfig};
use crate::error::{Error, Result};
use crate::lm;
use crate::loader::{first_existing, load_error, read_json, shards_from_index, LoadProgress};
use crate::model::Flamingo;
use crate::nn::{linear, rms_norm, Activation, LayerNorm, Linear};
use crate::perceiver::{FeedForward, PerceiverAttention, PerceiverConfig, PerceiverResampler};
use crate::preprocess::Resize;
use crate::tokenizer::FlamingoTokenizer;
use crate::vision::{ResidualBlock, VisionConfig, VisionTransformer};
use crate::weights::WeightStore;
use crate::xattn::{GatedCrossAttentionBlock, Norm, XattnConfig, XattnFeedForward};

/// The files of an IDEFICS directory, resolved.
#[derive(Debug, Clone)]
pub struct IdeficsFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub preprocessor: Option<PathBuf>,
}

/// Whether `dir` holds an IDEFICS model (`config.json` with `model_type: idefics`).
pub fn is_idefics_dir(dir: &Path) -> bool {
    let path = dir.join("config.json");
    path.is_file()
        && read_json(&path).ok().and_then(|v| v.get("model_type").and_then(|t| t.as_str()).map(|t| t == "idefics")).unwrap_or(false)
}

impl IdeficsFiles {
    pub fn resolve(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::file(&config, "file not found (an IDEFICS directory's config.json)"));
        }
        let weights = if let Some(p) = first_existing(dir, &["model.safetensors"]) {
            vec![p]
        } else if let Some(i) = first_existing(dir, &["model.safetensors.index.json"]) {
            shards_from_index(&i)?
        } else if let Some(p) = first_existing(dir, &["pytorch_model.bin"]) {
            vec![p]
        } else if let Some(i) = first_existing(dir, &["pytorch_model.bin.index.json"]) {
            shards_from_index(&i)?
        } else {
            return Err(Error::file(dir, "no model.safetensors, model.safetensors.index.json or pytorch_model.bin"));
        };
        Ok(Self { dir: dir.into(), config, weights, preprocessor: first_existing(dir, &["preprocessor_config.json"]) })
    }
}

/// Mirror of the IDEFICS `config.json` fields the model needs (defaults as `IdeficsConfig`'s).
#[derive(Debug, Deserialize)]
struct IdeficsConfig {
    vocab_size: usize,
    #[serde(default)]
    additional_vocab_size: usize,
    hidden_size: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "eps6")]
    rms_norm_eps: f64,
    #[serde(default = "silu")]
    hidden_act: String,
    #[serde(default = "one")]
    cross_layer_interval: usize,
    #[serde(default)]
    qk_layer_norms: bool,
    #[serde(default = "float")]
    alpha_type: String,
    #[serde(default)]
    use_resampler: bool,
    #[serde(default)]
    vision_config: VisionJson,
    #[serde(default)]
    perceiver_config: PerceiverJson,
    #[serde(default = "two")]
    eos_token_id: u32,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct VisionJson {
    embed_dim: usize,
    image_size: usize,
    intermediate_size: usize,
    patch_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for VisionJson {
    fn default() -> Self {
        Self {
            embed_dim: 768,
            image_size: 224,
            intermediate_size: 5120,
            patch_size: 14,
            num_hidden_layers: 32,
            num_attention_heads: 16,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct PerceiverJson {
    resampler_n_latents: usize,
    resampler_depth: usize,
    resampler_n_heads: usize,
    resampler_head_dim: usize,
    qk_layer_norms_perceiver: bool,
}

impl Default for PerceiverJson {
    fn default() -> Self {
        Self { resampler_n_latents: 64, resampler_depth: 6, resampler_n_heads: 16, resampler_head_dim: 96, qk_layer_norms_perceiver: false }
    }
}

fn eps6() -> f64 {
    1e-6
}
fn silu() -> String {
    "silu".into()
}
fn one() -> usize {
    1
}
fn two() -> u32 {
    2
}
fn float() -> String {
    "float".into()
}

/// The loaded model, its tokenizer and its files.
pub struct LoadedIdefics {
    pub model: Flamingo,
    pub tokenizer: FlamingoTokenizer,
    pub files: IdeficsFiles,
}

/// Loads an IDEFICS directory onto `device` in `dtype` (weights in any float dtype converted).
pub fn load(dir: &Path, device: &Device, dtype: DType, progress: &dyn LoadProgress) -> Result<LoadedIdefics> {
    crate::device::check_supported(device, dtype)?;
    let files = IdeficsFiles::resolve(dir)?;
    progress.stage("reading configs and tokenizer");
    let raw = read_json(&files.config)?;
    let cfg: IdeficsConfig =
        serde_json::from_value(raw.clone()).map_err(|e| Error::file(&files.config, format!("invalid IDEFICS config: {e}")))?;
    let bad = |msg: String| Error::file(&files.config, msg);
    if !cfg.use_resampler {
        return Err(bad("use_resampler is false: IDEFICS without the perceiver resampler is not supported".into()));
    }
    let alpha_vector = match cfg.alpha_type.as_str() {
        "float" => false,
        "vector" => true,
        other => return Err(bad(format!("alpha_type `{other}` (expected \"float\" or \"vector\")"))),
    };
    let v = &cfg.vision_config;
    if v.patch_size == 0 || v.image_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
        return Err(bad(format!("vision_config: image_size {} is not a multiple of patch_size {}", v.image_size, v.patch_size)));
    }
    if v.num_attention_heads == 0 || !v.embed_dim.is_multiple_of(v.num_attention_heads) {
        return Err(bad(format!(
            "vision_config: embed_dim {} is not a multiple of num_attention_heads {}",
            v.embed_dim, v.num_attention_heads
        )));
    }
    if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        return Err(bad(format!("hidden_size {} is not a multiple of num_attention_heads {}", cfg.hidden_size, cfg.num_attention_heads)));
    }
    if cfg.cross_layer_interval == 0 {
        return Err(bad("cross_layer_interval must be >= 1".into()));
    }
    let act = |name: &str, what: &str| Activation::from_hf_name(name).ok_or_else(|| bad(format!("{what} `{name}` is not supported")));
    let vision_act = act(&v.hidden_act, "vision_config.hidden_act")?;
    let lm_act = act(&cfg.hidden_act, "hidden_act")?;
    let image_size = match &files.preprocessor {
        Some(p) => read_json(p)?.get("image_size").and_then(|s| s.as_u64()).map_or(v.image_size, |s| s as usize),
        None => v.image_size,
    };
    if image_size != v.image_size {
        return Err(Error::file(
            files.preprocessor.as_deref().unwrap_or(dir),
            format!("image_size {image_size} differs from the vision tower's {}", v.image_size),
        ));
    }
    let tokenizer = FlamingoTokenizer::from_idefics_dir(dir)?;
    let rows = cfg.vocab_size + cfg.additional_vocab_size;
    let media = tokenizer.media_token_id();
    if media as usize >= rows {
        return Err(Error::file(
            dir.join("tokenizer.json"),
            format!("<image> has id {media}, outside the model's {rows} embedding rows (vocab_size + additional_vocab_size)"),
        ));
    }

    progress.stage("indexing weights");
    let mut store = WeightStore::new();
    for p in &files.weights {
        let (idx, names) = store.open(p)?;
        for n in names {
            store.insert(n.clone(), idx, n);
        }
    }
    store.set_home("", "", files.weights.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    let weights_file = files.weights.first().cloned().unwrap_or_else(|| files.config.clone());
    let vb = VarBuilder::from_backend(Box::new(store), dtype, device.clone());
    let err = |e: candle_core::Error| load_error(e, &weights_file);

    progress.stage("loading language model");
    let lm =
        lm::llama::load_idefics(&raw, cfg.vocab_size, cfg.additional_vocab_size, vb.clone()).map_err(|e| load_error(e, &files.config))?;
    let num_layers = lm.num_layers();
    if cfg.cross_layer_interval == 0 {
        return Err(Error::file(&files.config, "cross_layer_interval must be positive"));
    }
    let gated: Vec<usize> = (0..num_layers).filter(|i| i % cfg.cross_layer_interval == 0).collect();

    progress.stage("loading cross-attention, perceiver and vision tower");
    let d = cfg.hidden_size;
    let dim_head =
        lm::head_dim(d, cfg.num_attention_heads, "hidden_size / num_attention_heads").map_err(|e| load_error(e, &files.config))?;
    let xattn_cfg = XattnConfig { dim: d, dim_visual: v.embed_dim, heads: cfg.num_attention_heads, dim_head, ff_mult: 0 };
    let mut xattn: Vec<Option<GatedCrossAttentionBlock>> = (0..num_layers).map(|_| None).collect();
    for &i in &gated {
        let vb = vb.pp(format!("model.gated_cross_attn_layers.{}", i / cfg.cross_layer_interval));
        xattn[i] = Some(gated_block(&xattn_cfg, &cfg, alpha_vector, lm_act, vb).map_err(err)?);
    }
    let p = &cfg.perceiver_config;
    let perceiver_cfg = PerceiverConfig {
        dim: v.embed_dim,
        depth: p.resampler_depth,
        heads: p.resampler_n_heads,
        dim_head: p.resampler_head_dim,
        num_latents: p.resampler_n_latents,
        ff_mult: 4,
        max_num_frames: None,
        max_num_media: None,
    };
    let perceiver = perceiver(&perceiver_cfg, p.qk_layer_norms_perceiver, vb.pp("model.perceiver_resampler")).map_err(err)?;
    let vision_cfg = VisionConfig {
        image_size: v.image_size,
        patch_size: v.patch_size,
        width: v.embed_dim,
        layers: v.num_hidden_layers,
        heads: v.num_attention_heads,
        mlp_width: v.intermediate_size,
        quick_gelu: vision_act == Activation::QuickGelu,
        ln_post_on_tokens: false,
        keep_cls: true,
        ln_eps: v.layer_norm_eps,
    };
    let vision = hf_clip_vision(&vision_cfg, vision_act, vb.pp("model.vision_model")).map_err(err)?;

    let config = ResolvedConfig {
        model_family: ModelFamily::Idefics,
        family: LmFamily::Llama,
        vision: vision_cfg,
        perceiver: perceiver_cfg,
        xattn: xattn_cfg,
        resize: Resize::StretchOnWhite,
        media_rule: MediaRule::ResetAfterEos { media, eos: cfg.eos_token_id },
        gated_layers: gated,
        cross_attn_every_n_layers: Some(cfg.cross_layer_interval),
        media_token_id: media,
        eoc_token_id: tokenizer.eoc_token_id(),
        eos_token_id: tokenizer.eos_token_id(),
        vocab_rows: rows,
    };
    let mut model = Flamingo { vision, perceiver, xattn, lm, config, device: device.clone(), dtype, kv_pool: None };
    model.set_paged_kv(Flamingo::default_paged(device));
    Ok(LoadedIdefics { model, tokenizer, files })
}

/// `IdeficsGatedCrossAttentionLayer`; `vb` at `model.gated_cross_attn_layers.{j}`.
fn gated_block(
    x: &XattnConfig,
    cfg: &IdeficsConfig,
    alpha_vector: bool,
    act: Activation,
    vb: VarBuilder,
) -> candle_core::Result<GatedCrossAttentionBlock> {
    let inner = x.heads * x.dim_head;
    let a = vb.pp("cross_attn");
    let k = a.get((inner, x.dim_visual), "k_proj.weight")?;
    let v = a.get((inner, x.dim_visual), "v_proj.weight")?;
    let m = vb.pp("mlp");
    let gate = |name: &str| -> candle_core::Result<Tensor> {
        let g = if alpha_vector { vb.get((1, 1, x.dim), name)?.reshape(x.dim)? } else { vb.get(1, name)? };
        g.tanh()
    };
    let qk_norm = |name: &str| cfg.qk_layer_norms.then(|| rms_norm(x.dim_head, cfg.rms_norm_eps, a.pp(name))).transpose();
    Ok(GatedCrossAttentionBlock {
        norm: Norm::Rms(rms_norm(x.dim, cfg.rms_norm_eps, vb.pp("input_layernorm"))?),
        to_q: linear(x.dim, inner, false, a.pp("q_proj"))?,
        to_kv: Linear::new(Tensor::cat(&[&k, &v], 0)?, None),
        to_out: linear(inner, x.dim, false, a.pp("o_proj"))?,
        q_norm: qk_norm("q_layer_norm")?,
        k_norm: qk_norm("k_layer_norm")?,
        attn_gate: gate("alpha_cross_attn")?,
        ff: XattnFeedForward::SwiGlu {
            norm: rms_norm(x.dim, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            gate: linear(x.dim, cfg.intermediate_size, false, m.pp("gate_proj"))?,
            up: linear(x.dim, cfg.intermediate_size, false, m.pp("up_proj"))?,
            down: linear(cfg.intermediate_size, x.dim, false, m.pp("down_proj"))?,
            act,
        },
        ff_gate: gate("alpha_dense")?,
        heads: x.heads,
        dim_head: x.dim_head,
        stacked: std::sync::Mutex::new(None),
    })
}

/// `IdeficsPerceiverResampler`; `vb` at `model.perceiver_resampler`.
fn perceiver(cfg: &PerceiverConfig, qk_norms: bool, vb: VarBuilder) -> candle_core::Result<PerceiverResampler> {
    let inner = cfg.heads * cfg.dim_head;
    let layers = (0..cfg.depth)
        .map(|i| {
            let a = vb.pp(format!("blocks.{i}.0"));
            let f = vb.pp(format!("blocks.{i}.1"));
            let k = a.get((inner, cfg.dim), "k_proj.weight")?;
            let v = a.get((inner, cfg.dim), "v_proj.weight")?;
            let qk_norm = |name: &str| qk_norms.then(|| LayerNorm::new(cfg.dim_head, 1e-5, true, a.pp(name))).transpose();
            let attn = PerceiverAttention {
                norm_media: LayerNorm::new(cfg.dim, 1e-5, true, a.pp("context_layer_norm"))?,
                norm_latents: LayerNorm::new(cfg.dim, 1e-5, true, a.pp("latents_layer_norm"))?,
                to_q: linear(cfg.dim, inner, false, a.pp("q_proj"))?,
                to_kv: Linear::new(Tensor::cat(&[&k, &v], 0)?, None),
                to_out: linear(inner, cfg.dim, false, a.pp("output_proj"))?,
                q_norm: qk_norm("q_layer_norm")?,
                k_norm: qk_norm("k_layer_norm")?,
                heads: cfg.heads,
                dim_head: cfg.dim_head,
            };
            let ff = FeedForward {
                norm: LayerNorm::new(cfg.dim, 1e-5, true, f.pp("ln"))?,
                fc1: linear(cfg.dim, cfg.dim * cfg.ff_mult, false, f.pp("fc"))?,
                fc2: linear(cfg.dim * cfg.ff_mult, cfg.dim, false, f.pp("c_proj"))?,
                act: Activation::Relu,
            };
            Ok((attn, ff))
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(PerceiverResampler {
        latents: vb.get((cfg.num_latents, cfg.dim), "latents")?,
        frame_embs: None,
        media_time_embs: None,
        layers,
        norm: LayerNorm::new(cfg.dim, 1e-5, true, vb.pp("layer_norm"))?,
        cfg: cfg.clone(),
    })
}

/// HF CLIP's vision transformer (`IdeficsVisionTransformer`); `vb` at `model.vision_model`.
fn hf_clip_vision(cfg: &VisionConfig, act: Activation, vb: VarBuilder) -> candle_core::Result<VisionTransformer> {
    let (w, p, eps) = (cfg.width, cfg.patch_size, cfg.ln_eps);
    let e = vb.pp("embeddings");
    let conv1 = Conv2d::new(e.get((w, 3, p, p), "patch_embedding.weight")?, None, Conv2dConfig { stride: p, ..Default::default() });
    let blocks = (0..cfg.layers)
        .map(|i| {
            let l = vb.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            let qkv = |part: &str| -> candle_core::Result<Tensor> {
                Tensor::cat(
                    &[
                        &a.get((w, w), &format!("q_proj.{part}"))?,
                        &a.get((w, w), &format!("k_proj.{part}"))?,
                        &a.get((w, w), &format!("v_proj.{part}"))?,
                    ],
                    0,
                )
            };
            let bias = Tensor::cat(&[&a.get(w, "q_proj.bias")?, &a.get(w, "k_proj.bias")?, &a.get(w, "v_proj.bias")?], 0)?;
            Ok(ResidualBlock {
                ln_1: LayerNorm::new(w, eps, true, l.pp("layer_norm1"))?,
                in_proj: Linear::new(qkv("weight")?, Some(bias)),
                out_proj: linear(w, w, true, a.pp("out_proj"))?,
                ln_2: LayerNorm::new(w, eps, true, l.pp("layer_norm2"))?,
                c_fc: linear(w, cfg.mlp_width, true, l.pp("mlp.fc1"))?,
                c_proj: linear(cfg.mlp_width, w, true, l.pp("mlp.fc2"))?,
                act,
                heads: cfg.heads,
            })
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(VisionTransformer {
        conv1,
        class_embedding: e.get(w, "class_embedding")?,
        positional_embedding: e.get((cfg.num_patches() + 1, w), "position_embedding.weight")?,
        ln_pre: LayerNorm::new(w, eps, true, vb.pp("pre_layrnorm"))?,
        blocks,
        ln_post: LayerNorm::new(w, eps, true, vb.pp("post_layernorm"))?,
        // IDEFICS keeps only CLIP's vision model: no projection.
        proj: None,
        cfg: cfg.clone(),
    })
}
