//! Properties of the request path, checked on generated inputs (proptest; a few hundred cases
//! per property on every `cargo test`, a failing case shrunk and recorded in
//! `proptest-regressions/`):
//!
//! - a `data:` URL gives back exactly the bytes encoded in it, in either base64 alphabet, with
//!   or without padding and whitespace, and nothing past the size limit;
//! - a chat prompt's special tokens come only from the template, whatever the text says, and
//!   its text comes back unchanged when decoded;
//! - the generation parameters are a plan within the limits or a 400 naming the parameter;
//! - streamed text adds up to the full decoding and never shows a stop string;
//! - an image file's pixels come back exactly (PNG, any size within the limits).

use std::sync::OnceLock;

use base64::Engine as _;
use flamingo_model::FlamingoTokenizer;
use flamingo_server::api::{ChatMessage, GenParams};
use flamingo_server::fetch::{FetchConfig, FetchError, Fetcher};
use flamingo_server::template::ChatTemplate;
use flamingo_server::textstream::TextStream;
use flamingo_server::validate::{plan, Bounds, Kind};
use proptest::prelude::*;
use serde_json::{json, Value};

const LIMIT: usize = 4096;

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// flamingo-mini's tokenizer (the default model's).
fn tokenizer() -> &'static FlamingoTokenizer {
    static T: OnceLock<FlamingoTokenizer> = OnceLock::new();
    T.get_or_init(|| FlamingoTokenizer::from_lm_dir(&repo().join("models/flamingo-mini/lm")).expect("tokenizer"))
}

fn fetch(url: &str) -> Result<Vec<u8>, FetchError> {
    static F: OnceLock<(Fetcher, tokio::runtime::Runtime)> = OnceLock::new();
    let (fetcher, rt) = F.get_or_init(|| {
        let f = Fetcher::new(FetchConfig { allow_http: false, max_bytes: LIMIT, ..FetchConfig::default() }).expect("fetcher");
        (f, tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
    });
    rt.block_on(fetcher.fetch(url))
}

/// Inserts whitespace (spaces, newlines, tabs) at the given positions.
fn sprinkle(s: &str, at: &[(usize, u8)]) -> String {
    let mut out: Vec<char> = s.chars().collect();
    for &(i, w) in at {
        let pos = i % (out.len() + 1);
        out.insert(pos, [' ', '\n', '\t', '\r'][usize::from(w % 4)]);
    }
    out.into_iter().collect()
}

/// Text with the special tokens' look-alikes mixed in.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z0-9 .,:!?é中\n]{0,12}",
        Just("<image>".to_string()),
        Just("<|endofchunk|>".to_string()),
        Just("<|endoftext|>".to_string()),
        Just("Output:".to_string()),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Image,
}

fn turn() -> impl Strategy<Value = (bool, Vec<Part>)> {
    let part = prop_oneof![text().prop_map(Part::Text), Just(Part::Image)];
    (any::<bool>(), prop::collection::vec(part, 1..4))
}

