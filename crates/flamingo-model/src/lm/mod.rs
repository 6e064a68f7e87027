//! Language-model families. Each family lives in its own file, with a serde mirror of its
//! `config.json` and module/key names exactly as in its checkpoints.
//!
//! All families run on a *ragged batch*: the new tokens of several sequences are stacked into one
//! `[n, d]` activation so every weight matrix is read once per step for all of them; only
//! self-attention runs per sequence, over that sequence's own KV cache.

pub mod gpt_neox;
pub mod llama;
pub mod mosaic_gpt;
pub mod mpt;

use candle_core::{DType, Device, Result, Tensor, D};
use rayon::prelude::*;

use crate::nn::{attend_row, attention, causal_mask, merge_heads, repeat_kv, split_heads, with_f32, Keys};
use crate::paged::{self, PagedStep};
use crate::state::SequenceState;

/// The sequences of one forward call: `lens[i]` new tokens of `seqs[i]`, stacked in order, each
/// with `pasts[i]` tokens already in its caches.
pub struct Batch<'a, 'b> {
    pub seqs: &'a mut [&'b mut SequenceState],
    pub lens: Vec<usize>,
    pub pasts: Vec<usize>,
    /// Per sequence: the additive attention bias (causal mask + ALiBi), the same in every layer
    /// of one forward, so it is built by the first layer and reused.
    pub(crate) attn_bias: Vec<Option<Option<Tensor>>>,
    /// Absolute position of every stacked row.
    positions: Vec<u32>,
    /// Rotary cos/sin tables for `positions`, built by the first layer that needs them (all
    /// layers of a model share one rotary setting).
    rope_tables: Option<(Tensor, Tensor)>,
    /// The paged caches' indices and masks for this forward, built by the first layer when the
    /// sequences' K/V live in a pool (the same in every layer).
    pub(crate) paged: Option<PagedStep>,
}

impl<'a, 'b> Batch<'a, 'b> {
    pub fn new(seqs: &'a mut [&'b mut SequenceState], lens: Vec<usize>, pasts: Vec<usize>) -> Self {
        let n = seqs.len();
        let positions = lens.iter().zip(&pasts).flat_map(|(&len, &past)| (past..past + len).map(|p| p as u32)).collect();
        Self { seqs, lens, pasts, attn_bias: vec![None; n], positions, rope_tables: None, paged: None }
    }
}

impl Batch<'_, '_> {
    /// Absolute position of every stacked row.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Applies rotary embedding to `x` (`[n, heads * head_dim]`), building the tables once.
    pub(crate) fn rotate(&mut self, rotary: &Rotary, x: &Tensor, heads: usize) -> Result<Tensor> {
        if self.rope_tables.is_none() {
            self.rope_tables = Some(rotary.tables(&self.positions, x.device())?);
        }
        match &self.rope_tables {
            Some((cos, sin)) => rotary.apply(x, heads, cos, sin),
            None => candle_core::bail!("rotary tables missing"),
        }
    }

    pub fn total(&self) -> usize {
        self.lens.iter().sum()
    }
}

/// One decoder layer of a language model.
pub trait DecoderLayer: Send + Sync {
    /// `x`: `[n, hidden]` rows of `batch`; appends this layer's K/V to each sequence's cache.
    fn forward(&self, x: &Tensor, batch: &mut Batch) -> Result<Tensor>;
    /// Key/value heads of the layer's self-attention.
    fn kv_heads(&self) -> usize;
}

