//! How the control plane's state reaches every VM of one Envoy: one stream, many readers.
//!
//! Every Envoy worker thread runs its own VM with its own memory, so each needs its own copy of the
//! fleet and the index. One state service (a singleton `envoy.bootstrap.wasm` service with the same
//! `vm_id`) holds the only gRPC stream to the control plane and relays what arrives through Envoy's
//! process-wide shared data; each HTTP filter VM polls a small head key and copies only what changed.
//! Why this pattern and what it costs: `docs/filter-state.md`.
//!
//! Shared-data layout (keys are namespaced by `vm_id` by Envoy):
//! - [`HEAD_KEY`]: [`Head`], 48 bytes: epoch, base and head versions, when the control plane was
//!   last heard from, and a generation counter of model assets;
//! - [`SNAPSHOT_KEY`]: a `StateUpdate` holding the full state at the base version;
//! - `kvmesh.state.delta.<n>`: the delta of version `v` at slot `n = v % RING`;
//! - `kvmesh.assets.<model>`: a model's `ModelAssets` (tokenizer files) as the control plane sent them.
//!
//! The service re-bases (writes a fresh snapshot from its own replica) every [`REBASE_AFTER`]
//! deltas, so a reader at or past the base always finds its missing deltas in the ring. Readers
//! check every value they read (epoch and version inside the update), so racing a rebase or a slot
//! being overwritten costs a retry, never a wrong state.
//!
//! Pure logic over a [`SharedStore`]; the host glue is `service.rs` and `root_context.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};

use kvmesh_proto::v1 as pb;
use pb::state_update::Body;
use prost::Message;

/// The head key.
pub const HEAD_KEY: &str = "kvmesh.state.head";
/// The snapshot key.
pub const SNAPSHOT_KEY: &str = "kvmesh.state.snapshot";
/// Delta slots in the ring.
pub const RING: u64 = 1024;
/// Deltas after the base before the service writes a fresh snapshot (half the ring, so a slot is
/// never overwritten while a reader at or past the base may still need it).
pub const REBASE_AFTER: u64 = RING / 2;
/// Layout version written into the head; a reader of another layout ignores the state.
const LAYOUT: u64 = 1;

/// The key of a delta slot.
pub fn delta_key(version: u64) -> String {
    format!("kvmesh.state.delta.{}", version % RING)
}

/// The key of a model's assets.
pub fn assets_key(model: &str) -> String {
    format!("kvmesh.assets.{model}")
}

/// Envoy's shared data, or a map in tests.
pub trait SharedStore {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Sets `key`; the error says why the host refused.
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), String>;
}

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The bytes are not a `StateUpdate` (or `ModelAssets`).
    #[error("undecodable {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// prost's account.
        #[source]
        source: prost::DecodeError,
    },
    /// The host refused to store a value.
    #[error("shared data refused {key}: {reason}")]
    Store {
        /// The key.
        key: String,
        /// The host's status.
        reason: String,
    },
}

/// The head record, fixed-size little-endian.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Head {
    /// Stream epoch of the control plane replica the state comes from (0: none yet).
    pub epoch: u64,
    /// Version of the snapshot under [`SNAPSHOT_KEY`].
    pub base: u64,
    /// Latest version relayed.
    pub version: u64,
    /// When the service last heard from the control plane (update or heartbeat), host clock ms.
    pub heard_at_ms: u64,
    /// Bumped whenever a model's assets are (re)written.
    pub assets_generation: u64,
}

impl Head {
    const LEN: usize = 48;

    /// The stored form.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let fields = [LAYOUT, self.epoch, self.base, self.version, self.heard_at_ms, self.assets_generation];
        for (chunk, value) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    /// Reads a stored head; `None` for another length or layout.
    pub fn decode(bytes: &[u8]) -> Option<Head> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        (field(0) == LAYOUT).then(|| Head {
            epoch: field(1),
            base: field(2),
            version: field(3),
            heard_at_ms: field(4),
            assets_generation: field(5),
        })
    }
}

