//! Incremental detokenization with stop strings: turns generated ids into text deltas that never
//! show a partial UTF-8 character or any part of a stop string.

use flamingo_model::generate::find_stop;
use flamingo_model::FlamingoTokenizer;

pub struct TextStream<'a> {
    tok: &'a FlamingoTokenizer,
    stops: Vec<String>,
    ids: Vec<u32>,
    /// Bytes of the text already handed out.
    emitted: usize,
    stopped: bool,
}

/// What one more token produced.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub text: String,
    /// A stop string appeared: the text ends before it and generation should end.
    pub stop_hit: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a FlamingoTokenizer, stops: Vec<String>) -> Self {
        Self { tok, stops, ids: Vec::new(), emitted: 0, stopped: false }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn take(&mut self, text: &str, upto: usize) -> String {
        let out = text.get(self.emitted..upto).map(String::from).unwrap_or_default();
        self.emitted = self.emitted.max(upto);
        out
    }

    /// Adds a generated id; returns the text that can be shown now.
    pub fn push(&mut self, id: u32) -> flamingo_model::Result<Delta> {
        if self.stopped {
            return Ok(Delta { text: String::new(), stop_hit: true });
        }
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if let Some(pos) = find_stop(&text, &self.stops) {
            self.stopped = true;
            return Ok(Delta { text: self.take(&text, pos), stop_hit: true });
        }
        // Hold back an unfinished character and any tail that could start a stop string.
        let mut safe = text.len();
        if text.ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
        let held = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(k, _)| &s[..k]))
            .filter(|p| text[..safe].ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        safe -= held;
        Ok(Delta { text: self.take(&text, safe), stop_hit: false })
    }

    /// Generation ended without a stop string: everything not yet shown.
    pub fn finish(&mut self) -> flamingo_model::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = self.tok.decode(&self.ids)?;
        let end = text.len();
        Ok(self.take(&text, end))
    }
}
