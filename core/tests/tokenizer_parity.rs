//! Token ids from our tokenizer (HF `tokenizers` 1.0 behind `kvmesh_core::Tokenizer`) must equal
//! those of `tokenizers` 0.23, the release vLLM runs today, on a varied generated corpus, for every
//! tokenizer family we route. One id off and every block hash after it misses.
//!
//! The tokenizer files come from `make setup` (into `$KVMESH_TOKENIZERS`, default
//! `/root/.cache/kvmesh/tokenizers`); a missing file fails the test, it never skips.
//!
//! One known difference: 0.23 normalizes with Unicode 9 NFC tables, 1.0 with Unicode 17 ones. They
//! disagree only on text holding a character added after Unicode 9 that NFC composes, decomposes or
//! reorders (Tulu-Tigalari, Gurung Khema, Kirat Rai, Todhri, some combining marks); only tokenizers
//! with an NFC normalizer (Qwen) are affected. Such inputs are counted and reported, not failed;
//! `unicode_9_nfc_differences_are_the_only_ones` pins two of them.

mod corpus;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use kvmesh_core::{Tokenizer, TokenizerFiles};

/// Inputs compared per tokenizer; the issue asks for at least 5,000.
const INPUTS: usize = 6_000;

/// Seed of the corpus; changing it gives a different (equally valid) corpus.
const SEED: u64 = 0x6b76_6d65_7368_0012;

fn tokenizer_dir(model: &str) -> PathBuf {
    let root = std::env::var_os("KVMESH_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/kvmesh/tokenizers"));
    root.join(model)
}

fn read(model: &str, file: &str) -> String {
    let path = tokenizer_dir(model).join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read {}: {e}; run `make setup` to fetch the tokenizer files", path.display())
    })
}

fn load_ours(model: &str) -> Tokenizer {
    let json = read(model, "tokenizer.json");
    let config = read(model, "tokenizer_config.json");
    Tokenizer::from_files(TokenizerFiles {
        tokenizer_json: &json,
        tokenizer_config_json: Some(&config),
        chat_template_jinja: None,
    })
    .unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn load_reference(model: &str) -> tokenizers_ref::Tokenizer {
    let path = tokenizer_dir(model).join("tokenizer.json");
    tokenizers_ref::Tokenizer::from_file(&path)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}; run `make setup`", path.display()))
}

/// Both tokenizers of a model, loaded once per test binary (loading dominates debug test time).
fn both(model: &str) -> &'static (Tokenizer, tokenizers_ref::Tokenizer) {
    static QWEN3: OnceLock<(Tokenizer, tokenizers_ref::Tokenizer)> = OnceLock::new();
    static LLAMA3_1: OnceLock<(Tokenizer, tokenizers_ref::Tokenizer)> = OnceLock::new();
    let cell = match model {
        "qwen3" => &QWEN3,
        "llama3_1" => &LLAMA3_1,
        other => panic!("no tokenizer set-up named {other}"),
    };
    cell.get_or_init(|| (load_ours(model), load_reference(model)))
}

fn reference_ids(reference: &tokenizers_ref::Tokenizer, text: &str, add_special_tokens: bool) -> Vec<u32> {
    match reference.encode(text, add_special_tokens) {
        Ok(encoding) => encoding.get_ids().to_vec(),
        Err(e) => panic!("tokenizers 0.23 failed on {text:?}: {e}"),
    }
}

/// Characters whose NFC behaviour differs between Unicode 9 (0.23) and Unicode 17 (1.0): a
/// different combining class or canonical decomposition, or the starter of a new decomposition.
fn nfc_version_sensitive() -> BTreeSet<char> {
    use unicode_normalization::char as new;
    use unicode_normalization_alignments::char as old;
    let decomposition = |c: char, f: fn(char, &mut dyn FnMut(char))| {
        let mut out = Vec::new();
        f(c, &mut |d| out.push(d));
        out
    };
    let mut set = BTreeSet::new();
    for c in (0..=0x10ffffu32).filter_map(char::from_u32) {
        let new_d = decomposition(c, |c, f| new::decompose_canonical(c, f));
        let old_d = decomposition(c, |c, f| old::decompose_canonical(c, f));
        if new::canonical_combining_class(c) != old::canonical_combining_class(c) || new_d != old_d {
            set.insert(c);
            if let Some(&starter) = new_d.first() {
                set.insert(starter);
            }
        }
    }
    set
}

