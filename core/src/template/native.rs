//! Native renderers for well-known chat templates.
//!
//! Rendering through minijinja costs ~20 µs for a 4k-token chat natively and ~60 µs once the
//! interpreter's code and data have left the CPU caches, which is the normal state inside Envoy
//! between two requests (measured in `bench/`). Most traffic uses a handful of templates in
//! their plainest form: text turns, no tools. For a template whose source is exactly one we know,
//! and a request in that plain form, the prompt is written directly: the same bytes, a few
//! copies, no interpreter.
//!
//! Exactness rests on two things: a template is recognised only by its exact source, and each
//! renderer states the requests it covers ([`Native::render`] returns `None` for anything else,
//! which minijinja then renders). `native_matches_minijinja` below compares both paths on thousands
//! of generated conversations, and `core/tests/template_parity.rs` compares with transformers.
//!
//! A native renderer does not write the prompt itself: it lays it out ([`ChatLayout`]) as parts
//! borrowed from the request and the template, grouped into chunks that each start at the
//! template's turn token. Writing the parts in order is the rendered prompt; a tokenizer can
//! instead look each turn up by its key, message text in the JSON form the client sent, without
//! decoding or writing anything (`Encoder::walk_layout`).

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::SpecialTokens;
use crate::request::{ChatMessage, ChatRequest, ContentPart, JsonText, MessageContent};

/// Qwen3's template (hybrid thinking), as its `tokenizer_config.json` ships it.
const QWEN3: &str = include_str!("qwen3.jinja");
/// Llama 3's template (Meta-Llama-3-*-Instruct), as its `tokenizer_config.json` ships it.
const LLAMA3: &str = include_str!("llama3.jinja");

/// A template with a native renderer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Native {
    /// Qwen3 (hybrid thinking): `<|im_start|>{role}\n{content}<|im_end|>\n` turns.
    Qwen3,
    /// Llama 3: `<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>` turns after
    /// the BOS token.
    Llama3,
}

/// What the request's (and the server's default) `chat_template_kwargs` ask for, when the native
/// renderer understands all of it.
#[derive(Clone, Copy, Debug, Default)]
struct Kwargs {
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    enable_thinking: Option<bool>,
}

impl Kwargs {
    /// Reads `json` over `self`; `None` when it holds anything the native renderer does not
    /// handle exactly (the interpreter then renders, or reports the error).
    fn read(mut self, json: &str) -> Option<Kwargs> {
        let map: Vec<(std::borrow::Cow<'_, str>, &RawValue)> =
            serde_json::from_str::<KwargMap<'_>>(json).ok()?.0;
        for (key, value) in map {
            let flag = match value.get() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            };
            match key.as_ref() {
                "add_generation_prompt" => self.add_generation_prompt = Some(flag?),
                "continue_final_message" => self.continue_final_message = Some(flag?),
                "enable_thinking" => self.enable_thinking = Some(flag?),
                k if super::CONSUMED_KWARGS.contains(&k) => {}
                _ => return None,
            }
        }
        Some(self)
    }
}

/// A JSON object's entries in order (duplicates kept: the later one wins when read in order).
struct KwargMap<'a>(Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for KwargMap<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = KwargMap<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(KwargMap(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A message's text as a string-content template sees it: text parts joined with `"\n"`, absent
/// content as `""`; `None` for media parts. Borrowed unless the content is a list of parts.
fn text_of<'a>(message: &'a ChatMessage<'_>) -> Option<Cow<'a, JsonText<'a>>> {
    match &message.content {
        None => Some(Cow::Owned(JsonText::new(""))),
        Some(MessageContent::Text(text)) => Some(Cow::Borrowed(text)),
        Some(MessageContent::Parts(parts)) => {
            let mut joined = String::new();
            for (i, part) in parts.iter().enumerate() {
                let ContentPart::Text(text) = part else { return None };
                if i > 0 {
                    joined.push('\n');
                }
                joined.push_str(text);
            }
            Some(Cow::Owned(JsonText::new(joined)))
        }
    }
}

