//! The request bodies each workload sends: OpenAI chat and completions requests for the Qwen3 model,
//! sized in tokens with the real tokenizer. A workload either repeats one body or makes a fresh one
//! per request from a seed that no other request of the run shares.

use std::borrow::Cow;

use anyhow::{Context, Result, bail};
use kvmesh_core::request::{Endpoint, InferenceRequest, RequestLimits, parse_request};
use kvmesh_core::template::RenderOptions;
use kvmesh_core::{TokenId, Tokenizer};
use serde_json::json;

use crate::text::{Rng, TextKind};

/// The model the filter is configured with (the tokenizer files are Qwen3's).
pub const MODEL: &str = "Qwen/Qwen3-8B";
/// The length of the long prompts, in tokens.
pub const LONG_PROMPT_TOKENS: usize = 4096;
/// Output tokens every request asks for (the upstream ignores it; the filter's load score uses it).
const MAX_TOKENS: u32 = 16;

/// How the bodies of a workload are made.
enum Bodies {
    /// The same body every request (the request bytes are built once).
    Fixed { body: Vec<u8>, request: Vec<u8> },
    /// A fresh body per request, from a unique seed.
    Fresh(Box<dyn Fn(u64) -> Vec<u8> + Sync + Send>),
}

/// One workload: an endpoint and its bodies.
pub struct Workload {
    /// Its name on the command line and in the tables.
    pub name: &'static str,
    /// What it stands for, one line.
    pub description: &'static str,
    /// The request path.
    pub path: &'static str,
    bodies: Bodies,
}

impl Workload {
    /// The endpoint the filter sees.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::from_path(self.path).unwrap_or(Endpoint::Completions)
    }

    /// Whether every request carries text never sent before.
    pub fn is_fresh(&self) -> bool {
        matches!(self.bodies, Bodies::Fresh(_))
    }

    /// The body of the request with `seed` (ignored by fixed workloads).
    pub fn body(&self, seed: u64) -> Cow<'_, [u8]> {
        match &self.bodies {
            Bodies::Fixed { body, .. } => Cow::Borrowed(body),
            Bodies::Fresh(make) => Cow::Owned(make(seed)),
        }
    }

    /// The whole HTTP request with `seed`.
    pub fn request(&self, seed: u64) -> Cow<'_, [u8]> {
        match &self.bodies {
            Bodies::Fixed { request, .. } => Cow::Borrowed(request),
            Bodies::Fresh(make) => Cow::Owned(post_json(self.path, &make(seed))),
        }
    }

    fn fixed(name: &'static str, description: &'static str, path: &'static str, body: Vec<u8>) -> Workload {
        let request = post_json(path, &body);
        Workload { name, description, path, bodies: Bodies::Fixed { body, request } }
    }

    fn fresh(
        name: &'static str,
        description: &'static str,
        path: &'static str,
        make: impl Fn(u64) -> Vec<u8> + Sync + Send + 'static,
    ) -> Workload {
        Workload { name, description, path, bodies: Bodies::Fresh(Box::new(make)) }
    }
}

/// A seed for connection `conn`'s `n`th request of load run `run`: unique across the whole process.
pub fn seed(run: u64, conn: usize, n: u64) -> u64 {
    (run << 44) ^ ((conn as u64) << 34) ^ n ^ 0x5eed_0000_0000_0000
}

/// Bytes per token of each text kind for this tokenizer, measured once on a ~16 KB sample.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    prose: f64,
    code: f64,
    cjk: f64,
}

impl Calibration {
    /// Measures each kind with `tokenizer`.
    pub fn measure(tokenizer: &Tokenizer) -> Result<Calibration> {
        let ratio = |kind: TextKind| -> Result<f64> {
            let text = kind.generate(&mut Rng::new(1), 16_000);
            let tokens = tokenizer.encode(&text).context("tokenize a calibration text")?.len();
            Ok(text.len() as f64 / tokens.max(1) as f64)
        };
        Ok(Calibration {
            prose: ratio(TextKind::Prose)?,
            code: ratio(TextKind::Code)?,
            cjk: ratio(TextKind::Cjk)?,
        })
    }

    /// Bytes of `kind` text for about `tokens` tokens.
    pub fn bytes(&self, kind: TextKind, tokens: usize) -> usize {
        let ratio = match kind {
            TextKind::Prose => self.prose,
            TextKind::Code => self.code,
            TextKind::Cjk => self.cjk,
        };
        (tokens as f64 * ratio) as usize
    }
}

/// The turns of the 4k-token chat before its last user turn: (role, kind, tokens).
const CHAT_HISTORY: [(&str, TextKind, usize); 5] = [
    ("system", TextKind::Prose, 1_200),
    ("user", TextKind::Code, 800),
    ("assistant", TextKind::Prose, 700),
    ("user", TextKind::Cjk, 600),
    ("assistant", TextKind::Prose, 650),
];

/// A new last user turn: a unique question of about 40 tokens.
fn last_turn(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    format!("Question {seed:x}: {}", TextKind::Prose.generate(&mut rng, 150).trim_end())
}

/// The history of the 4k-token chat from `seed`, as JSON messages.
fn history(calibration: &Calibration, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = Rng::new(seed);
    CHAT_HISTORY
        .iter()
        .map(|&(role, kind, tokens)| {
            let mut content = kind.generate(&mut rng, calibration.bytes(kind, tokens));
            // A fresh history must differ from its first character (the first block), as a new
            // conversation does; the seed in front makes every segment unique too.
            content.insert_str(0, &format!("[{seed:x}] "));
            json!({"role": role, "content": content})
        })
        .collect()
}

