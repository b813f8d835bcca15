//! A bounded cache of token ids per text segment.
//!
//! A segment is a run of raw prompt text between two added (special) tokens, exactly as the engine
//! cuts it before normalizing: the engine encodes every such run on its own, so the ids of a prompt
//! are the concatenation of its segments' ids and its added tokens' ids, and caching per segment
//! can never change them. Chat templates put a special token around every turn (`<|im_start|>`,
//! `<|eot_id|>`), so a repeated system prompt or an earlier turn is one segment: on a hit it costs
//! a hash, a probe and a compare instead of a tokenization.
//!
//! An entry also keeps a [`ChainMemo`]: the block hashes its ids completed the last time a block
//! walk passed it, with the walk's state where it began. A later walk in the same state (the same
//! earlier turns before it) takes those hashes instead of copying the ids and hashing them again.
//!
//! A laid-out chat ([`crate::template::ChatLayout`]) is cached per chunk the same way: a chunk
//! starts at an added token that nothing merges across, so its ids never depend on what is around
//! it, and it is found by its key (its text, message text in JSON form) without anything being
//! written out (hashed and compared part by part). Chunks are kept apart from segments.
//!
//! Bounded by bytes and entries, evicting with CLOCK (second chance): a hit sets the entry's
//! referenced bit, the hand clears it on its first pass and evicts on the second. The segment text
//! is stored and compared on every hit, so a hash collision can only cost a miss, never wrong ids.

use hashbrown::HashTable;
use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

use crate::hash::{BlockHash, BlockSalt, TokenId};

/// Seed of the segment hash; it only has to be fixed within one process.
const SEGMENT_SEED: u64 = 0x6b76_6d65_7368_5347;

/// Bytes counted per entry beyond its text and ids: the slot, the table entry, two allocations'
/// headers. An estimate; it keeps a cache of tiny segments from growing without bound in memory.
const ENTRY_OVERHEAD: usize = 64;

/// How big a segment cache may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentCacheConfig {
    /// Most bytes held: each entry's text, its ids (4 bytes each) and a fixed overhead. A segment
    /// bigger than a quarter of this is never cached (it would push out too much).
    pub max_bytes: usize,
    /// Most segments held.
    pub max_entries: usize,
}

impl SegmentCacheConfig {
    /// No caching at all (every lookup misses).
    pub const DISABLED: SegmentCacheConfig = SegmentCacheConfig { max_bytes: 0, max_entries: 0 };
}

impl Default for SegmentCacheConfig {
    /// 4 MiB and 4,096 segments per encoder (per filter VM): about 128 distinct 4k-token
    /// system prompts, or thousands of chat turns.
    fn default() -> Self {
        SegmentCacheConfig { max_bytes: 4 << 20, max_entries: 4096 }
    }
}

/// What a segment cache did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentCacheStats {
    /// Lookups that found the segment.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Segments added.
    pub insertions: u64,
    /// Segments dropped to make room.
    pub evictions: u64,
    /// Segments not added because they alone were too big.
    pub too_large: u64,
    /// Hits whose block hashes came from the segment's chain memo (neither copied nor hashed).
    pub memo_replays: u64,
    /// Segments held now.
    pub entries: usize,
    /// Bytes held now, as counted against [`SegmentCacheConfig::max_bytes`].
    pub bytes: usize,
}

/// What an entry's text is, part of its key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    /// Text between two added tokens, not at the start of its prompt.
    Segment,
    /// A segment that opened its prompt (a `Metaspace` normalizer treats that one apart).
    SegmentAtStart,
    /// A chunk of a laid-out chat: text starting at an added token, added tokens inside it.
    Chunk,
}

impl Kind {
    /// The segment kind for a segment at `at_start`.
    pub(crate) fn segment(at_start: bool) -> Kind {
        if at_start { Kind::SegmentAtStart } else { Kind::Segment }
    }

    fn seed(self) -> u64 {
        SEGMENT_SEED ^ self as u64
    }
}

