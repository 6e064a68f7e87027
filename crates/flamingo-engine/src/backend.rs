//! The small interface the engine needs from a model, and its implementation for
//! [`flamingo_model::Flamingo`].

use flamingo_model::{Flamingo, Input, KvBlock, Logits, MediaKv, SequenceState};

use crate::error::BackendError;
use crate::request::{ModelSpec, PreparedMedia, TokenEvent};

/// What the scheduler needs from a model. A failure is reported to the affected requests
/// (as the client's mistake when it is [`BackendError::Input`]) and the engine carries on.
pub trait Backend: Send + 'static {
    /// Per-sequence state (KV caches, attached media).
    type State: Send;
    /// The encoded form of one media item (Perceiver latents).
    type Media: Send + Sync;
    /// A prefix-cache block (K/V of a run of prompt positions).
    type Block: Send + Sync;

    /// The vocabulary, the special ids and the KV size requests are checked against.
    fn spec(&self) -> ModelSpec;
    fn new_state(&self) -> Self::State;
    /// Whether an encoding depends on the media's position in its request (media-time
    /// embeddings); if so the position is part of the vision-cache key.
    fn media_depends_on_position(&self) -> bool;
    fn encode(&self, media: &PreparedMedia, position: usize) -> Result<Self::Media, BackendError>;
    fn media_bytes(&self, media: &Self::Media) -> usize;
    /// The normalised image embedding of a media item's first frame, for retrieving similar
    /// demonstrations (see `Flamingo::image_embeddings`). The default: the model has none.
    fn embed(&self, media: &PreparedMedia) -> Result<Vec<f32>, BackendError> {
        let _ = media;
        Err(BackendError::Input("this model has no image embedding".into()))
    }
    /// Attaches the request's media, in order (cross-attention K/V are computed here, once).
    fn attach(&self, state: &mut Self::State, media: &[&Self::Media]) -> Result<(), BackendError>;
    /// One ragged step: new tokens for each sequence -> last-position logits of each (one row
    /// per input).
    fn forward(&self, states: &mut [&mut Self::State], inputs: &[Input]) -> Result<Vec<Vec<f32>>, BackendError>;
    /// [`Backend::forward`] where the rows marked in `argmax` may come back as their argmax
    /// alone (a greedy pick made where the logits are, so a device does not copy a
    /// vocabulary-wide row to the host for it). The default returns every row in full.
    fn forward_rows(&self, states: &mut [&mut Self::State], inputs: &[Input], argmax: &[bool]) -> Result<Vec<Row>, BackendError> {
        let _ = argmax;
        Ok(self.forward(states, inputs)?.into_iter().map(Row::Logits).collect())
    }
    /// Teacher-forced scoring: runs each input (prompt tokens) through its state and returns,
    /// for every input position `j`, the log-probability of `targets[i][j]` (the token that
    /// follows) with `top` alternatives. The default steps one token at a time through
    /// [`Backend::forward`]; a model that can return every position's logits overrides it.
    fn score(
        &self,
        states: &mut [&mut Self::State],
        inputs: &[Input],
        targets: &[&[u32]],
        top: usize,
    ) -> Result<Vec<Vec<TokenEvent>>, BackendError> {
        let tokens: Vec<&[u32]> = inputs
            .iter()
            .map(|i| match i {
                Input::Prompt(t) => Ok(*t),
                Input::Generated(_) => Err(BackendError::Internal("scoring takes prompt inputs".into())),
            })
            .collect::<Result<_, _>>()?;
        let mut out: Vec<Vec<TokenEvent>> = tokens.iter().map(|t| Vec::with_capacity(t.len())).collect();
        let longest = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
        for j in 0..longest {
            let active: Vec<usize> = (0..tokens.len()).filter(|&i| j < tokens[i].len()).collect();
            let mut st: Vec<&mut Self::State> =
                states.iter_mut().enumerate().filter(|(i, _)| active.contains(i)).map(|(_, s)| &mut **s).collect();
            let step: Vec<Input> = active.iter().map(|&i| Input::Prompt(&tokens[i][j..j + 1])).collect();
            let rows = self.forward(&mut st, &step)?;
            for (&i, row) in active.iter().zip(rows) {
                let id =
                    targets.get(i).and_then(|t| t.get(j)).copied().ok_or_else(|| BackendError::Internal("a target is missing".into()))?;
                let (logprob, top_logprobs) = flamingo_model::sampling::token_logprobs(&row, id, top);
                out[i].push(TokenEvent { id, logprob, top_logprobs });
            }
        }
        Ok(out)
    }
    /// A deep copy of a state (beams forking from one parent).
    fn fork(&self, state: &Self::State) -> Result<Self::State, BackendError>;
    /// Bytes a sequence's state holds or refers to now (shared parts count in full).
    fn state_bytes(&self, state: &Self::State) -> usize;
    fn snapshot(&self, state: &Self::State, start: usize, len: usize, media: usize) -> Result<Self::Block, BackendError>;
    fn block_bytes(&self, block: &Self::Block) -> usize;
    /// The first `rows` positions of a block holding `media` `<image>` tokens (partial prefix
    /// hits). Backends that cannot cut blocks only get whole-block hits.
    fn block_head(&self, _block: &Self::Block, _rows: usize, _media: usize) -> Option<Self::Block> {
        None
    }
    /// Restores cached prefix blocks into a fresh state whose media are attached; `prefix` is
    /// the prompt tokens the blocks hold. `capacity`: positions the sequence is expected to
    /// reach (room can be made at once).
    fn restore(&self, state: &mut Self::State, blocks: &[&Self::Block], prefix: &[u32], capacity: usize) -> Result<(), BackendError>;
}

