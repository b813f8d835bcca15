//! Chat templates: a chat request to the prompt text the engine renders, exactly.
//!
//! vLLM renders with transformers' `apply_chat_template` (Jinja2, `trim_blocks` and `lstrip_blocks`
//! on, a `tojson` filter that is Python's `json.dumps`, `raise_exception` and `strftime_now`
//! globals), after normalizing the request its own way. Both layers are reproduced here with
//! minijinja, and `core/tests/template_parity.rs` compares against transformers' output:
//!
//! - messages as vLLM's `parse_chat_messages` builds them: text parts joined with `"\n"` when the
//!   template treats content as a string, `[{"type": "text", "text": ...}]` lists when it iterates
//!   over content ("openai" format, detected from the template source as vLLM does); absent content
//!   is `""` (or `[]`); tool-call `arguments` given as JSON strings are parsed into objects;
//! - tools as vLLM's pydantic models dump them (`description` and `parameters` present, `null` when
//!   absent);
//! - `chat_template_kwargs` overriding the generation prompt, tools, documents and the special
//!   tokens, as vLLM's merge and transformers' `template_kwargs` do.
//!
//! There is no clock here: `strftime_now` formats the time the caller passes in
//! [`RenderOptions::now_unix_seconds`], and is undefined (as in a template engine without it) when
//! none is given.

use std::borrow::Cow;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::value::RawValue;

use crate::request::{ChatMessage, ChatRequest, ContentPart, MessageContent};

mod native;

pub use native::{ChatLayout, Native, Part};

/// Name of the one template held by each [`ChatTemplate`]'s environment.
const TEMPLATE_NAME: &str = "chat";

/// Appended to the final message for `continue_final_message`, then cut off, as transformers does.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// `apply_chat_template` parameters that a `chat_template_kwargs` entry sets instead of the template
/// seeing it (transformers consumes them; vLLM forwards them).
const CONSUMED_KWARGS: &[&str] = &[
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
];

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse, or uses a construct minijinja lacks.
    #[error("chat template does not compile: {reason}")]
    Compile {
        /// What minijinja said.
        reason: String,
    },
    /// The template failed while rendering (including its own `raise_exception`).
    #[error("chat template failed to render: {reason}")]
    Render {
        /// What the template or minijinja said.
        reason: String,
    },
    /// The model has no chat template and the request gave none.
    #[error("the model has no chat template and the request gives none")]
    NoTemplate,
    /// A part of the request cannot be turned into template input.
    #[error("cannot render `{field}`: {reason}")]
    Request {
        /// Where in the request (`messages[1].tool_calls`, `chat_template_kwargs`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Non-text content (images, audio, ...) whose placeholder tokens only the engine knows.
    #[error("`messages[{message}]` has `{kind}` content, which is not tokenized for routing")]
    Media {
        /// Index of the message.
        message: usize,
        /// The part's `type`.
        kind: String,
    },
}

/// How a template reads `message.content`, which decides how vLLM hands it over.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ContentFormat {
    /// Content is a string; text parts are joined with `"\n"`.
    String,
    /// Content is a list of `{"type": ...}` parts, which the template iterates over.
    OpenAi,
}

/// The named special tokens a template sees (`bos_token`, `eos_token`, ...), as transformers'
/// `special_tokens_map` passes them.
#[derive(Clone, Debug, Default)]
pub struct SpecialTokens {
    /// `(name, text)` pairs such as `("bos_token", "<|begin_of_text|>")`.
    pub named: Vec<(String, String)>,
    /// `additional_special_tokens`, passed as a list when non-empty.
    pub additional: Vec<String>,
}

/// Which way a chat was rendered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RenderPath {
    /// By a native renderer ([`Native`]).
    Native,
    /// Through minijinja.
    Interpreted,
}

/// A chat rendered for tokenizing: laid out by a native renderer (the text in parts, never
/// written out unless asked), or written out by minijinja.
#[derive(Clone, Debug)]
pub enum RenderedChat<'r> {
    /// By a native renderer ([`RenderPath::Native`]).
    Layout(ChatLayout<'r>),
    /// Through minijinja ([`RenderPath::Interpreted`]).
    Text(String),
}

