//! Gated XATTN-DENSE (Flamingo paper §2.2, Fig. 4): tanh-gated cross-attention from text to the
//! visual latents, then a tanh-gated feed-forward, inserted before chosen LM layers.
//!
//! Masking (`only_attend_immediate_media`, the released models' setting): with
//! `text_time = cumsum(token == <image>)` (the `<image>` token belongs to its own image), a token
//! attends only to the latents of image number `text_time`; tokens before the first image
//! (`text_time == 0`) get an attention output of exactly zero (their feed-forward residual still
//! applies). Generated tokens attend to the last image of the prompt. One quirk of the reference
//! is kept for exactness: a *generated* `<image>` token is processed alone, so its cumulative
//! count is 1 and it, and every token after it, attends to the FIRST image.
//!
//! Because each token sees exactly one image's 64 latents, attention runs per run of tokens with
//! the same `text_time` over that image's keys only; the reference's masked softmax gives those
//! keys exactly the same weights (masked scores underflow to 0).
//! Reference: open_flamingo 2.0.1 `src/helpers.py` (`MaskedCrossAttention`,
//! `GatedCrossAttentionBlock`), `src/flamingo_lm.py` (`FlamingoLMMixin.forward`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{attention, linear, merge_heads, split_heads, LayerNorm, Linear};
use crate::perceiver::FeedForward;
use crate::state::XattnKv;

#[derive(Debug, Clone)]
pub struct XattnConfig {
    pub dim: usize,
    pub dim_visual: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub ff_mult: usize,
}

pub struct GatedCrossAttentionBlock {
    norm: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    attn_gate: Tensor,
    ff: FeedForward,
    ff_gate: Tensor,
    heads: usize,
    dim_head: usize,
}

/// The media index (0-based) each row attends to, or `None` before the first image.
pub type MediaIndex = Option<usize>;

impl GatedCrossAttentionBlock {
    /// `vb` points at `...gated_cross_attn_layer`.
    pub fn new(cfg: &XattnConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let a = vb.pp("attn");
        Ok(Self {
            norm: LayerNorm::new(cfg.dim, 1e-5, true, a.pp("norm"))?,
            to_q: linear(cfg.dim, inner, false, a.pp("to_q"))?,
            to_kv: linear(cfg.dim_visual, 2 * inner, false, a.pp("to_kv"))?,
            to_out: linear(inner, cfg.dim, false, a.pp("to_out"))?,
            attn_gate: vb.get(1, "attn_gate")?.tanh()?,
            ff: FeedForward::new(cfg.dim, cfg.ff_mult, vb.pp("ff"))?,
            ff_gate: vb.get(1, "ff_gate")?.tanh()?,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
        })
    }

    /// Keys and values over a sequence's image latents `[T, n, d_visual]`: computed once per
    /// request and reused at every step.
    pub fn media_kv(&self, latents: &Tensor) -> Result<XattnKv> {
        let (t, n, dv) = latents.dims3()?;
        let inner = self.heads * self.dim_head;
        let kv = self.to_kv.forward(&latents.reshape((t * n, dv))?)?.reshape((t, n, 2 * inner))?;
        let split = |off: usize| -> Result<Tensor> {
            kv.narrow(2, off, inner)?
                .reshape((t, n, self.heads, self.dim_head))?
                .transpose(1, 2)?
                .contiguous()
        };
        Ok(XattnKv { k: split(0)?, v: split(inner)? })
    }

    /// `x`: `[rows, d]`, stacked sequences; `seqs[i] = (media kv, media index of each of its rows)`.
    pub fn forward(&self, x: &Tensor, seqs: &[(Option<&XattnKv>, &[MediaIndex])]) -> Result<Tensor> {
        let q = self.to_q.forward(&self.norm.forward(x)?)?;
        let inner = self.heads * self.dim_head;
        let scale = 1.0 / (self.dim_head as f64).sqrt();
        let mut parts = Vec::new();
        let mut row = 0;
        for (kv, media) in seqs {
            let mut start = 0;
            while start < media.len() {
                let m = media[start];
                let mut end = start + 1;
                while end < media.len() && media[end] == m {
                    end += 1;
                }
                let len = end - start;
                match (m, kv) {
                    (Some(img), Some(kv)) => {
                        let qh = split_heads(&q.narrow(0, row + start, len)?, self.heads)?;
                        let o = attention(&qh, &kv.k.get(img)?, &kv.v.get(img)?, scale, None)?;
                        parts.push(merge_heads(&o)?);
                    }
                    (Some(img), None) => candle_core::bail!("token attends to image {img} but no images are attached"),
                    (None, _) => parts.push(Tensor::zeros((len, inner), x.dtype(), x.device())?),
                }
                start = end;
            }
            row += media.len();
        }
        let a = self.to_out.forward(&Tensor::cat(&parts, 0)?)?;
        let x = (a.broadcast_mul(&self.attn_gate)? + x)?;
        self.ff.forward(&x)?.broadcast_mul(&self.ff_gate)? + x
    }
}
