//! Fault injection for tests (feature `fault-injection`): a [`Backend`] wrapper that panics
//! inside the model when a sequence's new tokens contain a chosen id, so a test can check that
//! a panic inside the engine fails the requests it was running with a 500, is logged and
//! counted, and leaves the engine serving everyone else. Not part of a production build.

use flamingo_model::Input;

use crate::backend::{Backend, Row};
use crate::error::BackendError;
use crate::request::{ModelSpec, PreparedMedia, TokenEvent};

/// `B`, except that a forward (or a scoring pass) over the token `trigger` panics.
pub struct PanicOnToken<B> {
    pub inner: B,
    pub trigger: u32,
}

impl<B> PanicOnToken<B> {
    fn check(&self, inputs: &[Input]) {
        let hit = inputs.iter().any(|i| match i {
            Input::Prompt(t) => t.contains(&self.trigger),
            Input::Generated(t) => *t == self.trigger,
        });
        if hit {
            panic!("fault injection: token {} reached the model", self.trigger);
        }
    }
}

impl<B: Backend> Backend for PanicOnToken<B> {
    type State = B::State;
    type Media = B::Media;
    type Block = B::Block;

    fn spec(&self) -> ModelSpec {
        self.inner.spec()
    }
    fn new_state(&self) -> Self::State {
        self.inner.new_state()
    }
    fn media_depends_on_position(&self) -> bool {
        self.inner.media_depends_on_position()
    }
    fn encode(&self, media: &PreparedMedia, position: usize) -> Result<Self::Media, BackendError> {
        self.inner.encode(media, position)
    }
    fn media_bytes(&self, media: &Self::Media) -> usize {
        self.inner.media_bytes(media)
    }
    fn embed(&self, media: &PreparedMedia) -> Result<Vec<f32>, BackendError> {
        self.inner.embed(media)
    }
    fn attach(&self, state: &mut Self::State, media: &[&Self::Media]) -> Result<(), BackendError> {
        self.inner.attach(state, media)
    }
    fn forward(&self, states: &mut [&mut Self::State], inputs: &[Input]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.check(inputs);
        self.inner.forward(states, inputs)
    }
    fn forward_rows(&self, states: &mut [&mut Self::State], inputs: &[Input], argmax: &[bool]) -> Result<Vec<Row>, BackendError> {
        self.check(inputs);
        self.inner.forward_rows(states, inputs, argmax)
    }
    fn score(
        &self,
        states: &mut [&mut Self::State],
        inputs: &[Input],
        targets: &[&[u32]],
        top: usize,
    ) -> Result<Vec<Vec<TokenEvent>>, BackendError> {
        self.check(inputs);
        self.inner.score(states, inputs, targets, top)
    }
    fn fork(&self, state: &Self::State) -> Result<Self::State, BackendError> {
        self.inner.fork(state)
    }
    fn state_bytes(&self, state: &Self::State) -> usize {
        self.inner.state_bytes(state)
    }
    fn snapshot(&self, state: &Self::State, start: usize, len: usize, media: usize) -> Result<Self::Block, BackendError> {
        self.inner.snapshot(state, start, len, media)
    }
    fn block_bytes(&self, block: &Self::Block) -> usize {
        self.inner.block_bytes(block)
    }
    fn block_head(&self, block: &Self::Block, rows: usize, media: usize) -> Option<Self::Block> {
        self.inner.block_head(block, rows, media)
    }
    fn restore(&self, state: &mut Self::State, blocks: &[&Self::Block], prefix: &[u32], capacity: usize) -> Result<(), BackendError> {
        self.inner.restore(state, blocks, prefix, capacity)
    }
}
