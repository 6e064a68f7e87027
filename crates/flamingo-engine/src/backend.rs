//! The small interface the engine needs from a model, and its implementation for
//! [`flamingo_model::Flamingo`].

use flamingo_model::{Flamingo, Input, KvBlock, Logits, MediaKv, SequenceState};

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
    /// A deep copy of a state (beams forking from one parent).
    fn fork(&self, state: &Self::State) -> Result<Self::State, String>;
    /// Bytes a sequence's state holds or refers to now (shared parts count in full).
    fn state_bytes(&self, state: &Self::State) -> usize;
    /// Self-attention KV bytes one token adds (for admission estimates).
    fn kv_bytes_per_token(&self) -> usize;
    fn snapshot(&self, state: &Self::State, start: usize, len: usize, media: usize) -> Result<Self::Block, String>;
    fn block_bytes(&self, block: &Self::Block) -> usize;
    /// The first `rows` positions of a block holding `media` `<image>` tokens (partial prefix
    /// hits). Backends that cannot cut blocks only get whole-block hits.
    fn block_head(&self, _block: &Self::Block, _rows: usize, _media: usize) -> Option<Self::Block> {
        None
    }
    /// Restores cached prefix blocks into a fresh state whose media are attached.
    /// `capacity`: positions the sequence is expected to reach (room can be made at once).
    fn restore(&self, state: &mut Self::State, blocks: &[&Self::Block], capacity: usize) -> Result<(), String>;
}

/// Media are cached as their cross-attention K/V (every gated layer): a cache hit skips the
/// vision tower, the Perceiver and the K/V projections.
impl Backend for Flamingo {
    type State = SequenceState;
    type Media = MediaKv;
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

    fn encode(&self, media: &PreparedMedia, position: usize) -> Result<MediaKv, String> {
        let px = media.pixels.unsqueeze(0).map_err(|e| e.to_string())?;
        let lat = self.encode_media(&px, position).map_err(|e| e.to_string())?;
        self.media_kv(&lat).map_err(|e| e.to_string())
    }

    fn media_bytes(&self, media: &MediaKv) -> usize {
        media.bytes()
    }

    fn attach(&self, state: &mut SequenceState, media: &[&MediaKv]) -> Result<(), String> {
        self.attach_media_kv(state, media).map_err(|e| e.to_string())
    }

    fn forward(&self, states: &mut [&mut SequenceState], inputs: &[Input]) -> Result<Vec<Vec<f32>>, String> {
        let logits = Flamingo::forward(self, states, inputs, Logits::Last).map_err(|e| e.to_string())?;
        logits.to_vec2::<f32>().map_err(|e| e.to_string())
    }

    fn fork(&self, state: &SequenceState) -> Result<SequenceState, String> {
        state.fork().map_err(|e| e.to_string())
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

    fn block_head(&self, block: &KvBlock, rows: usize, media: usize) -> Option<KvBlock> {
        block.head(rows, media).ok()
    }

    fn restore(&self, state: &mut SequenceState, blocks: &[&KvBlock], capacity: usize) -> Result<(), String> {
        self.restore_prefix(state, blocks, capacity).map_err(|e| e.to_string())
    }
}

/// A shared model (several schedulers, or a scheduler and a benchmark) behind an `Arc`.
impl<B: Backend + Sync> Backend for std::sync::Arc<B> {
    type State = B::State;
    type Media = B::Media;
    type Block = B::Block;

    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }
    fn new_state(&self) -> Self::State {
        (**self).new_state()
    }
    fn media_depends_on_position(&self) -> bool {
        (**self).media_depends_on_position()
    }
    fn encode(&self, media: &PreparedMedia, position: usize) -> Result<Self::Media, String> {
        (**self).encode(media, position)
    }
    fn media_bytes(&self, media: &Self::Media) -> usize {
        (**self).media_bytes(media)
    }
    fn attach(&self, state: &mut Self::State, media: &[&Self::Media]) -> Result<(), String> {
        (**self).attach(state, media)
    }
    fn forward(&self, states: &mut [&mut Self::State], inputs: &[Input]) -> Result<Vec<Vec<f32>>, String> {
        (**self).forward(states, inputs)
    }
    fn fork(&self, state: &Self::State) -> Result<Self::State, String> {
        (**self).fork(state)
    }
    fn state_bytes(&self, state: &Self::State) -> usize {
        (**self).state_bytes(state)
    }
    fn kv_bytes_per_token(&self) -> usize {
        (**self).kv_bytes_per_token()
    }
    fn snapshot(&self, state: &Self::State, start: usize, len: usize, media: usize) -> Result<Self::Block, String> {
        (**self).snapshot(state, start, len, media)
    }
    fn block_bytes(&self, block: &Self::Block) -> usize {
        (**self).block_bytes(block)
    }
    fn block_head(&self, block: &Self::Block, rows: usize, media: usize) -> Option<Self::Block> {
        (**self).block_head(block, rows, media)
    }
    fn restore(&self, state: &mut Self::State, blocks: &[&Self::Block], capacity: usize) -> Result<(), String> {
        (**self).restore(state, blocks, capacity)
    }
}
