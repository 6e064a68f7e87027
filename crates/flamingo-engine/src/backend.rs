//! The small interface the engine needs from a model, and its implementation for
//! [`flamingo_model::Flamingo`].

use flamingo_model::candle::Tensor;
use flamingo_model::{Flamingo, Input, KvBlock, Logits, SequenceState};

use crate::request::PreparedMedia;

/// What the scheduler needs from a model. Errors are plain messages: the engine reports them to
/// the affected request and carries on.
pub trait Backend: Send + 'static {
    /// Per-sequence state (KV caches, attached media).
    type State: Send;
    /// The encoded form of one media item (Perceiver latents).
    type Media: Send + Sync;
    /// A prefix-cache block (K/V of a run of prompt positions).
    type Block: Send + Sync;

    fn vocab_size(&self) -> usize;
    fn new_state(&self) -> Self::State;
    /// Whether an encoding depends on the media's position in its request (media-time
    /// embeddings); if so the position is part of the vision-cache key.
    fn media_depends_on_position(&self) -> bool;
    fn encode(&self, media: &PreparedMedia, position: usize) -> Result<Self::Media, String>;
    fn media_bytes(&self, media: &Self::Media) -> usize;
    /// Attaches the request's media, in order (cross-attention K/V are computed here, once).
    fn attach(&self, state: &mut Self::State, media: &[&Self::Media]) -> Result<(), String>;
    /// One ragged step: new tokens for each sequence -> last-position logits of each.
    fn forward(&self, states: &mut [&mut Self::State], inputs: &[Input]) -> Result<Vec<Vec<f32>>, String>;
    /// Bytes a sequence's state holds now.
    fn state_bytes(&self, state: &Self::State) -> usize;
    /// Self-attention KV bytes one token adds (for admission estimates).
    fn kv_bytes_per_token(&self) -> usize;
    fn snapshot(&self, state: &Self::State, start: usize, len: usize, media: usize) -> Result<Self::Block, String>;
    fn block_bytes(&self, block: &Self::Block) -> usize;
    /// Restores cached prefix blocks into a fresh state whose media are attached.
    fn restore(&self, state: &mut Self::State, blocks: &[&Self::Block]) -> Result<(), String>;
}

impl Backend for Flamingo {
    type State = SequenceState;
    type Media = Tensor;
    type Block = KvBlock;

    fn vocab_size(&self) -> usize {
        Flamingo::vocab_size(self)
    }

    fn new_state(&self) -> SequenceState {
        Flamingo::new_state(self)
    }

    fn media_depends_on_position(&self) -> bool {
        self.config().perceiver.max_num_media.is_some()
    }

    fn encode(&self, media: &PreparedMedia, position: usize) -> Result<Tensor, String> {
        let px = media.pixels.unsqueeze(0).map_err(|e| e.to_string())?;
        let lat = self.encode_media(&px, position).map_err(|e| e.to_string())?;
        lat.squeeze(0).map_err(|e| e.to_string())
    }

    fn media_bytes(&self, media: &Tensor) -> usize {
        media.elem_count() * media.dtype().size_in_bytes()
    }

    fn attach(&self, state: &mut SequenceState, media: &[&Tensor]) -> Result<(), String> {
        if media.is_empty() {
            return Ok(());
        }
        let stacked = Tensor::stack(media, 0).map_err(|e| e.to_string())?;
        self.attach_media(state, &stacked).map_err(|e| e.to_string())
    }

    fn forward(&self, states: &mut [&mut SequenceState], inputs: &[Input]) -> Result<Vec<Vec<f32>>, String> {
        let logits = Flamingo::forward(self, states, inputs, Logits::Last).map_err(|e| e.to_string())?;
        logits.to_vec2::<f32>().map_err(|e| e.to_string())
    }

    fn state_bytes(&self, state: &SequenceState) -> usize {
        state.kv_bytes() + state.xattn_bytes()
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.kv_bytes_per_token()
    }

    fn snapshot(&self, state: &SequenceState, start: usize, len: usize, media: usize) -> Result<KvBlock, String> {
        state.kv_block(start, len, media).map_err(|e| e.to_string())
    }

    fn block_bytes(&self, block: &KvBlock) -> usize {
        block.bytes()
    }

    fn restore(&self, state: &mut SequenceState, blocks: &[&KvBlock]) -> Result<(), String> {
        self.restore_prefix(state, blocks).map_err(|e| e.to_string())
    }
}
