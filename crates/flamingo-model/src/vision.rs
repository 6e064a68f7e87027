//! open_clip's VisionTransformer as OpenFlamingo uses it (`clip.visual` with `output_tokens=True`):
//! conv patchify -> prepend class token -> + positional embedding -> `ln_pre` -> residual blocks
//! with fused `in_proj` attention -> the patch tokens (class token dropped, no `proj`).
//!
//! Whether `ln_post` is applied to the tokens is a switch: open_clip <= 2.22 (what the released
//! checkpoints were trained with) returns the tokens *without* it; 2.23+ applies it.
//! Reference: open_clip 2.20.0 `src/open_clip/transformer.py` (`VisionTransformer`,
//! `ResidualAttentionBlock`); Flamingo paper §2.1.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::Deserialize;

use crate::nn::{attention, linear, merge_heads, split_heads, Activation, LayerNorm, Linear};

/// Mirror of `vision_cfg` in an `open_clip_config.json` (`model_cfg` in newer files).
#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipVisionCfg {
    pub layers: usize,
    pub width: usize,
    #[serde(default = "head_width")]
    pub head_width: usize,
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
    pub patch_size: usize,
    pub image_size: serde_json::Value,
    #[serde(default)]
    pub ls_init_value: Option<f64>,
    #[serde(default)]
    pub timm_model_name: Option<String>,
    #[serde(default)]
    pub attentional_pool: bool,
    #[serde(default)]
    pub no_ln_pre: bool,
}

fn head_width() -> usize {
    64
}
fn mlp_ratio() -> f64 {
    4.0
}

/// Resolved vision-tower settings.
#[derive(Debug, Clone)]
pub struct VisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_width: usize,
    pub quick_gelu: bool,
    /// Apply `ln_post` to the patch tokens (open_clip >= 2.23 behaviour). Default: off.
    pub ln_post_on_tokens: bool,
    /// Keep the class token in the output (IDEFICS: 257 tokens); OpenFlamingo drops it.
    pub keep_cls: bool,
    /// LayerNorm epsilon (open_clip: 1e-5; HF CLIP: `layer_norm_eps`).
    pub ln_eps: f64,
}

impl VisionConfig {
    pub fn from_open_clip(v: &OpenClipVisionCfg, quick_gelu: bool) -> Result<Self> {
        if v.timm_model_name.is_some() {
            candle_core::bail!("timm vision towers are not supported (vision_cfg.timm_model_name)");
        }
        if v.ls_init_value.is_some() || v.attentional_pool || v.no_ln_pre {
            candle_core::bail!("unsupported open_clip vision_cfg option (ls_init_value / attentional_pool / no_ln_pre)");
        }
        let image_size = match &v.image_size {
            serde_json::Value::Number(n) => n.as_u64().unwrap_or(0) as usize,
            serde_json::Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0].as_u64().unwrap_or(0) as usize,
            other => candle_core::bail!("unsupported vision_cfg.image_size {other}"),
        };
        if image_size == 0
            || v.patch_size == 0
            || !image_size.is_multiple_of(v.patch_size)
            || v.head_width == 0
            || !v.width.is_multiple_of(v.head_width)
        {
            candle_core::bail!(
                "inconsistent vision_cfg: image_size {image_size}, patch_size {}, width {}, head_width {}",
                v.patch_size,
                v.width,
                v.head_width
            );
        }
        Ok(Self {
            image_size,
            patch_size: v.patch_size,
            width: v.width,
            layers: v.layers,
            heads: v.width / v.head_width,
            mlp_width: (v.width as f64 * v.mlp_ratio) as usize,
            quick_gelu,
            ln_post_on_tokens: false,
            keep_cls: false,
            ln_eps: 1e-5,
        })
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

pub(crate) struct ResidualBlock {
    pub(crate) ln_1: LayerNorm,
    /// q, k and v in one projection (HF CLIP's separate ones are concatenated at load).
    pub(crate) in_proj: Linear,
    pub(crate) out_proj: Linear,
    pub(crate) ln_2: LayerNorm,
    pub(crate) c_fc: Linear,
    pub(crate) c_proj: Linear,
    pub(crate) act: Activation,
    pub(crate) heads: usize,
}

impl ResidualBlock {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let a = vb.pp("attn");
        let in_proj = Linear::new(a.get((3 * w, w), "in_proj_weight")?, Some(a.get(3 * w, "in_proj_bias")?));
        Ok(Self {
            ln_1: LayerNorm::new(w, 1e-5, true, vb.pp("ln_1"))?,
            in_proj,
            out_proj: linear(w, w, true, a.pp("out_proj"))?,
            ln_2: LayerNorm::new(w, 1e-5, true, vb.pp("ln_2"))?,
            c_fc: linear(w, cfg.mlp_width, true, vb.pp("mlp.c_fc"))?,
            c_proj: linear(cfg.mlp_width, w, true, vb.pp("mlp.c_proj"))?,
            act: if cfg.quick_gelu { Activation::QuickGelu } else { Activation::Gelu },
            heads: cfg.heads,
        })
    }

