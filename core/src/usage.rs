//! The engine's own count of cached prompt tokens, read from responses as they pass through, and
//! how it compares with the overlap the router predicted (routing accuracy).
//!
//! Engines report prefix-cache hits in OpenAI's `usage.prompt_tokens_details.cached_tokens`: in the
//! body of a non-streamed response, and in the usage chunk that ends a streamed one
//! (`stream_options.include_usage`). [`UsageScanner`] is fed the response body chunk by chunk, as
//! the proxy forwards it, and never holds the body: it follows the JSON structure of the top-level
//! object (of the body, or of each server-sent event's data) and keeps only the bytes of its `usage`
//! value, at most [`DEFAULT_MAX_USAGE_BYTES`]. Content of any length, in any event, costs no memory,
//! which matters because some engines put `usage` in the same event as content.
//!
//! What engines send (read in their sources):
//! - vLLM fills `prompt_tokens_details` only when started with `--enable-prompt-tokens-details`,
//!   SGLang only with `--enable-cache-report`, and both leave it out when nothing was cached
//!   (vLLM: `if self.enable_prompt_tokens_details and num_cached_tokens:` in its serving code;
//!   SGLang: `UsageProcessor._details_if_cached`). So an absent count is 0 on an engine known to
//!   report, and unknown otherwise: the caller says which with [`MissingDetails`].
//! - vLLM's `continuous_usage_stats` puts a usage object without details in every content chunk;
//!   the final usage chunk after them has the details. OpenAI sends `"usage": null` in content
//!   chunks. So the last non-null usage seen is the answer.
//! - No engine counts the whole prompt as cached: see [`engine_visible_prediction`].

use serde::Deserialize;

/// Default limit on the bytes of one `usage` value kept while it is read (one is about 300 bytes).
pub const DEFAULT_MAX_USAGE_BYTES: usize = 16 << 10;

/// A response body format the scanner reads.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum BodyKind {
    /// `application/json`: a non-streamed completion with `usage` at the top level.
    Json,
    /// `text/event-stream`: server-sent events, each `data:` a JSON chunk, ended by `data: [DONE]`.
    EventStream,
}

impl BodyKind {
    /// The kind a `content-type` header value names (parameters such as `charset` ignored).
    pub fn from_content_type(content_type: &str) -> Option<BodyKind> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        if media.eq_ignore_ascii_case("application/json") {
            Some(BodyKind::Json)
        } else if media.eq_ignore_ascii_case("text/event-stream") {
            Some(BodyKind::EventStream)
        } else {
            None
        }
    }
}

/// Token counts of one response, as the engine reported them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Usage {
    /// Prompt tokens (`usage.prompt_tokens`; the sum over prompts for a batch).
    pub prompt_tokens: u64,
    /// Prompt tokens the engine found in its prefix cache
    /// (`usage.prompt_tokens_details.cached_tokens`); `None` when the details or the count are
    /// absent or `null`.
    pub cached_tokens: Option<u64>,
}

/// How to read a usage object that has no cached-token count.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum MissingDetails {
    /// As unknown: the engine may not report cached tokens at all (the default of vLLM and SGLang).
    #[default]
    Unknown,
    /// As 0: the engine is known to report them (vLLM `--enable-prompt-tokens-details`, SGLang
    /// `--enable-cache-report`) and leaves the details out when nothing was cached.
    Zero,
}

impl Usage {
    /// Cached prompt tokens, with an absent count read as `missing` says.
    pub fn cached_tokens_or(&self, missing: MissingDetails) -> Option<u64> {
        match (self.cached_tokens, missing) {
            (Some(cached), _) => Some(cached),
            (None, MissingDetails::Zero) => Some(0),
            (None, MissingDetails::Unknown) => None,
        }
    }
}

/// The `usage` object on the wire; every other field is skipped unread.
#[derive(Deserialize)]
struct UsageWire {
    prompt_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<DetailsWire>,
}

/// `usage.prompt_tokens_details` on the wire.
#[derive(Deserialize)]
struct DetailsWire {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl From<UsageWire> for Usage {
    fn from(wire: UsageWire) -> Usage {
        Usage {
            prompt_tokens: wire.prompt_tokens,
            cached_tokens: wire.prompt_tokens_details.and_then(|d| d.cached_tokens),
        }
    }
}

/// What a scan met that it could not use, for logs and tests.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct ScanStats {
    /// Server-sent events that carried data, `[DONE]` included (0 for a JSON body).
    pub events: u64,
    /// Documents (the body, or an event's data) that were not one well-formed JSON object, and
    /// `usage` values that did not parse.
    pub malformed: u64,
    /// `usage` values longer than the scanner's limit, dropped unread.
    pub oversized: u64,
}

/// Reads a response body, fed in chunks, for the engine's [`Usage`]; holds at most one `usage`
/// value, never the body.
#[derive(Debug)]
pub struct UsageScanner {
    body: Body,
    stats: ScanStats,
    /// Set by [`UsageScanner::finish`]; later chunks are ignored.
    result: Option<Option<Usage>>,
}

#[derive(Debug)]
enum Body {
    Json(UsageField),
    Events(EventStream),
}