/// What the service did with one message from the stream.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Received {
    /// A snapshot replaced the state.
    Snapshot,
    /// A delta was relayed.
    Delta,
    /// A heartbeat: nothing changed, the control plane is alive.
    Heartbeat,
    /// The update does not follow the relayed version (a delta of another epoch, or a skipped
    /// version): re-subscribe from [`Publisher::resume_point`] to get what is missing.
    Gap,
}

/// The state service's side: relays the stream into shared data and keeps a replica to re-base from.
#[derive(Default)]
pub struct Publisher {
    head: Head,
    replica: Replica,
    /// Models whose assets were relayed, with the tokenizer id they had.
    assets: HashMap<String, String>,
}

impl Publisher {
    /// A publisher that has relayed nothing; `head` continues a previous one's counters (a
    /// restarted service keeps readers' assets generation monotonic).
    pub fn new(previous: Option<Head>) -> Publisher {
        let head = Head { assets_generation: previous.map_or(0, |h| h.assets_generation), ..Head::default() };
        Publisher { head, ..Publisher::default() }
    }

    /// Where a new subscription resumes: (epoch, version), (0, 0) for a first one.
    pub fn resume_point(&self) -> (u64, u64) {
        (self.head.epoch, self.head.version)
    }

    /// The current head.
    pub fn head(&self) -> Head {
        self.head
    }

    /// Relays one `StateUpdate` message received at `now_ms`.
    pub fn receive(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
        store: &mut impl SharedStore,
    ) -> Result<Received, RelayError> {
        let update = pb::StateUpdate::decode(bytes)
            .map_err(|source| RelayError::Decode { what: "state update", source })?;
        let received = match &update.body {
            None if update.epoch == self.head.epoch => Received::Heartbeat,
            // A heartbeat of another epoch: the subscription lost track; start over.
            None => return Ok(Received::Gap),
            Some(Body::Snapshot(snapshot)) => {
                self.replica = Replica::from_snapshot(snapshot);
                put(store, SNAPSHOT_KEY, bytes)?;
                self.head.epoch = update.epoch;
                self.head.base = update.version;
                self.head.version = update.version;
                Received::Snapshot
            }
            Some(Body::Delta(delta)) => {
                if update.epoch != self.head.epoch || update.version != self.head.version + 1 {
                    return Ok(Received::Gap);
                }
                self.replica.apply(delta);
                put(store, &delta_key(update.version), bytes)?;
                self.head.version = update.version;
                if self.head.version - self.head.base >= REBASE_AFTER {
                    self.rebase(update.sent_at_ms, store)?;
                }
                Received::Delta
            }
        };
        self.head.heard_at_ms = now_ms;
        put(store, HEAD_KEY, &self.head.encode())?;
        Ok(received)
    }

    /// Writes a snapshot of the replica at the head version and moves the base there.
    fn rebase(&mut self, sent_at_ms: u64, store: &mut impl SharedStore) -> Result<(), RelayError> {
        let update = pb::StateUpdate {
            epoch: self.head.epoch,
            version: self.head.version,
            sent_at_ms,
            body: Some(Body::Snapshot(self.replica.snapshot())),
        };
        put(store, SNAPSHOT_KEY, &update.encode_to_vec())?;
        self.head.base = self.head.version;
        Ok(())
    }

    /// Models that have workers but no relayed assets (fetched once per model and service; a
    /// control plane given new files for a model is picked up when the service restarts).
    pub fn models_missing_assets(&self) -> Vec<String> {
        let mut missing: Vec<String> = self
            .replica
            .workers
            .values()
            .filter(|w| !self.assets.contains_key(&w.model))
            .map(|w| w.model.clone())
            .collect();
        missing.sort();
        missing.dedup();
        missing
    }

    /// Relays a model's `ModelAssets` as the control plane answered them.
    pub fn publish_assets(
        &mut self,
        bytes: &[u8],
        store: &mut impl SharedStore,
    ) -> Result<String, RelayError> {
        let assets = pb::ModelAssets::decode(bytes)
            .map_err(|source| RelayError::Decode { what: "model assets", source })?;
        put(store, &assets_key(&assets.model), bytes)?;
        self.assets.insert(assets.model.clone(), assets.tokenizer_id);
        self.head.assets_generation += 1;
        put(store, HEAD_KEY, &self.head.encode())?;
        Ok(assets.model)
    }
}

