//! A chat laid out by a native renderer and walked chunk by chunk (`Encoder::walk_layout`) gives
//! exactly what walking its written-out text gives: the same block hashes, the same length, the
//! same first miss, for Qwen3 and Llama 3, on conversations that grow turn by turn (so later walks
//! find earlier turns cached, and replay their chain memos), with contents full of whitespace,
//! special-token strings and scripts of every kind.

mod common;
mod corpus;

use std::collections::HashSet;

use kvmesh_core::hash::hash_prompt;
use kvmesh_core::request::{ChatRequest, Endpoint, InferenceRequest, RequestLimits, parse_request};
use kvmesh_core::template::{ChatLayout, ChatTemplate, RenderOptions, RenderedChat};
use kvmesh_core::tokenize::SegmentCacheConfig;
use kvmesh_core::{BlockHash, BlockSalt, Tokenizer};

use common::shared as tokenizer;

/// GPU engines' default block size, and a small one so short chats span blocks.
const BLOCKS: [usize; 2] = [16, 4];

/// Seed of the corpus, as in the parity test.
const SEED: u64 = 0x6b76_6d65_7368_0012;

fn block_hashes(tokens: &[u32], block: usize, salt: BlockSalt) -> Vec<BlockHash> {
    let mut hashes = Vec::new();
    hash_prompt(tokens, block, salt, &mut hashes);
    hashes
}

/// A conversation that grows: each call adds a turn or two to the same history, as a client does.
struct Conversation {
    rng: corpus::Rng,
    messages: Vec<serde_json::Value>,
}

impl Conversation {
    fn new(seed: u64) -> Self {
        let mut rng = corpus::Rng::new(seed);
        let mut messages = Vec::new();
        if rng.chance(2, 3) {
            messages.push(serde_json::json!({"role": "system", "content": content(&mut rng)}));
        }
        Conversation { rng, messages }
    }

    /// The next request body: one more user turn, after an assistant answer to the last one.
    fn next_body(&mut self) -> String {
        let rng = &mut self.rng;
        if self.messages.last().is_some_and(|m| m["role"] == "user") {
            self.messages.push(serde_json::json!({"role": "assistant", "content": content(rng)}));
        }
        self.messages.push(serde_json::json!({"role": "user", "content": content(rng)}));
        let mut body = serde_json::json!({"model": "m", "messages": self.messages});
        match rng.below(8) {
            0 => body["add_generation_prompt"] = false.into(),
            1 => body["chat_template_kwargs"] = serde_json::json!({"enable_thinking": false}),
            2 => body["add_special_tokens"] = true.into(),
            _ => {}
        }
        // Clients escape differently: serde_json writes UTF-8 and short escapes; Python's
        // `json.dumps` writes every non-ASCII character as `\u` escapes; some escape `/`.
        match rng.below(4) {
            0 => ascii_only(&body.to_string()),
            1 => body.to_string().replace('/', "\\/"),
            _ => body.to_string(),
        }
    }
}

/// JSON with every non-ASCII character written as `\u` escapes (UTF-16 units), as Python's
/// `json.dumps` writes it by default. Outside strings JSON is ASCII, so every such character is
/// in a string.
fn ascii_only(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Message content: corpus text (whitespace, special-token strings, every script), sometimes as
/// a list of text parts, sometimes empty.
fn content(rng: &mut corpus::Rng) -> serde_json::Value {
    match rng.below(10) {
        0 => {
            serde_json::json!([{"type": "text", "text": corpus::fragment(rng)}, {"type": "text", "text": corpus::fragment(rng)}])
        }
        1 => "".into(),
        _ => corpus::input(rng.next_u64(), rng.below(1 << 20)).into(),
    }
}

fn chat(body: &str) -> ChatRequest<'_> {
    match parse_request(Endpoint::ChatCompletions, body.as_bytes(), &RequestLimits::default()) {
        Ok(InferenceRequest::Chat(chat)) => chat,
        other => panic!("not a chat request: {other:?}\n{body}"),
    }
}

/// The chat laid out, when the native renderer covers it.
fn laid_out<'r>(template: &'r ChatTemplate, chat: &'r ChatRequest<'_>) -> Option<ChatLayout<'r>> {
    match template.render_chat(chat, &RenderOptions::default()).expect("renders") {
        RenderedChat::Layout(layout) => Some(layout),
        RenderedChat::Text(_) => None,
    }
}

fn template(tokenizer: &Tokenizer) -> ChatTemplate {
    tokenizer.chat_template(None, false).expect("the model ships a chat template")
}