impl UsageScanner {
    /// A scanner for a body of `kind`, keeping `usage` values up to [`DEFAULT_MAX_USAGE_BYTES`].
    pub fn new(kind: BodyKind) -> UsageScanner {
        UsageScanner::with_limit(kind, DEFAULT_MAX_USAGE_BYTES)
    }

    /// A scanner for a body of `kind` that drops `usage` values longer than `max_usage_bytes`.
    pub fn with_limit(kind: BodyKind, max_usage_bytes: usize) -> UsageScanner {
        let field = UsageField::new(max_usage_bytes);
        let body = match kind {
            BodyKind::Json => Body::Json(field),
            BodyKind::EventStream => Body::Events(EventStream::new(field)),
        };
        UsageScanner { body, stats: ScanStats::default(), result: None }
    }

    /// A scanner for a response with these headers, or `None` when its body cannot be read: a
    /// content type other than JSON or SSE, or a compressed body (`content-encoding` other than
    /// `identity`).
    pub fn for_response(content_type: &str, content_encoding: Option<&str>) -> Option<UsageScanner> {
        let encoded = content_encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
        if encoded {
            return None;
        }
        BodyKind::from_content_type(content_type).map(UsageScanner::new)
    }

    /// The body format being read.
    pub fn kind(&self) -> BodyKind {
        match self.body {
            Body::Json(_) => BodyKind::Json,
            Body::Events(_) => BodyKind::EventStream,
        }
    }

    /// Reads the next chunk of the body; a chunk may end anywhere, inside a line, a key or a number.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.result.is_some() {
            return;
        }
        match &mut self.body {
            Body::Json(field) => field.feed(chunk),
            Body::Events(events) => events.feed(chunk, &mut self.stats),
        }
    }

    /// Whether the rest of the body cannot change the answer: the JSON object closed, or the
    /// event stream sent `data: [DONE]`. Feeding more is harmless.
    pub fn is_complete(&self) -> bool {
        match &self.body {
            Body::Json(field) => field.state == Top::End,
            Body::Events(events) => events.done,
        }
    }

    /// The usage found, at the end of the body: for JSON the top-level `usage` of a well-formed
    /// object, for SSE the last non-null `usage` of any event. A last event not followed by a blank
    /// line still counts. Calling it again returns the same answer.
    pub fn finish(&mut self) -> Option<Usage> {
        if let Some(result) = self.result {
            return result;
        }
        let usage = match &mut self.body {
            Body::Json(field) => field.finish(&mut self.stats),
            Body::Events(events) => events.finish(&mut self.stats),
        };
        self.result = Some(usage);
        usage
    }

    /// What the scan has met so far that it could not use.
    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// Bytes of memory the scanner holds beyond its own size: never more than its limit.
    pub fn retained_capacity(&self) -> usize {
        match &self.body {
            Body::Json(field) => field.captured.capacity(),
            Body::Events(events) => events.event.captured.capacity(),
        }
    }
}

/// Where [`UsageField`] is in its document's top-level object.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Top {
    /// Before the opening `{`.
    Start,
    /// Expecting a key or `}`.
    Key,
    /// Inside a key's string.
    InKey,
    /// After a key, expecting `:`.
    Colon,
    /// Inside a member's value, at any depth.
    Value,
    /// The object closed; the rest is ignored.
    End,
    /// Not a JSON object: nothing more is read.
    Invalid,
}

const USAGE_KEY: &[u8] = b"usage";

/// Follows one JSON document's top-level object and keeps the bytes of its `usage` member's
/// value, parsed when the value ends. It tracks structure (strings, escapes, nesting) and nothing
/// else, so a document that is wrong inside a value it skips is not noticed.
#[derive(Debug)]
struct UsageField {
    state: Top,
    /// How many bytes of the key being read match `usage` so far; `None` once it cannot.
    key_match: Option<usize>,
    /// Nesting of objects and arrays inside the current value.
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Whether the current value is `usage`'s, so its bytes are kept.
    capturing: bool,
    /// Whether the current `usage` value outgrew `max_bytes` and was dropped.
    overflowed: bool,
    captured: Vec<u8>,
    max_bytes: usize,
    /// The last `usage` member's value: `None` while none was read, or when it was `null`, too
    /// long or malformed.
    usage: Option<Usage>,
    /// `usage` values dropped as too long, and values that did not parse.
    oversized: u64,
    bad_values: u64,
}

impl UsageField {
    fn new(max_bytes: usize) -> UsageField {
        UsageField {
            state: Top::Start,
            key_match: None,
            depth: 0,
            in_string: false,
            escaped: false,
            capturing: false,
            overflowed: false,
            captured: Vec::new(),
            max_bytes,
            usage: None,
            oversized: 0,
            bad_values: 0,
        }
    }

    /// Starts over for a new document, keeping the capture buffer's allocation.
    fn reset(&mut self) {
        let captured = std::mem::take(&mut self.captured);
        *self = UsageField { captured, ..UsageField::new(self.max_bytes) };
        self.captured.clear();
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while let Some((&b, rest)) = bytes.split_first() {
            match self.state {
                Top::Value => {
                    bytes = self.value(bytes);
                    continue;
                }
                Top::End | Top::Invalid => return,
                _ if b.is_ascii_whitespace() && self.state != Top::InKey => {}
                Top::Start if b == b'{' => self.state = Top::Key,
                Top::Key if b == b'"' => {
                    self.state = Top::InKey;
                    self.key_match = Some(0);
                }
                // `}` right after `{` (or, leniently, after a trailing comma).
                Top::Key if b == b'}' => self.state = Top::End,
                Top::InKey => self.key_byte(b),
                Top::Colon if b == b':' => self.start_value(),
                Top::Start | Top::Key | Top::Colon => self.fail(),
            }
            bytes = rest;
        }
    }