/// A decoder-only language model split so that Flamingo can run a gated cross-attention block
/// before any of its layers.
pub trait LanguageModel: Send + Sync {
    /// Token ids `[n]` -> embeddings `[n, hidden]` (plus learned positions where a family has them).
    fn embed(&self, ids: &Tensor, positions: &[u32]) -> Result<Tensor>;
    fn num_layers(&self) -> usize;
    fn layer(&self, i: usize) -> &dyn DecoderLayer;
    /// Final norm and output head: `[m, hidden]` -> `[m, vocab]`.
    fn logits(&self, x: &Tensor) -> Result<Tensor>;
    fn hidden_size(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Width of one token's keys (= values) in one layer: `kv_heads * head_dim`.
    fn kv_width(&self) -> usize {
        self.hidden_size()
    }
    /// Key/value heads per layer.
    fn kv_heads(&self) -> usize {
        if self.num_layers() == 0 {
            1
        } else {
            self.layer(0).kv_heads()
        }
    }
}

/// Head geometry and positional scheme of a self-attention.
pub(crate) struct SelfAttention {
    pub layer: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    /// ALiBi slopes per head (MPT family); the bias for key `j` of `s` keys is
    /// `slope · (j − (s − 1))`, as the reference builds it.
    pub alibi: Option<Tensor>,
    /// The same slopes on the host, for the fused decode loop.
    pub alibi_host: Option<Vec<f32>>,
}

impl SelfAttention {
    /// Causal mask (for several new tokens) plus the ALiBi bias, `[heads | 1, t, s]`.
    fn bias(&self, len: usize, past: usize, dev: &Device) -> Result<Option<Tensor>> {
        let s = past + len;
        let mut bias = causal_mask(len, past, dev)?;
        if let Some(slopes) = &self.alibi {
            let dist: Vec<f32> = (0..s).map(|j| j as f32 - (s - 1) as f32).collect();
            let dist = Tensor::from_vec(dist, (1, 1, s), dev)?;
            let ab = slopes.reshape((self.heads, 1, 1))?.broadcast_mul(&dist)?;
            bias = Some(match bias {
                Some(m) => ab.broadcast_add(&m)?,
                None => ab,
            });
        }
        Ok(bias)
    }

    /// q `[n, heads*hd]`, k/v `[n, kv_heads*hd]` -> `[n, heads*hd]`.
    ///
    /// On the CPU in f32, single-token (decode) rows skip the per-sequence tensor ops and run a
    /// fused loop over the sequence's cache (see [`decode_attention`]); prefill chunks use
    /// batched matmuls.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, batch: &mut Batch) -> Result<Tensor> {
        if batch.seqs.first().is_some_and(|s| s.is_paged()) {
            return self.forward_paged(q, k, v, batch);
        }
        let (n, hd) = q.dims2()?;
        let fast = q.device().is_cpu() && q.dtype() == DType::F32;
        let q = if fast { q.contiguous()? } else { q.clone() };
        let mut out = if fast { vec![0f32; n * hd] } else { Vec::new() };
        let mut outs = Vec::with_capacity(batch.seqs.len());
        let mut off = 0;
        let rep = self.heads / self.kv_heads;
        let Batch { seqs, lens, pasts, attn_bias, .. } = batch;
        let mut decode_rows = Vec::new();
        for (i, st) in seqs.iter_mut().enumerate() {
            let (len, past) = (lens[i], pasts[i]);
            if len == 0 {
                continue;
            }
            let ki = split_heads(&k.narrow(0, off, len)?, self.kv_heads)?;
            let vi = split_heads(&v.narrow(0, off, len)?, self.kv_heads)?;
            if fast && len == 1 {
                // The attention itself runs below, for all decode rows in parallel.
                st.kv[self.layer].append_only(&ki, &vi)?;
                decode_rows.push((off, i));
                off += len;
                continue;
            }
            let qi = split_heads(&q.narrow(0, off, len)?, self.heads)?;
            let (ka, va) = st.kv[self.layer].append(&ki, &vi)?;
            let (ka, va) = (repeat_kv(&ka, rep)?, repeat_kv(&va, rep)?);
            let bias = match &attn_bias[i] {
                Some(b) => b.clone(),
                None => {
                    let b = self.bias(len, past, q.device())?;
                    attn_bias[i] = Some(b.clone());
                    b
                }
            };
            let o = merge_heads(&attention(&qi, &ka, &va, self.scale, bias.as_ref())?)?;
            if fast {
                let rows = o.flatten_all()?.to_vec1::<f32>()?;
                out[off * hd..(off + len) * hd].copy_from_slice(&rows);
            } else {
                outs.push(o);
            }
            off += len;
        }
        if fast {
            if !decode_rows.is_empty() {
                // One task per decode row: each reads its own sequence's cache and writes its
                // own row of `out`.
                let mut of_row = vec![None; n];
                for &(row, i) in &decode_rows {
                    of_row[row] = Some(&seqs[i].kv[self.layer]);
                }
                out.par_chunks_mut(hd).zip(of_row).enumerate().try_for_each(|(row, (o, cache))| match cache {
                    Some(cache) => decode_attention(self, &q, row, cache, o),
                    None => Ok(()),
                })?;
            }
            Tensor::from_vec(out, (n, hd), q.device())
        } else {
            Tensor::cat(&outs, 0)
        }
    }
}