/// One cached segment or chunk.
struct Entry {
    text: Box<str>,
    ids: Box<[TokenId]>,
    /// The text's [`super::estimate::prior`] (added tokens counted as one each), so early exit's
    /// correction never rescans text it did not tokenize.
    prior: f32,
    kind: Kind,
    /// The block hashes this segment completed the last time it was walked, and after what.
    memo: Option<ChainMemo>,
}

impl Entry {
    fn bytes(&self) -> usize {
        entry_bytes(self.text.len(), self.ids.len()) + self.memo.as_ref().map_or(0, ChainMemo::bytes)
    }
}

/// The block hashes a segment's ids completed in one block walk, and the walk's state where the
/// segment began: the same segment after the same state completes the same blocks (block hashes
/// depend only on the ids before them), so a warm prompt's earlier turns cost neither copying
/// their ids nor hashing their blocks again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChainMemo {
    /// Tokens per block and the chain's salt.
    pub(crate) block_size: usize,
    pub(crate) salt: BlockSalt,
    /// The last full block before the segment (`None`: the segment's blocks start the chain).
    pub(crate) parent: Option<BlockHash>,
    /// Ids before the segment that were not yet a full block (fewer than `block_size`).
    pub(crate) pending: Box<[TokenId]>,
    /// Every block the segment completed, in order (at least one).
    pub(crate) hashes: Box<[BlockHash]>,
}

impl ChainMemo {
    /// Whether the memo was made after this walk state.
    pub(crate) fn follows(
        &self,
        block_size: usize,
        salt: BlockSalt,
        parent: Option<BlockHash>,
        pending: &[TokenId],
    ) -> bool {
        self.block_size == block_size
            && self.salt == salt
            && self.parent == parent
            && *self.pending == *pending
    }

    fn bytes(&self) -> usize {
        self.pending.len() * std::mem::size_of::<TokenId>()
            + self.hashes.len() * std::mem::size_of::<BlockHash>()
            + MEMO_OVERHEAD
    }
}

/// Bytes counted per memo beyond its ids and hashes (two allocations and the fields).
const MEMO_OVERHEAD: usize = 64;

fn entry_bytes(text: usize, ids: usize) -> usize {
    text + ids * std::mem::size_of::<TokenId>() + ENTRY_OVERHEAD
}

struct Slot {
    hash: u64,
    referenced: bool,
    entry: Option<Entry>,
}

/// Token ids by segment text; see the module documentation.
pub(crate) struct SegmentCache {
    config: SegmentCacheConfig,
    /// Slot indices, by the hash of their segment.
    table: HashTable<u32>,
    slots: Vec<Slot>,
    /// Empty slots, reused before the slot vector grows.
    free: Vec<u32>,
    /// The CLOCK hand: the next slot to consider for eviction.
    hand: usize,
    stats: SegmentCacheStats,
}

/// `a == b`. In wasm, slice equality is compiler-builtins' `memcmp`, a loop over single bytes: a
/// cached 16 KB chat history compared that way was 12% of the filter's decision in V8. Comparing
/// eight bytes at a time is what the engine's own `memcmp` does natively.
#[inline]
fn same_text(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    if cfg!(target_arch = "wasm32") {
        let (words_a, words_b) = (a.chunks_exact(8), b.chunks_exact(8));
        let (rest_a, rest_b) = (words_a.remainder(), words_b.remainder());
        let word = |w: &[u8]| u64::from_ne_bytes(w.try_into().expect("chunks_exact(8) yields 8 bytes"));
        let diff = words_a.zip(words_b).fold(0, |diff, (x, y)| diff | (word(x) ^ word(y)));
        diff == 0 && rest_a == rest_b
    } else {
        a == b
    }
}

/// Whether `text` is `parts` written out, compared part by part.
fn same_parts<'p>(text: &str, parts: impl Iterator<Item = &'p str>) -> bool {
    let mut rest = text;
    for part in parts {
        let Some(here) = rest.get(..part.len()) else { return false };
        if !same_text(here, part) {
            return false;
        }
        rest = &rest[part.len()..];
    }
    rest.is_empty()
}

fn segment_hash(text: &str, kind: Kind) -> u64 {
    xxh3_64_with_seed(text.as_bytes(), kind.seed())
}