    fn key_byte(&mut self, b: u8) {
        if self.escaped {
            // An escaped key is never taken for `usage`; no engine writes one.
            self.escaped = false;
            self.key_match = None;
        } else if b == b'\\' {
            self.escaped = true;
            self.key_match = None;
        } else if b == b'"' {
            self.state = Top::Colon;
        } else {
            self.key_match = match self.key_match {
                Some(n) if USAGE_KEY.get(n) == Some(&b) => Some(n + 1),
                _ => None,
            };
        }
    }

    fn start_value(&mut self) {
        self.state = Top::Value;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.capturing = self.key_match == Some(USAGE_KEY.len());
        self.overflowed = false;
        self.captured.clear();
    }

    /// Reads value bytes up to the `,` or `}` that ends the value; returns what follows it.
    fn value<'b>(&mut self, bytes: &'b [u8]) -> &'b [u8] {
        let mut i = 0;
        while i < bytes.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                // Strings hold the content, so skip to their next quote or backslash at once.
                match bytes[i..].iter().position(|&c| c == b'"' || c == b'\\') {
                    Some(at) => {
                        i += at;
                        if bytes[i] == b'\\' {
                            self.escaped = true;
                        } else {
                            self.in_string = false;
                        }
                        i += 1;
                    }
                    None => i = bytes.len(),
                }
                continue;
            }
            match bytes[i] {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                b'}' | b']' if self.depth > 0 => self.depth -= 1,
                b'}' => {
                    self.capture(&bytes[..i]);
                    self.end_value();
                    self.state = Top::End;
                    return &bytes[i + 1..];
                }
                b',' if self.depth == 0 => {
                    self.capture(&bytes[..i]);
                    self.end_value();
                    self.state = Top::Key;
                    return &bytes[i + 1..];
                }
                b']' => {
                    self.fail();
                    return &[];
                }
                _ => {}
            }
            i += 1;
        }
        self.capture(bytes);
        &[]
    }

    /// Keeps `run`, the next bytes of a `usage` value, within `max_bytes` of capacity.
    fn capture(&mut self, run: &[u8]) {
        if !self.capturing || self.overflowed || run.is_empty() {
            return;
        }
        let needed = self.captured.len() + run.len();
        if needed > self.max_bytes {
            self.overflowed = true;
            self.captured.clear();
            return;
        }
        if needed > self.captured.capacity() {
            // Grow by doubling, but never past the limit (plain `extend` could overshoot it).
            let target = needed.max(self.captured.capacity() * 2).max(64).min(self.max_bytes);
            self.captured.reserve_exact(target - self.captured.len());
        }
        self.captured.extend_from_slice(run);
    }

    /// A member's value ended: parse it if it was `usage`'s. A later `usage` member wins, as in
    /// the engines' own JSON readers.
    fn end_value(&mut self) {
        if !self.capturing {
            return;
        }
        self.capturing = false;
        self.usage = if self.overflowed {
            self.oversized += 1;
            None
        } else {
            match serde_json::from_slice::<Option<UsageWire>>(&self.captured) {
                Ok(usage) => usage.map(Usage::from),
                Err(_) => {
                    self.bad_values += 1;
                    None
                }
            }
        };
        self.captured.clear();
    }

    fn fail(&mut self) {
        self.state = Top::Invalid;
        self.capturing = false;
        self.usage = None;
        self.captured.clear();
    }

    /// The document ended: its `usage` if it was one well-formed object; an empty document is
    /// not counted as malformed.
    fn finish(&mut self, stats: &mut ScanStats) -> Option<Usage> {
        stats.oversized += self.oversized;
        stats.malformed += self.bad_values;
        match self.state {
            Top::End => self.usage,
            Top::Start => None,
            _ => {
                stats.malformed += 1;
                None
            }
        }
    }
}

/// Where [`EventStream`] is in the current line.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Line {
    /// At the start of a line.
    Start,
    /// Reading a field name; the count is how many bytes of `data` it matches so far.
    Name(usize),
    /// After `data:`, where one space is skipped.
    DataSpace,
    /// Inside a `data` value.
    Data,
    /// In a comment or a field other than `data`, up to the line's end.
    Skip,
}

const DATA_FIELD: &[u8] = b"data";
const DONE: &[u8] = b"[DONE]";
/// Leading data bytes kept per event, enough to see `[DONE]`.
const HEAD: usize = 8;

/// A server-sent event stream, read line by line as the HTML standard's event-stream parser does
/// (lines end in CRLF, LF or CR; `:` starts a comment; `data` lines of one event are joined by a
/// newline; a blank line dispatches), with each event's data streamed into a [`UsageField`].
#[derive(Debug)]
struct EventStream {
    line: Line,
    /// The last byte was a CR, so an LF right after it ends no second line.
    after_cr: bool,
    event: UsageField,
    has_data: bool,
    /// The event's first data bytes and its data length, to recognise `[DONE]`.
    head: [u8; HEAD],
    data_len: usize,
    done: bool,
    last: Option<Usage>,
}

