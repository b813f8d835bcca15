//! Estimating how many tokens the untokenized rest of a prompt holds (early exit), for the load
//! score: prefill cost grows with the uncached tokens, which need not be exact.
//!
//! Two parts:
//! - a prior from character classes: each ASCII letter, digit, space or punctuation mark, and each
//!   2-, 3- or 4-byte UTF-8 character counts a fixed fraction of a token (weights fitted by least
//!   squares on generated prose in 16 scripts, code and CJK text for Qwen3 and Llama 3.1); added
//!   tokens in the rest are matched and count one each;
//! - a correction from the exactly encoded part of the same prompt: the ratio of its true token
//!   count to its prior estimate scales the estimate of the rest, trusted more the longer that
//!   part is. It absorbs what the prior cannot know: the tokenizer's vocabulary, the text's style.
//!
//! The error, measured per script in `core/tests/early_exit.rs` (and in the README): see there.

use super::engine::{Engine, Piece};

/// Expected tokens per character, by class: ASCII letter, digit, whitespace, other ASCII, then
/// characters of 2, 3 and 4 UTF-8 bytes.
const WEIGHTS: [f32; 7] = [0.30, 0.70, 0.10, 0.60, 0.64, 0.89, 2.5];

/// Class of each byte for [`WEIGHTS`]; `NONE` for UTF-8 continuation bytes. The definition
/// [`class_counts`] is tested against.
#[cfg(test)]
const CLASS: [u8; 256] = {
    let mut table = [NONE; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            b'a'..=b'z' | b'A'..=b'Z' => 0,
            b'0'..=b'9' => 1,
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => 2,
            0x00..=0x7f => 3,
            0x80..=0xbf => NONE,
            0xc0..=0xdf => 4,
            0xe0..=0xef => 5,
            _ => 6,
        };
        b += 1;
    }
    table
};
#[cfg(test)]
const NONE: u8 = 7;

/// Estimated tokens of the exact part at which the correction is trusted halfway.
const CORRECTION_HALF_TOKENS: f32 = 256.0;

/// Largest and smallest correction factor: beyond these the exact part is not like the rest.
const CORRECTION_RANGE: (f32, f32) = (0.5, 2.0);

/// The prior estimate of `text`'s tokens, ignoring added tokens.
pub(crate) fn prior(text: &str) -> f32 {
    let counts = class_counts(text.as_bytes());
    WEIGHTS.iter().zip(counts).map(|(w, n)| w * n as f32).sum()
}

/// Characters per class of [`WEIGHTS`] (as [`CLASS`] assigns them), counted with branch-free
/// comparisons over chunks so the compiler vectorises them (SIMD natively and with wasm simd128):
/// the prior runs over the whole exactly encoded part of every early-exit prompt.
fn class_counts(bytes: &[u8]) -> [u32; 7] {
    let mut counts = [0u32; 7];
    // Chunks of at most 255 bytes: each lane's u8 sum cannot overflow.
    for chunk in bytes.chunks(255) {
        let (mut letter, mut digit, mut space, mut ascii) = (0u8, 0u8, 0u8, 0u8);
        let (mut lead2, mut lead3, mut lead4) = (0u8, 0u8, 0u8);
        for &b in chunk {
            letter += u8::from((b | 0x20).wrapping_sub(b'a') < 26);
            digit += u8::from(b.wrapping_sub(b'0') < 10);
            space += u8::from(b == b' ' || b.wrapping_sub(b'\t') < 5);
            ascii += u8::from(b < 0x80);
            lead2 += u8::from(b & 0xe0 == 0xc0);
            lead3 += u8::from(b & 0xf0 == 0xe0);
            lead4 += u8::from(b >= 0xf0);
        }
        let other = ascii - letter - digit - space;
        for (count, n) in counts.iter_mut().zip([letter, digit, space, other, lead2, lead3, lead4]) {
            *count += u32::from(n);
        }
    }
    counts
}

/// The prior estimate of `text`'s tokens, counting each added token as one.
fn prior_with_added(engine: &Engine, text: &str) -> f32 {
    engine
        .pieces(text)
        .map(|piece| match piece {
            Piece::Added { .. } => 1.0,
            Piece::Text { text, .. } => prior(text),
        })
        .sum()
}

/// Tokens estimated for `rest`, the part of a prompt after an exactly encoded part whose prior
/// (added tokens counted as one) is `exact_prior` and whose `exact_tokens` ids are known (the
/// text's own ids, without any the post-processor adds).
pub(crate) fn remaining_tokens(engine: &Engine, exact_prior: f32, exact_tokens: usize, rest: &str) -> usize {
    let rest_prior = prior_with_added(engine, rest);
    let factor = if exact_prior > 0.0 {
        let (low, high) = CORRECTION_RANGE;
        let ratio = (exact_tokens as f32 / exact_prior).clamp(low, high);
        let trust = exact_prior / (exact_prior + CORRECTION_HALF_TOKENS);
        1.0 + trust * (ratio - 1.0)
    } else {
        1.0
    };
    (rest_prior * factor).round() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_counts_agree_with_the_class_table() {
        let text: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut want = [0u32; 8];
        for &b in &text {
            want[CLASS[b as usize] as usize] += 1;
        }
        assert_eq!(class_counts(&text)[..], want[..7]);
    }

    #[test]
    fn classes_count_characters_not_bytes() {
        assert_eq!(prior(""), 0.0);
        assert!((prior("ab") - 2.0 * WEIGHTS[0]).abs() < 1e-6);
        // One 3-byte character counts once.
        assert!((prior("東") - WEIGHTS[5]).abs() < 1e-6);
        assert!((prior("é😀") - WEIGHTS[4] - WEIGHTS[6]).abs() < 1e-6);
    }
}
