//! The Flamingo model: vision tower -> Perceiver Resampler -> language model with gated
//! cross-attention blocks before the chosen decoder layers.
//!
//! Weights are immutable and shareable across threads; everything a request accumulates lives in
//! its [`SequenceState`]. [`Flamingo::forward`] runs a *ragged batch*: any number of sequences,
//! each with any number of new tokens (a prefill chunk or one decode token), stacked so each
//! weight matrix is read once for all of them.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::{MediaRule, ResolvedConfig};
use crate::error::{Error, Result};
use crate::lm::{Batch, LanguageModel};
use crate::paged::KvPool;
use crate::perceiver::PerceiverResampler;
use crate::state::SequenceState;
use crate::vision::VisionTransformer;
use crate::xattn::{GatedCrossAttentionBlock, MediaIndex};

/// Cross-attention K/V of one or more images for every gated layer (`None` for layers without
/// a gated block).
#[derive(Debug, Clone)]
pub struct MediaKv {
    layers: Vec<Option<crate::state::XattnKv>>,
    images: usize,
}

impl MediaKv {
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(crate::state::XattnKv::bytes).sum()
    }
}

/// New tokens for one sequence in a forward call.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// Prompt tokens (possibly one chunk of a longer prompt).
    Prompt(&'a [u32]),
    /// One generated token fed back.
    Generated(u32),
}

