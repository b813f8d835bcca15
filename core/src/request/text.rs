//! Message text read in place: a JSON string as the client sent it, decoded only when read.
//!
//! A chat's earlier turns come back with every request. The tokenizer finds them in its cache by
//! their JSON form (the literal between its quotes, hashed and compared where it lies in the body),
//! so a turn it has seen is never decoded, copied or allocated for. The JSON form is a sound key:
//! one literal always decodes to one text (another escaping of the same text only misses).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;
use std::ops::Deref;

use serde::{Serialize, Serializer};

/// A JSON string's text, kept in its JSON form and decoded on first read ([`Deref`] to `str`).
#[derive(Clone)]
pub struct JsonText<'a> {
    /// The literal between its quotes: valid JSON, escapes as sent.
    json: Cow<'a, str>,
    /// Whether `json` holds an escape (else it is the text itself).
    escaped: bool,
    /// The text, once decoded (only when `escaped`; always when `json` holds a `\u` escape).
    decoded: OnceCell<String>,
}

impl<'a> JsonText<'a> {
    /// The text of `literal`, a JSON string literal (quotes included) that the body's parser has
    /// validated. Literals with `\u` escapes are decoded here, where a lone surrogate, which the
    /// validation lets through, is an error; the others cannot fail to decode later.
    pub(crate) fn from_literal(literal: &'a str) -> Result<JsonText<'a>, serde_json::Error> {
        let json = literal.get(1..literal.len().saturating_sub(1)).unwrap_or_default();
        let escaped = memchr::memchr(b'\\', json.as_bytes()).is_some();
        let text = JsonText { json: Cow::Borrowed(json), escaped, decoded: OnceCell::new() };
        if escaped && has_unicode_escape(json.as_bytes()) {
            let decoded: String = serde_json::from_str(literal)?;
            let _ = text.decoded.set(decoded);
        }
        Ok(text)
    }

    /// `text`, put in JSON form.
    pub fn new(text: impl Into<Cow<'a, str>>) -> JsonText<'a> {
        let text = text.into();
        let plain = !text.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
        if plain {
            return JsonText { json: text, escaped: false, decoded: OnceCell::new() };
        }
        // A string always serializes; the quotes are cut off.
        let literal = serde_json::to_string(text.as_ref()).unwrap_or_default();
        let json = literal.get(1..literal.len().saturating_sub(1)).unwrap_or_default().to_owned();
        JsonText { json: Cow::Owned(json), escaped: true, decoded: OnceCell::from(text.into_owned()) }
    }

    /// The text (decoded on the first call when it holds escapes).
    pub fn as_str(&self) -> &str {
        if !self.escaped {
            return &self.json;
        }
        self.decoded.get_or_init(|| decode(&self.json))
    }

    /// The JSON form: the literal between its quotes, escapes as sent.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Whether the JSON form holds escapes (so reading the text decodes it once).
    pub fn is_escaped(&self) -> bool {
        self.escaped
    }

    /// Whether the text may contain `needle`, which must hold none of `"`, `\`, `/` or control
    /// characters: `false` is certain, `true` may be wrong. Known without decoding: the escapes
    /// other than `\u` stand for exactly those characters, so outside `\u` escapes `needle` can
    /// only appear literally in the JSON form.
    pub fn may_contain(&self, needle: &str) -> bool {
        debug_assert!(!needle.bytes().any(|b| b == b'"' || b == b'\\' || b == b'/' || b < 0x20));
        if let Some(decoded) = self.decoded.get() {
            return decoded.contains(needle);
        }
        // Not decoded yet, so `json` has no `\u` escape (those are decoded when made).
        memchr::memmem::find(self.json.as_bytes(), needle.as_bytes()).is_some()
    }

    /// Whether the text neither starts nor ends with a character `is_space` holds for (stripping
    /// would leave it whole), known from the JSON form's two ends without decoding.
    pub fn is_stripped(&self, is_space: impl Fn(char) -> bool) -> bool {
        if let Some(decoded) = self.decoded.get() {
            return decoded.trim_matches(&is_space).len() == decoded.len();
        }
        // Not decoded yet, so no `\u` escape: a short escape's letter says what it stands for.
        let json = &self.json;
        let escaped = |letter: u8| {
            let c = match letter {
                b'n' => '\n',
                b't' => '\t',
                b'r' => '\r',
                b'f' => '\u{c}',
                b'b' => '\u{8}',
                other => char::from(other),
            };
            is_space(c)
        };
        let starts = match json.chars().next() {
            None => return true,
            Some('\\') => json.as_bytes().get(1).is_some_and(|&letter| escaped(letter)),
            Some(c) => is_space(c),
        };
        let Some(last) = json.chars().next_back() else { return true };
        // The last character is an escape's letter when an odd run of backslashes precedes it.
        let before = &json.as_bytes()[..json.len() - last.len_utf8()];
        let run = before.iter().rev().take_while(|&&b| b == b'\\').count();
        let ends = if run % 2 == 1 { last.is_ascii() && escaped(last as u8) } else { is_space(last) };
        !starts && !ends
    }
}

/// Whether a JSON string (between its quotes) holds a `\u` escape: escapes are visited one by
/// one, so an escaped backslash followed by `u` is not one.
fn has_unicode_escape(json: &[u8]) -> bool {
    let mut at = 0;
    while let Some(found) = memchr::memchr(b'\\', &json[at..]) {
        match json.get(at + found + 1) {
            Some(b'u') => return true,
            Some(_) => at += found + 2,
            None => return false,
        }
    }
    false
}

/// Decodes a JSON string's escapes (the literal between its quotes, valid JSON). A lone
/// surrogate, which only an unvalidated literal holds, becomes U+FFFD.
fn decode(json: &str) -> String {
    let bytes = json.as_bytes();
    let mut out = String::with_capacity(json.len());
    let mut at = 0;
    while let Some(found) = memchr::memchr(b'\\', &bytes[at..]) {
        out.push_str(&json[at..at + found]);
        at += found + 1;
        let Some(&kind) = bytes.get(at) else { break };
        at += 1;
        let short = match kind {
            b'"' => Some('"'),
            b'\\' => Some('\\'),
            b'/' => Some('/'),
            b'b' => Some('\u{8}'),
            b'f' => Some('\u{c}'),
            b'n' => Some('\n'),
            b'r' => Some('\r'),
            b't' => Some('\t'),
            _ => None,
        };
        if let Some(c) = short {
            out.push(c);
            continue;
        }
        // `\uXXXX`, a surrogate pair being two of them.
        let hex = |at: usize| json.get(at..at + 4).and_then(|h| u32::from_str_radix(h, 16).ok());
        let Some(unit) = hex(at) else { break };
        at += 4;
        let c = if (0xd800..0xdc00).contains(&unit) {
            match (json.get(at..at + 2), hex(at + 2)) {
                (Some("\\u"), Some(low)) if (0xdc00..0xe000).contains(&low) => {
                    at += 6;
                    char::from_u32(0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00))
                }
                _ => None,
            }
        } else {
            char::from_u32(unit)
        };
        out.push(c.unwrap_or('\u{fffd}'));
    }
    out.push_str(json.get(at..).unwrap_or_default());
    out
}

impl Deref for JsonText<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for JsonText<'_> {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for JsonText<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for JsonText<'_> {}

impl fmt::Debug for JsonText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for JsonText<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'a> From<&'a str> for JsonText<'a> {
    fn from(text: &'a str) -> Self {
        JsonText::new(text)
    }
}

