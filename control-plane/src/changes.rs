//! Fleet changes waiting to go out on the state stream, coalesced per worker handle.
//!
//! The stream carries block *presence* per worker (a block a worker holds two copies of is sent
//! once), so that a filter's replica stays a plain set however the engine's copies come and go.
//! Within one window only a block's final presence matters; a filter applies an [`pb::IndexUpdate`]
//! as cleared, then removed, then stored, so a clear drops every earlier change of that worker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::block_map::{self, BlockMap};
use kvmesh_proto::v1 as pb;

/// Index changes of one worker within a window.
#[derive(Debug, Default)]
struct IndexChange {
    cleared: bool,
    /// (block, present after the change), in arrival order.
    log: Vec<(u64, bool)>,
}

/// Pending changes since the last delta.
#[derive(Debug, Default)]
pub struct Changes {
    upserted: BTreeMap<u32, pb::WorkerEntry>,
    removed: BTreeSet<u32>,
    loads: BTreeMap<u32, pb::WorkerLoadUpdate>,
    index: BTreeMap<u32, IndexChange>,
    policies: BTreeMap<String, String>,
    /// When the oldest pending change was made (for the event-to-stream lag).
    first_at: Option<Instant>,
}

impl Changes {
    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty()
            && self.removed.is_empty()
            && self.loads.is_empty()
            && self.index.is_empty()
            && self.policies.is_empty()
    }

    /// When the oldest pending change was made, if any is pending.
    pub fn first_at(&self) -> Option<Instant> {
        self.first_at
    }

    fn touch(&mut self, now: Instant) {
        self.first_at.get_or_insert(now);
    }

    /// A worker was added or its entry changed.
    pub fn upsert(&mut self, entry: pb::WorkerEntry, now: Instant) {
        self.touch(now);
        self.upserted.insert(entry.handle, entry);
    }

    /// A worker left; its pending changes are dropped.
    pub fn remove_worker(&mut self, handle: u32, now: Instant) {
        self.touch(now);
        self.upserted.remove(&handle);
        self.loads.remove(&handle);
        self.index.remove(&handle);
        self.removed.insert(handle);
    }

    /// A worker's load changed (the last report in a window wins).
    pub fn load(&mut self, update: pb::WorkerLoadUpdate, now: Instant) {
        self.touch(now);
        self.loads.insert(update.handle, update);
    }

    /// A worker's whole block set was dropped.
    pub fn cleared(&mut self, handle: u32, now: Instant) {
        self.touch(now);
        let change = self.index.entry(handle).or_default();
        change.cleared = true;
        change.log.clear();
    }

    /// A worker now holds `block`, or (`present` false) no longer does.
    pub fn block(&mut self, handle: u32, block: u64, present: bool, now: Instant) {
        self.touch(now);
        self.index.entry(handle).or_default().log.push((block, present));
    }

    /// A model's routing policy changed.
    pub fn policy(&mut self, model: &str, config_json: String, now: Instant) {
        self.touch(now);
        self.policies.insert(model.to_owned(), config_json);
    }

    /// Takes everything pending as one delta, leaving nothing pending.
    pub fn take_delta(&mut self) -> pb::Delta {
        let taken = std::mem::take(self);
        let index = taken
            .index
            .into_iter()
            .filter_map(|(handle, change)| {
                let update = coalesce(handle, change);
                (update.cleared || !update.removed.is_empty() || !update.stored.is_empty()).then_some(update)
            })
            .collect();
        pb::Delta {
            upserted: taken.upserted.into_values().collect(),
            removed_workers: taken.removed.into_iter().collect(),
            loads: taken.loads.into_values().collect(),
            index,
            policies: taken
                .policies
                .into_iter()
                .map(|(model, config_json)| pb::PolicyUpdate { model, config_json })
                .collect(),
        }
    }
}

/// One worker's window of changes as the final presence of each block, in first-seen order.
fn coalesce(handle: u32, change: IndexChange) -> pb::IndexUpdate {
    let mut last: BlockMap<bool> = block_map::with_capacity(change.log.len());
    for &(block, present) in &change.log {
        last.insert(block, present);
    }
    let (mut stored, mut removed) = (Vec::new(), Vec::new());
    for (block, _) in change.log {
        // Emit each block once, at its first appearance, with its final presence.
        if let Some(present) = last.remove(&block) {
            if present {
                stored.push(block);
            } else {
                removed.push(block);
            }
        }
    }
    pb::IndexUpdate { handle, cleared: change.cleared, removed, stored }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_presence_wins_within_a_window() {
        let now = Instant::now();
        let mut c = Changes::default();
        c.block(1, 10, true, now);
        c.block(1, 11, true, now);
        c.block(1, 10, false, now);
        c.block(1, 12, false, now);
        c.block(1, 12, true, now);
        let d = c.take_delta();
        assert_eq!(
            d.index,
            vec![pb::IndexUpdate { handle: 1, cleared: false, removed: vec![10], stored: vec![11, 12] }]
        );
        assert!(c.is_empty());
    }

    #[test]
    fn clear_drops_earlier_changes_of_the_worker() {
        let now = Instant::now();
        let mut c = Changes::default();
        c.block(2, 1, true, now);
        c.cleared(2, now);
        c.block(2, 3, true, now);
        let d = c.take_delta();
        assert_eq!(
            d.index,
            vec![pb::IndexUpdate { handle: 2, cleared: true, removed: vec![], stored: vec![3] }]
        );
    }

    #[test]
    fn removed_worker_takes_its_pending_changes_along() {
        let now = Instant::now();
        let mut c = Changes::default();
        c.upsert(pb::WorkerEntry { handle: 4, ..Default::default() }, now);
        c.load(pb::WorkerLoadUpdate { handle: 4, running: 1, ..Default::default() }, now);
        c.block(4, 9, true, now);
        c.remove_worker(4, now);
        let d = c.take_delta();
        assert!(d.upserted.is_empty() && d.loads.is_empty() && d.index.is_empty());
        assert_eq!(d.removed_workers, vec![4]);
    }

    #[test]
    fn first_change_time_is_kept_until_taken() {
        let t0 = Instant::now();
        let mut c = Changes::default();
        assert!(c.first_at().is_none());
        c.block(1, 1, true, t0);
        c.block(1, 2, true, t0 + std::time::Duration::from_millis(5));
        assert_eq!(c.first_at(), Some(t0));
        c.take_delta();
        assert!(c.first_at().is_none());
    }
}
