//! Sequence numbers of one publisher (one engine endpoint, one data-parallel rank): which batch comes
//! next, what a gap, a duplicate or an engine restart looks like. Pure; the ZMQ source acts on it.
//!
//! vLLM and SGLang number batches from 0, +1 per batch, without gaps, per publisher process; a new
//! process starts again at 0. So, against the last batch applied:
//! - `last + 1` is next;
//! - more than that is a gap (the PUB socket dropped messages): replay from the engine's buffer;
//! - less is an engine restart, except for live messages that a replay already delivered.

/// What a live message is, against what was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// The next batch: apply it.
    Next,
    /// Already applied through a replay: skip it.
    Duplicate,
    /// Batches `from..seq` are missing.
    Gap {
        /// First missing sequence number.
        from: u64,
    },
    /// The number went back: the engine restarted, and its cache with it.
    Restart,
}

/// What a replayed batch is, against what was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayed {
    /// The next batch: apply it.
    Next,
    /// Applied already: skip it.
    Duplicate,
    /// The engine's buffer no longer reaches back to the missing batches.
    Hole,
}

/// Sequence state of one publisher.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    last: Option<u64>,
    /// After a replay: live messages numbered in this range were delivered by the replay already.
    replayed: Option<(u64, u64)>,
}

impl SeqTracker {
    /// A tracker that has applied nothing.
    pub fn new() -> SeqTracker {
        SeqTracker::default()
    }

    /// The last sequence number applied.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// Classifies a live message. Before anything was applied, only batch 0 is next: a later one
    /// means the engine ran before we listened, and its history is worth a replay.
    pub fn live(&self, seq: u64) -> Live {
        let Some(last) = self.last else {
            return if seq == 0 { Live::Next } else { Live::Gap { from: 0 } };
        };
        match last.checked_add(1) {
            Some(next) if seq == next => Live::Next,
            Some(next) if seq > next => Live::Gap { from: next },
            _ if self.replayed.is_some_and(|(lo, hi)| (lo..=hi).contains(&seq)) => Live::Duplicate,
            _ => Live::Restart,
        }
    }

    /// Classifies a replayed batch of a replay that asked for `from` onwards.
    pub fn replayed(&self, seq: u64, from: u64) -> Replayed {
        let next = match self.last {
            Some(last) => match last.checked_add(1) {
                Some(next) => next,
                None => return Replayed::Duplicate,
            },
            None => from,
        };
        if seq < next {
            Replayed::Duplicate
        } else if seq == next {
            Replayed::Next
        } else {
            Replayed::Hole
        }
    }

    /// Records that batch `seq` was applied (or consumed: a malformed batch counts too).
    pub fn applied(&mut self, seq: u64) {
        self.last = Some(seq);
    }

    /// Records that a replay ran because of live message `trigger`: live messages from `trigger`
    /// up to what the replay applied are duplicates.
    pub fn replay_done(&mut self, trigger: u64) {
        self.replayed = self.last.filter(|last| *last >= trigger).map(|last| (trigger, last));
    }

    /// Forgets everything (after a reset of the worker's blocks).
    pub fn reset(&mut self) {
        *self = SeqTracker::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_batch_zero_is_next_and_later_ones_ask_for_history() {
        let t = SeqTracker::new();
        assert_eq!(t.live(0), Live::Next);
        assert_eq!(t.live(7), Live::Gap { from: 0 });
    }

    #[test]
    fn consecutive_gap_and_restart() {
        let mut t = SeqTracker::new();
        t.applied(0);
        t.applied(1);
        assert_eq!(t.live(2), Live::Next);
        assert_eq!(t.live(5), Live::Gap { from: 2 });
        assert_eq!(t.live(1), Live::Restart);
        assert_eq!(t.live(0), Live::Restart);
    }

    #[test]
    fn live_messages_a_replay_delivered_are_duplicates() {
        let mut t = SeqTracker::new();
        t.applied(0);
        // Live 4 arrives: replay 1..=6 (the engine moved on meanwhile), then 4, 5, 6 arrive live.
        assert_eq!(t.live(4), Live::Gap { from: 1 });
        for seq in 1..=6 {
            assert_eq!(t.replayed(seq, 1), Replayed::Next);
            t.applied(seq);
        }
        t.replay_done(4);
        assert_eq!(t.live(4), Live::Duplicate);
        assert_eq!(t.live(6), Live::Duplicate);
        assert_eq!(t.live(7), Live::Next);
        // Below the trigger is not something the replay explains: a restart.
        assert_eq!(t.live(0), Live::Restart);
    }

    #[test]
    fn replay_from_the_start_and_holes() {
        let t = SeqTracker::new();
        assert_eq!(t.replayed(0, 0), Replayed::Next);
        assert_eq!(t.replayed(40, 0), Replayed::Hole);
        let mut t = SeqTracker::new();
        t.applied(10);
        assert_eq!(t.replayed(10, 10), Replayed::Duplicate);
        assert_eq!(t.replayed(11, 10), Replayed::Next);
        assert_eq!(t.replayed(13, 10), Replayed::Hole);
    }

    #[test]
    fn reset_forgets() {
        let mut t = SeqTracker::new();
        t.applied(5);
        t.replay_done(5);
        t.reset();
        assert_eq!(t.last(), None);
        assert_eq!(t.live(0), Live::Next);
    }

    #[test]
    fn maximum_sequence_number_does_not_overflow() {
        let mut t = SeqTracker::new();
        t.applied(u64::MAX);
        assert_eq!(t.live(3), Live::Restart);
        assert_eq!(t.replayed(u64::MAX, 0), Replayed::Duplicate);
    }
}
