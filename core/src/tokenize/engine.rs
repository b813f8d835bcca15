//! The tokenizer engine behind our interface: HuggingFace `tokenizers` 1.0 (pinned rc).
//!
//! Nothing outside this file names the engine's types, so moving to 1.0 final (or to another
//! engine) touches only this file. We use the engine's parts (added-token matcher, normalizers,
//! pre-tokenizer, BPE model) but run the loop that joins them ourselves, the same loop as the
//! engine's `encode_sequence_into`, for three reasons:
//! - Unicode normalization forms run with 0.2x's Unicode 9 tables ([`super::normalize`]);
//! - the loop yields raw-text segments (between added tokens), which the segment cache keys on;
//! - the model runs a few pre-tokens at a time when the caller may stop early (early exit).

use std::borrow::Cow;

use tokenizers::pipeline::{
    Model, Normalizer, PipelineModelScratch, PipelineNormalizer, PipelinePatternMatcher, PipelineToken,
    PipelineTokenizer, PreTokenizer, PreTokenizerScratch, Span,
};

use super::TokenizeError;
use super::normalize::Form;
use crate::hash::TokenId;

/// The `version` the engine's reader accepts; anything else goes through [`canonicalize`] first.
const CANONICAL_VERSION: &str = "2.0";

/// One step of the normalizer chain as we run it.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// The engine's own normalizer at this index of its chain.
    Engine(usize),
    /// A Unicode normalization form, with 0.2x's tables instead of the engine's.
    Unicode9(Form),
}

/// A loaded tokenizer pipeline (normalizer, pre-tokenizer, BPE model, post-processor).
#[derive(Clone)]
pub(crate) struct Engine {
    inner: PipelineTokenizer,
    steps: Box<[Step]>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("normalizer", &self.steps).finish_non_exhaustive()
    }
}

/// Working buffers of one encoding thread: the model's word cache and the pre-tokenizer's
/// buffers. Reused across calls, so the per-request path allocates nothing once they are warm.
pub(crate) struct Scratch {
    model: PipelineModelScratch,
    split: PreTokenizerScratch,
    spans: Vec<Span>,
    ids: Vec<PipelineToken>,
}

/// A piece of text between added tokens, or an added token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// Text with no added token in it, starting at byte `start` of the input.
    Text {
        /// The text.
        text: &'a str,
        /// Its byte offset in the input.
        start: usize,
    },
    /// An added token matched in the input, ending at byte `end` (after any stripped space).
    Added {
        /// Its id.
        id: TokenId,
        /// Byte offset just after the match.
        end: usize,
    },
}

/// Splits text at added tokens, as the engine's `SpecialSegmentIterator` does, but with offsets.
pub(crate) struct Pieces<'a> {
    engine: &'a Engine,
    text: &'a str,
    offset: usize,
    normalized: bool,
    pending: Option<(TokenId, usize)>,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = Piece<'a>;

    fn next(&mut self) -> Option<Piece<'a>> {
        if let Some((id, end)) = self.pending.take() {
            return Some(Piece::Added { id, end });
        }
        if self.offset >= self.text.len() {
            return None;
        }
        let start = self.offset;
        let found = self.engine.inner.get_added_vocabulary().extract_next(
            self.text.as_bytes(),
            start,
            self.normalized,
            false,
        );
        match found {
            // A match must lie inside what is left and on char boundaries; anything else would
            // be an engine bug, and we treat the rest as plain text rather than panic.
            Some(((from, to), id)) if start <= from && from <= to && to <= self.text.len() && to > start => {
                match self.text.get(start..from) {
                    Some(before) => {
                        self.offset = to;
                        if before.is_empty() {
                            Some(Piece::Added { id, end: to })
                        } else {
                            self.pending = Some((id, to));
                            Some(Piece::Text { text: before, start })
                        }
                    }
                    None => self.rest(start),
                }
            }
            _ => self.rest(start),
        }
    }
}

impl<'a> Pieces<'a> {
    fn rest(&mut self, start: usize) -> Option<Piece<'a>> {
        self.offset = self.text.len();
        self.text.get(start..).map(|text| Piece::Text { text, start })
    }
}

