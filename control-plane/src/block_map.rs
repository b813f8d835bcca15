//! Maps keyed by block hash. Block hashes are already uniform 64-bit values, so the map's hasher
//! only spreads them cheaply (tests and engines may still feed small or structured values).

use std::hash::{BuildHasher, Hasher};

/// A map from block hash to `V`.
pub type BlockMap<V> = hashbrown::HashMap<u64, V, BuildBlockHasher>;

/// Builds [`BlockHasher`]s.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildBlockHasher;

impl BuildHasher for BuildBlockHasher {
    type Hasher = BlockHasher;

    fn build_hasher(&self) -> BlockHasher {
        BlockHasher(0)
    }
}

/// A hasher for one `u64` key (other writes fold bytes in, for completeness).
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        // splitmix64's finaliser: hashbrown reads both the top 7 bits and the low bits.
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

/// An empty map with room for `n` blocks.
pub fn with_capacity<V>(n: usize) -> BlockMap<V> {
    BlockMap::with_capacity_and_hasher(n, BuildBlockHasher)
}