fn chat_body(mut messages: Vec<serde_json::Value>, last: String) -> Vec<u8> {
    messages.push(json!({"role": "user", "content": last}));
    json!({"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}).to_string().into_bytes()
}

fn completion_body(prompt: &str) -> Vec<u8> {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS}).to_string().into_bytes()
}

/// The ids the engine computes for the 4k-token chat with the fixed history, rendered with the
/// model's template (what `ids-4k-warm` sends as its prompt).
fn chat_ids(tokenizer: &Tokenizer, body: &[u8]) -> Result<Vec<TokenId>> {
    let Ok(InferenceRequest::Chat(chat)) =
        parse_request(Endpoint::ChatCompletions, body, &RequestLimits::default())
    else {
        bail!("the chat body does not parse as a chat request");
    };
    let template = tokenizer.chat_template(None, false).context("Qwen3's chat template")?;
    tokenizer.encode_chat(&template, &chat, &RenderOptions::default()).context("render and encode")
}

/// Every workload, in report order.
pub fn all(tokenizer: &Tokenizer) -> Result<Vec<Workload>> {
    let cal = Calibration::measure(tokenizer)?;
    // The fixed history and text seeds; fresh bodies use seeds from `seed`, which never equal these.
    const FIXED: u64 = 42;
    let mut out = Vec::new();

    let small = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello! What is the capital of France?"}], "max_tokens": MAX_TOKENS});
    out.push(Workload::fixed(
        "small-chat",
        "one short user message, ~100-byte body, the same every request",
        "/v1/chat/completions",
        small.to_string().into_bytes(),
    ));

    let fixed_history = history(&cal, FIXED);
    let warm_history = fixed_history.clone();
    out.push(Workload::fresh(
        "chat-4k-warm",
        "~4k-token 6-message chat: the same system prompt and 4 earlier turns, a new last user turn",
        "/v1/chat/completions",
        move |seed| chat_body(warm_history.clone(), last_turn(seed)),
    ));
    out.push(Workload::fresh(
        "chat-4k-cold",
        "the same chat shape with every message new (nothing seen before)",
        "/v1/chat/completions",
        move |seed| chat_body(history(&cal, seed), last_turn(seed)),
    ));

    for kind in [TextKind::Prose, TextKind::Code, TextKind::Cjk] {
        let bytes = cal.bytes(kind, LONG_PROMPT_TOKENS);
        let (new, repeat, new_about, repeat_about) = match kind {
            TextKind::Prose => (
                "prose-4k-new",
                "prose-4k-repeat",
                "completions, ~4k tokens of English-like prose, new text every request",
                "completions, the same ~4k tokens of prose every request",
            ),
            TextKind::Code => (
                "code-4k-new",
                "code-4k-repeat",
                "completions, ~4k tokens of Rust/Python-like code, new text every request",
                "completions, the same ~4k tokens of code every request",
            ),
            TextKind::Cjk => (
                "cjk-4k-new",
                "cjk-4k-repeat",
                "completions, ~4k tokens of Chinese, new text every request",
                "completions, the same ~4k tokens of Chinese every request",
            ),
        };
        out.push(Workload::fresh(new, new_about, "/v1/completions", move |seed| {
            completion_body(&kind.generate(&mut Rng::new(seed), bytes))
        }));
        let text = kind.generate(&mut Rng::new(FIXED), bytes);
        out.push(Workload::fixed(repeat, repeat_about, "/v1/completions", completion_body(&text)));
    }

    // The warm chat as token ids: no template, no tokenizer; parse, hash and score only.
    let ids = chat_ids(tokenizer, &chat_body(fixed_history, last_turn(FIXED)))?;
    let head: Vec<String> = ids[..ids.len().saturating_sub(TAIL_IDS)].iter().map(u32::to_string).collect();
    let head = head.join(",");
    out.push(Workload::fresh(
        "ids-4k-warm",
        "completions with the warm chat's ~4k token ids as the prompt, the last 32 ids new: routing without tokenizing",
        "/v1/completions",
        move |seed| {
            let mut rng = Rng::new(seed);
            let mut body = String::with_capacity(head.len() + 400);
            body.push_str(r#"{"model":""#);
            body.push_str(MODEL);
            body.push_str(r#"","prompt":["#);
            body.push_str(&head);
            for _ in 0..TAIL_IDS {
                body.push(',');
                body.push_str(&(rng.below(150_000)).to_string());
            }
            body.push_str(&format!(r#"],"max_tokens":{MAX_TOKENS}}}"#));
            body.into_bytes()
        },
    ));
    Ok(out)
}

/// The bytes of a `POST path` request with a JSON `body` (keep-alive, HTTP/1.1).
pub fn post_json(path: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Ids at the end of `ids-4k-warm`'s prompt that change every request (a new last turn's worth).
const TAIL_IDS: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_of_different_runs_connections_and_requests_differ() {
        let mut seen = std::collections::HashSet::new();
        for run in 0..4 {
            for conn in 0..8 {
                for n in 0..100 {
                    assert!(seen.insert(seed(run, conn, n)));
                }
            }
        }
    }
}
