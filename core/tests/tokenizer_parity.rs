//! Token ids from our tokenizer (HF `tokenizers` 1.0 behind `kvmesh_core::Tokenizer`) must equal
//! those of `tokenizers` 0.23, the release vLLM runs today, on a varied generated corpus, for every
//! tokenizer family we route. One id off and every block hash after it misses.
//!
//! The tokenizer files come from `make setup` (into `$KVMESH_TOKENIZERS`, default
//! `/root/.cache/kvmesh/tokenizers`); a missing file fails the test, it never skips.
//!
//! Unicode normalization: 0.23 normalizes with Unicode 9 NFC tables, the 1.0 engine with Unicode 17
//! ones. They disagree on text holding a character added after Unicode 9 that NFC composes,
//! decomposes or reorders (Tulu-Tigalari, Gurung Khema, Kirat Rai, Todhri, some combining marks);
//! only tokenizers with an NFC normalizer (Qwen) are affected. We normalize with 0.23's own tables
//! (`core/src/tokenize/normalize.rs`), so those inputs must match too: the corpus holds dozens of
//! them (counted and required below), `unicode_9_nfc_cases_match_0_23` pins two, and
//! `dense_normalization_input_matches_0_23` throws thousands of short combining sequences at it.

mod corpus;

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

/// Whether NFC with Unicode 17 tables (the 1.0 engine's) and with Unicode 9 tables (0.23's) give
/// different text: the inputs where matching 0.23 needs our own normalization.
fn nfc_versions_differ(text: &str) -> bool {
    use unicode_normalization::UnicodeNormalization as New;
    use unicode_normalization_alignments::UnicodeNormalization as Old;
    !New::nfc(text.chars()).eq(Old::nfc(text.chars()).map(|(c, _)| c))
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

/// Inputs of the corpus whose NFC differs between Unicode 9 and 17, at least: proof that the
/// corpus exercises the difference (it holds 72 with the current seed).
const MIN_UNICODE_VERSION_CASES: usize = 50;

fn check_parity(model: &str) {
    let (ours, reference) = both(model);
    let mut mismatches = Vec::new();
    let mut unicode_version_cases = 0usize;
    let mut tokens = 0usize;
    for i in 0..INPUTS {
        let text = corpus::input(SEED, i);
        unicode_version_cases += usize::from(nfc_versions_differ(&text));
        let mut compare = |what: &str, mine: Vec<u32>, theirs: Vec<u32>| {
            if mine != theirs {
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
        "{model}: {INPUTS} inputs, {tokens} tokens, {} mismatches; {unicode_version_cases} inputs whose NFC \
         differs between Unicode 9 and 17",
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "{model}: {} of {INPUTS} inputs differ from tokenizers 0.23:\n{}",
        mismatches.len(),
        mismatches.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        unicode_version_cases >= MIN_UNICODE_VERSION_CASES,
        "the corpus holds only {unicode_version_cases} inputs where Unicode 9 and 17 NFC differ"
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
fn unicode_9_nfc_cases_match_0_23() {
    // Two exact cases where NFC with 0.23's Unicode 9 tables and the 1.0 engine's Unicode 17 ones
    // disagree, because the characters are newer than Unicode 9 and 0.23 treats them as inert:
    // - U+1DF6 and U+1DF7 (combining marks, Unicode 10) have combining classes 232 and 228, so
    //   Unicode 17 NFC reorders them; 0.23 leaves them in place.
    // - U+1611E twice (Gurung Khema, Unicode 16) composes to U+16121 under Unicode 17 only.
    // We normalize as 0.23 does, so the ids must be 0.23's.
    let (ours, reference) = both("qwen3");
    for text in
        ["a\u{1df6}\u{1df7}", "\u{1611e}\u{1611e}", "x a\u{1df6}\u{1df7} \u{1611e}\u{1611e}<|im_end|>"]
    {
        assert!(nfc_versions_differ(text), "{text:?} no longer tells the Unicode versions apart");
        let mine = ours.encode(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(mine, reference_ids(reference, text, false), "{text:?}");
    }
    // Llama 3 has no normalizer: the same text gives the same ids.
    let (ours, reference) = both("llama3_1");
    for text in ["a\u{1df6}\u{1df7}", "\u{1611e}\u{1611e}"] {
        let mine = ours.encode(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(mine, reference_ids(reference, text, false), "{text:?}");
    }
}

/// Short strings packed with what NFC acts on (combining marks of every class, Hangul jamo,
/// singletons, characters newer than Unicode 9, precomposed letters) and plain letters between.
fn dense_normalization_input(rng: &mut corpus::Rng) -> String {
    let mut s = String::new();
    for _ in 0..rng.range(1, 10) {
        match rng.below(8) {
            0 => s.push_str(rng.pick(corpus::NEWER_UNICODE)),
            1 => s.push_str(rng.pick(corpus::NORMALIZATION)),
            2 => s.push(char::from_u32(0x300 + rng.below(0x70) as u32).unwrap_or('\u{301}')),
            3 => s.push(char::from_u32(0x1100 + rng.below(0x100) as u32).unwrap_or('\u{1100}')),
            4 => s.push(rng.pick(&['a', 'e', 'o', 'A', 'ω', 'ς', 'и', 'ש', 'क', 'ก', 'か', ' '])),
            5 => s.push(corpus::any_char(rng)),
            6 => {
                let marks =
                    ['\u{1df6}', '\u{1df7}', '\u{1ac0}', '\u{1dfa}', '\u{0897}', '\u{1611e}', '\u{1611f}'];
                s.push(rng.pick(&marks));
            }
            _ => s.push(
                rng.pick(&['\u{316}', '\u{301}', '\u{323}', '\u{302}', '\u{345}', '\u{5b8}', '\u{5c1}']),
            ),
        }
    }
    s
}

#[test]
fn dense_normalization_input_matches_0_23() {
    let (ours, reference) = both("qwen3");
    let mut rng = corpus::Rng::new(SEED ^ 0x004e_4643);
    let mut differing = 0;
    for i in 0..3_000 {
        let text = dense_normalization_input(&mut rng);
        differing += usize::from(nfc_versions_differ(&text));
        let mine = ours.encode(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let theirs = reference_ids(reference, &text, false);
        assert_eq!(mine, theirs, "input {i}: {}", describe(&text, &mine, &theirs));
    }
    eprintln!("qwen3: 3000 dense normalization inputs, {differing} differ between Unicode 9 and 17 NFC");
    // Enough of them must be cases where the Unicode version matters for this to prove anything.
    assert!(differing >= 600, "only {differing} inputs tell Unicode 9 and 17 NFC apart");
}