impl RenderedChat<'_> {
    /// Which way it was rendered.
    pub fn path(&self) -> RenderPath {
        match self {
            RenderedChat::Layout(_) => RenderPath::Native,
            RenderedChat::Text(_) => RenderPath::Interpreted,
        }
    }

    /// The prompt text.
    pub fn into_text(self) -> String {
        match self {
            RenderedChat::Layout(layout) => layout.text(),
            RenderedChat::Text(text) => text,
        }
    }
}

/// Inputs that do not come from the request.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenderOptions<'a> {
    /// Current time, seconds since the Unix epoch (UTC), for `strftime_now`; `None` leaves
    /// `strftime_now` undefined.
    pub now_unix_seconds: Option<i64>,
    /// The server's default `chat_template_kwargs` (vLLM `--default-chat-template-kwargs`), a JSON
    /// object that the request's own kwargs override.
    pub default_kwargs: Option<&'a str>,
}

/// A compiled chat template with what it needs from the tokenizer.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    format: ContentFormat,
    specials: SpecialTokens,
    /// A native renderer for this exact source, used for the requests it covers.
    native: Option<Native>,
}

impl ChatTemplate {
    /// Compiles `source` with transformers' Jinja settings.
    pub fn new(source: &str, specials: SpecialTokens) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Compile { reason: e.to_string() })?;
        env.set_syntax(syntax);
        // transformers' environment never escapes HTML.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(python_methods);
        env.add_filter("tojson", tojson);
        env.add_filter("trim", trim);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| TemplateError::Compile { reason: format!("{e:#}") })?;
        Ok(ChatTemplate {
            env,
            format: detect_content_format(source),
            specials,
            native: Native::detect(source),
        })
    }

    /// How this template reads message content.
    pub fn content_format(&self) -> ContentFormat {
        self.format
    }

    /// The native renderer of this template, if its source is one we know (see [`Native`]).
    pub fn native(&self) -> Option<Native> {
        self.native
    }

    /// Renders `request` as vLLM does (`add_generation_prompt` and `continue_final_message` as the
    /// request says, unless its `chat_template_kwargs` override them): natively when this is a
    /// known template and the request is in the form its native renderer covers, else through
    /// minijinja. Both give the same text.
    pub fn render(
        &self,
        request: &ChatRequest<'_>,
        options: &RenderOptions<'_>,
    ) -> Result<String, TemplateError> {
        self.render_traced(request, options).map(|(text, _)| text)
    }

    /// [`ChatTemplate::render`], also saying which way the text was rendered (a router counts
    /// them: a model whose template differs by one byte from a known one renders interpreted).
    pub fn render_traced(
        &self,
        request: &ChatRequest<'_>,
        options: &RenderOptions<'_>,
    ) -> Result<(String, RenderPath), TemplateError> {
        let chat = self.render_chat(request, options)?;
        let path = chat.path();
        Ok((chat.into_text(), path))
    }

    /// Renders `request` as [`ChatTemplate::render`] does, but leaves a natively rendered chat
    /// laid out in parts (see [`ChatLayout`]) rather than written out.
    pub fn render_chat<'r>(
        &'r self,
        request: &'r ChatRequest<'_>,
        options: &RenderOptions<'_>,
    ) -> Result<RenderedChat<'r>, TemplateError> {
        if let Some(layout) =
            self.native.and_then(|n| n.layout(request, options.default_kwargs, &self.specials))
        {
            return Ok(RenderedChat::Layout(layout));
        }
        self.render_interpreted(request, options).map(RenderedChat::Text)
    }

    /// Renders `request` through minijinja even where a native renderer applies (parity checks
    /// and benchmarks).
    pub fn render_interpreted(
        &self,
        request: &ChatRequest<'_>,
        options: &RenderOptions<'_>,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Compile { reason: format!("{e:#}") })?;

        let mut kwargs: Vec<(String, Value)> = Vec::new();
        if let Some(defaults) = options.default_kwargs {
            kwargs.extend(parse_kwargs(defaults, "default_chat_template_kwargs")?);
        }
        if let Some(raw) = request.chat_template_kwargs {
            for (key, value) in parse_kwargs(raw.get(), "chat_template_kwargs")? {
                kwargs.retain(|(k, _)| *k != key);
                kwargs.push((key, value));
            }
        }
        let take = |kwargs: &mut Vec<(String, Value)>, key: &str| {
            kwargs.iter().position(|(k, _)| k == key).map(|at| kwargs.remove(at).1)
        };
        for reserved in ["chat_template", "tokenize", "messages", "conversation"] {
            if take(&mut kwargs, reserved).is_some() {
                return Err(TemplateError::Request {
                    field: format!("chat_template_kwargs.{reserved}"),
                    reason: "may not be set through chat_template_kwargs".to_owned(),
                });
            }
        }
        let add_generation_prompt =
            take(&mut kwargs, "add_generation_prompt").map_or(request.add_generation_prompt, |v| v.is_true());
        let continue_final = take(&mut kwargs, "continue_final_message")
            .map_or(request.continue_final_message, |v| v.is_true());
        let tools = match take(&mut kwargs, "tools") {
            Some(tools) => tools,
            None => tools_value(request.tools.as_deref())?,
        };
        let documents = match take(&mut kwargs, "documents") {
            Some(documents) => documents,
            None => match &request.documents {
                None => Value::from(()),
                Some(docs) => Value::from(
                    docs.iter().map(|d| json_value(d.get(), "documents")).collect::<Result<Vec<_>, _>>()?,
                ),
            },
        };
        for consumed in CONSUMED_KWARGS {
            take(&mut kwargs, consumed);
        }
        if continue_final && add_generation_prompt {
            return Err(TemplateError::Request {
                field: "continue_final_message".to_owned(),
                reason: "cannot be combined with add_generation_prompt".to_owned(),
            });
        }

        let mut messages = request
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| message_value(i, m, self.format))
            .collect::<Result<Vec<_>, _>>()?;
        let mut final_text = None;
        if continue_final {
            final_text = Some(mark_final_message(&mut messages)?);
        }

        let mut ctx: Vec<(String, Value)> = Vec::new();
        for (name, text) in &self.specials.named {
            ctx.push((name.clone(), Value::from(text.as_str())));
        }
        if !self.specials.additional.is_empty() {
            ctx.push(("additional_special_tokens".to_owned(), Value::from(self.specials.additional.clone())));
        }
        if let Some(now) = options.now_unix_seconds {
            ctx.push((
                "strftime_now".to_owned(),
                Value::from_function(move |format: &str| strftime(now, format)),
            ));
        }
        for (key, value) in kwargs {
            ctx.retain(|(k, _)| *k != key);
            ctx.push((key, value));
        }
        ctx.push(("messages".to_owned(), Value::from(messages)));
        ctx.push(("tools".to_owned(), tools));
        ctx.push(("documents".to_owned(), documents));
        ctx.push(("add_generation_prompt".to_owned(), Value::from(add_generation_prompt)));

        let rendered = template
            .render(map_value(ctx))
            .map_err(|e| TemplateError::Render { reason: render_error(&e) })?;
        match final_text {
            None => Ok(rendered),
            Some(final_text) => cut_at_continue_tag(rendered, &final_text),
        }
    }
}

