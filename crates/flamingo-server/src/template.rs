//! Chat messages -> an interleaved Flamingo prompt.
//!
//! The `openflamingo` template (the only one so far) turns the natural few-shot chat
//!
//! ```text
//! user: [image, "Output:"]   assistant: "two cats."   user: [image, "Output:"]
//! ```
//!
//! into exactly OpenFlamingo's evaluation format `<image>Output: two cats.<|endofchunk|><image>Output:`:
//! - user, system and developer messages: their parts in order, text verbatim, each image (or
//!   video) as one `<image>` slot; messages are joined without separators;
//! - an assistant message: a space (unless its text starts with whitespace), its text, then
//!   `<|endofchunk|>`; the model's reply ends at the next `<|endofchunk|>`.
//!
//! Text is literal: a user typing `<image>` gets those characters, never an image slot.

use serde_json::Value;

use flamingo_model::tokenizer::Segment;

use crate::api::{ChatMessage, MessageContent};
use crate::error::ApiError;

/// A media item referenced by a chat, in prompt order.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaRef {
    Image(String),
    /// A video given as one animated GIF, whose frames are the video's frames.
    Animation(String),
    /// A video given as one URL per frame, in order.
    Video(Vec<String>),
}

/// A prompt piece before tokenization (owned form of `flamingo_model::tokenizer::Segment`).
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Media,
    EndOfChunk,
}

/// The prompt of a chat: its pieces and media, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPrompt {
    pub pieces: Vec<Piece>,
    pub media: Vec<MediaRef>,
    /// Where each media item is in the request (`messages[i].content[j]`), for errors.
    pub media_params: Vec<String>,
}

impl ChatPrompt {
    /// The pieces as the tokenizer takes them.
    pub fn segments(&self) -> Vec<Segment<'_>> {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => Segment::Text(t),
                Piece::Media => Segment::Media,
                Piece::EndOfChunk => Segment::EndOfChunk,
            })
            .collect()
    }

    /// The prompt as a string (what `flamingo generate --prompt` would take).
    pub fn to_prompt_string(&self) -> String {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Media => flamingo_model::tokenizer::MEDIA_TOKEN,
                Piece::EndOfChunk => flamingo_model::tokenizer::EOC_TOKEN,
            })
            .collect()
    }
}

fn url_of(v: &Value, field: &str, param: &str) -> Result<String, ApiError> {
    match v.get(field) {
        Some(Value::String(u)) => Ok(u.clone()),
        Some(Value::Object(o)) => match o.get("url") {
            Some(Value::String(u)) => Ok(u.clone()),
            _ => Err(ApiError::bad_request(format!("`{field}.url` must be a string")).param(format!("{param}.{field}.url"))),
        },
        _ => Err(ApiError::bad_request(format!("a `{field}` part needs `{field}: {{\"url\": ...}}`")).param(format!("{param}.{field}"))),
    }
}

fn video_of(v: &Value, param: &str) -> Result<MediaRef, ApiError> {
    let bad = || {
        ApiError::bad_request("`video_url.url` must be a URL (an animated GIF) or a list of frame URLs")
            .param(format!("{param}.video_url.url"))
    };
    let inner = match v.get("video_url") {
        Some(Value::Object(o)) => o.get("url").cloned().ok_or_else(bad)?,
        Some(other) => other.clone(),
        None => return Err(bad()),
    };
    match inner {
        Value::String(u) => Ok(MediaRef::Animation(u)),
        Value::Array(a) if !a.is_empty() => {
            Ok(MediaRef::Video(a.into_iter().map(|x| x.as_str().map(String::from).ok_or_else(bad)).collect::<Result<_, _>>()?))
        }
        _ => Err(bad()),
    }
}

