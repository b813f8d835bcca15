//! A paged KV cache with prefix caching, modelled on vLLM's V1 block pool (`vllm/v1/core/block_pool.py`):
//! - all blocks start in a free queue; allocation takes from its front;
//! - a block is named (hashed) once it is full; named blocks stay findable after their request ends;
//! - a request's blocks are freed in reverse order onto the queue's tail, so the tail of a prompt is
//!   evicted before its head; a freed block keeps its name until it is reallocated, which evicts it;
//! - the same content may be cached twice (a fully cached prompt recomputes its last block), and each
//!   copy is evicted on its own;
//! - events come out exactly as the engine emits them: `Removed` when a named block is reallocated,
//!   `Stored` when new full blocks are named, per request and in order.

use std::collections::HashMap;
use std::sync::Arc;

use kvmesh_core::hash::{BlockHash, TokenId};

const NIL: u32 = u32::MAX;

/// A change to the set of cached blocks, as the engine would publish it. Hashes are the engine's
/// own (see [`crate::engine_hash`]); the cache never computes them.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum CacheEvent {
    /// Newly full blocks of one request, continuing after `parent`.
    Stored {
        /// Hash of the block before the first one stored; `None` for the first block of a sequence.
        parent: Option<BlockHash>,
        /// The stored blocks, in order.
        blocks: Vec<BlockHash>,
        /// Their tokens, concatenated (`blocks.len() * block_size`).
        token_ids: Vec<TokenId>,
        /// The request's cache salt, which engines report with the blocks.
        cache_salt: Option<Arc<str>>,
    },
    /// One cached copy of a block was evicted.
    Removed {
        /// The evicted block.
        block: BlockHash,
    },
    /// Every cached block was dropped.
    Cleared,
}

/// The blocks one request holds, in sequence order.
#[derive(Clone, Debug, Default)]
pub struct SeqBlocks {
    ids: Vec<u32>,
    /// Leading full blocks already named (or found in the cache).
    named: usize,
}

