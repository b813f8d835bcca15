//! The approx-prefix policy's memory: for fleets whose engines publish no KV events, assume a routed
//! prompt's blocks are cached on the worker it went to, for a while. kv-aware keeps the same kind
//! of entries for its own decisions until the engines' events arrive (optimistic entries).
//!
//! What is recorded: the request's block hashes (the same chained token hashes kv-aware looks up), so
//! both are read the same way. A fleet without a tokenizer can feed hashes of the prompt text cut
//! into fixed-size byte chunks through the same calls; the index only sees opaque hashes.
//!
//! Layout, chosen for what a request touches (this runs on the filter's per-request path): one
//! fixed-size slot per block with up to [`HOLDERS`] workers, each with the time its prediction
//! expires. Recording a prompt again only moves those times on: there are no per-decision records,
//! no reference counts and no removal pass. Expired predictions are ignored on reading; a CLOCK
//! hand frees expired blocks a few slots per decision, and past `max_blocks` blocks it drops the
//! first block it finds expired or not recorded again since it last passed (second chance).
//!
//! A block routed to more than [`HOLDERS`] workers within its TTL keeps the most recent ones: a
//! prediction, not an inventory.

use std::cell::Cell;

use hashbrown::HashTable;

use crate::fleet::WorkerSlot;
use crate::hash::BlockHash;

use super::config::ApproxConfig;

/// Workers remembered per block.
pub const HOLDERS: usize = 4;

/// Holder marker of an empty place.
const NOBODY: u16 = u16::MAX;

/// One block's predictions. 40 bytes.
#[derive(Clone, Copy, Debug)]
struct Slot {
    hash: u64,
    /// When each holder's prediction expires, ms after `ApproxIndex::base_ms`.
    expires: [u32; HOLDERS],
    /// The holders' worker slots; [`NOBODY`] where empty.
    workers: [u16; HOLDERS],
    /// Recorded again since the CLOCK hand last passed.
    referenced: bool,
    /// Whether the slot holds a block (is in the table).
    used: bool,
}

impl Slot {
    const EMPTY: Slot =
        Slot { hash: 0, expires: [0; HOLDERS], workers: [NOBODY; HOLDERS], referenced: false, used: false };

    /// Whether any prediction of this block is still live at `now` (relative ms).
    fn live(&self, now: u32) -> bool {
        self.workers.iter().zip(self.expires).any(|(&w, e)| w != NOBODY && e > now)
    }
}

/// Predicted cache contents, learnt from this proxy's own decisions.
#[derive(Clone, Debug)]
pub struct ApproxIndex {
    /// Slot positions, by block hash.
    table: HashTable<u32>,
    slots: Vec<Slot>,
    /// The CLOCK hand: the next slot to consider when a block must go.
    hand: usize,
    /// Where [`ApproxIndex::expire`] goes on (its own hand: sweeping must not move the CLOCK's).
    sweep: usize,
    /// Blocks held.
    live: usize,
    /// The slot of the block last found by [`ApproxIndex::extend_runs`]: a walk reads a prompt's
    /// blocks in order, and a prompt recorded in order sits in consecutive slots, so the next
    /// block is usually in the next slot (checked before the table is probed).
    last_found: Cell<u32>,
    /// The clock's zero for the 32-bit expiry times; set by the first record.
    base_ms: Option<u64>,
    ttl_ms: u64,
    max_blocks: usize,
}