fn put(store: &mut impl SharedStore, key: &str, value: &[u8]) -> Result<(), RelayError> {
    store.set(key, value).map_err(|reason| RelayError::Store { key: key.to_owned(), reason })
}

/// The state as of the relayed head, kept by the service to write fresh snapshots.
#[derive(Default)]
struct Replica {
    /// The control plane's block hash version, carried into every snapshot written.
    block_hash_version: u32,
    workers: BTreeMap<u32, pb::WorkerEntry>,
    loads: BTreeMap<u32, pb::WorkerLoadUpdate>,
    blocks: HashMap<u32, HashSet<u64>>,
    policies: BTreeMap<String, pb::PolicyUpdate>,
}

impl Replica {
    fn from_snapshot(snapshot: &pb::Snapshot) -> Replica {
        let mut replica = Replica { block_hash_version: snapshot.block_hash_version, ..Replica::default() };
        for w in &snapshot.workers {
            replica.workers.insert(w.handle, w.clone());
        }
        for l in &snapshot.loads {
            replica.loads.insert(l.handle, *l);
        }
        replica.apply_index(&snapshot.index);
        for p in &snapshot.policies {
            replica.policies.insert(p.model.clone(), p.clone());
        }
        replica
    }

    fn apply(&mut self, delta: &pb::Delta) {
        for w in &delta.upserted {
            self.workers.insert(w.handle, w.clone());
        }
        for handle in &delta.removed_workers {
            self.workers.remove(handle);
            self.loads.remove(handle);
            self.blocks.remove(handle);
        }
        for l in &delta.loads {
            self.loads.insert(l.handle, *l);
        }
        self.apply_index(&delta.index);
        for p in &delta.policies {
            self.policies.insert(p.model.clone(), p.clone());
        }
    }

    fn apply_index(&mut self, updates: &[pb::IndexUpdate]) {
        for u in updates {
            let set = self.blocks.entry(u.handle).or_default();
            if u.cleared {
                set.clear();
            }
            for h in &u.removed {
                set.remove(h);
            }
            set.extend(u.stored.iter().copied());
        }
    }

    fn snapshot(&self) -> pb::Snapshot {
        pb::Snapshot {
            block_hash_version: self.block_hash_version,
            workers: self.workers.values().cloned().collect(),
            loads: self.loads.values().copied().collect(),
            index: self
                .blocks
                .iter()
                .filter(|(_, set)| !set.is_empty())
                .map(|(&handle, set)| {
                    let mut stored: Vec<u64> = set.iter().copied().collect();
                    stored.sort_unstable();
                    pb::IndexUpdate { handle, cleared: false, removed: Vec::new(), stored }
                })
                .collect(),
            policies: self.policies.values().cloned().collect(),
        }
    }
}

/// What a reader applies state to (a VM's router; a recorder in tests).
pub trait ApplyState {
    /// Forgets every worker, block and policy the control plane gave (a snapshot follows).
    fn reset(&mut self);
    /// Applies a snapshot or a delta, in version order.
    fn apply(&mut self, body: &Body);
}

/// What one poll found.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Polled {
    /// A snapshot was applied (first state, a new epoch, or the reader fell behind the ring).
    pub snapshot: bool,
    /// Deltas applied.
    pub deltas: u32,
    /// Model assets changed since the last poll: load what is newly there.
    pub assets_changed: bool,
    /// Updates that could not be decoded (skipped; the next snapshot repairs the state).
    pub malformed: u32,
}

/// An HTTP filter VM's side: follows the relayed state.
#[derive(Clone, Copy, Debug, Default)]
pub struct Follower {
    epoch: u64,
    version: u64,
    heard_at_ms: Option<u64>,
    assets_generation: u64,
}

impl Follower {
    /// When the state service last heard from the control plane (`None`: never).
    pub fn heard_at_ms(&self) -> Option<u64> {
        self.heard_at_ms
    }

    /// The (epoch, version) applied.
    pub fn position(&self) -> (u64, u64) {
        (self.epoch, self.version)
    }

