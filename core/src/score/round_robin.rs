//! Round robin: every eligible worker in turn, in slot order, resuming after the last one chosen.
//!
//! Expressed as a cost (the distance after the last choice in slot order) so that picking, skipping
//! overloaded workers and the fallback list work exactly as for the other policies.

use crate::fleet::WorkerSlot;

/// Where the cycle stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct RoundRobin {
    last: Option<WorkerSlot>,
}

impl RoundRobin {
    /// Steps from the last chosen worker to `slot`, going up and wrapping at `slot_bound`; the next
    /// in turn is 0.
    pub fn distance(&self, slot: WorkerSlot, slot_bound: usize) -> u64 {
        let bound = slot_bound.max(slot.index() + 1) as u64;
        let s = slot.index() as u64;
        match self.last {
            None => s,
            Some(last) => (s + bound - (last.index() as u64 % bound) - 1) % bound,
        }
    }

    /// Records the worker just chosen.
    pub fn advance(&mut self, chosen: WorkerSlot) {
        self.last = Some(chosen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_wraps_after_the_last_choice() {
        let mut rr = RoundRobin::default();
        assert_eq!(rr.distance(WorkerSlot(0), 3), 0);
        rr.advance(WorkerSlot(1));
        let d: Vec<u64> = (0..3).map(|s| rr.distance(WorkerSlot(s), 3)).collect();
        assert_eq!(d, [1, 2, 0]);
        // A slot past the bound (the fleet shrank) still gets a distance.
        rr.advance(WorkerSlot(9));
        assert!(rr.distance(WorkerSlot(2), 3) < 10);
    }
}
