//! Early exit (`Encoder::walk_blocks`): block hashes exactly as far as some worker holds the
//! prompt, the rest of the prompt's length estimated from its bytes; and the estimate's error,
//! measured per script on generated text (the figures the README quotes).

mod common;
mod corpus;

use std::collections::HashSet;

use kvmesh_core::hash::{hash_block, hash_prompt};
use kvmesh_core::tokenize::SegmentCacheConfig;
use kvmesh_core::{BlockHash, BlockSalt};

use common::shared as tokenizer;

/// GPU engines' default block size.
const BLOCK: usize = 16;

/// Seed of the corpus, as in the parity test.
const SEED: u64 = 0x6b76_6d65_7368_0012;

fn block_hashes(tokens: &[u32]) -> Vec<BlockHash> {
    let mut hashes = Vec::new();
    hash_prompt(tokens, BLOCK, BlockSalt::NONE, &mut hashes);
    hashes
}

#[test]
fn walk_with_every_block_held_is_the_full_encoding() {
    for model in ["qwen3", "llama3_1"] {
        let tokenizer = tokenizer(model);
        let mut encoder = tokenizer.encoder(SegmentCacheConfig::default());
        for i in 0..600 {
            let text = corpus::input(SEED, i);
            let add_special_tokens = i % 2 == 0;
            let truth =
                if add_special_tokens { tokenizer.encode_prompt(&text) } else { tokenizer.encode(&text) }
                    .unwrap_or_else(|e| panic!("{model}: input {i}: {e}"));
            // Twice: the second walk replays the cached segments' chain memos.
            for round in 0..2 {
                let walk = encoder
                    .walk_blocks(&text, add_special_tokens, BLOCK, BlockSalt::NONE, |_| true)
                    .unwrap_or_else(|e| panic!("{model}: input {i}: {e}"));
                assert_eq!(walk.hashes, &block_hashes(&truth)[..], "{model}: input {i}, round {round}");
                assert_eq!(
                    (walk.exact_tokens, walk.first_miss, walk.exact, walk.total_tokens),
                    (truth.len(), None, true, truth.len()),
                    "{model}: {i}, round {round}"
                );
            }
        }
    }
}

#[test]
fn walk_stops_at_the_first_block_nobody_holds() {
    for model in ["qwen3", "llama3_1"] {
        let tokenizer = tokenizer(model);
        let mut encoder = tokenizer.encoder(SegmentCacheConfig::default());
        let mut rng = corpus::Rng::new(SEED ^ 0x4558_4954);
        let mut checked = 0;
        for i in 0..1_500 {
            let text = corpus::input(SEED, i);
            let truth = tokenizer.encode(&text).unwrap_or_else(|e| panic!("{model}: input {i}: {e}"));
            let hashes = block_hashes(&truth);
            if hashes.len() < 2 {
                continue;
            }
            checked += 1;
            // Workers hold the first `k` blocks (and some unrelated later one, which must not
            // matter: a prefix ends at its first gap).
            let k = rng.below(hashes.len());
            let mut held: HashSet<BlockHash> = hashes[..k].iter().copied().collect();
            held.insert(hashes[hashes.len() - 1]);
            held.remove(&hashes[k]);
            // Twice: the second walk finds the segments the first cached, with the same result.
            for round in 0..2 {
                let walk = encoder
                    .walk_blocks(&text, false, BLOCK, BlockSalt::NONE, |h| held.contains(&h))
                    .unwrap_or_else(|e| panic!("{model}: input {i}: {e}"));
                let at = format!("{model}: input {i}, round {round}, miss at block {k}");
                assert_eq!(walk.hashes, &hashes[..=k], "{at}");
                assert_eq!(walk.first_miss, Some(k), "{at}");
                assert!(walk.exact_tokens >= (k + 1) * BLOCK, "{at}");
                assert!(walk.exact_tokens <= truth.len(), "{at}");
                if walk.exact {
                    assert_eq!((walk.exact_tokens, walk.total_tokens), (truth.len(), truth.len()), "{at}");
                } else {
                    assert!(walk.total_tokens >= walk.exact_tokens, "{at}");
                }
            }
        }
        assert!(checked > 300, "{model}: only {checked} inputs had two blocks");
    }
}

