//! A request body, as `/v1/chat/completions`, `/v1/completions`, `/v1/score` and
//! `/v1/demonstrations` read it: parsed, its generation plan checked against the default
//! limits, chat messages through each chat template and tokenized (flamingo-mini's tokenizer
//! for OpenFlamingo's template, an IDEFICS tokenizer for IDEFICS'), the size limits applied.
//! Whatever the body, the answer is a validated request or a 4xx.

use std::sync::OnceLock;

use flamingo_model::FlamingoTokenizer;
use flamingo_server::api::{ChatRequest, CompletionRequest, GenParams};
use flamingo_server::config::{Config, Limits};
use flamingo_server::demos::RegisterRequest;
use flamingo_server::routes::ScoreRequest;
use flamingo_server::template::ChatTemplate;
use flamingo_server::validate::{chat_generation, check_sizes, completion_generation, parse_json, Bounds};

use crate::client_error;

struct Context {
    openflamingo: FlamingoTokenizer,
    idefics: FlamingoTokenizer,
    limits: Limits,
    bounds: Bounds,
}

fn context() -> &'static Context {
    static CONTEXT: OnceLock<Context> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let repo = crate::repo();
        let tokenizer = |r: flamingo_model::Result<FlamingoTokenizer>| match r {
            Ok(t) => t,
            Err(e) => panic!("the fuzz target's tokenizer: {e}"),
        };
        let limits = Config::defaults().limits;
        Context {
            openflamingo: tokenizer(FlamingoTokenizer::from_lm_dir(&repo.join("models/flamingo-mini/lm"))),
            idefics: tokenizer(FlamingoTokenizer::from_idefics_dir(&repo.join("tests/fixtures/idefics/idefics_x1"))),
            bounds: Bounds::of(&limits),
            limits,
        }
    })
}

/// The tokenizers the chat templates are tried with: OpenFlamingo's (flamingo-mini's) and an
/// IDEFICS one.
pub fn tokenizers() -> (&'static FlamingoTokenizer, &'static FlamingoTokenizer) {
    let c = context();
    (&c.openflamingo, &c.idefics)
}

pub fn run(data: &[u8]) {
    let c = context();
    let chat = parse_json::<ChatRequest>(data);
    let completion = parse_json::<CompletionRequest>(data);
    let params = parse_json::<GenParams>(data);
    if let (Ok(req), Ok(params)) = (&chat, &params) {
        for (template, tokenizer) in [
            (ChatTemplate::OpenFlamingo, &c.openflamingo),
            (ChatTemplate::Idefics, &c.idefics),
            (ChatTemplate::IdeficsInstruct, &c.idefics),
        ] {
            client_error(chat_generation(req, params, &c.bounds, template, tokenizer).and_then(|g| check_sizes(&c.limits, &g)));
        }
    }
    if let (Ok(req), Ok(params)) = (&completion, &params) {
        client_error(completion_generation(req, params.clone(), &c.bounds, &c.openflamingo).and_then(|g| check_sizes(&c.limits, &g)));
    }
    client_error(chat);
    client_error(completion);
    client_error(params);
    if let Ok(score) = parse_json::<ScoreRequest>(data) {
        if let Some(messages) = &score.messages {
            client_error(ChatTemplate::OpenFlamingo.apply(messages));
        }
    }
    client_error(parse_json::<RegisterRequest>(data));
}