impl From<String> for JsonText<'_> {
    fn from(text: String) -> Self {
        JsonText::new(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix64;

    /// Random text that needs every kind of escape: quotes, backslashes, control characters,
    /// slashes, multi-byte characters and astral ones (surrogate pairs when escaped as `\u`).
    fn text(rng: &mut SplitMix64) -> String {
        const PIECES: &[&str] = &[
            "a", "word ", "\"", "\\", "/", "\n", "\t", "\r", "\u{8}", "\u{c}", "\u{1}", "\u{1f}", "é", "東",
            "🙂", "\u{2028}", "</think>", "\\n", " ",
        ];
        (0..(rng.next_u64() % 24)).map(|_| PIECES[(rng.next_u64() % PIECES.len() as u64) as usize]).collect()
    }

    /// `text` as a JSON literal, escaped the way `style` picks: serde_json's (short escapes), or
    /// with every non-ASCII character and some ASCII ones as `\u` (as Python's `json.dumps` does).
    fn literal(text: &str, style: u64) -> String {
        if style.is_multiple_of(2) {
            return serde_json::to_string(text).expect("serializes");
        }
        let mut out = String::from("\"");
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '/' if style.is_multiple_of(3) => out.push_str("\\/"),
                c if (c as u32) < 0x20 || (c as u32) > 0x7e || (style.is_multiple_of(5) && c == 'a') => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let mut rng = SplitMix64::new(5);
        for i in 0..5_000 {
            let original = text(&mut rng);
            let literal = literal(&original, i);
            let json = JsonText::from_literal(&literal).expect("valid");
            assert_eq!(json.as_str(), original, "{literal}");
            assert_eq!(decode(json.json()), original, "{literal}");
            assert_eq!(format!("\"{}\"", json.json()), literal);
            assert_eq!(json.is_escaped(), literal.contains('\\'));
            // Put in JSON form from the text, it reads back the same.
            let made = JsonText::new(original.as_str());
            assert_eq!(made.as_str(), original);
            assert_eq!(
                serde_json::from_str::<String>(&format!("\"{}\"", made.json())).expect("valid"),
                original
            );
        }
    }

    #[test]
    fn an_unescaped_literal_borrows_and_never_decodes() {
        let json = JsonText::from_literal(r#""plain text""#).expect("valid");
        assert!(matches!(json.json, Cow::Borrowed(_)));
        assert!(!json.is_escaped());
        assert_eq!(json.as_str(), "plain text");
        assert!(json.decoded.get().is_none());
        let escaped = JsonText::from_literal(r#""two\nlines""#).expect("valid");
        assert!(escaped.decoded.get().is_none(), "decoded only when read");
        assert_eq!(&*escaped, "two\nlines");
        assert!(escaped.decoded.get().is_some());
    }

    #[test]
    fn is_stripped_is_what_stripping_says() {
        let mut rng = SplitMix64::new(13);
        // Rust's whitespace, and one that also holds for the backspace and `x`.
        let wide = |c: char| c.is_whitespace() || c == '\u{8}' || c == 'x';
        for i in 0..5_000 {
            let mut original = text(&mut rng);
            if i % 3 == 0 {
                original.push_str([" ", "\n", "x", "\u{3000}", "\\", "\t", "\u{8}"][i as usize % 7]);
            }
            let literal = literal(&original, i);
            let json = JsonText::from_literal(&literal).expect("valid");
            assert_eq!(json.is_stripped(char::is_whitespace), original.trim() == original, "{literal}");
            let stripped = original.trim_matches(wide) == original;
            assert_eq!(
                JsonText::from_literal(&literal).expect("valid").is_stripped(wide),
                stripped,
                "{literal}"
            );
        }
    }

    #[test]
    fn only_a_real_unicode_escape_counts() {
        assert!(has_unicode_escape(br"a\u0041"));
        assert!(has_unicode_escape(br"\\\u0041"));
        assert!(!has_unicode_escape(br"a\\u0041"));
        assert!(!has_unicode_escape(br"\n\t\\"));
        assert!(!has_unicode_escape(b"plain"));
    }

    #[test]
    fn a_lone_surrogate_is_refused_as_serde_json_refuses_it() {
        assert!(JsonText::from_literal(r#""\ud800 alone""#).is_err());
        assert!(serde_json::from_str::<String>(r#""\ud800 alone""#).is_err());
        assert_eq!(JsonText::from_literal(r#""\ud83d\ude42""#).expect("a pair").as_str(), "🙂");
    }

    #[test]
    fn may_contain_is_never_wrong_about_a_needle_it_rules_out() {
        let mut rng = SplitMix64::new(9);
        let needles = ["think>", "<tool_response>", "tool_response>", "word"];
        for i in 0..5_000 {
            let original = text(&mut rng);
            let literal = literal(&original, i);
            let json = JsonText::from_literal(&literal).expect("valid");
            for needle in needles {
                if original.contains(needle) {
                    assert!(json.may_contain(needle), "{needle} in {literal}");
                }
            }
        }
        // Ruled out without decoding: no `\u`, and not there literally.
        let json = JsonText::from_literal(r#""no tags\nhere""#).expect("valid");
        assert!(!json.may_contain("think>"));
        assert!(json.decoded.get().is_none());
    }
}
