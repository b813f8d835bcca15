//! Typed parsing of OpenAI-style request bodies (`/v1/completions`, `/v1/chat/completions`).
//!
//! This runs in Envoy for every inference request, so the body is read in one pass by hand-written
//! serde visitors, never through a `serde_json::Value` tree: strings borrow from the body
//! (`Cow::Borrowed` unless they hold escapes), message text is kept in its JSON form and decoded
//! only when read ([`JsonText`]: a chat's earlier turns are found in the tokenizer's cache without
//! being decoded), values kept opaque (tools, tool calls, media parts) are `&RawValue` slices of
//! it, and unknown fields are skipped without allocating. Each visitor
//! knows where it is, so every error names its field (`messages[2].content[0].text`) and maps to an
//! OpenAI-style error body (`openai_error_body`).
//!
//! The engines read the same body with Python's `json` and pydantic, and we must route on what the
//! engine will read: so `null` means absent, the last of duplicated keys wins, and the whole body
//! must be UTF-8.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::hash::TokenId;

mod text;

pub use text::JsonText;

/// Default [`RequestLimits::max_body_bytes`]: 8 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// An inference API whose requests are parsed and routed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Endpoint {
    /// `POST /v1/completions`: a raw prompt.
    Completions,
    /// `POST /v1/chat/completions`: messages rendered through the model's chat template.
    ChatCompletions,
}

impl Endpoint {
    /// The endpoint served at `path` (an HTTP `:path`; a query string is ignored), if any.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        let path = path.split_once('?').map_or(path, |(path, _query)| path);
        match path {
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            _ => None,
        }
    }

    /// The path this endpoint is served at.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::ChatCompletions => "/v1/chat/completions",
        }
    }
}

/// Bounds on what a request body may be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RequestLimits {
    /// Longest body accepted, in bytes; longer ones are refused with 413 before parsing.
    pub max_body_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits { max_body_bytes: DEFAULT_MAX_BODY_BYTES }
    }
}

/// A parsed inference request of either endpoint.
#[derive(Clone, Debug)]
pub enum InferenceRequest<'a> {
    /// A `/v1/completions` request.
    Completion(CompletionRequest<'a>),
    /// A `/v1/chat/completions` request.
    Chat(ChatRequest<'a>),
}

impl InferenceRequest<'_> {
    /// The endpoint the request was sent to.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            InferenceRequest::Completion(_) => Endpoint::Completions,
            InferenceRequest::Chat(_) => Endpoint::ChatCompletions,
        }
    }

    /// The requested model (or LoRA adapter) name.
    pub fn model(&self) -> &str {
        match self {
            InferenceRequest::Completion(r) => &r.model,
            InferenceRequest::Chat(r) => &r.model,
        }
    }

    /// Whether the response is streamed as server-sent events.
    pub fn stream(&self) -> bool {
        match self {
            InferenceRequest::Completion(r) => r.stream,
            InferenceRequest::Chat(r) => r.stream,
        }
    }

    /// Whether a streamed response ends with a usage chunk (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        match self {
            InferenceRequest::Completion(r) => r.include_usage,
            InferenceRequest::Chat(r) => r.include_usage,
        }
    }

    /// Most tokens to generate per choice: `max_completion_tokens`, else `max_tokens`.
    pub fn max_output_tokens(&self) -> Option<u32> {
        match self {
            InferenceRequest::Completion(r) => r.max_tokens,
            InferenceRequest::Chat(r) => r.max_output_tokens(),
        }
    }

    /// Choices to generate per prompt (`n`, default 1).
    pub fn n(&self) -> u32 {
        match self {
            InferenceRequest::Completion(r) => r.n,
            InferenceRequest::Chat(r) => r.n,
        }
    }

    /// The `cache_salt` that isolates this request's KV cache, if any.
    pub fn cache_salt(&self) -> Option<&str> {
        match self {
            InferenceRequest::Completion(r) => r.cache_salt.as_deref(),
            InferenceRequest::Chat(r) => r.cache_salt.as_deref(),
        }
    }
}

/// A `/v1/completions` request: the fields routing and tokenization need.
#[derive(Clone, Debug)]
pub struct CompletionRequest<'a> {
    /// The requested model (or LoRA adapter) name; never empty.
    pub model: Cow<'a, str>,
    /// The prompt, as text or token ids.
    pub prompt: Prompt<'a>,
    /// Whether the response is streamed (`stream`, default false).
    pub stream: bool,
    /// `stream_options.include_usage` (default false).
    pub include_usage: bool,
    /// Most tokens to generate (`max_tokens`).
    pub max_tokens: Option<u32>,
    /// Choices to generate per prompt (`n`, default 1, at least 1).
    pub n: u32,
    /// Isolates this request's KV cache from requests with another salt; never empty.
    pub cache_salt: Option<Cow<'a, str>>,
    /// Whether the tokenizer adds special tokens such as BOS (`add_special_tokens`, vLLM's default
    /// for completions: true).
    pub add_special_tokens: bool,
}

/// The `prompt` of a completion request.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Prompt<'a> {
    /// One text prompt.
    Text(Cow<'a, str>),
    /// A batch of text prompts.
    Texts(Vec<Cow<'a, str>>),
    /// One prompt given as token ids.
    Tokens(Vec<TokenId>),
    /// A batch of prompts given as token ids.
    TokenBatches(Vec<Vec<TokenId>>),
}

impl Prompt<'_> {
    /// Prompts in the batch (1 for a single prompt).
    pub fn len(&self) -> usize {
        match self {
            Prompt::Text(_) | Prompt::Tokens(_) => 1,
            Prompt::Texts(texts) => texts.len(),
            Prompt::TokenBatches(batches) => batches.len(),
        }
    }

    /// Always false: a parsed prompt holds at least one non-empty prompt.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A `/v1/chat/completions` request: the fields routing and chat-template rendering need.
#[derive(Clone, Debug)]
pub struct ChatRequest<'a> {
    /// The requested model (or LoRA adapter) name; never empty.
    pub model: Cow<'a, str>,
    /// The conversation; never empty.
    pub messages: Vec<ChatMessage<'a>>,
    /// Tool definitions passed to the chat template, each kept as raw JSON.
    pub tools: Option<Vec<&'a RawValue>>,
    /// `tool_choice` ("none", "auto", "required" or a named tool), kept as raw JSON.
    pub tool_choice: Option<&'a RawValue>,
    /// Documents for retrieval-augmented templates, each kept as raw JSON.
    pub documents: Option<Vec<&'a RawValue>>,
    /// Extra template variables (a JSON object), kept as raw JSON.
    pub chat_template_kwargs: Option<&'a RawValue>,
    /// A chat template given in the request instead of the model's own.
    pub chat_template: Option<Cow<'a, str>>,
    /// Whether the template appends the assistant turn's opening (default true).
    pub add_generation_prompt: bool,
    /// Whether the last message is continued rather than closed (default false).
    pub continue_final_message: bool,
    /// Whether the tokenizer adds special tokens on top of the rendered template
    /// (`add_special_tokens`, vLLM's default for chat: false).
    pub add_special_tokens: bool,
    /// Whether the response is streamed (`stream`, default false).
    pub stream: bool,
    /// `stream_options.include_usage` (default false).
    pub include_usage: bool,
    /// Most tokens to generate (`max_tokens`, deprecated by OpenAI in favour of the next one).
    pub max_tokens: Option<u32>,
    /// Most tokens to generate, reasoning included (`max_completion_tokens`).
    pub max_completion_tokens: Option<u32>,
    /// Choices to generate (`n`, default 1, at least 1).
    pub n: u32,
    /// Isolates this request's KV cache from requests with another salt; never empty.
    pub cache_salt: Option<Cow<'a, str>>,
}

impl ChatRequest<'_> {
    /// Most tokens to generate: `max_completion_tokens`, else `max_tokens`.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Whether any message carries a non-text part (image, audio, video, file...).
    pub fn has_media(&self) -> bool {
        self.messages.iter().any(|m| match &m.content {
            Some(MessageContent::Parts(parts)) => {
                parts.iter().any(|p| matches!(p, ContentPart::Media { .. }))
            }
            _ => false,
        })
    }
}

/// One message of a chat conversation. Serializes as the message a chat template expects (content
/// always present, `null` when absent; other absent fields left out); serialize it with serde_json
/// (or into a `serde_json::Value`) to keep the raw parts intact.
#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage<'a> {
    /// `system`, `user`, `assistant`, `tool`, `developer`, ...; not checked against a list.
    pub role: Cow<'a, str>,
    /// The content; absent or `null` for an assistant message that only calls tools.
    pub content: Option<MessageContent<'a>>,
    /// Name of the participant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Cow<'a, str>>,
    /// Tool calls of an assistant message (a JSON array), kept as raw JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<&'a RawValue>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<Cow<'a, str>>,
    /// Reasoning of an earlier assistant turn, which some templates render.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<Cow<'a, str>>,
}

/// The `content` of a chat message. Serializes as a string or an array of parts.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[serde(untagged)]
pub enum MessageContent<'a> {
    /// Plain text, read in place from the body (decoded when read).
    Text(JsonText<'a>),
    /// An array of content parts, in order.
    Parts(Vec<ContentPart<'a>>),
}

/// One part of a chat message's content.
#[derive(Clone, Debug)]
pub enum ContentPart<'a> {
    /// `{"type": "text", "text": ...}`, or a bare string (vLLM accepts those too).
    Text(Cow<'a, str>),
    /// Any other part (`image_url`, `input_audio`, `video_url`, `file`, ...), kept as raw JSON.
    Media {
        /// The part's `type`.
        kind: Cow<'a, str>,
        /// The whole part object, exactly as sent.
        raw: &'a RawValue,
    },
}

impl PartialEq for ContentPart<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ContentPart::Text(a), ContentPart::Text(b)) => a == b,
            (ContentPart::Media { kind: a, raw: ra }, ContentPart::Media { kind: b, raw: rb }) => {
                a == b && ra.get() == rb.get()
            }
            _ => false,
        }
    }
}