/// One input's result of a forward.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// The last position's logits over the vocabulary.
    Logits(Vec<f32>),
    /// Only the index of the largest logit, found by the device's own argmax (exact ties,
    /// which real logits practically never have, may resolve to another of the tied indices
    /// than the host's first-maximum pick).
    Argmax(u32),
}

/// A failure that is the server's problem whatever the model calls it: only encoding a request's
/// media can fail because of the request (an input the model cannot take).
fn internal(e: impl std::fmt::Display) -> BackendError {
    BackendError::Internal(e.to_string())
}

/// Media are cached as their cross-attention K/V (every gated layer): a cache hit skips the
/// vision tower, the Perceiver and the K/V projections.
impl Backend for Flamingo {
    type State = SequenceState;
    type Media = MediaKv;
    type Block = KvBlock;

    fn spec(&self) -> ModelSpec {
        ModelSpec {
            vocab_size: self.vocab_size(),
            media_token_id: Some(self.config().media_token_id),
            kv_bytes_per_token: self.kv_bytes_per_token(),
        }
    }

    fn new_state(&self) -> SequenceState {
        Flamingo::new_state(self)
    }

    fn media_depends_on_position(&self) -> bool {
        self.config().perceiver.max_num_media.is_some()
    }

    fn encode(&self, media: &PreparedMedia, position: usize) -> Result<MediaKv, BackendError> {
        let px = media.pixels.unsqueeze(0)?;
        let lat = self.encode_media(&px, position)?;
        Ok(self.media_kv(&lat)?)
    }

    fn media_bytes(&self, media: &MediaKv) -> usize {
        media.bytes()
    }

    fn embed(&self, media: &PreparedMedia) -> Result<Vec<f32>, BackendError> {
        let first = media.pixels.narrow(0, 0, 1)?;
        let e = self.image_embeddings(&first)?.to_vec2::<f32>()?;
        e.into_iter().next().ok_or_else(|| internal("no embedding"))
    }

    fn attach(&self, state: &mut SequenceState, media: &[&MediaKv]) -> Result<(), BackendError> {
        self.attach_media_kv(state, media).map_err(internal)
    }

    fn forward(&self, states: &mut [&mut SequenceState], inputs: &[Input]) -> Result<Vec<Vec<f32>>, BackendError> {
        let logits = Flamingo::forward(self, states, inputs, Logits::Last).map_err(internal)?;
        Ok(logits.to_vec2::<f32>()?)
    }

    fn forward_rows(&self, states: &mut [&mut SequenceState], inputs: &[Input], argmax: &[bool]) -> Result<Vec<Row>, BackendError> {
        let logits = Flamingo::forward(self, states, inputs, Logits::Last).map_err(internal)?;
        // The batched device path (paged K/V; on the CPU device too when it is chosen there)
        // sends a greedy row as 4 bytes instead of the vocabulary's; the CPU's own path has
        // the rows in host memory already.
        if self.kv_pool().is_none() || !argmax.iter().any(|&a| a) {
            return Ok(logits.to_vec2::<f32>()?.into_iter().map(Row::Logits).collect());
        }
        let ids = logits.argmax(1)?.to_vec1::<u32>()?;
        // A row whose argmax is the media token (never generated) comes back whole, for the
        // sequence to pick from the rest.
        let media = self.config().media_token_id;
        let argmax: Vec<bool> = (0..ids.len()).map(|i| argmax.get(i).copied().unwrap_or(false) && ids[i] != media).collect();
        let full: Vec<u32> = (0..argmax.len() as u32).filter(|&i| !argmax[i as usize]).collect();
        let mut rows = if full.is_empty() {
            Vec::new().into_iter()
        } else {
            logits.index_select(&flamingo_model::candle::Tensor::new(full.as_slice(), logits.device())?, 0)?.to_vec2::<f32>()?.into_iter()
        };
        let mut out = Vec::with_capacity(ids.len());
        for (i, id) in ids.into_iter().enumerate() {
            if argmax.get(i).copied().unwrap_or(false) {
                out.push(Row::Argmax(id));
            } else {
                out.push(Row::Logits(rows.next().ok_or_else(|| internal("logit rows missing"))?));
            }
        }
        Ok(out)
    }

