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

use std::sync::Mutex;

use candle_core::{DType, Module, Result, Tensor, TensorId};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::nn::{attend_row, attention, linear, merge_heads, split_heads, with_f32, Activation, Keys, LayerNorm, Linear, RmsNorm};
use crate::perceiver::FeedForward;
use crate::state::{XattnImages, XattnKv};

#[derive(Debug, Clone)]
pub struct XattnConfig {
    pub dim: usize,
    pub dim_visual: usize,
    pub heads: usize,
    pub dim_head: usize,
    /// Feed-forward width / `dim` (OpenFlamingo's GELU FF); 0 for IDEFICS' SwiGLU, whose width
    /// is the LM's `intermediate_size` and need not be a multiple.
    pub ff_mult: usize,
}

pub struct GatedCrossAttentionBlock {
    pub(crate) norm: Norm,
    pub(crate) to_q: Linear,
    /// Keys and values in one projection (`[2 * inner, dim_visual]`; a family with separate
    /// `k_proj` / `v_proj` has them concatenated at load).
    pub(crate) to_kv: Linear,
    pub(crate) to_out: Linear,
    /// RMS norms over each head of the queries and keys (IDEFICS' `qk_layer_norms`).
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
    /// `tanh` of the attention gate: `[1]` (one per block) or `[dim]` (one per channel).
    pub(crate) attn_gate: Tensor,
    pub(crate) ff: XattnFeedForward,
    /// `tanh` of the feed-forward gate, shaped as `attn_gate`.
    pub(crate) ff_gate: Tensor,
    pub(crate) heads: usize,
    pub(crate) dim_head: usize,
    /// The batched path's stacked K/V of the last decode batch (see [`Self::attend_batched`]).
    pub(crate) stacked: Mutex<Option<Stacked>>,
}

/// The pre-attention norm of a gated block: OpenFlamingo's LayerNorm or IDEFICS' RMSNorm.
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

/// The gated block's feed-forward, its own norm included: OpenFlamingo's
/// `LayerNorm -> Linear -> GELU -> Linear`, or IDEFICS' `RMSNorm -> SwiGLU` (LLaMA's MLP).
pub enum XattnFeedForward {
    Gelu(FeedForward),
    SwiGlu { norm: RmsNorm, gate: Linear, up: Linear, down: Linear, act: Activation },
}

impl Module for XattnFeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            XattnFeedForward::Gelu(ff) => ff.forward(x),
            XattnFeedForward::SwiGlu { norm, gate, up, down, act } => {
                let h = norm.forward(x)?;
                down.forward(&(act.forward(&gate.forward(&h)?)? * up.forward(&h)?)?)
            }
        }
    }
}

/// The K/V of the images a batch's decode rows attend to, stacked one per row `[b, heads, n, d]`,
/// with the (piece, image) each row came from: while the decode batch keeps its sequences (most
/// steps), the next step reuses them instead of copying every row's image again.
pub(crate) struct Stacked {
    key: Vec<(TensorId, usize)>,
    k: Tensor,
    v: Tensor,
}

/// The media index (0-based) each row attends to, or `None` before the first image.
pub type MediaIndex = Option<usize>;

impl GatedCrossAttentionBlock {
    /// OpenFlamingo's block; `vb` points at `...gated_cross_attn_layer`.
    pub fn new(cfg: &XattnConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let a = vb.pp("attn");
        Ok(Self {
            norm: Norm::Layer(LayerNorm::new(cfg.dim, 1e-5, true, a.pp("norm"))?),
            to_q: linear(cfg.dim, inner, false, a.pp("to_q"))?,
            to_kv: linear(cfg.dim_visual, 2 * inner, false, a.pp("to_kv"))?,
            to_out: linear(inner, cfg.dim, false, a.pp("to_out"))?,
            q_norm: None,
            k_norm: None,
            attn_gate: vb.get(1, "attn_gate")?.tanh()?,
            ff: XattnFeedForward::Gelu(FeedForward::new(cfg.dim, cfg.ff_mult, vb.pp("ff"))?),
            ff_gate: vb.get(1, "ff_gate")?.tanh()?,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
            stacked: Mutex::new(None),
        })
    }

