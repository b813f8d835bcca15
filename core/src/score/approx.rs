//! The approx-prefix policy's memory: for fleets whose engines publish no KV events, assume a routed
//! prompt's blocks are cached on the worker it went to, for a while.
//!
//! What is recorded: the request's block hashes (the same chained token hashes kv-aware looks up), so
//! the scorer reads both indexes the same way. A fleet without a tokenizer can feed hashes of the
//! prompt text cut into fixed-size byte chunks through the same calls; the index only sees opaque
//! hashes.
//!
//! Forgetting: each decision is one record with an expiry (`now_ms + ttl_ms`) in a FIFO. A record
//! holds one reference-counted copy of each of its blocks in a [`PrefixIndex`], so a prompt routed
//! twice to one worker stays predicted until its later record expires. Past `max_blocks` recorded
//! hashes the oldest records are dropped first, which also bounds the index itself.

use std::collections::VecDeque;

use crate::fleet::WorkerSlot;
use crate::hash::BlockHash;
use crate::index::PrefixIndex;

use super::config::ApproxConfig;

/// One routing decision remembered.
#[derive(Clone, Copy, Debug)]
struct Record {
    expires_ms: u64,
    worker: WorkerSlot,
    /// Hashes of this record at the front of `ApproxIndex::hashes`.
    blocks: u32,
}

/// Predicted cache contents, learnt from this proxy's own decisions.
#[derive(Clone, Debug)]
pub struct ApproxIndex {
    index: PrefixIndex,
    records: VecDeque<Record>,
    /// Every record's hashes, concatenated in record order.
    hashes: VecDeque<BlockHash>,
    ttl_ms: u64,
    max_blocks: usize,
}

impl ApproxIndex {
    /// An empty index with the given expiry and capacity.
    pub fn new(config: ApproxConfig) -> Self {
        let max_blocks = config.max_blocks.max(1);
        ApproxIndex {
            index: PrefixIndex::new(max_blocks),
            records: VecDeque::new(),
            hashes: VecDeque::new(),
            ttl_ms: config.ttl_ms,
            max_blocks,
        }
    }

    /// The predicted index, read like the fleet's.
    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }

    /// Block hashes currently remembered (a block recorded twice counts twice).
    pub fn recorded_blocks(&self) -> usize {
        self.hashes.len()
    }

    /// Remembers that `hashes` were sent to `worker` at `now_ms`; expires old records first.
    pub fn record(&mut self, worker: WorkerSlot, hashes: &[BlockHash], now_ms: u64) {
        self.expire(now_ms);
        // A prompt longer than the whole capacity keeps its leading blocks: those are what a later
        // request can share.
        let hashes = &hashes[..hashes.len().min(self.max_blocks)];
        if hashes.is_empty() {
            return;
        }
        while self.hashes.len() + hashes.len() > self.max_blocks && self.forget_oldest() {}
        self.index.store(worker, hashes);
        self.hashes.extend(hashes.iter().copied());
        self.records.push_back(Record {
            expires_ms: now_ms.saturating_add(self.ttl_ms),
            worker,
            blocks: hashes.len() as u32,
        });
    }

    /// Forgets every record that expired at or before `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        while self.records.front().is_some_and(|r| r.expires_ms <= now_ms) {
            self.forget_oldest();
        }
    }

    /// Forgets everything predicted for a worker (it left the fleet, or restarted with a cold cache).
    /// Its queued records stay and later remove nothing, which the index tolerates.
    pub fn forget_worker(&mut self, worker: WorkerSlot) {
        self.index.clear_worker(worker);
    }

    /// Drops the oldest record; false when there is none.
    fn forget_oldest(&mut self) -> bool {
        let Some(record) = self.records.pop_front() else { return false };
        for _ in 0..record.blocks {
            if let Some(hash) = self.hashes.pop_front() {
                self.index.remove(record.worker, std::slice::from_ref(&hash));
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: WorkerSlot = WorkerSlot(0);
    const B: WorkerSlot = WorkerSlot(1);

    fn h(xs: &[u64]) -> Vec<BlockHash> {
        xs.iter().map(|&x| BlockHash(x)).collect()
    }

    fn overlap(idx: &ApproxIndex, worker: WorkerSlot, hashes: &[BlockHash]) -> u32 {
        let mut out = Vec::new();
        idx.index().longest_prefix(hashes, &mut out);
        out.iter().find(|o| o.worker == worker).map_or(0, |o| o.blocks)
    }

    #[test]
    fn recorded_prompt_is_predicted_until_its_ttl() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 100, max_blocks: 1000 });
        idx.record(A, &h(&[1, 2, 3]), 1_000);
        assert_eq!(overlap(&idx, A, &h(&[1, 2, 3, 4])), 3);
        idx.expire(1_099);
        assert_eq!(overlap(&idx, A, &h(&[1, 2, 3])), 3);
        idx.expire(1_100);
        assert_eq!(overlap(&idx, A, &h(&[1, 2, 3])), 0);
        assert_eq!(idx.recorded_blocks(), 0);
        assert!(idx.index().is_empty());
    }

    #[test]
    fn repeated_prompt_lives_until_its_last_record_expires() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 100, max_blocks: 1000 });
        idx.record(A, &h(&[1, 2]), 0);
        idx.record(A, &h(&[1, 2]), 80);
        idx.expire(120);
        assert_eq!(overlap(&idx, A, &h(&[1, 2])), 2);
        idx.expire(180);
        assert_eq!(overlap(&idx, A, &h(&[1, 2])), 0);
    }

    #[test]
    fn capacity_forgets_the_oldest_records_first() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 1_000_000, max_blocks: 4 });
        idx.record(A, &h(&[1, 2]), 0);
        idx.record(B, &h(&[3, 4]), 1);
        idx.record(B, &h(&[5]), 2);
        assert_eq!(overlap(&idx, A, &h(&[1, 2])), 0);
        assert_eq!(overlap(&idx, B, &h(&[3, 4])), 2);
        assert_eq!(overlap(&idx, B, &h(&[5])), 1);
        assert!(idx.recorded_blocks() <= 4);
    }

    #[test]
    fn prompt_longer_than_capacity_keeps_its_head() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 10, max_blocks: 3 });
        idx.record(A, &h(&[1, 2, 3, 4, 5]), 0);
        assert_eq!(overlap(&idx, A, &h(&[1, 2, 3, 4, 5])), 3);
        idx.record(A, &[], 0);
        assert_eq!(idx.recorded_blocks(), 3);
    }

    #[test]
    fn forgotten_worker_predicts_nothing() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 10, max_blocks: 100 });
        idx.record(A, &h(&[1, 2]), 0);
        idx.record(B, &h(&[1, 2]), 0);
        idx.forget_worker(A);
        assert_eq!(overlap(&idx, A, &h(&[1, 2])), 0);
        assert_eq!(overlap(&idx, B, &h(&[1, 2])), 2);
        idx.expire(100);
        assert!(idx.index().is_empty());
    }
}