fn messages_json(turns: &[(bool, Vec<Part>)]) -> Value {
    Value::Array(
        turns
            .iter()
            .map(|(assistant, parts)| {
                if *assistant {
                    let t: String = parts.iter().map(|p| if let Part::Text(t) = p { t.as_str() } else { "" }).collect();
                    json!({"role": "assistant", "content": t})
                } else {
                    let content: Vec<Value> = parts
                        .iter()
                        .map(|p| match p {
                            Part::Text(t) => json!({"type": "text", "text": t}),
                            Part::Image => json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
                        })
                        .collect();
                    json!({"role": "user", "content": content})
                }
            })
            .collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn data_urls_give_back_their_bytes(
        bytes in prop::collection::vec(any::<u8>(), 1..LIMIT + 64),
        url_safe in any::<bool>(),
        padded in any::<bool>(),
        spaces in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        media in prop_oneof![Just("image/png"), Just("IMAGE/JPEG"), Just(""), Just("application/octet-stream")],
    ) {
        let engine = match (url_safe, padded) {
            (false, true) => base64::engine::general_purpose::STANDARD,
            (false, false) => base64::engine::general_purpose::STANDARD_NO_PAD,
            (true, true) => base64::engine::general_purpose::URL_SAFE,
            (true, false) => base64::engine::general_purpose::URL_SAFE_NO_PAD,
        };
        let payload = sprinkle(&engine.encode(&bytes), &spaces);
        let got = fetch(&format!("data:{media};base64,{payload}"));
        if bytes.len() <= LIMIT {
            prop_assert_eq!(got.ok(), Some(bytes));
        } else {
            prop_assert!(matches!(got, Err(FetchError::TooLarge { limit: LIMIT })), "{:?}", got.err());
        }
    }

    #[test]
    fn any_data_url_is_bytes_or_the_clients_mistake(rest in ".{0,200}") {
        match fetch(&format!("data:{rest}")) {
            Ok(b) => prop_assert!(b.len() <= LIMIT),
            Err(e) => prop_assert!(!e.is_config_error(), "{e}"),
        }
    }

    #[test]
    fn special_tokens_come_only_from_the_template(turns in prop::collection::vec(turn(), 1..5)) {
        let messages: Vec<ChatMessage> = serde_json::from_value(messages_json(&turns)).expect("messages");
        let t = tokenizer();
        match ChatTemplate::OpenFlamingo.apply(&messages) {
            Err(e) => prop_assert!(e.status.is_client_error(), "{}", e.message),
            Ok(prompt) => {
                let ids = t.encode_segments(&prompt.segments()).expect("tokenizes");
                let images = turns.iter().filter(|(a, _)| !a).flat_map(|(_, p)| p).filter(|p| matches!(p, Part::Image)).count();
                let assistant = turns.iter().filter(|(a, _)| *a).count();
                let count = |id: u32| ids.iter().filter(|&&x| x == id).count();
                prop_assert_eq!(count(t.media_token_id()), images);
                prop_assert_eq!(count(t.eoc_token_id()), assistant);
                // The text is kept as typed: decoding (special tokens dropped) gives the prompt
                // with its special tokens' places empty.
                let want = prompt.segments().iter().map(|s| match s {
                    flamingo_model::tokenizer::Segment::Text(x) => *x,
                    _ => "",
                }).collect::<String>();
                let specials = [t.media_token_id(), t.eoc_token_id()];
                let text_ids: Vec<u32> = ids.iter().copied().filter(|i| !specials.contains(i)).collect();
                prop_assert_eq!(t.decode(&text_ids).expect("decodes"), want);
            }
        }
    }

    #[test]
    fn generation_parameters_are_a_plan_within_the_limits_or_a_400_naming_one(
        max_tokens in prop::option::of(-5i64..3000),
        temperature in prop::option::of(-1.0f64..3.0),
        top_p in prop::option::of(-0.5f64..1.5),
        top_k in prop::option::of(-3i64..100),
        n in prop::option::of(0u64..12),
        num_beams in prop::option::of(0u64..12),
        min_tokens in prop::option::of(0u64..2000),
        stops in prop::option::of(prop::collection::vec("[a-z]{0,3}", 0..12)),
        logprobs in prop::option::of(0usize..30),
        chat in any::<bool>(),
    ) {
        let mut body = json!({});
        let fields = [
            ("max_tokens", max_tokens.map(Value::from)),
            ("temperature", temperature.map(Value::from)),
            ("top_p", top_p.map(Value::from)),
            ("top_k", top_k.map(Value::from)),
            ("n", n.map(Value::from)),
            ("num_beams", num_beams.map(Value::from)),
            ("min_tokens", min_tokens.map(Value::from)),
            ("stop", stops.map(Value::from)),
        ];
        for (k, v) in fields.iter() {
            if let Some(v) = v {
                body[*k] = v.clone();
            }
        }
        let Ok(params) = serde_json::from_value::<GenParams>(body.clone()) else {
            // Negative counts are not integers of the field's type: refused when parsed.
            return Ok(());
        };
        let limits = flamingo_server::config::Config::defaults().limits;
        let kind = if chat { Kind::Chat } else { Kind::Completion };
        match plan(&params, kind, logprobs, &Bounds::of(&limits)) {
            Ok(p) => {
                prop_assert!(p.max_new >= 1 && p.max_new <= limits.max_tokens);
                prop_assert!(p.min_new <= p.max_new);
                prop_assert!(!p.choices.is_empty() && p.choices.len() <= limits.max_n);
                prop_assert!(p.stops.len() <= limits.max_stop);
            }
            Err(e) => {
                prop_assert_eq!(e.status.as_u16(), 400);
                let param = e.param.clone().unwrap_or_default();
                let named = body.get(param.as_str()).is_some() || ["top_logprobs", "logprobs"].contains(&param.as_str());
                prop_assert!(named, "{} names `{}`, not in {}", e.message, param, body);
            }
        }
    }

    #[test]
    fn streamed_text_adds_up_and_never_shows_a_stop_string(
        ids in prop::collection::vec(0u32..2000, 1..80),
        stop_at in prop::option::of((0usize..200, 1usize..4)),
    ) {
        let t = tokenizer();
        let ids: Vec<u32> = ids.into_iter().filter(|&i| (i as usize) < t.len()).collect();
        let full = t.decode(&ids).expect("decodes");
        let chars: Vec<char> = full.chars().collect();
        let stop = stop_at.filter(|&(at, len)| at + len <= chars.len()).map(|(at, len)| chars[at..at + len].iter().collect::<String>());
        let mut ts = TextStream::new(t, stop.iter().cloned().collect());
        let mut shown = String::new();
        let mut hit = false;
        for &id in &ids {
            let d = ts.push(id).expect("push");
            shown.push_str(&d.text);
            if d.stop_hit {
                hit = true;
                break;
            }
        }
        if !hit {
            shown.push_str(&ts.finish().expect("finish"));
        }
        match &stop {
            Some(s) if full.contains(s.as_str()) => {
                prop_assert_eq!(&shown, &full[..full.find(s.as_str()).expect("found")]);
            }
            _ => prop_assert_eq!(&shown, &full),
        }
    }

    #[test]
    fn png_pixels_come_back_exactly(w in 1u32..40, h in 1u32..40, seed in any::<u64>(), alpha in any::<bool>()) {
        let mut state = seed | 1;
        let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; (state & 0xff) as u8 };
        let channels = if alpha { 4 } else { 3 };
        let raw: Vec<u8> = (0..w * h * channels).map(|_| next()).collect();
        let mut png = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png, w, h);
            enc.set_color(if alpha { png::ColorType::Rgba } else { png::ColorType::Rgb });
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().expect("header");
            writer.write_image_data(&raw).expect("data");
        }
        let img = flamingo_model::preprocess::decode(&png, &flamingo_model::preprocess::ImageLimits::default()).expect("decodes");
        prop_assert_eq!((img.width, img.height), (w as usize, h as usize));
        prop_assert_eq!(img.data, raw);
    }
}