/// How far [`Engine::encode_text`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Every id of the text went to the sink.
    Complete,
    /// The sink asked to stop; roughly this many leading bytes of the text were encoded (exact
    /// when normalization left the text as it was).
    Stopped {
        /// Bytes of the raw text whose ids went to the sink, at a char boundary.
        consumed: usize,
    },
}

/// Rewrites a `tokenizer.json` as HuggingFace ships it (`"version": "1.0"`) into the canonical
/// `2.0` form the 1.0 engine reads. Idempotent. Run it ahead of time (natively, e.g. in the control
/// plane): on the 11 MB Qwen3 file it costs a full `serde_json` round trip.
///
/// The output is compact and starts with `"version"`, so [`Engine::from_json`] recognises it from
/// its first bytes and loads it without converting again.
pub fn canonicalize(tokenizer_json: &str) -> Result<String, TokenizeError> {
    let json_error =
        |e: serde_json::Error| TokenizeError::Json { file: "tokenizer.json", reason: e.to_string() };
    let mut value: serde_json::Value = serde_json::from_str(tokenizer_json).map_err(json_error)?;
    tokenizers::canonicalize_value(&mut value)
        .map_err(|e| TokenizeError::Unsupported { file: "tokenizer.json", what: e.to_string() })?;
    // serde_json's map sorts its keys, which would put `version` last; write it first by hand.
    let serde_json::Value::Object(mut fields) = value else {
        return Err(TokenizeError::Json { file: "tokenizer.json", reason: "not a JSON object".to_owned() });
    };
    let version = fields.remove("version");
    let mut out = Vec::with_capacity(tokenizer_json.len());
    out.push(b'{');
    for (key, value) in
        version.iter().map(|v| ("version", v)).chain(fields.iter().map(|(k, v)| (k.as_str(), v)))
    {
        if out.len() > 1 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, key).map_err(json_error)?;
        out.push(b':');
        serde_json::to_writer(&mut out, value).map_err(json_error)?;
    }
    out.push(b'}');
    String::from_utf8(out).map_err(|e| TokenizeError::Json { file: "tokenizer.json", reason: e.to_string() })
}

/// Whether a `tokenizer.json` already is in the canonical form, judged by its top-level
/// `"version"` field, found without parsing the whole file (it may be megabytes): HF and
/// [`canonicalize`] write it first, a writer that sorts keys writes it last. A miss only costs a
/// conversion.
fn is_canonical(tokenizer_json: &str) -> bool {
    const WINDOW: usize = 256;
    let bytes = tokenizer_json.as_bytes();
    let head = &bytes[..bytes.len().min(WINDOW)];
    let tail = &bytes[bytes.len().saturating_sub(WINDOW)..];
    let version_in = |window: &[u8], last: bool| {
        let window = String::from_utf8_lossy(window);
        let at = if last { window.rfind("\"version\"") } else { window.find("\"version\"") };
        let Some(at) = at else { return false };
        let rest = window[at + "\"version\"".len()..].trim_start();
        let Some(rest) = rest.strip_prefix(':') else { return false };
        rest.trim_start().starts_with(&format!("\"{CANONICAL_VERSION}\""))
    };
    version_in(head, false) || version_in(tail, true)
}

/// The largest char boundary of `text` at or below `at`.
fn floor_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

impl Engine {
    /// Loads a `tokenizer.json`, canonical (`2.0`) or as HuggingFace ships it (converted here).
    pub(crate) fn from_json(tokenizer_json: &str) -> Result<Self, TokenizeError> {
        let converted;
        let canonical = if is_canonical(tokenizer_json) {
            tokenizer_json
        } else {
            converted = canonicalize(tokenizer_json)?;
            converted.as_str()
        };
        let inner = tokenizers::from_json(canonical)
            .map_err(|e| TokenizeError::Unsupported { file: "tokenizer.json", what: e.to_string() })?;
        Ok(Self::from_pipeline(inner))
    }

