//! Perceiver Resampler (Flamingo paper §2.1, Fig. 5): a fixed set of learned latents
//! cross-attends to the visual features of each media (frames x patch tokens, with optional
//! learned frame and media-time embeddings) and returns `num_latents` visual tokens per media.
//! Reference: open_flamingo 2.0.1 `src/helpers.py` (`PerceiverResampler`, `PerceiverAttention`,
//! `FeedForward`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{attention, linear, merge_heads, split_heads, Activation, LayerNorm, Linear};

#[derive(Debug, Clone)]
pub struct PerceiverConfig {
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub num_latents: usize,
    pub ff_mult: usize,
    /// Rows of `frame_embs` when the checkpoint has them (video support).
    pub max_num_frames: Option<usize>,
    /// Rows of `media_time_embs` when the checkpoint has them.
    pub max_num_media: Option<usize>,
}

/// `LayerNorm -> Linear(d, mult*d) -> activation -> Linear(mult*d, d)`, no biases in the linears.
/// OpenFlamingo's is `Sequential(LayerNorm, Linear, GELU, Linear)` (keys `.0`, `.1`, `.3`);
/// IDEFICS' perceiver has ReLU (keys `ln`, `fc`, `c_proj`).
pub struct FeedForward {
    pub(crate) norm: LayerNorm,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
    pub(crate) act: Activation,
}

impl FeedForward {
    /// OpenFlamingo's, `vb` at the `Sequential`.
    pub fn new(dim: usize, mult: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: LayerNorm::new(dim, 1e-5, true, vb.pp("0"))?,
            fc1: linear(dim, dim * mult, false, vb.pp("1"))?,
            fc2: linear(dim * mult, dim, false, vb.pp("3"))?,
            act: Activation::Gelu,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(&self.norm.forward(x)?)?)?)
    }
}

pub(crate) struct PerceiverAttention {
    pub(crate) norm_media: LayerNorm,
    pub(crate) norm_latents: LayerNorm,
    pub(crate) to_q: Linear,
    /// Keys and values in one projection (separate ones are concatenated at load).
    pub(crate) to_kv: Linear,
    pub(crate) to_out: Linear,
    /// LayerNorms over each head of the queries and keys (IDEFICS' `qk_layer_norms_perceiver`).
    pub(crate) q_norm: Option<LayerNorm>,
    pub(crate) k_norm: Option<LayerNorm>,
    pub(crate) heads: usize,
    pub(crate) dim_head: usize,
}

impl PerceiverAttention {
    fn new(cfg: &PerceiverConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        Ok(Self {
            norm_media: LayerNorm::new(cfg.dim, 1e-5, true, vb.pp("norm_media"))?,
            norm_latents: LayerNorm::new(cfg.dim, 1e-5, true, vb.pp("norm_latents"))?,
            to_q: linear(cfg.dim, inner, false, vb.pp("to_q"))?,
            to_kv: linear(cfg.dim, 2 * inner, false, vb.pp("to_kv"))?,
            to_out: linear(inner, cfg.dim, false, vb.pp("to_out"))?,
            q_norm: None,
            k_norm: None,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
        })
    }

    /// `x`: `[m, d]` media features of one media, `lat`: `[n, d]` -> `[n, d]`.
    fn forward(&self, x: &Tensor, lat: &Tensor) -> Result<Tensor> {
        let inner = self.heads * self.dim_head;
        let x = self.norm_media.forward(x)?;
        let lat = self.norm_latents.forward(lat)?;
        let mut q = split_heads(&self.to_q.forward(&lat)?, self.heads)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&x, &lat], 0)?)?;
        let mut k = split_heads(&kv.narrow(1, 0, inner)?, self.heads)?;
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        let v = split_heads(&kv.narrow(1, inner, inner)?, self.heads)?;
        let o = attention(&q, &k, &v, 1.0 / (self.dim_head as f64).sqrt(), None)?;
        self.to_out.forward(&merge_heads(&o)?)
    }
}

/// The resampler; OpenFlamingo's [`Self::new`] reads it at `perceiver`.
pub struct PerceiverResampler {
    pub(crate) latents: Tensor,
    pub(crate) frame_embs: Option<Tensor>,
    pub(crate) media_time_embs: Option<Tensor>,
    pub(crate) layers: Vec<(PerceiverAttention, FeedForward)>,
    pub(crate) norm: LayerNorm,
    pub(crate) cfg: PerceiverConfig,
}

impl PerceiverResampler {
    pub fn new(cfg: &PerceiverConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.depth)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                Ok((PerceiverAttention::new(cfg, l.pp("0"))?, FeedForward::new(cfg.dim, cfg.ff_mult, l.pp("1"))?))
            })
            .collect::<Result<_>>()?;
        let frame_embs = cfg.max_num_frames.map(|f| vb.get((f, cfg.dim), "frame_embs")).transpose()?;
        // `media_time_embs` is [T, 1, d] in the reference.
        let media_time_embs =
            cfg.max_num_media.map(|t| vb.get((t, 1, cfg.dim), "media_time_embs").and_then(|e| e.squeeze(1))).transpose()?;
        Ok(Self {
            latents: vb.get((cfg.num_latents, cfg.dim), "latents")?,
            frame_embs,
            media_time_embs,
            layers,
            norm: LayerNorm::new(cfg.dim, 1e-5, true, vb.pp("norm"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &PerceiverConfig {
        &self.cfg
    }

    /// Whether this resampler has frame embeddings, i.e. accepts several frames per media.
    pub fn supports_video(&self) -> bool {
        self.frame_embs.is_some()
    }

    /// Features `[T, F, v, d]` of one sample's `T` media with `F` frames each -> latents
    /// `[T, num_latents, d]`.
    ///
    /// `media_offset` is the index of the first of these media in the sample, for the media-time
    /// embedding (the reference adds `media_time_embs[:T]` over all media of a sample).
    pub fn forward(&self, x: &Tensor, media_offset: usize) -> Result<Tensor> {
        let (t, f, v, d) = x.dims4()?;
        let x = match &self.frame_embs {
            Some(fe) => {
                if f > fe.dim(0)? {
                    candle_core::bail!("{f} frames per media, but the perceiver has frame embeddings for {}", fe.dim(0)?);
                }
                x.broadcast_add(&fe.narrow(0, 0, f)?.reshape((1, f, 1, d))?)?
            }
            None if f > 1 => {
                candle_core::bail!("this model's Perceiver has no frame embeddings, so it takes one frame per image, not {f}")
            }
            None => x.clone(),
        };
        let mut x = x.reshape((t, f * v, d))?;
        if let Some(te) = &self.media_time_embs {
            if media_offset + t > te.dim(0)? {
                candle_core::bail!("{} media, but the perceiver has time embeddings for {}", media_offset + t, te.dim(0)?);
            }
            x = x.broadcast_add(&te.narrow(0, media_offset, t)?.unsqueeze(1)?)?;
        }
        let mut outs = Vec::with_capacity(t);
        for i in 0..t {
            let xi = x.get(i)?;
            let mut lat = self.latents.to_dtype(xi.dtype())?;
            for (attn, ff) in &self.layers {
                lat = (attn.forward(&xi, &lat)? + &lat)?;
                lat = (ff.forward(&lat)? + &lat)?;
            }
            outs.push(self.norm.forward(&lat)?);
        }
        Tensor::stack(&outs, 0)
    }
}
