//! The fleet as this control plane knows it: the worker registry (heartbeats, expiry, operator
//! state, roles), each worker's block set with its (epoch, seq) position, the fleet prefix index,
//! the load view and the routing policies. Everything here is synchronous and takes the time as an
//! argument, so the rules are unit-tested without NATS.
//!
//! Rules (the wire contract is `proto/kvmesh/v1/fleet.proto`):
//! - A worker joins the fleet (and the index, and the state stream) with its first heartbeat, and
//!   leaves when no heartbeat came for its ttl. Events and resync answers of a worker not yet
//!   registered are kept aside and indexed when it registers.
//! - A new epoch (agent restart) resets the worker's blocks. Batches apply in seq order; a gap, a
//!   first batch that does not start the epoch, or a heartbeat whose `kv_seq` is ahead of what was
//!   applied asks for a resync. Batches that arrive while a resync is under way are held and
//!   replayed on top of the answer (those it already covers are dropped).
//! - A resync answer replaces the worker's block set; only the difference touches the index and
//!   the stream.
//!
//! Each worker's reported blocks are kept here as well as in the index: the state stream's snapshot
//! must list a worker's blocks and `PrefixIndex` cannot enumerate them. Those sets are also what the
//! stream mirrors, so a block the index dropped for capacity still reaches filters, which bound
//! their own replica.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::block_map::{self, BlockMap};
use kvmesh_core::{
    BlockHash, Fleet, Role, RoutingConfig, WorkerId, WorkerInfo, WorkerLoad, WorkerSlot, WorkerState,
    fleet::Engine, load::GpuStats,
};
use kvmesh_proto::v1 as pb;
use pb::kv_event::Kind;
use serde::Serialize;

use crate::changes::Changes;
use crate::wire;

/// Settings of the registry and resync rules.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Most distinct blocks the index holds (and most any one worker's set holds).
    pub max_blocks: usize,
    /// Expiry when a heartbeat gives no ttl, and of workers never registered.
    pub default_ttl: Duration,
    /// First wait for a resync answer.
    pub resync_timeout: Duration,
    /// Longest wait between repeated resync requests.
    pub resync_max_backoff: Duration,
    /// Batches held per worker during a resync.
    pub buffer_batches: usize,
}

impl Default for Settings {
    fn default() -> Self {
        use crate::config::defaults as d;
        Settings {
            max_blocks: d::INDEX_MAX_BLOCKS,
            default_ttl: Duration::from_millis(d::WORKER_TTL_MS),
            resync_timeout: Duration::from_millis(d::RESYNC_TIMEOUT_MS),
            resync_max_backoff: Duration::from_millis(d::RESYNC_MAX_BACKOFF_MS),
            buffer_batches: d::RESYNC_BUFFER_BATCHES,
        }
    }
}

/// Why a resync was asked for.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum ResyncReason {
    /// A batch's seq skipped some.
    Gap,
    /// A heartbeat's `kv_seq` is ahead of what was applied.
    HeartbeatAhead,
    /// The earlier request was not answered in time.
    Retry,
    /// A resync answer came in pieces that do not fit together.
    BadAnswer,
    /// Batches arrived faster than the resync could be answered and the buffer overflowed.
    BufferOverflow,
}

impl ResyncReason {
    /// Label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            ResyncReason::Gap => "gap",
            ResyncReason::HeartbeatAhead => "heartbeat_ahead",
            ResyncReason::Retry => "retry",
            ResyncReason::BadAnswer => "bad_answer",
            ResyncReason::BufferOverflow => "buffer_overflow",
        }
    }
}

/// A resync request the caller should send (on `kvmesh.<ns>.resync.<worker>`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ResyncNeeded {
    /// The worker to ask.
    pub worker: WorkerId,
    /// Why.
    pub reason: ResyncReason,
}

/// Why a message was not applied although it decoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Rejected {
    /// The worker id is empty.
    NoWorkerId,
    /// A resync chunk's `copies` list is longer than its `blocks`.
    CopiesMismatch,
}

/// Counters of what ingest did (exported as metrics).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    /// KV event batches applied.
    pub batches_applied: u64,
    /// KV events (stored, removed, cleared) applied.
    pub events_applied: u64,
    /// Block hashes in applied stored and removed events.
    pub block_events_applied: u64,
    /// Batches ignored as already applied (seq at or below the applied one).
    pub stale_batches: u64,
    /// Removals of blocks the worker's set did not hold.
    pub unknown_removals: u64,
    /// Blocks refused because a worker's set reached the index capacity.
    pub blocks_over_capacity: u64,
    /// Resync requests asked for, by reason label.
    pub resyncs_requested: BTreeMap<&'static str, u64>,
    /// Resync answers applied.
    pub resyncs_completed: u64,
    /// Workers that expired.
    pub workers_expired: u64,
}

