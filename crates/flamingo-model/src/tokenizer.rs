//! The text tokenizer with OpenFlamingo's special tokens.
//!
//! As `open_flamingo.create_model_and_transforms` does: add
//! `additional_special_tokens = ["<|endofchunk|>", "<image>"]`, then `<PAD>` as pad token if the
//! base tokenizer has none, appended after the base vocabulary in that order. The ids of
//! `<|endofchunk|>` and `<image>` are the last id of encoding each.

use std::path::{Path, PathBuf};

use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

pub const MEDIA_TOKEN: &str = "<image>";
pub const EOC_TOKEN: &str = "<|endofchunk|>";
pub const PAD_TOKEN: &str = "<PAD>";
/// IDEFICS' marker around each run of images.
pub const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";
/// IDEFICS' instruct models' end of a turn.
pub const END_OF_UTTERANCE_TOKEN: &str = "<end_of_utterance>";

/// A piece of a prompt assembled by a prompt builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Literal text: never turned into special tokens.
    Text(&'a str),
    /// An image slot in the model's form: `<image>` (OpenFlamingo), or
    /// `<fake_token_around_image><image><fake_token_around_image>` (IDEFICS; an image right
    /// after another shares the fake token between them, as IDEFICS' processor writes it).
    Media,
    /// The end of a chunk or turn: `<|endofchunk|>` (OpenFlamingo), `<end_of_utterance>`
    /// (IDEFICS, or its eos when the tokenizer has no `<end_of_utterance>`).
    EndOfChunk,
}

/// A copy of `inner` whose special added tokens are removed (so they are never matched in text),
/// and the removed tokens' contents.
fn literal_tokenizer(inner: &Tokenizer) -> Result<(Tokenizer, Vec<String>)> {
    let err = |e: String| Error::Tokenizer(format!("building the literal-text tokenizer: {e}"));
    let json = inner.to_string(false).map_err(|e| err(e.to_string()))?;
    let mut v: serde_json::Value = serde_json::from_str(&json).map_err(|e| err(e.to_string()))?;
    let mut specials = Vec::new();
    if let Some(added) = v.get_mut("added_tokens").and_then(|a| a.as_array_mut()) {
        added.retain(|t| {
            let special = t.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
            if special {
                if let Some(c) = t.get("content").and_then(|c| c.as_str()) {
                    specials.push(c.to_string());
                }
            }
            !special
        });
    }
    let literal: Tokenizer = v.to_string().parse().map_err(|e: tokenizers::Error| err(e.to_string()))?;
    Ok((literal, specials))
}

pub struct FlamingoTokenizer {
    inner: Tokenizer,
    /// The same tokenizer without its special added tokens: user text encoded with it can never
    /// produce `<image>`, `<|endofchunk|>`, `<|endoftext|>`, ...
    literal: Tokenizer,
    /// Contents of the special added tokens (`<image>`, `<|endofchunk|>`, the base's own).
    specials: Vec<String>,
    media_token_id: u32,
    eoc_token_id: u32,
    pad_token_id: u32,
    eos_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    /// Prompts start with this id whatever the tokenizer's post-processor does (IDEFICS'
    /// processor writes `<s>` itself and encodes without special tokens); `None`: the
    /// post-processor decides (OpenFlamingo's `tokenizer(text)`).
    prompt_bos: Option<u32>,
    /// IDEFICS: `<fake_token_around_image>`, written around each run of images.
    fake_image_token_id: Option<u32>,
}

/// The content of a special-token entry in `tokenizer_config.json` / `special_tokens_map.json`
/// (a string or `{"content": ...}`).
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// `pad_token`, `eos_token` and `bos_token` as `special_tokens_map.json` (first) or
/// `tokenizer_config.json` name them.
fn special_token_names(dir: &Path) -> Result<std::collections::HashMap<String, String>> {
    let mut special = std::collections::HashMap::new();
    for f in ["special_tokens_map.json", "tokenizer_config.json"] {
        if let Some(serde_json::Value::Object(o)) = read_json(&dir.join(f))? {
            for k in ["pad_token", "eos_token", "bos_token"] {
                if let Some(v) = o.get(k).and_then(token_content) {
                    special.entry(k.to_string()).or_insert(v);
                }
            }
        }
    }
    Ok(special)
}

