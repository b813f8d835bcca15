//! Block hashes exactly as each engine computes and publishes them in its KV events.
//!
//! - vLLM (≥ 0.29, `PYTHONHASHSEED` unset): `h = SHA-256(serialize((parent or NONE_HASH,
//!   tuple(tokens), extra_keys or None)))` with `NONE_HASH = SHA-256(serialize("vllm-none-hash"))`;
//!   `serialize` is pickle protocol 5 for `--prefix-caching-hash-algo sha256` (vLLM's default) and
//!   canonical CBOR for `sha256_cbor`. The event carries the last 8 digest bytes big-endian as u64
//!   (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, the default). A `cache_salt` adds the extra key
//!   `("cache_salt", salt)` to block 0 only (`vllm/v1/core/kv_cache_utils.py`).
//! - SGLang (0.5.23): `h = SHA-256(prior 32-byte digest || token ids as u32 LE)`, no prior for the
//!   first page unless a cache salt seeds it with `SHA-256("sglang-cache-salt-v1\0" || salt)`; the
//!   event carries the first 8 digest bytes as a signed i64 (`sglang/srt/mem_cache/utils.py`).
//! - TensorRT-LLM: its own 64-bit chain, `BlockKeyHasher::hash` in `kvCacheManager.cpp` (and the
//!   Python mirror `hash_v1_block_key`). A cache salt enters block 0 through a salt id that TRT-LLM
//!   derives with BLAKE3; the sim uses the first 8 bytes of SHA-256 instead (no BLAKE3 dependency), so
//!   salted TRT-LLM chains do not match the real engine's values.
//!
//! All three are pinned against vectors from the engines' own code in the tests below.

use sha2::{Digest, Sha256};

use kvmesh_core::hash::{BlockHash, TokenId};

/// The fixed NONE_HASH seed of vLLM ≥ 0.29 when `PYTHONHASHSEED` is unset.
const VLLM_NONE_HASH_SEED: &str = "vllm-none-hash";

/// Largest block whose pickle fits in one pickle frame (64 KiB), so our writer matches CPython's.
pub const MAX_PICKLE_BLOCK_TOKENS: usize = 8192;

/// Which engine's block hash (and serialization) names the blocks in events.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HashAlgo {
    /// vLLM `--prefix-caching-hash-algo sha256` (pickle protocol 5), vLLM's default.
    VllmSha256,
    /// vLLM `--prefix-caching-hash-algo sha256_cbor` (canonical CBOR).
    VllmSha256Cbor,
    /// SGLang's chained page hash.
    Sglang,
    /// TensorRT-LLM's `BlockKeyHasher`.
    Trtllm,
}

/// The parent a chain continues from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Parent {
    /// The first block of a sequence.
    Root,
    /// A SHA-256 digest (vLLM, SGLang).
    Digest([u8; 32]),
    /// TRT-LLM's 64-bit hash.
    Word(u64),
}

/// The engine hashes of one sequence's full blocks, extended as its tokens grow.
#[derive(Clone, Debug)]
pub struct BlockChain {
    algo: HashAlgo,
    block_size: usize,
    cache_salt: Option<String>,
    parent: Parent,
    hashes: Vec<BlockHash>,
}

impl BlockChain {
    /// An empty chain for a sequence under `cache_salt`.
    pub fn new(algo: HashAlgo, block_size: usize, cache_salt: Option<&str>) -> Self {
        BlockChain {
            algo,
            block_size: block_size.max(1),
            cache_salt: cache_salt.map(str::to_owned),
            parent: Parent::Root,
            hashes: Vec::new(),
        }
    }

    /// Hashes the blocks of `tokens` (the whole sequence so far) that became full since the last call.
    pub fn extend(&mut self, tokens: &[TokenId]) {
        let full = tokens.len() / self.block_size;
        while self.hashes.len() < full {
            let i = self.hashes.len();
            let block = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let (parent, value) = self.hash_next(block);
            self.parent = parent;
            self.hashes.push(value);
        }
    }

    /// Event values of the full blocks hashed so far, in order.
    pub fn hashes(&self) -> &[BlockHash] {
        &self.hashes
    }

    /// The cache salt this chain was built under.
    pub fn cache_salt(&self) -> Option<&str> {
        self.cache_salt.as_deref()
    }