impl Eq for ContentPart<'_> {}

impl Serialize for ContentPart<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ContentPart::Text(text) => {
                let mut part = serializer.serialize_struct("ContentPart", 2)?;
                part.serialize_field("type", "text")?;
                part.serialize_field("text", text)?;
                part.end()
            }
            ContentPart::Media { raw, .. } => raw.serialize(serializer),
        }
    }
}

/// Why a request body cannot be routed. Each variant maps to an HTTP status and an OpenAI-style
/// error body ([`RequestError::error_body`]).
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum RequestError {
    /// The body is longer than [`RequestLimits::max_body_bytes`] (413; checked before parsing).
    #[error("request body is {got} bytes, more than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
        /// The body's length, in bytes.
        got: usize,
    },
    /// The body is empty or only whitespace (400).
    #[error("request body is empty; expected a JSON object")]
    EmptyBody,
    /// The body is not valid UTF-8 JSON (400).
    #[error("request body is not valid JSON: {detail}")]
    MalformedJson {
        /// What the JSON parser found, and where.
        detail: String,
    },
    /// The body is JSON but not an object (400).
    #[error("request body must be a JSON object, got {got}")]
    NotAnObject {
        /// The JSON kind it is (`an array`, `a string`, ...).
        got: &'static str,
    },
    /// A required field is absent or `null` (400).
    #[error("`{field}` is required")]
    MissingField {
        /// Path of the field (`messages[1].role`).
        field: String,
    },
    /// A field holds a JSON value of the wrong kind (400).
    #[error("`{field}` must be {expected}, got {got}")]
    WrongType {
        /// Path of the field.
        field: String,
        /// What the field takes.
        expected: &'static str,
        /// The JSON kind it holds.
        got: &'static str,
    },
    /// A field that must not be empty is (400).
    #[error("`{field}` must not be empty")]
    Empty {
        /// Path of the field.
        field: String,
    },
    /// A number is outside the range its field takes (400).
    #[error("`{field}` must be {expected}, got {value}")]
    OutOfRange {
        /// Path of the field.
        field: String,
        /// The range the field takes.
        expected: &'static str,
        /// The number as sent.
        value: String,
    },
    /// A prompt array mixes strings, token ids and token id arrays (400).
    #[error(
        "`{field}` is {got} but `prompt[0]` is {first}: a prompt array holds only strings, \
         only token ids, or only arrays of token ids"
    )]
    MixedPrompt {
        /// Path of the first item of another kind (`prompt[3]`).
        field: String,
        /// Its JSON kind.
        got: &'static str,
        /// The JSON kind of `prompt[0]`.
        first: &'static str,
    },
}

impl RequestError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::BodyTooLarge { .. } => 413,
            _ => 400,
        }
    }

    /// The OpenAI error `type` to answer with.
    pub fn error_type(&self) -> &'static str {
        "invalid_request_error"
    }

    /// Path of the offending field (the OpenAI error's `param`), if one field is at fault.
    pub fn param(&self) -> Option<&str> {
        match self {
            RequestError::MissingField { field }
            | RequestError::WrongType { field, .. }
            | RequestError::Empty { field }
            | RequestError::OutOfRange { field, .. }
            | RequestError::MixedPrompt { field, .. } => Some(field),
            RequestError::BodyTooLarge { .. }
            | RequestError::EmptyBody
            | RequestError::MalformedJson { .. }
            | RequestError::NotAnObject { .. } => None,
        }
    }

    /// The OpenAI-style JSON error body for this error ([`openai_error_body`]).
    pub fn error_body(&self) -> String {
        openai_error_body(&self.to_string(), self.error_type(), self.param(), self.status())
    }
}

/// `{"error":{"message":..,"type":..,"param":..,"code":..}}`, as OpenAI and vLLM answer errors.
pub fn openai_error_body(message: &str, error_type: &str, param: Option<&str>, code: u16) -> String {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Detail<'a>,
    }
    #[derive(Serialize)]
    struct Detail<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        error_type: &'a str,
        param: Option<&'a str>,
        code: u16,
    }
    let body = Body { error: Detail { message, error_type, param, code } };
    // Strings and integers always serialize; the fallback only keeps this function panic-free.
    serde_json::to_string(&body).unwrap_or_else(|_| {
        String::from(r#"{"error":{"message":"error","type":"internal_error","param":null,"code":500}}"#)
    })
}

/// Parses a request body sent to `endpoint`, refusing bodies over `limits` before reading them.
pub fn parse_request<'a>(
    endpoint: Endpoint,
    body: &'a [u8],
    limits: &RequestLimits,
) -> Result<InferenceRequest<'a>, RequestError> {
    if body.len() > limits.max_body_bytes {
        return Err(RequestError::BodyTooLarge { limit: limits.max_body_bytes, got: body.len() });
    }
    // Python decodes the whole body before parsing it; checking once up front also spares the
    // parser a UTF-8 check per string. The SIMD check is what every body pays; std's only runs to
    // say where a bad body goes wrong.
    let text = simdutf8::basic::from_utf8(body).or_else(|_| std::str::from_utf8(body)).map_err(|e| {
        RequestError::MalformedJson { detail: format!("invalid UTF-8 at byte {}", e.valid_up_to()) }
    })?;
    if text.trim_ascii_start().is_empty() {
        return Err(RequestError::EmptyBody);
    }
    let slot = Slot::default();
    match endpoint {
        Endpoint::Completions => {
            read_body(text, &slot, CompletionBody { slot: &slot }).map(InferenceRequest::Completion)
        }
        Endpoint::ChatCompletions => {
            read_body(text, &slot, ChatBody { slot: &slot }).map(InferenceRequest::Chat)
        }
    }
}

impl<'de> Deserialize<'de> for CompletionRequest<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let slot = Slot::default();
        CompletionBody { slot: &slot }.deserialize(deserializer)
    }
}

impl<'de> Deserialize<'de> for ChatRequest<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let slot = Slot::default();
        ChatBody { slot: &slot }.deserialize(deserializer)
    }
}

/// Runs `seed` over the whole of `text`, returning the structured error a visitor left in `slot`,
/// or the JSON parser's own.
fn read_body<'a, S: DeserializeSeed<'a>>(
    text: &'a str,
    slot: &Slot,
    seed: S,
) -> Result<S::Value, RequestError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = seed.deserialize(&mut de).and_then(|value| de.end().map(|()| value));
    value.map_err(|e| slot.take().unwrap_or_else(|| RequestError::MalformedJson { detail: e.to_string() }))
}

// ---------------------------------------------------------------------------------------------
// The visitors. serde carries only a message up through `Deserializer::Error`, so a visitor that
// finds a problem leaves the structured `RequestError` in a shared slot and returns an error that
// aborts the parse; `read_body` takes it back out.

/// Where a visitor leaves the [`RequestError`] it raised.
type Slot = Cell<Option<RequestError>>;

/// Raises `err`: leaves it in `slot`, returns serde's error carrying its message.
fn raise<E: de::Error>(slot: &Slot, err: RequestError) -> E {
    let e = E::custom(&err);
    slot.set(Some(err));
    e
}

/// Re-raises, in another deserializer's error type, what a nested parse left in `slot`.
fn rethrow<E: de::Error>(slot: &Slot, nested: serde_json::Error) -> E {
    match slot.take() {
        Some(err) => raise(slot, err),
        None => E::custom(nested),
    }
}

/// Path of a field in the body, rendered only when an error names it.
#[derive(Clone, Copy, Debug)]
enum Loc {
    /// A top-level field, or a fixed path below one (`stream_options.include_usage`).
    Field(&'static str),
    /// An item of a top-level array (`prompt[3]`).
    Item(&'static str, usize),
    /// An item of an item (`prompt[1][4]`).
    Item2(&'static str, usize, usize),
    /// A message, or a field of one (`messages[2].role`).
    Message(usize, Option<&'static str>),
    /// A content part, or a field of one (`messages[2].content[0].text`).
    Part(usize, usize, Option<&'static str>),
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Loc::Field(name) => f.write_str(name),
            Loc::Item(name, i) => write!(f, "{name}[{i}]"),
            Loc::Item2(name, i, j) => write!(f, "{name}[{i}][{j}]"),
            Loc::Message(m, None) => write!(f, "messages[{m}]"),
            Loc::Message(m, Some(name)) => write!(f, "messages[{m}].{name}"),
            Loc::Part(m, p, None) => write!(f, "messages[{m}].content[{p}]"),
            Loc::Part(m, p, Some(name)) => write!(f, "messages[{m}].content[{p}].{name}"),
        }
    }
}

/// The kind of a JSON value, for errors.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Null,
    Bool,
    Int,
    Float,
    Str,
    Array,
    Object,
}

impl Kind {
    /// The kind as an error message says it.
    fn describe(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool => "a boolean",
            Kind::Int => "an integer",
            Kind::Float => "a floating-point number",
            Kind::Str => "a string",
            Kind::Array => "an array",
            Kind::Object => "an object",
        }
    }

    /// The kind of a valid raw JSON value.
    fn of_raw(json: &str) -> Kind {
        match json.as_bytes().first() {
            Some(b'n') => Kind::Null,
            Some(b't' | b'f') => Kind::Bool,
            Some(b'"') => Kind::Str,
            Some(b'[') => Kind::Array,
            Some(b'{') => Kind::Object,
            _ if json.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) => Kind::Float,
            _ => Kind::Int,
        }
    }
}

/// A field being read: where errors go, and its path.
#[derive(Clone, Copy)]
struct At<'s> {
    slot: &'s Slot,
    loc: Loc,
}

