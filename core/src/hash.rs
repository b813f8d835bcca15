//! Block hashing: the chained 64-bit hash that names a block of KV cache (DESIGN.md section 4).
//!
//! `h_i = xxh3_64(seed = HASH_SEED, bytes = h_{i-1} LE || salt LE || token ids of block i as u32 LE)`,
//! with `h_{-1} = 0`. Only full blocks are hashed: engines cache nothing smaller. The filter computes
//! these from the tokens of a prompt, the control plane from the token ids in engine events, so both
//! sides name the same block the same way without ever comparing engine-specific hashes.

mod xxh3;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

/// One token id as the engine's tokenizer produces it.
pub type TokenId = u32;

/// Fixed seed of the block hash ("kvmesh\0\x01"): changing it invalidates every index, so never do.
pub const HASH_SEED: u64 = 0x6b76_6d65_7368_0001;

/// Version of [`hash_block`]'s output. Bump it with any change that gives a block another hash:
/// the control plane sends its version with every state snapshot, and a filter whose version
/// differs ignores the streamed index (during a rolling upgrade its hashes would match nothing)
/// and says so in its metrics, rather than routing on overlaps that are silently always zero.
pub const BLOCK_HASH_VERSION: u32 = 1;

/// Parent of the first block of a sequence.
const ROOT_PARENT: u64 = 0;

/// Largest block hashed from the smallest stack buffer (the common block size).
const SMALL_TOKENS: usize = 16;
/// Smallest block of the next buffer size.
const MID_FIRST: usize = SMALL_TOKENS + 1;
/// Largest block whose bytes [`xxh3::xxh3_64_mid`] hashes (240 bytes with parent and salt).
const MID_TOKENS: usize = (xxh3::MAX_LEN - 16) / 4;
/// Smallest block of the largest buffer size.
const LARGE_FIRST: usize = MID_TOKENS + 1;
/// Largest block hashed from a stack buffer; bigger blocks stream through the hasher instead.
const STACK_TOKENS: usize = 256;

/// Name of one full block of KV cache: its tokens and everything before them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockHash(pub u64);

/// What besides the tokens changes a block's KV: LoRA adapter, multimodal content, cache salt.
/// Zero means none. The same salt is mixed into every block of a sequence.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockSalt(pub u64);

impl BlockSalt {
    /// No adapter, no multimodal content.
    pub const NONE: BlockSalt = BlockSalt(0);

    /// Salt for a LoRA adapter by name; `None` and `""` mean the base model.
    pub fn lora(name: Option<&str>) -> BlockSalt {
        match name {
            None | Some("") => BlockSalt::NONE,
            Some(name) => BlockSalt(xxh3_64_with_seed(name.as_bytes(), HASH_SEED ^ 0x6c6f_7261)),
        }
    }

    /// Salt of a request's whole chain: its LoRA adapter (by name) and its `cache_salt` (vLLM and
    /// SGLang accept one per request to keep tenants' caches apart). The agent derives the same salt
    /// from the engine's events, so both sides name the blocks alike.
    pub fn for_request(lora: Option<&str>, cache_salt: Option<&str>) -> BlockSalt {
        let salt = BlockSalt::lora(lora);
        match cache_salt {
            Some(cache_salt) => salt.with(cache_salt_part(cache_salt)),
            None => salt,
        }
    }

    /// This salt combined with another input (a multimodal content hash, a cache salt).
    pub fn with(self, part: u64) -> BlockSalt {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.0.to_le_bytes());
        bytes[8..].copy_from_slice(&part.to_le_bytes());
        BlockSalt(xxh3_64_with_seed(&bytes, HASH_SEED))
    }
}

/// The part a request's `cache_salt` adds to its chain's salt (through [`BlockSalt::with`]).
pub fn cache_salt_part(cache_salt: &str) -> u64 {
    xxh3_64_with_seed(cache_salt.as_bytes(), HASH_SEED ^ 0x7361_6c74)
}

/// Hash of one block given its parent's hash (`None` for the first block).
pub fn hash_block(parent: Option<BlockHash>, tokens: &[TokenId], salt: BlockSalt) -> BlockHash {
    let parent = parent.map_or(ROOT_PARENT, |p| p.0);
    // The buffer is zeroed on every call: size it to common block sizes (16 and 32 tokens, 64 for
    // MLA backends) rather than always to the largest.
    match tokens.len() {
        0..=SMALL_TOKENS => hash_in_buffer::<{ 16 + 4 * SMALL_TOKENS }>(parent, tokens, salt),
        MID_FIRST..=MID_TOKENS => hash_in_buffer::<{ 16 + 4 * MID_TOKENS }>(parent, tokens, salt),
        LARGE_FIRST..=STACK_TOKENS => hash_in_buffer::<{ 16 + 4 * STACK_TOKENS }>(parent, tokens, salt),
        _ => {
            let mut h = Xxh3::with_seed(HASH_SEED);
            h.update(&parent.to_le_bytes());
            h.update(&salt.0.to_le_bytes());
            for token in tokens {
                h.update(&token.to_le_bytes());
            }
            BlockHash(h.digest())
        }
    }
}