impl EventStream {
    fn new(event: UsageField) -> EventStream {
        EventStream {
            line: Line::Start,
            after_cr: false,
            event,
            has_data: false,
            head: [0; HEAD],
            data_len: 0,
            done: false,
            last: None,
        }
    }

    fn feed(&mut self, mut bytes: &[u8], stats: &mut ScanStats) {
        while let Some((&b, rest)) = bytes.split_first() {
            if self.done {
                return;
            }
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                bytes = rest;
                continue;
            }
            if b == b'\n' || b == b'\r' {
                self.end_line(stats);
                self.after_cr = b == b'\r';
                bytes = rest;
                continue;
            }
            match self.line {
                Line::Data | Line::Skip => {
                    let end = bytes.iter().position(|&c| c == b'\n' || c == b'\r').unwrap_or(bytes.len());
                    let (run, rest) = bytes.split_at(end);
                    if self.line == Line::Data {
                        self.data(run);
                    }
                    bytes = rest;
                    continue;
                }
                Line::Start if b == b':' => self.line = Line::Skip,
                Line::Start | Line::Name(_) => {
                    let matched = if let Line::Name(n) = self.line { n } else { 0 };
                    self.line = if b == b':' && matched == DATA_FIELD.len() {
                        Line::DataSpace
                    } else if DATA_FIELD.get(matched) == Some(&b) {
                        Line::Name(matched + 1)
                    } else {
                        Line::Skip
                    };
                }
                Line::DataSpace => {
                    self.line = Line::Data;
                    if b != b' ' {
                        // No space to skip: this byte is data.
                        continue;
                    }
                }
            }
            bytes = rest;
        }
    }

    fn data(&mut self, run: &[u8]) {
        self.event.feed(run);
        if self.data_len < HEAD {
            let n = run.len().min(HEAD - self.data_len);
            self.head[self.data_len..self.data_len + n].copy_from_slice(&run[..n]);
        }
        self.data_len = self.data_len.saturating_add(run.len());
    }

    fn end_line(&mut self, stats: &mut ScanStats) {
        match self.line {
            Line::Start => self.dispatch(stats),
            // `data` with no colon is a data line with an empty value.
            Line::Name(n) if n == DATA_FIELD.len() => self.end_data_line(),
            Line::DataSpace | Line::Data => self.end_data_line(),
            Line::Name(_) | Line::Skip => {}
        }
        self.line = Line::Start;
    }

    fn end_data_line(&mut self) {
        // Data lines are joined by a newline, which is whitespace to the JSON reader.
        self.data(b"\n");
        self.has_data = true;
    }

    fn dispatch(&mut self, stats: &mut ScanStats) {
        if !self.has_data {
            return;
        }
        stats.events += 1;
        let head = &self.head[..self.data_len.min(HEAD)];
        if self.data_len <= HEAD && head.trim_ascii() == DONE {
            self.done = true;
        } else if let Some(usage) = self.event.finish(stats) {
            self.last = Some(usage);
        }
        self.event.reset();
        self.has_data = false;
        self.data_len = 0;
    }

    fn finish(&mut self, stats: &mut ScanStats) -> Option<Usage> {
        if !self.done {
            if self.line != Line::Start {
                self.end_line(stats);
            }
            self.dispatch(stats);
        }
        self.last
    }
}

/// How a prediction compared with the engine's report.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Verdict {
    /// The engine had exactly the predicted cached tokens.
    Exact,
    /// The router predicted more cached tokens than the engine had.
    Over,
    /// The router predicted fewer cached tokens than the engine had.
    Under,
}

/// One routed request's predicted cached tokens against the engine's report.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Accuracy {
    /// How they compare.
    pub verdict: Verdict,
    /// Tokens the router predicted cached on the chosen worker (see [`engine_visible_prediction`]).
    pub predicted_cached_tokens: u64,
    /// Tokens the engine reported cached.
    pub reported_cached_tokens: u64,
}

impl Accuracy {
    /// Compares a prediction with the engine's report.
    pub fn compare(predicted_cached_tokens: u64, reported_cached_tokens: u64) -> Accuracy {
        let verdict = match predicted_cached_tokens.cmp(&reported_cached_tokens) {
            std::cmp::Ordering::Equal => Verdict::Exact,
            std::cmp::Ordering::Greater => Verdict::Over,
            std::cmp::Ordering::Less => Verdict::Under,
        };
        Accuracy { verdict, predicted_cached_tokens, reported_cached_tokens }
    }

    /// How far apart the prediction and the report are, in tokens.
    pub fn difference(&self) -> u64 {
        self.predicted_cached_tokens.abs_diff(self.reported_cached_tokens)
    }
}