impl<'s> At<'s> {
    fn to(self, loc: Loc) -> At<'s> {
        At { slot: self.slot, loc }
    }

    fn missing<E: de::Error>(self) -> E {
        raise(self.slot, RequestError::MissingField { field: self.loc.to_string() })
    }

    fn empty<E: de::Error>(self) -> E {
        raise(self.slot, RequestError::Empty { field: self.loc.to_string() })
    }

    fn wrong<E: de::Error>(self, expected: &'static str, got: Kind) -> E {
        let field = self.loc.to_string();
        raise(self.slot, RequestError::WrongType { field, expected, got: got.describe() })
    }

    fn out_of_range<E: de::Error>(self, expected: &'static str, value: impl fmt::Display) -> E {
        let (field, value) = (self.loc.to_string(), value.to_string());
        raise(self.slot, RequestError::OutOfRange { field, expected, value })
    }

    fn mixed<E: de::Error>(self, got: Kind, first: Kind) -> E {
        let field = self.loc.to_string();
        raise(self.slot, RequestError::MixedPrompt { field, got: got.describe(), first: first.describe() })
    }
}

/// A visitor's answer to a JSON value of a kind it does not take.
trait Reject {
    /// The error for a value of kind `got`, naming the field.
    fn reject<E: de::Error>(&self, got: Kind) -> E;
}

/// Visitor methods for the JSON kinds a visitor does not take, each answering [`Reject::reject`].
macro_rules! reject {
    (@one $de:lifetime null) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(Reject::reject(&self, Kind::Null))
        }
    };
    (@one $de:lifetime bool) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(Reject::reject(&self, Kind::Bool))
        }
    };
    (@one $de:lifetime int) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(Reject::reject(&self, Kind::Int))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(Reject::reject(&self, Kind::Int))
        }
    };
    (@one $de:lifetime float) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(Reject::reject(&self, Kind::Float))
        }
    };
    (@one $de:lifetime str) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Err(Reject::reject(&self, Kind::Str))
        }
    };
    (@one $de:lifetime array) => {
        fn visit_seq<A: SeqAccess<$de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(Reject::reject(&self, Kind::Array))
        }
    };
    (@one $de:lifetime object) => {
        fn visit_map<A: MapAccess<$de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(Reject::reject(&self, Kind::Object))
        }
    };
    ($de:lifetime; $($kind:ident),+) => { $(reject!(@one $de $kind);)+ };
}

/// `DeserializeSeed` for a visitor that reads any JSON value (the visitor sorts out the kinds).
macro_rules! seed_any {
    ($seed:ident, $value:ty) => {
        impl<'de> DeserializeSeed<'de> for $seed<'_> {
            type Value = $value;
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
        }
    };
}

/// Field names of an object, matched without allocating.
trait FieldKey: Sized {
    fn from_name(name: &str) -> Self;
}

/// Reads one object key as a `K`.
struct KeySeed<K>(PhantomData<K>);

fn key<K>() -> KeySeed<K> {
    KeySeed(PhantomData)
}

impl<'de, K: FieldKey> DeserializeSeed<'de> for KeySeed<K> {
    type Value = K;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<K, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<K: FieldKey> Visitor<'_> for KeySeed<K> {
    type Value = K;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, name: &str) -> Result<K, E> {
        Ok(K::from_name(name))
    }
}

/// Top-level fields of both endpoints.
#[derive(Clone, Copy)]
enum BodyKey {
    Model,
    Prompt,
    Messages,
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    N,
    CacheSalt,
    AddSpecialTokens,
    Tools,
    ToolChoice,
    Documents,
    ChatTemplate,
    ChatTemplateKwargs,
    AddGenerationPrompt,
    ContinueFinalMessage,
    Other,
}

impl FieldKey for BodyKey {
    fn from_name(name: &str) -> Self {
        match name {
            "model" => BodyKey::Model,
            "prompt" => BodyKey::Prompt,
            "messages" => BodyKey::Messages,
            "stream" => BodyKey::Stream,
            "stream_options" => BodyKey::StreamOptions,
            "max_tokens" => BodyKey::MaxTokens,
            "max_completion_tokens" => BodyKey::MaxCompletionTokens,
            "n" => BodyKey::N,
            "cache_salt" => BodyKey::CacheSalt,
            "add_special_tokens" => BodyKey::AddSpecialTokens,
            "tools" => BodyKey::Tools,
            "tool_choice" => BodyKey::ToolChoice,
            "documents" => BodyKey::Documents,
            "chat_template" => BodyKey::ChatTemplate,
            "chat_template_kwargs" => BodyKey::ChatTemplateKwargs,
            "add_generation_prompt" => BodyKey::AddGenerationPrompt,
            "continue_final_message" => BodyKey::ContinueFinalMessage,
            _ => BodyKey::Other,
        }
    }
}

/// Fields of a chat message.
#[derive(Clone, Copy)]
enum MessageKey {
    Role,
    Content,
    Name,
    ToolCalls,
    ToolCallId,
    ReasoningContent,
    Other,
}

impl FieldKey for MessageKey {
    fn from_name(name: &str) -> Self {
        match name {
            "role" => MessageKey::Role,
            "content" => MessageKey::Content,
            "name" => MessageKey::Name,
            "tool_calls" => MessageKey::ToolCalls,
            "tool_call_id" => MessageKey::ToolCallId,
            "reasoning_content" => MessageKey::ReasoningContent,
            _ => MessageKey::Other,
        }
    }
}

/// Fields of a content part.
#[derive(Clone, Copy)]
enum PartKey {
    Type,
    Text,
    Other,
}

impl FieldKey for PartKey {
    fn from_name(name: &str) -> Self {
        match name {
            "type" => PartKey::Type,
            "text" => PartKey::Text,
            _ => PartKey::Other,
        }
    }
}

/// Fields of `stream_options`.
#[derive(Clone, Copy)]
enum StreamOptionsKey {
    IncludeUsage,
    Other,
}

impl FieldKey for StreamOptionsKey {
    fn from_name(name: &str) -> Self {
        match name {
            "include_usage" => StreamOptionsKey::IncludeUsage,
            _ => StreamOptionsKey::Other,
        }
    }
}

/// A string field; `null` reads as absent.
struct Str<'s> {
    at: At<'s>,
    non_empty: bool,
}

impl<'de> Visitor<'de> for Str<'_> {
    type Value = Option<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a string at `{}`", self.at.loc)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        if self.non_empty && v.is_empty() {
            return Err(self.at.empty());
        }
        Ok(Some(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if self.non_empty && v.is_empty() {
            return Err(self.at.empty());
        }
        Ok(Some(Cow::Owned(v.to_owned())))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    reject!('de; bool, int, float, array, object);
}

impl Reject for Str<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        self.at.wrong("a string", got)
    }
}

seed_any!(Str, Option<Cow<'de, str>>);

/// A boolean field; `null` reads as absent.
struct Bool<'s> {
    at: At<'s>,
}

impl<'de> Visitor<'de> for Bool<'_> {
    type Value = Option<bool>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a boolean at `{}`", self.at.loc)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    reject!('de; int, float, str, array, object);
}

impl Reject for Bool<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        self.at.wrong("a boolean", got)
    }
}

seed_any!(Bool, Option<bool>);

/// A count that fits a `u32` and is at least `min`; `null` reads as absent.
struct Count<'s> {
    at: At<'s>,
    min: u32,
}

impl Count<'_> {
    fn expected(&self) -> &'static str {
        if self.min == 0 { "a non-negative integer" } else { "a positive integer" }
    }

    fn range(&self) -> &'static str {
        if self.min == 0 { "an integer from 0 to 4294967295" } else { "an integer from 1 to 4294967295" }
    }
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = Option<u32>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at `{}`", self.expected(), self.at.loc)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        match u32::try_from(v) {
            Ok(v) if v >= self.min => Ok(Some(v)),
            _ => Err(self.at.out_of_range(self.range(), v)),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(self.at.out_of_range(self.range(), v)),
        }
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    reject!('de; bool, float, str, array, object);
}

impl Reject for Count<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        self.at.wrong(self.expected(), got)
    }
}

seed_any!(Count, Option<u32>);

/// An array whose items are kept as raw JSON; `null` reads as absent.
struct RawList<'s> {
    at: At<'s>,
    expected: &'static str,
}

impl<'de> Visitor<'de> for RawList<'_> {
    type Value = Option<Vec<&'de RawValue>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at `{}`", self.expected, self.at.loc)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            items.push(item);
        }
        Ok(Some(items))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    reject!('de; bool, int, float, str, object);
}

impl Reject for RawList<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        self.at.wrong(self.expected, got)
    }
}

seed_any!(RawList, Option<Vec<&'de RawValue>>);

/// `raw` if it is JSON of kind `want`, else a wrong-type error naming the field.
fn raw_of_kind<'a, E: de::Error>(
    raw: Option<&'a RawValue>,
    at: At<'_>,
    want: Kind,
    expected: &'static str,
) -> Result<Option<&'a RawValue>, E> {
    match raw.map(|raw| Kind::of_raw(raw.get())) {
        Some(got) if got != want => Err(at.wrong(expected, got)),
        _ => Ok(raw),
    }
}

/// `stream_options`, of which only `include_usage` is kept; `null` reads as absent.
struct StreamOptions<'s> {
    slot: &'s Slot,
}

impl<'de> Visitor<'de> for StreamOptions<'_> {
    type Value = Option<bool>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object at `stream_options`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut include_usage = None;
        while let Some(key) = map.next_key_seed(key::<StreamOptionsKey>())? {
            match key {
                StreamOptionsKey::IncludeUsage => {
                    let at = At { slot: self.slot, loc: Loc::Field("stream_options.include_usage") };
                    include_usage = map.next_value_seed(Bool { at })?;
                }
                StreamOptionsKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(include_usage)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    reject!('de; bool, int, float, str, array);
}

impl Reject for StreamOptions<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        At { slot: self.slot, loc: Loc::Field("stream_options") }.wrong("an object", got)
    }
}

seed_any!(StreamOptions, Option<bool>);

const PROMPT_EXPECTED: &str =
    "a string, an array of strings, an array of token ids, or an array of arrays of token ids";
const PROMPT_ITEM_EXPECTED: &str = "a string, a token id, or an array of token ids";
const TOKEN_EXPECTED: &str = "a token id (an integer from 0 to 4294967295)";
const TOKEN_LIST_EXPECTED: &str = "an array of token ids";