impl FlamingoTokenizer {
    /// Loads `lm_dir/tokenizer.json` and adds OpenFlamingo's tokens.
    pub fn from_lm_dir(lm_dir: &Path) -> Result<Self> {
        let path: PathBuf = lm_dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::file(&path, "file not found (the LM directory needs a fast-tokenizer tokenizer.json)"));
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| Error::file(&path, format!("cannot load tokenizer: {e}")))?;
        let special = special_token_names(lm_dir)?;
        let get = |k: &str| special.get(k).cloned();
        let to_add = [AddedToken::from(EOC_TOKEN, true), AddedToken::from(MEDIA_TOKEN, true)];
        inner.add_special_tokens(&to_add);
        let pad = match get("pad_token").and_then(|p| inner.token_to_id(&p)) {
            Some(id) => id,
            None => {
                inner.add_special_tokens(&[AddedToken::from(PAD_TOKEN, true)]);
                inner.token_to_id(PAD_TOKEN).ok_or_else(|| Error::Tokenizer("could not add <PAD>".into()))?
            }
        };
        let last_id = |t: &Tokenizer, s: &str| -> Result<u32> {
            let enc = t.encode(s, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
            enc.get_ids().last().copied().ok_or_else(|| Error::Tokenizer(format!("{s} encodes to nothing")))
        };
        let media = last_id(&inner, MEDIA_TOKEN)?;
        let eoc = last_id(&inner, EOC_TOKEN)?;
        let eos = get("eos_token").and_then(|t| inner.token_to_id(&t));
        let bos = get("bos_token").and_then(|t| inner.token_to_id(&t));
        let (literal, specials) = literal_tokenizer(&inner)?;
        Ok(Self {
            inner,
            literal,
            specials,
            media_token_id: media,
            eoc_token_id: eoc,
            pad_token_id: pad,
            eos_token_id: eos,
            bos_token_id: bos,
            prompt_bos: None,
            fake_image_token_id: None,
        })
    }

    /// Loads an IDEFICS directory's `tokenizer.json`, whose added tokens already hold
    /// `<fake_token_around_image>` and `<image>` (and `<end_of_utterance>` for the instruct
    /// models): nothing is added. The end of a turn is `<end_of_utterance>` when the tokenizer
    /// has it, else the eos; prompts start with BOS as IDEFICS' processor writes them.
    pub fn from_idefics_dir(dir: &Path) -> Result<Self> {
        let path: PathBuf = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::file(&path, "file not found (an IDEFICS directory needs its fast-tokenizer tokenizer.json)"));
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| Error::file(&path, format!("cannot load tokenizer: {e}")))?;
        let special = special_token_names(dir)?;
        let id = |k: &str, default: &str| inner.token_to_id(special.get(k).map_or(default, String::as_str));
        let media = inner
            .token_to_id(MEDIA_TOKEN)
            .ok_or_else(|| Error::file(&path, format!("the tokenizer has no {MEDIA_TOKEN} token (IDEFICS' image slot)")))?;
        let fake = inner
            .token_to_id(FAKE_IMAGE_TOKEN)
            .ok_or_else(|| Error::file(&path, format!("the tokenizer has no {FAKE_IMAGE_TOKEN} token")))?;
        let eos = id("eos_token", "</s>");
        let bos = id("bos_token", "<s>");
        let eou = inner.token_to_id(END_OF_UTTERANCE_TOKEN);
        let eoc = eou.or(eos).ok_or_else(|| Error::file(&path, "the tokenizer has neither <end_of_utterance> nor an eos token"))?;
        let pad = id("pad_token", "<unk>").or(eos).unwrap_or(0);
        let (literal, specials) = literal_tokenizer(&inner)?;
        Ok(Self {
            inner,
            literal,
            specials,
            media_token_id: media,
            eoc_token_id: eoc,
            pad_token_id: pad,
            eos_token_id: eos,
            bos_token_id: bos,
            prompt_bos: bos,
            fake_image_token_id: Some(fake),
        })
    }

    /// Number of ids including the added tokens (`len(tokenizer)` in Python): the row count of
    /// the resized embeddings.
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn media_token_id(&self) -> u32 {
        self.media_token_id
    }

    /// Whether the tokenizer has `<end_of_utterance>` (IDEFICS' instruct models were trained
    /// with it; HF's processor decides its prompt form by it).
    pub fn has_end_of_utterance(&self) -> bool {
        self.inner.token_to_id(END_OF_UTTERANCE_TOKEN).is_some()
    }

    pub fn eoc_token_id(&self) -> u32 {
        self.eoc_token_id
    }

    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The ids that end a generation: `<|endofchunk|>` (the end of an example in OpenFlamingo's
    /// few-shot format; IDEFICS: `<end_of_utterance>`) and the LM's eos, if it has one.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.eoc_token_id];
        ids.extend(self.eos_token_id.filter(|&e| e != self.eoc_token_id));
        ids
    }

    /// Encodes a Flamingo prompt as the reference does (`tokenizer(text)`): special tokens in the
    /// text (`<image>`, `<|endofchunk|>`) become their ids and the tokenizer's own post-processing
    /// (e.g. LLaMA's BOS) applies.
    ///
    /// For IDEFICS: BOS, then the text with its special tokens recognised, as the processor
    /// encodes `<s>` + text without the post-processor.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(bos) = self.prompt_bos {
            let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
            return Ok(std::iter::once(bos).chain(enc.get_ids().iter().copied()).collect());
        }
        let enc = self.inner.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes a prompt made of literal text and special tokens placed by a prompt builder (a
    /// chat template). When no text segment contains a special token's characters, this is
    /// exactly [`Self::encode_prompt`] of the concatenated string (the same ids `flamingo
    /// generate` gets for that prompt). Otherwise each run of text is encoded with the special
    /// tokens disabled, so a user typing `<image>` gets those characters, never an image slot.
    pub fn encode_segments(&self, segments: &[Segment<'_>]) -> Result<Vec<u32>> {
        let literal_only = segments.iter().all(|s| match s {
            Segment::Text(t) => !self.specials.iter().any(|sp| t.contains(sp.as_str())),
            _ => true,
        });
        if literal_only {
            return self.encode_prompt(&self.render(segments));
        }
        let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        // What the post-processor adds around a prompt (e.g. LLaMA's BOS).
        let mut ids = match self.prompt_bos {
            Some(bos) => vec![bos],
            None => self.inner.encode("", true).map_err(err)?.get_ids().to_vec(),
        };
        let mut run = String::new();
        let flush = |run: &mut String, ids: &mut Vec<u32>| -> Result<()> {
            if !run.is_empty() {
                ids.extend_from_slice(self.literal.encode(run.as_str(), false).map_err(err)?.get_ids());
                run.clear();
            }
            Ok(())
        };
        let mut after_media = false;
        for s in segments {
            match s {
                Segment::Text(t) => run.push_str(t),
                Segment::Media => {
                    flush(&mut run, &mut ids)?;
                    match self.fake_image_token_id {
                        Some(fake) if after_media => ids.extend([self.media_token_id, fake]),
                        Some(fake) => ids.extend([fake, self.media_token_id, fake]),
                        None => ids.push(self.media_token_id),
                    }
                }
                Segment::EndOfChunk => {
                    flush(&mut run, &mut ids)?;
                    ids.push(self.eoc_token_id);
                }
            }
            after_media = matches!(s, Segment::Media);
        }
        flush(&mut run, &mut ids)?;
        Ok(ids)
    }

    /// The prompt string of `segments` in the model's own form (what `flamingo generate
    /// --prompt` takes for the same prompt): image slots and chunk ends as their special tokens.
    pub fn render(&self, segments: &[Segment<'_>]) -> String {
        let token = |id: u32| self.inner.id_to_token(id).unwrap_or_default();
        let mut out = String::new();
        let mut after_media = false;
        for s in segments {
            match s {
                Segment::Text(t) => out.push_str(t),
                Segment::Media => match self.fake_image_token_id {
                    Some(fake) if after_media => out.extend([token(self.media_token_id), token(fake)]),
                    Some(fake) => out.extend([token(fake), token(self.media_token_id), token(fake)]),
                    None => out.push_str(MEDIA_TOKEN),
                },
                Segment::EndOfChunk if self.fake_image_token_id.is_some() => out.push_str(&token(self.eoc_token_id)),
                Segment::EndOfChunk => out.push_str(EOC_TOKEN),
            }
            after_media = matches!(s, Segment::Media);
        }
        out
    }

    /// Encodes a piece of text on its own, without the tokenizer's post-processing (HF's
    /// `tokenizer(text, add_special_tokens=False)`, as OpenFlamingo tokenizes the candidate
    /// answers it ranks): special tokens written in the text are still recognised.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes generated ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// One token's text, special tokens included.
    fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// A token as log-probabilities show it: its label (its text, or `bytes:\xNN...` when it
    /// is not whole UTF-8, part of a character, as OpenAI writes such tokens) and its raw bytes
    /// (a byte-level or byte-fallback token may be part of a character, which its text cannot
    /// show). One decode of the token.
    pub fn token_display(&self, id: u32) -> (String, Vec<u8>) {
        let text = self.token_text(id);
        if !text.contains('\u{FFFD}') {
            let bytes = text.clone().into_bytes();
            return (text, bytes);
        }
        let bytes = self.piece_bytes(id).unwrap_or_else(|| text.into_bytes());
        let label = match std::str::from_utf8(&bytes) {
            Ok(t) => t.to_string(),
            Err(_) => "bytes:".to_string() + &bytes.iter().map(|b| format!("\\x{b:02x}")).collect::<String>(),
        };
        (label, bytes)
    }

    /// The bytes a token's vocabulary piece stands for: `<0xNN>` (byte fallback) or GPT-2's
    /// byte-level alphabet.
    fn piece_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.inner.id_to_token(id)?;
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return Some(vec![b]);
            }
        }
        piece.chars().map(byte_level_inverse).collect()
    }
}

/// The inverse of GPT-2's byte-level alphabet (printable bytes map to themselves, the other 68
/// bytes to U+0100.. in order).
fn byte_level_inverse(c: char) -> Option<u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let cp = c as u32;
    if cp < 256 && printable(cp as u8) {
        return Some(cp as u8);
    }
    let k = cp.checked_sub(256)? as usize;
    (0u8..=255).filter(|&b| !printable(b)).nth(k)
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_level_alphabet_inverts() {
        assert_eq!(super::byte_level_inverse('A'), Some(b'A'));
        assert_eq!(super::byte_level_inverse('\u{0120}'), Some(b' ')); // 'Ġ'
        assert_eq!(super::byte_level_inverse('\u{010A}'), Some(b'\n')); // 'Ċ'
        assert_eq!(super::byte_level_inverse('\u{0100}'), Some(0));
        assert_eq!(super::byte_level_inverse('\u{0143}'), Some(0xAD));
        assert_eq!(super::byte_level_inverse('\u{0144}'), None);
    }
}
