//! Paged self-attention K/V: the storage of the batched decode path.
//!
//! Every sequence's keys and values live in one pool per layer (`[rows, kv_width]`, rows grouped
//! in blocks of [`BLOCK`] positions); a sequence owns a table of blocks. A forward call then
//! touches the caches of all its sequences with a constant number of device operations per
//! layer, whatever the batch: one scatter writes every new row, one gather reads the decode rows'
//! keys (padded to the longest sequence, the padding masked), and one batched matmul pair does
//! the attention. The per-sequence caches ([`crate::state::KvCache`]) launch a handful of small
//! operations per sequence per layer instead, which is what the CPU's fused loop wants and a GPU
//! does not.
//!
//! The pool grows by doubling when it runs out of free blocks (sequences hold block numbers,
//! not tensors, so growing is invisible to them) and never shrinks: a server's KV memory stays
//! at its peak, as in vLLM. Blocks return to the pool when their sequence is dropped.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Result, Tensor};

/// Positions per block.
pub const BLOCK: usize = 16;

/// Blocks the pool holds when it is first used.
const FIRST_BLOCKS: usize = 64;

/// The K/V pool of a model on one device.
pub struct KvPool {
    layers: usize,
    kv_heads: usize,
    width: usize,
    dtype: DType,
    device: Device,
    inner: Mutex<PoolInner>,
}

struct PoolInner {
    /// Per layer, keys and values `[blocks * BLOCK, width]`.
    kv: Vec<(Tensor, Tensor)>,
    blocks: usize,
    free: Vec<u32>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool").field("layers", &self.layers).field("width", &self.width).field("dtype", &self.dtype).finish()
    }
}

impl KvPool {
    /// An empty pool for `layers` layers of `width` (`kv_heads * head_dim`) keys per position.
    pub fn new(layers: usize, kv_heads: usize, width: usize, dtype: DType, device: &Device) -> Self {
        let inner = PoolInner { kv: Vec::new(), blocks: 0, free: Vec::new() };
        Self { layers, kv_heads, width, dtype, device: device.clone(), inner: Mutex::new(inner) }
    }

    fn lock(&self) -> Result<MutexGuard<'_, PoolInner>> {
        self.inner.lock().map_err(|_| candle_core::Error::Msg("kv pool lock poisoned".into()))
    }

    /// Bytes one block holds in all layers (keys and values).
    pub fn block_bytes(&self) -> usize {
        BLOCK * self.width * 2 * self.layers * self.dtype.size_in_bytes()
    }

    /// Bytes of device memory the pool holds.
    pub fn bytes(&self) -> Result<usize> {
        Ok(self.lock()?.blocks * self.block_bytes())
    }

    /// Makes room for at least `blocks` blocks in all (allocating up front what a server expects
    /// to need, so the first requests do not pay for growth).
    pub fn reserve(&self, blocks: usize) -> Result<()> {
        let mut inner = self.lock()?;
        self.grow(&mut inner, blocks)
    }

    fn grow(&self, inner: &mut PoolInner, blocks: usize) -> Result<()> {
        if blocks <= inner.blocks {
            return Ok(());
        }
        let rows = blocks * BLOCK;
        let old_rows = inner.blocks * BLOCK;
        let mut kv = Vec::with_capacity(self.layers);
        for l in 0..self.layers {
            let fresh = || Tensor::zeros((rows, self.width), self.dtype, &self.device);
            let (k, v) = (fresh()?, fresh()?);
            if let Some((ok, ov)) = inner.kv.get(l) {
                if old_rows > 0 {
                    k.slice_set(ok, 0, 0)?;
                    v.slice_set(ov, 0, 0)?;
                }
            }
            kv.push((k, v));
        }
        inner.kv = kv;
        // Lower block numbers are handed out first (pop from the back).
        inner.free.extend((inner.blocks as u32..blocks as u32).rev());
        inner.free.sort_unstable_by(|a, b| b.cmp(a));
        inner.blocks = blocks;
        Ok(())
    }

    /// Takes `n` free blocks, growing the pool when it has too few.
    fn take(&self, n: usize) -> Result<Vec<u32>> {
        let mut inner = self.lock()?;
        if inner.free.len() < n {
            let want = (inner.blocks - inner.free.len() + n).max(inner.blocks * 2).max(FIRST_BLOCKS);
            self.grow(&mut inner, want)?;
        }
        let at = inner.free.len() - n;
        Ok(inner.free.split_off(at))
    }

    fn give_back(&self, blocks: &[u32]) {
        // A poisoned lock means a panic elsewhere; the blocks are then simply not reused.
        if let Ok(mut inner) = self.inner.lock() {
            inner.free.extend_from_slice(blocks);
        }
    }

    /// The pool's keys and values of `layer` (handles sharing the pool's storage).
    pub(crate) fn layer(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let inner = self.lock()?;
        match inner.kv.get(layer) {
            Some((k, v)) => Ok((k.clone(), v.clone())),
            None => candle_core::bail!("kv pool has no layer {layer} (or is empty)"),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// One sequence's block table in a [`KvPool`]; its blocks return to the pool when it is dropped.
pub struct PagedKv {
    pool: Arc<KvPool>,
    blocks: Vec<u32>,
    len: usize,
}

impl std::fmt::Debug for PagedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKv").field("blocks", &self.blocks.len()).field("len", &self.len).finish()
    }
}

