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

use serde_json::value::RawValue;

use super::SpecialTokens;
use crate::request::{ChatMessage, ChatRequest, ContentPart, MessageContent};

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
/// content as `""`; `None` for media parts.
fn text_of<'a>(message: &'a ChatMessage<'_>, scratch: &'a mut String) -> Option<&'a str> {
    match &message.content {
        None => Some(""),
        Some(MessageContent::Text(text)) => Some(text),
        Some(MessageContent::Parts(parts)) => {
            scratch.clear();
            for (i, part) in parts.iter().enumerate() {
                let ContentPart::Text(text) = part else { return None };
                if i > 0 {
                    scratch.push('\n');
                }
                scratch.push_str(text);
            }
            Some(scratch)
        }
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
fn qwen3(
    messages: &[ChatMessage<'_>],
    add_generation_prompt: bool,
    enable_thinking: Option<bool>,
) -> Option<String> {
    let mut scratch = String::new();
    let mut bytes = 64;
    for m in messages {
        let plain = matches!(m.role.as_ref(), "system" | "user" | "assistant")
            && m.tool_calls.is_none()
            && m.reasoning_content.is_none();
        if !plain {
            return None;
        }
        let text = text_of(m, &mut scratch)?;
        // The template splits reasoning out of an assistant turn at `</think>`.
        if m.role == "assistant" && memchr::memmem::find(text.as_bytes(), b"</think>").is_some() {
            return None;
        }
        bytes += text.len() + 32;
    }
    // The last user turn that is not a wrapped tool response (the template's `last_query_index`).
    let last = messages.len() - 1;
    let mut last_query = last;
    for (i, m) in messages.iter().enumerate().rev() {
        if m.role == "user" {
            let text = text_of(m, &mut scratch)?;
            if !(text.starts_with("<tool_response>") && text.ends_with("</tool_response>")) {
                last_query = i;
                break;
            }
        }
    }
    let mut out = String::with_capacity(bytes);
    for (i, m) in messages.iter().enumerate() {
        let text = text_of(m, &mut scratch)?;
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        if m.role == "assistant" && i > last_query && i == last {
            out.push_str("<think>\n\n</think>\n\n");
            out.push_str(text.trim_start_matches('\n'));
        } else {
            out.push_str(text);
        }
        out.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
        if enable_thinking == Some(false) {
            out.push_str("<think>\n\n</think>\n\n");
        }
    }
    Some(out)
}

/// Llama 3's template: every message, whatever its role, is a header and its trimmed text (the
/// template reads nothing else of it), the first after the BOS token. `trim` is minijinja's
/// (Unicode White_Space), which the interpreted path uses too.
fn llama3(messages: &[ChatMessage<'_>], add_generation_prompt: bool, bos: &str) -> Option<String> {
    let mut scratch = String::new();
    let mut bytes = bos.len() + 64;
    for m in messages {
        bytes += text_of(m, &mut scratch)?.len() + m.role.len() + 48;
    }
    let mut out = String::with_capacity(bytes);
    out.push_str(bos);
    for m in messages {
        out.push_str("<|start_header_id|>");
        out.push_str(&m.role);
        out.push_str("<|end_header_id|>\n\n");
        out.push_str(text_of(m, &mut scratch)?.trim());
        out.push_str("<|eot_id|>");
    }
    if add_generation_prompt {
        out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
    Some(out)
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
        body.to_string()
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