/// [`segment_hash`] of `parts` written out (XXH3 streamed equals XXH3 at once).
fn parts_hash<'p>(parts: impl Iterator<Item = &'p str>, kind: Kind) -> u64 {
    let mut hasher = Xxh3::with_seed(kind.seed());
    for part in parts {
        hasher.update(part.as_bytes());
    }
    hasher.digest()
}

impl SegmentCache {
    /// An empty cache.
    pub(crate) fn new(config: SegmentCacheConfig) -> Self {
        SegmentCache {
            config,
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            stats: SegmentCacheStats::default(),
        }
    }

    /// Counters and current size.
    pub(crate) fn stats(&self) -> SegmentCacheStats {
        self.stats
    }

    /// The ids of `text` and its prior estimate, if cached.
    pub(crate) fn get(&mut self, text: &str, at_start: bool) -> Option<(&[TokenId], f32)> {
        let slot = self.lookup(text, at_start)?;
        self.entry(slot).map(|(ids, prior, _)| (ids, prior))
    }

    /// The slot holding segment `text`, if cached (counted as a hit or a miss).
    pub(crate) fn lookup(&mut self, text: &str, at_start: bool) -> Option<u32> {
        if self.config.max_entries == 0 {
            self.stats.misses += 1;
            return None;
        }
        let kind = Kind::segment(at_start);
        self.find(segment_hash(text, kind), kind, |stored| same_text(stored, text))
    }

