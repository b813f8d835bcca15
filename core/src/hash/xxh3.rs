//! XXH3-64 for inputs of 17 to 240 bytes (a block of 1 to 56 token ids with its parent and salt),
//! bit for bit the `xxhash-rust` result (tested against it), with the 64x64 -> 128-bit multiply
//! built from four 32x32 -> 64-bit products on wasm32.
//!
//! Why: wasm has no 64-bit widening multiply, so `u128` products become calls to
//! compiler-builtins' `__multi3`, which returns through linear memory. XXH3 of an 80-byte block
//! takes six of them; in V8 the block hash and `__multi3` were 22% of the filter's decision for a
//! warm 4k-token chat. Natively the `u128` product is one instruction and stays.
//!
//! Algorithm: XXH3 specification (xxhash.h `XXH3_len_17to128_64b`, `XXH3_len_129to240_64b`), with
//! the default secret and a seed.

/// The default secret (`kSecret` of the XXH3 specification), of which these sizes read 136 bytes.
const SECRET: [u8; 136] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c, //
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, //
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21, //
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c, //
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3, //
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, //
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, //
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, //
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3,
];

const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
/// Bytes of the secret skipped by rounds 9 and later of the 129-240 byte path.
const MIDSIZE_START_OFFSET: usize = 3;
/// Where in the secret the 129-240 byte path's last 16 input bytes are mixed.
const MIDSIZE_LAST_OFFSET: usize = 136 - 17;

/// Smallest input this module hashes.
pub(super) const MIN_LEN: usize = 17;
/// Largest input this module hashes.
pub(super) const MAX_LEN: usize = 240;

/// `xxh3_64_with_seed(input, seed)` for `MIN_LEN <= input.len() <= MAX_LEN`.
#[inline]
pub(super) fn xxh3_64_mid(input: &[u8], seed: u64) -> u64 {
    debug_assert!((MIN_LEN..=MAX_LEN).contains(&input.len()));
    let len = input.len();
    let mut acc = (len as u64).wrapping_mul(PRIME64_1);
    if len <= 128 {
        if len > 32 {
            if len > 64 {
                if len > 96 {
                    acc = acc.wrapping_add(mix16(input, 48, 96, seed));
                    acc = acc.wrapping_add(mix16(input, len - 64, 112, seed));
                }
                acc = acc.wrapping_add(mix16(input, 32, 64, seed));
                acc = acc.wrapping_add(mix16(input, len - 48, 80, seed));
            }
            acc = acc.wrapping_add(mix16(input, 16, 32, seed));
            acc = acc.wrapping_add(mix16(input, len - 32, 48, seed));
        }
        acc = acc.wrapping_add(mix16(input, 0, 0, seed));
        acc = acc.wrapping_add(mix16(input, len - 16, 16, seed));
        return avalanche(acc);
    }
    for i in 0..8 {
        acc = acc.wrapping_add(mix16(input, 16 * i, 16 * i, seed));
    }
    let mut end = mix16(input, len - 16, MIDSIZE_LAST_OFFSET, seed);
    acc = avalanche(acc);
    for i in 8..len / 16 {
        end = end.wrapping_add(mix16(input, 16 * i, 16 * (i - 8) + MIDSIZE_START_OFFSET, seed));
    }
    avalanche(acc.wrapping_add(end))
}

/// XXH3's `mix16B`: 16 input bytes at `at` against 16 secret bytes at `secret_at`.
#[inline(always)]
fn mix16(input: &[u8], at: usize, secret_at: usize, seed: u64) -> u64 {
    let lo = read64(input, at) ^ read64(&SECRET, secret_at).wrapping_add(seed);
    let hi = read64(input, at + 8) ^ read64(&SECRET, secret_at + 8).wrapping_sub(seed);
    mul128_fold64(lo, hi)
}

#[inline(always)]
fn read64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

#[inline(always)]
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

/// The 128-bit product of `a` and `b`, its two halves XORed.
#[inline(always)]
fn mul128_fold64(a: u64, b: u64) -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        const LOW: u64 = 0xFFFF_FFFF;
        let (a_lo, a_hi, b_lo, b_hi) = (a & LOW, a >> 32, b & LOW, b >> 32);
        // LLVM recognises the four partial products and folds them back into a u128 multiply
        // (so `__multi3`); hiding one operand keeps them as written. In V8 this multiply took
        // 3.6-4.6 ns against 5.6-9.2 ns for `__multi3` and 8 ns for simd128's `extmul`.
        let b_hi = core::hint::black_box(b_hi);
        fold_products(a, b, [a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi])
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let product = u128::from(a) * u128::from(b);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

/// [`mul128_fold64`] from the four 32x32 -> 64-bit partial products `[a_lo * b_lo, a_hi * b_lo,
/// a_lo * b_hi, a_hi * b_hi]` (xxhash.h's portable `XXH_mult64to128`).
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
#[inline(always)]
fn fold_products(a: u64, b: u64, [lo_lo, hi_lo, lo_hi, hi_hi]: [u64; 4]) -> u64 {
    const LOW: u64 = 0xFFFF_FFFF;
    // At most (2^32 - 1) * 2 + (2^32 - 1)^2 = 2^64 - 1: no overflow.
    let cross = (lo_lo >> 32) + (hi_lo & LOW) + lo_hi;
    let upper = (hi_lo >> 32) + (cross >> 32) + hi_hi;
    upper ^ a.wrapping_mul(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use xxhash_rust::xxh3::xxh3_64_with_seed;

    #[test]
    fn every_length_matches_the_reference() {
        let bytes: Vec<u8> =
            (0..MAX_LEN as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in MIN_LEN..=MAX_LEN {
            for seed in [0, super::super::HASH_SEED, u64::MAX] {
                let input = &bytes[..len];
                assert_eq!(
                    xxh3_64_mid(input, seed),
                    xxh3_64_with_seed(input, seed),
                    "len {len}, seed {seed:#x}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn random_inputs_match_the_reference(
            input in proptest::collection::vec(any::<u8>(), MIN_LEN..=MAX_LEN),
            seed in any::<u64>(),
        ) {
            prop_assert_eq!(xxh3_64_mid(&input, seed), xxh3_64_with_seed(&input, seed));
        }

        #[test]
        fn partial_products_fold_like_u128(a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(halves(a, b), reference(a, b));
        }
    }

    /// The wasm path's arithmetic, with the partial products computed in scalar code.
    fn halves(a: u64, b: u64) -> u64 {
        let (a_lo, a_hi, b_lo, b_hi) = (a & 0xFFFF_FFFF, a >> 32, b & 0xFFFF_FFFF, b >> 32);
        fold_products(a, b, [a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi])
    }

    fn reference(a: u64, b: u64) -> u64 {
        let product = u128::from(a) * u128::from(b);
        (product as u64) ^ ((product >> 64) as u64)
    }

    #[test]
    fn partial_products_fold_extremes() {
        let low = 0xFFFF_FFFF;
        for (a, b) in [(u64::MAX, u64::MAX), (u64::MAX, 1), (0, u64::MAX), (1 << 32, 1 << 32), (low, low)] {
            assert_eq!(halves(a, b), reference(a, b), "{a:#x} * {b:#x}");
        }
    }
}
