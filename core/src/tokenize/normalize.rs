//! Unicode normalization as the engines in production apply it.
//!
//! vLLM tokenizes with HuggingFace `tokenizers` 0.2x, which normalizes (`NFC`, `NFD`, `NFKC`,
//! `NFKD`) through `unicode-normalization-alignments` 0.1.12, whose tables are Unicode 9.0. The
//! 1.0 engine we run uses `unicode-normalization` with Unicode 17 tables. The two disagree on text
//! holding a character assigned after Unicode 9 that NFC composes, decomposes or reorders (for
//! example U+1DF6 U+1DF7 are reordered by 17 and left alone by 9; U+1611E twice composes to
//! U+16121 under 17 only): those characters are unassigned in 9's tables, so 0.2x treats them as
//! inert starters. Rather than re-deriving that rule we run the very crate 0.2x runs, so the
//! output is the same by construction (`core/tests/tokenizer_parity.rs` checks it, and pins the
//! two cases above).

use std::borrow::Cow;

use unicode_normalization_alignments::{
    IsNormalized, UnicodeNormalization, is_nfc_quick, is_nfd_quick, is_nfkc_quick, is_nfkd_quick,
};

/// A Unicode normalization form, applied with Unicode 9.0 tables as `tokenizers` 0.2x does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// Canonical composition.
    Nfc,
    /// Canonical decomposition.
    Nfd,
    /// Compatibility composition.
    Nfkc,
    /// Compatibility decomposition.
    Nfkd,
}

impl Form {
    /// `text` in this form; borrowed when it already is (the common case, found without copying).
    pub(crate) fn apply<'a>(self, text: &'a str) -> Cow<'a, str> {
        // ASCII is stable under every form, and `is_ascii` is vectorised: most prompts stop here.
        if text.is_ascii() {
            return Cow::Borrowed(text);
        }
        let quick = match self {
            Form::Nfc => is_nfc_quick(text.chars()),
            Form::Nfd => is_nfd_quick(text.chars()),
            Form::Nfkc => is_nfkc_quick(text.chars()),
            Form::Nfkd => is_nfkd_quick(text.chars()),
        };
        if quick == IsNormalized::Yes {
            return Cow::Borrowed(text);
        }
        // The iterators yield (char, alignment change); 0.2x keeps the chars and tracks offsets
        // with the changes, which token ids do not need.
        let mut out = String::with_capacity(text.len() + text.len() / 8);
        match self {
            Form::Nfc => out.extend(text.nfc().map(|(c, _)| c)),
            Form::Nfd => out.extend(text.nfd().map(|(c, _)| c)),
            Form::Nfkc => out.extend(text.nfkc().map(|(c, _)| c)),
            Form::Nfkd => out.extend(text.nfkd().map(|(c, _)| c)),
        }
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_newer_than_unicode_9_are_left_alone() {
        // Unicode 17 reorders these combining marks (classes 232 then 228); Unicode 9 does not
        // know them.
        assert_eq!(Form::Nfc.apply("a\u{1df6}\u{1df7}"), "a\u{1df6}\u{1df7}");
        // Gurung Khema (Unicode 16): composes under 17 only.
        assert_eq!(Form::Nfc.apply("\u{1611e}\u{1611e}"), "\u{1611e}\u{1611e}");
    }

    #[test]
    fn unicode_9_compositions_apply() {
        assert_eq!(Form::Nfc.apply("e\u{301}"), "\u{e9}");
        assert_eq!(Form::Nfc.apply("\u{212b}"), "\u{c5}");
        assert_eq!(Form::Nfc.apply("e\u{302}\u{323}"), "\u{1ec7}");
        assert_eq!(Form::Nfd.apply("\u{e9}"), "e\u{301}");
        assert_eq!(Form::Nfkc.apply("\u{fb01}"), "fi");
        assert_eq!(Form::Nfkd.apply("\u{1e9b}\u{323}"), "s\u{323}\u{307}");
    }

    #[test]
    fn normalized_text_is_borrowed() {
        assert!(matches!(Form::Nfc.apply("plain ascii"), Cow::Borrowed(_)));
        assert!(matches!(Form::Nfc.apply("caf\u{e9} \u{6771}\u{4eac}"), Cow::Borrowed(_)));
        assert!(matches!(Form::Nfc.apply("cafe\u{301}"), Cow::Owned(_)));
    }
}