    /// Keys and values over a sequence's image latents `[T, n, d_visual]`: computed once per
    /// request and reused at every step.
    pub fn media_kv(&self, latents: &Tensor) -> Result<XattnKv> {
        let (t, n, dv) = latents.dims3()?;
        let inner = self.heads * self.dim_head;
        let kv = self.to_kv.forward(&latents.reshape((t * n, dv))?)?.reshape((t, n, 2 * inner))?;
        let split = |off: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let x = kv.narrow(2, off, inner)?.reshape((t, n, self.heads, self.dim_head))?;
            let x = match norm {
                Some(norm) => norm.forward(&x.contiguous()?)?,
                None => x,
            };
            x.transpose(1, 2)?.contiguous()
        };
        Ok(XattnKv { k: split(0, self.k_norm.as_ref())?, v: split(inner, None)? })
    }

    /// `x`: `[rows, d]`, stacked sequences; `seqs[i] = (media kv, media index of each of its rows)`.
    /// `batched`: attend the decode rows together ([`Self::attend_batched`], the device path)
    /// rather than in the CPU's fused loop.
    pub fn forward(&self, x: &Tensor, seqs: &[(&XattnImages, &[MediaIndex])], batched: bool) -> Result<Tensor> {
        let mut q = self.to_q.forward(&self.norm.forward(x)?)?;
        if let Some(norm) = &self.q_norm {
            let (rows, inner) = q.dims2()?;
            q = norm.forward(&q.reshape((rows, self.heads, self.dim_head))?)?.reshape((rows, inner))?;
        }
        let a = if batched {
            self.attend_batched(&q, seqs)?
        } else if q.device().is_cpu() && q.dtype() == DType::F32 {
            self.attend_cpu(&q.contiguous()?, seqs)?
        } else {
            self.attend(&q, seqs)?
        };
        let a = self.to_out.forward(&a)?;
        let x = (a.broadcast_mul(&self.attn_gate)? + x)?;
        self.ff.forward(&x)?.broadcast_mul(&self.ff_gate)? + x
    }

    /// Runs of rows attending to the same image: `(first row, rows, image, sequence)`.
    fn runs(seqs: &[(&XattnImages, &[MediaIndex])]) -> Vec<(usize, usize, MediaIndex, usize)> {
        let mut runs = Vec::new();
        let mut row = 0;
        for (s, (_, media)) in seqs.iter().enumerate() {
            let mut start = 0;
            while start < media.len() {
                let m = media[start];
                let mut end = start + 1;
                while end < media.len() && media[end] == m {
                    end += 1;
                }
                runs.push((row + start, end - start, m, s));
                start = end;
            }
            row += media.len();
        }
        runs
    }

    /// The attention output `[rows, inner]` with candle ops, one run at a time.
    fn attend(&self, q: &Tensor, seqs: &[(&XattnImages, &[MediaIndex])]) -> Result<Tensor> {
        let inner = self.heads * self.dim_head;
        let mut parts = Vec::new();
        for (row, len, m, s) in Self::runs(seqs) {
            parts.push(match m {
                Some(img) => {
                    let (kv, img) = Self::image(seqs[s].0, img)?;
                    self.attend_run(q, row, len, kv, img)?
                }
                None => Tensor::zeros((len, inner), q.dtype(), q.device())?,
            });
        }
        Tensor::cat(&parts, 0)
    }

    /// [`Self::attend`] with every single-row run (a decode row) in one batched attention over
    /// the rows' images stacked `[b, heads, n, d]` (kept while the decode batch is unchanged, see
    /// [`Stacked`]); longer runs (prefill) one at a time as in [`Self::attend`]. A constant
    /// number of device operations per layer for the decode rows, whatever their number.
    fn attend_batched(&self, q: &Tensor, seqs: &[(&XattnImages, &[MediaIndex])]) -> Result<Tensor> {
        let (rows, inner) = q.dims2()?;
        let mut single = Vec::new();
        let mut key = Vec::new();
        let mut rest = Vec::new();
        for (row, len, m, s) in Self::runs(seqs) {
            match m {
                Some(img) if len == 1 => {
                    let (kv, i) = Self::image(seqs[s].0, img)?;
                    single.push(row as u32);
                    key.push((kv.k.id(), i));
                    rest.push(None);
                }
                _ => rest.push(Some((row, len, m, s))),
            }
        }
        if single.len() < 2 {
            return self.attend(q, seqs);
        }
        let (k, v) = self.stacked_kv(seqs, &key)?;
        let b = single.len();
        let all_rows = b == rows;
        let qd = if all_rows { q.clone() } else { q.contiguous()?.index_select(&Tensor::new(single.as_slice(), q.device())?, 0)? };
        let dtype = q.dtype();
        let scale = 1.0 / (self.dim_head as f64).sqrt();
        let qd = qd.reshape((b, self.heads, 1, self.dim_head))?.to_dtype(DType::F32)?;
        let scores = (qd.matmul(&k.to_dtype(DType::F32)?.t()?)? * scale)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = p.matmul(&v.to_dtype(DType::F32)?)?.reshape((b, inner))?.to_dtype(dtype)?;
        if all_rows {
            return Ok(out);
        }
        // cat(decode rows, other runs in order), then each stacked row picks its place.
        let mut parts = vec![out];
        let mut src: Vec<u32> = single;
        for (row, len, m, s) in rest.into_iter().flatten() {
            parts.push(match m {
                Some(img) => {
                    let (kv, img) = Self::image(seqs[s].0, img)?;
                    self.attend_run(q, row, len, kv, img)?
                }
                None => Tensor::zeros((len, inner), dtype, q.device())?,
            });
            src.extend(row as u32..(row + len) as u32);
        }
        let mut inv = vec![0u32; rows];
        for (r, &s) in src.iter().enumerate() {
            if let Some(slot) = inv.get_mut(s as usize) {
                *slot = r as u32;
            }
        }
        Tensor::cat(&parts, 0)?.index_select(&Tensor::new(inv.as_slice(), q.device())?, 0)
    }

    /// The decode rows' images' K/V stacked per row, reusing the last step's when the rows
    /// attend to the same images as then.
    fn stacked_kv(&self, seqs: &[(&XattnImages, &[MediaIndex])], key: &[(TensorId, usize)]) -> Result<(Tensor, Tensor)> {
        let mut cached = self.stacked.lock().map_err(|_| candle_core::Error::Msg("cross-attention cache lock poisoned".into()))?;
        if let Some(st) = cached.as_ref() {
            if st.key == key {
                return Ok((st.k.clone(), st.v.clone()));
            }
        }
        let mut ks = Vec::with_capacity(key.len());
        let mut vs = Vec::with_capacity(key.len());
        for (_, len, m, s) in Self::runs(seqs) {
            if let (Some(img), 1) = (m, len) {
                let (kv, i) = Self::image(seqs[s].0, img)?;
                ks.push(kv.k.get(i)?);
                vs.push(kv.v.get(i)?);
            }
        }
        let (k, v) = (Tensor::stack(&ks, 0)?, Tensor::stack(&vs, 0)?);
        *cached = Some(Stacked { key: key.to_vec(), k: k.clone(), v: v.clone() });
        Ok((k, v))
    }

    /// The K/V piece holding a sequence's image `img`, and the image's index in it.
    fn image(kv: &XattnImages, img: usize) -> Result<(&XattnKv, usize)> {
        match kv.image(img) {
            Some(found) => Ok(found),
            None => candle_core::bail!("token attends to image {img} but {} images are attached", kv.len()),
        }
    }

    fn attend_run(&self, q: &Tensor, row: usize, len: usize, kv: &XattnKv, img: usize) -> Result<Tensor> {
        let scale = 1.0 / (self.dim_head as f64).sqrt();
        let qh = split_heads(&q.narrow(0, row, len)?, self.heads)?;
        merge_heads(&attention(&qh, &kv.k.get(img)?, &kv.v.get(img)?, scale, None)?)
    }

    /// [`Self::attend`] on the CPU in f32: rows of runs of up to [`FUSED_MAX_RUN`] rows (decode
    /// steps, short prefill chunks) in a fused loop over the image's keys, in parallel; longer
    /// runs with candle ops.
    fn attend_cpu(&self, q: &Tensor, seqs: &[(&XattnImages, &[MediaIndex])]) -> Result<Tensor> {
        let (rows, inner) = q.dims2()?;
        let mut out = vec![0f32; rows * inner];
        let mut fused: Vec<Option<(&XattnKv, usize)>> = vec![None; rows];
        for (row, len, m, s) in Self::runs(seqs) {
            let (kv, img) = match m {
                Some(img) => Self::image(seqs[s].0, img)?,
                None => continue, // exactly zero
            };
            if len <= FUSED_MAX_RUN && kv.k.is_contiguous() && kv.v.is_contiguous() {
                let (t, heads, _, d) = kv.k.dims4()?;
                if heads != self.heads || d != self.dim_head || img >= t {
                    candle_core::bail!("cross-attention K/V of shape {:?} do not fit this layer", kv.k.dims());
                }
                fused[row..row + len].fill(Some((kv, img)));
            } else {
                let o = self.attend_run(q, row, len, kv, img)?;
                out[row * inner..(row + len) * inner].copy_from_slice(&o.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        with_f32(q, |qs| {
            out.par_chunks_mut(inner).zip(fused).enumerate().try_for_each(|(row, (dst, f))| match f {
                Some((kv, img)) => self.fused_row(&qs[row * inner..(row + 1) * inner], kv, img, dst),
                None => Ok(()),
            })
        })??;
        Tensor::from_vec(out, (rows, inner), q.device())
    }

    /// `softmax(q·kᵀ·scale)·v` per head for one row `q` (`inner`) over image `img`'s latents,
    /// written to `dst` (`inner`).
    fn fused_row(&self, q: &[f32], kv: &XattnKv, img: usize, dst: &mut [f32]) -> Result<()> {
        let (_, heads, n, d) = kv.k.dims4()?;
        let scale = 1.0 / (d as f32).sqrt();
        with_f32(&kv.k, |ks| {
            with_f32(&kv.v, |vs| {
                let keys = Keys { k: ks, v: vs, base: img * heads * n * d, head_stride: n * d, n, rep: 1 };
                attend_row(q, &keys, heads, d, scale, None, dst)
            })
        })??;
        Ok(())
    }
}

/// Runs of at most this many rows attend through [`GatedCrossAttentionBlock::fused_row`] on the
/// CPU; longer ones (a long prefill) through candle's batched matmuls.
const FUSED_MAX_RUN: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;

    /// The fused CPU path (short runs, in parallel) equals the candle-ops path, for decode-like
    /// single rows, short runs, text before any image, and a run too long to fuse.
    #[test]
    fn fused_attention_matches_candle_ops() {
        let dev = Device::Cpu;
        let vb = VarBuilder::from_backend(Box::new(crate::random::RandomBackend::default()), DType::F32, dev.clone());
        let cfg = XattnConfig { dim: 64, dim_visual: 48, heads: 4, dim_head: 16, ff_mult: 2 };
        let block = GatedCrossAttentionBlock::new(&cfg, vb).unwrap();
        let latents = Tensor::randn(0f32, 1.0, (3, 5, 48), &dev).unwrap();
        // All three images in one piece, and the same images attached as two pieces (2 + 1).
        let mut one = XattnImages::default();
        one.push(block.media_kv(&latents).unwrap());
        let mut two = XattnImages::default();
        two.push(block.media_kv(&latents.narrow(0, 0, 2).unwrap()).unwrap());
        two.push(block.media_kv(&latents.narrow(0, 2, 1).unwrap()).unwrap());
        let long = FUSED_MAX_RUN + 3;
        let a: Vec<MediaIndex> = vec![None, None, Some(0), Some(0), Some(1), Some(2)];
        let b: Vec<MediaIndex> = vec![Some(2)];
        let c: Vec<MediaIndex> = vec![Some(1); long];
        let rows = a.len() + b.len() + c.len();
        let q = Tensor::randn(0f32, 1.0, (rows, 64), &dev).unwrap();
        let run = |kv: &XattnImages| {
            let seqs: Vec<(&XattnImages, &[MediaIndex])> = vec![(kv, &a), (kv, &b), (kv, &c)];
            let fused = block.attend_cpu(&q, &seqs).unwrap().to_vec2::<f32>().unwrap();
            let plain = block.attend(&q, &seqs).unwrap().to_vec2::<f32>().unwrap();
            (fused, plain)
        };
        let (fused, plain) = run(&one);
        for (r, (f, p)) in fused.iter().zip(&plain).enumerate() {
            for (x, y) in f.iter().zip(p) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "row {r}: {x} vs {y}");
            }
        }
        // The batched path: decode rows (single-row runs) of several sequences together, mixed
        // with longer runs and with text before any image, and a pure decode batch; twice, the
        // second time from the stacked K/V it kept.
        let d1: Vec<MediaIndex> = vec![Some(0)];
        let d2: Vec<MediaIndex> = vec![Some(1)];
        let mixed: Vec<(&XattnImages, &[MediaIndex])> = vec![(&one, &a), (&one, &b), (&two, &d1), (&one, &c), (&two, &d2)];
        let decode: Vec<(&XattnImages, &[MediaIndex])> = vec![(&one, &b), (&two, &d1), (&one, &d2), (&two, &b)];
        for seqs in [&mixed, &decode] {
            let n: usize = seqs.iter().map(|(_, m)| m.len()).sum();
            let qs = Tensor::randn(0f32, 1.0, (n, 64), &dev).unwrap();
            let want = block.attend_cpu(&qs, seqs).unwrap().to_vec2::<f32>().unwrap();
            for _ in 0..2 {
                let got = block.attend_batched(&qs, seqs).unwrap().to_vec2::<f32>().unwrap();
                for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                    for (x, y) in g.iter().zip(w) {
                        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "batched row {r}: {x} vs {y}");
                    }
                }
            }
        }
        // Text before the first image attends to nothing.
        assert!(fused[0].iter().chain(&fused[1]).all(|&v| v == 0.0));
        // The pieces find the same images (`to_kv` works row by row, so the K/V are the same
        // values whichever images are projected together).
        let (fused2, plain2) = run(&two);
        assert_eq!(fused, fused2);
        assert_eq!(plain, plain2);
        // An image that is not attached is an error, not a panic.
        let bad: Vec<MediaIndex> = vec![Some(3)];
        for kv in [&one, &two] {
            let q1 = q.narrow(0, 0, 1).unwrap();
            assert!(block.attend_cpu(&q1, &[(kv, &bad)]).is_err());
            assert!(block.attend(&q1, &[(kv, &bad)]).is_err());
        }
    }
}
