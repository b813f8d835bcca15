//! One worker's cached blocks: engine hashes translated into kvmesh block hashes, with copy counts.
//!
//! Engines name blocks with hashes of their own (vLLM: the tail of a SHA-256 over pickled or CBOR
//! input with a per-deployment seed; SGLang: the head of another SHA-256; TensorRT-LLM: its own
//! 64-bit chain). The filter cannot compute those, so the agent renames every block to kvmesh's
//! chained hash (`kvmesh_core::hash`) from the token ids in the store event and the kvmesh hash of
//! the parent, which it finds in its map `engine hash -> (kvmesh hash, salt)` per data-parallel rank.
//! A store whose parent it does not know (it was cached before the agent listened, or its events
//! were lost) cannot be renamed: it is counted and skipped, never published with a wrong name.
//!
//! The salt is `BlockSalt::for_request(lora_name, cache_salt)` at a chain start (the same salt the
//! filter computes from a request body), combined with the 64-bit name of any multimodal item or
//! prompt embedding from the block that carries it on (the filter does not compute those yet, so such blocks never match a
//! routed request: a miss, never a false hit); children inherit their parent's salt.
//!
//! Engines cache identical content twice (two requests decoding the same tokens) and evict each copy
//! separately, so blocks are counted, per rank and in the worker-wide multiset that resync answers.

use std::collections::HashMap;

use kvmesh_core::hash::{BlockHash, BlockSalt, hash_block};

use crate::events::{EngineBatch, EngineEvent, EngineHash, StoredBlocks};

/// `kv_cache_spec_kind`s whose blocks hold the whole context: the ones a prefix match can use.
const FULL_ATTENTION_KINDS: [&str; 2] = ["full_attention", "mla_attention"];

/// A change to the worker's kvmesh block multiset, as published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvChange {
    /// One more copy of each block, in chain order.
    Stored(Vec<BlockHash>),
    /// One copy fewer of each block.
    Removed(Vec<BlockHash>),
    /// The worker holds no block any more.
    Cleared,
}

/// What a translation skipped (each is counted in the agent's metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TranslateStats {
    /// Store events whose parent the agent does not know.
    pub unknown_parent: u32,
    /// Blocks those events carried.
    pub unknown_parent_blocks: u32,
    /// Removals of blocks the agent does not hold.
    pub unknown_removed: u32,
    /// Events of sliding-window, mamba or other KV-cache groups than the full-attention one.
    pub other_group: u32,
    /// Store events whose token count does not fit their blocks.
    pub bad_tokens: u32,
}

/// One engine block as the agent knows it.
#[derive(Clone, Copy, Debug)]
struct Entry {
    kv: BlockHash,
    salt: BlockSalt,
    copies: u32,
    on_gpu: bool,
}

/// One data-parallel rank's blocks.
#[derive(Debug, Default)]
struct Rank {
    by_engine: HashMap<EngineHash, Entry>,
    /// The full-attention KV-cache group, learned from the first store that names one.
    attention_group: Option<u32>,
}

/// A worker's cached blocks, per data-parallel rank, plus the worker-wide multiset of kvmesh hashes.
#[derive(Debug, Default)]
pub struct WorkerBlocks {
    ranks: HashMap<u32, Rank>,
    /// kvmesh hash -> copies on GPU, over every rank.
    held: HashMap<BlockHash, u32>,
    /// Tokens per block of the last store applied (engines state it per event).
    block_size: Option<u32>,
}

impl WorkerBlocks {
    /// A worker with no blocks.
    pub fn new() -> WorkerBlocks {
        WorkerBlocks::default()
    }

    /// Applies one engine batch of `rank`; returns the changes to publish, in order.
    pub fn apply(&mut self, rank: u32, batch: &EngineBatch) -> (Vec<KvChange>, TranslateStats) {
        let mut out = Vec::new();
        let mut stats = TranslateStats::default();
        for event in &batch.events {
            match event {
                EngineEvent::Stored(stored) => self.store(rank, stored, &mut out, &mut stats),
                EngineEvent::Removed { blocks, group } => {
                    let rank_state = self.ranks.entry(rank).or_default();
                    if group.is_some()
                        && rank_state.attention_group.is_some()
                        && *group != rank_state.attention_group
                    {
                        stats.other_group += 1;
                        continue;
                    }
                    let mut removed = Vec::new();
                    for block in blocks {
                        match self.remove_copy(rank, *block) {
                            Some(Some(kv)) => removed.push(kv),
                            Some(None) => {}
                            None => stats.unknown_removed = stats.unknown_removed.saturating_add(1),
                        }
                    }
                    push_removed(&mut out, removed);
                }
                EngineEvent::Cleared => out.extend(self.reset_rank(rank)),
                EngineEvent::TierChanged { block, on_gpu } => {
                    self.change_tier(rank, *block, *on_gpu, &mut out)
                }
            }
        }
        (out, stats)
    }