/// The template's own message for `raise_exception`, else minijinja's with its cause.
fn render_error(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_owned(),
        _ => format!("{e:#}"),
    }
}

/// A template map from ordered `(key, value)` pairs (a Python dict keeps insertion order).
fn map_value<K: Into<Value>>(pairs: impl IntoIterator<Item = (K, Value)>) -> Value {
    Value::from_object(
        pairs.into_iter().map(|(k, v)| (k.into(), v)).collect::<indexmap::IndexMap<Value, Value>>(),
    )
}

/// `raise_exception(message)`: the template refuses the conversation.
/// Whether Python's `str.isspace` holds for `c` (what `str.strip()` strips): Unicode White_Space,
/// which Rust's `char::is_whitespace` is, and also U+001C-U+001F, the information separators,
/// whose bidirectional class makes them whitespace to Python.
pub(crate) fn python_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`: `s` without leading and trailing whitespace by [`python_isspace`].
pub(crate) fn python_strip(s: &str) -> &str {
    s.trim_matches(python_isspace)
}

/// Jinja2's `trim` filter, which is Python's `str.strip(chars)` (minijinja's strips Rust's
/// whitespace, which lacks U+001C-U+001F).
fn trim(value: Cow<'_, str>, chars: Option<Cow<'_, str>>) -> String {
    match chars {
        Some(chars) => value.trim_matches(|c| chars.contains(c)).to_owned(),
        None => python_strip(&value).to_owned(),
    }
}

/// Python's string methods as minijinja-contrib's `pycompat` provides them, except that
/// `strip`, `lstrip` and `rstrip` without characters strip Python's whitespace
/// ([`python_isspace`]), as the templates' own engine does.
fn python_methods(
    state: &mut minijinja::State<'_, '_>,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    let no_chars = args.is_empty() || (args.len() == 1 && args[0].is_none());
    if let (Some(s), true) = (value.as_str(), no_chars) {
        match method {
            "strip" => return Ok(Value::from(python_strip(s))),
            "lstrip" => return Ok(Value::from(s.trim_start_matches(python_isspace))),
            "rstrip" => return Ok(Value::from(s.trim_end_matches(python_isspace))),
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// A JSON object of kwargs as ordered `(key, value)` pairs.
fn parse_kwargs(json: &str, field: &str) -> Result<Vec<(String, Value)>, TemplateError> {
    let value = json_value(json, field)?;
    if value.kind() != ValueKind::Map {
        return Err(TemplateError::Request {
            field: field.to_owned(),
            reason: "must be a JSON object".to_owned(),
        });
    }
    let mut out = Vec::new();
    let keys = value
        .try_iter()
        .map_err(|e| TemplateError::Request { field: field.to_owned(), reason: e.to_string() })?;
    for key in keys {
        let item = value.get_item(&key).unwrap_or_default();
        out.push((key.as_str().map_or_else(|| key.to_string(), str::to_owned), item));
    }
    Ok(out)
}

/// A JSON document as a template value, object key order kept (Python dicts keep it too).
fn json_value(json: &str, field: &str) -> Result<Value, TemplateError> {
    serde_json::from_str::<Value>(json)
        .map_err(|e| TemplateError::Request { field: field.to_owned(), reason: e.to_string() })
}

/// Tools as vLLM hands them to the template: each `ChatCompletionToolsParam.model_dump()`, i.e.
/// `{"type", "function": {"name", "description", "parameters", ...}, ...}` with absent optional
/// fields as `null` and unknown fields kept after the known ones.
fn tools_value(tools: Option<&[&RawValue]>) -> Result<Value, TemplateError> {
    let Some(tools) = tools else { return Ok(Value::from(())) };
    let mut out = Vec::with_capacity(tools.len());
    for (i, raw) in tools.iter().enumerate() {
        let field = format!("tools[{i}]");
        let tool = json_value(raw.get(), &field)?;
        let function = tool.get_attr("function").unwrap_or_default();
        if tool.kind() != ValueKind::Map || function.kind() != ValueKind::Map {
            return Err(TemplateError::Request { field, reason: "has no `function` object".to_owned() });
        }
        let known = ["name", "description", "parameters"];
        let mut f: Vec<(Value, Value)> = known
            .iter()
            .map(|k| {
                let v = function.get_attr(k).unwrap_or_default();
                (Value::from(*k), if v.is_undefined() { Value::from(()) } else { v })
            })
            .collect();
        f.extend(other_entries(&function, &known));
        let mut t: Vec<(Value, Value)> =
            vec![(Value::from("type"), Value::from("function")), (Value::from("function"), map_value(f))];
        t.extend(other_entries(&tool, &["type", "function"]));
        out.push(map_value(t));
    }
    Ok(Value::from(out))
}

/// The entries of map `value` whose keys are not in `known`, in order.
fn other_entries(value: &Value, known: &[&str]) -> Vec<(Value, Value)> {
    let Ok(keys) = value.try_iter() else { return Vec::new() };
    keys.filter(|k| !k.as_str().is_some_and(|k| known.contains(&k)))
        .map(|k| {
            let v = value.get_item(&k).unwrap_or_default();
            (k, v)
        })
        .collect()
}

/// One message as vLLM's `parse_chat_messages` builds it, in the same key order.
fn message_value(
    index: usize,
    message: &ChatMessage<'_>,
    format: ContentFormat,
) -> Result<Value, TemplateError> {
    let mut texts: Vec<&str> = Vec::new();
    match &message.content {
        None => {}
        Some(MessageContent::Text(text)) => texts.push(text),
        Some(MessageContent::Parts(parts)) => {
            for part in parts {
                match part {
                    ContentPart::Text(text) => texts.push(text),
                    ContentPart::Media { kind, .. } => {
                        return Err(TemplateError::Media { message: index, kind: kind.to_string() });
                    }
                }
            }
        }
    }
    let role: &str = &message.role;
    // A tool result given as text parts is always joined into a string (vLLM does this for tool
    // messages in both formats).
    let content = if format == ContentFormat::String || role == "tool" {
        Value::from(texts.join("\n"))
    } else {
        Value::from(
            texts
                .iter()
                .map(|t| map_value([("type", Value::from("text")), ("text", Value::from(*t))]))
                .collect::<Vec<_>>(),
        )
    };
    let mut m: Vec<(&str, Value)> = vec![("role", Value::from(role)), ("content", content)];
    if role == "assistant" {
        if let Some(raw) = message.tool_calls {
            let field = format!("messages[{index}].tool_calls");
            let calls = tool_calls_value(raw, &field)?;
            if calls.len().unwrap_or(0) > 0 {
                m.push(("tool_calls", calls));
            }
        }
        if let Some(reasoning) = &message.reasoning_content {
            m.push(("reasoning", Value::from(reasoning.as_ref())));
            m.push(("reasoning_content", Value::from(reasoning.as_ref())));
        }
    } else if role == "tool"
        && let Some(id) = &message.tool_call_id
    {
        m.push(("tool_call_id", Value::from(id.as_ref())));
    }
    if let Some(name) = &message.name {
        m.push(("name", Value::from(name.as_ref())));
    }
    if role == "developer" {
        m.push(("tools", Value::from(())));
    }
    Ok(map_value(m))
}

/// Tool calls with string `arguments` parsed into objects (invalid JSON becomes `{}`), as vLLM's
/// `_postprocess_messages` does before rendering.
fn tool_calls_value(raw: &RawValue, field: &str) -> Result<Value, TemplateError> {
    let calls: Vec<&RawValue> = serde_json::from_str(raw.get())
        .map_err(|e| TemplateError::Request { field: field.to_owned(), reason: e.to_string() })?;
    let mut out = Vec::with_capacity(calls.len());
    for (i, call) in calls.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let value = json_value(call.get(), &field)?;
        let function = value.get_attr("function").unwrap_or_default();
        if function.kind() != ValueKind::Map {
            return Err(TemplateError::Request { field, reason: "has no `function` object".to_owned() });
        }
        let arguments = function.get_attr("arguments").unwrap_or_default();
        let parsed = match arguments.kind() {
            ValueKind::String => {
                let text = arguments.as_str().unwrap_or("");
                serde_json::from_str::<Value>(text).unwrap_or_else(|_| empty_map())
            }
            ValueKind::Map | ValueKind::Seq => arguments,
            _ => empty_map(),
        };
        out.push(replace_key(&value, "function", replace_key(&function, "arguments", parsed)));
    }
    Ok(Value::from(out))
}

fn empty_map() -> Value {
    map_value(std::iter::empty::<(Value, Value)>())
}

/// A copy of map `value` with `key` set to `new`, key order kept.
fn replace_key(value: &Value, key: &str, new: Value) -> Value {
    let mut pairs: Vec<(Value, Value)> = Vec::new();
    let mut replaced = false;
    if let Ok(keys) = value.try_iter() {
        for k in keys {
            if k.as_str() == Some(key) {
                pairs.push((k, new.clone()));
                replaced = true;
            } else {
                let v = value.get_item(&k).unwrap_or_default();
                pairs.push((k, v));
            }
        }
    }
    if !replaced {
        pairs.push((Value::from(key), new));
    }
    map_value(pairs)
}

/// Appends [`CONTINUE_TAG`] to the last text of the final message; returns that text (untagged).
fn mark_final_message(messages: &mut [Value]) -> Result<String, TemplateError> {
    let no_text = || TemplateError::Request {
        field: "continue_final_message".to_owned(),
        reason: "the final message has no text to continue".to_owned(),
    };
    let last = messages.last_mut().ok_or_else(no_text)?;
    let content = last.get_attr("content").unwrap_or_default();
    if let Some(text) = content.as_str() {
        let tagged = format!("{text}{CONTINUE_TAG}");
        let original = text.to_owned();
        *last = replace_key(last, "content", Value::from(tagged));
        return Ok(original);
    }
    let parts: Vec<Value> = content.try_iter().map_err(|_| no_text())?.collect();
    let at = parts
        .iter()
        .rposition(|p| p.get_attr("text").is_ok_and(|t| !t.is_undefined()))
        .ok_or_else(no_text)?;
    let text = parts[at].get_attr("text").unwrap_or_default().to_string();
    let mut parts = parts;
    parts[at] = replace_key(&parts[at], "text", Value::from(format!("{text}{CONTINUE_TAG}")));
    *last = replace_key(last, "content", Value::from(parts));
    Ok(text)
}

/// Cuts the rendered prompt at the continue tag, as transformers does.
fn cut_at_continue_tag(rendered: String, final_text: &str) -> Result<String, TemplateError> {
    let tag = CONTINUE_TAG.trim();
    if !rendered.contains(final_text.trim()) || !rendered.contains(tag) {
        return Err(TemplateError::Request {
            field: "continue_final_message".to_owned(),
            reason: "the template drops part of the final message".to_owned(),
        });
    }
    let at = rendered.rfind(tag).unwrap_or(rendered.len());
    if rendered[at..].starts_with(CONTINUE_TAG) {
        Ok(rendered[..at].to_owned())
    } else {
        Ok(rendered[..at].trim_end().to_owned())
    }
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, with those keyword arguments.
fn tojson(value: Value, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let indent: Option<String> = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or("").to_owned()),
        // Clamped: a template asking for a gigabyte of indentation must not take the VM down.
        Some(v) => Some(" ".repeat(v.as_i64().unwrap_or(0).clamp(0, 256) as usize)),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => (a.to_string(), b.to_string()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "separators must be a pair",
                    ));
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    kwargs.assert_all_used()?;
    let style = JsonStyle { ensure_ascii, sort_keys, indent, item_sep, key_sep };
    let mut out = String::new();
    write_json(&mut out, &value, &style, 0)?;
    Ok(out)
}

/// The formatting options of `json.dumps`.
struct JsonStyle {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value),
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or(""), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, style, depth, '[', ']', items.len(), |out, i| {
                write_json(out, &items[i], style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, style, depth, '{', '}', entries.len(), |out, i| {
                write_json_string(out, &entries[i].0, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, &entries[i].1, style, depth + 1)
            })?;
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// Brackets, separators and indentation around `n` items, as `json.dumps` lays them out.
fn write_container(
    out: &mut String,
    style: &JsonStyle,
    depth: usize,
    open: char,
    close: char,
    n: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), minijinja::Error>,
) -> Result<(), minijinja::Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    for i in 0..n {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        newline(out, depth + 1);
        item(out, i)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// A dict key as `json.dumps` writes it: strings as they are, numbers, booleans and None spelled out.
fn json_key(key: &Value) -> Result<String, minijinja::Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or("").to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key);
            s
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("keys must be str, int, float, bool or None, not {kind}"),
            ));
        }
    })
}

/// A number as Python writes it: integers exactly, floats with `repr` (shortest round trip,
/// exponent form below 1e-4 and from 1e16 on).
fn write_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        let _ = write!(out, "{value}");
        return;
    }
    let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    out.push_str(&python_float_repr(f));
}

/// Python's `float.__repr__` (and `json.dumps` of a float).
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    // `{:e}` gives the shortest round-trip digits: "1.2345e3", "-5e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let mantissa = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// A JSON string as `json.dumps` writes it.
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `datetime.now().strftime(format)` for a UTC time, for the directives templates use;
/// others are written as given.
fn strftime(unix_seconds: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3)
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match d {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'B' => write!(out, "{month_name}"),
            'a' => write!(out, "{}", &DAYS[weekday][..3]),
            'A' => write!(out, "{}", DAYS[weekday]),
            'j' => write!(out, "{yday:03}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{:02}", if hour % 12 == 0 { 12 } else { hour % 12 }),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            'T' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// vLLM's content-format detection, on the template source: "openai" when some `{% for x in
/// m.content %}` (or `m['content']`) iterates over the content of a message variable `m`, itself a
/// loop variable over `messages` or over a variable assigned from it (`set loop_messages =
/// messages[1:]`); else "string".
pub fn detect_content_format(source: &str) -> ContentFormat {
    let statements = statements(source);
    // Variables holding the message list: `messages` and everything assigned from one of them.
    let mut lists: Vec<String> = vec!["messages".to_owned()];
    let mut grew = true;
    while grew {
        grew = false;
        for (target, expr) in statements.iter().filter_map(|s| parse_set(s)) {
            if lists.iter().any(|l| is_access(expr, l, None)) && !lists.iter().any(|l| l == target) {
                lists.push(target.to_owned());
                grew = true;
            }
        }
    }
    let loops: Vec<(&str, &str)> = statements.iter().filter_map(|s| parse_for(s)).collect();
    let message_vars: Vec<&str> = loops
        .iter()
        .filter(|(_, iter)| lists.iter().any(|l| is_access(iter, l, None)))
        .map(|(t, _)| *t)
        .collect();
    let iterates_content =
        loops.iter().any(|(_, iter)| message_vars.iter().any(|m| is_access(iter, m, Some("content"))));
    if iterates_content { ContentFormat::OpenAi } else { ContentFormat::String }
}

/// The inside of every `{% ... %}` block, trimmed of whitespace-control marks.
fn statements(source: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("%}") else { break };
        out.push(after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace()));
        rest = &after[end + 2..];
    }
    out
}

