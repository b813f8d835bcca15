//! The messages the agent publishes (`proto/kvmesh/v1/fleet.proto`), built to fit NATS's payload
//! limit: subjects, KvEventBatch numbering and splitting, ResyncChunk chunking. Pure.

use kvmesh_core::hash::BlockHash;
use kvmesh_proto::v1::{
    AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent, KvEventBatch, ResyncChunk, kv_event,
};
use prost::Message;

use crate::blocks::KvChange;

/// NATS's default `max_payload`, assumed until the server says otherwise.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Room kept for a message's fixed fields (worker id aside) and protobuf framing.
const FIXED_OVERHEAD: usize = 64;

/// The subjects of one worker (`<ns>` namespace, `<worker>` id; see fleet.proto).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    /// `kvmesh.<ns>.kv.<worker>`: KvEventBatch.
    pub kv: String,
    /// `kvmesh.<ns>.load.<worker>`: LoadReport.
    pub load: String,
    /// `kvmesh.<ns>.worker.<worker>`: Heartbeat.
    pub worker: String,
    /// `kvmesh.<ns>.resync.<worker>`: ResyncRequest for this worker.
    pub resync: String,
    /// `kvmesh.<ns>.resync.all`: ResyncRequest for every worker.
    pub resync_all: String,
}

impl Subjects {
    /// The subjects of `worker` in namespace `namespace`.
    pub fn new(namespace: &str, worker: &str) -> Subjects {
        Subjects {
            kv: format!("kvmesh.{namespace}.kv.{worker}"),
            load: format!("kvmesh.{namespace}.load.{worker}"),
            worker: format!("kvmesh.{namespace}.worker.{worker}"),
            resync: format!("kvmesh.{namespace}.resync.{worker}"),
            resync_all: format!("kvmesh.{namespace}.resync.all"),
        }
    }
}

/// Numbers KvEventBatch messages of one epoch: 1, 2, ...
#[derive(Debug)]
pub struct KvSequencer {
    worker_id: String,
    epoch: u64,
    last: u64,
}

impl KvSequencer {
    /// A sequencer for `worker_id` in a fresh epoch.
    pub fn new(worker_id: String, epoch: u64) -> KvSequencer {
        KvSequencer { worker_id, epoch, last: 0 }
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sequence number of the last batch built (0 before the first).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The worker id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The messages for one engine batch's changes: usually one, more when they would not fit in
    /// `max_payload` (a rank reset of a large cache). Nothing for no changes.
    pub fn batches(&mut self, dp_rank: u32, changes: Vec<KvChange>, max_payload: usize) -> Vec<KvEventBatch> {
        let budget = max_payload.saturating_sub(self.worker_id.len() + FIXED_OVERHEAD).max(256);
        let max_blocks = (budget - 16) / 8;
        let mut messages = Vec::new();
        let mut events: Vec<KvEvent> = Vec::new();
        let mut size = 0;
        for event in changes.into_iter().flat_map(|c| pieces(c, max_blocks)) {
            // Each event costs its length, a tag byte and a length prefix of at most 5 bytes.
            let cost = event.encoded_len() + 6;
            if size + cost > budget && !events.is_empty() {
                messages.push(self.next(dp_rank, std::mem::take(&mut events)));
                size = 0;
            }
            size += cost;
            events.push(event);
        }
        if !events.is_empty() {
            messages.push(self.next(dp_rank, events));
        }
        messages
    }

    fn next(&mut self, dp_rank: u32, events: Vec<KvEvent>) -> KvEventBatch {
        self.last += 1;
        KvEventBatch { worker_id: self.worker_id.clone(), epoch: self.epoch, seq: self.last, events, dp_rank }
    }
}

/// A change as wire events of at most `max_blocks` blocks each.
fn pieces(change: KvChange, max_blocks: usize) -> Vec<KvEvent> {
    let wrap = |kind| KvEvent { kind: Some(kind) };
    let raw = |blocks: &[BlockHash]| blocks.iter().map(|b| b.0).collect::<Vec<u64>>();
    match change {
        KvChange::Cleared => vec![wrap(kv_event::Kind::Cleared(AllBlocksCleared {}))],
        KvChange::Stored(blocks) => blocks
            .chunks(max_blocks.max(1))
            .map(|c| wrap(kv_event::Kind::Stored(BlocksStored { blocks: raw(c) })))
            .collect(),
        KvChange::Removed(blocks) => blocks
            .chunks(max_blocks.max(1))
            .map(|c| wrap(kv_event::Kind::Removed(BlocksRemoved { blocks: raw(c) })))
            .collect(),
    }
}

/// A worker's block set as ResyncChunk messages that each fit in `max_payload`, numbered from 0,
/// `last` on the final one; at least one chunk, even for an empty set. Blocks held more than once
/// come first in each chunk, so `copies` lists only theirs (absent entries mean 1).
pub fn resync_chunks(
    worker_id: &str,
    epoch: u64,
    seq: u64,
    mut blocks: Vec<(BlockHash, u32)>,
    max_payload: usize,
) -> Vec<ResyncChunk> {
    // Many copies first, then by hash: deterministic output for a given set.
    blocks.sort_unstable_by(|a, b| b.1.min(2).cmp(&a.1.min(2)).then(a.0.cmp(&b.0)));
    let budget = max_payload.saturating_sub(worker_id.len() + FIXED_OVERHEAD).max(256);
    let fresh = |index| ResyncChunk {
        worker_id: worker_id.to_owned(),
        epoch,
        seq,
        chunk: index,
        ..ResyncChunk::default()
    };
    let mut chunks = Vec::new();
    let mut chunk = fresh(0);
    let mut size = 0;
    for (block, copies) in blocks {
        // 8 bytes of fixed64, plus a varint of at most 5 bytes when the count is listed.
        let cost = if copies > 1 { 13 } else { 8 };
        if size + cost > budget && !chunk.blocks.is_empty() {
            let next = fresh(chunk.chunk + 1);
            chunks.push(std::mem::replace(&mut chunk, next));
            size = 0;
        }
        size += cost;
        chunk.blocks.push(block.0);
        if copies > 1 {
            chunk.copies.push(copies);
        }
    }
    chunk.last = true;
    chunks.push(chunk);
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(n: u64) -> Vec<BlockHash> {
        (0..n).map(|i| BlockHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 << 63)).collect()
    }