/// Spreads a block hash over the table's bits (tests feed small values).
#[inline]
fn table_hash(hash: u64) -> u64 {
    (hash ^ (hash >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

impl ApproxIndex {
    /// An empty index with the given expiry and capacity.
    pub fn new(config: ApproxConfig) -> Self {
        ApproxIndex {
            table: HashTable::new(),
            slots: Vec::new(),
            hand: 0,
            sweep: 0,
            live: 0,
            last_found: Cell::new(u32::MAX),
            base_ms: None,
            ttl_ms: config.ttl_ms,
            max_blocks: config.max_blocks.max(1),
        }
    }

    /// (block, worker) predictions held, expired ones not yet dropped included.
    pub fn recorded_blocks(&self) -> usize {
        self.slots.iter().filter(|s| s.used).map(|s| s.workers.iter().filter(|&&w| w != NOBODY).count()).sum()
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Remembers that `hashes` were sent to `worker` at `now_ms`, predicted until `now_ms + ttl`.
    pub fn record(&mut self, worker: WorkerSlot, hashes: &[BlockHash], now_ms: u64) {
        // A prompt longer than the whole capacity keeps its leading blocks: those are what a later
        // request can share.
        let hashes = &hashes[..hashes.len().min(self.max_blocks)];
        if hashes.is_empty() || worker.0 == NOBODY {
            return;
        }
        let now = self.relative(now_ms);
        let ttl = u32::try_from(self.ttl_ms).unwrap_or(u32::MAX);
        let expires = now.saturating_add(ttl);
        let mut previous = u32::MAX;
        for &hash in hashes {
            let pos = match self.find_after(previous, hash) {
                Some(pos) => {
                    self.slots[pos as usize].referenced = true;
                    pos
                }
                None => self.insert(hash, now),
            };
            let slot = &mut self.slots[pos as usize];
            // The worker's own place, else an empty or expired one, else the soonest to expire.
            let place = slot
                .workers
                .iter()
                .position(|&w| w == worker.0)
                .or_else(|| (0..HOLDERS).find(|&i| slot.workers[i] == NOBODY || slot.expires[i] <= now))
                .unwrap_or_else(|| (0..HOLDERS).min_by_key(|&i| slot.expires[i]).unwrap_or(0));
            slot.workers[place] = worker.0;
            slot.expires[place] = expires;
            previous = pos;
        }
    }

    /// One step of a prefix walk (as [`crate::index::PrefixIndex::extend_runs`]): every worker
    /// whose run in `runs` is `depth` blocks long and for whom `hash` is predicted at `now_ms`
    /// gets one more block. Returns whether anyone was extended.
    pub fn extend_runs(&self, hash: BlockHash, depth: u32, runs: &mut [u32], now_ms: u64) -> bool {
        if self.live == 0 {
            return false;
        }
        // Depth 0 starts a walk: the previous one's last slot says nothing about this block.
        let previous = if depth == 0 { u32::MAX } else { self.last_found.get() };
        let Some(pos) = self.find_after(previous, hash) else { return false };
        self.last_found.set(pos);
        let now = self.read_clock(now_ms);
        let slot = &self.slots[pos as usize];
        let mut extended = false;
        for (&w, &expires) in slot.workers.iter().zip(&slot.expires) {
            if w != NOBODY
                && expires > now
                && let Some(run) = runs.get_mut(usize::from(w))
                && *run == depth
            {
                *run = depth + 1;
                extended = true;
            }
        }
        extended
    }

    /// Frees the slots of blocks whose predictions all expired at or before `now_ms`, visiting at
    /// most `budget` slots from the CLOCK hand: memory comes back without a pass over everything.
    pub fn expire(&mut self, now_ms: u64, budget: usize) {
        let now = self.relative(now_ms);
        for _ in 0..budget.min(self.slots.len()) {
            if self.sweep >= self.slots.len() {
                self.sweep = 0;
            }
            let pos = self.sweep;
            self.sweep += 1;
            if self.slots[pos].used && !self.slots[pos].live(now) {
                self.free(pos);
            }
        }
    }

    /// Forgets everything predicted for a worker (it left the fleet, or restarted with a cold cache).
    pub fn forget_worker(&mut self, worker: WorkerSlot) {
        for pos in 0..self.slots.len() {
            let slot = &mut self.slots[pos];
            if !slot.used {
                continue;
            }
            for place in 0..HOLDERS {
                if slot.workers[place] == worker.0 {
                    slot.workers[place] = NOBODY;
                }
            }
            if slot.workers.iter().all(|&w| w == NOBODY) {
                self.free(pos);
            }
        }
    }

    /// `at_ms` on the index's 32-bit clock. The clock starts at the first record; if it would
    /// overflow (after about 49 days) every prediction is dropped and it starts again.
    fn relative(&mut self, at_ms: u64) -> u32 {
        let base = *self.base_ms.get_or_insert(at_ms);
        match u32::try_from(at_ms.saturating_sub(base)) {
            Ok(rel) => rel,
            Err(_) => {
                self.clear();
                self.base_ms = Some(at_ms);
                0
            }
        }
    }

    /// `at_ms` on the index's clock without moving its base: past the clock's range every
    /// prediction reads as expired, as it will be once the next record starts the clock over.
    fn read_clock(&self, at_ms: u64) -> u32 {
        self.base_ms.map_or(0, |base| u32::try_from(at_ms.saturating_sub(base)).unwrap_or(u32::MAX))
    }

    fn clear(&mut self) {
        self.table.clear();
        self.slots.clear();
        self.hand = 0;
        self.sweep = 0;
        self.live = 0;
    }

    /// [`ApproxIndex::find`], trying the slot after `previous` first (blocks recorded in order
    /// take consecutive slots while the index grows).
    #[inline]
    fn find_after(&self, previous: u32, hash: BlockHash) -> Option<u32> {
        // `u32::MAX`: no previous block. A block is in at most one used slot, so a used slot
        // with its hash is the one.
        let next = previous
            .checked_add(1)
            .filter(|&n| self.slots.get(n as usize).is_some_and(|slot| slot.used && slot.hash == hash.0));
        next.or_else(|| self.find(hash))
    }

    fn find(&self, hash: BlockHash) -> Option<u32> {
        let slots = &self.slots;
        self.table.find(table_hash(hash.0), |&pos| slots[pos as usize].hash == hash.0).copied()
    }

    /// A slot for a new block (unreferenced, so a block seen once is the first to go).
    fn insert(&mut self, hash: BlockHash, now: u32) -> u32 {
        let pos = if self.slots.len() < self.max_blocks {
            self.slots.push(Slot::EMPTY);
            self.slots.len() - 1
        } else {
            self.victim(now)
        };
        self.slots[pos] = Slot { hash: hash.0, used: true, ..Slot::EMPTY };
        let slots = &self.slots;
        // Positions fit u32: max_blocks beyond that is no capacity anyone configures.
        self.table.insert_unique(table_hash(hash.0), pos as u32, |&p| table_hash(slots[p as usize].hash));
        self.live += 1;
        pos as u32
    }

    /// The slot to reuse when every slot exists: a free one, else an expired block, else the first
    /// block not recorded again since the hand last passed it.
    fn victim(&mut self, now: u32) -> usize {
        // Two laps always find one: the first clears every referenced bit it passes.
        for _ in 0..2 * self.slots.len() {
            let pos = self.advance_hand();
            let slot = &mut self.slots[pos];
            if !slot.used {
                return pos;
            }
            if slot.referenced && slot.live(now) {
                slot.referenced = false;
                continue;
            }
            self.free(pos);
            return pos;
        }
        let pos = self.advance_hand();
        if self.slots[pos].used {
            self.free(pos);
        }
        pos
    }

    fn advance_hand(&mut self) -> usize {
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
        self.hand += 1;
        self.hand - 1
    }

    /// Drops the block in slot `pos`; the slot stays for reuse.
    fn free(&mut self, pos: usize) {
        let hash = self.slots[pos].hash;
        if let Ok(entry) = self.table.find_entry(table_hash(hash), |&p| p as usize == pos) {
            entry.remove();
        }
        self.slots[pos] = Slot::EMPTY;
        self.live -= 1;
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

    /// Each worker's predicted prefix of `hashes` at `now_ms`, by slot.
    fn runs(idx: &ApproxIndex, hashes: &[BlockHash], now_ms: u64) -> Vec<u32> {
        let mut runs = vec![0; 8];
        for (depth, &hash) in hashes.iter().enumerate() {
            if !idx.extend_runs(hash, depth as u32, &mut runs, now_ms) {
                break;
            }
        }
        runs
    }

    fn overlap(idx: &ApproxIndex, worker: WorkerSlot, hashes: &[BlockHash], now_ms: u64) -> u32 {
        runs(idx, hashes, now_ms)[worker.index()]
    }

    #[test]
    fn recorded_prompt_is_predicted_until_its_ttl() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 100, max_blocks: 1000 });
        idx.record(A, &h(&[1, 2, 3]), 1_000);
        assert_eq!(overlap(&idx, A, &h(&[1, 2, 3, 4]), 1_000), 3);
        assert_eq!(overlap(&idx, A, &h(&[1, 2, 3]), 1_099), 3);
        assert_eq!(overlap(&idx, A, &h(&[1, 2, 3]), 1_100), 0);
        idx.expire(1_100, 10);
        assert_eq!(idx.recorded_blocks(), 0);
        assert!(idx.is_empty());
    }

    #[test]
    fn repeated_prompt_lives_until_its_last_record_expires() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 100, max_blocks: 1000 });
        idx.record(A, &h(&[1, 2]), 0);
        idx.record(A, &h(&[1, 2]), 80);
        assert_eq!(overlap(&idx, A, &h(&[1, 2]), 120), 2);
        assert_eq!(overlap(&idx, A, &h(&[1, 2]), 180), 0);
        // One prediction per (block, worker), however often it was recorded.
        assert_eq!(idx.recorded_blocks(), 2);
    }

    #[test]
    fn capacity_drops_blocks_not_recorded_again_first() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 1_000_000, max_blocks: 4 });
        idx.record(A, &h(&[1, 2]), 0);
        idx.record(B, &h(&[3, 4]), 1);
        idx.record(B, &h(&[3]), 2);
        idx.record(B, &h(&[5]), 3);
        // Block 1 was the first not recorded again: A's prompt is gone from its start.
        assert_eq!(overlap(&idx, A, &h(&[1, 2]), 3), 0);
        assert_eq!(overlap(&idx, B, &h(&[3, 4]), 3), 2);
        assert_eq!(overlap(&idx, B, &h(&[5]), 3), 1);
        assert_eq!(idx.len(), 4);
    }

    #[test]
    fn capacity_gives_blocks_recorded_again_a_second_chance_while_live() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 10, max_blocks: 2 });
        idx.record(B, &h(&[2]), 0);
        idx.record(A, &h(&[1]), 1);
        idx.record(B, &h(&[2]), 2);
        idx.record(B, &h(&[3]), 3);
        assert_eq!(overlap(&idx, B, &h(&[2]), 3), 1, "recorded again: kept");
        assert_eq!(overlap(&idx, A, &h(&[1]), 3), 0, "not recorded again: dropped");
        // Once expired, being recorded again no longer saves a block.
        idx.record(A, &h(&[4]), 20);
        assert_eq!(overlap(&idx, A, &h(&[4]), 20), 1);
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn expiry_frees_slots_a_few_at_a_time() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 10, max_blocks: 100 });
        idx.record(A, &h(&[1, 2, 3, 4]), 0);
        idx.expire(5, 10);
        assert_eq!(idx.len(), 4, "nothing expired yet");
        idx.expire(10, 3);
        assert_eq!(idx.len(), 1);
        idx.expire(10, 3);
        assert!(idx.is_empty());
    }

    #[test]
    fn prompt_longer_than_capacity_keeps_its_head() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 10, max_blocks: 3 });
        idx.record(A, &h(&[1, 2, 3, 4, 5]), 0);
        assert_eq!(overlap(&idx, A, &h(&[1, 2, 3, 4, 5]), 0), 3);
        idx.record(A, &[], 0);
        assert_eq!(idx.recorded_blocks(), 3);
    }

    #[test]
    fn many_workers_on_one_block_keep_the_most_recent() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 1_000, max_blocks: 10 });
        for w in 0..6u16 {
            idx.record(WorkerSlot(w), &h(&[7]), u64::from(w));
        }
        assert_eq!(runs(&idx, &h(&[7]), 10), [0, 0, 1, 1, 1, 1, 0, 0]);
    }

    #[test]
    fn forgotten_worker_predicts_nothing() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 10, max_blocks: 100 });
        idx.record(A, &h(&[1, 2]), 0);
        idx.record(B, &h(&[1, 2]), 0);
        idx.forget_worker(A);
        assert_eq!(overlap(&idx, A, &h(&[1, 2]), 0), 0);
        assert_eq!(overlap(&idx, B, &h(&[1, 2]), 0), 2);
        idx.forget_worker(B);
        assert!(idx.is_empty());
    }

    proptest::proptest! {
        /// Without capacity pressure and with at most [`HOLDERS`] workers, the index predicts
        /// exactly what a log of every record says is unexpired, whatever the expiry sweep did.
        #[test]
        fn predictions_match_a_log_of_records(
            records in proptest::collection::vec(
                (0u16..HOLDERS as u16, proptest::collection::vec(0u64..12, 1..6), 0u64..40, 0usize..8),
                1..30,
            ),
            query in proptest::collection::vec(0u64..12, 0..8),
            wait in 0u64..60,
        ) {
            let ttl_ms = 50;
            let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms, max_blocks: 1000 });
            let mut now = 0;
            let mut log = Vec::new();
            for (worker, blocks, step, sweep) in &records {
                now += step;
                idx.expire(now, *sweep);
                idx.record(WorkerSlot(*worker), &h(blocks), now);
                log.push((*worker, blocks.clone(), now));
            }
            let at = now + wait;
            let predicted = |w: u16, b: u64| {
                log.iter().any(|(lw, lb, t)| *lw == w && lb.contains(&b) && t + ttl_ms > at)
            };
            let got = runs(&idx, &h(&query), at);
            for w in 0..HOLDERS as u16 {
                let want = query.iter().take_while(|&&b| predicted(w, b)).count() as u32;
                proptest::prop_assert_eq!(got[usize::from(w)], want, "worker {}", w);
            }
        }
    }

    #[test]
    fn a_clock_past_32_bits_starts_over_instead_of_wrapping() {
        let mut idx = ApproxIndex::new(ApproxConfig { ttl_ms: 10, max_blocks: 100 });
        idx.record(A, &h(&[1]), 0);
        let later = u64::from(u32::MAX) + 5;
        idx.record(B, &h(&[2]), later);
        assert_eq!(overlap(&idx, A, &h(&[1]), later), 0);
        assert_eq!(overlap(&idx, B, &h(&[2]), later), 1);
        assert_eq!(idx.len(), 1);
    }
}
