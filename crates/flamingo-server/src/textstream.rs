//! Incremental detokenization with stop strings: turns generated ids into text deltas that never
//! show a partial UTF-8 character or any part of a stop string.
//!
//! Each token decodes only a short window of ids (from the last point where the text was
//! complete), not the whole generation, so the cost per token stays constant: the new text is
//! the window's decoding minus the decoding of its already-shown part (the usual incremental
//! scheme; the window's first tokens give decoders their context, e.g. a leading-space rule).

use flamingo_model::FlamingoTokenizer;

/// The byte offset of the earliest occurrence of any of `stops` in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

pub struct TextStream<'a> {
    tok: &'a FlamingoTokenizer,
    stops: Vec<String>,
    /// Longest stop string, in bytes.
    max_stop: usize,
    ids: Vec<u32>,
    /// The decoding window starts here...
    prefix_offset: usize,
    /// ...and its text up to here is already in `text`.
    read_offset: usize,
    /// The whole decoded text so far.
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stopped: bool,
    /// Stop strings apply from this many tokens on (vLLM's `min_tokens`)...
    min_tokens: usize,
    /// ...to text after this byte (what was shown when they started to apply).
    armed_at: Option<usize>,
}

/// What one more token produced.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub text: String,
    /// A stop string appeared: the text ends before it and generation should end.
    pub stop_hit: bool,
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a FlamingoTokenizer, stops: Vec<String>) -> Self {
        let max_stop = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            tok,
            stops,
            max_stop,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            stopped: false,
            min_tokens: 0,
            armed_at: None,
        }
    }

    /// Stop strings are looked for only once `n` tokens are generated, in the text after what
    /// was shown by then (as vLLM skips its stop checks before `min_tokens`).
    pub fn set_min_tokens(&mut self, n: usize) {
        self.min_tokens = n;
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The text handed out so far (the whole answer once generation ended).
    pub fn shown(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// Appends the text the window has completed; `force` also takes an unfinished character.
    fn advance(&mut self, force: bool) -> flamingo_model::Result<usize> {
        let before = self.text.len();
        let prev = self.tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let cur = self.tok.decode(&self.ids[self.prefix_offset..])?;
        if cur.len() > prev.len() && (force || !cur.ends_with('\u{FFFD}')) {
            let start = floor_boundary(&cur, prev.len());
            self.text.push_str(&cur[start..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(before)
    }

    /// Text that can be shown now, given that `text[..before]` was already searched for stops.
    fn deliver(&mut self, before: usize, final_: bool) -> Delta {
        if self.ids.len() < self.min_tokens {
            let out = self.text.get(self.emitted..).map(String::from).unwrap_or_default();
            self.emitted = self.text.len();
            return Delta { text: out, stop_hit: false };
        }
        let armed = *self.armed_at.get_or_insert(self.emitted);
        let from = floor_boundary(&self.text, before.saturating_sub(self.max_stop).max(armed));
        if let Some(pos) = find_stop(&self.text[from..], &self.stops) {
            self.stopped = true;
            let end = from + pos;
            let out = self.text.get(self.emitted..end).map(String::from).unwrap_or_default();
            self.emitted = self.emitted.max(end);
            return Delta { text: out, stop_hit: true };
        }
        let mut safe = self.text.len();
        if !final_ {
            // Hold back a tail that could be the start of a stop string.
            let held = self
                .stops
                .iter()
                .flat_map(|s| s.char_indices().skip(1).map(move |(k, _)| &s[..k]))
                .filter(|p| self.text.ends_with(p))
                .map(str::len)
                .max()
                .unwrap_or(0);
            safe -= held;
        }
        let out = self.text.get(self.emitted..safe).map(String::from).unwrap_or_default();
        self.emitted = self.emitted.max(safe);
        Delta { text: out, stop_hit: false }
    }

    /// Adds a generated id; returns the text that can be shown now.
    pub fn push(&mut self, id: u32) -> flamingo_model::Result<Delta> {
        if self.stopped {
            return Ok(Delta { text: String::new(), stop_hit: true });
        }
        self.ids.push(id);
        let before = self.advance(false)?;
        Ok(self.deliver(before, false))
    }

    /// Generation ended without a stop string: everything not yet shown (an unfinished
    /// character included, as a full decode shows it).
    pub fn finish(&mut self) -> flamingo_model::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let before = self.advance(true)?;
        Ok(self.deliver(before, true).text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(model: &str) -> FlamingoTokenizer {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model).join("lm");
        FlamingoTokenizer::from_lm_dir(&dir).unwrap()
    }

    /// Deterministic pseudo-random ids (byte tokens included, so characters split across tokens).
    fn ids(n: usize, vocab: u32, seed: u32) -> Vec<u32> {
        let mut x = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x % vocab
            })
            .collect()
    }

    #[test]
    fn deltas_add_up_to_the_full_decoding() {
        for model in ["mosaicgpt_x1", "llama_x1"] {
            let t = tok(model);
            for seed in 1..20 {
                let ids = ids(60, 400, seed);
                let mut ts = TextStream::new(&t, vec![]);
                let mut out = String::new();
                for &id in &ids {
                    let d = ts.push(id).unwrap();
                    assert!(!d.stop_hit);
                    out.push_str(&d.text);
                }
                out.push_str(&ts.finish().unwrap());
                assert_eq!(out, t.decode(&ids).unwrap(), "{model} seed {seed}");
            }
        }
    }

    #[test]
    fn stop_strings_cut_at_the_earliest_match_and_never_show() {
        let t = tok("mosaicgpt_x1");
        for seed in 1..20 {
            let ids = ids(60, 400, seed);
            let full = t.decode(&ids).unwrap();
            let chars: Vec<char> = full.chars().collect();
            if chars.len() < 12 {
                continue;
            }
            let stop: String = chars[8..11].iter().collect();
            let want = &full[..full.find(&stop).unwrap()];
            let mut ts = TextStream::new(&t, vec!["never-there".into(), stop.clone()]);
            let mut out = String::new();
            let mut hit = false;
            for &id in &ids {
                let d = ts.push(id).unwrap();
                out.push_str(&d.text);
                assert!(!out.contains(&stop), "seed {seed}: the stop string was shown");
                if d.stop_hit {
                    hit = true;
                    break;
                }
            }
            assert!(hit, "seed {seed}");
            assert_eq!(out, want, "seed {seed}");
        }
    }
}