#[test]
fn walk_adds_the_prompt_specials_and_any_block_size() {
    let tokenizer = tokenizer("llama3_1");
    let mut encoder = tokenizer.encoder(SegmentCacheConfig::default());
    let text = corpus::code_text(&mut corpus::Rng::new(SEED), 6_000);
    let truth = tokenizer.encode_prompt(&text).expect("encodes");
    // 1: every token a block; 300: past the block hasher's stack buffer.
    for block in [1, 16, 32, 300] {
        let walk =
            encoder.walk_blocks(&text, true, block, BlockSalt::lora(Some("a")), |_| true).expect("walks");
        let mut hashes = Vec::new();
        hash_prompt(&truth, block, BlockSalt::lora(Some("a")), &mut hashes);
        assert_eq!(walk.exact_tokens, truth.len(), "block size {block}");
        assert_eq!(walk.hashes, &hashes[..], "block size {block}");
        // Nothing held: one block hashed, the rest estimated. (Without a cache: the text is one
        // segment, which a warm cache would hand over whole, exact.)
        let mut cold = tokenizer.encoder(SegmentCacheConfig::DISABLED);
        let walk = cold.walk_blocks(&text, true, block, BlockSalt::NONE, |_| false).expect("walks");
        assert_eq!(
            (walk.hashes.len(), walk.first_miss, walk.exact),
            (1, Some(0), false),
            "block size {block}"
        );
        // With it, the whole segment comes from the cache at once, exact (unless the BOS block
        // alone already missed).
        let walk = encoder.walk_blocks(&text, true, block, BlockSalt::NONE, |_| false).expect("walks");
        assert_eq!((walk.hashes.len(), walk.exact), (1, block > 1), "block size {block}");
        let first = block.min(truth.len());
        assert_eq!(walk.hashes[0], hash_block(None, &truth[..first], BlockSalt::NONE), "BOS first");
    }
    // Empty text: only the specials, exact.
    let walk = encoder.walk_blocks("", true, 16, BlockSalt::NONE, |_| false).expect("walks");
    assert_eq!((walk.exact_tokens, walk.exact, walk.total_tokens), (1, true, 1));
}

#[test]
fn chain_memos_replay_only_after_the_same_ids() {
    // Earlier turns of a chat as cached segments, walked after different openings (which shift
    // the ids before them, and so the block boundaries), with different block sizes and salts,
    // in an order that makes each memo both fit and not fit: every walk must equal hashing the
    // full encoding.
    let tokenizer = tokenizer("qwen3");
    let mut encoder = tokenizer.encoder(SegmentCacheConfig::default());
    let mut rng = corpus::Rng::new(SEED ^ 0x4d45_4d4f);
    let turns: Vec<String> =
        (0..3).map(|i| corpus::script_text(&mut rng, corpus::LATIN, 500 + 300 * i)).collect();
    let openings = [
        "",
        "<|im_start|>system\nBe brief.<|im_end|>\n",
        "<|im_start|>system\nBe brief, always.<|im_end|>\n",
    ];
    let chat = |opening: &str, last: &str| {
        let mut text = opening.to_owned();
        for (i, turn) in turns.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            text.push_str(&format!("<|im_start|>{role}\n{turn}<|im_end|>\n"));
        }
        text.push_str(&format!("<|im_start|>user\n{last}<|im_end|>\n<|im_start|>assistant\n"));
        text
    };
    // Each state twice in a row (the second walk replays), then the next one (whose memo does not
    // fit what the last walk left); the whole sequence twice.
    for pass in 0..2 {
        for (o, opening) in openings.iter().enumerate() {
            for (block, salt) in [(16, BlockSalt::NONE), (16, BlockSalt(7)), (32, BlockSalt::NONE)] {
                for round in 0..2 {
                    let text = chat(opening, &format!("question {pass} {round}"));
                    let truth = tokenizer.encode(&text).expect("encodes");
                    let mut hashes = Vec::new();
                    hash_prompt(&truth, block, salt, &mut hashes);
                    let walk = encoder.walk_blocks(&text, false, block, salt, |_| true).expect("walks");
                    let at = format!("pass {pass}, round {round}, opening {o}, block {block}, salt {salt:?}");
                    assert_eq!(walk.hashes, &hashes[..], "{at}");
                    assert_eq!(
                        (walk.exact_tokens, walk.total_tokens, walk.exact),
                        (truth.len(), truth.len(), true),
                        "{at}"
                    );
                }
            }
        }
    }
    let stats = encoder.cache_stats();
    assert!(stats.hits > 50 && stats.memo_replays > 20, "{stats:?}");
}