impl SeqBlocks {
    /// Blocks held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The physical block ids, in sequence order (what vLLM reports as `remote_block_ids`).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Not enough free blocks for a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("KV cache full: {needed} blocks needed, {free} free")]
pub struct CacheFull {
    /// Blocks the request needed beyond what it holds and its cached prefix.
    pub needed: usize,
    /// Blocks free at the time.
    pub free: usize,
}

#[derive(Clone, Copy, Debug)]
struct Block {
    hash: Option<BlockHash>,
    refs: u32,
    prev: u32,
    next: u32,
    queued: bool,
}

/// The cache of one worker.
#[derive(Clone, Debug)]
pub struct PagedCache {
    block_size: usize,
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    free_len: usize,
    cached: HashMap<BlockHash, Vec<u32>>,
    events: Vec<CacheEvent>,
    duplicates: bool,
}

impl PagedCache {
    /// A cache of `capacity` blocks of `block_size` tokens, all free. With `duplicates` (vLLM), a
    /// block computed again while a copy is cached becomes a second cached copy; without (SGLang's
    /// radix tree, TRT-LLM's reuse tree) the new copy stays unnamed and is freed first.
    pub fn new(block_size: usize, capacity: usize, duplicates: bool) -> Self {
        let capacity = capacity.min(NIL as usize - 1);
        let blocks = (0..capacity as u32)
            .map(|i| Block {
                hash: None,
                refs: 0,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == capacity as u32 { NIL } else { i + 1 },
                queued: true,
            })
            .collect();
        PagedCache {
            block_size: block_size.max(1),
            blocks,
            head: if capacity == 0 { NIL } else { 0 },
            tail: if capacity == 0 { NIL } else { capacity as u32 - 1 },
            free_len: capacity,
            cached: HashMap::new(),
            events: Vec::new(),
            duplicates,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in all.
    pub fn capacity(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks held by running requests.
    pub fn used_blocks(&self) -> usize {
        self.blocks.len() - self.free_len
    }

    /// Blocks not held by any request (cached or empty).
    pub fn free_blocks(&self) -> usize {
        self.free_len
    }

    /// Fraction of blocks held by running requests (what vLLM reports as `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() { 0.0 } else { self.used_blocks() as f64 / self.blocks.len() as f64 }
    }

    /// Distinct cached block hashes.
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Whether a block with this hash is cached.
    pub fn contains(&self, hash: BlockHash) -> bool {
        self.cached.contains_key(&hash)
    }

    /// Copies of a block cached right now.
    pub fn copies(&self, hash: BlockHash) -> usize {
        self.cached.get(&hash).map_or(0, Vec::len)
    }

    /// Leading blocks of a sequence of `num_tokens` tokens (whose full blocks hash to `hashes`)
    /// found in the cache, as vLLM counts them: never the whole sequence, since at least one token
    /// must be computed to produce logits.
    pub fn prefix_hit(&self, hashes: &[BlockHash], num_tokens: usize) -> usize {
        let limit = num_tokens.saturating_sub(1) / self.block_size;
        hashes.iter().take(limit).take_while(|h| self.cached.contains_key(h)).count()
    }

    /// Grows `seq` to hold `upto` tokens: on first use it takes the `hit` cached leading blocks
    /// (from [`PagedCache::prefix_hit`]), then allocates fresh blocks (evicting free cached ones,
    /// least recently freed first) and names every block that is full within `upto` tokens and has a
    /// hash in `hashes`. `tokens` is the whole sequence so far. On failure nothing changes.
    pub fn allocate(
        &mut self,
        seq: &mut SeqBlocks,
        hit: usize,
        hashes: &[BlockHash],
        tokens: &[TokenId],
        upto: usize,
        cache_salt: Option<&Arc<str>>,
    ) -> Result<(), CacheFull> {
        let bs = self.block_size;
        // Reused blocks that sit in the free queue stop being free, so they do not count as room.
        let mut hit_ids = Vec::new();
        let mut reclaimed = 0;
        if seq.ids.is_empty() {
            for h in hashes.iter().take(hit) {
                let Some(&id) = self.cached.get(h).and_then(|copies| copies.first()) else { break };
                if self.blocks[id as usize].refs == 0 {
                    reclaimed += 1;
                }
                hit_ids.push(id);
            }
        }
        let have = seq.ids.len() + hit_ids.len();
        let needed = upto.div_ceil(bs).saturating_sub(have);
        if needed > self.free_len - reclaimed {
            return Err(CacheFull { needed, free: self.free_len - reclaimed });
        }
        for &id in &hit_ids {
            self.take_ref(id);
        }
        if !hit_ids.is_empty() {
            seq.named = hit_ids.len();
            seq.ids = hit_ids;
        }
        for _ in 0..needed {
            let id = self.pop_free();
            seq.ids.push(id);
        }
        self.name_full_blocks(seq, hashes, tokens, upto, cache_salt);
        Ok(())
    }

    /// Names the blocks of `seq` that are full within `upto` tokens, emitting one `Stored` per run
    /// of consecutive newly named blocks.
    fn name_full_blocks(
        &mut self,
        seq: &mut SeqBlocks,
        hashes: &[BlockHash],
        tokens: &[TokenId],
        upto: usize,
        cache_salt: Option<&Arc<str>>,
    ) {
        let bs = self.block_size;
        let full = (upto / bs).min(hashes.len()).min(seq.ids.len()).min(tokens.len() / bs);
        let mut parent = None;
        let mut run = Vec::new();
        let mut run_tokens = Vec::new();
        for i in seq.named..full {
            let h = hashes[i];
            if self.duplicates || !self.cached.contains_key(&h) {
                let id = seq.ids[i];
                self.blocks[id as usize].hash = Some(h);
                self.cached.entry(h).or_default().push(id);
                if run.is_empty() {
                    parent = i.checked_sub(1).map(|p| hashes[p]);
                }
                run.push(h);
                run_tokens.extend_from_slice(&tokens[i * bs..(i + 1) * bs]);
            } else {
                // Already cached elsewhere: this copy stays unnamed, which ends the run.
                self.flush_run(parent, &mut run, &mut run_tokens, cache_salt);
            }
        }
        self.flush_run(parent, &mut run, &mut run_tokens, cache_salt);
        seq.named = seq.named.max(full);
    }

    fn flush_run(
        &mut self,
        parent: Option<BlockHash>,
        run: &mut Vec<BlockHash>,
        tokens: &mut Vec<TokenId>,
        cache_salt: Option<&Arc<str>>,
    ) {
        if run.is_empty() {
            return;
        }
        self.events.push(CacheEvent::Stored {
            parent,
            blocks: std::mem::take(run),
            token_ids: std::mem::take(tokens),
            cache_salt: cache_salt.cloned(),
        });
    }

    /// Releases a request's blocks: named ones stay cached until reallocated. Freed in reverse
    /// order, so a sequence's tail is evicted before its head, as vLLM does.
    pub fn free(&mut self, seq: SeqBlocks) {
        for &id in seq.ids.iter().rev() {
            let block = &mut self.blocks[id as usize];
            block.refs = block.refs.saturating_sub(1);
            if block.refs == 0 {
                if block.hash.is_some() {
                    self.push_tail(id);
                } else {
                    self.push_head(id);
                }
            }
        }
    }

    /// Drops every cached block; refused (false) while a request holds blocks, as in vLLM.
    pub fn clear(&mut self) -> bool {
        if self.used_blocks() > 0 {
            return false;
        }
        for block in &mut self.blocks {
            block.hash = None;
        }
        self.cached.clear();
        self.events.push(CacheEvent::Cleared);
        true
    }

    /// The events since the last call, in order.
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        std::mem::take(&mut self.events)
    }

    fn take_ref(&mut self, id: u32) {
        if self.blocks[id as usize].refs == 0 {
            self.unlink(id);
        }
        self.blocks[id as usize].refs += 1;
    }

    fn pop_free(&mut self) -> u32 {
        let id = self.head;
        debug_assert_ne!(id, NIL, "allocate checked that enough blocks are free");
        self.unlink(id);
        self.blocks[id as usize].refs = 1;
        if let Some(old) = self.blocks[id as usize].hash.take() {
            if let Some(copies) = self.cached.get_mut(&old) {
                copies.retain(|&c| c != id);
                if copies.is_empty() {
                    self.cached.remove(&old);
                }
            }
            self.events.push(CacheEvent::Removed { block: old });
        }
        id
    }

    fn unlink(&mut self, id: u32) {
        let Block { prev, next, queued, .. } = self.blocks[id as usize];
        if !queued {
            return;
        }
        if prev == NIL {
            self.head = next
        } else {
            self.blocks[prev as usize].next = next
        }
        if next == NIL {
            self.tail = prev
        } else {
            self.blocks[next as usize].prev = prev
        }
        let b = &mut self.blocks[id as usize];
        b.prev = NIL;
        b.next = NIL;
        b.queued = false;
        self.free_len -= 1;
    }

    fn push_tail(&mut self, id: u32) {
        let tail = self.tail;
        let b = &mut self.blocks[id as usize];
        b.prev = tail;
        b.next = NIL;
        b.queued = true;
        if tail == NIL {
            self.head = id
        } else {
            self.blocks[tail as usize].next = id
        }
        self.tail = id;
        self.free_len += 1;
    }

    fn push_head(&mut self, id: u32) {
        let head = self.head;
        let b = &mut self.blocks[id as usize];
        b.prev = NIL;
        b.next = head;
        b.queued = true;
        if head == NIL {
            self.tail = id
        } else {
            self.blocks[head as usize].prev = id
        }
        self.head = id;
        self.free_len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_core::hash::{BlockSalt, hash_prompt};

    fn prompt(seed: u32, n: usize) -> Vec<TokenId> {
        (0..n as u32).map(|i| seed.wrapping_mul(7919).wrapping_add(i * 31) % 50_000).collect()
    }

    fn hashes(tokens: &[TokenId], bs: usize) -> Vec<BlockHash> {
        let mut out = Vec::new();
        hash_prompt(tokens, bs, BlockSalt::NONE, &mut out);
        out
    }

    /// Admits a whole prompt at once, as a prefill in one step.
    fn admit(cache: &mut PagedCache, tokens: &[TokenId]) -> Result<(SeqBlocks, usize), CacheFull> {
        let h = hashes(tokens, cache.block_size());
        let hit = cache.prefix_hit(&h, tokens.len());
        let mut seq = SeqBlocks::default();
        cache.allocate(&mut seq, hit, &h, tokens, tokens.len(), None)?;
        Ok((seq, hit * cache.block_size()))
    }

    fn stored(events: &[CacheEvent]) -> usize {
        events.iter().map(|e| if let CacheEvent::Stored { blocks, .. } = e { blocks.len() } else { 0 }).sum()
    }

    fn removed(events: &[CacheEvent]) -> Vec<BlockHash> {
        events
            .iter()
            .filter_map(|e| if let CacheEvent::Removed { block } = e { Some(*block) } else { None })
            .collect()
    }

    #[test]
    fn repeated_prompt_hits_and_stores_nothing_new_for_the_prefix() {
        let mut cache = PagedCache::new(16, 64, true);
        let p = prompt(1, 100); // 6 full blocks + 4 tokens
        let (a, cached) = admit(&mut cache, &p).unwrap();
        assert_eq!(cached, 0);
        assert_eq!(stored(&cache.take_events()), 6);
        cache.free(a);
        let (b, cached) = admit(&mut cache, &p).unwrap();
        assert_eq!(cached, 96);
        // Only the partial tail is recomputed; no full block is new.
        assert!(cache.take_events().is_empty());
        cache.free(b);
    }

    #[test]
    fn fully_cached_prompt_recomputes_its_last_block_as_a_second_copy() {
        let mut cache = PagedCache::new(16, 64, true);
        let p = prompt(2, 64);
        let (a, _) = admit(&mut cache, &p).unwrap();
        cache.free(a);
        cache.take_events();
        let (b, cached) = admit(&mut cache, &p).unwrap();
        assert_eq!(cached, 48);
        let events = cache.take_events();
        assert_eq!(stored(&events), 1);
        let CacheEvent::Stored { blocks, parent, .. } = &events[0] else { panic!("expected a store") };
        assert_eq!(cache.copies(blocks[0]), 2);
        assert_eq!(*parent, Some(hashes(&p, 16)[2]));
        cache.free(b);
    }

    #[test]
    fn without_duplicates_a_recomputed_block_stays_unnamed() {
        let mut cache = PagedCache::new(16, 64, false);
        let p = prompt(2, 64);
        let (a, _) = admit(&mut cache, &p).unwrap();
        cache.free(a);
        cache.take_events();
        let (b, _) = admit(&mut cache, &p).unwrap();
        assert!(cache.take_events().is_empty());
        assert_eq!(cache.copies(hashes(&p, 16)[3]), 1);
        cache.free(b);
    }

    #[test]
    fn decode_fills_blocks_and_stores_them_after_the_prompt() {
        let mut cache = PagedCache::new(4, 16, true);
        let mut seq_tokens = prompt(3, 6);
        let h = hashes(&seq_tokens, 4);
        let mut seq = SeqBlocks::default();
        cache.allocate(&mut seq, 0, &h, &seq_tokens, 6, None).unwrap();
        assert_eq!(stored(&cache.take_events()), 1);
        // Two decode steps: tokens 7 and 8 computed; the second fills block 1.
        for step in 0..2 {
            seq_tokens.push(900 + step);
            let h = hashes(&seq_tokens, 4);
            cache.allocate(&mut seq, 0, &h, &seq_tokens, seq_tokens.len(), None).unwrap();
        }
        let events = cache.take_events();
        let h = hashes(&seq_tokens, 4);
        assert_eq!(
            events,
            vec![CacheEvent::Stored {
                parent: Some(h[0]),
                blocks: vec![h[1]],
                token_ids: seq_tokens[4..8].to_vec(),
                cache_salt: None
            }]
        );
        assert_eq!(seq.len(), 2);
        cache.free(seq);
    }

    #[test]
    fn eviction_takes_the_least_recently_freed_tail_first() {
        let mut cache = PagedCache::new(4, 4, true);
        let p = prompt(3, 8); // 2 blocks
        let (a, _) = admit(&mut cache, &p).unwrap();
        let CacheEvent::Stored { blocks: pb, .. } = cache.take_events().remove(0) else { panic!() };
        cache.free(a);
        let q = prompt(4, 12); // 3 blocks: 2 never-used blocks, then p's tail block
        let (b, _) = admit(&mut cache, &q).unwrap();
        assert_eq!(removed(&cache.take_events()), vec![pb[1]]);
        assert!(cache.contains(pb[0]));
        cache.free(b);
    }

    #[test]
    fn full_cache_refuses_and_changes_nothing() {
        let mut cache = PagedCache::new(4, 3, true);
        let (a, _) = admit(&mut cache, &prompt(5, 8)).unwrap();
        let before = cache.take_events();
        assert_eq!(admit(&mut cache, &prompt(6, 8)).unwrap_err(), CacheFull { needed: 2, free: 1 });
        assert!(cache.take_events().is_empty());
        assert_eq!(cache.used_blocks(), 2);
        cache.free(a);
        assert_eq!(stored(&before), 2);
    }

    #[test]
    fn reused_free_blocks_do_not_count_as_room() {
        let mut cache = PagedCache::new(4, 3, true);
        let p = prompt(7, 9); // 2 full + 1 partial = 3 blocks
        let (a, _) = admit(&mut cache, &p).unwrap();
        cache.free(a);
        // The 2 cached blocks are free but reused: only 1 block is really free for the rest.
        let mut longer = p[..8].to_vec();
        longer.extend(prompt(8, 8));
        assert!(admit(&mut cache, &longer).is_err());
        assert_eq!(cache.used_blocks(), 0);
    }

    #[test]
    fn clear_needs_an_idle_cache() {
        let mut cache = PagedCache::new(4, 8, true);
        let (a, _) = admit(&mut cache, &prompt(9, 8)).unwrap();
        assert!(!cache.clear());
        cache.free(a);
        assert!(cache.clear());
        assert_eq!(cache.cached_blocks(), 0);
        assert_eq!(cache.take_events().last(), Some(&CacheEvent::Cleared));
    }
}
