//! Per-request state, owned by the caller and kept outside the (immutable, shared) weights.
//!
//! A sequence owns its self-attention KV cache per decoder layer, the cross-attention K/V of each
//! gated layer (computed once from its images' latents: they never change during the request),
//! and the running media count that implements OpenFlamingo's masking rule.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::paged::{KvPool, PagedKv};

/// A growable `[heads, len, head_dim]` key/value cache for one decoder layer.
///
/// Storage grows by doubling, so appending one token is amortised O(1) copies instead of the
/// O(len) that `Tensor::cat` on every step costs.
#[derive(Debug, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// Capacity of the first allocation (positions the sequence is expected to reach), so a
    /// sequence does not regrow its caches while it prefills and starts decoding.
    min_capacity: usize,
}

impl KvCache {
    /// A deep copy: caches are written in place, so two sequences (e.g. beams that forked from one
    /// parent) must never share a buffer.
    pub fn fork(&self) -> Result<Self> {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| t.copy()).transpose();
        Ok(Self { k: copy(&self.k)?, v: copy(&self.v)?, len: self.len, min_capacity: self.min_capacity })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache's storage (capacity, not just length).
    pub fn bytes(&self) -> usize {
        [&self.k, &self.v].iter().filter_map(|t| t.as_ref()).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// Appends `k`, `v` (`[heads, t, d]`) and returns views of all keys and values so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.append_only(k, v)?;
        match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => Ok((kb.narrow(1, 0, self.len)?, vb.narrow(1, 0, self.len)?)),
            _ => candle_core::bail!("kv cache storage missing"),
        }
    }

    fn capacity(&self) -> Result<usize> {
        Ok(self.k.as_ref().map(|c| c.dim(1)).transpose()?.unwrap_or(0))
    }

    /// Moves the contents to storage for `cap` positions (`like` gives heads, dims and dtype
    /// when the cache is still empty).
    fn regrow(&mut self, cap: usize, like: &Tensor) -> Result<()> {
        let len = self.len;
        let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
            let (h, _, d) = like.dims3()?;
            let buf = Tensor::zeros((h, cap, d), like.dtype(), like.device())?;
            if let Some(old) = old {
                if len > 0 {
                    buf.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
            }
            Ok(buf)
        };
        let k = grow(&self.k, self.k.as_ref().unwrap_or(like))?;
        let v = grow(&self.v, self.v.as_ref().unwrap_or(like))?;
        self.k = Some(k);
        self.v = Some(v);
        Ok(())
    }

    /// Sets the capacity an empty cache allocates when it is first appended to.
    pub fn set_min_capacity(&mut self, positions: usize) {
        self.min_capacity = positions;
    }

    /// Appends `k`, `v` (`[heads, t, d]`) to the storage.
    pub fn append_only(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(1)?;
        let need = self.len + t;
        let cap = self.capacity()?;
        if need > cap {
            let first = if cap == 0 { self.min_capacity } else { 0 };
            self.regrow(need.max(cap * 2).max(16).max(first), k)?;
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => candle_core::bail!("kv cache storage missing"),
        };
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = need;
        Ok(())
    }

    /// Drops everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The storage buffers `[heads, capacity, d]` (keys, values) and the length in use.
    pub(crate) fn buffers(&self) -> Option<(&Tensor, &Tensor, usize)> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Some((k, v, self.len)),
            _ => None,
        }
    }

    /// Copies of positions `start..start + len`: `([heads, len, d], [heads, len, d])`, holding
    /// only those rows (a prefix-cache block must not pin the whole cache's storage).
    pub fn rows(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) if start + len <= self.len => {
                Ok((k.narrow(1, start, len)?.force_contiguous()?, v.narrow(1, start, len)?.force_contiguous()?))
            }
            _ => candle_core::bail!("kv rows {start}..{} out of range (len {})", start + len, self.len),
        }
    }
}

/// The self-attention K/V of a run of prompt positions in every layer, plus how many `<image>`
/// tokens the run holds: one block of the prefix cache.
#[derive(Debug, Clone)]
pub struct KvBlock {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    pub(crate) len: usize,
    pub(crate) media: usize,
}

