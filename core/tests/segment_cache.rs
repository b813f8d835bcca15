//! The segment cache never changes ids: a prompt's ids are its segments' ids (text between added
//! tokens) and its added tokens' ids, concatenated, in `tokenizers` 0.23 itself, so ids cached per
//! segment are the ids of the whole. Shown here against 0.23, then checked end to end on the
//! parity corpus (encode through the cache = encode without).

mod common;
mod corpus;

use std::sync::OnceLock;

use kvmesh_core::tokenize::SegmentCacheConfig;

/// Seed of the corpus, as in the parity test.
const SEED: u64 = 0x6b76_6d65_7368_0012;

use common::{shared as ours, tokenizer_dir};

fn reference(model: &str) -> &'static tokenizers_ref::Tokenizer {
    static QWEN3: OnceLock<tokenizers_ref::Tokenizer> = OnceLock::new();
    static LLAMA3_1: OnceLock<tokenizers_ref::Tokenizer> = OnceLock::new();
    let cell = match model {
        "qwen3" => &QWEN3,
        _ => &LLAMA3_1,
    };
    cell.get_or_init(|| {
        let path = tokenizer_dir(model).join("tokenizer.json");
        tokenizers_ref::Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

fn reference_ids(model: &str, text: &str) -> Vec<u32> {
    match reference(model).encode(text, false) {
        Ok(encoding) => encoding.get_ids().to_vec(),
        Err(e) => panic!("tokenizers 0.23 failed on {text:?}: {e}"),
    }
}

/// Added tokens of each family that chat templates put between turns.
fn turn_tokens(model: &str) -> &'static [&'static str] {
    match model {
        "qwen3" => &["<|im_start|>", "<|im_end|>", "<think>", "</tool_call>", "<|endoftext|>"],
        _ => &[
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|reserved_special_token_5|>",
        ],
    }
}

#[test]
fn added_tokens_are_hard_boundaries_in_0_23() {
    // In 0.23 itself, ids(a + token + b) = ids(a) ++ [token] ++ ids(b) for any texts a and b:
    // nothing merges or pre-tokenizes across an added token (none of these families' added
    // tokens strip the spaces around them). That is what makes per-segment caching exact.
    for model in ["qwen3", "llama3_1"] {
        let mut rng = corpus::Rng::new(SEED ^ 0x5345_474d);
        for i in 0..1_500 {
            let (a, b) = (corpus::fragment(&mut rng), corpus::fragment(&mut rng));
            let token = rng.pick(turn_tokens(model));
            let id = reference(model).token_to_id(token).unwrap_or_else(|| panic!("{model}: {token}"));
            let mut expected = reference_ids(model, &a);
            expected.push(id);
            expected.extend(reference_ids(model, &b));
            assert_eq!(
                reference_ids(model, &format!("{a}{token}{b}")),
                expected,
                "{model} case {i}: {a:?} {token} {b:?}"
            );
        }
    }
}

#[test]
fn splitting_anywhere_else_changes_ids() {
    // Why segments end only at added tokens: a cut inside a word, or inside a run of newlines that
    // the pre-tokenizer keeps together, gives different ids than the whole.
    for model in ["qwen3", "llama3_1"] {
        for (a, b) in [("hel", "lo world"), ("x\n\n", "\ny"), ("foo ", "bar"), ("caf", "e\u{301}")] {
            let mut split = reference_ids(model, a);
            split.extend(reference_ids(model, b));
            assert_ne!(reference_ids(model, &format!("{a}{b}")), split, "{model}: {a:?} + {b:?}");
        }
    }
}

#[test]
fn cached_encoding_equals_uncached_on_the_corpus() {
    for model in ["qwen3", "llama3_1"] {
        let tokenizer = ours(model);
        // Small bounds, so the cache also evicts while this runs.
        let mut encoder = tokenizer.encoder(SegmentCacheConfig { max_bytes: 256 << 10, max_entries: 512 });
        let mut cached = Vec::new();
        // Twice over the inputs: the second pass hits what the first cached (and still holds).
        for round in 0..2 {
            for i in 0..2_000 {
                let text = corpus::input(SEED, i);
                let add_special_tokens = i % 3 == 0;
                cached.clear();
                encoder
                    .encode_into(&text, add_special_tokens, &mut cached)
                    .unwrap_or_else(|e| panic!("{model}: input {i}: {e}"));
                let uncached =
                    if add_special_tokens { tokenizer.encode_prompt(&text) } else { tokenizer.encode(&text) }
                        .unwrap_or_else(|e| panic!("{model}: input {i}: {e}"));
                assert_eq!(cached, uncached, "{model}: round {round}, input {i}: {text:?}");
            }
        }
        let stats = encoder.cache_stats();
        eprintln!("{model}: {stats:?}");
        assert!(stats.hits > 1_000 && stats.evictions > 0, "{model}: the cache was not exercised: {stats:?}");
        assert!(stats.bytes <= 256 << 10 && stats.entries <= 512, "{model}: bounds exceeded: {stats:?}");
    }
}

#[test]
fn earlier_turns_of_a_growing_chat_hit_the_cache() {
    let tokenizer = ours("qwen3");
    let mut encoder = tokenizer.encoder(SegmentCacheConfig::default());
    let mut rng = corpus::Rng::new(SEED ^ 0x4348_4154);
    let mut chat = format!("<|im_start|>system\n{}<|im_end|>\n", corpus::prose(&mut rng));
    let mut ids = Vec::new();
    for turn in 1..=8 {
        chat.push_str(&format!("<|im_start|>user\n{}<|im_end|>\n", corpus::prose(&mut rng)));
        let prompt = format!("{chat}<|im_start|>assistant\n");
        let before = encoder.cache_stats();
        ids.clear();
        encoder.encode_into(&prompt, false, &mut ids).expect("encodes");
        assert_eq!(ids, tokenizer.encode(&prompt).expect("encodes"), "turn {turn}");
        let after = encoder.cache_stats();
        // Segments: "system\n...", per turn "user\n...", "assistant\n..." and the "\n" between
        // turns, and the final "assistant\n". New in each request: the newest user turn and the
        // reply to the one before; everything else was seen in the previous request.
        if turn > 1 {
            assert_eq!(after.misses - before.misses, 2, "turn {turn}: {before:?} -> {after:?}");
            assert!(after.hits - before.hits >= turn as u64, "turn {turn}: {before:?} -> {after:?}");
        }
        chat.push_str(&format!("<|im_start|>assistant\n{}<|im_end|>\n", corpus::prose(&mut rng)));
    }
}
