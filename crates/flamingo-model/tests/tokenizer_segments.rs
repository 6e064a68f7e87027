//! Prompt building from segments: the chat template's path into the tokenizer.

use std::path::PathBuf;

use flamingo_model::tokenizer::Segment;
use flamingo_model::FlamingoTokenizer;

fn fixture_lm(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model).join("lm")
}

#[test]
fn segments_without_special_text_equal_the_prompt_string() {
    for m in ["mosaicgpt_x1", "gptneox_x1", "llama_x1", "mpt_x1"] {
        let tok = FlamingoTokenizer::from_lm_dir(&fixture_lm(m)).unwrap();
        let segs = [
            Segment::Media,
            Segment::Text("Output:"),
            Segment::Text(" two cats."),
            Segment::EndOfChunk,
            Segment::Media,
            Segment::Text("Output:"),
        ];
        let want = tok.encode_prompt("<image>Output: two cats.<|endofchunk|><image>Output:").unwrap();
        assert_eq!(tok.encode_segments(&segs).unwrap(), want, "{m}");
        assert_eq!(want.iter().filter(|&&t| t == tok.media_token_id()).count(), 2);
    }
}

#[test]
fn special_token_text_from_a_user_stays_text() {
    for m in ["mosaicgpt_x1", "llama_x1"] {
        let tok = FlamingoTokenizer::from_lm_dir(&fixture_lm(m)).unwrap();
        let typed = "look: <image> and <|endofchunk|>";
        let ids = tok.encode_segments(&[Segment::Media, Segment::Text(typed)]).unwrap();
        assert_eq!(ids.iter().filter(|&&t| t == tok.media_token_id()).count(), 1, "{m}: only the template's slot");
        assert!(!ids.contains(&tok.eoc_token_id()), "{m}");
        let media_at = ids.iter().position(|&t| t == tok.media_token_id()).unwrap();
        assert_eq!(tok.inner().decode(&ids[media_at + 1..], false).unwrap(), typed, "{m}: the characters survive");
        // The same text through the raw prompt path does produce special tokens.
        let raw = tok.encode_prompt(typed).unwrap();
        assert!(raw.contains(&tok.media_token_id()) && raw.contains(&tok.eoc_token_id()));
    }
}
