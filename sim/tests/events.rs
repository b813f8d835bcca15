//! KV events end to end: HTTP requests into a sim, a ZMQ subscriber decoding what it publishes.

mod common;

use std::time::Duration;

use common::*;
use kvmesh_core::hash::BlockHash;
use kvmesh_sim::EngineKind;
use kvmesh_sim::engine_hash::{BlockChain, HashAlgo};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(400);

fn events_args() -> kvmesh_sim::SimArgs {
    let mut a = args();
    a.kv_events_endpoint = Some("tcp://*:0".into());
    a.kv_replay_endpoint = Some("tcp://*:0".into());
    a.kv_events_topic = "kv-events".into();
    a
}

fn stored(batches: &[Batch]) -> Vec<(Option<u64>, Vec<u64>, Vec<u32>)> {
    batches
        .iter()
        .flat_map(|b| b.events.iter())
        .filter_map(|e| match e {
            Ev::Stored { hashes, parent, tokens, .. } => Some((*parent, hashes.clone(), tokens.clone())),
            _ => None,
        })
        .collect()
}

fn removed(batches: &[Batch]) -> Vec<u64> {
    batches
        .iter()
        .flat_map(|b| b.events.iter())
        .filter_map(|e| if let Ev::Removed(h) = e { Some(h.clone()) } else { None })
        .flatten()
        .collect()
}

/// A token-id prompt of `n` tokens, distinct per `seed`.
fn tokens(seed: u32, n: u32) -> Vec<u32> {
    (0..n).map(|i| 1000 + seed * 7919 + i * 13).collect()
}