/// `prompt`; `null` reads as absent.
struct PromptSeed<'s> {
    slot: &'s Slot,
}

impl<'de> Visitor<'de> for PromptSeed<'_> {
    type Value = Option<Prompt<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PROMPT_EXPECTED} at `prompt`")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        if v.is_empty() {
            return Err(At { slot: self.slot, loc: Loc::Field("prompt") }.empty());
        }
        Ok(Some(Prompt::Text(Cow::Borrowed(v))))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v.is_empty() {
            return Err(At { slot: self.slot, loc: Loc::Field("prompt") }.empty());
        }
        Ok(Some(Prompt::Text(Cow::Owned(v.to_owned()))))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let at = At { slot: self.slot, loc: Loc::Field("prompt") };
        let item = |i| at.to(Loc::Item("prompt", i));
        let Some(first) = seq.next_element_seed(FirstItem { at: item(0) })? else {
            return Err(at.empty());
        };
        let prompt = match first {
            PromptItem::Text(text) => {
                let mut texts = vec![text];
                while let Some(text) = seq.next_element_seed(TextItem { at: item(texts.len()) })? {
                    texts.push(text);
                }
                Prompt::Texts(texts)
            }
            PromptItem::Token(id) => {
                let mut ids = vec![id];
                while let Some(id) =
                    seq.next_element_seed(Token { at: item(ids.len()), first: Some(Kind::Int) })?
                {
                    ids.push(id);
                }
                Prompt::Tokens(ids)
            }
            PromptItem::Tokens(ids) => {
                let mut batches = vec![ids];
                while let Some(ids) =
                    seq.next_element_seed(TokenList { at: item(batches.len()), index: batches.len() })?
                {
                    batches.push(ids);
                }
                Prompt::TokenBatches(batches)
            }
        };
        Ok(Some(prompt))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    reject!('de; bool, int, float, object);
}

impl Reject for PromptSeed<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        At { slot: self.slot, loc: Loc::Field("prompt") }.wrong(PROMPT_EXPECTED, got)
    }
}

seed_any!(PromptSeed, Option<Prompt<'de>>);

/// `prompt[0]`, which decides the kind of every other item.
enum PromptItem<'a> {
    Text(Cow<'a, str>),
    Token(TokenId),
    Tokens(Vec<TokenId>),
}

/// Reads `prompt[0]`.
struct FirstItem<'s> {
    at: At<'s>,
}

impl<'de> Visitor<'de> for FirstItem<'_> {
    type Value = PromptItem<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PROMPT_ITEM_EXPECTED} at `{}`", self.at.loc)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        TextItem { at: self.at }.visit_borrowed_str(v).map(PromptItem::Text)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        TextItem { at: self.at }.visit_str(v).map(PromptItem::Text)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Token { at: self.at, first: None }.visit_u64(v).map(PromptItem::Token)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Token { at: self.at, first: None }.visit_i64(v).map(PromptItem::Token)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        read_tokens(seq, self.at, 0).map(PromptItem::Tokens)
    }
    reject!('de; null, bool, float, object);
}

impl Reject for FirstItem<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        self.at.wrong(PROMPT_ITEM_EXPECTED, got)
    }
}

seed_any!(FirstItem, PromptItem<'de>);

/// A later item of a prompt array of strings.
struct TextItem<'s> {
    at: At<'s>,
}

impl<'de> Visitor<'de> for TextItem<'_> {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a string at `{}`", self.at.loc)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        if v.is_empty() {
            return Err(self.at.empty());
        }
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v.is_empty() {
            return Err(self.at.empty());
        }
        Ok(Cow::Owned(v.to_owned()))
    }
    reject!('de; null, bool, int, float, array, object);
}

impl Reject for TextItem<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        match got {
            Kind::Int | Kind::Array => self.at.mixed(got, Kind::Str),
            _ => self.at.wrong("a string", got),
        }
    }
}

seed_any!(TextItem, Cow<'de, str>);

/// A token id. `first` is the kind of `prompt[0]` when this is an item of the prompt array itself,
/// so that a string or array here reads as mixing kinds.
struct Token<'s> {
    at: At<'s>,
    first: Option<Kind>,
}

impl<'de> Visitor<'de> for Token<'_> {
    type Value = TokenId;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_EXPECTED} at `{}`", self.at.loc)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        TokenId::try_from(v).map_err(|_| self.at.out_of_range(TOKEN_EXPECTED, v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(self.at.out_of_range(TOKEN_EXPECTED, v)),
        }
    }
    reject!('de; null, bool, float, str, array, object);
}

impl Reject for Token<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        match self.first {
            Some(first) if matches!(got, Kind::Str | Kind::Array) => self.at.mixed(got, first),
            _ => self.at.wrong(TOKEN_EXPECTED, got),
        }
    }
}

seed_any!(Token, TokenId);

/// `prompt[index]`, a later item of a prompt array of token id arrays.
struct TokenList<'s> {
    at: At<'s>,
    index: usize,
}

impl<'de> Visitor<'de> for TokenList<'_> {
    type Value = Vec<TokenId>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_LIST_EXPECTED} at `{}`", self.at.loc)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        read_tokens(seq, self.at, self.index)
    }
    reject!('de; null, bool, int, float, str, object);
}

impl Reject for TokenList<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        match got {
            Kind::Str | Kind::Int => self.at.mixed(got, Kind::Array),
            _ => self.at.wrong(TOKEN_LIST_EXPECTED, got),
        }
    }
}

seed_any!(TokenList, Vec<TokenId>);

/// The token ids of `prompt[index]` (at `at`); an empty array is an error.
fn read_tokens<'de, A: SeqAccess<'de>>(
    mut seq: A,
    at: At<'_>,
    index: usize,
) -> Result<Vec<TokenId>, A::Error> {
    let mut ids = Vec::new();
    while let Some(id) =
        seq.next_element_seed(Token { at: at.to(Loc::Item2("prompt", index, ids.len())), first: None })?
    {
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(at.empty());
    }
    Ok(ids)
}

/// `messages`; `null` reads as absent.
struct Messages<'s> {
    slot: &'s Slot,
}

impl<'de> Visitor<'de> for Messages<'_> {
    type Value = Option<Vec<ChatMessage<'de>>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of messages at `messages`")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut messages = Vec::new();
        while let Some(message) = seq.next_element_seed(Message { slot: self.slot, index: messages.len() })? {
            messages.push(message);
        }
        if messages.is_empty() {
            return Err(At { slot: self.slot, loc: Loc::Field("messages") }.empty());
        }
        Ok(Some(messages))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    reject!('de; bool, int, float, str, object);
}

impl Reject for Messages<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        At { slot: self.slot, loc: Loc::Field("messages") }.wrong("an array of messages", got)
    }
}

seed_any!(Messages, Option<Vec<ChatMessage<'de>>>);

/// `messages[index]`.
struct Message<'s> {
    slot: &'s Slot,
    index: usize,
}

impl Message<'_> {
    fn at(&self, field: Option<&'static str>) -> At<'_> {
        At { slot: self.slot, loc: Loc::Message(self.index, field) }
    }
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = ChatMessage<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a message object at `messages[{}]`", self.index)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let str_at = |field| Str { at: self.at(Some(field)), non_empty: false };
        let (mut role, mut content, mut name) = (None, None, None);
        let (mut tool_calls, mut tool_call_id, mut reasoning_content) = (None, None, None);
        while let Some(key) = map.next_key_seed(key::<MessageKey>())? {
            match key {
                MessageKey::Role => role = map.next_value_seed(str_at("role"))?,
                MessageKey::Content => {
                    content = map.next_value_seed(Content { slot: self.slot, message: self.index })?;
                }
                MessageKey::Name => name = map.next_value_seed(str_at("name"))?,
                MessageKey::ToolCalls => {
                    let at = self.at(Some("tool_calls"));
                    tool_calls = raw_of_kind(map.next_value()?, at, Kind::Array, "an array of tool calls")?;
                }
                MessageKey::ToolCallId => tool_call_id = map.next_value_seed(str_at("tool_call_id"))?,
                MessageKey::ReasoningContent => {
                    reasoning_content = map.next_value_seed(str_at("reasoning_content"))?;
                }
                MessageKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let role = role.ok_or_else(|| self.at(Some("role")).missing())?;
        Ok(ChatMessage { role, content, name, tool_calls, tool_call_id, reasoning_content })
    }
    reject!('de; null, bool, int, float, str, array);
}

impl Reject for Message<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        self.at(None).wrong("a message object", got)
    }
}

seed_any!(Message, ChatMessage<'de>);

const CONTENT_EXPECTED: &str = "a string, an array of content parts, or null";
const PART_EXPECTED: &str = "a content part object or a string";

/// `messages[message].content`; `null` reads as absent.
struct Content<'s> {
    slot: &'s Slot,
    message: usize,
}

impl<'de> Visitor<'de> for Content<'_> {
    type Value = Option<MessageContent<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{CONTENT_EXPECTED} at `messages[{}].content`", self.message)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(MessageContent::Text(JsonText::new(v))))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(MessageContent::Text(JsonText::new(v.to_owned()))))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut parts = Vec::new();
        while let Some(part) =
            seq.next_element_seed(Part { slot: self.slot, message: self.message, part: parts.len() })?
        {
            parts.push(part);
        }
        Ok(Some(MessageContent::Parts(parts)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    reject!('de; bool, int, float, object);
}

impl Reject for Content<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        At { slot: self.slot, loc: Loc::Message(self.message, Some("content")) }.wrong(CONTENT_EXPECTED, got)
    }
}