/// What a heartbeat says a worker is.
#[derive(Clone, PartialEq, Debug)]
struct Registration {
    address: String,
    model: String,
    engine: Engine,
    role: Role,
    block_size: u32,
    tokenizer_id: String,
    lora_adapters: Vec<String>,
    ttl: Duration,
}

/// A resync answer being collected.
#[derive(Debug)]
struct Assembly {
    /// Which request it answers (the reply subject's tag).
    tag: u64,
    epoch: u64,
    seq: u64,
    next_chunk: u32,
    blocks: BlockMap<u16>,
}

/// Where a worker's resync stands.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Resync {
    /// Nothing asked.
    Idle,
    /// Asked at `since`; asked again after `wait`.
    Pending { since: Instant, wait: Duration },
}

/// Everything known about one worker.
#[derive(Debug)]
struct WorkerRecord {
    registration: Option<Registration>,
    /// Place in the fleet table and index, once registered.
    slot: Option<WorkerSlot>,
    /// Stream handle, once registered; never reused within a stream epoch.
    handle: Option<u32>,
    epoch: Option<u64>,
    applied_seq: u64,
    /// Reported blocks and copies of each.
    blocks: BlockMap<u16>,
    /// XOR of the mixed hashes of `blocks`' keys: equal sets give equal digests, so two replicas
    /// can compare block sets through the admin API.
    digest: u64,
    last_seen: Instant,
    /// Operator's cordon/drain.
    state: WorkerState,
    /// Operator's role, over the registered one.
    role_override: Option<Role>,
    load: WorkerLoad,
    resync: Resync,
    buffered: VecDeque<pb::KvEventBatch>,
    assemblies: Vec<Assembly>,
}

impl WorkerRecord {
    fn new(now: Instant) -> Self {
        WorkerRecord {
            registration: None,
            slot: None,
            handle: None,
            epoch: None,
            applied_seq: 0,
            blocks: BlockMap::default(),
            digest: 0,
            last_seen: now,
            state: WorkerState::Ready,
            role_override: None,
            load: WorkerLoad::default(),
            resync: Resync::Idle,
            buffered: VecDeque::new(),
            assemblies: Vec::new(),
        }
    }

    fn role(&self) -> Role {
        self.role_override.or(self.registration.as_ref().map(|r| r.role)).unwrap_or_default()
    }

    fn ttl(&self, default: Duration) -> Duration {
        self.registration.as_ref().map_or(default, |r| r.ttl)
    }

    fn info(&self, id: &WorkerId) -> Option<WorkerInfo> {
        let r = self.registration.as_ref()?;
        Some(WorkerInfo {
            id: id.clone(),
            address: r.address.clone(),
            model: r.model.clone(),
            engine: r.engine,
            role: self.role(),
            block_size: r.block_size,
            state: self.state,
        })
    }

    fn entry(&self, id: &WorkerId) -> Option<pb::WorkerEntry> {
        let (r, handle) = (self.registration.as_ref()?, self.handle?);
        Some(pb::WorkerEntry {
            handle,
            worker_id: id.0.clone(),
            address: r.address.clone(),
            model: r.model.clone(),
            engine: wire::engine_to_wire(r.engine),
            role: wire::role_to_wire(self.role()),
            block_size: r.block_size,
            state: wire::state_to_wire(self.state),
            tokenizer_id: r.tokenizer_id.clone(),
        })
    }

    fn load_update(&self) -> Option<pb::WorkerLoadUpdate> {
        Some(pb::WorkerLoadUpdate {
            handle: self.handle?,
            running: self.load.running,
            waiting: self.load.waiting,
            kv_usage: self.load.kv_usage,
            kv_capacity_blocks: self.load.kv_capacity_blocks,
        })
    }
}

/// Spreads a block hash before it is folded into a digest (block hashes are uniform, but tests
/// use small ones, and XOR of raw small values cancels too easily).
fn mix(h: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&h.to_le_bytes())
}

/// A worker as the admin API lists it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerView {
    /// Stable identity.
    pub id: String,
    /// Whether a heartbeat registered it (unregistered workers are known only from events).
    pub registered: bool,
    /// `ip:port`.
    pub address: Option<String>,
    /// Served model.
    pub model: Option<String>,
    /// Engine.
    pub engine: Option<Engine>,
    /// Role in force (operator's override, else registered).
    pub role: Role,
    /// Operator's override of the role, if any.
    pub role_override: Option<Role>,
    /// Ready, cordoned or draining.
    pub state: WorkerState,
    /// Tokens per block.
    pub block_size: Option<u32>,
    /// Tokenizer files' identity, as the worker registered it.
    pub tokenizer_id: Option<String>,
    /// LoRA adapters loaded.
    pub lora_adapters: Vec<String>,
    /// Stream handle.
    pub handle: Option<u32>,
    /// Agent incarnation.
    pub epoch: Option<u64>,
    /// Last applied KV batch seq.
    pub kv_seq: u64,
    /// Whether a resync is under way.
    pub resyncing: bool,
    /// Blocks held.
    pub blocks: u64,
    /// Latest load.
    pub load: WorkerLoad,
    /// Milliseconds since the last heartbeat (or, unregistered, the last message).
    pub last_seen_ms: u64,
    /// Expiry, milliseconds.
    pub ttl_ms: u64,
}