    /// The slot holding the chunk whose key is `parts` written out, if cached (counted as a hit
    /// or a miss); the key is read twice (hash, compare), never copied.
    pub(crate) fn lookup_chunk<'p>(&mut self, parts: impl Iterator<Item = &'p str> + Clone) -> Option<u32> {
        if self.config.max_entries == 0 {
            self.stats.misses += 1;
            return None;
        }
        let hash = parts_hash(parts.clone(), Kind::Chunk);
        self.find(hash, Kind::Chunk, |stored| same_parts(stored, parts.clone()))
    }

    fn find(&mut self, hash: u64, kind: Kind, same: impl Fn(&str) -> bool) -> Option<u32> {
        let slots = &self.slots;
        let found = self
            .table
            .find(hash, |&i| {
                let slot = &slots[i as usize];
                slot.hash == hash && slot.entry.as_ref().is_some_and(|e| e.kind == kind && same(&e.text))
            })
            .copied();
        let Some(i) = found else {
            self.stats.misses += 1;
            return None;
        };
        self.stats.hits += 1;
        self.slots[i as usize].referenced = true;
        Some(i)
    }

    /// The ids, prior and chain memo of the segment in `slot` (from [`SegmentCache::lookup`] or
    /// [`SegmentCache::insert`], with no insert since).
    pub(crate) fn entry(&self, slot: u32) -> Option<(&[TokenId], f32, Option<&ChainMemo>)> {
        let entry = self.slots.get(slot as usize)?.entry.as_ref()?;
        Some((&entry.ids, entry.prior, entry.memo.as_ref()))
    }

    /// Counts a hit whose chain memo was replayed.
    pub(crate) fn count_replay(&mut self) {
        self.stats.memo_replays += 1;
    }

    /// Replaces the chain memo of the segment in `slot`. Its bytes count against the budget from
    /// the next insert on (which evicts as needed).
    pub(crate) fn set_memo(&mut self, slot: u32, memo: ChainMemo) {
        let Some(entry) = self.slots.get_mut(slot as usize).and_then(|s| s.entry.as_mut()) else { return };
        let old = entry.bytes();
        entry.memo = Some(memo);
        self.stats.bytes = self.stats.bytes - old + entry.bytes();
    }

    /// Caches the ids of segment `text` and its prior estimate, evicting as needed, and returns
    /// its slot; a segment that alone exceeds a quarter of the byte budget is not cached. The
    /// caller has just missed on `text`.
    pub(crate) fn insert(&mut self, text: &str, at_start: bool, ids: &[TokenId], prior: f32) -> Option<u32> {
        self.insert_kind(text, Kind::segment(at_start), ids, prior)
    }

    /// [`SegmentCache::insert`] for a chunk of a laid-out chat, by its key written out.
    pub(crate) fn insert_chunk(&mut self, key: &str, ids: &[TokenId], prior: f32) -> Option<u32> {
        self.insert_kind(key, Kind::Chunk, ids, prior)
    }

    fn insert_kind(&mut self, text: &str, kind: Kind, ids: &[TokenId], prior: f32) -> Option<u32> {
        if self.config.max_entries == 0 {
            return None;
        }
        let bytes = entry_bytes(text.len(), ids.len());
        if bytes > self.config.max_bytes / 4 {
            self.stats.too_large += 1;
            return None;
        }
        while self.stats.entries >= self.config.max_entries
            || self.stats.bytes + bytes > self.config.max_bytes
        {
            if !self.evict_one() {
                return None;
            }
        }
        let hash = segment_hash(text, kind);
        let entry = Entry { text: text.into(), ids: ids.into(), prior, kind, memo: None };
        // Slot indices are u32: max_entries beyond that is not a cache size anyone configures.
        let index = match self.free.pop() {
            Some(i) => i,
            None => match u32::try_from(self.slots.len()) {
                Ok(i) => {
                    self.slots.push(Slot { hash: 0, referenced: false, entry: None });
                    i
                }
                Err(_) => return None,
            },
        };
        let slot = &mut self.slots[index as usize];
        slot.hash = hash;
        // New entries start unreferenced: a segment seen once is the first to go.
        slot.referenced = false;
        slot.entry = Some(entry);
        let slots = &self.slots;
        self.table.insert_unique(hash, index, |&i| slots[i as usize].hash);
        self.stats.insertions += 1;
        self.stats.entries += 1;
        self.stats.bytes += bytes;
        Some(index)
    }

    /// Evicts one entry (CLOCK); `false` if there is none.
    fn evict_one(&mut self) -> bool {
        if self.stats.entries == 0 {
            return false;
        }
        // Two passes find an unreferenced entry: the first clears every referenced bit it passes.
        for _ in 0..2 * self.slots.len() + 1 {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let index = self.hand;
            self.hand += 1;
            let slot = &mut self.slots[index];
            if slot.entry.is_none() {
                continue;
            }
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            let hash = slot.hash;
            let bytes = slot.entry.take().map_or(0, |e| e.bytes());
            if let Ok(found) = self.table.find_entry(hash, |&i| i as usize == index) {
                found.remove();
            }
            // `index` came from a u32 slot number.
            self.free.push(index as u32);
            self.stats.entries -= 1;
            self.stats.bytes -= bytes;
            self.stats.evictions += 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_sees_a_difference_at_every_byte() {
        // Both the word loop and the tail (lengths around multiples of 8), in wasm as natively.
        for len in 0..40 {
            let a: String = (0..len).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            assert!(same_text(&a, &a.clone()));
            assert!(!same_text(&a, &format!("{a}x")));
            for at in 0..len {
                let mut b = a.clone().into_bytes();
                b[at] = b'#';
                let b = String::from_utf8(b).expect("ASCII");
                assert!(!same_text(&a, &b), "length {len}, differs at {at}");
            }
        }
    }

    #[test]
    fn a_chunk_is_found_by_its_parts_and_apart_from_segments() {
        let mut cache = SegmentCache::new(SegmentCacheConfig::default());
        let text = "<|im_start|>user\nHello, world<|im_end|>\n";
        let parts = ["<|im_start|>", "user", "\n", "Hello, world", "<|im_end|>\n"];
        // Streamed over the parts, the hash is the one-shot hash of the text.
        assert_eq!(parts_hash(parts.into_iter(), Kind::Chunk), segment_hash(text, Kind::Chunk));
        assert_eq!(cache.lookup_chunk(parts.into_iter()), None);
        cache.insert_chunk(text, &[1, 2, 3], 4.5);
        let slot = cache.lookup_chunk(parts.into_iter()).expect("the chunk is cached");
        assert_eq!(
            cache.entry(slot).map(|(ids, prior, _)| (ids.to_vec(), prior)),
            Some((vec![1, 2, 3], 4.5))
        );
        // The same text cut elsewhere is the same chunk; other text, or the text as a segment, is not.
        assert!(cache.lookup_chunk([&text[..5], &text[5..20], &text[20..]].into_iter()).is_some());
        assert!(cache.lookup_chunk([&text[..5], "X", &text[6..]].into_iter()).is_none());
        assert!(cache.lookup_chunk([&text[..text.len() - 1]].into_iter()).is_none());
        assert!(cache.lookup(text, false).is_none());
        cache.insert(text, false, &[9], 1.0);
        assert_eq!(cache.get(text, false), Some((&[9][..], 1.0)));
        let slot = cache.lookup_chunk(parts.into_iter()).expect("still cached");
        assert_eq!(cache.entry(slot).map(|e| e.0.len()), Some(3));
    }

    /// The ids of a cached segment.
    fn ids<'c>(cache: &'c mut SegmentCache, text: &str, at_start: bool) -> Option<&'c [TokenId]> {
        cache.get(text, at_start).map(|(ids, _)| ids)
    }

    fn config(max_bytes: usize, max_entries: usize) -> SegmentCacheConfig {
        SegmentCacheConfig { max_bytes, max_entries }
    }

    #[test]
    fn hit_returns_what_was_inserted() {
        let mut cache = SegmentCache::new(SegmentCacheConfig::default());
        assert_eq!(ids(&mut cache, "system prompt", false), None);
        cache.insert("system prompt", false, &[1, 2, 3], 3.25);
        assert_eq!(cache.get("system prompt", false), Some((&[1, 2, 3][..], 3.25)));
        // The start-of-prompt flag is part of the key.
        assert_eq!(ids(&mut cache, "system prompt", true), None);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.insertions, stats.entries), (1, 2, 1, 1));
        assert_eq!(stats.bytes, entry_bytes(13, 3));
    }

    #[test]
    fn entry_bound_evicts_the_unreferenced_first() {
        let mut cache = SegmentCache::new(config(1 << 20, 3));
        for (i, text) in ["a", "b", "c"].iter().enumerate() {
            cache.insert(text, false, &[i as u32], 0.5);
        }
        // `a` and `c` are used again; `b` is not, so it is the one to go.
        assert!(ids(&mut cache, "a", false).is_some());
        assert!(ids(&mut cache, "c", false).is_some());
        cache.insert("d", false, &[3], 0.5);
        assert_eq!(cache.stats().entries, 3);
        assert_eq!(cache.stats().evictions, 1);
        assert!(ids(&mut cache, "b", false).is_none());
        for text in ["a", "c", "d"] {
            assert!(ids(&mut cache, text, false).is_some(), "{text}");
        }
    }

    #[test]
    fn byte_bound_holds() {
        let budget = 4 * entry_bytes(100, 25);
        let mut cache = SegmentCache::new(config(budget, 1000));
        for i in 0..50u32 {
            let text = format!("{i:0>100}");
            cache.insert(&text, false, &[i; 25], 0.5);
            assert!(cache.stats().bytes <= budget);
        }
        assert_eq!(cache.stats().entries, 4);
        // The most recent segments are the ones left, with their own ids.
        assert_eq!(ids(&mut cache, &format!("{:0>100}", 49), false), Some(&[49u32; 25][..]));
    }

    #[test]
    fn oversized_segment_is_not_cached() {
        let mut cache = SegmentCache::new(config(1000, 10));
        cache.insert(&"x".repeat(300), false, &[1; 10], 0.5);
        assert_eq!(cache.stats().too_large, 1);
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn disabled_cache_holds_nothing() {
        let mut cache = SegmentCache::new(SegmentCacheConfig::DISABLED);
        cache.insert("a", false, &[1], 0.5);
        assert_eq!(ids(&mut cache, "a", false), None);
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn slots_are_reused_after_eviction() {
        let mut cache = SegmentCache::new(config(1 << 20, 2));
        for i in 0..100u32 {
            cache.insert(&i.to_string(), false, &[i], 0.5);
        }
        assert_eq!(cache.slots.len(), 2);
        assert_eq!(ids(&mut cache, "99", false), Some(&[99u32][..]));
    }
}