impl KvBlock {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
    }

    /// The block's first `rows` positions, holding `media` `<image>` tokens (a prefix of a
    /// cached block is exact for any prompt that shares those tokens and images).
    pub fn head(&self, rows: usize, media: usize) -> Result<KvBlock> {
        if rows > self.len || media > self.media {
            candle_core::bail!("block head of {rows} rows / {media} media out of range ({} / {})", self.len, self.media);
        }
        let layers = self.layers.iter().map(|(k, v)| Ok((k.narrow(1, 0, rows)?, v.narrow(1, 0, rows)?))).collect::<Result<_>>()?;
        Ok(KvBlock { layers, len: rows, media })
    }
}

/// Cross-attention keys and values of one gated layer for one or more images:
/// `[images, heads, latents, head_dim]` each.
#[derive(Debug, Clone)]
pub struct XattnKv {
    pub k: Tensor,
    pub v: Tensor,
}

impl XattnKv {
    fn images(&self) -> usize {
        self.k.dims().first().copied().unwrap_or(0)
    }

    pub(crate) fn bytes(&self) -> usize {
        (self.k.elem_count() + self.v.elem_count()) * self.k.dtype().size_in_bytes()
    }
}

/// The cross-attention K/V of one gated layer for all of a sequence's images, as the pieces
/// they were attached in (image order). The pieces are not copied: a sequence shares them with
/// the vision cache and with every other sequence that shows the same images (a tensor clone
/// shares its storage), so sequences with common few-shot images hold one copy between them.
#[derive(Debug, Clone, Default)]
pub struct XattnImages {
    pieces: Vec<XattnKv>,
}

impl XattnImages {
    pub(crate) fn push(&mut self, piece: XattnKv) {
        self.pieces.push(piece);
    }

    /// The piece holding image `img` (counted over all pieces) and its index in that piece.
    pub fn image(&self, img: usize) -> Option<(&XattnKv, usize)> {
        let mut first = 0;
        for p in &self.pieces {
            let n = p.images();
            if img < first + n {
                return Some((p, img - first));
            }
            first += n;
        }
        None
    }

    /// Images attached.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(XattnKv::images).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the pieces hold (possibly shared with others).
    pub fn bytes(&self) -> usize {
        self.pieces.iter().map(XattnKv::bytes).sum()
    }
}

/// Everything one sequence carries between forward calls.
#[derive(Debug)]
pub struct SequenceState {
    /// Per-layer caches of its own (the CPU path), unused when `paged` is set.
    pub(crate) kv: Vec<KvCache>,
    /// The sequence's blocks in the model's K/V pool (the batched device path).
    pub(crate) paged: Option<PagedKv>,
    pub(crate) xattn: Vec<XattnImages>,
    /// Number of images whose latents are attached.
    pub(crate) num_images: usize,
    /// `<image>` tokens consumed so far while prefilling (the cumulative `text_time`).
    pub(crate) media_seen: usize,
    /// Once decoding started: the image the next generated token attends to (see
    /// [`crate::xattn`] for the reference's rule).
    pub(crate) decode_media: Option<usize>,
    /// IDEFICS' rule: an `eos` was seen since the last `<image>`, so prompt tokens attend to none.
    pub(crate) media_reset: bool,
    /// The image the last prompt token attended to (IDEFICS' generated tokens attend to it).
    pub(crate) last_media: Option<usize>,
}

impl SequenceState {
    pub(crate) fn new(num_layers: usize, pool: Option<&Arc<KvPool>>) -> Self {
        Self {
            kv: if pool.is_some() { Vec::new() } else { (0..num_layers).map(|_| KvCache::default()).collect() },
            paged: pool.map(|p| PagedKv::new(p.clone())),
            xattn: vec![XattnImages::default(); num_layers],
            num_images: 0,
            media_seen: 0,
            decode_media: None,
            media_reset: false,
            last_media: None,
        }
    }