impl SelfAttention {
    /// [`Self::forward`] over paged caches: one scatter writes all new K/V rows, the decode rows
    /// attend together over one gather of their caches, prefill chunks attend per sequence.
    fn forward_paged(&self, q: &Tensor, k: &Tensor, v: &Tensor, batch: &mut Batch) -> Result<Tensor> {
        if batch.paged.is_none() {
            let mut tables = Vec::with_capacity(batch.seqs.len());
            for st in batch.seqs.iter() {
                match &st.paged {
                    Some(p) => tables.push(p),
                    None => candle_core::bail!("a batch mixes paged and unpaged sequences"),
                }
            }
            let width = self.kv_heads * self.head_dim;
            batch.paged = Some(PagedStep::new(&tables, &batch.lens, &batch.pasts, width, self.alibi.as_ref(), q.device())?);
        }
        let Batch { seqs, lens, pasts, attn_bias, paged, .. } = batch;
        let (Some(step), Some(pool)) = (paged.as_ref(), seqs.first().and_then(|s| s.paged.as_ref()).map(|p| p.pool())) else {
            candle_core::bail!("paged step missing");
        };
        let (kp, vp) = pool.layer(self.layer)?;
        kp.scatter_set(&step.write, &k.to_dtype(kp.dtype())?.contiguous()?, 0)?;
        vp.scatter_set(&step.write, &v.to_dtype(vp.dtype())?.contiguous()?, 0)?;
        let mut parts = Vec::with_capacity(step.prefill.len() + 1);
        if let Some(d) = &step.decode {
            // A pure decode step's rows are all the rows, in order.
            let qd = if d.b == q.dim(0)? { q.clone() } else { q.contiguous()?.index_select(&d.rows, 0)? };
            let (kd, vd) = (kp.index_select(&d.gather, 0)?, vp.index_select(&d.gather, 0)?);
            parts.push(paged::decode_attention(&qd, &kd, &vd, d, self.heads, self.kv_heads, self.scale)?.to_dtype(q.dtype())?);
        }
        let rep = self.heads / self.kv_heads;
        let mut off = Vec::with_capacity(lens.len());
        let mut o = 0;
        for &l in lens.iter() {
            off.push(o);
            o += l;
        }
        for (i, rows) in &step.prefill {
            let (i, len, past) = (*i, lens[*i], pasts[*i]);
            let qi = split_heads(&q.narrow(0, off[i], len)?, self.heads)?;
            let ka = repeat_kv(&paged::as_heads(&kp.index_select(rows, 0)?, self.kv_heads)?, rep)?;
            let va = repeat_kv(&paged::as_heads(&vp.index_select(rows, 0)?, self.kv_heads)?, rep)?;
            let bias = match &attn_bias[i] {
                Some(b) => b.clone(),
                None => {
                    let b = self.bias(len, past, q.device())?;
                    attn_bias[i] = Some(b.clone());
                    b
                }
            };
            parts.push(merge_heads(&attention(&qi, &ka.to_dtype(q.dtype())?, &va.to_dtype(q.dtype())?, self.scale, bias.as_ref())?)?);
        }
        let out = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
        match &step.order {
            Some(order) => out.index_select(order, 0),
            None => Ok(out),
        }
    }
}

