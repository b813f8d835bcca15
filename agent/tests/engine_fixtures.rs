//! The decoders and the hash translation against every frame captured from the real engines
//! (`tests/fixtures/engines/`): vLLM 0.23 (array form), 0.33 (map form, int and bytes hashes, a
//! data-parallel rank 2 publisher), SGLang 0.5.23 (signed hashes, merged removals).

mod common;

use std::collections::HashMap;

use common::{Fixture, StoredView, engine_hash};
use kvmesh_agent::blocks::{KvChange, WorkerBlocks};
use kvmesh_agent::engines::frames::{ReplayReply, parse_live, parse_replay_reply};
use kvmesh_agent::engines::msgpack::decode_batch;
use kvmesh_agent::events::{EngineEvent, EngineHash, Skipped};
use kvmesh_core::hash::BlockHash;
use serde_json::Value;

const FIXTURES: [&str; 5] = [
    "vllm-0.23.0-bind_int_sha256",
    "vllm-0.33.0-bind_int_sha256",
    "vllm-0.33.0-bytes_sha256_cbor",
    "vllm-0.33.0-connect_dp2",
    "sglang-0.5.23-bind_int64",
];

/// Every live frame decodes to what Python decoded, event by event.
#[test]
fn every_live_frame_decodes_like_the_engine_wrote_it() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let rank = fixture.json["publisher"]["data_parallel_rank"].as_u64().map(|r| r as u32);
        for live in fixture.live() {
            let message = parse_live(&live.frames).unwrap_or_else(|e| panic!("{name}: {e}"));
            let (batch, skipped) = decode_batch(&message.payload).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(skipped, Skipped::default(), "{name} seq {}", message.seq);
            assert_eq!(batch.dp_rank, rank, "{name}");
            let events = live.decoded[1].as_array().expect("events");
            assert_eq!(batch.events.len(), events.len(), "{name} seq {}", message.seq);
            for (ours, theirs) in batch.events.iter().zip(events) {
                check_event(name, ours, theirs);
            }
        }
    }
}

fn check_event(name: &str, ours: &EngineEvent, theirs: &Value) {
    let tag = theirs.get("type").or_else(|| theirs.get(0)).and_then(Value::as_str).expect("tag");
    match ours {
        EngineEvent::Stored(stored) => {
            let view = StoredView::of(theirs).expect("a GPU store");
            assert_eq!(tag, "BlockStored");
            assert_eq!(stored.blocks, view.blocks, "{name}");
            assert_eq!(stored.parent, view.parent, "{name}");
            assert_eq!(stored.token_ids, view.tokens, "{name}");
            assert_eq!(stored.block_size, view.block_size, "{name}");
            assert_eq!(stored.lora_name, view.lora_name, "{name}");
            assert_eq!(stored.cache_salt, view.cache_salt, "{name}");
            assert!(stored.on_gpu);
        }
        EngineEvent::Removed { blocks, .. } => {
            assert_eq!(tag, "BlockRemoved");
            let hashes = theirs
                .get("block_hashes")
                .or_else(|| theirs.get(1))
                .and_then(Value::as_array)
                .expect("hashes");
            assert_eq!(blocks, &hashes.iter().map(engine_hash).collect::<Vec<_>>(), "{name}");
        }
        EngineEvent::Cleared => assert_eq!(tag, "AllBlocksCleared"),
        EngineEvent::TierChanged { .. } => panic!("{name}: ZMQ engines have no tier changes"),
    }
}

/// After every batch, the agent's copies per engine hash equal the engine's own cache (the fixture's
/// `index_after`), and every block carries the kvmesh name of its whole token prefix.
#[test]
fn translated_block_set_follows_the_engine_batch_by_batch() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let expected = fixture.expected_kvmesh();
        let mut blocks = WorkerBlocks::new();
        let mut published: HashMap<BlockHash, i64> = HashMap::new();
        for live in fixture.live() {
            let message = parse_live(&live.frames).expect("live message");
            let (batch, _) = decode_batch(&message.payload).expect("batch");
            let (changes, stats) = blocks.apply(0, &batch);
            assert_eq!(
                stats.unknown_parent + stats.unknown_removed + stats.bad_tokens + stats.other_group,
                0,
                "{name}"
            );
            apply(&mut published, changes);
            if let Some(index) = &live.index_after {
                assert_eq!(&blocks.engine_copies(0), index, "{name} after seq {}", message.seq);
            }
            for (engine, kv) in &expected {
                if let Some(ours) = blocks.kvmesh_hash(0, *engine) {
                    assert_eq!(ours, *kv, "{name}: block {engine:?} after seq {}", message.seq);
                }
            }
            // What was published adds up to the agent's snapshot (what a resync answers).
            let mut snapshot = blocks.snapshot();
            snapshot.sort();
            let mut stream: Vec<(BlockHash, u32)> =
                published.iter().filter(|(_, c)| **c > 0).map(|(h, c)| (*h, *c as u32)).collect();
            stream.sort();
            assert_eq!(snapshot, stream, "{name} after seq {}", message.seq);
        }
        assert_eq!(blocks.engine_copies(0), fixture.final_index(), "{name} final index");
        assert_eq!(blocks.block_size(), Some(16));
    }
}