#[tokio::test]
async fn repeated_prompt_reports_cached_tokens_and_stores_no_new_prefix_blocks() {
    let sim = start(events_args(), words()).await;
    let ep = sim.kv_endpoints.clone().expect("events on");
    let mut sub = Sub::connect(&ep.endpoint).await;
    let prompt = tokens(1, 70); // 4 full blocks + 6 tokens
    let body = json!({"model": "Qwen/Qwen3-8B", "prompt": prompt, "max_tokens": 4});
    let first = post(sim.addr, "/v1/completions", &body).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json()["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let batches = sub.drain(QUIET).await;
    assert!(batches.iter().all(|b| b.topic == b"kv-events"));
    let first_stored = stored(&batches);
    let prefix: Vec<u64> = first_stored.iter().flat_map(|(_, h, _)| h.clone()).collect();
    assert_eq!(prefix.len(), 4, "70 + 3 computed tokens fill 4 blocks");
    // The hashes are vLLM's own (sha256 over pickle, last 8 bytes), chained from the token ids.
    let mut chain = BlockChain::new(HashAlgo::VllmSha256, 16, None);
    chain.extend(&prompt);
    assert_eq!(chain.hashes().iter().map(|h| h.0).collect::<Vec<_>>(), prefix);
    assert_eq!(first_stored[0].0, None);
    assert_eq!(first_stored[0].2, prompt[..64].to_vec());

    let second = post(sim.addr, "/v1/completions", &body).await;
    let usage = second.json()["usage"].clone();
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 64);
    assert_eq!((usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()), (Some(70), Some(4)));
    let again = stored(&sub.drain(QUIET).await);
    assert!(
        again.iter().all(|(_, h, _)| h.iter().all(|x| !prefix.contains(x))),
        "no prefix block stored again: {again:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn filling_the_cache_evicts_in_lru_order() {
    let mut a = events_args();
    a.kv_blocks = 12;
    let sim = start(a, words()).await;
    let ep = sim.kv_endpoints.clone().expect("events on");
    let mut sub = Sub::connect(&ep.endpoint).await;
    // Three 64-token prompts with one output token each fill 4 blocks apiece: the whole cache.
    let mut hashes = Vec::new();
    for seed in 0..3 {
        let body = json!({"model": "Qwen/Qwen3-8B", "prompt": tokens(seed, 64), "max_tokens": 1});
        assert_eq!(post(sim.addr, "/v1/completions", &body).await.status, 200);
        let s = stored(&sub.drain(QUIET).await);
        hashes.push(s.into_iter().flat_map(|(_, h, _)| h).collect::<Vec<_>>());
    }
    assert!(hashes.iter().all(|h| h.len() == 4));
    let body = json!({"model": "Qwen/Qwen3-8B", "prompt": tokens(9, 64), "max_tokens": 1});
    assert_eq!(post(sim.addr, "/v1/completions", &body).await.status, 200);
    let batches = sub.drain(QUIET).await;
    // The least recently freed request goes first, its tail before its head (vLLM frees in reverse).
    let mut oldest_tail_first = hashes[0].clone();
    oldest_tail_first.reverse();
    assert_eq!(removed(&batches), oldest_tail_first);
    // Removals come before the stores that needed the space, in the same batch.
    let b = &batches[0];
    assert!(
        matches!(b.events.first(), Some(Ev::Removed(_)))
            && matches!(b.events.last(), Some(Ev::Stored { .. }))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn replay_returns_the_missed_batches_then_the_end_marker() {
    let sim = start(events_args(), words()).await;
    let ep = sim.kv_endpoints.clone().expect("events on");
    let mut sub = Sub::connect(&ep.endpoint).await;
    for seed in 0..3 {
        let body = json!({"model": "Qwen/Qwen3-8B", "prompt": tokens(seed, 40), "max_tokens": 2});
        assert_eq!(post(sim.addr, "/v1/completions", &body).await.status, 200);
    }
    let live = sub.drain(QUIET).await;
    assert!(live.len() >= 3);
    assert_eq!(live.iter().map(|b| b.seq).collect::<Vec<_>>(), (0..live.len() as u64).collect::<Vec<_>>());
    // A subscriber that saw only seq 0 asks for the rest.
    let replayed = replay(ep.replay_endpoint.as_deref().expect("replay on"), 1).await;
    let (end, batches) = replayed.split_last().expect("at least the END marker");
    assert_eq!(end, &(Vec::new(), u64::MAX, Vec::new()));
    assert_eq!(batches.len(), live.len() - 1);
    for ((topic, seq, payload), b) in batches.iter().zip(&live[1..]) {
        assert_eq!((topic.as_slice(), *seq, payload), (b"kv-events".as_slice(), b.seq, &b.payload));
    }
    // A start beyond the newest batch gets just the marker.
    let nothing = replay(ep.replay_endpoint.as_deref().expect("replay on"), 1_000).await;
    assert_eq!(nothing, vec![(Vec::new(), u64::MAX, Vec::new())]);
    sim.shutdown().await;
}

#[tokio::test]
async fn sglang_events_use_its_hashes_fields_and_coalescing() {
    let mut a = events_args();
    a.engine = EngineKind::Sglang;
    a.kv_blocks = 8;
    let sim = start(a, words()).await;
    let ep = sim.kv_endpoints.clone().expect("events on");
    let mut sub = Sub::connect(&ep.endpoint).await;
    let p = tokens(3, 64);
    let body = json!({"model": "Qwen/Qwen3-8B", "prompt": p, "max_tokens": 1, "cache_salt": "tenant-42"});
    assert_eq!(post(sim.addr, "/v1/completions", &body).await.status, 200);
    let batches = sub.drain(QUIET).await;
    let Some(Ev::Stored { hashes, keys, .. }) = batches[0].events.first().cloned() else {
        panic!("a store first")
    };
    assert_eq!(
        keys,
        [
            "type",
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "cache_salt"
        ]
    );
    let mut chain = BlockChain::new(HashAlgo::Sglang, 16, Some("tenant-42"));
    chain.extend(&p);
    assert_eq!(hashes, chain.hashes().iter().map(|h: &BlockHash| h.0).collect::<Vec<_>>());
    // 8 blocks: a second 64-token prompt evicts the first one's 4 blocks in one merged removal.
    let body = json!({"model": "Qwen/Qwen3-8B", "prompt": tokens(4, 64), "max_tokens": 1});
    assert_eq!(post(sim.addr, "/v1/completions", &body).await.status, 200);
    let body = json!({"model": "Qwen/Qwen3-8B", "prompt": tokens(5, 64), "max_tokens": 1});
    assert_eq!(post(sim.addr, "/v1/completions", &body).await.status, 200);
    let later = sub.drain(QUIET).await;
    let removals: Vec<&Ev> =
        later.iter().flat_map(|b| b.events.iter()).filter(|e| matches!(e, Ev::Removed(_))).collect();
    assert_eq!(removals.len(), 1, "{later:?}");
    assert_eq!(removals[0], &Ev::Removed(hashes.iter().rev().copied().collect()));
    sim.shutdown().await;
}

#[tokio::test]
async fn event_token_ids_are_the_model_tokenizer_ids() {
    // The set-up script fetches these files; a missing file is a broken set-up, not a reason to skip.
    let qwen = qwen3().expect("Qwen3 tokenizer files missing: run `make setup` (or set KVMESH_TOKENIZERS)");
    let sim = start(events_args(), qwen.clone()).await;
    let ep = sim.kv_endpoints.clone().expect("events on");
    let mut sub = Sub::connect(&ep.endpoint).await;
    let text =
        "Prefix caching lets a router send a request to the worker that already holds its prompt. ".repeat(3);
    let body = json!({"model": "Qwen/Qwen3-8B", "prompt": text, "max_tokens": 1});
    let reply = post(sim.addr, "/v1/completions", &body).await;
    let ids = qwen.encode(&text, true).expect("encodes");
    assert_eq!(reply.json()["usage"]["prompt_tokens"].as_u64(), Some(ids.len() as u64));
    let got: Vec<u32> = stored(&sub.drain(QUIET).await).into_iter().flat_map(|(_, _, t)| t).collect();
    assert_eq!(got, ids[..ids.len() / 16 * 16].to_vec());

    let chat = json!({"model": "Qwen/Qwen3-8B", "messages": [
        {"role": "system", "content": "You are a helpful assistant that answers in one long sentence."},
        {"role": "user", "content": "Explain why KV-cache-aware routing lowers time to first token."}]});
    let reply = post(sim.addr, "/v1/chat/completions", &chat).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let rendered = "<|im_start|>system\nYou are a helpful assistant that answers in one long sentence.<|im_end|>\n\
                    <|im_start|>user\nExplain why KV-cache-aware routing lowers time to first token.<|im_end|>\n\
                    <|im_start|>assistant\n";
    let ids = qwen.encode(rendered, false).expect("encodes");
    assert_eq!(reply.json()["usage"]["prompt_tokens"].as_u64(), Some(ids.len() as u64));
    let got: Vec<u32> = stored(&sub.drain(QUIET).await).into_iter().flat_map(|(_, _, t)| t).collect();
    assert_eq!(got[..ids.len() / 16 * 16], ids[..ids.len() / 16 * 16]);
    sim.shutdown().await;
}