/// Attention of one new token (row `row` of `q`) over a sequence's whole cache, written to
/// `out` (`heads * head_dim`): `softmax(q·kᵀ·scale + alibi)·v` per head, in f32, with the same
/// ALiBi bias as the batched path (`slope · (j − (s − 1))`).
/// The width of one attention head, `width / heads`: a configuration error (naming `what`)
/// unless `heads` is positive and divides `width`.
pub fn head_dim(width: usize, heads: usize, what: &str) -> Result<usize> {
    if heads == 0 || !width.is_multiple_of(heads) {
        candle_core::bail!("{what}: {heads} attention heads do not divide a width of {width}");
    }
    Ok(width / heads)
}

fn decode_attention(a: &SelfAttention, q: &Tensor, row: usize, cache: &crate::state::KvCache, out: &mut [f32]) -> Result<()> {
    let (kb, vb, s) = cache.buffers().ok_or_else(|| candle_core::Error::Msg("empty kv cache".into()))?;
    let cap = kb.dim(1)?;
    let d = a.head_dim;
    let width = a.heads * d;
    with_f32(q, |qs| {
        with_f32(kb, |ks| {
            with_f32(vb, |vs| {
                let keys = Keys { k: ks, v: vs, base: 0, head_stride: cap * d, n: s, rep: a.heads / a.kv_heads };
                attend_row(&qs[row * width..(row + 1) * width], &keys, a.heads, d, a.scale as f32, a.alibi_host.as_deref(), out)
            })
        })
    })???;
    Ok(())
}

/// Rotary position embedding in the "rotate half" convention of HF's GPT-NeoX and LLaMA, applied
/// to the first `rot_dims` dimensions of each head.
pub(crate) struct Rotary {
    inv_freq: Vec<f32>,
    rot_dims: usize,
}

impl Rotary {
    pub fn new(rot_dims: usize, base: f64) -> Self {
        // As HF computes it, in f32: 1 / base^(arange(0, dim, 2) / dim).
        let inv_freq = (0..rot_dims).step_by(2).map(|i| 1f32 / (base as f32).powf(i as f32 / rot_dims as f32)).collect();
        Self { inv_freq, rot_dims }
    }

    /// `x`: `[n, heads * head_dim]` rows with their `cos`/`sin` tables -> same shape, rotated.
    pub fn apply(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (n, hd) = x.dims2()?;
        let head_dim = hd / heads;
        let half = self.rot_dims / 2;
        let x = x.reshape((n, heads, head_dim))?;
        let dtype = x.dtype();
        let xr = x.narrow(D::Minus1, 0, self.rot_dims)?.to_dtype(DType::F32)?;
        let x1 = xr.narrow(D::Minus1, 0, half)?;
        let x2 = xr.narrow(D::Minus1, half, half)?;
        let cos = cos.unsqueeze(1)?;
        let sin = sin.unsqueeze(1)?;
        let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        let mut parts = vec![o1.to_dtype(dtype)?, o2.to_dtype(dtype)?];
        if self.rot_dims < head_dim {
            parts.push(x.narrow(D::Minus1, self.rot_dims, head_dim - self.rot_dims)?);
        }
        Tensor::cat(&parts, D::Minus1)?.reshape((n, hd))
    }

    pub fn tables(&self, positions: &[u32], dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((Tensor::from_vec(cos, (positions.len(), half), dev)?, Tensor::from_vec(sin, (positions.len(), half), dev)?))
    }
}

/// Resizes an embedding / output-head matrix to `rows`, as OpenFlamingo's
/// `resize_token_embeddings(len(tokenizer))` does: extra rows are dropped; missing rows (new
/// tokens whose trained values the checkpoint does not hold) are set to the mean of the existing
/// rows, a deterministic stand-in for HF's random initialisation.
pub(crate) fn resize_rows(t: Tensor, rows: usize) -> Result<Tensor> {
    let (have, d) = t.dims2()?;
    if have == rows {
        Ok(t)
    } else if have > rows {
        t.narrow(0, 0, rows)?.contiguous()
    } else {
        let mean = t.to_dtype(DType::F32)?.mean_keepdim(0)?.to_dtype(t.dtype())?;
        let extra = mean.broadcast_as((rows - have, d))?.contiguous()?;
        Tensor::cat(&[&t, &extra], 0)
    }
}

/// An embedding table used as a lookup.
pub(crate) fn embed_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    table.index_select(ids, 0)
}