/// One part of a laid-out prompt.
#[derive(Clone, Debug)]
pub enum Part<'r> {
    /// Text written as it is: template literals, a role.
    Text(Cow<'r, str>),
    /// A message's text, keyed by its JSON form and decoded only when written.
    Message(Cow<'r, JsonText<'r>>),
}

impl Part<'_> {
    /// What stands for this part in its chunk's key: text as it is, a message's text in its JSON
    /// form. A chunk's key (its parts' keys in order) determines its text: message text is the
    /// only part of a turn that varies freely, and its JSON form holds no line break, which every
    /// turn has right before it.
    pub fn key(&self) -> &str {
        match self {
            Part::Text(text) => text,
            Part::Message(text) => text.json(),
        }
    }

    /// The text this part writes (a message's, decoded on first use).
    pub fn text(&self) -> &str {
        match self {
            Part::Text(text) => text,
            Part::Message(text) => text.as_str(),
        }
    }
}

/// A chat prompt laid out by a native renderer: its parts (template literals, roles, message text
/// borrowed from the request), grouped into chunks. Every chunk but the first starts with the
/// template's turn token ([`ChatLayout::boundary`]); where that token is an added token of the
/// model's tokenizer, which nothing around it can merge with or strip into, the prompt's ids are
/// its chunks' ids concatenated, so a tokenizer may cache ids per chunk (a system prompt, an
/// earlier turn), found by its key, and never needs the prompt written out or decoded.
#[derive(Clone, Debug)]
pub struct ChatLayout<'r> {
    parts: Vec<Part<'r>>,
    /// Where each chunk's parts end in `parts`.
    ends: Vec<usize>,
    boundary: &'static str,
}

impl<'r> ChatLayout<'r> {
    fn new(boundary: &'static str, capacity: usize) -> Self {
        ChatLayout {
            parts: Vec::with_capacity(capacity),
            ends: Vec::with_capacity(capacity / 4 + 1),
            boundary,
        }
    }

    fn push(&mut self, text: impl Into<Cow<'r, str>>) {
        self.parts.push(Part::Text(text.into()));
    }

    fn push_message(&mut self, text: Cow<'r, JsonText<'r>>) {
        self.parts.push(Part::Message(text));
    }

    /// Ends the chunk being pushed (an empty one is not kept).
    fn end_chunk(&mut self) {
        if self.ends.last().copied().unwrap_or(0) < self.parts.len() {
            self.ends.push(self.parts.len());
        }
    }

    /// The text every chunk but the first starts with: the template's turn token.
    pub fn boundary(&self) -> &'static str {
        self.boundary
    }

    /// The chunks, each as its parts in order.
    pub fn chunks(&self) -> impl Iterator<Item = &[Part<'r>]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(from, to)| &self.parts[from..to])
    }

    /// Appends the rendered prompt to `out`.
    pub fn write(&self, out: &mut String) {
        for part in &self.parts {
            out.push_str(part.text());
        }
    }

    /// The rendered prompt.
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }
}

impl Native {
    /// The native renderer for a template `source`, if it is one we know exactly.
    pub fn detect(source: &str) -> Option<Native> {
        match source {
            QWEN3 => Some(Native::Qwen3),
            LLAMA3 => Some(Native::Llama3),
            _ => None,
        }
    }

    /// Renders `request` as the template would, or `None` when the request is outside what this
    /// renderer covers.
    pub fn render(
        self,
        request: &ChatRequest<'_>,
        default_kwargs: Option<&str>,
        specials: &SpecialTokens,
    ) -> Option<String> {
        self.layout(request, default_kwargs, specials).map(|layout| layout.text())
    }