/// The cached tokens an engine will report for a prompt of `prompt_tokens` of which
/// `predicted_blocks` leading blocks of `block_size` tokens are cached: the prediction capped at
/// `floor((prompt_tokens - 1) / block_size) * block_size`.
///
/// The cap is vLLM's: the last prompt token must be computed to get logits, so the prefix-cache
/// lookup stops one token short (`max_cache_hit_length = request.num_tokens - 1` in
/// `KVCacheManager.get_computed_blocks`, `vllm/v1/core/kv_cache_manager.py`, "When all tokens hit
/// the cache, we must recompute the last token to obtain logits"), and hits are whole blocks. A
/// fully cached prompt of 64 tokens in blocks of 16 reports 48. vLLM also skips the cache (reports
/// 0) for requests that ask for `prompt_logprobs`.
///
/// SGLang keeps at least one token to compute too (`max_prefix_len = input_len - 1`, lower still
/// down to `logprob_start_len` when logprobs are asked for; `Req` in
/// `python/sglang/srt/managers/schedule_batch.py`), but its radix cache matches by page, one token
/// by default: a fully cached prompt of 64 tokens reports 63, and partial blocks count. Against
/// SGLang, compare at block granularity (round the report down to a block) or expect `Under` by
/// less than a block. TensorRT-LLM likewise stores the KV of all but the last token.
pub fn engine_visible_prediction(predicted_blocks: u32, prompt_tokens: u64, block_size: u32) -> u64 {
    let block_size = u64::from(block_size.max(1));
    let most = prompt_tokens.saturating_sub(1) / block_size * block_size;
    (u64::from(predicted_blocks) * block_size).min(most)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const JSON_BODY: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m",
        "choices":[{"index":0,"message":{"role":"assistant","content":"a } ] , \" \\ \"usage\":{}"},
        "finish_reason":"stop"}],
        "usage":{"prompt_tokens":100,"total_tokens":110,"completion_tokens":10,
                 "prompt_tokens_details":{"cached_tokens":96}},"prompt_logprobs":null}"#;

    const USAGE_96: Usage = Usage { prompt_tokens: 100, cached_tokens: Some(96) };

    fn sse_stream(line_end: &str) -> String {
        let events = [
            r#"data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}"#,
            r#": keep-alive comment"#,
            r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hello\n\ndata: [DONE]"}}]}"#,
            r#"data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"data: {"id":"c","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":3,"total_tokens":103,"prompt_tokens_details":{"cached_tokens":96}}}"#,
            "data: [DONE]",
        ];
        let mut out = String::new();
        for event in events {
            out.push_str(event);
            out.push_str(line_end);
            if !event.starts_with(':') {
                out.push_str(line_end);
            }
        }
        out
    }

    fn scan(kind: BodyKind, chunks: &[&[u8]]) -> Option<Usage> {
        let mut scanner = UsageScanner::new(kind);
        for chunk in chunks {
            scanner.feed(chunk);
        }
        scanner.finish()
    }

    fn scan_split(kind: BodyKind, body: &[u8], cuts: &[usize]) -> (Option<Usage>, ScanStats) {
        let mut scanner = UsageScanner::new(kind);
        let mut at = 0;
        for &cut in cuts {
            let cut = cut.clamp(at, body.len());
            scanner.feed(&body[at..cut]);
            at = cut;
        }
        scanner.feed(&body[at..]);
        (scanner.finish(), scanner.stats())
    }

    #[test]
    fn json_body_in_one_chunk() {
        assert_eq!(scan(BodyKind::Json, &[JSON_BODY.as_bytes()]), Some(USAGE_96));
    }

    #[test]
    fn json_body_split_byte_by_byte() {
        let mut scanner = UsageScanner::new(BodyKind::Json);
        for byte in JSON_BODY.as_bytes() {
            scanner.feed(std::slice::from_ref(byte));
        }
        assert!(scanner.is_complete());
        assert_eq!(scanner.finish(), Some(USAGE_96));
        assert_eq!(scanner.stats(), ScanStats::default());
    }

    #[test]
    fn json_body_without_usage_has_none() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"hi"}}]}"#;
        assert_eq!(scan(BodyKind::Json, &[body]), None);
    }

    #[test]
    fn null_or_missing_details_give_no_cached_count() {
        for body in [
            r#"{"usage":{"prompt_tokens":7,"prompt_tokens_details":null}}"#,
            r#"{"usage":{"prompt_tokens":7}}"#,
            r#"{"usage":{"prompt_tokens":7,"prompt_tokens_details":{"cached_tokens":null}}}"#,
            r#"{"usage":{"prompt_tokens":7,"prompt_tokens_details":{"audio_tokens":0}}}"#,
        ] {
            let usage = scan(BodyKind::Json, &[body.as_bytes()]);
            assert_eq!(usage, Some(Usage { prompt_tokens: 7, cached_tokens: None }), "{body}");
        }
    }

    #[test]
    fn missing_details_read_as_zero_only_when_the_engine_reports() {
        let usage = Usage { prompt_tokens: 7, cached_tokens: None };
        assert_eq!(usage.cached_tokens_or(MissingDetails::Unknown), None);
        assert_eq!(usage.cached_tokens_or(MissingDetails::Zero), Some(0));
        assert_eq!(USAGE_96.cached_tokens_or(MissingDetails::Unknown), Some(96));
    }

    #[test]
    fn usage_null_and_nested_usage_keys_are_not_taken() {
        let body = br#"{"usage":null,"choices":[{"usage":{"prompt_tokens":1}}]}"#;
        assert_eq!(scan(BodyKind::Json, &[body]), None);
        let body = br#"{"x":{"usage":{"prompt_tokens":1}},"usages":{"prompt_tokens":2}}"#;
        assert_eq!(scan(BodyKind::Json, &[body]), None);
    }

    #[test]
    fn last_usage_member_wins() {
        let body = br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#;
        assert_eq!(scan(BodyKind::Json, &[body]), Some(Usage { prompt_tokens: 2, cached_tokens: None }));
    }

    #[test]
    fn malformed_json_gives_no_usage() {
        for body in [
            &br#"{"usage":{"prompt_tokens":100},"#[..],
            br#"{"usage":{"prompt_tokens":"many"}}"#,
            br#"{"usage":{"prompt_tokens":1}"#,
            br#"[{"usage":{"prompt_tokens":1}}]"#,
            br#"{"usage":{"prompt_tokens":1}] }"#,
            br#"{"usage" {"prompt_tokens":1}}"#,
            b"Internal Server Error",
            b"{\xff\xfe\"usage\":1}",
        ] {
            let mut scanner = UsageScanner::new(BodyKind::Json);
            scanner.feed(body);
            assert_eq!(scanner.finish(), None, "{}", String::from_utf8_lossy(body));
            assert!(scanner.stats().malformed >= 1, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(scan(BodyKind::Json, &[b""]), None);
    }

    #[test]
    fn huge_json_content_is_skipped_without_being_kept() {
        let content = "x".repeat(1 << 20);
        let body = format!(
            r#"{{"choices":[{{"message":{{"content":"{content}"}}}}],"usage":{{"prompt_tokens":5,"prompt_tokens_details":{{"cached_tokens":0}}}}}}"#
        );
        let mut scanner = UsageScanner::new(BodyKind::Json);
        for chunk in body.as_bytes().chunks(16 << 10) {
            scanner.feed(chunk);
            assert!(scanner.retained_capacity() <= DEFAULT_MAX_USAGE_BYTES);
        }
        assert_eq!(scanner.finish(), Some(Usage { prompt_tokens: 5, cached_tokens: Some(0) }));
        assert!(scanner.retained_capacity() < 1024);
    }

    #[test]
    fn sse_final_usage_chunk_split_at_every_offset() {
        let stream = sse_stream("\n");
        let body = stream.as_bytes();
        for cut in 0..=body.len() {
            let (usage, stats) = scan_split(BodyKind::EventStream, body, &[cut]);
            assert_eq!(usage, Some(USAGE_96), "cut at {cut}");
            assert_eq!(stats, ScanStats { events: 5, malformed: 0, oversized: 0 }, "cut at {cut}");
        }
        for first in (0..body.len()).step_by(7) {
            for second in (first..body.len()).step_by(11) {
                let (usage, _) = scan_split(BodyKind::EventStream, body, &[first, second]);
                assert_eq!(usage, Some(USAGE_96), "cuts at {first}, {second}");
            }
        }
    }

    #[test]
    fn sse_split_byte_by_byte() {
        let stream = sse_stream("\r\n");
        let chunks: Vec<&[u8]> = stream.as_bytes().chunks(1).collect();
        assert_eq!(scan(BodyKind::EventStream, &chunks), Some(USAGE_96));
    }

    #[test]
    fn sse_crlf_and_cr_line_endings() {
        for line_end in ["\r\n", "\r"] {
            let stream = sse_stream(line_end);
            let body = stream.as_bytes();
            for cut in 0..=body.len() {
                let (usage, stats) = scan_split(BodyKind::EventStream, body, &[cut]);
                assert_eq!(usage, Some(USAGE_96), "{line_end:?} cut at {cut}");
                assert_eq!(stats.events, 5, "{line_end:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn sse_multiple_data_lines_form_one_event() {
        let lines = [
            "data: {\"choices\":[],",
            "data:\"usage\":{\"prompt_tokens\":9,",
            "data: \"prompt_tokens_details\":{\"cached_tokens\":8}}}",
            "",
            "data: [DONE]",
            "",
        ];
        for line_end in ["\n", "\r\n", "\r"] {
            let body = lines.map(|line| format!("{line}{line_end}")).concat();
            for cut in 0..=body.len() {
                let mut scanner = UsageScanner::new(BodyKind::EventStream);
                scanner.feed(&body.as_bytes()[..cut]);
                scanner.feed(&body.as_bytes()[cut..]);
                assert!(scanner.is_complete(), "{line_end:?} cut at {cut}");
                let usage = scanner.finish();
                assert_eq!(
                    usage,
                    Some(Usage { prompt_tokens: 9, cached_tokens: Some(8) }),
                    "{line_end:?} {cut}"
                );
                assert_eq!(scanner.stats(), ScanStats { events: 2, malformed: 0, oversized: 0 });
            }
        }
    }

    #[test]
    fn sse_other_fields_and_comments_are_ignored() {
        let body = ": ping\n\
                    event: message\n\
                    id: 7\n\
                    retry: 100\n\
                    database: {\"usage\":{\"prompt_tokens\":1}}\n\
                    dat: {\"usage\":{\"prompt_tokens\":2}}\n\
                    data: {\"usage\":{\"prompt_tokens\":3}}\n\n";
        assert_eq!(
            scan(BodyKind::EventStream, &[body.as_bytes()]),
            Some(Usage { prompt_tokens: 3, cached_tokens: None })
        );
    }

    #[test]
    fn sse_without_usage_has_none() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(scan(BodyKind::EventStream, &[body.as_bytes()]), None);
    }

    #[test]
    fn sse_continuous_usage_stats_take_the_last_usage() {
        // vLLM with `continuous_usage_stats`: usage without details in every content chunk, then
        // the final usage chunk with them.
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":1}}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2}}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n\
                    data: [DONE]\n\n";
        let usage = scan(BodyKind::EventStream, &[body.as_bytes()]);
        assert_eq!(usage, Some(Usage { prompt_tokens: 10, cached_tokens: Some(8) }));
        // A stream cut before the final chunk still has the last per-chunk usage.
        let cut = body.find("data: {\"choices\":[]").unwrap();
        let usage = scan(BodyKind::EventStream, &[&body.as_bytes()[..cut]]);
        assert_eq!(usage, Some(Usage { prompt_tokens: 10, cached_tokens: None }));
    }

    #[test]
    fn sse_events_after_done_are_ignored() {
        let body = "data: [DONE]\n\ndata: {\"usage\":{\"prompt_tokens\":3}}\n\n";
        let mut scanner = UsageScanner::new(BodyKind::EventStream);
        scanner.feed(body.as_bytes());
        assert!(scanner.is_complete());
        assert_eq!(scanner.finish(), None);
    }

    #[test]
    fn sse_last_event_without_blank_line_still_counts() {
        let body = "data: {\"usage\":{\"prompt_tokens\":3}}";
        let usage = scan(BodyKind::EventStream, &[body.as_bytes()]);
        assert_eq!(usage, Some(Usage { prompt_tokens: 3, cached_tokens: None }));
    }

    #[test]
    fn sse_malformed_event_is_counted_and_does_not_erase_usage() {
        let body = "data: {\"usage\":{\"prompt_tokens\":3}}\n\n\
                    data: {\"usage\":{\"prompt_tokens\":\n\n\
                    data: not json\n\n\
                    data: {\"usage\":{\"prompt_tokens\":-1}}\n\n";
        let mut scanner = UsageScanner::new(BodyKind::EventStream);
        scanner.feed(body.as_bytes());
        assert_eq!(scanner.finish(), Some(Usage { prompt_tokens: 3, cached_tokens: None }));
        assert_eq!(scanner.stats(), ScanStats { events: 4, malformed: 3, oversized: 0 });
    }

    #[test]
    fn over_long_usage_is_dropped_and_counted() {
        let padding = "1".repeat(200);
        let body = format!(
            "data: {{\"usage\":{{\"prompt_tokens\":3}}}}\n\n\
             data: {{\"usage\":{{\"prompt_tokens\":4,\"x\":\"{padding}\"}}}}\n\n"
        );
        let mut scanner = UsageScanner::with_limit(BodyKind::EventStream, 128);
        for chunk in body.as_bytes().chunks(5) {
            scanner.feed(chunk);
            assert!(scanner.retained_capacity() <= 128);
        }
        assert_eq!(scanner.finish(), Some(Usage { prompt_tokens: 3, cached_tokens: None }));
        assert_eq!(scanner.stats(), ScanStats { events: 2, malformed: 0, oversized: 1 });

        let mut scanner = UsageScanner::with_limit(BodyKind::Json, 128);
        scanner.feed(format!("{{\"usage\":{{\"prompt_tokens\":4,\"x\":\"{padding}\"}}}}").as_bytes());
        assert_eq!(scanner.finish(), None);
        assert_eq!(scanner.stats().oversized, 1);
    }

    #[test]
    fn megabyte_stream_keeps_memory_bounded() {
        let token = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"token \"}}],\"usage\":null}\n\n";
        // One event with a 1 MB content string, as some engines send when buffering.
        let giant =
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n", "y".repeat(1 << 20));
        let last = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"prompt_tokens_details\":{\"cached_tokens\":96}}}\n\ndata: [DONE]\n\n";
        fn feed(scanner: &mut UsageScanner, bytes: &[u8]) {
            for chunk in bytes.chunks(4093) {
                scanner.feed(chunk);
                assert!(scanner.retained_capacity() <= DEFAULT_MAX_USAGE_BYTES);
            }
        }
        let mut scanner = UsageScanner::new(BodyKind::EventStream);
        let mut fed = 0;
        while fed < 1 << 20 {
            feed(&mut scanner, token.as_bytes());
            fed += token.len();
        }
        feed(&mut scanner, giant.as_bytes());
        feed(&mut scanner, last.as_bytes());
        assert_eq!(scanner.finish(), Some(USAGE_96));
        assert!(scanner.retained_capacity() < 1024, "{}", scanner.retained_capacity());
        assert_eq!(scanner.stats().malformed, 0);
    }

    #[test]
    fn finish_is_stable_and_stops_reading() {
        let mut scanner = UsageScanner::new(BodyKind::Json);
        scanner.feed(br#"{"usage":{"prompt_tokens":1}}"#);
        let first = scanner.finish();
        scanner.feed(br#"{"usage":{"prompt_tokens":2}}"#);
        assert_eq!(scanner.finish(), first);
    }

    #[test]
    fn content_type_and_encoding_choose_the_scanner() {
        assert_eq!(BodyKind::from_content_type("application/json"), Some(BodyKind::Json));
        assert_eq!(BodyKind::from_content_type("Application/JSON; charset=utf-8"), Some(BodyKind::Json));
        assert_eq!(
            BodyKind::from_content_type("text/event-stream; charset=utf-8"),
            Some(BodyKind::EventStream)
        );
        assert_eq!(BodyKind::from_content_type("text/plain"), None);
        assert_eq!(BodyKind::from_content_type(""), None);
        let sse = UsageScanner::for_response("text/event-stream", None).map(|s| s.kind());
        assert_eq!(sse, Some(BodyKind::EventStream));
        assert!(UsageScanner::for_response("application/json", Some("identity")).is_some());
        assert!(UsageScanner::for_response("application/json", Some("gzip")).is_none());
    }

    #[test]
    fn accuracy_classifies_and_measures() {
        let exact = Accuracy::compare(48, 48);
        assert_eq!((exact.verdict, exact.difference()), (Verdict::Exact, 0));
        let over = Accuracy::compare(64, 16);
        assert_eq!((over.verdict, over.difference()), (Verdict::Over, 48));
        let under = Accuracy::compare(0, 32);
        assert_eq!((under.verdict, under.difference()), (Verdict::Under, 32));
    }

    #[test]
    fn engine_visible_prediction_recomputes_the_last_token() {
        // Fully cached, a whole number of blocks: vLLM recomputes the whole last block.
        assert_eq!(engine_visible_prediction(4, 64, 16), 48);
        // A partial last block: every full block can hit.
        assert_eq!(engine_visible_prediction(4, 65, 16), 64);
        assert_eq!(engine_visible_prediction(2, 100, 16), 32);
        assert_eq!(engine_visible_prediction(0, 100, 16), 0);
        assert_eq!(engine_visible_prediction(1, 1, 16), 0);
        assert_eq!(engine_visible_prediction(3, 0, 16), 0);
        assert_eq!(engine_visible_prediction(u32::MAX, u64::MAX, 0), u64::from(u32::MAX));
        assert_eq!(
            engine_visible_prediction(u32::MAX, u64::MAX, u32::MAX),
            u64::from(u32::MAX) * u64::from(u32::MAX)
        );
    }

    fn usage_json(usage: Option<(u64, Option<u64>)>) -> String {
        match usage {
            None => "null".to_owned(),
            Some((prompt, None)) => format!("{{\"prompt_tokens\":{prompt}}}"),
            Some((prompt, Some(cached))) => format!(
                "{{\"prompt_tokens\":{prompt},\"prompt_tokens_details\":{{\"cached_tokens\":{cached}}}}}"
            ),
        }
    }

    proptest! {
        #[test]
        fn splitting_anywhere_gives_the_one_chunk_result(
            contents in prop::collection::vec("[ -~\n\r\"\\\\{}\\[\\]:,]{0,40}", 0..6),
            usages in prop::collection::vec(prop::option::of((0u64..1_000_000, prop::option::of(0u64..1_000_000))), 0..4),
            line_end in prop::sample::select(vec!["\n", "\r\n", "\r"]),
            cuts in prop::collection::vec(0usize..4096, 0..8),
        ) {
            let mut cuts = cuts;
            let mut stream = String::new();
            for (i, content) in contents.iter().enumerate() {
                let content = serde_json::to_string(content).unwrap();
                stream.push_str(&format!("data: {{\"choices\":[{{\"delta\":{{\"content\":{content}}}}}]"));
                if let Some(usage) = usages.get(i) {
                    stream.push_str(&format!(",\"usage\":{}", usage_json(*usage)));
                }
                stream.push_str(&format!("}}{line_end}: comment{line_end}{line_end}"));
            }
            stream.push_str(&format!("data: [DONE]{line_end}{line_end}"));
            cuts.sort_unstable();
            let body = stream.as_bytes();
            let (whole, whole_stats) = scan_split(BodyKind::EventStream, body, &[]);
            let (split, split_stats) = scan_split(BodyKind::EventStream, body, &cuts);
            prop_assert_eq!(whole, split);
            prop_assert_eq!(whole_stats, split_stats);
            let expected = usages.iter().take(contents.len()).rev().flatten().next().map(|&(prompt_tokens, cached_tokens)| {
                Usage { prompt_tokens, cached_tokens }
            });
            prop_assert_eq!(whole, expected);

            // The same content as one JSON body.
            let json = format!(
                "{{\"choices\":{},\"usage\":{}}}",
                serde_json::to_string(&contents).unwrap(),
                usage_json(usages.first().copied().flatten()),
            );
            let (whole, _) = scan_split(BodyKind::Json, json.as_bytes(), &[]);
            let (split, _) = scan_split(BodyKind::Json, json.as_bytes(), &cuts);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(
            bytes in prop::collection::vec(any::<u8>(), 0..2048),
            cuts in prop::collection::vec(0usize..2048, 0..8),
        ) {
            for kind in [BodyKind::Json, BodyKind::EventStream] {
                let mut scanner = UsageScanner::with_limit(kind, 64);
                let mut cuts = cuts.clone();
                cuts.sort_unstable();
                let mut at = 0;
                for cut in cuts.into_iter().chain([bytes.len()]) {
                    let cut = cut.clamp(at, bytes.len());
                    scanner.feed(&bytes[at..cut]);
                    prop_assert!(scanner.retained_capacity() <= 64);
                    at = cut;
                }
                let _ = scanner.finish();
            }
        }
    }
}