    /// Drops every block of `rank` (an engine restart, a gap nothing could fill). Returns what to
    /// publish: `Cleared` when no other rank holds blocks, else the removal of this rank's copies.
    pub fn reset_rank(&mut self, rank: u32) -> Option<KvChange> {
        let state = self.ranks.remove(&rank).unwrap_or_default();
        let others_empty = self.ranks.values().all(|r| r.by_engine.values().all(|e| !e.on_gpu));
        // Keep what was learned about the rank's layout; only the blocks go.
        self.ranks.insert(rank, Rank { by_engine: HashMap::new(), attention_group: state.attention_group });
        if others_empty {
            self.held.clear();
            return Some(KvChange::Cleared);
        }
        let mut removed = Vec::new();
        for entry in state.by_engine.values().filter(|e| e.on_gpu) {
            for _ in 0..entry.copies {
                self.release(entry.kv);
                removed.push(entry.kv);
            }
        }
        (!removed.is_empty()).then_some(KvChange::Removed(removed))
    }

    /// The worker's blocks and copy counts, over every rank (what a resync answers).
    pub fn snapshot(&self) -> Vec<(BlockHash, u32)> {
        self.held.iter().map(|(kv, copies)| (*kv, *copies)).collect()
    }

    /// Distinct kvmesh blocks held.
    pub fn distinct_blocks(&self) -> usize {
        self.held.len()
    }

    /// Tokens per block of the most recent store.
    pub fn block_size(&self) -> Option<u32> {
        self.block_size
    }

    /// Copies per engine hash of one rank (on GPU), to compare with an engine's own view.
    pub fn engine_copies(&self, rank: u32) -> HashMap<EngineHash, u32> {
        self.ranks
            .get(&rank)
            .map(|r| r.by_engine.iter().filter(|(_, e)| e.on_gpu).map(|(h, e)| (*h, e.copies)).collect())
            .unwrap_or_default()
    }

    /// The kvmesh name of an engine block of `rank`, if the agent holds it.
    pub fn kvmesh_hash(&self, rank: u32, block: EngineHash) -> Option<BlockHash> {
        self.ranks.get(&rank).and_then(|r| r.by_engine.get(&block)).map(|e| e.kv)
    }

    fn store(
        &mut self,
        rank: u32,
        stored: &StoredBlocks,
        out: &mut Vec<KvChange>,
        stats: &mut TranslateStats,
    ) {
        let state = self.ranks.entry(rank).or_default();
        if let Some(kind) = &stored.attention_kind
            && !FULL_ATTENTION_KINDS.contains(&kind.as_str())
        {
            stats.other_group += 1;
            return;
        }
        if let Some(group) = stored.group {
            match state.attention_group {
                None => state.attention_group = Some(group),
                Some(known) if known != group => {
                    stats.other_group += 1;
                    return;
                }
                Some(_) => {}
            }
        }
        let n = stored.blocks.len();
        if n == 0 {
            return;
        }
        let size = stored.block_size;
        if size == 0 || stored.token_ids.len() != n.saturating_mul(size) {
            stats.bad_tokens += 1;
            return;
        }
        let (mut parent, mut salt) = match stored.parent {
            None => (None, BlockSalt::for_request(stored.lora_name.as_deref(), stored.cache_salt.as_deref())),
            Some(parent) => match state.by_engine.get(&parent) {
                Some(entry) => (Some(entry.kv), entry.salt),
                None => {
                    stats.unknown_parent += 1;
                    stats.unknown_parent_blocks =
                        stats.unknown_parent_blocks.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
                    return;
                }
            },
        };
        let mut published = Vec::with_capacity(n);
        for (i, (block, tokens)) in stored.blocks.iter().zip(stored.token_ids.chunks_exact(size)).enumerate()
        {
            for part in stored.extra_content.get(i).into_iter().flatten() {
                salt = salt.with(*part);
            }
            let kv = hash_block(parent, tokens, salt);
            let entry =
                state.by_engine.entry(*block).or_insert(Entry { kv, salt, copies: 0, on_gpu: stored.on_gpu });
            entry.copies = entry.copies.saturating_add(1);
            // A second copy keeps the name of the first: the engine says they are the same block.
            let (kv, on_gpu) = (entry.kv, entry.on_gpu);
            if on_gpu {
                let held = self.held.entry(kv).or_insert(0);
                *held = held.saturating_add(1);
                published.push(kv);
            }
            parent = Some(kv);
        }
        self.block_size = u32::try_from(size).ok();
        if !published.is_empty() {
            out.push(KvChange::Stored(published));
        }
    }