    /// A deep copy of the self-attention caches; cross-attention K/V are immutable and shared.
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            kv: self.kv.iter().map(|c| c.fork()).collect::<Result<_>>()?,
            paged: self.paged.as_ref().map(PagedKv::fork).transpose()?,
            xattn: self.xattn.clone(),
            num_images: self.num_images,
            media_seen: self.media_seen,
            decode_media: self.decode_media,
            media_reset: self.media_reset,
            last_media: self.last_media,
        })
    }

    /// Tokens processed so far.
    pub fn len(&self) -> usize {
        match &self.paged {
            Some(p) => p.len(),
            None => self.kv.first().map_or(0, |c| c.len()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the self-attention K/V live in the model's pool (the batched device path).
    pub fn is_paged(&self) -> bool {
        self.paged.is_some()
    }

    pub fn num_images(&self) -> usize {
        self.num_images
    }

    /// Copies the K/V of prompt positions `start..start + len` (all layers); `media` is the
    /// number of `<image>` tokens among them.
    pub fn kv_block(&self, start: usize, len: usize, media: usize) -> Result<KvBlock> {
        let layers = match &self.paged {
            Some(p) => p.read(start, len)?,
            None => self.kv.iter().map(|c| c.rows(start, len)).collect::<Result<_>>()?,
        };
        Ok(KvBlock { layers, len, media })
    }

    /// Bytes held by the self-attention caches.
    pub fn kv_bytes(&self) -> usize {
        self.paged.as_ref().map_or(0, PagedKv::bytes) + self.kv.iter().map(|c| c.bytes()).sum::<usize>()
    }

    /// Bytes of the cross-attention K/V the sequence refers to (shared with the vision cache
    /// and with other sequences showing the same images, so a sum over sequences counts shared
    /// images once per sequence).
    pub fn xattn_bytes(&self) -> usize {
        self.xattn.iter().map(XattnImages::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Elements held by a tensor's storage (not just its view).
    fn storage_len(t: &Tensor) -> usize {
        let (s, _) = t.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(c) => c.as_slice::<f32>().map(|s| s.len()).unwrap_or(0),
            _ => 0,
        }
    }

    fn filled(heads: usize, len: usize, from: f32) -> Tensor {
        let v: Vec<f32> = (0..heads * len * 4).map(|i| from + i as f32).collect();
        Tensor::from_vec(v, (heads, len, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn rows_copy_only_the_rows_they_return() {
        let mut c = KvCache::default();
        c.append_only(&filled(2, 40, 0.0), &filled(2, 40, 1000.0)).unwrap();
        let (k, v) = c.rows(8, 16).unwrap();
        // The cache's storage has room for 40+ positions; a 16-row block must not pin it.
        assert_eq!(storage_len(&k), 2 * 16 * 4);
        assert_eq!(storage_len(&v), 2 * 16 * 4);
        let want = filled(2, 40, 0.0).narrow(1, 8, 16).unwrap();
        assert_eq!(k.to_vec3::<f32>().unwrap(), want.to_vec3::<f32>().unwrap());
        // Writing to the cache afterwards leaves the copy alone.
        c.truncate(8);
        c.append_only(&filled(2, 16, -5.0), &filled(2, 16, -5.0)).unwrap();
        assert_eq!(k.to_vec3::<f32>().unwrap(), want.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn first_allocation_honours_the_minimum_capacity() {
        let mut c = KvCache::default();
        c.set_min_capacity(70);
        c.append_only(&filled(2, 9, 0.0), &filled(2, 9, 0.0)).unwrap();
        assert_eq!(c.buffers().unwrap().0.dim(1).unwrap(), 70);
        for i in 0..61 {
            c.append_only(&filled(2, 1, i as f32), &filled(2, 1, 0.0)).unwrap();
        }
        assert_eq!(c.buffers().unwrap().0.dim(1).unwrap(), 70, "no regrowth up to the hint");
        assert_eq!(c.rows(69, 1).unwrap().0.to_vec3::<f32>().unwrap(), filled(2, 1, 60.0).to_vec3::<f32>().unwrap());
    }
}