    /// Lays `request` out as the template would render it, or `None` when the request is outside
    /// what this renderer covers.
    pub fn layout<'r>(
        self,
        request: &'r ChatRequest<'_>,
        default_kwargs: Option<&str>,
        specials: &'r SpecialTokens,
    ) -> Option<ChatLayout<'r>> {
        if request.tools.is_some() || request.documents.is_some() || request.messages.is_empty() {
            return None;
        }
        let mut kwargs = Kwargs::default();
        if let Some(json) = default_kwargs {
            kwargs = kwargs.read(json)?;
        }
        if let Some(raw) = request.chat_template_kwargs {
            kwargs = kwargs.read(raw.get())?;
        }
        let add_generation_prompt = kwargs.add_generation_prompt.unwrap_or(request.add_generation_prompt);
        if kwargs.continue_final_message.unwrap_or(request.continue_final_message) {
            return None;
        }
        match self {
            Native::Qwen3 => qwen3(&request.messages, add_generation_prompt, kwargs.enable_thinking),
            Native::Llama3 => {
                let bos = specials.named.iter().find(|(name, _)| name == "bos_token").map(|(_, t)| t)?;
                llama3(&request.messages, add_generation_prompt, bos)
            }
        }
    }
}

/// Qwen3's template for text turns of `system`, `user` and `assistant` without tool calls or
/// reasoning: every turn is `<|im_start|>{role}\n{content}<|im_end|>\n`, except that an assistant
/// turn ending the conversation after the last user query gets an empty think block.
fn qwen3<'r>(
    messages: &'r [ChatMessage<'_>],
    add_generation_prompt: bool,
    enable_thinking: Option<bool>,
) -> Option<ChatLayout<'r>> {
    let mut texts = Vec::with_capacity(messages.len());
    for m in messages {
        let plain = matches!(m.role.as_ref(), "system" | "user" | "assistant")
            && m.tool_calls.is_none()
            && m.reasoning_content.is_none();
        if !plain {
            return None;
        }
        let text = text_of(m)?;
        // The template splits reasoning out of an assistant turn at `</think>` (ruled out from
        // the JSON form when it can be: it is almost never there).
        if m.role == "assistant" && text.may_contain("think>") && text.contains("</think>") {
            return None;
        }
        texts.push(text);
    }
    // The last user turn that is not a wrapped tool response (the template's `last_query_index`).
    let last = messages.len() - 1;
    let mut last_query = last;
    for (i, m) in messages.iter().enumerate().rev() {
        if m.role == "user" {
            let text = &texts[i];
            let wrapped = text.may_contain("tool_response>")
                && text.starts_with("<tool_response>")
                && text.ends_with("</tool_response>");
            if !wrapped {
                last_query = i;
                break;
            }
        }
    }
    let mut layout = ChatLayout::new("<|im_start|>", 6 * messages.len() + 3);
    for (i, (m, text)) in messages.iter().zip(texts).enumerate() {
        layout.push("<|im_start|>");
        layout.push(m.role.as_ref());
        if m.role == "assistant" && i > last_query && i == last {
            layout.push("\n<think>\n\n</think>\n\n");
            let trimmed = text.trim_start_matches('\n');
            if trimmed.len() == text.len() {
                layout.push_message(text);
            } else {
                layout.push_message(Cow::Owned(JsonText::new(trimmed.to_owned())));
            }
        } else {
            layout.push("\n");
            layout.push_message(text);
        }
        layout.push("<|im_end|>\n");
        layout.end_chunk();
    }
    if add_generation_prompt {
        layout.push("<|im_start|>assistant\n");
        if enable_thinking == Some(false) {
            layout.push("<think>\n\n</think>\n\n");
        }
        layout.end_chunk();
    }
    Some(layout)
}