/// A string is kept in its JSON form, read in place (see [`JsonText`]): a long chat turn is
/// scanned once and neither decoded nor copied here. Anything else is read again from its raw JSON.
impl<'de> DeserializeSeed<'de> for Content<'_> {
    type Value = Option<MessageContent<'de>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        let json = raw.get();
        if json.starts_with('"') {
            return match JsonText::from_literal(json) {
                Ok(text) => Ok(Some(MessageContent::Text(text))),
                Err(e) => {
                    let detail = format!("invalid string at `messages[{}].content`: {e}", self.message);
                    Err(raise(self.slot, RequestError::MalformedJson { detail }))
                }
            };
        }
        let slot = self.slot;
        serde_json::Deserializer::from_str(json).deserialize_any(self).map_err(|e| rethrow(slot, e))
    }
}

/// `messages[message].content[part]`. A media part is kept whole as raw JSON, so the part is first
/// taken as a raw slice and then read again for its `type` and `text`: a second pass over the part,
/// cheap next to tokenizing it.
#[derive(Clone, Copy)]
struct Part<'s> {
    slot: &'s Slot,
    message: usize,
    part: usize,
}

impl<'de> DeserializeSeed<'de> for Part<'_> {
    type Value = ContentPart<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        let json = raw.get();
        let at = At { slot: self.slot, loc: Loc::Part(self.message, self.part, None) };
        let mut de = serde_json::Deserializer::from_str(json);
        let part = match Kind::of_raw(json) {
            Kind::Object => PartFields { part: self, raw }.deserialize(&mut de),
            Kind::Str => Str { at, non_empty: false }
                .deserialize(&mut de)
                .map(|text| ContentPart::Text(text.unwrap_or_default())),
            got => return Err(at.wrong(PART_EXPECTED, got)),
        };
        part.map_err(|e| rethrow(self.slot, e))
    }
}

/// The fields of a content part object, read from its raw JSON.
struct PartFields<'s, 'de> {
    part: Part<'s>,
    raw: &'de RawValue,
}

impl<'s> PartFields<'s, '_> {
    fn at(&self, field: &'static str) -> At<'s> {
        At { slot: self.part.slot, loc: Loc::Part(self.part.message, self.part.part, Some(field)) }
    }
}

impl<'de> DeserializeSeed<'de> for PartFields<'_, 'de> {
    type Value = ContentPart<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PartFields<'_, 'de> {
    type Value = ContentPart<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a content part object at `{}`", Loc::Part(self.part.message, self.part.part, None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut kind, mut text) = (None, None);
        while let Some(key) = map.next_key_seed(key::<PartKey>())? {
            match key {
                PartKey::Type => kind = map.next_value_seed(Str { at: self.at("type"), non_empty: false })?,
                // Whether `text` matters depends on `type`, which may come after it.
                PartKey::Text => text = map.next_value_seed(AnyStr)?,
                PartKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let kind = kind.ok_or_else(|| self.at("type").missing())?;
        if kind != "text" {
            return Ok(ContentPart::Media { kind, raw: self.raw });
        }
        match text {
            Some(Ok(text)) => Ok(ContentPart::Text(text)),
            Some(Err(got)) => Err(self.at("text").wrong("a string", got)),
            None => Err(self.at("text").missing()),
        }
    }
}

/// Any value: a string, the kind of anything else, or `None` for `null`.
struct AnyStr;

impl<'de> Visitor<'de> for AnyStr {
    type Value = Option<Result<Cow<'de, str>, Kind>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Ok(Cow::Borrowed(v))))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Ok(Cow::Owned(v.to_owned()))))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Some(Err(Kind::Bool)))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Some(Err(Kind::Int)))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Some(Err(Kind::Int)))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Some(Err(Kind::Float)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Some(Err(Kind::Array)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Some(Err(Kind::Object)))
    }
}

impl<'de> DeserializeSeed<'de> for AnyStr {
    type Value = Option<Result<Cow<'de, str>, Kind>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// Top-level fields both endpoints have, gathered while the body is read.
#[derive(Default)]
struct Common<'a> {
    model: Option<Cow<'a, str>>,
    stream: Option<bool>,
    include_usage: Option<bool>,
    max_tokens: Option<u32>,
    n: Option<u32>,
    cache_salt: Option<Cow<'a, str>>,
    add_special_tokens: Option<bool>,
}

impl<'a> Common<'a> {
    /// Reads the value of `key` if both endpoints have the field, and skips it otherwise.
    fn read<A: MapAccess<'a>>(&mut self, key: BodyKey, map: &mut A, slot: &Slot) -> Result<(), A::Error> {
        let at = |name| At { slot, loc: Loc::Field(name) };
        match key {
            BodyKey::Model => self.model = map.next_value_seed(Str { at: at("model"), non_empty: true })?,
            BodyKey::Stream => self.stream = map.next_value_seed(Bool { at: at("stream") })?,
            BodyKey::StreamOptions => self.include_usage = map.next_value_seed(StreamOptions { slot })?,
            BodyKey::MaxTokens => {
                self.max_tokens = map.next_value_seed(Count { at: at("max_tokens"), min: 0 })?
            }
            BodyKey::N => self.n = map.next_value_seed(Count { at: at("n"), min: 1 })?,
            // vLLM refuses an empty salt.
            BodyKey::CacheSalt => {
                self.cache_salt = map.next_value_seed(Str { at: at("cache_salt"), non_empty: true })?;
            }
            BodyKey::AddSpecialTokens => {
                self.add_special_tokens = map.next_value_seed(Bool { at: at("add_special_tokens") })?;
            }
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A `/v1/completions` body.
struct CompletionBody<'s> {
    slot: &'s Slot,
}

impl<'de> Visitor<'de> for CompletionBody<'_> {
    type Value = CompletionRequest<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a completion request object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let slot = self.slot;
        let at = |name| At { slot, loc: Loc::Field(name) };
        let mut common = Common::default();
        let mut prompt = None;
        while let Some(key) = map.next_key_seed(key::<BodyKey>())? {
            match key {
                BodyKey::Prompt => prompt = map.next_value_seed(PromptSeed { slot })?,
                key => common.read(key, &mut map, slot)?,
            }
        }
        let Common { model, stream, include_usage, max_tokens, n, cache_salt, add_special_tokens } = common;
        let model = model.ok_or_else(|| at("model").missing())?;
        let prompt = prompt.ok_or_else(|| at("prompt").missing())?;
        Ok(CompletionRequest {
            model,
            prompt,
            stream: stream.unwrap_or(false),
            include_usage: include_usage.unwrap_or(false),
            max_tokens,
            n: n.unwrap_or(1),
            cache_salt,
            add_special_tokens: add_special_tokens.unwrap_or(true),
        })
    }
    reject!('de; null, bool, int, float, str, array);
}

impl Reject for CompletionBody<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        raise(self.slot, RequestError::NotAnObject { got: got.describe() })
    }
}

seed_any!(CompletionBody, CompletionRequest<'de>);

/// A `/v1/chat/completions` body.
struct ChatBody<'s> {
    slot: &'s Slot,
}

impl<'de> Visitor<'de> for ChatBody<'_> {
    type Value = ChatRequest<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a chat completion request object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let slot = self.slot;
        let at = |name| At { slot, loc: Loc::Field(name) };
        let mut common = Common::default();
        let (mut messages, mut tools, mut tool_choice, mut documents) = (None, None, None, None);
        let (mut chat_template_kwargs, mut chat_template) = (None, None);
        let (mut add_generation_prompt, mut continue_final_message) = (None, None);
        let mut max_completion_tokens = None;
        while let Some(key) = map.next_key_seed(key::<BodyKey>())? {
            match key {
                BodyKey::Messages => messages = map.next_value_seed(Messages { slot })?,
                BodyKey::Tools => {
                    tools =
                        map.next_value_seed(RawList { at: at("tools"), expected: "an array of tools" })?;
                }
                BodyKey::ToolChoice => tool_choice = map.next_value()?,
                BodyKey::Documents => {
                    let expected = "an array of documents";
                    documents = map.next_value_seed(RawList { at: at("documents"), expected })?;
                }
                BodyKey::ChatTemplateKwargs => {
                    let at = at("chat_template_kwargs");
                    chat_template_kwargs = raw_of_kind(map.next_value()?, at, Kind::Object, "an object")?;
                }
                BodyKey::ChatTemplate => {
                    chat_template = map.next_value_seed(Str { at: at("chat_template"), non_empty: false })?;
                }
                BodyKey::AddGenerationPrompt => {
                    add_generation_prompt = map.next_value_seed(Bool { at: at("add_generation_prompt") })?;
                }
                BodyKey::ContinueFinalMessage => {
                    continue_final_message =
                        map.next_value_seed(Bool { at: at("continue_final_message") })?;
                }
                BodyKey::MaxCompletionTokens => {
                    let at = at("max_completion_tokens");
                    max_completion_tokens = map.next_value_seed(Count { at, min: 0 })?;
                }
                key => common.read(key, &mut map, slot)?,
            }
        }
        let Common { model, stream, include_usage, max_tokens, n, cache_salt, add_special_tokens } = common;
        let model = model.ok_or_else(|| at("model").missing())?;
        let messages = messages.ok_or_else(|| at("messages").missing())?;
        Ok(ChatRequest {
            model,
            messages,
            tools,
            tool_choice,
            documents,
            chat_template_kwargs,
            chat_template,
            add_generation_prompt: add_generation_prompt.unwrap_or(true),
            continue_final_message: continue_final_message.unwrap_or(false),
            add_special_tokens: add_special_tokens.unwrap_or(false),
            stream: stream.unwrap_or(false),
            include_usage: include_usage.unwrap_or(false),
            max_tokens,
            max_completion_tokens,
            n: n.unwrap_or(1),
            cache_salt,
        })
    }
    reject!('de; null, bool, int, float, str, array);
}

impl Reject for ChatBody<'_> {
    fn reject<E: de::Error>(&self, got: Kind) -> E {
        raise(self.slot, RequestError::NotAnObject { got: got.describe() })
    }
}

