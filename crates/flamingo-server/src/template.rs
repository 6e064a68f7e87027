//! Chat messages -> an interleaved Flamingo prompt, by the template the model chose
//! ([`ChatTemplate`]). Image slots are written in the model's own form by the tokenizer
//! (`<image>`; IDEFICS: `<fake_token_around_image><image><fake_token_around_image>`).
//!
//! The `openflamingo` template turns the natural few-shot chat
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
//! `idefics_instruct` (idefics-9b-instruct, idefics-80b-instruct, as their model card and HF's
//! processor examples write it): turns joined by `\n`, a user turn `User:` + its parts (a space
//! before a text that comes first) + `<end_of_utterance>`, an assistant turn `Assistant: ` +
//! its text + `<end_of_utterance>`, a system message its text as is; the prompt ends with
//! `\nAssistant:` and the reply at `<end_of_utterance>`.
//!
//! `idefics` (the base models): plain interleaving, as OBELICS documents read: user and system
//! parts verbatim, an assistant turn a space (unless its text starts with whitespace), its text
//! and a newline; no special tokens but the images.
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

/// How chat messages become a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    OpenFlamingo,
    Idefics,
    IdeficsInstruct,
}

impl ChatTemplate {
    /// The names `[model] chat_template` takes (`"auto"`: the model's own, see [`Self::for_model`]).
    pub const NAMES: &'static str = "\"auto\", \"openflamingo\", \"idefics\" or \"idefics_instruct\"";

    /// A template by name; `auto` is `None` (the model decides).
    pub fn from_name(name: &str) -> Result<Option<Self>, String> {
        Ok(Some(match name {
            "auto" => return Ok(None),
            "openflamingo" => Self::OpenFlamingo,
            "idefics" => Self::Idefics,
            "idefics_instruct" => Self::IdeficsInstruct,
            other => return Err(format!("unknown chat template `{other}` (use {})", Self::NAMES)),
        }))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::OpenFlamingo => "openflamingo",
            Self::Idefics => "idefics",
            Self::IdeficsInstruct => "idefics_instruct",
        }
    }

    /// The template a model was trained with: OpenFlamingo's few-shot format, IDEFICS' instruct
    /// turns when its tokenizer has `<end_of_utterance>` (as HF's processor decides), else
    /// IDEFICS' plain interleaving.
    pub fn for_model(family: flamingo_model::ModelFamily, has_end_of_utterance: bool) -> Self {
        match family {
            flamingo_model::ModelFamily::OpenFlamingo => Self::OpenFlamingo,
            flamingo_model::ModelFamily::Idefics if has_end_of_utterance => Self::IdeficsInstruct,
            flamingo_model::ModelFamily::Idefics => Self::Idefics,
        }
    }

    /// Applies the template.
    pub fn apply(self, messages: &[ChatMessage]) -> Result<ChatPrompt, ApiError> {
        let turns = parse(messages)?;
        let mut pieces = Vec::new();
        let mut media = Vec::new();
        let mut media_params = Vec::new();
        let last = turns.len().saturating_sub(1);
        for (i, t) in turns.into_iter().enumerate() {
            media.extend(t.media);
            media_params.extend(t.media_params);
            match (self, t.role) {
                (Self::OpenFlamingo | Self::Idefics, Role::User) => pieces.extend(t.parts),
                (Self::OpenFlamingo | Self::Idefics, Role::Assistant(text)) => {
                    if !text.starts_with(char::is_whitespace) {
                        pieces.push(Piece::Text(" ".into()));
                    }
                    pieces.push(Piece::Text(text));
                    pieces.push(if self == Self::OpenFlamingo { Piece::EndOfChunk } else { Piece::Text("\n".into()) });
                }
                (Self::IdeficsInstruct, role) => {
                    if i > 0 {
                        pieces.push(Piece::Text("\n".into()));
                    }
                    match role {
                        Role::User if t.system => pieces.extend(t.parts),
                        Role::User => {
                            pieces.push(Piece::Text("User:".into()));
                            if matches!(t.parts.first(), Some(Piece::Text(s)) if !s.starts_with(char::is_whitespace)) {
                                pieces.push(Piece::Text(" ".into()));
                            }
                            pieces.extend(t.parts);
                            pieces.push(Piece::EndOfChunk);
                        }
                        Role::Assistant(text) => {
                            pieces.push(Piece::Text("Assistant:".into()));
                            if !text.starts_with(char::is_whitespace) {
                                pieces.push(Piece::Text(" ".into()));
                            }
                            pieces.push(Piece::Text(text));
                            pieces.push(Piece::EndOfChunk);
                        }
                    }
                    if i == last {
                        pieces.push(Piece::Text("\nAssistant:".into()));
                    }
                }
            }
        }
        Ok(ChatPrompt { pieces, media, media_params })
    }
}