    /// `x`: `[b, n, w]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, w) = x.dims3()?;
        let qkv = self.in_proj.forward(&self.ln_1.forward(x)?)?;
        let head_dim = w / self.heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut outs = Vec::with_capacity(b);
        for i in 0..b {
            let r = qkv.get(i)?;
            let q = split_heads(&r.narrow(D::Minus1, 0, w)?, self.heads)?;
            let k = split_heads(&r.narrow(D::Minus1, w, w)?, self.heads)?;
            let v = split_heads(&r.narrow(D::Minus1, 2 * w, w)?, self.heads)?;
            outs.push(merge_heads(&attention(&q, &k, &v, scale, None)?)?);
        }
        let a = Tensor::stack(&outs, 0)?.reshape((b, n, w))?;
        let x = (x + self.out_proj.forward(&a)?)?;
        let h = self.c_proj.forward(&self.act.forward(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?)?;
        x + h
    }
}

/// The vision tower; open_clip's names are read by [`Self::new`] at `visual`.
pub struct VisionTransformer {
    pub(crate) conv1: Conv2d,
    pub(crate) class_embedding: Tensor,
    pub(crate) positional_embedding: Tensor,
    pub(crate) ln_pre: LayerNorm,
    pub(crate) blocks: Vec<ResidualBlock>,
    pub(crate) ln_post: LayerNorm,
    /// open_clip's `proj` (`[width, embed_dim]`): the image embedding's projection, used only by
    /// [`Self::embed`]; `None` when the weights have none.
    pub(crate) proj: Option<Tensor>,
    pub(crate) cfg: VisionConfig,
}

impl VisionTransformer {
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let p = cfg.patch_size;
        let conv_w = vb.get((w, 3, p, p), "conv1.weight")?;
        let conv1 = Conv2d::new(conv_w, None, Conv2dConfig { stride: p, ..Default::default() });
        let blocks =
            (0..cfg.layers).map(|i| ResidualBlock::new(cfg, vb.pp(format!("transformer.resblocks.{i}")))).collect::<Result<_>>()?;
        Ok(Self {
            conv1,
            class_embedding: vb.get(w, "class_embedding")?,
            positional_embedding: vb.get((cfg.num_patches() + 1, w), "positional_embedding")?,
            ln_pre: LayerNorm::new(w, 1e-5, true, vb.pp("ln_pre"))?,
            blocks,
            ln_post: LayerNorm::new(w, 1e-5, true, vb.pp("ln_post"))?,
            proj: Self::load_proj(w, &vb)?,
            cfg: cfg.clone(),
        })
    }

    /// `proj`, when the file has it (`[width, d]`, any `d`).
    fn load_proj(w: usize, vb: &VarBuilder) -> Result<Option<Tensor>> {
        if !vb.contains_tensor("proj") {
            return Ok(None);
        }
        let p = vb.get_unchecked("proj")?;
        match p.dims() {
            [rows, _] if *rows == w => Ok(Some(p)),
            d => Err(candle_core::Error::Msg(format!("visual.proj has shape {d:?}, expected [{w}, embed_dim]"))),
        }
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Tokens per image this tower outputs: the patches, and the class token when it is kept.
    pub fn num_tokens(&self) -> usize {
        self.cfg.num_patches() + usize::from(self.cfg.keep_cls)
    }

    /// Pixels `[b, 3, H, W]` -> tokens `[b, num_tokens, width]` (patch tokens, after the class
    /// token when the tower keeps it).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.trunk(pixels)?;
        let tokens = if self.cfg.keep_cls { x } else { x.narrow(1, 1, self.cfg.num_patches())? };
        if self.cfg.ln_post_on_tokens {
            self.ln_post.forward(&tokens)
        } else {
            tokens.contiguous()
        }
    }

    /// open_clip's `encode_image` (the embedding OpenFlamingo's RICES compares): the class token
    /// after `ln_post`, times `proj` when the weights have it (HF CLIP towers, as IDEFICS has,
    /// have none: the class token after the post-LayerNorm, CLIP's `pooler_output`). Pixels
    /// `[b, 3, H, W]` -> `[b, d]`, not normalised.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.trunk(pixels)?;
        let cls = self.ln_post.forward(&x.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?)?;
        match &self.proj {
            Some(p) => cls.matmul(&p.to_dtype(cls.dtype())?),
            None => Ok(cls),
        }
    }

    /// Patch embedding, class token, positions, `ln_pre` and the blocks: `[b, 1 + patches, width]`.
    fn trunk(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let w = self.cfg.width;
        let x = self.conv1.forward(pixels)?; // [b, w, g, g]
        let x = x.flatten_from(2)?.transpose(1, 2)?; // [b, g*g, w]
        let cls = self.class_embedding.reshape((1, 1, w))?.broadcast_as((b, 1, w))?.to_dtype(x.dtype())?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.positional_embedding)?;
        let mut x = self.ln_pre.forward(&x)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        Ok(x)
    }
}