    fn score(
        &self,
        states: &mut [&mut SequenceState],
        inputs: &[Input],
        targets: &[&[u32]],
        top: usize,
    ) -> Result<Vec<Vec<TokenEvent>>, BackendError> {
        let logits = Flamingo::forward(self, states, inputs, Logits::All).map_err(internal)?;
        let mut out = Vec::with_capacity(inputs.len());
        let mut start = 0;
        for (input, target) in inputs.iter().zip(targets) {
            let n = input.len();
            if target.len() != n {
                return Err(internal("one target per scored position"));
            }
            let mut rows = Vec::with_capacity(n);
            // A few hundred rows at a time: an echoed prompt's logits need not all be on the host at once.
            for chunk in (0..n).step_by(256) {
                let len = (n - chunk).min(256);
                for (j, row) in logits.narrow(0, start + chunk, len)?.to_vec2::<f32>()?.iter().enumerate() {
                    let id = target[chunk + j];
                    let (logprob, top_logprobs) = flamingo_model::sampling::token_logprobs(row, id, top);
                    rows.push(TokenEvent { id, logprob, top_logprobs });
                }
            }
            start += n;
            out.push(rows);
        }
        Ok(out)
    }

    fn fork(&self, state: &SequenceState) -> Result<SequenceState, BackendError> {
        state.fork().map_err(internal)
    }

    fn state_bytes(&self, state: &SequenceState) -> usize {
        state.kv_bytes() + state.xattn_bytes()
    }

    fn snapshot(&self, state: &SequenceState, start: usize, len: usize, media: usize) -> Result<KvBlock, BackendError> {
        state.kv_block(start, len, media).map_err(internal)
    }

    fn block_bytes(&self, block: &KvBlock) -> usize {
        block.bytes()
    }

    fn block_head(&self, block: &KvBlock, rows: usize, media: usize) -> Option<KvBlock> {
        block.head(rows, media).ok()
    }

    fn restore(&self, state: &mut SequenceState, blocks: &[&KvBlock], prefix: &[u32], capacity: usize) -> Result<(), BackendError> {
        self.restore_prefix(state, blocks, prefix, capacity).map_err(internal)
    }
}

/// A shared model (several schedulers, or a scheduler and a benchmark) behind an `Arc`.
impl<B: Backend + Sync> Backend for std::sync::Arc<B> {
    type State = B::State;
    type Media = B::Media;
    type Block = B::Block;

    fn spec(&self) -> ModelSpec {
        (**self).spec()
    }
    fn new_state(&self) -> Self::State {
        (**self).new_state()
    }
    fn media_depends_on_position(&self) -> bool {
        (**self).media_depends_on_position()
    }
    fn encode(&self, media: &PreparedMedia, position: usize) -> Result<Self::Media, BackendError> {
        (**self).encode(media, position)
    }
    fn media_bytes(&self, media: &Self::Media) -> usize {
        (**self).media_bytes(media)
    }
    fn embed(&self, media: &PreparedMedia) -> Result<Vec<f32>, BackendError> {
        (**self).embed(media)
    }
    fn attach(&self, state: &mut Self::State, media: &[&Self::Media]) -> Result<(), BackendError> {
        (**self).attach(state, media)
    }
    fn forward(&self, states: &mut [&mut Self::State], inputs: &[Input]) -> Result<Vec<Vec<f32>>, BackendError> {
        (**self).forward(states, inputs)
    }
    fn score(
        &self,
        states: &mut [&mut Self::State],
        inputs: &[Input],
        targets: &[&[u32]],
        top: usize,
    ) -> Result<Vec<Vec<TokenEvent>>, BackendError> {
        (**self).score(states, inputs, targets, top)
    }
    fn fork(&self, state: &Self::State) -> Result<Self::State, BackendError> {
        (**self).fork(state)
    }
    fn state_bytes(&self, state: &Self::State) -> usize {
        (**self).state_bytes(state)
    }
    fn snapshot(&self, state: &Self::State, start: usize, len: usize, media: usize) -> Result<Self::Block, BackendError> {
        (**self).snapshot(state, start, len, media)
    }
    fn block_bytes(&self, block: &Self::Block) -> usize {
        (**self).block_bytes(block)
    }
    fn block_head(&self, block: &Self::Block, rows: usize, media: usize) -> Option<Self::Block> {
        (**self).block_head(block, rows, media)
    }
    fn restore(&self, state: &mut Self::State, blocks: &[&Self::Block], prefix: &[u32], capacity: usize) -> Result<(), BackendError> {
        (**self).restore(state, blocks, prefix, capacity)
    }
}