    fn from_pipeline(inner: PipelineTokenizer) -> Self {
        let steps = inner
            .get_normalizers()
            .iter()
            .enumerate()
            .map(|(i, n)| match n {
                PipelineNormalizer::NFC(_) => Step::Unicode9(Form::Nfc),
                PipelineNormalizer::NFD(_) => Step::Unicode9(Form::Nfd),
                PipelineNormalizer::NFKC(_) => Step::Unicode9(Form::Nfkc),
                PipelineNormalizer::NFKD(_) => Step::Unicode9(Form::Nfkd),
                _ => Step::Engine(i),
            })
            .collect();
        Engine { inner, steps }
    }

    /// Fresh working buffers for this engine (the model's word cache is allocated here).
    pub(crate) fn scratch(&self) -> Scratch {
        Scratch {
            model: self.inner.get_model().init_scratch(),
            split: PreTokenizerScratch::default(),
            spans: Vec::new(),
            ids: Vec::new(),
        }
    }

    /// Ids the post-processor adds before and after a single sequence (`add_special_tokens`).
    pub(crate) fn post_processor_specials(&self) -> (Vec<TokenId>, Vec<TokenId>) {
        let single = &self.inner.get_post_processor().single;
        let ids = |run: &[(PipelineToken, u8)]| run.iter().map(|(t, _)| t.id()).collect();
        (ids(&single.prefix), ids(&single.suffix))
    }

    /// `text` split at the added tokens matched on raw text (the first pass of the engine).
    pub(crate) fn pieces<'a>(&'a self, text: &'a str) -> Pieces<'a> {
        Pieces { engine: self, text, offset: 0, normalized: false, pending: None }
    }

