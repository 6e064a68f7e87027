//! The prefix KV cache: the self-attention K/V of prompt prefixes, in blocks of `block_size`
//! tokens, so a prompt that starts like an earlier one (few-shot demonstrations, a system
//! prompt, a chat's history) skips recomputing that part.
//!
//! Exactness comes from the masking rule: a token's K/V depend only on the tokens before it and
//! on the images their `<image>` tokens introduce. So a block is keyed by a hash chain
//! ([`PromptBlocks`]): its parent's hash, its token ids and the content keys of the images it
//! introduces. A prompt's last block may be partial (its tail); it is cached too, under a hash
//! that includes its length.
//!
//! A prompt that diverges inside a block reuses the rows it shares with a cached block: every
//! cached block is also indexed under its parent ([`Child`]), and a lookup that runs out of
//! whole blocks takes the cached child with the longest common prefix of tokens and images,
//! cut to that prefix by the caller's `cut` function (the backend owns the block format).
//!
//! Blocks are held in an LRU map bounded by bytes ([`LruBytes`]); a block evicted while a
//! sequence still uses it stays alive for that sequence (blocks are shared `Arc`s).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::cache::{LruBytes, Pinned};
use crate::metrics as m;
use crate::request::MediaKey;

/// The hash of a block and of every block before it.
pub type BlockHash = [u8; 32];

/// The parent of a prompt's first block.
const ROOT: BlockHash = [0; 32];

/// Children kept per parent block (the oldest are forgotten first).
const MAX_CHILDREN: usize = 64;