    /// Catches up with the relayed state.
    pub fn poll(&mut self, store: &impl SharedStore, target: &mut impl ApplyState) -> Polled {
        let mut polled = Polled::default();
        let Some(head) = store.get(HEAD_KEY).as_deref().and_then(Head::decode) else { return polled };
        if head.heard_at_ms > 0 {
            self.heard_at_ms = Some(head.heard_at_ms);
        }
        if head.assets_generation != self.assets_generation {
            self.assets_generation = head.assets_generation;
            polled.assets_changed = true;
        }
        if head.epoch == 0 || (head.epoch == self.epoch && head.version == self.version) {
            return polled;
        }
        let resumable = head.epoch == self.epoch && self.version >= head.base && self.version < head.version;
        if !resumable && !self.load_snapshot(store, target, &mut polled) {
            return polled;
        }
        // Every delta after the applied version that is in the ring; stop at the first missing or
        // foreign one (a rebase or an overwrite raced this read: the next poll goes on).
        loop {
            let next = self.version + 1;
            let Some(bytes) = store.get(&delta_key(next)) else { break };
            let update = match pb::StateUpdate::decode(bytes.as_slice()) {
                Ok(update) => update,
                Err(_) => {
                    polled.malformed += 1;
                    break;
                }
            };
            if update.epoch != self.epoch || update.version != next {
                break;
            }
            if let Some(body) = &update.body {
                target.apply(body);
            }
            self.version = next;
            polled.deltas += 1;
        }
        polled
    }

    /// Replaces the state with the relayed snapshot; false when there is none usable.
    fn load_snapshot(
        &mut self,
        store: &impl SharedStore,
        target: &mut impl ApplyState,
        polled: &mut Polled,
    ) -> bool {
        let Some(bytes) = store.get(SNAPSHOT_KEY) else { return false };
        let update = match pb::StateUpdate::decode(bytes.as_slice()) {
            Ok(update) => update,
            Err(_) => {
                polled.malformed += 1;
                return false;
            }
        };
        let Some(body @ Body::Snapshot(_)) = &update.body else { return false };
        target.reset();
        target.apply(body);
        self.epoch = update.epoch;
        self.version = update.version;
        polled.snapshot = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Map(HashMap<String, Vec<u8>>);

    impl SharedStore for Map {
        fn get(&self, key: &str) -> Option<Vec<u8>> {
            self.0.get(key).cloned()
        }
        fn set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
            self.0.insert(key.to_owned(), value.to_vec());
            Ok(())
        }
    }

    /// Rebuilds what the control plane sent: workers and block sets by handle.
    #[derive(Default, PartialEq, Debug)]
    struct View {
        workers: BTreeMap<u32, String>,
        blocks: BTreeMap<u32, std::collections::BTreeSet<u64>>,
        resets: u32,
    }

    impl ApplyState for View {
        fn reset(&mut self) {
            self.workers.clear();
            self.blocks.clear();
            self.resets += 1;
        }
        fn apply(&mut self, body: &Body) {
            let (upserted, removed, index): (&[pb::WorkerEntry], &[u32], &[pb::IndexUpdate]) = match body {
                Body::Snapshot(s) => (&s.workers, &[], &s.index),
                Body::Delta(d) => (&d.upserted, &d.removed_workers, &d.index),
            };
            for w in upserted {
                self.workers.insert(w.handle, w.worker_id.clone());
            }
            for h in removed {
                self.workers.remove(h);
                self.blocks.remove(h);
            }
            for u in index {
                let set = self.blocks.entry(u.handle).or_default();
                if u.cleared {
                    set.clear();
                }
                for h in &u.removed {
                    set.remove(h);
                }
                set.extend(&u.stored);
            }
            self.blocks.retain(|_, s| !s.is_empty());
        }
    }

    fn worker(handle: u32, model: &str) -> pb::WorkerEntry {
        pb::WorkerEntry {
            handle,
            worker_id: format!("w{handle}"),
            address: format!("127.0.0.1:{}", 9000 + handle),
            model: model.to_owned(),
            block_size: 16,
            ..pb::WorkerEntry::default()
        }
    }

    fn snapshot(epoch: u64, version: u64, workers: Vec<pb::WorkerEntry>) -> Vec<u8> {
        let body = Body::Snapshot(pb::Snapshot { workers, ..pb::Snapshot::default() });
        pb::StateUpdate { epoch, version, sent_at_ms: 1, body: Some(body) }.encode_to_vec()
    }