fn apply(model: &mut HashMap<BlockHash, i64>, changes: Vec<KvChange>) {
    for change in changes {
        match change {
            KvChange::Stored(b) => b.into_iter().for_each(|h| *model.entry(h).or_insert(0) += 1),
            KvChange::Removed(b) => b.into_iter().for_each(|h| *model.entry(h).or_insert(0) -= 1),
            KvChange::Cleared => model.clear(),
        }
    }
}

/// The cache-salted and LoRA chains get names of their own; the plain chain shares the system prompt.
#[test]
fn salts_separate_chains_with_equal_tokens() {
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let expected = fixture.expected_kvmesh();
    let first_block = |seq: usize| {
        let live = &fixture.live()[seq];
        StoredView::of(&live.decoded[1][0]).expect("a store").blocks[0]
    };
    // Seq 0 (plain), 2 (LoRA) and 3 (cache salt) begin with the same 16 tokens.
    let (plain, lora, salted) =
        (expected[&first_block(0)], expected[&first_block(2)], expected[&first_block(3)]);
    assert_ne!(plain, lora);
    assert_ne!(plain, salted);
    assert_ne!(lora, salted);
    // SGLang's salted request too.
    let sglang = Fixture::load("sglang-0.5.23-bind_int64");
    let salted = StoredView::of(&sglang.live()[2].decoded[1][0]).expect("a store");
    assert_eq!(salted.cache_salt.as_deref(), Some("tenant-42"));
}

/// The same prompt under vLLM 0.23, 0.33 (int and bytes hashes) and SGLang: different engine
/// hashes, the same kvmesh names.
#[test]
fn kvmesh_names_do_not_depend_on_the_engine() {
    let first_chain = |name: &str| -> Vec<BlockHash> {
        let fixture = Fixture::load(name);
        let expected = fixture.expected_kvmesh();
        let mut blocks = WorkerBlocks::new();
        let live = &fixture.live()[0];
        let (batch, _) = decode_batch(&parse_live(&live.frames).expect("live").payload).expect("batch");
        blocks.apply(0, &batch);
        let view = StoredView::of(&live.decoded[1][0]).expect("a store");
        view.blocks
            .iter()
            .take(3)
            .map(|b| blocks.kvmesh_hash(0, *b).expect("translated"))
            .inspect(|kv| {
                assert!(expected.values().any(|e| e == kv));
            })
            .collect()
    };
    let reference = first_chain("vllm-0.33.0-bind_int_sha256");
    for name in FIXTURES {
        assert_eq!(first_chain(name), reference, "{name}");
    }
}

/// Every replay reply parses; the batches are byte for byte the live ones; the END marker closes,
/// in the 3-frame form (>= 0.26, SGLang) and the 2-frame one (0.23).
#[test]
fn replay_replies_repeat_the_live_stream() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let live: HashMap<u64, Vec<u8>> =
            fixture.live().iter().map(|l| (l.seq(), l.frames[2].to_vec())).collect();
        let replies = fixture.replay_replies();
        let (last, batches) = replies.split_last().expect("replies");
        assert_eq!(parse_replay_reply(last), Ok(ReplayReply::End), "{name}");
        assert_eq!(fixture.replay_request()[..], 0u64.to_be_bytes()[..]);
        for reply in batches {
            match parse_replay_reply(reply).unwrap_or_else(|e| panic!("{name}: {e}")) {
                ReplayReply::Batch(b) => {
                    assert_eq!(live.get(&b.seq).map(Vec::as_slice), Some(&b.payload[..]), "{name}")
                }
                ReplayReply::End => panic!("{name}: END before the last reply"),
            }
        }
        assert_eq!(batches.len(), live.len(), "{name}");
    }
}

/// Bytes-mode hashes fold to the number vLLM's int mode would have published.
#[test]
fn bytes_hashes_fold_like_int_mode() {
    let fixture = Fixture::load("vllm-0.33.0-bytes_sha256_cbor");
    let live = &fixture.live()[0];
    let (batch, _) = decode_batch(&live.frames[2]).expect("batch");
    let EngineEvent::Stored(stored) = &batch.events[0] else { panic!("a store") };
    let digest = live.decoded[1][0]["block_hashes"][0]["$hex"].as_str().expect("hex digest");
    let tail = u64::from_str_radix(&digest[48..], 16).expect("hex");
    assert_eq!(stored.blocks[0], EngineHash(tail));
}