/// One worker's part of the index statistics.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WorkerIndexStats {
    /// Distinct blocks of the worker in the index.
    pub blocks: u64,
    /// Distinct blocks the worker reported (differs from `blocks` only when the index dropped some
    /// for capacity).
    pub reported_blocks: u64,
    /// Digest of the reported block set (hex): equal on two replicas that agree.
    pub digest: String,
    /// Agent incarnation.
    pub epoch: Option<u64>,
    /// Last applied KV batch seq.
    pub kv_seq: u64,
}

/// The index statistics the admin API serves.
#[derive(Clone, Debug, Serialize)]
pub struct IndexStatsView {
    /// Distinct blocks indexed.
    pub blocks: u64,
    /// (worker, block) pairs indexed.
    pub placements: u64,
    /// Bytes the index has allocated.
    pub bytes: u64,
    /// Bytes per distinct block (0 when empty).
    pub bytes_per_block: f64,
    /// Capacity in distinct blocks.
    pub max_blocks: u64,
    /// Blocks dropped for capacity since start.
    pub evicted_blocks: u64,
    /// Removals of blocks the index did not hold.
    pub unknown_removals: u64,
    /// Registered workers by id.
    pub workers: BTreeMap<String, WorkerIndexStats>,
}

/// The fleet state of one control plane.
#[derive(Debug)]
pub struct FleetState {
    settings: Settings,
    fleet: Fleet,
    index: kvmesh_core::PrefixIndex,
    records: BTreeMap<WorkerId, WorkerRecord>,
    policies: BTreeMap<String, RoutingConfig>,
    changes: Changes,
    next_handle: u32,
    /// While set (until this instant), gaps of workers not yet heard of wait for the `resync.all`
    /// answers instead of asking each worker.
    global_resync_until: Option<Instant>,
    counters: Counters,
}

impl FleetState {
    /// An empty fleet with these settings and routing policies per model.
    pub fn new(settings: Settings, policies: BTreeMap<String, RoutingConfig>) -> Self {
        FleetState {
            index: kvmesh_core::PrefixIndex::new(settings.max_blocks),
            settings,
            fleet: Fleet::new(),
            records: BTreeMap::new(),
            policies,
            changes: Changes::default(),
            next_handle: 1,
            global_resync_until: None,
            counters: Counters::default(),
        }
    }

    /// The fleet table.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The fleet prefix index.
    pub fn index(&self) -> &kvmesh_core::PrefixIndex {
        &self.index
    }

    /// What ingest has done so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Pending stream changes.
    pub fn changes_mut(&mut self) -> &mut Changes {
        &mut self.changes
    }

    /// Routing configuration of every configured (or policy-set) model.
    pub fn policies(&self) -> &BTreeMap<String, RoutingConfig> {
        &self.policies
    }

    /// Routing configuration of a model (its default when none is set).
    pub fn policy(&self, model: &str) -> RoutingConfig {
        self.policies.get(model).copied().unwrap_or_default()
    }

    /// Workers known, registered or not.
    pub fn known_workers(&self) -> usize {
        self.records.len()
    }

    /// Marks the start of a `resync.all`: until `until`, a worker first heard of through a batch
    /// that does not start its epoch waits for that answer rather than being asked on its own.
    pub fn begin_global_resync(&mut self, until: Instant) {
        self.global_resync_until = Some(until);
    }

    fn note_resync(&mut self, worker: &WorkerId, reason: ResyncReason, now: Instant) -> ResyncNeeded {
        *self.counters.resyncs_requested.entry(reason.label()).or_default() += 1;
        if let Some(rec) = self.records.get_mut(worker) {
            let wait = match rec.resync {
                Resync::Pending { wait, .. } if reason == ResyncReason::Retry => {
                    (wait * 2).min(self.settings.resync_max_backoff)
                }
                _ => self.settings.resync_timeout,
            };
            rec.resync = Resync::Pending { since: now, wait };
        }
        ResyncNeeded { worker: worker.clone(), reason }
    }

