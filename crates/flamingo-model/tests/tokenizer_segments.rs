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

/// IDEFICS: image slots are `<fake_token_around_image><image><fake_token_around_image>`, an image
/// right after another sharing the fake token between them (as `IdeficsProcessor` writes them);
/// chunk ends are `<end_of_utterance>`; BOS first; typed special tokens stay text.
#[test]
fn idefics_segments_are_written_in_the_models_own_form() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics/idefics_x1");
    let tok = FlamingoTokenizer::from_idefics_dir(&dir).unwrap();
    let (f, i, e) = ("<fake_token_around_image>", "<image>", "<end_of_utterance>");
    let segs =
        [Segment::Text("a"), Segment::Media, Segment::Media, Segment::Text(" b"), Segment::EndOfChunk, Segment::Media, Segment::Text("c")];
    let want = format!("a{f}{i}{f}{i}{f} b{e}{f}{i}{f}c");
    assert_eq!(tok.render(&segs), want);
    let ids = tok.encode_segments(&segs).unwrap();
    assert_eq!(ids, tok.encode_prompt(&want).unwrap());
    assert_eq!(ids.first().copied(), tok.bos_token_id(), "BOS first");
    assert_eq!(ids.iter().filter(|&&t| t == tok.media_token_id()).count(), 3);
    // The same segments with a text that spells the tokens: the typed text gets no special ids.
    let typed = format!("{f}{i}{e}");
    let with_text = [Segment::Text(typed.as_str()), Segment::Media, Segment::Media];
    let ids = tok.encode_segments(&with_text).unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == tok.media_token_id()).count(), 2, "only the two real images");
    assert!(!ids.contains(&tok.eoc_token_id()), "typed <end_of_utterance> stays text");
    let fake = tok.inner().token_to_id(f).unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == fake).count(), 3, "the two images share the fake token between them");
    assert_eq!(tok.stop_token_ids(), vec![tok.eoc_token_id(), tok.eos_token_id().unwrap()]);
}