    fn stored(epoch: u64, version: u64, handle: u32, blocks: &[u64]) -> Vec<u8> {
        let index = vec![pb::IndexUpdate { handle, stored: blocks.to_vec(), ..pb::IndexUpdate::default() }];
        let body = Body::Delta(pb::Delta { index, ..pb::Delta::default() });
        pb::StateUpdate { epoch, version, sent_at_ms: 1, body: Some(body) }.encode_to_vec()
    }

    fn heartbeat(epoch: u64, version: u64) -> Vec<u8> {
        pb::StateUpdate { epoch, version, sent_at_ms: 1, body: None }.encode_to_vec()
    }

    #[test]
    fn head_round_trips_and_rejects_other_layouts() {
        let head = Head { epoch: 7, base: 3, version: 9, heard_at_ms: 1234, assets_generation: 2 };
        assert_eq!(Head::decode(&head.encode()), Some(head));
        let mut other = head.encode();
        other[0] = 9;
        assert_eq!(Head::decode(&other), None);
        assert_eq!(Head::decode(&[0; 8]), None);
    }

    #[test]
    fn reader_follows_snapshot_deltas_and_heartbeats() {
        let (mut store, mut publisher) = (Map::default(), Publisher::new(None));
        let (mut follower, mut view) = (Follower::default(), View::default());
        assert_eq!(follower.poll(&store, &mut view), Polled::default(), "nothing relayed yet");

        let r = publisher.receive(&snapshot(5, 10, vec![worker(1, "m"), worker(2, "m")]), 100, &mut store);
        assert_eq!(r.expect("relayed"), Received::Snapshot);
        publisher.receive(&stored(5, 11, 1, &[1, 2, 3]), 110, &mut store).expect("relayed");
        let polled = follower.poll(&store, &mut view);
        assert!(polled.snapshot && polled.deltas == 1, "{polled:?}");
        assert_eq!(view.blocks[&1], [1, 2, 3].into());
        assert_eq!(follower.position(), (5, 11));

        assert_eq!(publisher.receive(&heartbeat(5, 11), 900, &mut store).expect("ok"), Received::Heartbeat);
        let polled = follower.poll(&store, &mut view);
        assert_eq!((polled.snapshot, polled.deltas), (false, 0));
        assert_eq!(follower.heard_at_ms(), Some(900));
        assert_eq!(publisher.resume_point(), (5, 11));
    }

    #[test]
    fn skipped_version_or_foreign_epoch_is_a_gap_and_changes_nothing() {
        let (mut store, mut publisher) = (Map::default(), Publisher::new(None));
        publisher.receive(&snapshot(5, 10, vec![worker(1, "m")]), 1, &mut store).expect("relayed");
        assert_eq!(publisher.receive(&stored(5, 12, 1, &[1]), 2, &mut store).expect("ok"), Received::Gap);
        assert_eq!(publisher.receive(&stored(6, 11, 1, &[1]), 2, &mut store).expect("ok"), Received::Gap);
        assert_eq!(publisher.receive(&heartbeat(6, 11), 2, &mut store).expect("ok"), Received::Gap);
        assert_eq!(publisher.resume_point(), (5, 10));
        assert!(publisher.receive(b"\xff\xff", 2, &mut store).is_err(), "garbage is an error, not a panic");
    }

    #[test]
    fn reader_far_behind_recovers_through_a_rebased_snapshot() {
        let (mut store, mut publisher) = (Map::default(), Publisher::new(None));
        let (mut follower, mut view) = (Follower::default(), View::default());
        publisher.receive(&snapshot(1, 0, vec![worker(1, "m")]), 1, &mut store).expect("relayed");
        follower.poll(&store, &mut view);
        // Many more deltas than the ring holds while this reader does not poll.
        let n = RING * 3 + 7;
        for v in 1..=n {
            publisher.receive(&stored(1, v, 1, &[v]), 2, &mut store).expect("relayed");
        }
        let polled = follower.poll(&store, &mut view);
        assert!(polled.snapshot, "fell behind the ring: {polled:?}");
        assert_eq!(follower.position(), (1, n));
        let want: std::collections::BTreeSet<u64> = (1..=n).collect();
        assert_eq!(view.blocks[&1], want);
        assert_eq!(view.workers[&1], "w1");
    }