    #[test]
    fn subjects_follow_the_schema() {
        let s = Subjects::new("prod", "w-1");
        assert_eq!(s.kv, "kvmesh.prod.kv.w-1");
        assert_eq!(s.load, "kvmesh.prod.load.w-1");
        assert_eq!(s.worker, "kvmesh.prod.worker.w-1");
        assert_eq!(s.resync, "kvmesh.prod.resync.w-1");
        assert_eq!(s.resync_all, "kvmesh.prod.resync.all");
    }

    #[test]
    fn batches_are_numbered_from_one_and_empty_changes_publish_nothing() {
        let mut seq = KvSequencer::new("w".into(), 7);
        assert!(seq.batches(0, Vec::new(), DEFAULT_MAX_PAYLOAD).is_empty());
        let a = seq.batches(0, vec![KvChange::Stored(hashes(3)), KvChange::Cleared], DEFAULT_MAX_PAYLOAD);
        let b = seq.batches(2, vec![KvChange::Removed(hashes(1))], DEFAULT_MAX_PAYLOAD);
        assert_eq!((a.len(), a[0].seq, a[0].epoch, a[0].events.len()), (1, 1, 7, 2));
        assert_eq!((b[0].seq, b[0].dp_rank), (2, 2));
        assert_eq!(seq.last(), 2);
    }

    #[test]
    fn large_changes_split_under_max_payload_in_order() {
        let mut seq = KvSequencer::new("worker-with-a-long-name".into(), 1);
        let blocks = hashes(5000);
        let messages = seq.batches(0, vec![KvChange::Removed(blocks.clone()), KvChange::Cleared], 4096);
        assert!(messages.len() > 5);
        let mut seen = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            assert!(m.encoded_len() <= 4096, "message {i} has {} bytes", m.encoded_len());
            assert_eq!(m.seq, i as u64 + 1);
            for e in &m.events {
                match &e.kind {
                    Some(kv_event::Kind::Removed(r)) => seen.extend(r.blocks.iter().map(|b| BlockHash(*b))),
                    Some(kv_event::Kind::Cleared(_)) => seen.push(BlockHash(0)),
                    _ => panic!("unexpected event"),
                }
            }
        }
        assert_eq!(&seen[..5000], &blocks[..]);
        assert_eq!(seen[5000], BlockHash(0));
    }

    #[test]
    fn resync_chunks_fit_and_carry_copies_first() {
        let mut set: Vec<(BlockHash, u32)> = hashes(3000).into_iter().map(|h| (h, 1)).collect();
        set[1500].1 = 3;
        set[7].1 = 2;
        let chunks = resync_chunks("w", 9, 42, set.clone(), 2048);
        assert!(chunks.len() > 5);
        let mut seen = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            assert!(c.encoded_len() <= 2048);
            assert_eq!((c.chunk, c.last, c.seq, c.epoch), (i as u32, i == chunks.len() - 1, 42, 9));
            for (j, b) in c.blocks.iter().enumerate() {
                seen.push((BlockHash(*b), c.copies.get(j).copied().unwrap_or(1)));
            }
        }
        assert_eq!(chunks[0].copies.len(), 2);
        seen.sort();
        set.sort();
        assert_eq!(seen, set);
    }

    #[test]
    fn empty_set_is_one_last_chunk() {
        let chunks = resync_chunks("w", 1, 0, Vec::new(), DEFAULT_MAX_PAYLOAD);
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].last && chunks[0].blocks.is_empty());
    }
}