    /// Removes one copy of an engine block: `None` if unknown, `Some(None)` if it was not on GPU,
    /// `Some(Some(kv))` when a GPU copy of `kv` went.
    fn remove_copy(&mut self, rank: u32, block: EngineHash) -> Option<Option<BlockHash>> {
        let state = self.ranks.get_mut(&rank)?;
        let entry = state.by_engine.get_mut(&block)?;
        entry.copies = entry.copies.saturating_sub(1);
        let (kv, on_gpu) = (entry.kv, entry.on_gpu);
        if entry.copies == 0 {
            state.by_engine.remove(&block);
        }
        if on_gpu {
            self.release(kv);
            Some(Some(kv))
        } else {
            Some(None)
        }
    }

    fn change_tier(&mut self, rank: u32, block: EngineHash, on_gpu: bool, out: &mut Vec<KvChange>) {
        let Some(entry) = self.ranks.get_mut(&rank).and_then(|r| r.by_engine.get_mut(&block)) else {
            return;
        };
        if entry.on_gpu == on_gpu {
            return;
        }
        entry.on_gpu = on_gpu;
        let (kv, copies) = (entry.kv, entry.copies);
        let blocks = vec![kv; copies as usize];
        if on_gpu {
            let held = self.held.entry(kv).or_insert(0);
            *held = held.saturating_add(copies);
            out.push(KvChange::Stored(blocks));
        } else {
            for _ in 0..copies {
                self.release(kv);
            }
            push_removed(out, blocks);
        }
    }

    fn release(&mut self, kv: BlockHash) {
        if let Some(copies) = self.held.get_mut(&kv) {
            *copies -= 1;
            if *copies == 0 {
                self.held.remove(&kv);
            }
        }
    }
}

