//! Seeded randomness for tie-breaking and temperature sampling. The core owns no entropy source: the
//! caller seeds a [`SplitMix64`] (per wasm VM, per test) and passes it in, so a seed replays a decision.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to pick among workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in [0, n); 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift (Lemire): the bias is at most n / 2^64, far below anything routing can notice.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Softmax weight of a cost: costs are normalised to [0, 1] over the candidates first, so the
/// temperature means the same whatever the fleet's scale (0.1 sharp, 1 mild, 10 nearly uniform).
#[inline]
pub(crate) fn softmax_weight(cost: f64, min: f64, max: f64, temperature: f64) -> f64 {
    let range = max - min;
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    (-((cost - min) / range) / temperature).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of the reference C implementation seeded with 0.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn draws_stay_in_range() {
        let mut rng = SplitMix64::new(7);
        for _ in 0..1000 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x));
            assert!(rng.below(5) < 5);
        }
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn softmax_weight_prefers_lower_cost() {
        assert_eq!(softmax_weight(3.0, 3.0, 3.0, 1.0), 1.0);
        let best = softmax_weight(0.0, 0.0, 10.0, 0.5);
        let worst = softmax_weight(10.0, 0.0, 10.0, 0.5);
        assert_eq!(best, 1.0);
        assert!((worst - (-2.0f64).exp()).abs() < 1e-12);
    }
}