#[test]
fn estimate_is_the_same_whether_earlier_turns_come_from_the_segment_cache_or_not() {
    let tokenizer = tokenizer("qwen3");
    let mut rng = corpus::Rng::new(SEED);
    // A rendered chat: several segments between special tokens, the last one long.
    let turns: Vec<String> =
        (0..4).map(|i| corpus::script_text(&mut rng, corpus::LATIN, 600 + 400 * i)).collect();
    let mut text = String::new();
    for (i, turn) in turns.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        text.push_str(&format!("<|im_start|>{role}\n{turn}<|im_end|>\n"));
    }
    text.push_str("<|im_start|>user\n");
    text.push_str(&corpus::code_text(&mut rng, 6_000));
    let truth = tokenizer.encode(&text).expect("encodes");
    let hashes = block_hashes(&truth);
    // Held up to a few blocks into the last turn, so the walk stops inside it.
    let prefix_tokens =
        tokenizer.encode(&text[..text.rfind("<|im_start|>").expect("a last turn")]).expect("encodes");
    let held: HashSet<BlockHash> = hashes.iter().copied().take(prefix_tokens.len() / BLOCK + 3).collect();
    let walk = |encoder: &mut kvmesh_core::Encoder| {
        let walk =
            encoder.walk_blocks(&text, false, BLOCK, BlockSalt::NONE, |h| held.contains(&h)).expect("walks");
        assert!(!walk.exact);
        (walk.total_tokens, walk.hashes.len())
    };
    let uncached = walk(&mut tokenizer.encoder(SegmentCacheConfig::DISABLED));
    let mut encoder = tokenizer.encoder(SegmentCacheConfig::default());
    let first = walk(&mut encoder);
    assert!(encoder.cache_stats().insertions >= 4, "{:?}", encoder.cache_stats());
    let hits_before = encoder.cache_stats().hits;
    let again = walk(&mut encoder);
    assert!(encoder.cache_stats().hits >= hits_before + 4, "the earlier turns hit the cache");
    assert_eq!(first, uncached);
    assert_eq!(again, uncached);
    // And the estimate is a real one: within 10% of the truth.
    let error = (uncached.0 as f64 - truth.len() as f64).abs() / truth.len() as f64;
    assert!(error < 0.10, "estimated {} of {} tokens", uncached.0, truth.len());
}

/// What the estimate is measured on.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// Prose in Latin-script languages.
    Latin,
    /// Prose in Cyrillic, Greek, Arabic, Hebrew, Devanagari and Thai.
    Other,
    /// Chinese, Japanese and Korean prose.
    Cjk,
    /// Source code.
    Code,
}

/// Relative error of the estimated total, (estimate - truth) / truth, over `samples` texts of
/// about 4k tokens whose first `exact_blocks` blocks are held: (mean of |error|, max |error|).
fn estimate_error(model: &str, script: Script, exact_blocks: usize, samples: usize) -> (f64, f64) {
    let tokenizer = tokenizer(model);
    let mut encoder = tokenizer.encoder(SegmentCacheConfig::DISABLED);
    let mut rng = corpus::Rng::new(SEED ^ script as u64);
    let mut errors = Vec::new();
    for _ in 0..samples {
        let text = match script {
            Script::Latin => corpus::script_text(&mut rng, corpus::LATIN, 14_000),
            Script::Other => corpus::script_text(&mut rng, corpus::OTHER_SCRIPTS, 14_000),
            Script::Cjk => corpus::script_text(&mut rng, corpus::CJK, 14_000),
            Script::Code => corpus::code_text(&mut rng, 14_000),
        };
        let truth = tokenizer.encode(&text).expect("encodes");
        let held: HashSet<BlockHash> = block_hashes(&truth).into_iter().take(exact_blocks).collect();
        let walk =
            encoder.walk_blocks(&text, false, BLOCK, BlockSalt::NONE, |h| held.contains(&h)).expect("walks");
        assert!(!walk.exact, "{model} {script:?}: the walk should have stopped early");
        errors.push((walk.total_tokens as f64 - truth.len() as f64) / truth.len() as f64);
    }
    let mean = errors.iter().map(|e| e.abs()).sum::<f64>() / errors.len() as f64;
    (mean, errors.iter().map(|e| e.abs()).fold(0.0, f64::max))
}

#[test]
fn estimate_error_stays_within_the_documented_bounds() {
    // The README's table. Bounds on the largest error, per script, with nothing exact (the first
    // block misses: the estimate is all prior) and with the first 1,024 tokens exact (the
    // correction from the exact part applies). Texts are generated from the corpus's own word
    // lists, so these figures describe this corpus; real text differs in style, which the
    // correction absorbs.
    let bounds = [
        (Script::Latin, 0.15, 0.10),
        (Script::Other, 0.30, 0.20),
        (Script::Cjk, 0.10, 0.06),
        (Script::Code, 0.08, 0.06),
    ];
    for model in ["qwen3", "llama3_1"] {
        for (script, bound_prior, bound_corrected) in bounds {
            let (mean0, max0) = estimate_error(model, script, 0, 30);
            let (mean1, max1) = estimate_error(model, script, 1_024 / BLOCK, 30);
            eprintln!(
                "{model} {script:?}: nothing exact: mean {:.1}% max {:.1}%; first 1k tokens exact: mean {:.1}% max {:.1}%",
                mean0 * 100.0,
                max0 * 100.0,
                mean1 * 100.0,
                max1 * 100.0
            );
            assert!(
                max0 <= bound_prior,
                "{model} {script:?}: error {max0:.3} over {bound_prior} with nothing exact"
            );
            assert!(
                max1 <= bound_corrected,
                "{model} {script:?}: error {max1:.3} over {bound_corrected} with 1k exact"
            );
        }
    }
}