/// One-shot hash of a block laid out in a stack buffer of `N` bytes (`N >= 16 + 4 * tokens.len()`).
#[inline]
fn hash_in_buffer<const N: usize>(parent: u64, tokens: &[TokenId], salt: BlockSalt) -> BlockHash {
    let mut buf = [0u8; N];
    buf[..8].copy_from_slice(&parent.to_le_bytes());
    buf[8..16].copy_from_slice(&salt.0.to_le_bytes());
    for (chunk, token) in buf[16..].chunks_exact_mut(4).zip(tokens) {
        chunk.copy_from_slice(&token.to_le_bytes());
    }
    let bytes = &buf[..16 + 4 * tokens.len()];
    if (xxh3::MIN_LEN..=xxh3::MAX_LEN).contains(&bytes.len()) {
        BlockHash(xxh3::xxh3_64_mid(bytes, HASH_SEED))
    } else {
        BlockHash(xxh3_64_with_seed(bytes, HASH_SEED))
    }
}

/// Hashes of every full block of `tokens`, appended to `out` (which is not cleared).
/// A trailing partial block is ignored. `block_size` must be at least 1.
pub fn hash_prompt(tokens: &[TokenId], block_size: usize, salt: BlockSalt, out: &mut Vec<BlockHash>) {
    let mut hasher = BlockHasher::new(block_size, salt);
    out.reserve(tokens.len() / block_size.max(1));
    for block in tokens.chunks_exact(block_size.max(1)) {
        out.push(hasher.next_block(block));
    }
}

/// Incremental hasher: feeds one block at a time, so a caller can stop at the first block that no
/// worker holds (early exit) without hashing the rest.
#[derive(Clone, Debug)]
pub struct BlockHasher {
    block_size: usize,
    salt: BlockSalt,
    parent: Option<BlockHash>,
    blocks: usize,
}

impl BlockHasher {
    /// A hasher at the start of a sequence.
    pub fn new(block_size: usize, salt: BlockSalt) -> Self {
        BlockHasher { block_size: block_size.max(1), salt, parent: None, blocks: 0 }
    }