    fn hash_next(&self, block: &[TokenId]) -> (Parent, BlockHash) {
        let first = self.parent == Parent::Root;
        match self.algo {
            HashAlgo::VllmSha256 | HashAlgo::VllmSha256Cbor => {
                let cbor = self.algo == HashAlgo::VllmSha256Cbor;
                let parent = match self.parent {
                    Parent::Digest(d) => d,
                    _ => vllm_none_hash(cbor),
                };
                let salt = if first { self.cache_salt.as_deref() } else { None };
                let input =
                    if cbor { cbor_block(&parent, block, salt) } else { pickle_block(&parent, block, salt) };
                let digest: [u8; 32] = Sha256::digest(&input).into();
                (Parent::Digest(digest), BlockHash(vllm_event_value(&digest)))
            }
            HashAlgo::Sglang => {
                let mut h = Sha256::new();
                match (self.parent, &self.cache_salt) {
                    (Parent::Digest(d), _) => h.update(d),
                    (_, Some(salt)) => h.update(sglang_salt_seed(salt)),
                    _ => {}
                }
                for t in block {
                    h.update(t.to_le_bytes());
                }
                let digest: [u8; 32] = h.finalize().into();
                let first8: [u8; 8] = digest[..8].try_into().expect("a SHA-256 digest has 32 bytes");
                (Parent::Digest(digest), BlockHash(u64::from_be_bytes(first8)))
            }
            HashAlgo::Trtllm => {
                let parent = match self.parent {
                    Parent::Word(w) => w,
                    _ => 0,
                };
                let salt_id = self.cache_salt.as_deref().map(trtllm_salt_id);
                let h = trtllm_block_hash(block, parent, salt_id);
                (Parent::Word(h), BlockHash(h))
            }
        }
    }
}

/// vLLM's event value of a digest: its last 8 bytes, big-endian.
fn vllm_event_value(digest: &[u8; 32]) -> u64 {
    let last8: [u8; 8] = digest[24..].try_into().expect("a SHA-256 digest has 32 bytes");
    u64::from_be_bytes(last8)
}

/// vLLM's NONE_HASH: the digest of the serialized seed string.
fn vllm_none_hash(cbor: bool) -> [u8; 32] {
    let input = if cbor {
        let mut out = Vec::new();
        cbor_text(&mut out, VLLM_NONE_HASH_SEED);
        out
    } else {
        let mut body = Vec::new();
        pickle_str(&mut body, VLLM_NONE_HASH_SEED);
        pickle_frame(body)
    };
    Sha256::digest(&input).into()
}

/// `pickle.dumps((parent, tuple(tokens), extra), protocol=5)` as CPython's C pickler writes it.
fn pickle_block(parent: &[u8; 32], tokens: &[TokenId], cache_salt: Option<&str>) -> Vec<u8> {
    let mut body = Vec::with_capacity(48 + tokens.len() * 5);
    body.extend_from_slice(&[0x43, 0x20]); // SHORT_BINBYTES, 32
    body.extend_from_slice(parent);
    body.push(0x94); // MEMOIZE
    pickle_tuple(&mut body, tokens.len(), |out| {
        for &t in tokens {
            pickle_int(out, t);
        }
    });
    match cache_salt {
        None => body.push(0x4e), // NONE
        Some(salt) => {
            // (("cache_salt", salt),)
            pickle_str(&mut body, "cache_salt");
            pickle_str(&mut body, salt);
            body.extend_from_slice(&[0x86, 0x94, 0x85, 0x94]); // TUPLE2, MEMOIZE, TUPLE1, MEMOIZE
        }
    }
    body.extend_from_slice(&[0x87, 0x94]); // TUPLE3, MEMOIZE
    pickle_frame(body)
}