/// Appends removals, merged into a directly preceding removal (vLLM sends one event per block).
fn push_removed(out: &mut Vec<KvChange>, removed: Vec<BlockHash>) {
    if removed.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(KvChange::Removed(previous)) => previous.extend(removed),
        _ => out.push(KvChange::Removed(removed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_core::hash::hash_prompt;

    fn stored(parent: Option<u64>, blocks: &[u64], tokens: std::ops::Range<u32>) -> EngineEvent {
        EngineEvent::Stored(StoredBlocks {
            parent: parent.map(EngineHash),
            blocks: blocks.iter().map(|b| EngineHash(*b)).collect(),
            token_ids: tokens.collect(),
            block_size: 4,
            on_gpu: true,
            ..StoredBlocks::default()
        })
    }

    fn batch(events: Vec<EngineEvent>) -> EngineBatch {
        EngineBatch { dp_rank: None, events }
    }

    fn prompt_hashes(tokens: std::ops::Range<u32>, salt: BlockSalt) -> Vec<BlockHash> {
        let mut out = Vec::new();
        hash_prompt(&tokens.collect::<Vec<_>>(), 4, salt, &mut out);
        out
    }

    #[test]
    fn stores_translate_to_the_hashes_of_the_prompt() {
        let mut w = WorkerBlocks::new();
        let (out, stats) =
            w.apply(0, &batch(vec![stored(None, &[10, 11], 0..8), stored(Some(11), &[12], 8..12)]));
        let expected = prompt_hashes(0..12, BlockSalt::NONE);
        assert_eq!(
            out,
            vec![KvChange::Stored(expected[..2].to_vec()), KvChange::Stored(expected[2..].to_vec())]
        );
        assert_eq!(stats, TranslateStats::default());
        assert_eq!(w.distinct_blocks(), 3);
        assert_eq!(w.block_size(), Some(4));
    }

    #[test]
    fn unknown_parent_is_counted_and_nothing_is_published() {
        let mut w = WorkerBlocks::new();
        let (out, stats) = w.apply(0, &batch(vec![stored(Some(99), &[1, 2], 0..8)]));
        assert!(out.is_empty());
        assert_eq!((stats.unknown_parent, stats.unknown_parent_blocks), (1, 2));
        // Their removal later is unknown too, and publishes nothing.
        let (out, stats) =
            w.apply(0, &batch(vec![EngineEvent::Removed { blocks: vec![EngineHash(1)], group: None }]));
        assert!(out.is_empty());
        assert_eq!(stats.unknown_removed, 1);
    }

    #[test]
    fn copies_are_counted_and_removed_one_at_a_time() {
        let mut w = WorkerBlocks::new();
        w.apply(0, &batch(vec![stored(None, &[1], 0..4), stored(None, &[1], 0..4)]));
        assert_eq!(w.snapshot(), vec![(prompt_hashes(0..4, BlockSalt::NONE)[0], 2)]);
        let remove = || batch(vec![EngineEvent::Removed { blocks: vec![EngineHash(1)], group: None }]);
        let (out, _) = w.apply(0, &remove());
        assert_eq!(out.len(), 1);
        assert_eq!(w.engine_copies(0).get(&EngineHash(1)), Some(&1));
        w.apply(0, &remove());
        assert!(w.snapshot().is_empty());
        assert!(w.engine_copies(0).is_empty());
    }

    #[test]
    fn lora_and_cache_salt_change_the_chain_and_children_inherit() {
        let mut w = WorkerBlocks::new();
        let EngineEvent::Stored(mut s) = stored(None, &[1], 0..4) else { unreachable!() };
        s.lora_name = Some("sql".into());
        s.cache_salt = Some("tenant".into());
        w.apply(0, &batch(vec![EngineEvent::Stored(s), stored(Some(1), &[2], 4..8)]));
        let salt = BlockSalt::for_request(Some("sql"), Some("tenant"));
        let expected = prompt_hashes(0..8, salt);
        assert_eq!(w.kvmesh_hash(0, EngineHash(1)), Some(expected[0]));
        assert_eq!(w.kvmesh_hash(0, EngineHash(2)), Some(expected[1]));
    }

    #[test]
    fn only_the_full_attention_group_is_indexed() {
        let mut w = WorkerBlocks::new();
        let with = |kind: &str, group: u32, block: u64| {
            let EngineEvent::Stored(mut s) = stored(None, &[block], 0..4) else { unreachable!() };
            s.attention_kind = Some(kind.into());
            s.group = Some(group);
            EngineEvent::Stored(s)
        };
        let (out, stats) = w.apply(
            0,
            &batch(vec![
                with("sliding_window", 0, 1),
                with("full_attention", 1, 2),
                with("full_attention", 2, 3),
            ]),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(stats.other_group, 2);
        let (_, stats) =
            w.apply(0, &batch(vec![EngineEvent::Removed { blocks: vec![EngineHash(1)], group: Some(0) }]));
        assert_eq!((stats.other_group, stats.unknown_removed), (1, 0));
    }

    #[test]
    fn bad_token_count_is_counted() {
        let mut w = WorkerBlocks::new();
        let (out, stats) = w.apply(0, &batch(vec![stored(None, &[1, 2], 0..7)]));
        assert!(out.is_empty());
        assert_eq!(stats.bad_tokens, 1);
    }

    #[test]
    fn clear_of_one_rank_removes_only_its_copies() {
        let mut w = WorkerBlocks::new();
        w.apply(0, &batch(vec![stored(None, &[1, 2], 0..8)]));
        w.apply(1, &batch(vec![stored(None, &[7], 0..4)]));
        let (out, _) = w.apply(1, &batch(vec![EngineEvent::Cleared]));
        let first = prompt_hashes(0..4, BlockSalt::NONE)[0];
        assert_eq!(out, vec![KvChange::Removed(vec![first])]);
        // Rank 0 still holds its copy of the same block.
        assert_eq!(w.snapshot().iter().find(|(kv, _)| *kv == first).map(|(_, c)| *c), Some(1));
        let (out, _) = w.apply(0, &batch(vec![EngineEvent::Cleared]));
        assert_eq!(out, vec![KvChange::Cleared]);
        assert!(w.snapshot().is_empty());
    }

    #[test]
    fn tier_changes_publish_stores_and_removals() {
        let mut w = WorkerBlocks::new();
        let EngineEvent::Stored(mut s) = stored(None, &[1], 0..4) else { unreachable!() };
        s.on_gpu = false;
        let (out, _) = w.apply(0, &batch(vec![EngineEvent::Stored(s)]));
        assert!(out.is_empty());
        let kv = w.kvmesh_hash(0, EngineHash(1)).expect("host-tier block is known");
        let (out, _) =
            w.apply(0, &batch(vec![EngineEvent::TierChanged { block: EngineHash(1), on_gpu: true }]));
        assert_eq!(out, vec![KvChange::Stored(vec![kv])]);
        let (out, _) =
            w.apply(0, &batch(vec![EngineEvent::TierChanged { block: EngineHash(1), on_gpu: false }]));
        assert_eq!(out, vec![KvChange::Removed(vec![kv])]);
        assert!(w.snapshot().is_empty());
    }

    #[test]
    fn consecutive_removals_merge() {
        let mut w = WorkerBlocks::new();
        w.apply(0, &batch(vec![stored(None, &[1, 2], 0..8)]));
        let rm = |b| EngineEvent::Removed { blocks: vec![EngineHash(b)], group: None };
        let (out, _) = w.apply(0, &batch(vec![rm(2), rm(1)]));
        assert_eq!(out.len(), 1);
    }
}