/// `for <name> in <expr>` (a single loop variable) as `(name, expr)`.
fn parse_for(statement: &str) -> Option<(&str, &str)> {
    let rest = statement.strip_prefix("for")?.trim_start();
    let (target, iter) = rest.split_once(" in ")?;
    let target = target.trim();
    is_identifier(target).then_some((target, iter.trim()))
}

/// `set <name> = <expr>` as `(name, expr)`.
fn parse_set(statement: &str) -> Option<(&str, &str)> {
    let rest = statement.strip_prefix("set")?.trim_start();
    let (target, expr) = rest.split_once('=')?;
    let target = target.trim();
    (is_identifier(target) && !expr.starts_with('=')).then_some((target, expr.trim()))
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Whether `expr` is `var` (or `var.key` / `var['key']`), possibly sliced, filtered, tested or
/// loop-filtered: what vLLM's `_is_var_or_elems_access` accepts.
fn is_access(expr: &str, var: &str, key: Option<&str>) -> bool {
    let mut e = expr.trim();
    // Loop filter (`for x in xs if cond`), filters and tests act on the base expression.
    for cut in [" if ", "|", " is "] {
        if let Some(at) = e.find(cut) {
            e = e[..at].trim();
        }
    }
    // Slices (`messages[1:]`, `messages[::-1]`).
    while e.ends_with(']') {
        let Some(open) = e.rfind('[') else { break };
        if !e[open..].contains(':') {
            break;
        }
        e = e[..open].trim_end();
    }
    let base: Cow<'_, str> = Cow::Borrowed(e);
    match key {
        None => base == var,
        Some(key) => {
            let dotted = format!("{var}.{key}");
            let single = format!("{var}['{key}']");
            let double = format!("{var}[\"{key}\"]");
            base == dotted.as_str() || base == single.as_str() || base == double.as_str()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_str(source: &str, ctx: Value) -> String {
        let t = ChatTemplate::new(source, SpecialTokens::default()).unwrap();
        t.env.get_template(TEMPLATE_NAME).unwrap().render(ctx).unwrap()
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let ctx = map_value([(
            "x",
            serde_json::from_str::<Value>(r#"{"b": [1, 2.5, null, true], "a": "é\"\n", "c": {}, "d": []}"#)
                .unwrap(),
        )]);
        assert_eq!(
            render_str("{{ x | tojson }}", ctx.clone()),
            r#"{"b": [1, 2.5, null, true], "a": "é\"\n", "c": {}, "d": []}"#
        );
        assert_eq!(
            render_str("{{ x | tojson(indent=2) }}", ctx.clone()),
            "{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": \"é\\\"\\n\",\n  \"c\": {},\n  \"d\": []\n}"
        );
        assert_eq!(
            render_str("{{ x | tojson(ensure_ascii=true, sort_keys=true, separators=(',', ':')) }}", ctx),
            r#"{"a":"\u00e9\"\n","b":[1,2.5,null,true],"c":{},"d":[]}"#
        );
    }

    #[test]
    fn floats_print_as_python_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123456.789, "123456.789"),
            (-2.5e20, "-2.5e+20"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn strftime_formats_a_fixed_time() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(strftime(t, "%A %B %j %H:%M:%S %p %%"), "Friday July 208 13:05:09 PM %");
        assert_eq!(strftime(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
    }

    #[test]
    fn raise_exception_carries_the_template_message() {
        let t =
            ChatTemplate::new("{{ raise_exception('no system role') }}", SpecialTokens::default()).unwrap();
        let err = t.env.get_template(TEMPLATE_NAME).unwrap().render(Value::from(())).unwrap_err();
        assert_eq!(render_error(&err), "no system role");
    }

    #[test]
    fn content_format_follows_loops_over_message_content() {
        assert_eq!(
            detect_content_format("{% for m in messages %}{{ m.content }}{% endfor %}"),
            ContentFormat::String
        );
        assert_eq!(
            detect_content_format(
                "{% for m in messages %}{% for c in m['content'] %}{{ c.text }}{% endfor %}{% endfor %}"
            ),
            ContentFormat::OpenAi
        );
        assert_eq!(
            detect_content_format(
                "{%- set loop_messages = messages[1:] %}{%- for message in loop_messages %}\
                 {%- for part in message.content | selectattr('type') %}{% endfor %}{% endfor %}"
            ),
            ContentFormat::OpenAi
        );
        // Iterating over something else's content does not count.
        assert_eq!(
            detect_content_format("{% for d in documents %}{% for c in d.content %}{% endfor %}{% endfor %}"),
            ContentFormat::String
        );
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let out = render_str(
            "{% for x in ['  a ', 'b', 'c'] %}{% if loop.index0 == 2 %}{% break %}{% endif %}\
             {{ x.strip() }}{{ 'xy'.startswith('x') }}{% endfor %}{{ 'a,b'.split(',') | length }}\
             {% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}",
            Value::from(()),
        );
        // Booleans print as Python prints them.
        assert_eq!(out, "aTruebTrue21");
    }

    #[test]
    fn strip_and_trim_strip_what_python_strips() {
        // Python's whitespace includes U+001C-U+001F; Rust's does not. Expected output from
        // Jinja2 3.1.6 in transformers' sandboxed environment, which vLLM renders with.
        let out = render_str(
            "[{{ x|trim }}|{{ x.strip() }}|{{ x.lstrip() }}|{{ x.rstrip() }}|{{ x.strip('\u{1c}\u{3000}') }}|\
             {{ x|trim('\u{1c}') }}]",
            map_value([("x", Value::from("\u{1c}\u{1d} A \u{1e}\u{1f}\u{85}\u{3000}"))]),
        );
        assert_eq!(
            out,
            "[A|A|A \u{1e}\u{1f}\u{85}\u{3000}|\u{1c}\u{1d} A|\u{1d} A \u{1e}\u{1f}\u{85}|\u{1d} A \u{1e}\u{1f}\u{85}\u{3000}]"
        );
        assert_eq!(python_strip("\u{1f} x \u{1c}"), "x");
    }
}