seed_any!(ChatBody, ChatRequest<'de>);

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(body: &str) -> Result<CompletionRequest<'_>, RequestError> {
        match parse_request(Endpoint::Completions, body.as_bytes(), &RequestLimits::default())? {
            InferenceRequest::Completion(request) => Ok(request),
            InferenceRequest::Chat(_) => panic!("a completion body parsed as chat"),
        }
    }

    #[test]
    fn token_id_prompts_with_spaces_parse_and_bad_items_are_named() {
        let request = completion(r#"{"model":"m","prompt":[ 1, 2 ,3 ]}"#).expect("valid");
        assert_eq!(request.prompt, Prompt::Tokens(vec![1, 2, 3]));
        assert_field_error(completion(r#"{"model":"m","prompt":[1,-2]}"#), "prompt[1]");
        assert_field_error(completion(r#"{"model":"m","prompt":[1,"x"]}"#), "prompt[1]");
    }

    fn chat(body: &str) -> Result<ChatRequest<'_>, RequestError> {
        match parse_request(Endpoint::ChatCompletions, body.as_bytes(), &RequestLimits::default())? {
            InferenceRequest::Chat(request) => Ok(request),
            InferenceRequest::Completion(_) => panic!("a chat body parsed as completion"),
        }
    }

    /// Asserts a field error: status 400, `param` is `field`, the message names it, and the
    /// OpenAI body carries both.
    #[track_caller]
    fn assert_field_error(result: Result<impl fmt::Debug, RequestError>, field: &str) -> RequestError {
        let err = result.expect_err("the body should be refused");
        assert_eq!(err.status(), 400, "{err}");
        assert_eq!(err.error_type(), "invalid_request_error");
        assert_eq!(err.param(), Some(field), "{err}");
        assert!(err.to_string().contains(&format!("`{field}`")), "message does not name `{field}`: {err}");
        let body: serde_json::Value = serde_json::from_str(&err.error_body()).expect("error body is JSON");
        assert_eq!(body["error"]["param"], field);
        assert_eq!(body["error"]["code"], 400);
        err
    }

    #[track_caller]
    fn chat_error(body: &str, field: &str) -> RequestError {
        assert_field_error(chat(body), field)
    }

    #[track_caller]
    fn completion_error(body: &str, field: &str) -> RequestError {
        assert_field_error(completion(body), field)
    }

    // --- endpoints and limits ---

    #[test]
    fn endpoint_from_path_knows_both_paths_and_ignores_query() {
        assert_eq!(Endpoint::from_path("/v1/completions"), Some(Endpoint::Completions));
        assert_eq!(Endpoint::from_path("/v1/chat/completions"), Some(Endpoint::ChatCompletions));
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions?api-version=2024-06-01"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(Endpoint::from_path("/v1/completions?"), Some(Endpoint::Completions));
        assert_eq!(Endpoint::from_path("/v1/models"), None);
        assert_eq!(Endpoint::from_path("/v1/completions/"), None);
        assert_eq!(Endpoint::from_path("/v1/chat/completions/x"), None);
        assert_eq!(Endpoint::from_path(""), None);
        for endpoint in [Endpoint::Completions, Endpoint::ChatCompletions] {
            assert_eq!(Endpoint::from_path(endpoint.path()), Some(endpoint));
        }
    }

    #[test]
    fn default_limit_is_eight_mebibytes() {
        assert_eq!(RequestLimits::default().max_body_bytes, 8 * 1024 * 1024);
    }

    #[test]
    fn body_over_limit_is_413_before_parsing() {
        let limits = RequestLimits { max_body_bytes: 10 };
        // Not even JSON: the length alone decides.
        let err = parse_request(Endpoint::Completions, b"{{{{{{{{{{{", &limits).unwrap_err();
        assert_eq!(err, RequestError::BodyTooLarge { limit: 10, got: 11 });
        assert_eq!(err.status(), 413);
        assert_eq!(err.param(), None);
        assert!(err.to_string().contains("11 bytes") && err.to_string().contains("10 bytes"), "{err}");
        let body = br#"{"model":"m","prompt":"hi"}"#;
        let exact = RequestLimits { max_body_bytes: body.len() };
        assert!(parse_request(Endpoint::Completions, body, &exact).is_ok());
    }

    // --- completions ---

    #[test]
    fn completion_text_prompt_borrows_from_body() {
        let r = completion(r#"{"model":"llama","prompt":"Hello there"}"#).unwrap();
        assert_eq!(r.model, "llama");
        assert!(matches!(r.model, Cow::Borrowed(_)));
        assert_eq!(r.prompt, Prompt::Text("Hello there".into()));
        assert!(matches!(r.prompt, Prompt::Text(Cow::Borrowed(_))));
        assert_eq!(r.prompt.len(), 1);
    }

    #[test]
    fn escaped_strings_are_unescaped_into_owned() {
        let r = completion(r#"{"model":"m\u0031","prompt":"line\nnext \"q\""}"#).unwrap();
        assert_eq!(r.model, "m1");
        assert_eq!(r.prompt, Prompt::Text("line\nnext \"q\"".into()));
        assert!(matches!(r.prompt, Prompt::Text(Cow::Owned(_))));
    }

    #[test]
    fn completion_text_batch() {
        let r = completion(r#"{"model":"m","prompt":["a","b","c"]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Texts(vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(r.prompt.len(), 3);
    }

    #[test]
    fn completion_token_prompt() {
        let r = completion(r#"{"model":"m","prompt":[1, 0, 4294967295]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 0, u32::MAX]));
    }

    #[test]
    fn completion_token_batches() {
        let r = completion(r#"{"model":"m","prompt":[[1,2],[3],[4,5,6]]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::TokenBatches(vec![vec![1, 2], vec![3], vec![4, 5, 6]]));
        assert_eq!(r.prompt.len(), 3);
    }

    #[test]
    fn completion_defaults() {
        let r = completion(r#"{"model":"m","prompt":"x"}"#).unwrap();
        assert!(!r.stream);
        assert!(!r.include_usage);
        assert_eq!(r.max_tokens, None);
        assert_eq!(r.n, 1);
        assert_eq!(r.cache_salt, None);
        assert!(r.add_special_tokens, "vLLM adds special tokens to completion prompts by default");
    }

    #[test]
    fn completion_reads_routing_fields_and_ignores_unknown_ones() {
        let body = r#"{
            "model": "m", "prompt": "x", "stream": true, "stream_options": {"include_usage": true,
            "continuous_usage_stats": false}, "max_tokens": 16, "n": 2, "cache_salt": "tenant-a",
            "add_special_tokens": false, "temperature": 0.7, "logprobs": 3, "vllm_xargs": {"a": [1, {"b": null}]},
            "kv_transfer_params": {"do_remote_decode": true}, "messages": "ignored on this endpoint",
            "max_completion_tokens": "ignored too"
        }"#;
        let r = completion(body).unwrap();
        assert!(r.stream && r.include_usage && !r.add_special_tokens);
        assert_eq!((r.max_tokens, r.n), (Some(16), 2));
        assert_eq!(r.cache_salt.as_deref(), Some("tenant-a"));
    }

    #[test]
    fn null_fields_act_as_absent() {
        let r = completion(
            r#"{"model":"m","prompt":"x","stream":null,"stream_options":null,"max_tokens":null,"n":null,
                "cache_salt":null,"add_special_tokens":null,"suffix":null}"#,
        )
        .unwrap();
        assert!(!r.stream && !r.include_usage && r.add_special_tokens);
        assert_eq!((r.max_tokens, r.n, r.cache_salt), (None, 1, None));
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":null,"name":null,"tool_calls":null,
                "tool_call_id":null,"reasoning_content":null}],"tools":null,"tool_choice":null,"documents":null,
                "chat_template_kwargs":null,"chat_template":null,"add_generation_prompt":null,
                "continue_final_message":null,"max_completion_tokens":null,"stream_options":{"include_usage":null}}"#,
        )
        .unwrap();
        let m = &r.messages[0];
        assert!(m.content.is_none() && m.name.is_none() && m.tool_calls.is_none());
        assert!(m.tool_call_id.is_none() && m.reasoning_content.is_none());
        assert!(r.tools.is_none() && r.tool_choice.is_none() && r.documents.is_none());
        assert!(r.chat_template_kwargs.is_none() && r.chat_template.is_none());
        assert!(r.add_generation_prompt && !r.continue_final_message && !r.include_usage);
        assert_eq!(r.max_completion_tokens, None);
    }

    #[test]
    fn last_duplicate_key_wins_as_in_python() {
        let r = completion(r#"{"model":"first","prompt":"x","model":"second","stream":true,"stream":null}"#)
            .unwrap();
        assert_eq!(r.model, "second");
        assert!(!r.stream);
    }

    #[test]
    fn deeply_nested_unknown_field_is_skipped_without_recursion() {
        let depth = 100_000;
        let body =
            format!(r#"{{"model":"m","prompt":"x","junk":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
        assert!(completion(&body).is_ok());
    }

    // --- chat ---

    #[test]
    fn chat_with_string_content() {
        let r = chat(
            r#"{"model":"qwen","messages":[{"role":"system","content":"Be brief."},
                {"role":"user","content":"Hi","name":"ann"}]}"#,
        )
        .unwrap();
        assert_eq!(r.model, "qwen");
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.messages[0].role, "system");
        assert_eq!(r.messages[0].content, Some(MessageContent::Text("Be brief.".into())));
        assert!(matches!(&r.messages[0].content, Some(MessageContent::Text(t)) if !t.is_escaped()));
        assert_eq!(r.messages[1].name.as_deref(), Some("ann"));
        assert!(!r.has_media());
    }

    #[test]
    fn chat_defaults() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert!(r.add_generation_prompt);
        assert!(!r.continue_final_message);
        assert!(!r.add_special_tokens, "vLLM adds no special tokens to a rendered chat by default");
        assert!(!r.stream && !r.include_usage);
        assert_eq!((r.max_tokens, r.max_completion_tokens, r.n), (None, None, 1));
        assert!(r.tools.is_none() && r.documents.is_none() && r.chat_template_kwargs.is_none());
    }

    #[test]
    fn chat_with_text_and_image_parts() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":[
                {"type":"text","text":"What is this?"},
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"auto"}},
                "a bare string part",
                {"text":"type may come last","type":"text","cache_control":{"type":"ephemeral"}}
            ]}]}"#,
        )
        .unwrap();
        let Some(MessageContent::Parts(parts)) = &r.messages[0].content else { panic!("expected parts") };
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], ContentPart::Text("What is this?".into()));
        let ContentPart::Media { kind, raw } = &parts[1] else { panic!("expected media") };
        assert_eq!(kind, "image_url");
        assert_eq!(
            raw.get(),
            r#"{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"auto"}}"#
        );
        assert_eq!(parts[2], ContentPart::Text("a bare string part".into()));
        assert_eq!(parts[3], ContentPart::Text("type may come last".into()));
        assert!(r.has_media());
    }

    #[test]
    fn media_part_keeps_a_non_string_text_field() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","text":[1],"file":{}}]}]}"#,
        )
        .unwrap();
        let Some(MessageContent::Parts(parts)) = &r.messages[0].content else { panic!("expected parts") };
        assert!(matches!(&parts[0], ContentPart::Media { kind, .. } if kind == "file"));
    }

    #[test]
    fn chat_with_tool_calls_and_null_content() {
        let r = chat(
            r#"{"model":"m","messages":[
                {"role":"user","content":"weather?"},
                {"role":"assistant","content":null,"reasoning_content":"need a tool",
                 "tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}}]},
                {"role":"tool","tool_call_id":"call_1","content":"12C"},
                {"role":"assistant"}
            ]}"#,
        )
        .unwrap();
        let assistant = &r.messages[1];
        assert_eq!(assistant.content, None);
        assert_eq!(assistant.reasoning_content.as_deref(), Some("need a tool"));
        let calls = assistant.tool_calls.expect("tool calls kept");
        assert!(calls.get().starts_with(r#"[{"id":"call_1""#) && calls.get().ends_with("}]"));
        assert_eq!(r.messages[2].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(r.messages[3].content, None);
    }

    #[test]
    fn tools_documents_and_template_kwargs_are_kept_raw() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],
                "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}, {"type":"function"}],
                "tool_choice":"auto",
                "documents":[{"title":"a","text":"b"}],
                "chat_template_kwargs":{"enable_thinking":false},
                "chat_template":"{{ messages }}",
                "add_generation_prompt":false,"continue_final_message":true,"add_special_tokens":true}"#,
        )
        .unwrap();
        let tools = r.tools.as_ref().expect("tools kept");
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[1].get(), r#"{"type":"function"}"#);
        assert_eq!(r.tool_choice.map(RawValue::get), Some(r#""auto""#));
        assert_eq!(r.documents.as_ref().map(|d| d[0].get()), Some(r#"{"title":"a","text":"b"}"#));
        assert_eq!(r.chat_template_kwargs.map(RawValue::get), Some(r#"{"enable_thinking":false}"#));
        assert_eq!(r.chat_template.as_deref(), Some("{{ messages }}"));
        assert!(!r.add_generation_prompt && r.continue_final_message && r.add_special_tokens);
    }

    #[test]
    fn max_completion_tokens_is_preferred_over_max_tokens() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":5,"max_completion_tokens":7}"#)
            .unwrap();
        assert_eq!(r.max_output_tokens(), Some(7));
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":5}"#).unwrap();
        assert_eq!(r.max_output_tokens(), Some(5));
    }

    #[test]
    fn inference_request_accessors_cover_both_endpoints() {
        let limits = RequestLimits::default();
        let body = br#"{"model":"m","prompt":"x","stream":true,"max_tokens":3,"n":2,"cache_salt":"s",
            "stream_options":{"include_usage":true}}"#;
        let r = parse_request(Endpoint::Completions, body, &limits).unwrap();
        assert_eq!(r.endpoint(), Endpoint::Completions);
        assert_eq!((r.model(), r.stream(), r.include_usage()), ("m", true, true));
        assert_eq!((r.max_output_tokens(), r.n(), r.cache_salt()), (Some(3), 2, Some("s")));
        let body = br#"{"model":"c","messages":[{"role":"user","content":"x"}],"max_tokens":1,"max_completion_tokens":9}"#;
        let r = parse_request(Endpoint::ChatCompletions, body, &limits).unwrap();
        assert_eq!(r.endpoint(), Endpoint::ChatCompletions);
        assert_eq!((r.model(), r.stream(), r.include_usage()), ("c", false, false));
        assert_eq!((r.max_output_tokens(), r.n(), r.cache_salt()), (Some(9), 1, None));
    }

    #[test]
    fn chat_message_serializes_for_a_template_engine() {
        let r = chat(
            r#"{"model":"m","messages":[
                {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"u"}}]},
                {"role":"assistant","content":null,"tool_calls":[{"id":"c"}]}]}"#,
        )
        .unwrap();
        let json = serde_json::to_string(&r.messages).unwrap();
        assert_eq!(
            json,
            r#"[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"u"}}]},{"role":"assistant","content":null,"tool_calls":[{"id":"c"}]}]"#
        );
    }

    #[test]
    fn requests_deserialize_through_serde_with_named_errors() {
        let r: ChatRequest<'_> =
            serde_json::from_str(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!(r.messages[0].role, "user");
        let r: CompletionRequest<'_> = serde_json::from_str(r#"{"model":"m","prompt":[1,2]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2]));
        let err = serde_json::from_str::<ChatRequest<'_>>(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`messages[0].content[0].text` is required"), "{err}");
    }

    // --- error paths: the body as a whole ---

    #[test]
    fn empty_body_is_refused() {
        for body in ["", "  \n\t"] {
            let err = completion(body).unwrap_err();
            assert_eq!(err, RequestError::EmptyBody);
            assert_eq!((err.status(), err.param()), (400, None));
        }
    }

    #[test]
    fn malformed_json_is_400_with_the_parser_detail() {
        for body in [
            r#"{"model":"m","prompt":"x""#,
            r#"{"model":"m",}"#,
            r#"{"model":"m","prompt":"x"} extra"#,
            "{'a':1}",
        ] {
            let err = completion(body).unwrap_err();
            assert!(matches!(err, RequestError::MalformedJson { .. }), "{body}: {err:?}");
            assert_eq!((err.status(), err.param()), (400, None));
            assert!(err.to_string().contains("line 1 column"), "{err}");
        }
    }

    #[test]
    fn malformed_json_inside_a_content_part_is_400() {
        let err = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"]}]}"#)
            .unwrap_err();
        assert!(matches!(err, RequestError::MalformedJson { .. }), "{err:?}");
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn invalid_utf8_is_malformed_json() {
        let err = parse_request(Endpoint::Completions, b"{\"model\":\"m\xff\"}", &RequestLimits::default())
            .unwrap_err();
        assert_eq!(err, RequestError::MalformedJson { detail: "invalid UTF-8 at byte 11".into() });
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn non_object_body_is_refused() {
        for (body, got) in [("[1]", "an array"), ("\"x\"", "a string"), ("null", "null"), ("3", "an integer")]
        {
            let err = chat(body).unwrap_err();
            assert_eq!(err, RequestError::NotAnObject { got });
            assert_eq!((err.status(), err.param()), (400, None));
        }
    }

    // --- error paths: shared fields ---

    #[test]
    fn missing_or_null_model_is_refused() {
        completion_error(r#"{"prompt":"x"}"#, "model");
        let err = chat_error(r#"{"model":null,"messages":[{"role":"user","content":"x"}]}"#, "model");
        assert!(matches!(err, RequestError::MissingField { .. }));
    }

    #[test]
    fn empty_model_is_refused() {
        let err = completion_error(r#"{"model":"","prompt":"x"}"#, "model");
        assert!(matches!(err, RequestError::Empty { .. }));
    }

    #[test]
    fn model_of_wrong_type_is_refused() {
        let err = completion_error(r#"{"model":7,"prompt":"x"}"#, "model");
        assert_eq!(
            err,
            RequestError::WrongType { field: "model".into(), expected: "a string", got: "an integer" }
        );
    }

    #[test]
    fn stream_of_wrong_type_is_refused() {
        let err = completion_error(r#"{"model":"m","prompt":"x","stream":"true"}"#, "stream");
        assert!(err.to_string().contains("must be a boolean, got a string"), "{err}");
    }

    #[test]
    fn stream_options_of_wrong_shape_are_refused() {
        completion_error(r#"{"model":"m","prompt":"x","stream_options":true}"#, "stream_options");
        completion_error(
            r#"{"model":"m","prompt":"x","stream_options":{"include_usage":1}}"#,
            "stream_options.include_usage",
        );
    }

    #[test]
    fn max_tokens_must_be_a_non_negative_u32() {
        let err = completion_error(r#"{"model":"m","prompt":"x","max_tokens":-1}"#, "max_tokens");
        assert!(matches!(&err, RequestError::OutOfRange { value, .. } if value == "-1"), "{err:?}");
        let err = completion_error(r#"{"model":"m","prompt":"x","max_tokens":4294967296}"#, "max_tokens");
        assert!(matches!(err, RequestError::OutOfRange { .. }));
        let err = completion_error(r#"{"model":"m","prompt":"x","max_tokens":1.5}"#, "max_tokens");
        assert!(matches!(err, RequestError::WrongType { got: "a floating-point number", .. }));
        completion_error(r#"{"model":"m","prompt":"x","max_tokens":"10"}"#, "max_tokens");
        let chat_body =
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":-5}"#;
        chat_error(chat_body, "max_completion_tokens");
        assert_eq!(
            completion(r#"{"model":"m","prompt":"x","max_tokens":0}"#).unwrap().max_tokens,
            Some(0),
            "zero is non-negative; the engine decides whether it is useful"
        );
    }

    #[test]
    fn n_must_be_positive() {
        let err = completion_error(r#"{"model":"m","prompt":"x","n":0}"#, "n");
        assert!(err.to_string().contains("an integer from 1 to 4294967295, got 0"), "{err}");
    }

    #[test]
    fn cache_salt_must_be_a_non_empty_string() {
        let err = completion_error(r#"{"model":"m","prompt":"x","cache_salt":""}"#, "cache_salt");
        assert!(matches!(err, RequestError::Empty { .. }));
        completion_error(r#"{"model":"m","prompt":"x","cache_salt":1}"#, "cache_salt");
    }

    #[test]
    fn add_special_tokens_of_wrong_type_is_refused() {
        completion_error(r#"{"model":"m","prompt":"x","add_special_tokens":"no"}"#, "add_special_tokens");
    }

    // --- error paths: prompt ---

    #[test]
    fn missing_prompt_is_refused() {
        let err = completion_error(r#"{"model":"m"}"#, "prompt");
        assert!(matches!(err, RequestError::MissingField { .. }));
        completion_error(r#"{"model":"m","prompt":null}"#, "prompt");
    }

    #[test]
    fn empty_prompts_are_refused() {
        for (body, field) in [
            (r#"{"model":"m","prompt":""}"#, "prompt"),
            (r#"{"model":"m","prompt":[]}"#, "prompt"),
            (r#"{"model":"m","prompt":["a",""]}"#, "prompt[1]"),
            (r#"{"model":"m","prompt":[""]}"#, "prompt[0]"),
            (r#"{"model":"m","prompt":[[]]}"#, "prompt[0]"),
            (r#"{"model":"m","prompt":[[1],[]]}"#, "prompt[1]"),
        ] {
            let err = completion_error(body, field);
            assert!(matches!(err, RequestError::Empty { .. }), "{body}: {err:?}");
        }
    }

    #[test]
    fn prompt_of_wrong_type_is_refused() {
        for body in
            [r#"{"model":"m","prompt":{}}"#, r#"{"model":"m","prompt":true}"#, r#"{"model":"m","prompt":5}"#]
        {
            let err = completion_error(body, "prompt");
            assert!(matches!(err, RequestError::WrongType { .. }), "{body}: {err:?}");
        }
        completion_error(r#"{"model":"m","prompt":[null]}"#, "prompt[0]");
        completion_error(r#"{"model":"m","prompt":[1.5]}"#, "prompt[0]");
        completion_error(r#"{"model":"m","prompt":["a",false]}"#, "prompt[1]");
        completion_error(r#"{"model":"m","prompt":[1,null]}"#, "prompt[1]");
        completion_error(r#"{"model":"m","prompt":[[1],{}]}"#, "prompt[1]");
        completion_error(r#"{"model":"m","prompt":[[1],[2,"x"]]}"#, "prompt[1][1]");
        completion_error(r#"{"model":"m","prompt":[[1.0]]}"#, "prompt[0][0]");
    }

    #[test]
    fn token_ids_must_fit_u32_and_be_non_negative() {
        let err = completion_error(r#"{"model":"m","prompt":[1,2,3,-1]}"#, "prompt[3]");
        assert!(matches!(&err, RequestError::OutOfRange { value, .. } if value == "-1"), "{err:?}");
        completion_error(r#"{"model":"m","prompt":[1,4294967296]}"#, "prompt[1]");
        completion_error(r#"{"model":"m","prompt":[-7]}"#, "prompt[0]");
        completion_error(r#"{"model":"m","prompt":[[1],[2,-3]]}"#, "prompt[1][1]");
    }

    #[test]
    fn prompt_mixing_kinds_is_refused() {
        for (body, field, got, first) in [
            (r#"{"model":"m","prompt":["a","b",3]}"#, "prompt[2]", "an integer", "a string"),
            (r#"{"model":"m","prompt":[1,"a"]}"#, "prompt[1]", "a string", "an integer"),
            (r#"{"model":"m","prompt":[1,[2]]}"#, "prompt[1]", "an array", "an integer"),
            (r#"{"model":"m","prompt":[[1],2]}"#, "prompt[1]", "an integer", "an array"),
            (r#"{"model":"m","prompt":[[1],"a"]}"#, "prompt[1]", "a string", "an array"),
            (r#"{"model":"m","prompt":["a",[1]]}"#, "prompt[1]", "an array", "a string"),
        ] {
            let err = completion_error(body, field);
            assert_eq!(err, RequestError::MixedPrompt { field: field.into(), got, first }, "{body}");
        }
    }

    // --- error paths: chat ---

    #[test]
    fn missing_or_empty_messages_are_refused() {
        let err = chat_error(r#"{"model":"m"}"#, "messages");
        assert!(matches!(err, RequestError::MissingField { .. }));
        chat_error(r#"{"model":"m","messages":null}"#, "messages");
        let err = chat_error(r#"{"model":"m","messages":[]}"#, "messages");
        assert!(matches!(err, RequestError::Empty { .. }));
    }

    #[test]
    fn messages_of_wrong_type_are_refused() {
        chat_error(r#"{"model":"m","messages":{"role":"user"}}"#, "messages");
        chat_error(r#"{"model":"m","messages":"hi"}"#, "messages");
        chat_error(r#"{"model":"m","messages":[{"role":"user","content":"x"},"hi"]}"#, "messages[1]");
        chat_error(r#"{"model":"m","messages":[null]}"#, "messages[0]");
    }

    #[test]
    fn message_role_is_required_and_a_string() {
        let err = chat_error(
            r#"{"model":"m","messages":[{"role":"user","content":"x"},{"content":"y"}]}"#,
            "messages[1].role",
        );
        assert!(matches!(err, RequestError::MissingField { .. }));
        chat_error(r#"{"model":"m","messages":[{"role":null,"content":"y"}]}"#, "messages[0].role");
        chat_error(r#"{"model":"m","messages":[{"role":1,"content":"y"}]}"#, "messages[0].role");
    }

    #[test]
    fn message_string_fields_of_wrong_type_are_refused() {
        for field in ["name", "tool_call_id", "reasoning_content"] {
            let body =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x","{field}":{{}}}}]}}"#);
            chat_error(&body, &format!("messages[0].{field}"));
        }
    }

    #[test]
    fn tool_calls_must_be_an_array() {
        let err = chat_error(
            r#"{"model":"m","messages":[{"role":"assistant","tool_calls":{"id":"c"}}]}"#,
            "messages[0].tool_calls",
        );
        assert!(matches!(err, RequestError::WrongType { got: "an object", .. }));
    }

    #[test]
    fn content_of_wrong_type_is_refused() {
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":{"type":"text","text":"x"}}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":true}]}"#,
        ] {
            chat_error(body, "messages[0].content");
        }
    }

    #[test]
    fn content_part_of_wrong_type_is_refused() {
        chat_error(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},7]}]}"#,
            "messages[0].content[1]",
        );
        chat_error(
            r#"{"model":"m","messages":[{"role":"user","content":[null]}]}"#,
            "messages[0].content[0]",
        );
        chat_error(
            r#"{"model":"m","messages":[{"role":"user","content":[["x"]]}]}"#,
            "messages[0].content[0]",
        );
    }

    #[test]
    fn content_part_needs_a_string_type() {
        let err = chat_error(
            r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"user","content":[{"text":"a"}]}]}"#,
            "messages[1].content[0].type",
        );
        assert!(matches!(err, RequestError::MissingField { .. }));
        chat_error(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":3}]}]}"#,
            "messages[0].content[0].type",
        );
        chat_error(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":null}]}]}"#,
            "messages[0].content[0].type",
        );
    }

    #[test]
    fn text_part_needs_a_string_text() {
        let body = r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"u"},
            {"role":"user","content":[{"type":"text"}]}]}"#;
        let err = chat_error(body, "messages[2].content[0].text");
        assert!(matches!(err, RequestError::MissingField { .. }));
        chat_error(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":null}]}]}"#,
            "messages[0].content[0].text",
        );
        let err = chat_error(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"text":{"x":1},"type":"text"}]}]}"#,
            "messages[0].content[1].text",
        );
        assert!(matches!(err, RequestError::WrongType { got: "an object", .. }), "{err:?}");
    }

    #[test]
    fn chat_raw_fields_of_wrong_kind_are_refused() {
        let base = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
        for (extra, field) in [
            (r#""tools":{"type":"function"}"#, "tools"),
            (r#""documents":"doc""#, "documents"),
            (r#""chat_template_kwargs":[1]"#, "chat_template_kwargs"),
            (r#""chat_template_kwargs":"x""#, "chat_template_kwargs"),
            (r#""chat_template":1"#, "chat_template"),
            (r#""add_generation_prompt":1"#, "add_generation_prompt"),
            (r#""continue_final_message":"yes""#, "continue_final_message"),
        ] {
            chat_error(&format!("{{{base},{extra}}}"), field);
        }
    }

    // --- error bodies ---

    #[test]
    fn openai_error_body_is_json_and_escapes_quotes() {
        let body = openai_error_body("bad \"model\"\n\\ here", "invalid_request_error", Some("model"), 400);
        let v: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(v["error"]["message"], "bad \"model\"\n\\ here");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], 400);
        assert!(body.contains(r#"bad \"model\""#), "{body}");
        let body = openai_error_body("too big", "invalid_request_error", None, 413);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn request_error_body_carries_status_and_field() {
        let err =
            chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}"#).unwrap_err();
        let v: serde_json::Value = serde_json::from_str(&err.error_body()).unwrap();
        assert_eq!(v["error"]["message"], "`messages[0].content[0].text` is required");
        assert_eq!(v["error"]["param"], "messages[0].content[0].text");
        assert_eq!(v["error"]["code"], 400);
        let too_big = RequestError::BodyTooLarge { limit: 1, got: 2 };
        let v: serde_json::Value = serde_json::from_str(&too_big.error_body()).unwrap();
        assert_eq!(v["error"]["code"], 413);
    }

    #[test]
    fn request_error_converts_into_the_crate_error() {
        let err: crate::Error = RequestError::EmptyBody.into();
        assert!(matches!(err, crate::Error::Request(RequestError::EmptyBody)));
    }
}