    #[test]
    fn new_epoch_replaces_the_state() {
        let (mut store, mut publisher) = (Map::default(), Publisher::new(None));
        let (mut follower, mut view) = (Follower::default(), View::default());
        publisher.receive(&snapshot(1, 4, vec![worker(1, "m")]), 1, &mut store).expect("relayed");
        publisher.receive(&stored(1, 5, 1, &[9]), 1, &mut store).expect("relayed");
        follower.poll(&store, &mut view);
        // The control plane restarted: a new epoch, a smaller version, another fleet.
        publisher.receive(&snapshot(2, 1, vec![worker(3, "m")]), 2, &mut store).expect("relayed");
        let polled = follower.poll(&store, &mut view);
        assert!(polled.snapshot);
        assert_eq!(view.workers.keys().copied().collect::<Vec<_>>(), [3]);
        assert!(view.blocks.is_empty());
        assert_eq!(view.resets, 2);
    }

    #[test]
    fn rebased_snapshots_keep_the_control_planes_block_hash_version() {
        let (mut store, mut publisher) = (Map::default(), Publisher::new(None));
        let body = Body::Snapshot(pb::Snapshot {
            workers: vec![worker(1, "m")],
            block_hash_version: 7,
            ..pb::Snapshot::default()
        });
        let bytes = pb::StateUpdate { epoch: 1, version: 0, sent_at_ms: 1, body: Some(body) }.encode_to_vec();
        publisher.receive(&bytes, 1, &mut store).expect("relayed");
        for v in 1..=REBASE_AFTER {
            publisher.receive(&stored(1, v, 1, &[v]), 2, &mut store).expect("relayed");
        }
        let relayed = pb::StateUpdate::decode(store.get(SNAPSHOT_KEY).expect("a snapshot").as_slice())
            .expect("decodes");
        assert_eq!(relayed.version, REBASE_AFTER, "rebased");
        let Some(Body::Snapshot(snapshot)) = relayed.body else { panic!("not a snapshot") };
        assert_eq!(snapshot.block_hash_version, 7);
    }

    #[test]
    fn removed_worker_leaves_rebased_snapshots() {
        let (mut store, mut publisher) = (Map::default(), Publisher::new(None));
        publisher.receive(&snapshot(1, 0, vec![worker(1, "m"), worker(2, "m")]), 1, &mut store).expect("ok");
        publisher.receive(&stored(1, 1, 2, &[5, 6]), 1, &mut store).expect("ok");
        let gone = Body::Delta(pb::Delta { removed_workers: vec![2], ..pb::Delta::default() });
        let bytes = pb::StateUpdate { epoch: 1, version: 2, sent_at_ms: 1, body: Some(gone) }.encode_to_vec();
        publisher.receive(&bytes, 1, &mut store).expect("ok");
        let snap = publisher.replica.snapshot();
        assert_eq!(snap.workers.iter().map(|w| w.handle).collect::<Vec<_>>(), [1]);
        assert!(snap.index.is_empty());
    }

    #[test]
    fn assets_are_fetched_once_per_model_and_bump_the_generation() {
        let (mut store, mut publisher) = (Map::default(), Publisher::new(None));
        let (mut follower, mut view) = (Follower::default(), View::default());
        publisher
            .receive(&snapshot(1, 0, vec![worker(1, "a"), worker(2, "b"), worker(3, "a")]), 1, &mut store)
            .expect("ok");
        assert_eq!(publisher.models_missing_assets(), ["a", "b"]);
        follower.poll(&store, &mut view);
        let assets = pb::ModelAssets { model: "a".into(), block_size: 16, ..pb::ModelAssets::default() };
        assert_eq!(publisher.publish_assets(&assets.encode_to_vec(), &mut store).expect("ok"), "a");
        assert_eq!(publisher.models_missing_assets(), ["b"]);
        assert!(store.get(&assets_key("a")).is_some());
        assert!(follower.poll(&store, &mut view).assets_changed);
        assert!(!follower.poll(&store, &mut view).assets_changed);
    }
}