    /// `text` after the normalizer chain; `offset` is where it starts in its sequence (a
    /// `Metaspace` normalizer acts on the first piece only).
    fn normalize<'a>(&self, text: &'a str, offset: usize) -> Result<Cow<'a, str>, TokenizeError> {
        let mut current = Cow::Borrowed(text);
        for step in self.steps.iter() {
            current = match (*step, current) {
                (Step::Unicode9(form), Cow::Borrowed(s)) => form.apply(s),
                (Step::Unicode9(form), Cow::Owned(s)) => match form.apply(&s) {
                    Cow::Borrowed(_) => Cow::Owned(s),
                    Cow::Owned(changed) => Cow::Owned(changed),
                },
                (Step::Engine(i), current) => {
                    let Some(normalizer) = self.inner.get_normalizers().get(i) else { return Ok(current) };
                    let out = normalizer
                        .normalize(&current, offset)
                        .map_err(|e| TokenizeError::Encode { reason: e.to_string() })?;
                    // Handed back untouched: keep what we have (a borrow of `text` stays one).
                    // Otherwise a part of it (`Strip`) or a rewrite; rare for byte-level BPE.
                    let unchanged = matches!(&out, Cow::Borrowed(b)
                        if b.as_ptr() == current.as_ptr() && b.len() == current.len());
                    if unchanged {
                        drop(out);
                        current
                    } else {
                        Cow::Owned(out.into_owned())
                    }
                }
            };
        }
        Ok(current)
    }

    /// Encodes one piece of raw text (a [`Piece::Text`]) and hands its ids to `sink`, in order,
    /// at most `batch` pre-tokens at a time (`usize::MAX`: all at once, the fastest). `sink`
    /// returns `false` to stop; the ids it was given stay given.
    pub(crate) fn encode_text(
        &self,
        text: &str,
        start: usize,
        batch: usize,
        scratch: &mut Scratch,
        sink: &mut dyn FnMut(&[TokenId]) -> bool,
    ) -> Result<Progress, TokenizeError> {
        let encode_error = |e: tokenizers::Error| TokenizeError::Encode { reason: e.to_string() };
        let normalized = self.normalize(text, start)?;
        // Where normalization rewrote the text, a position in it maps to one in the raw text only
        // approximately (by proportion); it only feeds the token estimate of the rest.
        let to_raw = |at: usize| match &normalized {
            Cow::Borrowed(_) => floor_boundary(text, at),
            Cow::Owned(n) => floor_boundary(text, at * text.len() / n.len().max(1)),
        };
        let pieces = Pieces { engine: self, text: &normalized, offset: 0, normalized: true, pending: None };
        for piece in pieces {
            let (chunk, chunk_start) = match piece {
                Piece::Added { id, end } => {
                    if !sink(&[id]) {
                        return Ok(Progress::Stopped { consumed: to_raw(end) });
                    }
                    continue;
                }
                Piece::Text { text, start } => (text, start),
            };
            if chunk.len() > u32::MAX as usize {
                return Err(TokenizeError::Encode {
                    reason: format!("text of {} bytes is longer than the engine's limit", chunk.len()),
                });
            }
            let Scratch { model, split, spans, ids } = &mut *scratch;
            spans.clear();
            self.inner.get_pre_tokenizer().pre_tokenize(chunk, split, spans).map_err(encode_error)?;
            for group in spans.chunks(batch.max(1)) {
                ids.clear();
                self.inner.get_model().tokenize_spans(chunk, group, model, ids).map_err(encode_error)?;
                if !sink(PipelineToken::cast_slice(ids)) {
                    let end = group.last().map_or(0, |s| s.end as usize);
                    return Ok(Progress::Stopped { consumed: to_raw(chunk_start + end) });
                }
            }
        }
        Ok(Progress::Complete)
    }

    /// Id of an added (special) token by its text.
    pub(crate) fn added_token_id(&self, token: &str) -> Option<TokenId> {
        self.inner.get_added_vocabulary().token_to_id(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_sniffing_reads_only_the_head() {
        assert!(is_canonical(r#"{"version": "2.0", "truncation": null}"#));
        assert!(is_canonical(r#"{"version":"2.0"}"#));
        assert!(!is_canonical(r#"{"version": "1.0", "truncation": null}"#));
        assert!(!is_canonical(r#"{"truncation": null}"#));
        assert!(!is_canonical(""));
        // A multi-byte character cut at the 256-byte boundary must not panic.
        let long = format!("{{\"x\": \"{}\"}}", "é".repeat(200));
        assert!(!is_canonical(&long));
        // Sorted keys put it last; a long file is judged by its tail then.
        let sorted = format!("{{\"model\": \"{}\", \"version\": \"2.0\"}}", "x".repeat(1000));
        assert!(is_canonical(&sorted));
        let sorted_old = format!("{{\"model\": \"{}\", \"version\": \"1.0\"}}", "x".repeat(1000));
        assert!(!is_canonical(&sorted_old));
    }

    #[test]
    fn canonical_form_starts_with_its_version_and_is_recognised() {
        let hf = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                     "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                     "trim_offsets": true, "use_regex": true}, "post_processor": null, "decoder": null,
                     "model": {"type": "BPE", "dropout": null, "unk_token": null,
                     "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                     "byte_fallback": false, "ignore_merges": false, "vocab": {"a": 0, "b": 1, "ab": 2},
                     "merges": [["a", "b"]]}}"#;
        let canonical = canonicalize(hf).unwrap();
        assert!(canonical.starts_with(r#"{"version":"2.0","#), "{canonical}");
        assert!(is_canonical(&canonical));
        assert_eq!(canonicalize(&canonical).unwrap(), canonical, "idempotent");
        let value: serde_json::Value = serde_json::from_str(&canonical).unwrap();
        assert!(value.get("model").is_some());
    }

    #[test]
    fn unknown_model_type_is_refused_with_its_name() {
        let json = r#"{"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
                       "post_processor": null, "decoder": null,
                       "model": {"type": "Mystery", "vocab": {}}}"#;
        let err = Engine::from_json(json).unwrap_err();
        // The converter lowercases the unknown type's name; either way the message names the model.
        assert!(err.to_string().to_lowercase().contains("model"), "{err}");
    }

    #[test]
    fn floor_boundary_never_splits_a_char() {
        let text = "aé東";
        assert_eq!(floor_boundary(text, 2), 1);
        assert_eq!(floor_boundary(text, 5), 3);
        assert_eq!(floor_boundary(text, 99), text.len());
    }
}
