//! Nothing an engine sends may panic the agent: every decoder of outside bytes, and the translation
//! and publication of whatever they let through, on arbitrary and on mutated captured input.

mod common;

use bytes::Bytes;
use common::Fixture;
use kvmesh_agent::blocks::WorkerBlocks;
use kvmesh_agent::engines::SourceMsg;
use kvmesh_agent::engines::frames::{parse_live, parse_replay_reply};
use kvmesh_agent::engines::msgpack::decode_batch;
use kvmesh_agent::engines::trtllm::{DrainState, decode_drain};
use kvmesh_agent::load::read_figures;
use kvmesh_agent::promtext;
use kvmesh_agent::publish::KvSequencer;
use proptest::prelude::*;

/// Decodes, translates and numbers a payload the way the agent does.
fn swallow(blocks: &mut WorkerBlocks, sequencer: &mut KvSequencer, payload: &[u8]) {
    if let Ok((batch, _)) = decode_batch(payload) {
        let (changes, _) = blocks.apply(batch.dp_rank.unwrap_or(0) % 4, &batch);
        for message in sequencer.batches(0, changes, 4096) {
            assert!(prost::Message::encoded_len(&message) <= 4096);
        }
    }
}

fn payloads() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for name in ["vllm-0.23.0-bind_int_sha256", "vllm-0.33.0-bytes_sha256_cbor", "sglang-0.5.23-bind_int64"] {
        out.extend(Fixture::load(name).live().into_iter().map(|l| l.frames[2].to_vec()));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut blocks = WorkerBlocks::new();
        let mut sequencer = KvSequencer::new("w".into(), 1);
        swallow(&mut blocks, &mut sequencer, &bytes);
        let _ = decode_drain(&bytes, &mut DrainState::default());
        let _ = read_figures(&bytes);
        let _ = promtext::parse(&String::from_utf8_lossy(&bytes));
        let frames: Vec<Bytes> = bytes.chunks(8).map(Bytes::copy_from_slice).collect();
        let _ = parse_live(&frames);
        let _ = parse_replay_reply(&frames);
    }

    #[test]
    fn mutated_engine_payloads(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                               truncate in any::<prop::sample::Index>(), pick in any::<prop::sample::Index>()) {
        let all = payloads();
        let mut blocks = WorkerBlocks::new();
        let mut sequencer = KvSequencer::new("w".into(), 1);
        // A good history first, so that mutated events meet known parents and held blocks.
        for payload in &all[..all.len() / 2] {
            swallow(&mut blocks, &mut sequencer, payload);
        }
        let mut payload = pick.get(&all).clone();
        for (at, byte) in &edits {
            let i = at.index(payload.len());
            payload[i] = *byte;
        }
        payload.truncate(truncate.index(payload.len() + 1));
        swallow(&mut blocks, &mut sequencer, &payload);
        let _ = blocks.reset_rank(0);
        let _ = blocks.snapshot();
    }

    #[test]
    fn mutated_trtllm_answers(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut body = br#"[{"event_id":1,"window_size":32,"data":{"type":"stored","parent_hash":null,"blocks":[
            {"type":"stored_block","block_hash":7,"cache_level":0,"tokens":[{"token_id":1,"token_extra_id":0},
            {"token_id":2,"token_extra_id":0}]}]}},{"event_id":2,"data":{"type":"removed","block_hashes":[7]}},
            {"event_id":3,"data":{"type":"updated","block_hash":7,"cache_level":{"new_value":1,"old_value":0}}}]"#.to_vec();
        for (at, byte) in &edits {
            let i = at.index(body.len());
            body[i] = *byte;
        }
        let mut blocks = WorkerBlocks::new();
        if let Ok(drain) = decode_drain(&body, &mut DrainState::default()) {
            for message in drain.messages {
                match message {
                    SourceMsg::Batch { rank, batch } => { blocks.apply(rank, &batch); }
                    SourceMsg::Reset { rank, .. } => { blocks.reset_rank(rank); }
                }
            }
        }
    }
}