/// Hash of one block: the previous block's hash, the block's length and token ids, and the keys
/// of the images its `<image>` tokens introduce. With the masking rule this determines the
/// block's K/V exactly.
fn hash_block(prev: &BlockHash, tokens: &[u32], keys: &[MediaKey]) -> BlockHash {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(prev);
    h.update((tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        h.update(t.to_le_bytes());
    }
    for k in keys {
        h.update(k);
    }
    h.finalize().into()
}

/// A prompt cut into blocks: its tokens, its images' keys, and per block the hash chain and the
/// images the block introduces. Built once per request at admission.
pub struct PromptBlocks {
    tokens: Vec<u32>,
    keys: Vec<MediaKey>,
    media_token: Option<u32>,
    block_size: usize,
    /// One per block, the last one possibly partial.
    hashes: Vec<BlockHash>,
    /// The range of `keys` each block introduces.
    media: Vec<Range<usize>>,
}

impl PromptBlocks {
    /// `keys[i]` is the key of the image of the prompt's `i`-th `<image>` token.
    pub fn new(tokens: &[u32], keys: Vec<MediaKey>, media_token: Option<u32>, block_size: usize) -> Self {
        let block_size = block_size.max(1);
        let mut hashes = Vec::with_capacity(tokens.len().div_ceil(block_size));
        let mut media = Vec::with_capacity(hashes.capacity());
        let (mut prev, mut k) = (ROOT, 0);
        for chunk in tokens.chunks(block_size) {
            let n = media_token.map_or(0, |mt| chunk.iter().filter(|&&t| t == mt).count());
            let range = k.min(keys.len())..(k + n).min(keys.len());
            prev = hash_block(&prev, chunk, &keys[range.clone()]);
            hashes.push(prev);
            media.push(range);
            k += n;
        }
        Self { tokens: tokens.to_vec(), keys, media_token, block_size, hashes, media }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    fn tokens_of(&self, b: usize) -> &[u32] {
        let start = b * self.block_size;
        &self.tokens[start..(start + self.block_size).min(self.tokens.len())]
    }

    fn parent_of(&self, b: usize) -> BlockHash {
        if b == 0 {
            ROOT
        } else {
            self.hashes[b - 1]
        }
    }

    /// `<image>` tokens in `tokens[..end]`.
    fn media_before(&self, end: usize) -> usize {
        self.media_token.map_or(0, |mt| self.tokens[..end].iter().filter(|&&t| t == mt).count())
    }
}

/// A cached block as seen from its parent: enough to match a prompt against a prefix of it.
struct Child {
    hash: BlockHash,
    tokens: Vec<u32>,
    keys: Vec<MediaKey>,
}

impl Child {
    /// Rows of this block that `rest` (with `keys`, the images its `<image>` tokens introduce)
    /// shares, and the `<image>` tokens among them.
    fn shared(&self, rest: &[u32], keys: &[MediaKey], media_token: Option<u32>) -> (usize, usize) {
        let (mut rows, mut media) = (0, 0);
        for (a, b) in self.tokens.iter().zip(rest) {
            if a != b {
                break;
            }
            if Some(*a) == media_token {
                if keys.get(media).is_none() || self.keys.get(media) != keys.get(media) {
                    break;
                }
                media += 1;
            }
            rows += 1;
        }
        (rows, media)
    }
}

/// Why [`PrefixCache::pin`] pinned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinError {
    /// The blocks would add this many bytes, more than were free.
    Budget(usize),
    /// A block's K/V could not be copied out of the sequence.
    Snapshot,
}

/// What a lookup found: whole cached blocks, then possibly the head of one more.
pub struct Hit<B> {
    pub blocks: Vec<Arc<B>>,
    /// The shared rows of a cached block that the prompt diverges from (already cut).
    pub head: Option<B>,
    /// Prompt tokens covered.
    pub tokens: usize,
}

impl<B> Hit<B> {
    /// Every block in prompt order.
    pub fn refs(&self) -> Vec<&B> {
        self.blocks.iter().map(|b| b.as_ref()).chain(self.head.as_ref()).collect()
    }
}

/// The prefix KV cache. Records its own metrics (queries, hits, evictions, bytes) under the
/// `prefix` cache label. Pinned blocks (demonstration sets) are looked up first and never
/// evicted; an unpinned block moves to the LRU map.
pub struct PrefixCache<B> {
    blocks: LruBytes<BlockHash, B>,
    pinned: Pinned<BlockHash, B>,
    /// Cached blocks by parent hash ([`ROOT`] for a prompt's first block).
    children: HashMap<BlockHash, Vec<Child>>,
    block_size: usize,
    media_token: Option<u32>,
}

impl<B> PrefixCache<B> {
    /// A cache of `capacity` bytes for prompts whose images are introduced by `media_token`.
    pub fn new(block_size: usize, capacity: usize, media_token: Option<u32>) -> Self {
        Self {
            blocks: LruBytes::new(capacity),
            pinned: Pinned::default(),
            children: HashMap::new(),
            block_size: block_size.max(1),
            media_token,
        }
    }

    /// A block by hash: pinned, else from the LRU map (marked recently used).
    fn get(&mut self, h: &BlockHash) -> Option<Arc<B>> {
        self.pinned.get(h).or_else(|| self.blocks.get(h))
    }

    /// The pinned blocks.
    pub fn pinned(&self) -> &Pinned<BlockHash, B> {
        &self.pinned
    }

    /// Pins every block of `prompt`, one reference each: blocks already pinned gain a
    /// reference, cached ones move out of the LRU map, the others come from `snapshot` (as in
    /// [`Self::donate`]; `None` fails the pin). Adds at most `free` bytes: otherwise nothing
    /// changes and `Err(need)` tells the bytes it would have added. Returns the hashes pinned
    /// (for [`Self::unpin`]) and the bytes added.
    pub fn pin(
        &mut self,
        prompt: &PromptBlocks,
        free: usize,
        mut snapshot: impl FnMut(usize, usize, usize) -> Option<(B, usize)>,
    ) -> Result<(Vec<BlockHash>, usize), PinError> {
        let mut new: Vec<(usize, Arc<B>, usize, bool)> = Vec::new();
        let mut before = Vec::new();
        for (b, hash) in prompt.hashes.iter().enumerate() {
            if self.pinned.contains(hash) {
                before.push(*hash);
                continue;
            }
            if let Some((block, bytes)) = self.blocks.remove(hash) {
                new.push((b, block, bytes, true));
                continue;
            }
            let keys = prompt.media[b].len();
            match snapshot(b * self.block_size, prompt.tokens_of(b).len(), keys) {
                Some((block, bytes)) => new.push((b, Arc::new(block), bytes, false)),
                None => {
                    self.restore_lru(prompt, new);
                    return Err(PinError::Snapshot);
                }
            }
        }
        let need: usize = new.iter().map(|n| n.2).sum();
        if need > free {
            self.restore_lru(prompt, new);
            return Err(PinError::Budget(need));
        }
        for (b, block, bytes, _) in new {
            self.pinned.pin(prompt.hashes[b], block, bytes);
            self.index(prompt, b);
        }
        for hash in before {
            if let Some(block) = self.pinned.get(&hash) {
                self.pinned.pin(hash, block, 0);
            }
        }
        metrics::gauge!(m::CACHE_BYTES, "cache" => m::PREFIX_CACHE).set(self.blocks.bytes() as f64);
        Ok((prompt.hashes.clone(), need))
    }

    /// Puts blocks a failed pin took out of the LRU map back.
    fn restore_lru(&mut self, prompt: &PromptBlocks, taken: Vec<(usize, Arc<B>, usize, bool)>) {
        for (b, block, bytes, from_lru) in taken {
            if from_lru {
                self.blocks.insert(prompt.hashes[b], block, bytes);
            }
        }
    }

    /// Drops one pin reference of each block; a block no longer pinned moves to the LRU map.
    pub fn unpin(&mut self, hashes: &[BlockHash]) {
        for h in hashes {
            if let Some((block, bytes)) = self.pinned.release(h) {
                let evicted = self.blocks.insert(*h, block, bytes);
                metrics::counter!(m::CACHE_EVICTIONS, "cache" => m::PREFIX_CACHE).increment(evicted as u64);
            }
        }
        metrics::gauge!(m::CACHE_BYTES, "cache" => m::PREFIX_CACHE).set(self.blocks.bytes() as f64);
    }

    /// Indexes block `b` of `prompt` under its parent (for partial hits).
    fn index(&mut self, prompt: &PromptBlocks, b: usize) {
        let hash = prompt.hashes[b];
        let kids = self.children.entry(prompt.parent_of(b)).or_default();
        kids.retain(|c| c.hash != hash);
        if kids.len() >= MAX_CHILDREN {
            kids.remove(0);
        }
        let keys = &prompt.keys[prompt.media[b].clone()];
        kids.push(Child { hash, tokens: prompt.tokens_of(b).to_vec(), keys: keys.to_vec() });
    }

    /// Cuts a prompt into this cache's blocks.
    pub fn blocks_of(&self, tokens: &[u32], keys: Vec<MediaKey>) -> PromptBlocks {
        PromptBlocks::new(tokens, keys, self.media_token, self.block_size)
    }

    /// The blocks held (an LRU map by bytes).
    pub fn lru(&self) -> &LruBytes<BlockHash, B> {
        &self.blocks
    }

    /// The longest cached prefix of `prompt[..limit]`: whole blocks while they are cached, then
    /// the shared rows of the cached block (a child of the last whole one) that has the longest
    /// common prefix with the rest. `cut(block, rows, media)` cuts a block to its first `rows`
    /// positions holding `media` `<image>` tokens (`None`: the backend cannot, no partial hit).
    pub fn lookup(&mut self, prompt: &PromptBlocks, limit: usize, cut: impl FnOnce(&B, usize, usize) -> Option<B>) -> Hit<B> {
        let limit = limit.min(prompt.len());
        let mut blocks = Vec::new();
        for h in prompt.hashes.iter().take(limit / self.block_size) {
            metrics::counter!(m::CACHE_QUERIES, "cache" => m::PREFIX_CACHE).increment(1);
            match self.get(h) {
                Some(b) => {
                    metrics::counter!(m::CACHE_HITS, "cache" => m::PREFIX_CACHE).increment(1);
                    blocks.push(b);
                }
                None => break,
            }
        }
        let mut tokens = blocks.len() * self.block_size;
        let parent = prompt.parent_of(blocks.len());
        let rest = &prompt.tokens[tokens..limit];
        let before = prompt.media_before(tokens);
        let rest_keys = &prompt.keys[before.min(prompt.keys.len())..];
        let mut head = None;
        if let Some((hash, rows, media)) = self.best_child(&parent, rest, rest_keys) {
            metrics::counter!(m::CACHE_QUERIES, "cache" => m::PREFIX_CACHE).increment(1);
            if let Some(b) = self.get(&hash).and_then(|b| cut(&b, rows, media)) {
                metrics::counter!(m::CACHE_HITS, "cache" => m::PREFIX_CACHE).increment(1);
                head = Some(b);
                tokens += rows;
            }
        }
        Hit { blocks, head, tokens }
    }

    /// The cached child of `parent` sharing the longest prefix with `rest`: `(hash, rows, media
    /// tokens in those rows)`. Forgets children that were evicted.
    fn best_child(&mut self, parent: &BlockHash, rest: &[u32], keys: &[MediaKey]) -> Option<(BlockHash, usize, usize)> {
        let (blocks, pinned) = (&self.blocks, &self.pinned);
        let kids = self.children.get_mut(parent)?;
        kids.retain(|c| pinned.contains(&c.hash) || blocks.contains(&c.hash));
        let mut best: Option<(BlockHash, usize, usize)> = None;
        for c in kids.iter() {
            let (rows, media) = c.shared(rest, keys, self.media_token);
            if rows > best.map_or(0, |b| b.1) {
                best = Some((c.hash, rows, media));
            }
        }
        if kids.is_empty() {
            self.children.remove(parent);
        }
        best
    }

    /// Offers every block of a prompt whose K/V are now computed (the full ones and the partial
    /// tail). Blocks already cached are marked recently used; the others are taken from
    /// `snapshot(start, len, media)`, which returns the block and its size in bytes (`None`:
    /// not available, skipped). A cache of capacity 0 takes nothing and snapshots nothing.
    pub fn donate(&mut self, prompt: &PromptBlocks, mut snapshot: impl FnMut(usize, usize, usize) -> Option<(B, usize)>) {
        if self.blocks.capacity() == 0 {
            return;
        }
        for (b, hash) in prompt.hashes.iter().enumerate() {
            if self.get(hash).is_some() {
                continue;
            }
            let len = prompt.tokens_of(b).len();
            let Some((block, bytes)) = snapshot(b * self.block_size, len, prompt.media[b].len()) else { continue };
            let evicted = self.blocks.insert(*hash, Arc::new(block), bytes);
            metrics::counter!(m::CACHE_EVICTIONS, "cache" => m::PREFIX_CACHE).increment(evicted as u64);
            self.index(prompt, b);
        }
        metrics::gauge!(m::CACHE_BYTES, "cache" => m::PREFIX_CACHE).set(self.blocks.bytes() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEDIA: u32 = 99;

    fn key(tag: u8) -> MediaKey {
        [tag; 32]
    }

    /// A block is its tokens; cutting keeps the first rows (the signature `lookup` takes).
    #[allow(clippy::ptr_arg)]
    fn cut(b: &Vec<u32>, rows: usize, _media: usize) -> Option<Vec<u32>> {
        Some(b[..rows].to_vec())
    }

    fn donate(c: &mut PrefixCache<Vec<u32>>, p: &PromptBlocks) -> usize {
        let mut taken = 0;
        c.donate(p, |start, len, _| {
            taken += 1;
            Some((p.tokens[start..start + len].to_vec(), len * 4))
        });
        taken
    }

    fn covered(hit: &Hit<Vec<u32>>) -> Vec<u32> {
        hit.refs().into_iter().flatten().copied().collect()
    }

    #[test]
    fn the_chain_depends_on_tokens_order_and_images() {
        let c = PrefixCache::<Vec<u32>>::new(4, 1 << 20, Some(MEDIA));
        let p = |tokens: &[u32], keys: Vec<MediaKey>| c.blocks_of(tokens, keys).hashes;
        let base = p(&[MEDIA, 1, 2, 3, 4, 5], vec![key(1)]);
        assert_eq!(base.len(), 2, "one full block and a partial tail");
        assert_eq!(base, p(&[MEDIA, 1, 2, 3, 4, 5], vec![key(1)]));
        assert_ne!(base[0], p(&[MEDIA, 1, 2, 3, 4, 5], vec![key(2)])[0], "another image under the same tokens");
        let swapped = p(&[MEDIA, 1, 2, 3, 5, 4], vec![key(1)]);
        assert_eq!(base[0], swapped[0]);
        assert_ne!(base[1], swapped[1]);
        // A block's hash covers the blocks before it.
        assert_ne!(base[1], p(&[MEDIA, 9, 2, 3, 4, 5], vec![key(1)])[1]);
        // A partial tail differs from a full block of the same leading tokens.
        assert_ne!(p(&[1, 2, 3, 4], vec![])[0], p(&[1, 2, 3], vec![])[0]);
    }

    #[test]
    fn whole_blocks_then_the_shared_rows_of_a_diverging_block() {
        let mut c = PrefixCache::new(4, 1 << 20, Some(MEDIA));
        let first = c.blocks_of(&[MEDIA, 1, 2, 3, 4, 5, 6, 7, 8, 9], vec![key(1)]);
        assert_eq!(c.lookup(&first, first.len() - 1, cut).tokens, 0, "an empty cache has nothing");
        assert_eq!(donate(&mut c, &first), 3, "two full blocks and the tail");
        // The same prompt: everything but the last token (whose logits are needed).
        let hit = c.lookup(&first, first.len() - 1, cut);
        assert_eq!((hit.blocks.len(), hit.tokens), (2, 9));
        assert_eq!(covered(&hit), vec![MEDIA, 1, 2, 3, 4, 5, 6, 7, 8]);
        // Diverging inside the second block: the first block and the shared row of the second.
        let other = c.blocks_of(&[MEDIA, 1, 2, 3, 4, 0, 0, 0, 0], vec![key(1)]);
        let hit = c.lookup(&other, other.len() - 1, cut);
        assert_eq!((hit.blocks.len(), hit.tokens), (1, 5));
        assert_eq!(covered(&hit), vec![MEDIA, 1, 2, 3, 4]);
        // A cached block is offered again: nothing new is snapshotted.
        assert_eq!(donate(&mut c, &first), 0);
    }

    #[test]
    fn another_image_at_the_same_position_is_not_reused() {
        let mut c = PrefixCache::new(4, 1 << 20, Some(MEDIA));
        let first = c.blocks_of(&[1, 2, MEDIA, 3, 4, 5], vec![key(1)]);
        donate(&mut c, &first);
        let other = c.blocks_of(&[1, 2, MEDIA, 3, 4, 5], vec![key(2)]);
        let hit = c.lookup(&other, other.len() - 1, cut);
        assert_eq!(hit.tokens, 2, "only the rows before the changed image");
        assert_eq!(covered(&hit), vec![1, 2]);
    }

    #[test]
    fn a_backend_that_cannot_cut_gets_whole_blocks_only() {
        let mut c = PrefixCache::new(4, 1 << 20, None);
        let first = c.blocks_of(&[1, 2, 3, 4, 5, 6, 7], vec![]);
        donate(&mut c, &first);
        let other = c.blocks_of(&[1, 2, 3, 4, 5, 0, 0], vec![]);
        let hit = c.lookup(&other, other.len() - 1, |_, _, _| None);
        assert_eq!((hit.blocks.len(), hit.head.is_none(), hit.tokens), (1, true, 4));
    }

    #[test]
    fn eviction_by_bytes_and_a_disabled_cache() {
        // Room for two 4-token blocks of 16 bytes.
        let mut c = PrefixCache::new(4, 32, None);
        let a = c.blocks_of(&[1, 2, 3, 4, 5, 6, 7, 8, 9], vec![]);
        donate(&mut c, &a);
        assert!(c.lru().bytes() <= 32);
        assert_eq!(c.lru().len(), 2);
        assert!(c.lru().evictions() >= 1);
        // The first block was evicted: a lookup finds nothing, and forgets the evicted child.
        let hit = c.lookup(&a, a.len() - 1, cut);
        assert_eq!(hit.tokens, 0);

        let mut off = PrefixCache::new(4, 0, None);
        assert_eq!(donate(&mut off, &a), 0, "a disabled cache snapshots nothing");
        assert_eq!(off.lookup(&a, a.len() - 1, cut).tokens, 0);
    }
}