/// The truth: the written-out prompt, tokenized as vLLM does.
fn truth(tokenizer: &Tokenizer, chat: &ChatRequest<'_>, text: &str) -> Vec<u32> {
    if chat.add_special_tokens { tokenizer.encode_prompt(text) } else { tokenizer.encode(text) }
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn walking_a_layout_is_walking_its_text() {
    for model in ["qwen3", "llama3_1"] {
        let tokenizer = tokenizer(model);
        let template = template(tokenizer);
        for block in BLOCKS {
            let mut encoder = tokenizer.encoder(SegmentCacheConfig::default());
            let mut native = 0;
            for c in 0..40 {
                let mut conversation = Conversation::new(SEED ^ c);
                for turn in 0..5 {
                    let body = conversation.next_body();
                    let chat = chat(&body);
                    let Some(layout) = laid_out(&template, &chat) else { continue };
                    native += 1;
                    let text = layout.text();
                    let ids = truth(tokenizer, &chat, &text);
                    let salt =
                        if turn % 2 == 0 { BlockSalt::NONE } else { BlockSalt::for_request(None, Some("s")) };
                    let expected = block_hashes(&ids, block, salt);
                    // Every third conversation is first walked as text, which caches its segments:
                    // the layout walk then misses chunks made of cached segments.
                    if c % 3 == 0 {
                        let walk = encoder
                            .walk_blocks(&text, chat.add_special_tokens, block, salt, |_| true)
                            .unwrap_or_else(|e| panic!("{model}: {e}"));
                        assert_eq!(
                            walk.hashes,
                            &expected[..],
                            "{model}, block {block}, {c}, {turn}, as text"
                        );
                    }
                    // Twice: the second walk finds every chunk cached.
                    for round in 0..2 {
                        let walk = encoder
                            .walk_layout(&layout, chat.add_special_tokens, block, salt, |_| true)
                            .unwrap_or_else(|e| panic!("{model}: {e}"));
                        let at =
                            format!("{model}, block {block}, conversation {c}, turn {turn}, round {round}");
                        assert_eq!(walk.hashes, &expected[..], "{at}\n{body}");
                        assert_eq!(
                            (walk.exact_tokens, walk.first_miss, walk.exact, walk.total_tokens),
                            (ids.len(), None, true, ids.len()),
                            "{at}"
                        );
                    }
                }
            }
            assert!(native > 150, "{model}: only {native} chats were laid out natively");
            let stats = encoder.cache_stats();
            assert!(stats.memo_replays > 0 && stats.hits > 0, "{model}: {stats:?}");
        }
    }
}

#[test]
fn a_layout_walk_stops_where_the_text_walk_stops() {
    for model in ["qwen3", "llama3_1"] {
        let tokenizer = tokenizer(model);
        let template = template(tokenizer);
        let mut by_layout = tokenizer.encoder(SegmentCacheConfig::default());
        let mut by_text = tokenizer.encoder(SegmentCacheConfig::default());
        let mut rng = corpus::Rng::new(SEED ^ 0x4c41_594f);
        let (mut stopped, mut layout_error, mut text_error) = (0, 0.0, 0.0);
        for c in 0..30 {
            let mut conversation = Conversation::new(SEED ^ 0x5354_4f50 ^ c);
            for turn in 0..4 {
                let body = conversation.next_body();
                let chat = chat(&body);
                let Some(layout) = laid_out(&template, &chat) else { continue };
                let text = layout.text();
                let ids = truth(tokenizer, &chat, &text);
                let hashes = block_hashes(&ids, 16, BlockSalt::NONE);
                if hashes.len() < 2 {
                    continue;
                }
                // Workers hold the first `k` blocks.
                let k = rng.below(hashes.len());
                let held: HashSet<BlockHash> = hashes[..k].iter().copied().collect();
                let text_walk = by_text
                    .walk_blocks(&text, chat.add_special_tokens, 16, BlockSalt::NONE, |h| held.contains(&h))
                    .expect("walks");
                let (text_hashes, text_total) = (text_walk.hashes.to_vec(), text_walk.total_tokens);
                let walk = by_layout
                    .walk_layout(&layout, chat.add_special_tokens, 16, BlockSalt::NONE, |h| held.contains(&h))
                    .expect("walks");
                let at =
                    format!("{model}: conversation {c}, turn {turn}, {k} of {} blocks held", hashes.len());
                assert_eq!(walk.hashes, &hashes[..=k], "{at}");
                assert_eq!(walk.hashes, &text_hashes[..], "{at}");
                assert_eq!(walk.first_miss, Some(k), "{at}");
                assert!(walk.exact_tokens >= 16 * (k + 1) && walk.exact_tokens <= ids.len(), "{at}");
                if walk.exact {
                    assert_eq!(walk.total_tokens, ids.len(), "{at}");
                } else {
                    assert!(walk.total_tokens >= walk.exact_tokens, "{at}");
                    let error = |total: usize| (total as f64 - ids.len() as f64).abs() / ids.len() as f64;
                    layout_error += error(walk.total_tokens);
                    text_error += error(text_total);
                    stopped += 1;
                }
            }
        }
        assert!(stopped > 20, "{model}: only {stopped} walks stopped early");
        // Both estimate the rest from its bytes; they differ in where exact work stopped (a
        // chunk's end against a segment's), which must not make the estimate worse on the whole.
        let (layout_error, text_error) = (layout_error / stopped as f64, text_error / stopped as f64);
        eprintln!("{model}: mean estimate error {layout_error:.3} (layout) against {text_error:.3} (text)");
        assert!(layout_error <= text_error * 1.25 + 0.01, "{model}: {layout_error} against {text_error}");
    }
}

#[test]
fn a_turn_token_the_tokenizer_lacks_falls_back_to_the_text() {
    // Qwen3's layout walked with Llama 3's tokenizer: `<|im_start|>` is no added token there, so
    // chunks would merge with their neighbours; the walk writes the text out instead.
    let qwen3 = template(tokenizer("qwen3"));
    let llama = tokenizer("llama3_1");
    let mut encoder = llama.encoder(SegmentCacheConfig::default());
    let mut conversation = Conversation::new(SEED ^ 0x4641_4c4c);
    for turn in 0..4 {
        let body = conversation.next_body();
        let chat = chat(&body);
        let Some(layout) = laid_out(&qwen3, &chat) else { continue };
        let text = layout.text();
        let ids = truth(llama, &chat, &text);
        for round in 0..2 {
            let walk = encoder
                .walk_layout(&layout, chat.add_special_tokens, 16, BlockSalt::NONE, |_| true)
                .expect("walks");
            assert_eq!(
                walk.hashes,
                &block_hashes(&ids, 16, BlockSalt::NONE)[..],
                "turn {turn}, round {round}"
            );
            assert_eq!(walk.total_tokens, ids.len(), "turn {turn}, round {round}");
        }
    }
}
