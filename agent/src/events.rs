//! What an engine says about its KV cache, normalised across vLLM, SGLang and TensorRT-LLM: the
//! engine adapters produce these, [`crate::blocks::WorkerBlocks`] translates them into kvmesh hashes.

use kvmesh_core::hash::TokenId;

/// An engine's own name for a block, normalised to 64 bits. Only ever compared with names from the
/// same engine process (the agent's translation map), never with another engine's or with kvmesh's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct EngineHash(pub u64);

impl EngineHash {
    /// SGLang's signed 64-bit hashes (the first 8 bytes of its SHA-256), reinterpreted as unsigned.
    pub fn from_i64(value: i64) -> EngineHash {
        EngineHash(value as u64)
    }

    /// A raw digest (vLLM with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`), folded to 64 bits: its last
    /// 8 bytes big-endian, the very number vLLM publishes in its default int mode, so both modes of
    /// one engine name a block alike. A digest shorter than 8 bytes is read as one big-endian number.
    pub fn from_digest(bytes: &[u8]) -> EngineHash {
        let tail = &bytes[bytes.len().saturating_sub(8)..];
        EngineHash(tail.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
}

/// Blocks an engine newly cached: one contiguous run of a chain.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredBlocks {
    /// The block before the first one here; `None` at the start of a sequence.
    pub parent: Option<EngineHash>,
    /// The blocks, in chain order.
    pub blocks: Vec<EngineHash>,
    /// Every token of these blocks, concatenated (`blocks.len() * block_size` of them).
    pub token_ids: Vec<TokenId>,
    /// Tokens per block, as the event states it.
    pub block_size: usize,
    /// LoRA adapter the blocks were computed with, if any.
    pub lora_name: Option<String>,
    /// vLLM's/SGLang's `cache_salt`: isolates a tenant's chain; only meaningful at a chain start.
    pub cache_salt: Option<String>,
    /// Per block (same index as `blocks`, may be shorter): content hashes besides the tokens that
    /// change this block's KV and hence the rest of the chain (multimodal items, prompt embeddings).
    pub extra_content: Vec<Vec<u64>>,
    /// KV-cache group (vLLM hybrid models); `None` when the engine does not say.
    pub group: Option<u32>,
    /// vLLM's `kv_cache_spec_kind` (`full_attention`, `sliding_window`, ...); `None` when absent.
    pub attention_kind: Option<String>,
    /// Whether the blocks sit in GPU memory (the tier the router cares about).
    pub on_gpu: bool,
}

/// One change to an engine's cached blocks.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// Blocks were cached.
    Stored(StoredBlocks),
    /// One copy of each block was evicted.
    Removed {
        /// The blocks, one copy each.
        blocks: Vec<EngineHash>,
        /// KV-cache group, as for stores.
        group: Option<u32>,
    },
    /// Every cached block was dropped.
    Cleared,
    /// A block moved between cache tiers (TensorRT-LLM's `updated` event).
    TierChanged {
        /// The block.
        block: EngineHash,
        /// Whether it is now in GPU memory.
        on_gpu: bool,
    },
}

/// The events of one engine batch (one engine step), in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineBatch {
    /// Data-parallel rank the engine wrote into the batch, if it did.
    pub dp_rank: Option<u32>,
    /// The events the agent can use.
    pub events: Vec<EngineEvent>,
}

/// What a decoder skipped while reading one batch (each is counted in the agent's metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Events of a type this agent does not know.
    pub unknown_type: u32,
    /// Events whose fields could not be read.
    pub malformed: u32,
    /// Events about another memory tier (CPU, disk, remote storage).
    pub other_tier: u32,
}

impl Skipped {
    /// Adds another batch's counts.
    pub fn add(&mut self, other: Skipped) {
        self.unknown_type += other.unknown_type;
        self.malformed += other.malformed;
        self.other_tier += other.other_tier;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_folds_to_the_int_mode_value() {
        // facts: vLLM's int mode is `int.from_bytes(digest, "big") & (2**64-1)`, digest ...137bb037547f4caf.
        let mut digest = [0u8; 32];
        digest[24..].copy_from_slice(&0x137b_b037_547f_4cafu64.to_be_bytes());
        digest[0] = 0x7b;
        assert_eq!(EngineHash::from_digest(&digest), EngineHash(0x137b_b037_547f_4caf));
        assert_eq!(EngineHash::from_digest(&[1, 2]), EngineHash(0x0102));
        assert_eq!(EngineHash::from_digest(&[]), EngineHash(0));
    }

    #[test]
    fn signed_hashes_keep_their_bits() {
        assert_eq!(EngineHash::from_i64(-1), EngineHash(u64::MAX));
        assert_eq!(EngineHash::from_i64(-1_642_190_308_932_068_723).0 as i64, -1_642_190_308_932_068_723);
    }
}
