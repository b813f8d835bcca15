//! The prefix index: which workers hold which KV blocks, and how long a prefix each holds.
//!
//! Layout, chosen for bytes per block (tens of millions of blocks per fleet, DESIGN.md section 10):
//! - a slab of [`Slot`]s (24 bytes each): the block hash, links of an intrusive LRU list, and the
//!   first holder inline; the rare block held by several workers keeps the others in a side pool;
//! - a `hashbrown::HashTable<u32>` of slab positions keyed by the block hash (about 5.7 bytes per
//!   block at its load factor), so the hash is stored once.
//!
//! Holders are reference-counted per (worker, hash): an engine can cache the same content twice
//! (two identical requests computed in parallel) and evicts each copy with its own removal event.
//! When the index is over capacity it drops whole blocks, least recently stored first.

use hashbrown::HashTable;
use serde::Serialize;

use crate::fleet::WorkerSlot;
use crate::hash::BlockHash;

/// End of a list / no slot.
const NIL: u32 = u32::MAX;
/// Holder marker of a free slab slot.
const FREE_WORKER: u16 = u16::MAX;

/// One worker's copies of one block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Holder {
    worker: u16,
    /// Cached copies on that worker; saturates rather than wraps.
    copies: u16,
}

impl Holder {
    const NONE: Holder = Holder { worker: FREE_WORKER, copies: 0 };
}

/// One indexed block.
#[derive(Clone, Copy, Debug)]
struct Slot {
    hash: u64,
    /// Towards the most recently stored end of the LRU list.
    newer: u32,
    /// Towards the least recently stored end.
    older: u32,
    /// The first holder; `worker == FREE_WORKER` marks a free slot.
    first: Holder,
    /// Position in `extra_holders` of further holders, or NIL.
    more: u32,
}

/// How long a prefix of a request one worker holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub struct Overlap {
    /// The worker.
    pub worker: WorkerSlot,
    /// Leading blocks of the request that the worker holds, without a gap.
    pub blocks: u32,
}

/// Size and activity of an index.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize)]
pub struct IndexStats {
    /// Distinct blocks indexed.
    pub blocks: u64,
    /// (worker, block) pairs indexed: a block on three workers counts three times.
    pub placements: u64,
    /// Bytes the index has allocated.
    pub bytes: u64,
    /// Blocks dropped because the index was at capacity.
    pub evicted_blocks: u64,
    /// Removals of blocks (or copies) the index did not hold for that worker.
    pub unknown_removals: u64,
}

/// Fleet-wide map from block hash to the workers holding it.
#[derive(Clone, Debug)]
pub struct PrefixIndex {
    table: HashTable<u32>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    extra_holders: Vec<Vec<Holder>>,
    free_extra: Vec<u32>,
    /// Most recently stored slot, or NIL.
    newest: u32,
    /// Least recently stored slot, or NIL.
    oldest: u32,
    /// Distinct blocks per worker slot.
    per_worker: Vec<u64>,
    max_blocks: usize,
    live: usize,
    placements: u64,
    evicted_blocks: u64,
    unknown_removals: u64,
}