/// One message, parsed: its role, its prompt pieces and media.
struct Turn {
    role: Role,
    /// A system or developer message (a user-side turn that is not the user's).
    system: bool,
    parts: Vec<Piece>,
    media: Vec<MediaRef>,
    media_params: Vec<String>,
}

enum Role {
    User,
    Assistant(String),
}

/// Applies the `openflamingo` template.
pub fn openflamingo(messages: &[ChatMessage]) -> Result<ChatPrompt, ApiError> {
    ChatTemplate::OpenFlamingo.apply(messages)
}

fn parse(messages: &[ChatMessage]) -> Result<Vec<Turn>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("`messages` must not be empty").param("messages"));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        let mut pieces = Vec::new();
        let mut media = Vec::new();
        let mut media_params = Vec::new();
        let role = match m.role.as_str() {
            "user" | "system" | "developer" => match &m.content {
                None => {
                    return Err(ApiError::bad_request(format!("a {} message needs `content`", m.role)).param(format!("{param}.content")))
                }
                Some(MessageContent::Text(t)) => {
                    pieces.push(Piece::Text(t.clone()));
                    Role::User
                }
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
                    Role::User
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
                Role::Assistant(text)
            }
            other => {
                return Err(ApiError::bad_request(format!("unsupported role `{other}` (use system, developer, user or assistant)"))
                    .param(format!("{param}.role")))
            }
        };
        let system = matches!(m.role.as_str(), "system" | "developer");
        turns.push(Turn { role, system, parts: pieces, media, media_params });
    }
    Ok(turns)
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

    /// The instruct form of idefics-9b-instruct's model card; the base form plain.
    #[test]
    fn idefics_templates() {
        let m = msgs(serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": "data:a"}}]},
            {"role": "assistant", "content": "a cat."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:b"}}, {"type": "text", "text": "And this?"}]},
        ]));
        let show = |p: &ChatPrompt| -> String {
            p.pieces
                .iter()
                .map(|x| match x {
                    Piece::Text(t) => t.clone(),
                    Piece::Media => "[img]".into(),
                    Piece::EndOfChunk => "[eou]".into(),
                })
                .collect()
        };
        let p = ChatTemplate::IdeficsInstruct.apply(&m).unwrap();
        assert_eq!(show(&p), "Be brief.\nUser: What is it?[img][eou]\nAssistant: a cat.[eou]\nUser:[img]And this?[eou]\nAssistant:");
        assert_eq!(p.media, vec![MediaRef::Image("data:a".into()), MediaRef::Image("data:b".into())]);
        let p = ChatTemplate::Idefics.apply(&m).unwrap();
        assert_eq!(show(&p), "Be brief.What is it?[img] a cat.\n[img]And this?");
        assert_eq!(
            ChatTemplate::OpenFlamingo.apply(&m).unwrap().to_prompt_string(),
            "Be brief.What is it?<image> a cat.<|endofchunk|><image>And this?"
        );
        for t in [ChatTemplate::OpenFlamingo, ChatTemplate::Idefics, ChatTemplate::IdeficsInstruct] {
            assert_eq!(ChatTemplate::from_name(t.name()), Ok(Some(t)));
        }
        assert_eq!(ChatTemplate::from_name("auto"), Ok(None));
        assert!(ChatTemplate::from_name("chatml").unwrap_err().contains("idefics_instruct"));
        use flamingo_model::ModelFamily::{Idefics, OpenFlamingo};
        assert_eq!(ChatTemplate::for_model(OpenFlamingo, true), ChatTemplate::OpenFlamingo);
        assert_eq!(ChatTemplate::for_model(Idefics, true), ChatTemplate::IdeficsInstruct);
        assert_eq!(ChatTemplate::for_model(Idefics, false), ChatTemplate::Idefics);
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