/// PROTO 5 and one FRAME around `body`, then STOP (inside the frame, as CPython writes it).
fn pickle_frame(mut body: Vec<u8>) -> Vec<u8> {
    body.push(0x2e); // STOP
    let mut out = Vec::with_capacity(body.len() + 11);
    out.extend_from_slice(&[0x80, 0x05, 0x95]);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A tuple of `len` items written by `items`: EMPTY_TUPLE, TUPLE1..3, or MARK ... TUPLE; memoized
/// unless empty (CPython's `save_tuple`).
fn pickle_tuple(out: &mut Vec<u8>, len: usize, items: impl FnOnce(&mut Vec<u8>)) {
    match len {
        0 => out.push(0x29),
        1..=3 => {
            items(out);
            out.push(0x84 + len as u8);
            out.push(0x94);
        }
        _ => {
            out.push(0x28);
            items(out);
            out.extend_from_slice(&[0x74, 0x94]);
        }
    }
}

/// An int in the smallest pickle form: BININT1, BININT2, BININT, else LONG1.
fn pickle_int(out: &mut Vec<u8>, v: u32) {
    if v <= 0xff {
        out.extend_from_slice(&[0x4b, v as u8]);
    } else if v <= 0xffff {
        out.push(0x4d);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= i32::MAX as u32 {
        out.push(0x4a);
        out.extend_from_slice(&v.to_le_bytes());
    } else {
        // Two's complement little-endian with a clear sign bit: 5 bytes for 2^31..2^32.
        out.extend_from_slice(&[0x8a, 5]);
        out.extend_from_slice(&v.to_le_bytes());
        out.push(0);
    }
}

/// A str as SHORT_BINUNICODE or BINUNICODE, memoized.
fn pickle_str(out: &mut Vec<u8>, s: &str) {
    if s.len() < 256 {
        out.extend_from_slice(&[0x8c, s.len() as u8]);
    } else {
        out.push(0x58);
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(s.as_bytes());
    out.push(0x94);
}

/// `cbor2.dumps((parent, tuple(tokens), extra), canonical=True)`.
fn cbor_block(parent: &[u8; 32], tokens: &[TokenId], cache_salt: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + tokens.len() * 5);
    cbor_head(&mut out, 4, 3);
    cbor_head(&mut out, 2, 32);
    out.extend_from_slice(parent);
    cbor_head(&mut out, 4, tokens.len() as u64);
    for &t in tokens {
        cbor_head(&mut out, 0, t as u64);
    }
    match cache_salt {
        None => out.push(0xf6),
        Some(salt) => {
            cbor_head(&mut out, 4, 1);
            cbor_head(&mut out, 4, 2);
            cbor_text(&mut out, "cache_salt");
            cbor_text(&mut out, salt);
        }
    }
    out
}

/// A CBOR item head of major type `major` with argument `v` in its shortest form.
fn cbor_head(out: &mut Vec<u8>, major: u8, v: u64) {
    let m = major << 5;
    if v < 24 {
        out.push(m | v as u8);
    } else if v <= 0xff {
        out.extend_from_slice(&[m | 24, v as u8]);
    } else if v <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn cbor_text(out: &mut Vec<u8>, s: &str) {
    cbor_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// The prior digest SGLang seeds a salted chain with (`compute_node_event_hash_values`).
fn sglang_salt_seed(salt: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"sglang-cache-salt-v1\0");
    h.update(salt.as_bytes());
    h.finalize().into()
}

/// The salt id the sim mixes into a salted TRT-LLM chain (TRT-LLM itself uses BLAKE3; see above).
fn trtllm_salt_id(salt: &str) -> u64 {
    let d = Sha256::digest(salt.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// TRT-LLM's `BlockKeyHasher::hash` for a text-only block without LoRA.
fn trtllm_block_hash(tokens: &[TokenId], parent: u64, salt_id: Option<u64>) -> u64 {
    let mut seed = (tokens.len() as u64) ^ parent.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    if parent == 0
        && let Some(c) = salt_id
    {
        seed = hash64_mix(c, seed);
    }
    for &t in tokens {
        seed = hash32_mix(t, seed);
    }
    seed
}

fn hash32_mix(v: u32, seed: u64) -> u64 {
    let mut a = v;
    a = ((a >> 16) ^ a).wrapping_mul(0x45d9f3b);
    a = ((a >> 16) ^ a).wrapping_mul(0x45d9f3b);
    a = (a >> 16) ^ a;
    // In C++ `a + 0x9e3779b9` is a uint32_t sum and wraps before the size_t terms are added.
    let a = a.wrapping_add(0x9e37_79b9) as u64;
    seed ^ a.wrapping_add(seed << 6).wrapping_add(seed >> 2)
}

fn hash64_mix(v: u64, seed: u64) -> u64 {
    let mut b = v;
    b = (b ^ (b >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    b = (b ^ (b >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    b ^= b >> 31;
    seed ^ b.wrapping_add(0x9e37_79b9).wrapping_add(seed << 6).wrapping_add(seed >> 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const VECTORS: &str = include_str!("../../tests/fixtures/engines/vllm-0.33.0-hash-vectors.json");
    const SGLANG: &str = include_str!("../../tests/fixtures/engines/sglang-0.5.23-bind_int64.json");

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn tokens(v: &Value) -> Vec<TokenId> {
        v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as TokenId).collect()
    }

    /// Every vLLM vector without PYTHONHASHSEED whose extra key we model (none or cache_salt).
    fn vllm_cases(algo: &str) -> Vec<(Option<String>, Value)> {
        let v: Value = serde_json::from_str(VECTORS).unwrap();
        let a = v["algorithms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["algo"] == algo && a["PYTHONHASHSEED"].is_null())
            .unwrap()
            .clone();
        let mut out = Vec::new();
        for (case, salt) in [("plain_chain", None), ("cache_salt", Some("tenant-42".to_string()))] {
            out.push((salt, a["cases"][case].clone()));
        }
        out
    }

    fn check_vllm(algo: HashAlgo, name: &str) {
        for (salt, chain) in vllm_cases(name) {
            let mut all = Vec::new();
            let mut parent: Option<[u8; 32]> = None;
            for (i, block) in chain.as_array().unwrap().iter().enumerate() {
                let toks = tokens(&block["token_ids"]);
                let p = parent.unwrap_or_else(|| vllm_none_hash(algo == HashAlgo::VllmSha256Cbor));
                let s = if i == 0 { salt.as_deref() } else { None };
                let input = if algo == HashAlgo::VllmSha256Cbor {
                    cbor_block(&p, &toks, s)
                } else {
                    pickle_block(&p, &toks, s)
                };
                assert_eq!(hex(&input), block["serialized_input_hex"].as_str().unwrap(), "{name} block {i}");
                let digest: [u8; 32] = Sha256::digest(&input).into();
                assert_eq!(hex(&digest), block["digest_hex"].as_str().unwrap());
                parent = Some(digest);
                all.extend(toks);
            }
            let mut c = BlockChain::new(algo, 16, salt.as_deref());
            c.extend(&all);
            let want: Vec<BlockHash> = chain
                .as_array()
                .unwrap()
                .iter()
                .map(|b| BlockHash(b["event_u64"].as_u64().unwrap()))
                .collect();
            assert_eq!(c.hashes(), want.as_slice(), "{name} {salt:?}");
        }
    }

    #[test]
    fn vllm_sha256_pickle_matches_vllm_vectors() {
        check_vllm(HashAlgo::VllmSha256, "sha256");
    }

    #[test]
    fn vllm_sha256_cbor_matches_vllm_vectors() {
        check_vllm(HashAlgo::VllmSha256Cbor, "sha256_cbor");
    }

    #[test]
    fn vllm_none_hashes_match() {
        assert_eq!(
            hex(&vllm_none_hash(false)),
            "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198"
        );
        assert_eq!(
            hex(&vllm_none_hash(true)),
            "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"
        );
    }

    #[test]
    fn pickle_ints_take_the_smallest_form() {
        let mut out = Vec::new();
        for v in [0, 255, 256, 65_535, 65_536, i32::MAX as u32, 1 << 31] {
            pickle_int(&mut out, v);
        }
        assert_eq!(hex(&out), "4b004bff4d00014dffff4a000001004affffff7f8a050000008000");
        let mut short = Vec::new();
        pickle_tuple(&mut short, 2, |o| {
            pickle_int(o, 1);
            pickle_int(o, 2);
        });
        assert_eq!(hex(&short), "4b014b028694");
    }

    #[test]
    fn sglang_chain_matches_sglang_events() {
        let v: Value = serde_json::from_str(SGLANG).unwrap();
        let mut checked = 0;
        for batch in v["live"].as_array().unwrap() {
            for e in batch["decoded"][1].as_array().unwrap() {
                if e["type"] != "BlockStored" || !e["parent_block_hash"].is_null() {
                    continue;
                }
                let mut c = BlockChain::new(HashAlgo::Sglang, 16, e["cache_salt"].as_str());
                c.extend(&tokens(&e["token_ids"]));
                let want: Vec<BlockHash> = e["block_hashes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| BlockHash(h.as_i64().unwrap() as u64))
                    .collect();
                assert_eq!(c.hashes(), want.as_slice());
                checked += 1;
            }
        }
        assert_eq!(checked, 3, "plain, salted and post-flush chains");
    }

    #[test]
    fn trtllm_hash_is_pinned() {
        // Computed with TRT-LLM's Python mirror of BlockKeyHasher (`hash_v1_block_key`).
        let tokens: Vec<TokenId> = (1..=32).collect();
        let mut c = BlockChain::new(HashAlgo::Trtllm, 16, None);
        c.extend(&tokens);
        assert_eq!(c.hashes(), &[BlockHash(TRTLLM_1_16), BlockHash(TRTLLM_17_32)]);
    }

    const TRTLLM_1_16: u64 = 0x53fe_95e8_f74d_8634;
    const TRTLLM_17_32: u64 = 0x0a82_e129_9e03_3e75;

    #[test]
    fn chain_extends_only_full_blocks() {
        let mut c = BlockChain::new(HashAlgo::VllmSha256, 4, None);
        c.extend(&[1, 2, 3]);
        assert!(c.hashes().is_empty());
        c.extend(&[1, 2, 3, 4, 5]);
        assert_eq!(c.hashes().len(), 1);
        let mut whole = BlockChain::new(HashAlgo::VllmSha256, 4, None);
        whole.extend(&[1, 2, 3, 4, 5, 6, 7, 8]);
        c.extend(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(c.hashes(), whole.hashes());
    }
}