/// Spreads a block hash over the table's bits; block hashes are already uniform, but tests and
/// engines may feed small or structured values, and hashbrown reads both the top and low bits.
#[inline]
fn table_hash(hash: u64) -> u64 {
    (hash ^ (hash >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

impl PrefixIndex {
    /// An empty index that holds at most `max_blocks` distinct blocks.
    pub fn new(max_blocks: usize) -> Self {
        PrefixIndex {
            table: HashTable::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            extra_holders: Vec::new(),
            free_extra: Vec::new(),
            newest: NIL,
            oldest: NIL,
            per_worker: Vec::new(),
            max_blocks: max_blocks.max(1),
            live: 0,
            placements: 0,
            evicted_blocks: 0,
            unknown_removals: 0,
        }
    }

    /// The capacity in distinct blocks.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Distinct blocks indexed.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Distinct blocks indexed for one worker.
    pub fn worker_blocks(&self, worker: WorkerSlot) -> u64 {
        self.per_worker.get(worker.index()).copied().unwrap_or(0)
    }

    /// Records that `worker` cached one more copy of each block, and marks them most recently used.
    pub fn store(&mut self, worker: WorkerSlot, hashes: &[BlockHash]) {
        for &hash in hashes {
            self.store_one(worker, hash);
        }
    }

    /// Records that `worker` evicted one copy of each block. Removing what is not held is counted
    /// in [`IndexStats::unknown_removals`] and otherwise ignored.
    pub fn remove(&mut self, worker: WorkerSlot, hashes: &[BlockHash]) {
        for &hash in hashes {
            self.remove_one(worker, hash, 1);
        }
    }

    /// Forgets every block of `worker` (the engine cleared its cache, or the worker is gone).
    /// Walks the whole slab: rare, and linear in the index size.
    pub fn clear_worker(&mut self, worker: WorkerSlot) {
        if self.worker_blocks(worker) == 0 {
            return;
        }
        for pos in 0..self.slots.len() as u32 {
            if self.slots[pos as usize].first.worker != FREE_WORKER {
                let hash = self.slots[pos as usize].hash;
                self.remove_one(worker, BlockHash(hash), u16::MAX);
            }
        }
    }

    /// Whether any worker holds the block (a block nobody holds leaves the index).
    pub fn contains(&self, hash: BlockHash) -> bool {
        self.find(hash).is_some()
    }

    /// Whether `worker` holds the block.
    pub fn holds(&self, worker: WorkerSlot, hash: BlockHash) -> bool {
        self.find(hash).is_some_and(|pos| self.copies(pos, worker.0) > 0)
    }

    /// Cached copies of a block on a worker.
    pub fn copies_on(&self, worker: WorkerSlot, hash: BlockHash) -> u16 {
        self.find(hash).map_or(0, |pos| self.copies(pos, worker.0))
    }

    /// For each worker holding the first block of `hashes`, how many leading blocks it holds
    /// without a gap, written to `out` (cleared first; workers holding none are left out).
    /// Stops reading the index as soon as no worker can extend its prefix.
    pub fn longest_prefix(&self, hashes: &[BlockHash], out: &mut Vec<Overlap>) {
        out.clear();
        let Some((&first, rest)) = hashes.split_first() else { return };
        let Some(pos) = self.find(first) else { return };
        self.for_each_holder(pos, |h| out.push(Overlap { worker: WorkerSlot(h.worker), blocks: 1 }));
        // Candidates and each block's side list are both sorted by worker, so one merge per block
        // finds who extends: O(candidates + holders) per block, however many workers share a prefix.
        out.sort_unstable_by_key(|o| o.worker);
        for (i, &hash) in rest.iter().enumerate() {
            let depth = i as u32 + 1;
            let Some(pos) = self.find(hash) else { break };
            let slot = &self.slots[pos as usize];
            let extra: &[Holder] =
                if slot.more == NIL { &[] } else { &self.extra_holders[slot.more as usize] };
            let mut e = 0;
            let mut extended = 0;
            for o in out.iter_mut().filter(|o| o.blocks == depth) {
                let w = o.worker.0;
                let held = slot.first.worker == w || {
                    while e < extra.len() && extra[e].worker < w {
                        e += 1;
                    }
                    e < extra.len() && extra[e].worker == w
                };
                if held {
                    o.blocks += 1;
                    extended += 1;
                }
            }
            if extended == 0 {
                break;
            }
        }
    }

    /// One step of a prefix walk block by block, for callers that look blocks up as they produce
    /// them (early exit) and so need no second pass: every worker whose run in `runs` (indexed by
    /// worker slot) is `depth` blocks long and who holds `hash` gets one more block. Returns
    /// whether anyone was extended. Walking `hashes` in order from zero runs gives
    /// [`longest_prefix`](Self::longest_prefix); walking two indexes with the same `runs` gives
    /// their union.
    pub fn extend_runs(&self, hash: BlockHash, depth: u32, runs: &mut [u32]) -> bool {
        // An empty index (a fleet without KV events yet) costs no hashing.
        if self.live == 0 {
            return false;
        }
        let Some(pos) = self.find(hash) else { return false };
        let mut extend = |worker: u16| match runs.get_mut(usize::from(worker)) {
            Some(run) if *run == depth => {
                *run = depth + 1;
                true
            }
            _ => false,
        };
        let slot = &self.slots[pos as usize];
        let mut extended = extend(slot.first.worker);
        if slot.more != NIL {
            for h in &self.extra_holders[slot.more as usize] {
                extended |= extend(h.worker);
            }
        }
        extended
    }

    /// Size and activity figures.
    pub fn stats(&self) -> IndexStats {
        let holder = std::mem::size_of::<Holder>();
        let extra: usize = self.extra_holders.iter().map(|v| v.capacity() * holder).sum::<usize>()
            + self.extra_holders.capacity() * std::mem::size_of::<Vec<Holder>>();
        let bytes = self.table.allocation_size()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + (self.free_slots.capacity() + self.free_extra.capacity()) * 4
            + self.per_worker.capacity() * 8
            + extra;
        IndexStats {
            blocks: self.live as u64,
            placements: self.placements,
            bytes: bytes as u64,
            evicted_blocks: self.evicted_blocks,
            unknown_removals: self.unknown_removals,
        }
    }

    fn find(&self, hash: BlockHash) -> Option<u32> {
        let slots = &self.slots;
        self.table.find(table_hash(hash.0), |&pos| slots[pos as usize].hash == hash.0).copied()
    }

    fn copies(&self, pos: u32, worker: u16) -> u16 {
        let slot = &self.slots[pos as usize];
        if slot.first.worker == worker {
            return slot.first.copies;
        }
        if slot.more == NIL {
            return 0;
        }
        let list = &self.extra_holders[slot.more as usize];
        list.binary_search_by_key(&worker, |h| h.worker).map_or(0, |i| list[i].copies)
    }

    fn for_each_holder(&self, pos: u32, mut f: impl FnMut(Holder)) {
        let slot = &self.slots[pos as usize];
        f(slot.first);
        if slot.more != NIL {
            self.extra_holders[slot.more as usize].iter().copied().for_each(f);
        }
    }

    fn store_one(&mut self, worker: WorkerSlot, hash: BlockHash) {
        let pos = match self.find(hash) {
            Some(pos) => {
                self.unlink(pos);
                pos
            }
            None => {
                if self.live >= self.max_blocks {
                    self.evict_oldest();
                }
                self.insert_slot(hash)
            }
        };
        self.link_newest(pos);
        if self.add_copy(pos, worker.0) {
            if self.per_worker.len() <= worker.index() {
                self.per_worker.resize(worker.index() + 1, 0);
            }
            self.per_worker[worker.index()] += 1;
            self.placements += 1;
        }
    }

    /// Adds a copy for `worker`; true when the worker did not hold the block before.
    fn add_copy(&mut self, pos: u32, worker: u16) -> bool {
        let slot = &mut self.slots[pos as usize];
        if slot.first.worker == worker {
            slot.first.copies = slot.first.copies.saturating_add(1);
            return false;
        }
        if slot.first.worker == FREE_WORKER {
            slot.first = Holder { worker, copies: 1 };
            return true;
        }
        if slot.more == NIL {
            let more = match self.free_extra.pop() {
                Some(i) => i,
                None => {
                    self.extra_holders.push(Vec::new());
                    (self.extra_holders.len() - 1) as u32
                }
            };
            self.slots[pos as usize].more = more;
        }
        // Side lists stay sorted by worker: `longest_prefix` merges against them.
        let list = &mut self.extra_holders[self.slots[pos as usize].more as usize];
        match list.binary_search_by_key(&worker, |h| h.worker) {
            Ok(i) => {
                list[i].copies = list[i].copies.saturating_add(1);
                false
            }
            Err(i) => {
                list.insert(i, Holder { worker, copies: 1 });
                true
            }
        }
    }

    /// Takes up to `n` copies of the block from `worker`; frees the block when nobody holds it.
    fn remove_one(&mut self, worker: WorkerSlot, hash: BlockHash, n: u16) {
        let Some(pos) = self.find(hash) else {
            self.unknown_removals += 1;
            return;
        };
        let w = worker.0;
        let slot = &mut self.slots[pos as usize];
        let gone = if slot.first.worker == w {
            slot.first.copies = slot.first.copies.saturating_sub(n);
            if slot.first.copies == 0 {
                // Promote the last side-list holder into the inline place (the list stays sorted).
                slot.first = Holder::NONE;
                if slot.more != NIL {
                    let more = slot.more as usize;
                    if let Some(h) = self.extra_holders[more].pop() {
                        self.slots[pos as usize].first = h;
                    }
                    if self.extra_holders[more].is_empty() {
                        self.release_extra(pos);
                    }
                }
                true
            } else {
                false
            }
        } else if slot.more != NIL {
            let more = slot.more as usize;
            let list = &mut self.extra_holders[more];
            match list.binary_search_by_key(&w, |h| h.worker).ok() {
                Some(i) => {
                    list[i].copies = list[i].copies.saturating_sub(n);
                    if list[i].copies == 0 {
                        list.remove(i);
                        if list.is_empty() {
                            self.release_extra(pos);
                        }
                        true
                    } else {
                        false
                    }
                }
                None => {
                    self.unknown_removals += 1;
                    false
                }
            }
        } else {
            self.unknown_removals += 1;
            false
        };
        if gone {
            self.per_worker[worker.index()] -= 1;
            self.placements -= 1;
            if self.slots[pos as usize].first.worker == FREE_WORKER {
                self.free_slot(pos);
            }
        }
    }

    fn release_extra(&mut self, pos: u32) {
        let more = self.slots[pos as usize].more;
        let list = &mut self.extra_holders[more as usize];
        list.clear();
        list.shrink_to(2);
        self.free_extra.push(more);
        self.slots[pos as usize].more = NIL;
    }

    fn insert_slot(&mut self, hash: BlockHash) -> u32 {
        let slot = Slot { hash: hash.0, newer: NIL, older: NIL, first: Holder::NONE, more: NIL };
        let pos = match self.free_slots.pop() {
            Some(pos) => {
                self.slots[pos as usize] = slot;
                pos
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        self.table.insert_unique(table_hash(hash.0), pos, |&p| table_hash(slots[p as usize].hash));
        self.live += 1;
        pos
    }

    /// Drops a slot whose last holder is gone.
    fn free_slot(&mut self, pos: u32) {
        let hash = self.slots[pos as usize].hash;
        let slots = &self.slots;
        if let Ok(entry) = self.table.find_entry(table_hash(hash), |&p| slots[p as usize].hash == hash) {
            entry.remove();
        }
        self.unlink(pos);
        if self.slots[pos as usize].more != NIL {
            self.release_extra(pos);
        }
        self.slots[pos as usize].first = Holder::NONE;
        self.free_slots.push(pos);
        self.live -= 1;
    }

    /// Drops the least recently stored block from every worker.
    fn evict_oldest(&mut self) {
        let pos = self.oldest;
        if pos == NIL {
            return;
        }
        let mut holders = [Holder::NONE; 8];
        let mut n = 0;
        let mut overflow = Vec::new();
        self.for_each_holder(pos, |h| {
            if n < holders.len() {
                holders[n] = h;
                n += 1;
            } else {
                overflow.push(h);
            }
        });
        for h in holders[..n].iter().chain(&overflow) {
            self.per_worker[h.worker as usize] -= 1;
            self.placements -= 1;
        }
        self.evicted_blocks += 1;
        self.free_slot(pos);
    }

    fn unlink(&mut self, pos: u32) {
        let Slot { newer, older, .. } = self.slots[pos as usize];
        if newer == NIL {
            if self.newest == pos {
                self.newest = older;
            }
        } else {
            self.slots[newer as usize].older = older;
        }
        if older == NIL {
            if self.oldest == pos {
                self.oldest = newer;
            }
        } else {
            self.slots[older as usize].newer = newer;
        }
        let slot = &mut self.slots[pos as usize];
        slot.newer = NIL;
        slot.older = NIL;
    }

    fn link_newest(&mut self, pos: u32) {
        let old_newest = self.newest;
        {
            let slot = &mut self.slots[pos as usize];
            slot.newer = NIL;
            slot.older = old_newest;
        }
        if old_newest != NIL {
            self.slots[old_newest as usize].newer = pos;
        }
        self.newest = pos;
        if self.oldest == NIL {
            self.oldest = pos;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const A: WorkerSlot = WorkerSlot(0);
    const B: WorkerSlot = WorkerSlot(1);
    const C: WorkerSlot = WorkerSlot(2);

    fn h(v: &[u64]) -> Vec<BlockHash> {
        v.iter().map(|&x| BlockHash(x)).collect()
    }

    fn prefix(index: &PrefixIndex, hashes: &[u64]) -> BTreeMap<u16, u32> {
        let mut out = Vec::new();
        index.longest_prefix(&h(hashes), &mut out);
        out.into_iter().map(|o| (o.worker.0, o.blocks)).collect()
    }

    #[test]
    fn stored_blocks_match_per_worker() {
        let mut idx = PrefixIndex::new(1000);
        idx.store(A, &h(&[1, 2, 3, 4]));
        idx.store(B, &h(&[1, 2]));
        assert_eq!(prefix(&idx, &[1, 2, 3, 4, 5]), BTreeMap::from([(0, 4), (1, 2)]));
        assert_eq!(idx.worker_blocks(A), 4);
        assert_eq!(idx.worker_blocks(B), 2);
        assert_eq!(idx.len(), 4);
        assert_eq!(idx.stats().placements, 6);
    }

    #[test]
    fn longest_prefix_stops_at_a_gap() {
        let mut idx = PrefixIndex::new(1000);
        // The engine evicted block 2 of A's prefix: blocks after the gap do not count.
        idx.store(A, &h(&[1, 3, 4]));
        idx.store(B, &h(&[1, 2, 3]));
        assert_eq!(prefix(&idx, &[1, 2, 3, 4]), BTreeMap::from([(0, 1), (1, 3)]));
        // A prefix whose first block nobody holds matches nothing, whatever follows.
        assert!(prefix(&idx, &[9, 1, 2, 3]).is_empty());
        assert!(prefix(&idx, &[]).is_empty());
    }

    #[test]
    fn evicted_block_stops_matching() {
        let mut idx = PrefixIndex::new(1000);
        idx.store(A, &h(&[1, 2, 3]));
        idx.remove(A, &h(&[2]));
        assert_eq!(prefix(&idx, &[1, 2, 3]), BTreeMap::from([(0, 1)]));
        assert!(!idx.holds(A, BlockHash(2)));
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn duplicate_copies_are_reference_counted() {
        // vLLM caches identical content twice and publishes one BlockRemoved per copy.
        let mut idx = PrefixIndex::new(1000);
        idx.store(A, &h(&[7]));
        idx.store(A, &h(&[7]));
        assert_eq!(idx.copies_on(A, BlockHash(7)), 2);
        assert_eq!(idx.worker_blocks(A), 1);
        idx.remove(A, &h(&[7]));
        assert!(idx.holds(A, BlockHash(7)));
        idx.remove(A, &h(&[7]));
        assert!(!idx.holds(A, BlockHash(7)));
        assert!(idx.is_empty());
        assert_eq!(idx.worker_blocks(A), 0);
    }

    #[test]
    fn unknown_removal_is_counted_and_harmless() {
        let mut idx = PrefixIndex::new(1000);
        idx.store(A, &h(&[1]));
        idx.remove(B, &h(&[1]));
        idx.remove(A, &h(&[99]));
        assert_eq!(idx.stats().unknown_removals, 2);
        assert!(idx.holds(A, BlockHash(1)));
    }

    #[test]
    fn clear_worker_leaves_others() {
        let mut idx = PrefixIndex::new(1000);
        idx.store(A, &h(&[1, 2, 3]));
        idx.store(A, &h(&[1]));
        idx.store(B, &h(&[1, 2]));
        idx.store(C, &h(&[5]));
        idx.clear_worker(A);
        assert_eq!(idx.worker_blocks(A), 0);
        assert_eq!(prefix(&idx, &[1, 2, 3]), BTreeMap::from([(1, 2)]));
        assert_eq!(idx.len(), 3);
        idx.clear_worker(B);
        idx.clear_worker(C);
        assert!(idx.is_empty());
        assert_eq!(idx.stats().placements, 0);
    }

    #[test]
    fn capacity_evicts_least_recently_stored() {
        let mut idx = PrefixIndex::new(3);
        idx.store(A, &h(&[1, 2, 3]));
        idx.store(B, &h(&[1])); // touches 1: now 2 is the oldest
        idx.store(A, &h(&[4]));
        assert!(!idx.holds(A, BlockHash(2)));
        assert!(idx.holds(A, BlockHash(1)) && idx.holds(B, BlockHash(1)));
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.stats().evicted_blocks, 1);
        idx.store(C, &h(&[5, 6]));
        // 3 and 1 were the oldest; 1 was on two workers and leaves both.
        assert_eq!(idx.worker_blocks(B), 0);
        assert_eq!(idx.worker_blocks(A), 1);
        assert_eq!(idx.stats().placements, 3);
    }

    #[test]
    fn many_holders_promote_and_release() {
        let mut idx = PrefixIndex::new(100);
        for w in 0..6 {
            idx.store(WorkerSlot(w), &h(&[42]));
        }
        assert_eq!(prefix(&idx, &[42]).len(), 6);
        idx.remove(WorkerSlot(0), &h(&[42])); // the inline holder leaves
        idx.remove(WorkerSlot(3), &h(&[42]));
        let left: BTreeSet<u16> = prefix(&idx, &[42]).into_keys().collect();
        assert_eq!(left, BTreeSet::from([1, 2, 4, 5]));
        for w in [1, 2, 4, 5] {
            idx.remove(WorkerSlot(w), &h(&[42]));
        }
        assert!(idx.is_empty());
        // The freed side list is reused, not leaked.
        idx.store(A, &h(&[43]));
        idx.store(B, &h(&[43]));
        assert_eq!(idx.extra_holders.len(), 1);
    }

    #[test]
    fn stats_report_bytes() {
        let mut idx = PrefixIndex::new(100_000);
        let hashes: Vec<BlockHash> =
            (0..10_000u64).map(|i| BlockHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))).collect();
        idx.store(A, &hashes);
        let stats = idx.stats();
        assert_eq!(stats.blocks, 10_000);
        let per_block = stats.bytes as f64 / 10_000.0;
        assert!((24.0..80.0).contains(&per_block), "bytes per block {per_block}");
    }

    /// Workers in the property tests: enough that blocks get long side lists of holders.
    const PT_WORKERS: u16 = 10;

    #[derive(Clone, Debug)]
    enum Op {
        Store(u16, Vec<u8>),
        Remove(u16, Vec<u8>),
        Clear(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u16..PT_WORKERS, proptest::collection::vec(0u8..24, 1..6)).prop_map(|(w, v)| Op::Store(w, v)),
            3 => (0u16..PT_WORKERS, proptest::collection::vec(0u8..24, 1..4)).prop_map(|(w, v)| Op::Remove(w, v)),
            1 => (0u16..PT_WORKERS).prop_map(Op::Clear),
        ]
    }

    /// An index after `ops`, with room for all of them.
    fn built(ops: &[Op]) -> PrefixIndex {
        let mut idx = PrefixIndex::new(10_000);
        let blocks = |v: &[u8]| h(&v.iter().map(|&x| u64::from(x)).collect::<Vec<_>>());
        for op in ops {
            match op {
                Op::Store(w, v) => idx.store(WorkerSlot(*w), &blocks(v)),
                Op::Remove(w, v) => idx.remove(WorkerSlot(*w), &blocks(v)),
                Op::Clear(w) => idx.clear_worker(WorkerSlot(*w)),
            }
        }
        idx
    }

    proptest! {
        /// Without capacity pressure the index equals a plain multiset model of the events.
        #[test]
        fn matches_a_refcount_model(ops in proptest::collection::vec(op(), 1..80)) {
            let mut idx = PrefixIndex::new(10_000);
            let mut model: BTreeMap<(u16, u64), u32> = BTreeMap::new();
            for op in &ops {
                match op {
                    Op::Store(w, v) => {
                        idx.store(WorkerSlot(*w), &h(&v.iter().map(|&x| x as u64).collect::<Vec<_>>()));
                        for &x in v { *model.entry((*w, x as u64)).or_default() += 1; }
                    }
                    Op::Remove(w, v) => {
                        idx.remove(WorkerSlot(*w), &h(&v.iter().map(|&x| x as u64).collect::<Vec<_>>()));
                        for &x in v {
                            if let Some(c) = model.get_mut(&(*w, x as u64)) {
                                *c -= 1;
                                if *c == 0 { model.remove(&(*w, x as u64)); }
                            }
                        }
                    }
                    Op::Clear(w) => {
                        idx.clear_worker(WorkerSlot(*w));
                        model.retain(|(mw, _), _| mw != w);
                    }
                }
            }
            for w in 0..PT_WORKERS {
                let n = model.keys().filter(|(mw, _)| *mw == w).count() as u64;
                prop_assert_eq!(idx.worker_blocks(WorkerSlot(w)), n);
                for x in 0..24u64 {
                    let c = model.get(&(w, x)).copied().unwrap_or(0);
                    prop_assert_eq!(u32::from(idx.copies_on(WorkerSlot(w), BlockHash(x))), c);
                }
            }
            let distinct: BTreeSet<u64> = model.keys().map(|(_, x)| *x).collect();
            prop_assert_eq!(idx.len(), distinct.len());
            prop_assert_eq!(idx.stats().placements, model.len() as u64);
        }

        /// A block-by-block walk with `extend_runs` finds what `longest_prefix` finds.
        #[test]
        fn extend_runs_walk_equals_longest_prefix(
            ops in proptest::collection::vec(op(), 1..60),
            query in proptest::collection::vec(0u64..24, 0..12),
        ) {
            let idx = built(&ops);
            let mut runs = vec![0u32; usize::from(PT_WORKERS)];
            for (depth, hash) in h(&query).into_iter().enumerate() {
                if !idx.extend_runs(hash, depth as u32, &mut runs) {
                    break;
                }
            }
            let walked: BTreeMap<u16, u32> =
                runs.iter().enumerate().filter(|(_, r)| **r > 0).map(|(w, r)| (w as u16, *r)).collect();
            prop_assert_eq!(walked, prefix(&idx, &query));
        }

        /// Under capacity pressure the index never exceeds its bound and stays self-consistent.
        #[test]
        fn bounded_index_stays_consistent(ops in proptest::collection::vec(op(), 1..120), cap in 1usize..10) {
            let mut idx = PrefixIndex::new(cap);
            for op in &ops {
                match op {
                    Op::Store(w, v) => idx.store(WorkerSlot(*w), &h(&v.iter().map(|&x| x as u64).collect::<Vec<_>>())),
                    Op::Remove(w, v) => idx.remove(WorkerSlot(*w), &h(&v.iter().map(|&x| x as u64).collect::<Vec<_>>())),
                    Op::Clear(w) => idx.clear_worker(WorkerSlot(*w)),
                }
                prop_assert!(idx.len() <= cap);
            }
            let mut placements = 0;
            for w in 0..PT_WORKERS {
                let held = (0..24u64).filter(|&x| idx.holds(WorkerSlot(w), BlockHash(x))).count() as u64;
                prop_assert_eq!(idx.worker_blocks(WorkerSlot(w)), held);
                placements += held;
            }
            prop_assert_eq!(idx.stats().placements, placements);
            let distinct = (0..24u64).filter(|&x| (0..PT_WORKERS).any(|w| idx.holds(WorkerSlot(w), BlockHash(x)))).count();
            prop_assert_eq!(idx.len(), distinct);
        }

        /// The longest prefix equals a direct walk of the model.
        #[test]
        fn longest_prefix_matches_a_direct_walk(ops in proptest::collection::vec(op(), 1..60), query in proptest::collection::vec(0u8..24, 0..8)) {
            let idx = built(&ops);
            let q: Vec<u64> = query.iter().map(|&x| x as u64).collect();
            let got = prefix(&idx, &q);
            for w in 0..PT_WORKERS {
                let want = q.iter().take_while(|&&x| idx.holds(WorkerSlot(w), BlockHash(x))).count() as u32;
                prop_assert_eq!(got.get(&w).copied().unwrap_or(0), want);
            }
        }
    }
}
