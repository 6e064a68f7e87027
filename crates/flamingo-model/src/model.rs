//! The Flamingo model: vision tower -> Perceiver Resampler -> language model with gated
//! cross-attention blocks before the chosen decoder layers.
//!
//! Weights are immutable and shareable across threads; everything a request accumulates lives in
//! its [`SequenceState`]. [`Flamingo::forward`] runs a *ragged batch*: any number of sequences,
//! each with any number of new tokens (a prefill chunk or one decode token), stacked so each
//! weight matrix is read once for all of them.

use candle_core::{DType, Device, Tensor};

use crate::config::ResolvedConfig;
use crate::error::{Error, Result};
use crate::lm::{Batch, LanguageModel};
use crate::perceiver::PerceiverResampler;
use crate::state::SequenceState;
use crate::vision::VisionTransformer;
use crate::xattn::{GatedCrossAttentionBlock, MediaIndex};

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

    /// A fresh per-request state.
    pub fn new_state(&self) -> SequenceState {
        SequenceState::new(self.lm.num_layers())
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

    /// Attaches image latents `[T, n, d]` to a sequence (after any already attached): the
    /// cross-attention K/V of every gated layer are computed here, once.
    pub fn attach_media(&self, state: &mut SequenceState, latents: &Tensor) -> Result<()> {
        let latents = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        for (slot, block) in state.xattn.iter_mut().zip(&self.xattn) {
            if let Some(block) = block {
                let kv = block.media_kv(&latents)?;
                *slot = Some(match slot.take() {
                    Some(old) => crate::state::XattnKv {
                        k: Tensor::cat(&[&old.k, &kv.k], 0)?,
                        v: Tensor::cat(&[&old.v, &kv.v], 0)?,
                    },
                    None => kv,
                });
            }
        }
        state.num_images += latents.dim(0)?;
        Ok(())
    }

    /// The media index each new token attends to, advancing the sequence's media count.
    fn media_indices(&self, state: &mut SequenceState, input: &Input) -> Result<Vec<MediaIndex>> {
        let media = self.config.media_token_id;
        let idx = |t: usize| if t == 0 { None } else { Some(t - 1) };
        let out = match input {
            Input::Prompt(ids) => {
                if state.decode_media.is_some() {
                    return Err(Error::Invalid("prompt tokens after generation started".into()));
                }
                let mut v = Vec::with_capacity(ids.len());
                for &id in ids.iter() {
                    if id == media {
                        state.media_seen += 1;
                    }
                    v.push(idx(state.media_seen));
                }
                v
            }
            Input::Generated(id) => {
                // See the module docs of `xattn`: a generated <image> restarts the count at 1.
                let t = if *id == media { 1 } else { state.decode_media.unwrap_or(state.media_seen) };
                state.decode_media = Some(t);
                vec![idx(t)]
            }
        };
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
        let mut batch = Batch { seqs: states, lens, pasts };
        let positions = batch.positions();
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self.lm.embed(&ids_t, &positions)?.to_dtype(self.dtype)?;
        for i in 0..self.lm.num_layers() {
            if let Some(block) = &self.xattn[i] {
                let seqs: Vec<_> = batch
                    .seqs
                    .iter()
                    .zip(&media)
                    .map(|(st, m)| (st.xattn[i].as_ref(), m.as_slice()))
                    .collect();
                x = block.forward(&x, &seqs)?;
            }
            x = self.lm.layer(i).forward(&x, &mut batch)?;
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