    /// Applies a heartbeat: registers or refreshes the worker. May ask for a resync.
    pub fn apply_heartbeat(
        &mut self,
        hb: pb::Heartbeat,
        now: Instant,
    ) -> Result<Option<ResyncNeeded>, Rejected> {
        if hb.worker_id.is_empty() {
            return Err(Rejected::NoWorkerId);
        }
        let id = WorkerId(hb.worker_id.clone());
        let ttl = if hb.ttl_ms == 0 {
            self.settings.default_ttl
        } else {
            Duration::from_millis(u64::from(hb.ttl_ms))
        };
        let registration = Registration {
            address: hb.address,
            model: hb.model,
            engine: wire::engine_from_wire(hb.engine),
            role: wire::role_from_wire(hb.role),
            block_size: hb.block_size,
            tokenizer_id: hb.tokenizer_id,
            lora_adapters: hb.lora_adapters,
            ttl,
        };
        let rec = self.records.entry(id.clone()).or_insert_with(|| WorkerRecord::new(now));
        rec.last_seen = now;
        let mut need = None;
        if rec.epoch != Some(hb.epoch) {
            let first_contact = rec.epoch.is_none();
            self.reset_epoch(&id, hb.epoch, now);
            if hb.kv_seq > 0 {
                // Batches of this epoch were published that we never saw (or, on first contact,
                // before we started): only a resync tells what they did.
                need = Some(if first_contact { ResyncReason::Gap } else { ResyncReason::HeartbeatAhead });
            }
        } else if let Some(rec) = self.records.get(&id)
            && hb.kv_seq > rec.applied_seq
            && rec.resync == Resync::Idle
        {
            need = Some(ResyncReason::HeartbeatAhead);
        }
        let Some(rec) = self.records.get_mut(&id) else { return Ok(None) };
        let changed = rec.registration.as_ref() != Some(&registration);
        rec.registration = Some(registration);
        if rec.slot.is_none() {
            self.register(&id, now);
        } else if changed {
            self.push_registration(&id, now);
        }
        Ok(need.and_then(|reason| self.ask_resync(&id, reason, now)))
    }

    /// Asks for a resync unless one is pending or a `resync.all` answer is still expected.
    fn ask_resync(&mut self, id: &WorkerId, reason: ResyncReason, now: Instant) -> Option<ResyncNeeded> {
        let rec = self.records.get_mut(id)?;
        if let Resync::Pending { .. } = rec.resync {
            return None;
        }
        if let Some(until) = self.global_resync_until
            && now < until
        {
            // The answer to resync.all is on its way; ask on its own only if it never comes.
            let wait = until.saturating_duration_since(now) + self.settings.resync_timeout;
            rec.resync = Resync::Pending { since: now, wait };
            return None;
        }
        Some(self.note_resync(id, reason, now))
    }