    /// A hasher that continues after the block named `parent` (as an engine event's `parent_block_hash`).
    pub fn after(parent: Option<BlockHash>, block_size: usize, salt: BlockSalt) -> Self {
        BlockHasher { block_size: block_size.max(1), salt, parent, blocks: 0 }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks hashed so far.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Hash of the last block fed, if any.
    pub fn last(&self) -> Option<BlockHash> {
        self.parent
    }

    /// Counts `hash` as the next block without hashing it: the caller knows it (a memo of an
    /// earlier walk over the same ids after the same parent).
    pub fn advance(&mut self, hash: BlockHash) {
        self.parent = Some(hash);
        self.blocks += 1;
    }

    /// The salt mixed into every block.
    pub fn salt(&self) -> BlockSalt {
        self.salt
    }

    /// Hashes the next block; `tokens` should hold exactly `block_size` ids.
    pub fn next_block(&mut self, tokens: &[TokenId]) -> BlockHash {
        debug_assert_eq!(tokens.len(), self.block_size, "a block is hashed only when full");
        let h = hash_block(self.parent, tokens, self.salt);
        self.parent = Some(h);
        self.blocks += 1;
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(n: u32) -> Vec<TokenId> {
        (0..n).map(|i| i.wrapping_mul(2_654_435_761) % 151_936).collect()
    }

    /// `cache_salt_part("tenant-7")`, from Python's `xxhash` (xxh3_64, seed HASH_SEED ^ 0x7361_6c74).
    const CACHE_SALT_TENANT_7: u64 = 0xd496_e387_79f2_b3f7;

    #[test]
    fn pinned_vectors_do_not_change() {
        // These values name blocks in every running index: a change here breaks mixed-version fleets.
        // Computed independently with Python's `xxhash` package (xxh3_64_intdigest, same bytes and seed).
        let tokens: Vec<TokenId> = (0..32).collect();
        let mut out = Vec::new();
        hash_prompt(&tokens, 16, BlockSalt::NONE, &mut out);
        assert_eq!(out, vec![BlockHash(0xa5bd_513e_1302_9e4c), BlockHash(0xd0b4_910b_ed88_d3b1)]);
        assert_eq!(hash_block(None, &[], BlockSalt::NONE), BlockHash(0x37d6_6eb1_60e0_d02a));
        assert_eq!(BlockSalt::lora(Some("sql-adapter")), BlockSalt(0xa435_1fe2_648e_9030));
        assert_eq!(cache_salt_part("tenant-7"), CACHE_SALT_TENANT_7);
    }

    #[test]
    fn request_salt_combines_adapter_and_cache_salt() {
        assert_eq!(BlockSalt::for_request(None, None), BlockSalt::NONE);
        assert_eq!(BlockSalt::for_request(Some("a"), None), BlockSalt::lora(Some("a")));
        let salted = BlockSalt::for_request(Some("a"), Some("tenant-7"));
        assert_eq!(salted, BlockSalt::lora(Some("a")).with(cache_salt_part("tenant-7")));
        assert_ne!(salted, BlockSalt::for_request(Some("a"), Some("tenant-8")));
        assert_ne!(BlockSalt::for_request(None, Some("tenant-7")), BlockSalt::NONE);
    }

    #[test]
    fn partial_block_is_not_hashed() {
        let mut out = Vec::new();
        hash_prompt(&prompt(47), 16, BlockSalt::NONE, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn chain_depends_on_every_earlier_block() {
        let a = prompt(64);
        let mut b = a.clone();
        b[3] += 1;
        let (mut ha, mut hb) = (Vec::new(), Vec::new());
        hash_prompt(&a, 16, BlockSalt::NONE, &mut ha);
        hash_prompt(&b, 16, BlockSalt::NONE, &mut hb);
        assert!(ha.iter().zip(&hb).all(|(x, y)| x != y));
    }

    #[test]
    fn shared_prefix_shares_hashes() {
        let a = prompt(64);
        let mut b = a.clone();
        b[40] += 1;
        let (mut ha, mut hb) = (Vec::new(), Vec::new());
        hash_prompt(&a, 16, BlockSalt::NONE, &mut ha);
        hash_prompt(&b, 16, BlockSalt::NONE, &mut hb);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
    }

    #[test]
    fn salt_changes_every_block() {
        let a = prompt(48);
        let (mut base, mut lora) = (Vec::new(), Vec::new());
        hash_prompt(&a, 16, BlockSalt::NONE, &mut base);
        hash_prompt(&a, 16, BlockSalt::lora(Some("adapter")), &mut lora);
        assert!(base.iter().zip(&lora).all(|(x, y)| x != y));
        assert_eq!(BlockSalt::lora(Some("")), BlockSalt::NONE);
    }

    #[test]
    fn large_blocks_stream_to_the_same_definition() {
        // Blocks above the stack buffer take the streaming path; both paths must agree.
        let tokens = prompt(300);
        let mut streamed = Xxh3::with_seed(HASH_SEED);
        streamed.update(&0u64.to_le_bytes());
        streamed.update(&0u64.to_le_bytes());
        for t in &tokens {
            streamed.update(&t.to_le_bytes());
        }
        assert_eq!(hash_block(None, &tokens, BlockSalt::NONE), BlockHash(streamed.digest()));
        let small = &tokens[..STACK_TOKENS];
        let mut s2 = Xxh3::with_seed(HASH_SEED);
        s2.update(&0u64.to_le_bytes());
        s2.update(&0u64.to_le_bytes());
        for t in small {
            s2.update(&t.to_le_bytes());
        }
        assert_eq!(hash_block(None, small, BlockSalt::NONE), BlockHash(s2.digest()));
    }

    #[test]
    fn every_block_size_hashes_as_the_definition() {
        // Each buffer size and each hash path (the mid-size XXH3, xxhash-rust, streaming) agrees
        // with the definition, with a parent and a salt.
        let tokens = prompt(260);
        let (parent, salt) = (BlockHash(0x0123_4567_89ab_cdef), BlockSalt(0xfedc_ba98_7654_3210));
        for size in 0..=tokens.len() {
            let mut streamed = Xxh3::with_seed(HASH_SEED);
            streamed.update(&parent.0.to_le_bytes());
            streamed.update(&salt.0.to_le_bytes());
            for t in &tokens[..size] {
                streamed.update(&t.to_le_bytes());
            }
            assert_eq!(
                hash_block(Some(parent), &tokens[..size], salt),
                BlockHash(streamed.digest()),
                "{size} tokens"
            );
        }
    }

    #[test]
    fn resuming_after_a_parent_matches_hashing_from_the_start() {
        // The control plane hashes an event's blocks after its parent; the filter hashes whole prompts.
        let tokens = prompt(64);
        let mut whole = Vec::new();
        hash_prompt(&tokens, 16, BlockSalt::NONE, &mut whole);
        let mut resumed = BlockHasher::after(Some(whole[1]), 16, BlockSalt::NONE);
        assert_eq!(resumed.next_block(&tokens[32..48]), whole[2]);
        assert_eq!(resumed.next_block(&tokens[48..64]), whole[3]);
        assert_eq!(resumed.blocks(), 2);
    }
}