impl Input<'_> {
    pub fn len(&self) -> usize {
        match self {
            Input::Prompt(t) => t.len(),
            Input::Generated(_) => 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last new token of each sequence: `[sequences, vocab]`.
    Last,
    /// Every new token: `[total new tokens, vocab]`.
    All,
}

pub struct Flamingo {
    pub(crate) vision: VisionTransformer,
    pub(crate) perceiver: PerceiverResampler,
    pub(crate) xattn: Vec<Option<GatedCrossAttentionBlock>>,
    pub(crate) lm: Box<dyn LanguageModel>,
    pub(crate) config: ResolvedConfig,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    /// The paged K/V pool, when sequences keep their self-attention K/V in it (see
    /// [`crate::paged`]): the default off the CPU.
    pub(crate) kv_pool: Option<Arc<KvPool>>,
}

impl Flamingo {
    pub fn config(&self) -> &ResolvedConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn vocab_size(&self) -> usize {
        self.lm.vocab_size()
    }

    pub fn num_layers(&self) -> usize {
        self.lm.num_layers()
    }

    /// Self-attention K/V bytes one token adds to a sequence (all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.lm.kv_width() * 2 * self.lm.num_layers() * self.dtype.size_in_bytes()
    }

    /// A fresh per-request state.
    pub fn new_state(&self) -> SequenceState {
        SequenceState::new(self.lm.num_layers(), self.kv_pool.as_ref())
    }

    /// Chooses where sequences keep their self-attention K/V: in one paged pool on the device,
    /// attended in a constant number of batched operations per layer (`true`, the default
    /// off the CPU), or in caches of their own, attended by the CPU's fused loop (`false`, the
    /// default on the CPU). States made before the switch must not be mixed with later ones.
    pub fn set_paged_kv(&mut self, paged: bool) {
        self.kv_pool =
            paged.then(|| Arc::new(KvPool::new(self.lm.num_layers(), self.lm.kv_heads(), self.lm.kv_width(), self.dtype, &self.device)));
    }

    /// The paged K/V pool, if sequences use one.
    pub fn kv_pool(&self) -> Option<&Arc<KvPool>> {
        self.kv_pool.as_ref()
    }

    /// The K/V layout a device gets by default: paged everywhere but on the CPU.
    pub(crate) fn default_paged(device: &Device) -> bool {
        !device.is_cpu()
    }

    /// Whether the Perceiver accepts several frames per media.
    pub fn supports_video(&self) -> bool {
        self.perceiver.supports_video()
    }

    /// Vision-tower patch tokens for pixels `[n, 3, H, W]` -> `[n, patches, width]`.
    pub fn vision_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.vision.forward(&pixels)?)
    }

    /// The normalised CLIP image embedding of each image, `[n, 3, H, W]` -> `[n, d]` f32 (see
    /// [`VisionTransformer::embed`]): what retrieval of similar demonstrations compares.
    pub fn image_embeddings(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        let e = self.vision.embed(&pixels)?.to_dtype(DType::F32)?;
        let norm = e.sqr()?.sum_keepdim(1)?.sqrt()?;
        Ok(e.broadcast_div(&norm)?)
    }

    /// Vision tower + Perceiver for one sample's media: pixels `[T, F, 3, H, W]` (T media of F
    /// frames) -> latents `[T, num_latents, width]`. `media_offset` is the index of the first of
    /// these media within its sample (it matters only with media-time embeddings).
    pub fn encode_media(&self, pixels: &Tensor, media_offset: usize) -> Result<Tensor> {
        let (t, f, c, h, w) = pixels.dims5()?;
        if f > 1 && !self.perceiver.supports_video() {
            return Err(Error::Unsupported(format!(
                "this model's Perceiver has no frame embeddings, so each media must be a single image, not {f} frames"
            )));
        }
        let size = self.vision.config().image_size;
        if (c, h, w) != (3, size, size) {
            return Err(Error::Invalid(format!("pixels must be [T, F, 3, {size}, {size}], got {:?}", pixels.dims())));
        }
        let tokens = self.vision_tokens(&pixels.reshape((t * f, c, h, w))?)?;
        let (_, v, d) = tokens.dims3()?;
        Ok(self.perceiver.forward(&tokens.reshape((t, f, v, d))?, media_offset)?)
    }

    /// The cross-attention keys and values of every gated layer for image latents `[T, n, d]`.
    /// They depend only on the images, so they can be computed once and shared by every
    /// sequence (and request) that shows these images.
    pub fn media_kv(&self, latents: &Tensor) -> Result<MediaKv> {
        let latents = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let layers = self.xattn.iter().map(|b| b.as_ref().map(|b| b.media_kv(&latents)).transpose()).collect::<candle_core::Result<_>>()?;
        Ok(MediaKv { layers, images: latents.dim(0)? })
    }

    /// Attaches media (in order, after any already attached) by their cross-attention K/V,
    /// without copying them: the sequence shares them with `media`'s other holders (the vision
    /// cache, other sequences).
    pub fn attach_media_kv(&self, state: &mut SequenceState, media: &[&MediaKv]) -> Result<()> {
        if media.iter().any(|m| m.layers.len() != state.xattn.len()) {
            return Err(Error::Invalid("media K/V from another model".into()));
        }
        for (i, slot) in state.xattn.iter_mut().enumerate() {
            for kv in media.iter().filter_map(|m| m.layers[i].as_ref()) {
                slot.push(kv.clone());
            }
        }
        state.num_images += media.iter().map(|m| m.images).sum::<usize>();
        Ok(())
    }

    /// Attaches image latents `[T, n, d]` to a sequence (after any already attached): the
    /// cross-attention K/V of every gated layer are computed here, once.
    pub fn attach_media(&self, state: &mut SequenceState, latents: &Tensor) -> Result<()> {
        let kv = self.media_kv(latents)?;
        self.attach_media_kv(state, &[&kv])
    }

    /// Restores a cached prompt prefix into a fresh state (images already attached): appends
    /// each block's K/V to every layer, and `prefix` (the tokens those blocks hold, in order)
    /// advances the media state as prefilling them would. Exact by the masking rule: a prefix's
    /// K/V depend only on its tokens and images.
    ///
    /// The caches get room for `capacity` positions at once (the whole prompt and some of the
    /// generation), so neither the restore nor the prefill after it regrows them.
    pub fn restore_prefix(
        &self,
        state: &mut SequenceState,
        blocks: &[&crate::state::KvBlock],
        prefix: &[u32],
        capacity: usize,
    ) -> Result<()> {
        if !state.is_empty() || state.decode_media.is_some() {
            return Err(Error::Invalid("a prefix can only be restored into a fresh state".into()));
        }
        if blocks.iter().any(|b| b.layers.len() != self.lm.num_layers()) {
            return Err(Error::Invalid("prefix block from another model".into()));
        }
        let rows: usize = blocks.iter().map(|b| b.len).sum();
        let media: usize = blocks.iter().map(|b| b.media).sum();
        if rows != prefix.len() {
            return Err(Error::Invalid(format!("{} prefix tokens for blocks of {rows} positions", prefix.len())));
        }
        if !prefix.is_empty() {
            media_indices(self.config.media_rule, MediaCursor::of(state), &Input::Prompt(prefix))?;
        }
        if state.media_seen != media {
            return Err(Error::Invalid(format!("the prefix tokens hold {} images, its blocks {media}", state.media_seen)));
        }
        if state.media_seen > state.num_images {
            return Err(Error::Invalid("restored prefix refers to more images than are attached".into()));
        }
        // The first append (a restored block, or the prefill) allocates all of it.
        let total = capacity.max(rows);
        if let Some(p) = state.paged.as_mut() {
            p.reserve(total)?;
            for b in blocks {
                p.append(&b.layers)?;
            }
            return Ok(());
        }
        for cache in state.kv.iter_mut() {
            cache.set_min_capacity(total);
        }
        for b in blocks {
            for (cache, (k, v)) in state.kv.iter_mut().zip(&b.layers) {
                cache.append(k, v)?;
            }
        }
        Ok(())
    }

    /// The media index each new token attends to, advancing the sequence's media count.
    fn media_indices(&self, state: &mut SequenceState, input: &Input) -> Result<Vec<MediaIndex>> {
        let out = media_indices(self.config.media_rule, MediaCursor::of(state), input)?;
        if let Some(Some(m)) = out.iter().max() {
            if *m >= state.num_images {
                return Err(Error::Invalid(format!(
                    "the text has {} <image> tokens but only {} images are attached",
                    m + 1,
                    state.num_images
                )));
            }
        }
        Ok(out)
    }

    /// Runs new tokens of several sequences through the model and returns logits (f32).
    ///
    /// On error the states may hold partial updates and should be discarded.
    pub fn forward(&self, states: &mut [&mut SequenceState], inputs: &[Input], which: Logits) -> Result<Tensor> {
        if states.len() != inputs.len() {
            return Err(Error::Invalid("one input per sequence".into()));
        }
        if inputs.iter().any(|i| i.is_empty()) {
            return Err(Error::Invalid("every sequence needs at least one new token".into()));
        }
        let vocab = self.lm.vocab_size() as u32;
        let mut ids = Vec::new();
        let mut media = Vec::with_capacity(states.len());
        for (st, input) in states.iter_mut().zip(inputs) {
            match input {
                Input::Prompt(t) => ids.extend_from_slice(t),
                Input::Generated(t) => ids.push(*t),
            }
            media.push(self.media_indices(st, input)?);
        }
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(Error::Invalid(format!("token id {bad} is outside the vocabulary ({vocab})")));
        }
        let lens: Vec<usize> = inputs.iter().map(|i| i.len()).collect();
        let pasts: Vec<usize> = states.iter().map(|s| s.len()).collect();
        for ((st, &len), &past) in states.iter_mut().zip(&lens).zip(&pasts) {
            if let Some(p) = st.paged.as_mut() {
                p.reserve(past + len)?;
            }
        }
        let mut batch = Batch::new(states, lens, pasts);
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self.lm.embed(&ids_t, batch.positions())?.to_dtype(self.dtype)?;
        for i in 0..self.lm.num_layers() {
            if let Some(block) = &self.xattn[i] {
                let seqs: Vec<_> = batch.seqs.iter().zip(&media).map(|(st, m)| (&st.xattn[i], m.as_slice())).collect();
                x = block.forward(&x, &seqs, self.kv_pool.is_some())?;
            }
            x = self.lm.layer(i).forward(&x, &mut batch)?;
        }
        for ((st, &len), &past) in batch.seqs.iter_mut().zip(&batch.lens).zip(&batch.pasts) {
            if let Some(p) = st.paged.as_mut() {
                p.set_len(past + len);
            }
        }
        let x = match which {
            Logits::All => x,
            Logits::Last => {
                let mut rows = Vec::with_capacity(batch.lens.len());
                let mut end = 0u32;
                for &l in &batch.lens {
                    end += l as u32;
                    rows.push(end.saturating_sub(1));
                }
                x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
            }
        };
        Ok(self.lm.logits(&x)?.to_dtype(DType::F32)?)
    }
}