/// Applies the `openflamingo` template.
pub fn openflamingo(messages: &[ChatMessage]) -> Result<ChatPrompt, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("`messages` must not be empty").param("messages"));
    }
    let mut pieces = Vec::new();
    let mut media = Vec::new();
    let mut media_params = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        match m.role.as_str() {
            "user" | "system" | "developer" => match &m.content {
                None => {
                    return Err(ApiError::bad_request(format!("a {} message needs `content`", m.role)).param(format!("{param}.content")))
                }
                Some(MessageContent::Text(t)) => pieces.push(Piece::Text(t.clone())),
                Some(MessageContent::Parts(parts)) => {
                    for (j, p) in parts.iter().enumerate() {
                        let pp = format!("{param}.content[{j}]");
                        match p.get("type").and_then(Value::as_str) {
                            Some("text") => match p.get("text") {
                                Some(Value::String(t)) => pieces.push(Piece::Text(t.clone())),
                                _ => return Err(ApiError::bad_request("a `text` part needs a string `text`").param(format!("{pp}.text"))),
                            },
                            Some("image_url") => {
                                media.push(MediaRef::Image(url_of(p, "image_url", &pp)?));
                                media_params.push(pp.clone());
                                pieces.push(Piece::Media);
                            }
                            Some("video_url") => {
                                media.push(video_of(p, &pp)?);
                                media_params.push(pp.clone());
                                pieces.push(Piece::Media);
                            }
                            Some(other) => {
                                return Err(ApiError::bad_request(format!(
                                    "unsupported content part type `{other}` (this model takes `text`, `image_url` and `video_url`)"
                                ))
                                .param(format!("{pp}.type")))
                            }
                            None => {
                                return Err(ApiError::bad_request("each content part needs a string `type`").param(format!("{pp}.type")))
                            }
                        }
                    }
                }
            },
            "assistant" => {
                let text = match &m.content {
                    None => String::new(),
                    Some(MessageContent::Text(t)) => t.clone(),
                    Some(MessageContent::Parts(parts)) => {
                        let mut t = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                                (Some("text"), Some(s)) => t.push_str(s),
                                _ => {
                                    return Err(ApiError::bad_request("assistant messages may only hold text parts")
                                        .param(format!("{param}.content[{j}]")))
                                }
                            }
                        }
                        t
                    }
                };
                if !text.starts_with(char::is_whitespace) {
                    pieces.push(Piece::Text(" ".into()));
                }
                pieces.push(Piece::Text(text));
                pieces.push(Piece::EndOfChunk);
            }
            other => {
                return Err(ApiError::bad_request(format!("unsupported role `{other}` (use system, developer, user or assistant)"))
                    .param(format!("{param}.role")))
            }
        }
    }
    Ok(ChatPrompt { pieces, media, media_params })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(v: Value) -> Vec<ChatMessage> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn few_shot_chat_gives_the_reference_format() {
        let m = msgs(serde_json::json!([
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:a"}}, {"type": "text", "text": "Output:"}]},
            {"role": "assistant", "content": "two cats."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:b", "detail": "low"}}, {"type": "text", "text": "Output:"}]},
        ]));
        let p = openflamingo(&m).unwrap();
        assert_eq!(p.to_prompt_string(), "<image>Output: two cats.<|endofchunk|><image>Output:");
        assert_eq!(p.media, vec![MediaRef::Image("data:a".into()), MediaRef::Image("data:b".into())]);
    }

    #[test]
    fn typed_special_tokens_stay_text() {
        let m = msgs(serde_json::json!([{"role": "user", "content": "<image> hi"}]));
        let p = openflamingo(&m).unwrap();
        assert_eq!(p.pieces, vec![Piece::Text("<image> hi".into())]);
        assert!(p.media.is_empty());
    }

    #[test]
    fn bad_parts_and_roles_name_the_param() {
        let cases = [
            (serde_json::json!([{"role": "user", "content": [{"type": "input_audio"}]}]), "messages[0].content[0].type"),
            (serde_json::json!([{"role": "tool", "content": "x"}]), "messages[0].role"),
            (serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content[0].image_url"),
            (
                serde_json::json!([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                "messages[0].content[0]",
            ),
        ];
        for (v, param) in cases {
            let e = openflamingo(&msgs(v)).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(param));
        }
        assert!(openflamingo(&[]).is_err());
    }

    #[test]
    fn video_forms() {
        let m = msgs(serde_json::json!([{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": ["data:1", "data:2"]}},
            {"type": "video_url", "video_url": {"url": "data:gif"}}]}]));
        let p = openflamingo(&m).unwrap();
        assert_eq!(p.media, vec![MediaRef::Video(vec!["data:1".into(), "data:2".into()]), MediaRef::Animation("data:gif".into())]);
    }
}