impl Drop for PagedKv {
    fn drop(&mut self) {
        self.pool.give_back(&self.blocks);
    }
}

impl PagedKv {
    pub fn new(pool: Arc<KvPool>) -> Self {
        Self { pool, blocks: Vec::new(), len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Bytes of the blocks the sequence holds (all layers).
    pub fn bytes(&self) -> usize {
        self.blocks.len() * self.pool.block_bytes()
    }

    /// Makes sure positions `0..positions` have blocks.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        let need = positions.div_ceil(BLOCK);
        if need > self.blocks.len() {
            let more = self.pool.take(need - self.blocks.len())?;
            self.blocks.extend(more);
        }
        Ok(())
    }

    /// The pool row of position `p` (which must be reserved).
    pub fn row(&self, p: usize) -> Result<u32> {
        match self.blocks.get(p / BLOCK) {
            Some(&b) => Ok(b * BLOCK as u32 + (p % BLOCK) as u32),
            None => candle_core::bail!("position {p} has no kv block"),
        }
    }

    /// Pool rows of positions `start..end`.
    pub fn rows(&self, start: usize, end: usize) -> Result<Vec<u32>> {
        (start..end).map(|p| self.row(p)).collect()
    }

    /// Marks positions `0..len` as written.
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// Keys and values of positions `start..start + len` of every layer as standalone
    /// `[kv_heads, len, head_dim]` tensors (a prefix-cache block).
    pub fn read(&self, start: usize, len: usize) -> Result<Vec<(Tensor, Tensor)>> {
        let kv_heads = self.pool.kv_heads;
        if start + len > self.len {
            candle_core::bail!("kv rows {start}..{} out of range (len {})", start + len, self.len);
        }
        let idx = Tensor::new(self.rows(start, start + len)?.as_slice(), self.pool.device())?;
        (0..self.pool.layers)
            .map(|l| {
                let (k, v) = self.pool.layer(l)?;
                let heads = |t: &Tensor| -> Result<Tensor> {
                    let rows = t.index_select(&idx, 0)?;
                    let d = rows.dim(1)? / kv_heads;
                    rows.reshape((len, kv_heads, d))?.transpose(0, 1)?.contiguous()
                };
                Ok((heads(&k)?, heads(&v)?))
            })
            .collect()
    }

    /// Appends per-layer keys and values `[kv_heads, t, head_dim]` (a restored prefix block).
    pub fn append(&mut self, layers: &[(Tensor, Tensor)]) -> Result<()> {
        if layers.len() != self.pool.layers {
            candle_core::bail!("{} layers of K/V for a pool of {}", layers.len(), self.pool.layers);
        }
        let Some((k0, _)) = layers.first() else { return Ok(()) };
        let t = k0.dim(1)?;
        let start = self.len;
        self.reserve(start + t)?;
        let idx = write_index(&self.rows(start, start + t)?, self.pool.width, self.pool.device())?;
        for (l, (k, v)) in layers.iter().enumerate() {
            let (pk, pv) = self.pool.layer(l)?;
            let rows =
                |x: &Tensor| -> Result<Tensor> { x.transpose(0, 1)?.contiguous()?.reshape((t, self.pool.width))?.to_dtype(pk.dtype()) };
            pk.scatter_set(&idx, &rows(k)?, 0)?;
            pv.scatter_set(&idx, &rows(v)?, 0)?;
        }
        self.len = start + t;
        Ok(())
    }

    /// A copy in fresh blocks (a forked beam writes its own future positions).
    pub fn fork(&self) -> Result<Self> {
        let mut copy = PagedKv::new(self.pool.clone());
        copy.reserve(self.len)?;
        if self.len > 0 {
            let src = Tensor::new(self.rows(0, self.len)?.as_slice(), self.pool.device())?;
            let dst = write_index(&copy.rows(0, self.len)?, self.pool.width, self.pool.device())?;
            for l in 0..self.pool.layers {
                let (k, v) = self.pool.layer(l)?;
                let (kr, vr) = (k.index_select(&src, 0)?, v.index_select(&src, 0)?);
                k.scatter_set(&dst, &kr, 0)?;
                v.scatter_set(&dst, &vr, 0)?;
            }
        }
        copy.len = self.len;
        Ok(copy)
    }
}

/// The index tensor `scatter_set` along dim 0 wants: every row's target row number repeated
/// across the row's `width` columns, `[rows, width]`, built on the device from `rows` numbers.
pub(crate) fn write_index(rows: &[u32], width: usize, device: &Device) -> Result<Tensor> {
    Tensor::new(rows, device)?.reshape((rows.len(), 1))?.broadcast_as((rows.len(), width))?.contiguous()
}

/// What every layer of one forward call needs to read and write a batch's paged caches; built
/// once per forward.
pub(crate) struct PagedStep {
    /// `[n, kv_width]`: the pool row of each stacked new row, for `scatter_set`.
    pub write: Tensor,
    /// Sequences with several new tokens (prefill chunks): `(sequence, pool rows of all its
    /// positions so far)`, attended with the per-sequence path.
    pub prefill: Vec<(usize, Tensor)>,
    /// Single-token (decode) rows, attended together.
    pub decode: Option<DecodeStep>,
    /// When the batch mixes both: the stacked row each row of `cat(decode out, prefill outs...)`
    /// goes to, as the inverse permutation `index_select` applies.
    pub order: Option<Tensor>,
}

pub(crate) struct DecodeStep {
    /// Stacked row of each decode sequence's token, `[b]`.
    pub rows: Tensor,
    /// `[b * s]`: pool rows of positions `0..s` of each decode sequence (padded with its
    /// position 0).
    pub gather: Tensor,
    /// `[b, 1 | heads, 1, s]` f32: 0 on a sequence's keys, −∞ on the padding, plus ALiBi.
    pub bias: Tensor,
    pub b: usize,
    pub s: usize,
}

impl PagedStep {
    /// `tables[i]`, `lens[i]`, `pasts[i]`: sequence `i`'s blocks (reserved for `past + len`),
    /// new tokens and cached tokens; `alibi`: per-head slopes, when the model uses ALiBi.
    pub fn new(
        tables: &[&PagedKv],
        lens: &[usize],
        pasts: &[usize],
        width: usize,
        alibi: Option<&Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut write_rows = Vec::with_capacity(lens.iter().sum());
        let mut prefill = Vec::new();
        let (mut dec_rows, mut dec_lens, mut dec_tables) = (Vec::new(), Vec::new(), Vec::new());
        let mut prefill_rows = Vec::new();
        let mut off = 0u32;
        for (i, ((t, &len), &past)) in tables.iter().zip(lens).zip(pasts).enumerate() {
            write_rows.extend(t.rows(past, past + len)?);
            if len == 1 {
                dec_rows.push(off);
                dec_lens.push(past + 1);
                dec_tables.push(*t);
            } else if len > 1 {
                prefill.push((i, Tensor::new(t.rows(0, past + len)?.as_slice(), device)?));
                prefill_rows.extend(off..off + len as u32);
            }
            off += len as u32;
        }
        let decode = if dec_rows.is_empty() {
            None
        } else {
            let (b, s) = (dec_rows.len(), dec_lens.iter().copied().max().unwrap_or(1));
            let mut gather = Vec::with_capacity(b * s);
            for (t, &n) in dec_tables.iter().zip(&dec_lens) {
                let first = t.row(0)?;
                for p in 0..s {
                    gather.push(if p < n { t.row(p)? } else { first });
                }
            }
            // dist[b, j] = j − (n_b − 1): ALiBi's distance (the bias of key j for the newest
            // query), and > 0 exactly on the padding.
            let last: Vec<f32> = dec_lens.iter().map(|&n| (n - 1) as f32).collect();
            let pos = Tensor::arange(0u32, s as u32, device)?.to_dtype(DType::F32)?.reshape((1, s))?;
            let dist = pos.broadcast_sub(&Tensor::from_vec(last, (b, 1), device)?)?;
            let pad = dist.gt(0f64)?;
            let ninf = Tensor::full(f32::NEG_INFINITY, (b, s), device)?;
            let bias = match alibi {
                Some(slopes) => {
                    let heads = slopes.elem_count();
                    let ab = slopes.to_dtype(DType::F32)?.reshape((1, heads, 1, 1))?.broadcast_mul(&dist.reshape((b, 1, 1, s))?)?;
                    let pad = pad.reshape((b, 1, 1, s))?.broadcast_as((b, heads, 1, s))?;
                    pad.where_cond(&ninf.reshape((b, 1, 1, s))?.broadcast_as((b, heads, 1, s))?, &ab)?
                }
                None => pad.where_cond(&ninf, &Tensor::zeros((b, s), DType::F32, device)?)?.reshape((b, 1, 1, s))?,
            };
            Some(DecodeStep {
                rows: Tensor::new(dec_rows.as_slice(), device)?,
                gather: Tensor::new(gather.as_slice(), device)?,
                bias,
                b,
                s,
            })
        };
        let order = match &decode {
            Some(_) if !prefill.is_empty() => {
                // cat(decode, prefills...) row r holds stacked row `src[r]`; invert it.
                let src: Vec<u32> = dec_rows.iter().copied().chain(prefill_rows).collect();
                let mut inv = vec![0u32; src.len()];
                for (r, &s) in src.iter().enumerate() {
                    if let Some(slot) = inv.get_mut(s as usize) {
                        *slot = r as u32;
                    }
                }
                Some(Tensor::new(inv.as_slice(), device)?)
            }
            _ => None,
        };
        Ok(Self { write: write_index(&write_rows, width, device)?, prefill, decode, order })
    }
}

/// Batched decode attention: `q` `[b, heads * d]` of `b` single-token rows over their
/// sequences' gathered keys/values `[b * s, kv_heads * d]`, with `bias` `[b, 1 | heads, 1, s]`.
/// Scores in f32 as [`crate::nn::attention`] computes them. Returns `[b, heads * d]`.
pub(crate) fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    step: &DecodeStep,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, s) = (step.b, step.s);
    let dtype = q.dtype();
    let d = q.dim(1)? / heads;
    let rep = heads / kv_heads;
    // Query heads of one K/V head are rows of one matmul: [b, kv_heads, rep, d].
    let q = q.reshape((b, kv_heads, rep, d))?.to_dtype(DType::F32)?;
    let kh = |x: &Tensor| -> Result<Tensor> { x.reshape((b, s, kv_heads, d))?.transpose(1, 2)?.to_dtype(DType::F32)?.contiguous() };
    let (k, v) = (kh(k)?, kh(v)?);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let bias = if step.bias.dim(1)? == 1 { step.bias.clone() } else { step.bias.reshape((b, kv_heads, rep, s))? };
    let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias)?)?;
    p.matmul(&v)?.reshape((b, heads * d))?.to_dtype(dtype)
}

/// `[rows, kv_heads * d]` pool rows as heads `[kv_heads, rows, d]`.
pub(crate) fn as_heads(rows: &Tensor, kv_heads: usize) -> Result<Tensor> {
    let (n, w) = rows.dims2()?;
    rows.reshape((n, kv_heads, w / kv_heads))?.transpose(0, 1)?.contiguous()
}
