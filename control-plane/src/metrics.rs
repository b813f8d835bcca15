//! Prometheus metrics (`kvmesh_cp_<what>_<unit>`, counters end in `_total`).
//!
//! Ingest counts inside [`FleetState`] without touching atomics on the hot path; [`Metrics::refresh`]
//! copies those counts and the index figures into the registry when `/metrics` is scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::fleet_state::FleetState;

/// Label of a per-subject counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubjectLabel {
    /// `kv`, `load`, `worker`, `resync` (answers).
    pub subject: String,
}

/// Label of a per-reason counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why (`gap`, `heartbeat_ahead`, `retry`, ...).
    pub reason: String,
}

/// Every metric of the control plane.
pub struct Metrics {
    registry: Registry,
    index_blocks: Gauge,
    index_placements: Gauge,
    index_bytes: Gauge,
    index_evicted: Counter,
    workers: Gauge,
    workers_known: Gauge,
    kv_batches: Counter,
    kv_events: Counter,
    block_events: Counter,
    stale_batches: Counter,
    unknown_removals: Counter,
    blocks_over_capacity: Counter,
    resyncs_requested: Family<ReasonLabel, Counter>,
    resyncs_completed: Counter,
    workers_expired: Counter,
    /// Messages that did not decode or named no worker, by subject.
    pub malformed: Family<SubjectLabel, Counter>,
    /// gRPC subscribers connected now.
    pub subscribers: Gauge,
    /// Snapshots sent to subscribers.
    pub snapshots: Counter,
    /// Subscriptions resumed from the delta ring without a snapshot.
    pub resumes: Counter,
    /// Deltas published.
    pub deltas: Counter,
    /// Current stream version.
    pub stream_version: Gauge,
    /// Seconds from applying the oldest change of a delta to publishing that delta.
    pub lag: Histogram,
    /// 1 while connected to NATS.
    pub nats_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::default();
        // 0.5 ms .. ~4 s: the batch window (default 20 ms) dominates.
        let lag = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14));
        let m = Metrics {
            registry: Registry::default(),
            index_blocks: Gauge::default(),
            index_placements: Gauge::default(),
            index_bytes: Gauge::default(),
            index_evicted: Counter::default(),
            workers: Gauge::default(),
            workers_known: Gauge::default(),
            kv_batches: Counter::default(),
            kv_events: Counter::default(),
            block_events: Counter::default(),
            stale_batches: Counter::default(),
            unknown_removals: Counter::default(),
            blocks_over_capacity: Counter::default(),
            resyncs_requested: Family::default(),
            resyncs_completed: Counter::default(),
            workers_expired: Counter::default(),
            malformed: Family::default(),
            subscribers: Gauge::default(),
            snapshots: Counter::default(),
            resumes: Counter::default(),
            deltas: Counter::default(),
            stream_version: Gauge::default(),
            lag,
            nats_connected: Gauge::default(),
        };
        r.register("kvmesh_cp_index_blocks", "Distinct blocks in the fleet index", m.index_blocks.clone());
        r.register(
            "kvmesh_cp_index_placements",
            "Worker-block pairs in the fleet index",
            m.index_placements.clone(),
        );
        r.register("kvmesh_cp_index_bytes", "Bytes the fleet index has allocated", m.index_bytes.clone());
        r.register(
            "kvmesh_cp_index_evicted_blocks",
            "Blocks dropped at index capacity",
            m.index_evicted.clone(),
        );
        r.register("kvmesh_cp_workers", "Registered workers", m.workers.clone());
        r.register("kvmesh_cp_workers_known", "Workers heard of, registered or not", m.workers_known.clone());
        r.register("kvmesh_cp_kv_batches_applied", "KV event batches applied", m.kv_batches.clone());
        r.register(
            "kvmesh_cp_kv_events_applied",
            "KV events (stored, removed, cleared) applied",
            m.kv_events.clone(),
        );
        r.register(
            "kvmesh_cp_block_events_applied",
            "Block hashes in applied stored/removed events",
            m.block_events.clone(),
        );
        r.register(
            "kvmesh_cp_kv_batches_stale",
            "Batches ignored as already applied",
            m.stale_batches.clone(),
        );
        r.register(
            "kvmesh_cp_unknown_removals",
            "Removals of blocks a worker did not hold",
            m.unknown_removals.clone(),
        );
        r.register(
            "kvmesh_cp_blocks_over_capacity",
            "Blocks refused because a worker's set reached the index capacity",
            m.blocks_over_capacity.clone(),
        );
        r.register(
            "kvmesh_cp_malformed_messages",
            "Messages that did not decode or named no worker",
            m.malformed.clone(),
        );
        r.register(
            "kvmesh_cp_resyncs_requested",
            "Resync requests sent, by reason",
            m.resyncs_requested.clone(),
        );
        r.register("kvmesh_cp_resyncs_completed", "Resync answers applied", m.resyncs_completed.clone());
        r.register(
            "kvmesh_cp_workers_expired",
            "Workers expired for lack of heartbeats",
            m.workers_expired.clone(),
        );
        r.register(
            "kvmesh_cp_stream_subscribers",
            "State-stream subscribers connected",
            m.subscribers.clone(),
        );
        r.register("kvmesh_cp_stream_snapshots", "Snapshots sent to subscribers", m.snapshots.clone());
        r.register("kvmesh_cp_stream_resumes", "Subscriptions resumed without a snapshot", m.resumes.clone());
        r.register("kvmesh_cp_stream_deltas", "Deltas published", m.deltas.clone());
        r.register("kvmesh_cp_stream_version", "Current state-stream version", m.stream_version.clone());
        r.register(
            "kvmesh_cp_event_to_stream_lag_seconds",
            "Seconds from applying a change to publishing the delta that carries it",
            m.lag.clone(),
        );
        r.register("kvmesh_cp_nats_connected", "1 while connected to NATS", m.nats_connected.clone());
        Metrics { registry: r, ..m }
    }

    /// Copies ingest counters and index figures in from the fleet state.
    pub fn refresh(&self, state: &FleetState) {
        let stats = state.index().stats();
        self.index_blocks.set(clamp(stats.blocks));
        self.index_placements.set(clamp(stats.placements));
        self.index_bytes.set(clamp(stats.bytes));
        catch_up(&self.index_evicted, stats.evicted_blocks);
        self.workers.set(clamp(state.fleet().len() as u64));
        self.workers_known.set(clamp(state.known_workers() as u64));
        let c = state.counters();
        catch_up(&self.kv_batches, c.batches_applied);
        catch_up(&self.kv_events, c.events_applied);
        catch_up(&self.block_events, c.block_events_applied);
        catch_up(&self.stale_batches, c.stale_batches);
        catch_up(&self.unknown_removals, c.unknown_removals);
        catch_up(&self.blocks_over_capacity, c.blocks_over_capacity);
        catch_up(&self.resyncs_completed, c.resyncs_completed);
        catch_up(&self.workers_expired, c.workers_expired);
        for (reason, &n) in &c.resyncs_requested {
            catch_up(&self.resyncs_requested.get_or_create(&ReasonLabel { reason: (*reason).to_owned() }), n);
        }
    }

    /// Counts a malformed message on a subject kind.
    pub fn malformed(&self, subject: &str) {
        self.malformed.get_or_create(&SubjectLabel { subject: subject.to_owned() }).inc();
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Raises a counter to `total` (counters only go up; `total` is cumulative).
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}