/// Where a sequence is in its model's [`MediaRule`]: what the tokens so far leave for the next.
pub(crate) struct MediaCursor<'a> {
    /// `<image>` tokens consumed by the prompt so far.
    pub seen: &'a mut usize,
    /// Once decoding started: the (1-based, 0 = none) image generated tokens attend to.
    pub decode: &'a mut Option<usize>,
    /// IDEFICS: an `eos` since the last `<image>`.
    pub reset: &'a mut bool,
    /// The image the last prompt token attended to.
    pub last: &'a mut Option<usize>,
}

impl<'a> MediaCursor<'a> {
    pub(crate) fn of(state: &'a mut SequenceState) -> Self {
        MediaCursor {
            seen: &mut state.media_seen,
            decode: &mut state.decode_media,
            reset: &mut state.media_reset,
            last: &mut state.last_media,
        }
    }
}

/// The media index each new token attends to under `rule`, advancing the cursor.
///
/// OpenFlamingo (`only_attend_immediate_media`): prompt tokens continue
/// `text_time = cumsum(token == <image>)` (the `<image>` token belongs to its image); generated
/// tokens attend to the last prompt image, except that a generated `<image>` restarts the count
/// at 1 as the reference's one-token forward does (see [`crate::xattn`]).
///
/// IDEFICS (the processor's `image_attention_mask`): the same count, but the tokens after an
/// `eos` attend to no image until the next `<image>`; generated tokens attend as the last prompt
/// token did, whatever they are.
pub(crate) fn media_indices(rule: MediaRule, cur: MediaCursor, input: &Input) -> Result<Vec<MediaIndex>> {
    let idx = |t: usize| if t == 0 { None } else { Some(t - 1) };
    Ok(match input {
        Input::Prompt(ids) => {
            if cur.decode.is_some() {
                return Err(Error::Invalid("prompt tokens after generation started".into()));
            }
            let out: Vec<MediaIndex> = match rule {
                MediaRule::Cumulative { media } => ids
                    .iter()
                    .map(|&id| {
                        if id == media {
                            *cur.seen += 1;
                        }
                        idx(*cur.seen)
                    })
                    .collect(),
                MediaRule::ResetAfterEos { media, eos } => ids
                    .iter()
                    .map(|&id| {
                        if id == media {
                            *cur.seen += 1;
                            *cur.reset = false;
                        }
                        let m = if *cur.reset { None } else { idx(*cur.seen) };
                        if id == eos {
                            *cur.reset = true;
                        }
                        m
                    })
                    .collect(),
            };
            if let Some(&m) = out.last() {
                *cur.last = m;
            }
            out
        }
        Input::Generated(id) => {
            let t = match rule {
                MediaRule::Cumulative { media } if *id == media => 1,
                MediaRule::Cumulative { .. } => cur.decode.unwrap_or(*cur.seen),
                MediaRule::ResetAfterEos { .. } => cur.decode.unwrap_or_else(|| cur.last.map_or(0, |m| m + 1)),
            };
            *cur.decode = Some(t);
            vec![idx(t)]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 9;
    const EOS: u32 = 2;
    const OF: MediaRule = MediaRule::Cumulative { media: M };
    const IDEFICS: MediaRule = MediaRule::ResetAfterEos { media: M, eos: EOS };

    /// A sequence's media state, for the rule tests.
    #[derive(Default)]
    struct Cur {
        seen: usize,
        dec: Option<usize>,
        reset: bool,
        last: Option<usize>,
    }

    impl Cur {
        fn run(&mut self, rule: MediaRule, input: Input) -> Result<Vec<MediaIndex>> {
            let c = MediaCursor { seen: &mut self.seen, decode: &mut self.dec, reset: &mut self.reset, last: &mut self.last };
            media_indices(rule, c, &input)
        }
    }

    #[test]
    fn idefics_tokens_after_eos_attend_to_nothing_until_the_next_image() {
        let mut c = Cur::default();
        let v = c.run(IDEFICS, Input::Prompt(&[1, M, 3, EOS, 4, 5])).unwrap();
        assert_eq!(v, vec![None, Some(0), Some(0), Some(0), None, None]);
        let v = c.run(IDEFICS, Input::Prompt(&[6, M, 7, M, EOS])).unwrap();
        assert_eq!(v, vec![None, Some(1), Some(1), Some(2), Some(2)]);
        // Generated tokens attend as the last prompt token (the eos) did, <image> or not.
        for t in [5, M, EOS, 5] {
            assert_eq!(c.run(IDEFICS, Input::Generated(t)).unwrap(), vec![Some(2)]);
        }
        let mut c = Cur::default();
        c.run(IDEFICS, Input::Prompt(&[M, EOS, 4])).unwrap();
        assert_eq!(c.run(IDEFICS, Input::Generated(5)).unwrap(), vec![None]);
        // Chunked prompts give what one chunk does.
        let ids = [1, M, 3, EOS, 4, M, 5, EOS, EOS, 6];
        let whole = Cur::default().run(IDEFICS, Input::Prompt(&ids)).unwrap();
        for split in 0..ids.len() {
            let mut c = Cur::default();
            let mut v = c.run(IDEFICS, Input::Prompt(&ids[..split])).unwrap();
            v.extend(c.run(IDEFICS, Input::Prompt(&ids[split..])).unwrap());
            assert_eq!(v, whole, "split at {split}");
        }
    }

    #[test]
    fn text_before_the_first_image_attends_to_nothing() {
        let mut c = Cur::default();
        let v = c.run(OF, Input::Prompt(&[1, 2, M, 3])).unwrap();
        assert_eq!(v, vec![None, None, Some(0), Some(0)]);
    }

    #[test]
    fn each_token_attends_to_its_immediate_image_across_chunks() {
        let mut c = Cur::default();
        let a = c.run(OF, Input::Prompt(&[M, 1, 2])).unwrap();
        let b = c.run(OF, Input::Prompt(&[3, M, 4, M])).unwrap();
        assert_eq!(a, vec![Some(0), Some(0), Some(0)]);
        assert_eq!(b, vec![Some(0), Some(1), Some(1), Some(2)]);
    }

    #[test]
    fn generated_tokens_attend_to_the_last_image() {
        let mut c = Cur::default();
        c.run(OF, Input::Prompt(&[M, 1, M, 2, M, 3])).unwrap();
        for _ in 0..3 {
            assert_eq!(c.run(OF, Input::Generated(5)).unwrap(), vec![Some(2)]);
        }
        // The reference's quirk: a generated <image> (and what follows) attends to image 1.
        assert_eq!(c.run(OF, Input::Generated(M)).unwrap(), vec![Some(0)]);
        assert_eq!(c.run(OF, Input::Generated(5)).unwrap(), vec![Some(0)]);
        assert!(c.run(OF, Input::Prompt(&[1])).is_err());
    }

    /// Attached cross-attention K/V are shared with their holder (here the `MediaKv`, in the
    /// engine the vision cache) and with every other sequence, not copied; and a sequence that
    /// got its images in several pieces computes exactly what one that got them at once does.
    #[test]
    fn attached_media_kv_are_shared_and_pieces_are_exact() {
        let spec = crate::random::RandomSpec {
            vision_width: 64,
            vision_layers: 1,
            image_size: 28,
            patch_size: 14,
            d_model: 64,
            n_heads: 2,
            n_layers: 2,
            vocab: 64,
            cross_attn_every_n_layers: 1,
            perceiver_depth: 1,
        };
        let dev = Device::Cpu;
        let m = crate::random::build(&spec, &dev, DType::F32).unwrap();
        let lat = Tensor::randn(0f32, 1.0, (3, 8, 64), &dev).unwrap();
        let all = m.media_kv(&lat).unwrap();
        let first = m.media_kv(&lat.narrow(0, 0, 2).unwrap()).unwrap();
        let last = m.media_kv(&lat.narrow(0, 2, 1).unwrap()).unwrap();
        let (mut one, mut other, mut pieces) = (m.new_state(), m.new_state(), m.new_state());
        m.attach_media_kv(&mut one, &[&all]).unwrap();
        m.attach_media_kv(&mut other, &[&all]).unwrap();
        m.attach_media_kv(&mut pieces, &[&first]).unwrap();
        m.attach_media_kv(&mut pieces, &[&last]).unwrap();
        let ptr = |t: &Tensor| crate::nn::with_f32(t, |s| s.as_ptr()).unwrap();
        let mut gated = 0;
        for (i, kv) in all.layers.iter().enumerate() {
            let Some(kv) = kv else { continue };
            gated += 1;
            for st in [&one, &other] {
                let (held, img) = st.xattn[i].image(2).unwrap();
                assert_eq!((ptr(&held.k), ptr(&held.v), img), (ptr(&kv.k), ptr(&kv.v), 2), "layer {i} copied");
            }
            let (held, img) = pieces.xattn[i].image(2).unwrap();
            assert_eq!((ptr(&held.k), img), (ptr(&last.layers[i].as_ref().unwrap().k), 0));
            assert!(pieces.xattn[i].image(3).is_none());
        }
        assert_eq!(gated, 2);
        let media = (spec.vocab - 2) as u32;
        let ids = [1, media, 2, 3, media, 4, media, 5];
        let run = |st: &mut SequenceState| {
            let p: Vec<Vec<f32>> = m.forward(&mut [&mut *st], &[Input::Prompt(&ids)], Logits::All).unwrap().to_vec2().unwrap();
            let d: Vec<Vec<f32>> = m.forward(&mut [&mut *st], &[Input::Generated(7)], Logits::Last).unwrap().to_vec2().unwrap();
            (p, d)
        };
        assert_eq!(run(&mut one), run(&mut pieces));
    }
}