/// Llama 3's template: every message, whatever its role, is a header and its trimmed text (the
/// template reads nothing else of it), the first after the BOS token. `trim` is Jinja2's (Python's
/// `str.strip`), which the interpreted path uses too.
fn llama3<'r>(
    messages: &'r [ChatMessage<'_>],
    add_generation_prompt: bool,
    bos: &'r str,
) -> Option<ChatLayout<'r>> {
    let mut layout = ChatLayout::new("<|start_header_id|>", 5 * messages.len() + 3);
    layout.push(bos);
    layout.end_chunk();
    for m in messages {
        let text = text_of(m)?;
        // Trimmed from the JSON form's ends when it can be seen there that nothing goes.
        let text = if text.is_stripped(super::python_isspace) {
            text
        } else {
            Cow::Owned(JsonText::new(super::python_strip(&text).to_owned()))
        };
        layout.push("<|start_header_id|>");
        layout.push(m.role.as_ref());
        layout.push("<|end_header_id|>\n\n");
        layout.push_message(text);
        layout.push("<|eot_id|>");
        layout.end_chunk();
    }
    if add_generation_prompt {
        layout.push("<|start_header_id|>assistant<|end_header_id|>\n\n");
        layout.end_chunk();
    }
    Some(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix64;
    use crate::request::{Endpoint, InferenceRequest, RequestLimits, parse_request};
    use crate::template::{ChatTemplate, RenderOptions};

    fn pick<'a>(rng: &mut SplitMix64, items: &[&'a str]) -> &'a str {
        items[(rng.next_u64() % items.len() as u64) as usize]
    }

    /// A random conversation body: roles, contents and flags chosen to reach every branch of the
    /// template, including those the native renderer leaves to the interpreter.
    fn conversation(rng: &mut SplitMix64) -> String {
        let texts = [
            "Hello",
            "",
            "\n\nleading newlines",
            "trailing newline\n",
            "  spaced  ",
            "<tool_response>\n42\n</tool_response>",
            "<tool_response> open only",
            "reasoning<think>inner</think>\n\nanswer",
            "plain </think> marker",
            "多语言 text — ünïcödé 🙂",
            "a \"quoted\" \\ backslash",
            "\u{3000}\u{85}ideographic and next-line spaces\u{a0}\u{1c}",
        ];
        let roles = ["system", "user", "assistant", "user", "assistant", "tool", "developer"];
        let n = 1 + rng.next_u64() % 6;
        let mut messages = Vec::new();
        for _ in 0..n {
            let role = pick(rng, &roles);
            let content = match rng.next_u64() % 8 {
                0 => serde_json::Value::Null,
                1 => {
                    serde_json::json!([{"type": "text", "text": pick(rng, &texts)}, {"type": "text", "text": pick(rng, &texts)}])
                }
                _ => serde_json::Value::from(pick(rng, &texts)),
            };
            let mut m = serde_json::json!({"role": role, "content": content});
            if rng.next_u64().is_multiple_of(16) {
                m["reasoning_content"] = serde_json::Value::from("thought");
            }
            messages.push(m);
        }
        let mut body = serde_json::json!({"model": "m", "messages": messages});
        match rng.next_u64() % 8 {
            0 => body["add_generation_prompt"] = serde_json::Value::from(false),
            1 => body["chat_template_kwargs"] = serde_json::json!({"enable_thinking": false}),
            2 => body["chat_template_kwargs"] = serde_json::json!({"enable_thinking": true}),
            3 => body["chat_template_kwargs"] = serde_json::json!({"enable_thinking": 0}),
            4 => {
                body["chat_template_kwargs"] =
                    serde_json::json!({"add_generation_prompt": false, "custom": 1})
            }
            5 => {
                body["add_generation_prompt"] = serde_json::Value::from(false);
                body["continue_final_message"] = serde_json::Value::from(true);
            }
            _ => {}
        }
        // Clients escape differently: `/` as `\/`, or every non-ASCII character as `\u` escapes
        // (Python's `json.dumps`); the native renderer reads message text in its JSON form.
        let json = body.to_string();
        match rng.next_u64() % 4 {
            0 => json.replace('/', "\\/"),
            1 => json
                .chars()
                .map(|c| match c {
                    c if c.is_ascii() => c.to_string(),
                    c => c.encode_utf16(&mut [0; 2]).iter().map(|u| format!("\\u{u:04x}")).collect(),
                })
                .collect(),
            _ => json,
        }
    }

    #[test]
    fn only_the_exact_source_is_recognised() {
        assert_eq!(Native::detect(QWEN3), Some(Native::Qwen3));
        assert_eq!(Native::detect(LLAMA3), Some(Native::Llama3));
        assert_eq!(Native::detect(&format!("{QWEN3}\n")), None);
        assert_eq!(Native::detect("{{ messages }}"), None);
    }

    fn specials() -> SpecialTokens {
        SpecialTokens {
            named: vec![("bos_token".to_owned(), "<|begin_of_text|>".to_owned())],
            additional: Vec::new(),
        }
    }

    #[test]
    fn every_chunk_but_the_first_starts_at_the_turn_token() {
        let mut rng = SplitMix64::new(11);
        let mut laid_out = 0;
        for native in [Native::Qwen3, Native::Llama3] {
            for _ in 0..500 {
                let body = conversation(&mut rng);
                let Ok(InferenceRequest::Chat(request)) =
                    parse_request(Endpoint::ChatCompletions, body.as_bytes(), &RequestLimits::default())
                else {
                    panic!("not a chat request: {body}");
                };
                let specials = specials();
                let Some(layout) = native.layout(&request, None, &specials) else { continue };
                laid_out += 1;
                let mut chunks = 0;
                for (i, chunk) in layout.chunks().enumerate() {
                    let chunk: String = chunk.iter().map(Part::text).collect();
                    assert!(
                        i == 0 || chunk.starts_with(layout.boundary()),
                        "{native:?}, chunk {i}: {chunk:?}"
                    );
                    chunks += 1;
                }
                assert!(chunks > request.messages.len() - usize::from(native == Native::Qwen3), "{body}");
            }
        }
        assert!(laid_out > 300, "{laid_out}");
    }

    #[test]
    fn qwen3_matches_minijinja() {
        native_matches_minijinja(QWEN3, Native::Qwen3, 10);
    }

    #[test]
    fn llama3_matches_minijinja() {
        native_matches_minijinja(LLAMA3, Native::Llama3, 2);
    }

    #[test]
    fn llama3_without_a_bos_token_is_left_to_minijinja() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let Ok(InferenceRequest::Chat(request)) =
            parse_request(Endpoint::ChatCompletions, body.as_bytes(), &RequestLimits::default())
        else {
            panic!("not a chat request");
        };
        assert_eq!(Native::Llama3.render(&request, None, &SpecialTokens::default()), None);
        assert!(Native::Llama3.render(&request, None, &specials()).is_some());
    }

    /// Renders thousands of generated conversations both ways; more than `1 / min_share` of them
    /// must have gone the native way (and not all), so neither path is compared vacuously.
    fn native_matches_minijinja(source: &str, native: Native, min_share: usize) {
        let template = ChatTemplate::new(source, specials()).expect("the template compiles");
        assert_eq!(template.native(), Some(native));
        let mut rng = SplitMix64::new(7);
        let (mut rendered_natively, mut total) = (0, 0);
        for _ in 0..6000 {
            let body = conversation(&mut rng);
            let Ok(InferenceRequest::Chat(request)) =
                parse_request(Endpoint::ChatCompletions, body.as_bytes(), &RequestLimits::default())
            else {
                panic!("not a chat request: {body}");
            };
            let options = RenderOptions::default();
            let interpreted = template.render_interpreted(&request, &options).map_err(|e| e.to_string());
            let rendered = template.render(&request, &options).map_err(|e| e.to_string());
            assert_eq!(rendered, interpreted, "{body}");
            total += 1;
            if native.render(&request, None, &specials()).is_some() {
                rendered_natively += 1;
            }
        }
        assert!(
            rendered_natively > total / min_share && rendered_natively < total,
            "{rendered_natively} of {total} rendered natively"
        );
    }
}