    /// Adds a worker that now has a registration to the fleet, the index and the stream.
    fn register(&mut self, id: &WorkerId, now: Instant) {
        let Some(rec) = self.records.get(id) else { return };
        let Some(info) = rec.info(id) else { return };
        let slot = match self.fleet.upsert(info) {
            Ok(slot) => slot,
            Err(e) => {
                tracing::warn!(worker = %id, error = %e, "fleet table full; worker not indexed");
                return;
            }
        };
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1).max(1);
        let Some(rec) = self.records.get_mut(id) else { return };
        rec.slot = Some(slot);
        rec.handle = Some(handle);
        if let Some(entry) = self.fleet.get_mut(slot) {
            entry.load = rec.load.clone();
        }
        // Blocks seen before the worker registered go into the index now.
        let mut hashes = Vec::with_capacity(rec.blocks.len());
        for (&h, &copies) in &rec.blocks {
            for _ in 0..copies {
                hashes.push(BlockHash(h));
            }
        }
        self.index.store(slot, &hashes);
        if let Some(entry) = rec.entry(id) {
            self.changes.upsert(entry, now);
        }
        if let Some(load) = rec.load_update() {
            self.changes.load(load, now);
        }
        for &h in rec.blocks.keys() {
            self.changes.block(handle, h, true, now);
        }
        tracing::info!(worker = %id, slot = slot.0, handle, blocks = rec.blocks.len(), "worker registered");
    }

    /// Pushes a registered worker's changed registration or operator state to fleet and stream.
    fn push_registration(&mut self, id: &WorkerId, now: Instant) {
        let Some(rec) = self.records.get(id) else { return };
        if let (Some(info), Some(_)) = (rec.info(id), rec.slot) {
            let _ = self.fleet.upsert(info);
        }
        if let Some(entry) = rec.entry(id) {
            self.changes.upsert(entry, now);
        }
    }

    /// A new agent incarnation: the worker's blocks are forgotten and seq starts over.
    fn reset_epoch(&mut self, id: &WorkerId, epoch: u64, now: Instant) {
        self.clear_blocks(id, now);
        if let Some(rec) = self.records.get_mut(id) {
            if rec.epoch.is_some() {
                tracing::info!(worker = %id, old = ?rec.epoch, new = epoch, "new agent epoch; blocks reset");
            }
            rec.epoch = Some(epoch);
            rec.applied_seq = 0;
            rec.buffered.clear();
            rec.assemblies.clear();
            rec.resync = Resync::Idle;
        }
    }

    /// Drops every block of a worker, from its set, the index and (as a clear) the stream.
    fn clear_blocks(&mut self, id: &WorkerId, now: Instant) {
        let Some(rec) = self.records.get_mut(id) else { return };
        if let Some(slot) = rec.slot {
            remove_all_from_index(&mut self.index, slot, &rec.blocks);
        }
        let had = !rec.blocks.is_empty();
        rec.blocks.clear();
        rec.digest = 0;
        if let Some(handle) = rec.handle
            && had
        {
            self.changes.cleared(handle, now);
        }
    }

    /// Applies a KV event batch. May ask for a resync.
    pub fn apply_kv_batch(
        &mut self,
        batch: pb::KvEventBatch,
        now: Instant,
    ) -> Result<Option<ResyncNeeded>, Rejected> {
        if batch.worker_id.is_empty() {
            return Err(Rejected::NoWorkerId);
        }
        let id = WorkerId(batch.worker_id.clone());
        let rec = self.records.entry(id.clone()).or_insert_with(|| WorkerRecord::new(now));
        if rec.registration.is_none() {
            rec.last_seen = now;
        }
        if rec.epoch != Some(batch.epoch) {
            self.reset_epoch(&id, batch.epoch, now);
        }
        let Some(rec) = self.records.get_mut(&id) else { return Ok(None) };
        if let Resync::Pending { .. } = rec.resync {
            if rec.buffered.len() >= self.settings.buffer_batches {
                // The answer is taking too long to keep everything: start over once it lands.
                rec.buffered.clear();
                rec.resync = Resync::Idle;
                return Ok(Some(self.note_resync(&id, ResyncReason::BufferOverflow, now)));
            }
            rec.buffered.push_back(batch);
            return Ok(None);
        }
        if batch.seq <= rec.applied_seq {
            self.counters.stale_batches += 1;
            return Ok(None);
        }
        if batch.seq != rec.applied_seq + 1 {
            tracing::debug!(worker = %id, applied = rec.applied_seq, got = batch.seq, "kv seq gap");
            rec.buffered.push_back(batch);
            return Ok(self.ask_resync(&id, ResyncReason::Gap, now));
        }
        self.apply_events(&id, &batch, now);
        Ok(None)
    }

    /// Applies a batch that is next in seq order.
    fn apply_events(&mut self, id: &WorkerId, batch: &pb::KvEventBatch, now: Instant) {
        for event in &batch.events {
            match &event.kind {
                Some(Kind::Stored(s)) => {
                    self.store(id, &s.blocks, now);
                    self.counters.block_events_applied += s.blocks.len() as u64;
                }
                Some(Kind::Removed(r)) => {
                    self.remove(id, &r.blocks, now);
                    self.counters.block_events_applied += r.blocks.len() as u64;
                }
                Some(Kind::Cleared(_)) => self.clear_blocks(id, now),
                // An event kind newer than this build: nothing to apply.
                None => continue,
            }
            self.counters.events_applied += 1;
        }
        if let Some(rec) = self.records.get_mut(id) {
            rec.applied_seq = batch.seq;
        }
        self.counters.batches_applied += 1;
    }

    /// One more copy of each block on the worker.
    fn store(&mut self, id: &WorkerId, blocks: &[u64], now: Instant) {
        let Some(rec) = self.records.get_mut(id) else { return };
        let mut indexed: Vec<BlockHash> = Vec::with_capacity(blocks.len());
        for &h in blocks {
            let len = rec.blocks.len();
            let copies = rec.blocks.entry(h).or_insert(0);
            if *copies == 0 {
                if len >= self.settings.max_blocks {
                    rec.blocks.remove(&h);
                    self.counters.blocks_over_capacity += 1;
                    continue;
                }
                rec.digest ^= mix(h);
                if let Some(handle) = rec.handle {
                    self.changes.block(handle, h, true, now);
                }
            }
            *copies = copies.saturating_add(1);
            indexed.push(BlockHash(h));
        }
        if let Some(slot) = rec.slot {
            self.index.store(slot, &indexed);
        }
    }

    /// One copy less of each block on the worker.
    fn remove(&mut self, id: &WorkerId, blocks: &[u64], now: Instant) {
        let Some(rec) = self.records.get_mut(id) else { return };
        let mut indexed: Vec<BlockHash> = Vec::with_capacity(blocks.len());
        for &h in blocks {
            let Some(copies) = rec.blocks.get_mut(&h) else {
                self.counters.unknown_removals += 1;
                continue;
            };
            *copies -= 1;
            if *copies == 0 {
                rec.blocks.remove(&h);
                rec.digest ^= mix(h);
                if let Some(handle) = rec.handle {
                    self.changes.block(handle, h, false, now);
                }
            }
            indexed.push(BlockHash(h));
        }
        if let Some(slot) = rec.slot {
            self.index.remove(slot, &indexed);
        }
    }

    /// Applies a load report.
    pub fn apply_load(&mut self, report: pb::LoadReport, now: Instant) -> Result<(), Rejected> {
        if report.worker_id.is_empty() {
            return Err(Rejected::NoWorkerId);
        }
        let id = WorkerId(report.worker_id.clone());
        let rec = self.records.entry(id).or_insert_with(|| WorkerRecord::new(now));
        if rec.registration.is_none() {
            rec.last_seen = now;
        }
        rec.load.running = report.running;
        rec.load.waiting = report.waiting;
        rec.load.kv_usage = if report.kv_usage.is_finite() { report.kv_usage.clamp(0.0, 1.0) } else { 0.0 };
        rec.load.kv_capacity_blocks = report.kv_capacity_blocks;
        rec.load.gpus = report
            .gpus
            .iter()
            .map(|g| GpuStats {
                index: g.index,
                utilization: g.utilization,
                memory_used_bytes: g.memory_used_bytes,
                memory_total_bytes: g.memory_total_bytes,
                power_watts: g.power_watts,
                temperature_celsius: g.temperature_celsius,
            })
            .collect();
        if let Some(slot) = rec.slot
            && let Some(entry) = self.fleet.get_mut(slot)
        {
            entry.load = rec.load.clone();
        }
        if let Some(update) = rec.load_update() {
            self.changes.load(update, now);
        }
        Ok(())
    }

    /// Applies one chunk of a resync answer to the request tagged `tag`. May ask for a resync again
    /// (a chunk out of order, or a gap in the batches held during the resync).
    pub fn apply_resync_chunk(
        &mut self,
        tag: u64,
        chunk: pb::ResyncChunk,
        now: Instant,
    ) -> Result<Option<ResyncNeeded>, Rejected> {
        if chunk.worker_id.is_empty() {
            return Err(Rejected::NoWorkerId);
        }
        if chunk.copies.len() > chunk.blocks.len() {
            return Err(Rejected::CopiesMismatch);
        }
        let id = WorkerId(chunk.worker_id.clone());
        let rec = self.records.entry(id.clone()).or_insert_with(|| WorkerRecord::new(now));
        if rec.registration.is_none() {
            rec.last_seen = now;
        }
        let pos = rec.assemblies.iter().position(|a| a.tag == tag);
        let assembly = match pos {
            _ if chunk.chunk == 0 => {
                if let Some(p) = pos {
                    rec.assemblies.swap_remove(p);
                }
                rec.assemblies.push(Assembly {
                    tag,
                    epoch: chunk.epoch,
                    seq: chunk.seq,
                    next_chunk: 0,
                    blocks: block_map::with_capacity(chunk.blocks.len()),
                });
                rec.assemblies.len() - 1
            }
            Some(p) => p,
            None => {
                // A piece of an answer whose start we never saw.
                return Ok(self.restart_resync(&id, now));
            }
        };
        let a = &mut rec.assemblies[assembly];
        if a.next_chunk != chunk.chunk || a.epoch != chunk.epoch || a.seq != chunk.seq {
            rec.assemblies.swap_remove(assembly);
            return Ok(self.restart_resync(&id, now));
        }
        a.next_chunk += 1;
        for (i, &h) in chunk.blocks.iter().enumerate() {
            let copies = chunk.copies.get(i).copied().unwrap_or(1).clamp(1, u32::from(u16::MAX)) as u16;
            let c = a.blocks.entry(h).or_insert(0);
            *c = c.saturating_add(copies);
        }
        if !chunk.last {
            return Ok(None);
        }
        let done = rec.assemblies.swap_remove(assembly);
        Ok(self.finish_resync(&id, done, now))
    }

    /// A broken answer: drop it and, if we were waiting for one, ask again.
    fn restart_resync(&mut self, id: &WorkerId, now: Instant) -> Option<ResyncNeeded> {
        let pending = self.records.get(id).is_some_and(|r| matches!(r.resync, Resync::Pending { .. }));
        pending.then(|| self.note_resync(id, ResyncReason::BadAnswer, now))
    }

    /// Replaces the worker's block set with a complete answer, then replays held batches.
    fn finish_resync(&mut self, id: &WorkerId, answer: Assembly, now: Instant) -> Option<ResyncNeeded> {
        let rec = self.records.get_mut(id)?;
        match rec.epoch {
            // Older than what we already applied (a late duplicate): nothing to learn.
            Some(epoch) if epoch == answer.epoch && answer.seq < rec.applied_seq => return None,
            // From another incarnation than the one heartbeats and batches speak for: a late answer
            // of the previous agent. A new agent announces its epoch itself.
            Some(epoch) if epoch != answer.epoch => return None,
            Some(_) => {}
            None => self.reset_epoch(id, answer.epoch, now),
        }
        self.replace_blocks(id, answer.blocks, now);
        let rec = self.records.get_mut(id)?;
        rec.applied_seq = answer.seq;
        rec.resync = Resync::Idle;
        rec.assemblies.clear();
        self.counters.resyncs_completed += 1;
        tracing::info!(worker = %id, epoch = answer.epoch, seq = answer.seq, blocks = rec.blocks.len(), "resync applied");
        // Replay what arrived meanwhile, in seq order; drop what the answer already covers.
        let mut held: Vec<pb::KvEventBatch> = rec.buffered.drain(..).collect();
        held.sort_by_key(|b| b.seq);
        let mut gap = false;
        for batch in held {
            let Some(rec) = self.records.get_mut(id) else { break };
            if batch.epoch != answer.epoch || batch.seq <= rec.applied_seq {
                continue;
            }
            if gap || batch.seq != rec.applied_seq + 1 {
                gap = true;
                rec.buffered.push_back(batch);
                continue;
            }
            self.apply_events(id, &batch, now);
        }
        if gap { self.ask_resync(id, ResyncReason::Gap, now) } else { None }
    }

    /// Makes the worker's block set equal `target`, touching index and stream only where it differs.
    fn replace_blocks(&mut self, id: &WorkerId, target: BlockMap<u16>, now: Instant) {
        let Some(rec) = self.records.get_mut(id) else { return };
        let (mut add, mut sub): (Vec<BlockHash>, Vec<BlockHash>) = (Vec::new(), Vec::new());
        for (&h, &have) in &rec.blocks {
            let want = target.get(&h).copied().unwrap_or(0);
            for _ in want..have {
                sub.push(BlockHash(h));
            }
            if want == 0 {
                rec.digest ^= mix(h);
                if let Some(handle) = rec.handle {
                    self.changes.block(handle, h, false, now);
                }
            }
        }
        for (&h, &want) in &target {
            let have = rec.blocks.get(&h).copied().unwrap_or(0);
            for _ in have..want {
                add.push(BlockHash(h));
            }
            if have == 0 {
                rec.digest ^= mix(h);
                if let Some(handle) = rec.handle {
                    self.changes.block(handle, h, true, now);
                }
            }
        }
        rec.blocks = target;
        if let Some(slot) = rec.slot {
            self.index.remove(slot, &sub);
            self.index.store(slot, &add);
        }
    }

    /// Removes workers whose heartbeat is older than their ttl; returns who left.
    pub fn expire(&mut self, now: Instant) -> Vec<WorkerId> {
        let default_ttl = self.settings.default_ttl;
        let gone: Vec<WorkerId> = self
            .records
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.last_seen) > r.ttl(default_ttl))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.remove_worker(id, now);
            self.counters.workers_expired += 1;
            tracing::info!(worker = %id, "worker expired");
        }
        gone
    }

    fn remove_worker(&mut self, id: &WorkerId, now: Instant) {
        let Some(rec) = self.records.remove(id) else { return };
        if let Some(slot) = rec.slot {
            remove_all_from_index(&mut self.index, slot, &rec.blocks);
            self.fleet.remove(id);
        }
        if let Some(handle) = rec.handle {
            self.changes.remove_worker(handle, now);
        }
    }

    /// Workers whose resync answer is overdue: asks them again (with backoff).
    pub fn resync_timeouts(&mut self, now: Instant) -> Vec<ResyncNeeded> {
        let overdue: Vec<WorkerId> = self
            .records
            .iter()
            .filter(|(_, r)| matches!(r.resync, Resync::Pending { since, wait } if now.saturating_duration_since(since) >= wait))
            .map(|(id, _)| id.clone())
            .collect();
        overdue.iter().map(|id| self.note_resync(id, ResyncReason::Retry, now)).collect()
    }

    /// Sets a worker's operator state; false when the worker is unknown.
    pub fn set_state(&mut self, id: &WorkerId, state: WorkerState, now: Instant) -> bool {
        let Some(rec) = self.records.get_mut(id) else { return false };
        if rec.state != state {
            rec.state = state;
            self.push_registration(id, now);
        }
        true
    }

    /// Sets (or with `None` clears) an operator's role for a worker; false when it is unknown.
    pub fn set_role(&mut self, id: &WorkerId, role: Option<Role>, now: Instant) -> bool {
        let Some(rec) = self.records.get_mut(id) else { return false };
        if rec.role_override != role {
            rec.role_override = role;
            self.push_registration(id, now);
        }
        true
    }

    /// Sets a model's routing configuration (validated by the caller).
    pub fn set_policy(&mut self, model: &str, config: RoutingConfig, now: Instant) {
        self.policies.insert(model.to_owned(), config);
        self.changes.policy(model, policy_json(&config), now);
    }

    /// Where every registered worker is reached (`ip:port` as registered) and its state: what
    /// Envoy's endpoint discovery needs, without building the admin API's full view per poll.
    pub fn registered_addresses(&self) -> Vec<(String, WorkerState)> {
        self.records
            .values()
            .filter(|r| r.slot.is_some())
            .filter_map(|r| r.registration.as_ref().map(|g| (g.address.clone(), r.state)))
            .collect()
    }

    /// Every known worker, for the admin API.
    pub fn workers(&self, now: Instant) -> Vec<WorkerView> {
        let default_ttl = self.settings.default_ttl;
        self.records
            .iter()
            .map(|(id, r)| {
                let reg = r.registration.as_ref();
                WorkerView {
                    id: id.0.clone(),
                    registered: r.slot.is_some(),
                    address: reg.map(|g| g.address.clone()),
                    model: reg.map(|g| g.model.clone()),
                    engine: reg.map(|g| g.engine),
                    role: r.role(),
                    role_override: r.role_override,
                    state: r.state,
                    block_size: reg.map(|g| g.block_size),
                    tokenizer_id: reg.map(|g| g.tokenizer_id.clone()).filter(|t| !t.is_empty()),
                    lora_adapters: reg.map(|g| g.lora_adapters.clone()).unwrap_or_default(),
                    handle: r.handle,
                    epoch: r.epoch,
                    kv_seq: r.applied_seq,
                    resyncing: matches!(r.resync, Resync::Pending { .. }),
                    blocks: r.blocks.len() as u64,
                    load: r.load.clone(),
                    last_seen_ms: now.saturating_duration_since(r.last_seen).as_millis() as u64,
                    ttl_ms: r.ttl(default_ttl).as_millis() as u64,
                }
            })
            .collect()
    }

    /// Whether the worker is known.
    pub fn knows(&self, id: &WorkerId) -> bool {
        self.records.contains_key(id)
    }

    /// Index statistics with every registered worker's share.
    pub fn index_stats(&self) -> IndexStatsView {
        let stats = self.index.stats();
        let workers = self
            .records
            .iter()
            .filter_map(|(id, r)| {
                let slot = r.slot?;
                Some((
                    id.0.clone(),
                    WorkerIndexStats {
                        blocks: self.index.worker_blocks(slot),
                        reported_blocks: r.blocks.len() as u64,
                        digest: format!("{:016x}", r.digest),
                        epoch: r.epoch,
                        kv_seq: r.applied_seq,
                    },
                ))
            })
            .collect();
        IndexStatsView {
            blocks: stats.blocks,
            placements: stats.placements,
            bytes: stats.bytes,
            bytes_per_block: if stats.blocks == 0 { 0.0 } else { stats.bytes as f64 / stats.blocks as f64 },
            max_blocks: self.index.max_blocks() as u64,
            evicted_blocks: stats.evicted_blocks,
            unknown_removals: stats.unknown_removals,
            workers,
        }
    }

    /// LoRA adapters some worker of `model` has loaded.
    pub fn serves_adapter(&self, adapter: &str) -> Option<String> {
        self.records.values().find_map(|r| {
            let reg = r.registration.as_ref()?;
            reg.lora_adapters.iter().any(|a| a == adapter).then(|| reg.model.clone())
        })
    }

    /// Block size registered by a worker of `model`, if any worker serves it.
    pub fn registered_block_size(&self, model: &str) -> Option<u32> {
        self.records
            .values()
            .filter_map(|r| r.registration.as_ref())
            .find(|g| g.model == model && g.block_size > 0)
            .map(|g| g.block_size)
    }

    /// Models workers registered, with how many workers serve each.
    pub fn registered_models(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in self.records.values().filter(|r| r.slot.is_some()) {
            if let Some(reg) = &r.registration {
                *out.entry(reg.model.clone()).or_default() += 1;
            }
        }
        out
    }

    /// The full state in stream form.
    pub fn snapshot(&self) -> pb::Snapshot {
        let mut snapshot = pb::Snapshot {
            block_hash_version: kvmesh_core::hash::BLOCK_HASH_VERSION,
            ..pb::Snapshot::default()
        };
        for (id, r) in &self.records {
            let (Some(entry), Some(handle)) = (r.entry(id), r.handle) else { continue };
            snapshot.workers.push(entry);
            if let Some(load) = r.load_update() {
                snapshot.loads.push(load);
            }
            if !r.blocks.is_empty() {
                snapshot.index.push(pb::IndexUpdate {
                    handle,
                    cleared: false,
                    removed: Vec::new(),
                    stored: r.blocks.keys().copied().collect(),
                });
            }
        }
        snapshot.policies = self
            .policies
            .iter()
            .map(|(model, c)| pb::PolicyUpdate { model: model.clone(), config_json: policy_json(c) })
            .collect();
        snapshot
    }
}

/// A routing configuration as the JSON both the admin API and the stream carry.
pub fn policy_json(config: &RoutingConfig) -> String {
    // A struct of numbers and enums always serializes.
    serde_json::to_string(config).unwrap_or_default()
}

/// Takes every copy of a worker's blocks out of the index.
fn remove_all_from_index(index: &mut kvmesh_core::PrefixIndex, slot: WorkerSlot, blocks: &BlockMap<u16>) {
    let mut all = Vec::with_capacity(blocks.len());
    for (&h, &copies) in blocks {
        for _ in 0..copies {
            all.push(BlockHash(h));
        }
    }
    index.remove(slot, &all);
    if index.worker_blocks(slot) != 0 {
        // Only if the index and the set disagree: the slab walk is linear in the index.
        index.clear_worker(slot);
    }
}

#[cfg(test)]
mod tests;