/// Where two id lists first differ, with the text around it, for a readable failure.
fn describe(text: &str, ours: &[u32], theirs: &[u32]) -> String {
    let at = ours.iter().zip(theirs).position(|(a, b)| a != b).unwrap_or(ours.len().min(theirs.len()));
    let from = at.saturating_sub(3);
    format!(
        "text {text:?}\n  first difference at id {at}: ours {:?} vs 0.23 {:?} (lengths {} vs {})",
        &ours[from..(at + 4).min(ours.len())],
        &theirs[from..(at + 4).min(theirs.len())],
        ours.len(),
        theirs.len()
    )
}

fn check_parity(model: &str) {
    let (ours, reference) = both(model);
    let sensitive = nfc_version_sensitive();
    let mut mismatches = Vec::new();
    let mut unicode_version_only = 0usize;
    let mut tokens = 0usize;
    for i in 0..INPUTS {
        let text = corpus::input(SEED, i);
        let mut compare = |what: &str, mine: Vec<u32>, theirs: Vec<u32>| {
            if mine == theirs {
                return;
            }
            if text.chars().any(|c| sensitive.contains(&c)) {
                unicode_version_only += 1;
            } else {
                mismatches.push(format!("input {i}{what}: {}", describe(&text, &mine, &theirs)));
            }
        };
        let theirs = reference_ids(reference, &text, false);
        tokens += theirs.len();
        let mine = ours.encode(&text).unwrap_or_else(|e| panic!("{model}: input {i}: {e}"));
        compare("", mine, theirs);
        // Completions prompts: the tokenizer's own special tokens around the text (BOS for Llama).
        if i % 10 == 0 {
            let theirs = reference_ids(reference, &text, true);
            let mine = ours.encode_prompt(&text).unwrap_or_else(|e| panic!("{model}: input {i}: {e}"));
            compare(" (with special tokens)", mine, theirs);
        }
    }
    eprintln!(
        "{model}: {INPUTS} inputs, {tokens} tokens, {} mismatches, {unicode_version_only} differ only by \
         Unicode 9 vs 17 NFC",
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "{model}: {} of {INPUTS} inputs differ from tokenizers 0.23:\n{}",
        mismatches.len(),
        mismatches.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn qwen3_ids_equal_tokenizers_0_23() {
    check_parity("qwen3");
}

#[test]
fn llama3_1_ids_equal_tokenizers_0_23() {
    check_parity("llama3_1");
}

#[test]
fn unicode_9_nfc_differences_are_the_only_ones() {
    // Two exact cases where 0.23 (Unicode 9 tables) and 1.0 (Unicode 17) disagree on Qwen3, because
    // the characters are newer than Unicode 9 and 0.23 treats them as inert:
    // - U+1DF6 and U+1DF7 (combining marks, Unicode 10) have combining classes 232 and 228, so
    //   Unicode 17 NFC reorders them; 0.23 leaves them in place.
    // - U+1611E twice (Gurung Khema, Unicode 16) composes to U+16121 under Unicode 17 only.
    // Not yet matched: doing so means normalizing with Unicode 9 tables ourselves (see issue 12).
    // If this test starts failing because the ids agree, the difference was fixed: drop it here and
    // stop tolerating such inputs in `check_parity`.
    let (ours, reference) = both("qwen3");
    for text in ["a\u{1df6}\u{1df7}", "\u{1611e}\u{1611e}"] {
        let theirs = reference_ids(reference, text, false);
        let mine = ours.encode(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_ne!(mine, theirs, "{text:?} now matches 0.23: remove the Unicode 9 exception");
    }
    // Llama 3 has no normalizer: the same text gives the same ids.
    let (ours, reference) = both("llama3_1");
    for text in ["a\u{1df6}\u{1df7}", "\u{1611e}\u{1611e}"] {
        let mine = ours.encode(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(mine, reference_ids(reference, text, false), "{text:?}");
    }
}
