//! Chat messages -> prompt -> tokens, through each chat template, from structured input
//! (roles, text with special-token look-alikes, images, videos, assistant turns). What must
//! hold: the template accepts the messages or refuses them with a 4xx, and the prompt's
//! special tokens come only from the template: one `<image>` per image or video, one
//! end-of-chunk token per chunk the template ends, whatever the text says.

use arbitrary::{Arbitrary, Unstructured};
use flamingo_model::tokenizer::Segment;
use flamingo_server::api::ChatMessage;
use flamingo_server::template::ChatTemplate;
use serde_json::{json, Value};

/// Text fragments that look like the tokenizers' special tokens, mixed into the text.
const LOOKALIKES: [&str; 8] =
    ["<image>", "<|endofchunk|>", "<end_of_utterance>", "<fake_token_around_image>", "<|endoftext|>", "</s>", "User:", "\nAssistant:"];

#[derive(Arbitrary, Debug)]
enum Part {
    Text(String),
    Lookalike(u8),
    Image,
    Video(u8),
}

#[derive(Arbitrary, Debug)]
struct Message {
    role: u8,
    /// Content as a plain string (the text of its parts) rather than a list of parts.
    plain: bool,
    parts: Vec<Part>,
}

fn text(p: &Part) -> Option<String> {
    match p {
        Part::Text(t) => Some(t.clone()),
        Part::Lookalike(i) => Some(LOOKALIKES[usize::from(*i) % LOOKALIKES.len()].to_string()),
        _ => None,
    }
}

fn to_json(m: &Message) -> Value {
    let role = ["user", "assistant", "system", "tool"][usize::from(m.role % 4)];
    if m.plain {
        return json!({"role": role, "content": m.parts.iter().filter_map(text).collect::<String>()});
    }
    let parts: Vec<Value> = m
        .parts
        .iter()
        .map(|p| match p {
            Part::Image => json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
            Part::Video(n) => {
                let frames: Vec<&str> = (0..(n % 3) + 1).map(|_| "data:image/png;base64,AAAA").collect();
                json!({"type": "video_url", "video_url": {"url": frames}})
            }
            other => json!({"type": "text", "text": text(other)}),
        })
        .collect();
    json!({"role": role, "content": parts})
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(messages) = Vec::<Message>::arbitrary(&mut u) else { return };
    let values: Vec<Value> = messages.iter().map(to_json).collect();
    let Ok(messages) = serde_json::from_value::<Vec<ChatMessage>>(Value::Array(values)) else { return };
    let tokenizers = crate::request::tokenizers();
    for (template, tokenizer) in
        [(ChatTemplate::OpenFlamingo, tokenizers.0), (ChatTemplate::Idefics, tokenizers.1), (ChatTemplate::IdeficsInstruct, tokenizers.1)]
    {
        let prompt = match template.apply(&messages) {
            Ok(p) => p,
            Err(e) => {
                assert!(e.status.is_client_error(), "{}: {}", e.status, e.message);
                continue;
            }
        };
        let segments = prompt.segments();
        let ids = match tokenizer.encode_segments(&segments) {
            Ok(ids) => ids,
            Err(e) => panic!("{}: a prompt the template made does not tokenize: {e}", template.name()),
        };
        let count = |id: u32| ids.iter().filter(|&&t| t == id).count();
        let media = segments.iter().filter(|s| matches!(s, Segment::Media)).count();
        let chunks = segments.iter().filter(|s| matches!(s, Segment::EndOfChunk)).count();
        assert_eq!(media, prompt.media.len(), "{}: one <image> segment per media item", template.name());
        assert_eq!(count(tokenizer.media_token_id()), media, "{}: <image> ids only from media", template.name());
        assert_eq!(count(tokenizer.eoc_token_id()), chunks, "{}: end-of-chunk ids only from the template", template.name());
    }
}
