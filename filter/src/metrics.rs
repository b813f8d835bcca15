//! The filter's metrics, through the host's stats ([`StatsSink`]: the proxy-wasm metrics API in
//! Envoy's Wasm filter); Envoy shows them in `/stats/prometheus`.
//!
//! Defined once per VM (in `on_configure`); a failed definition or update is logged once and the
//! metric is skipped, never a panic.

use std::sync::atomic::{AtomicBool, Ordering};

use kvmesh_core::PolicyKind;
use kvmesh_core::template::RenderPath;

use crate::relay::{Polled, Received};
use crate::router::{Degraded, RejectKind, Routed};
use crate::stats::{MetricKind, StatsSink};

/// Ids of the filter's metrics in this VM; `None` where the host refused the definition.
pub struct Metrics<S> {
    sink: S,
    routed: Option<u32>,
    passthrough: Option<u32>,
    rejected: [Option<u32>; 7],
    decision_us_total: Option<u32>,
    decision_us: Option<u32>,
    overlap_blocks_total: Option<u32>,
    overlap_blocks: Option<u32>,
    /// Routed requests by deciding policy, in the order of `POLICIES`.
    by_policy: [Option<u32>; 4],
    stale_routes: Option<u32>,
    untokenized_routes: Option<u32>,
    renders_native: Option<u32>,
    renders_interpreted: Option<u32>,
    fallbacks: Option<u32>,
    model_loads: Option<u32>,
    model_load_failures: Option<u32>,
    state_snapshots: Option<u32>,
    state_deltas: Option<u32>,
    state_malformed: Option<u32>,
    state_apply_us: Option<u32>,
    /// Gauge: 1 while the control plane's block hash version is not this filter's.
    state_hash_mismatch: Option<u32>,
    /// Set after the first failed update so a broken host does not flood the log.
    warned: AtomicBool,
}

/// Every reject kind, in the order of `Metrics::rejected`.
const REJECT_KINDS: [RejectKind; 7] = [
    RejectKind::BadRequest,
    RejectKind::TooLarge,
    RejectKind::UnknownModel,
    RejectKind::NoWorker,
    RejectKind::Shed,
    RejectKind::Internal,
    RejectKind::NotReady,
];

/// Every policy, in the order of `Metrics::by_policy`.
const POLICIES: [PolicyKind; 4] =
    [PolicyKind::KvAware, PolicyKind::LoadOnly, PolicyKind::RoundRobin, PolicyKind::ApproxPrefix];

/// The metric-name part of a reject kind.
fn reject_name(kind: RejectKind) -> &'static str {
    match kind {
        RejectKind::BadRequest => "bad_request",
        RejectKind::TooLarge => "too_large",
        RejectKind::UnknownModel => "unknown_model",
        RejectKind::NoWorker => "no_worker",
        RejectKind::Shed => "shed",
        RejectKind::Internal => "internal_error",
        RejectKind::NotReady => "not_ready",
    }
}

/// Defines one metric, logging a refusal.
pub(crate) fn define(sink: &impl StatsSink, kind: MetricKind, name: &str) -> Option<u32> {
    let id = sink.define(kind, name);
    if id.is_none() {
        log::warn!("kvmesh filter: cannot define metric {name}");
    }
    id
}

impl<S: StatsSink> Metrics<S> {
    /// Defines every metric in `sink`.
    pub fn define(sink: S) -> Metrics<S> {
        use MetricKind::{Counter, Gauge, Histogram};
        let define = |kind, name: &str| define(&sink, kind, name);
        let mut rejected = [None; 7];
        for (slot, kind) in rejected.iter_mut().zip(REJECT_KINDS) {
            let name = format!("kvmesh_filter_decisions_{}_total", reject_name(kind));
            *slot = define(Counter, &name);
        }
        let mut by_policy = [None; 4];
        for (slot, policy) in by_policy.iter_mut().zip(POLICIES) {
            let name = format!("kvmesh_filter_routed_by_{}_total", policy.name().replace('-', "_"));
            *slot = define(Counter, &name);
        }
        Metrics {
            routed: define(Counter, "kvmesh_filter_decisions_routed_total"),
            passthrough: define(Counter, "kvmesh_filter_passthrough_total"),
            rejected,
            decision_us_total: define(Counter, "kvmesh_filter_decision_microseconds_total"),
            decision_us: define(Histogram, "kvmesh_filter_decision_microseconds"),
            overlap_blocks_total: define(Counter, "kvmesh_filter_overlap_blocks_total"),
            overlap_blocks: define(Histogram, "kvmesh_filter_overlap_blocks"),
            by_policy,
            stale_routes: define(Counter, "kvmesh_filter_stale_state_routes_total"),
            untokenized_routes: define(Counter, "kvmesh_filter_untokenized_routes_total"),
            renders_native: define(Counter, "kvmesh_filter_renders_native_total"),
            renders_interpreted: define(Counter, "kvmesh_filter_renders_interpreted_total"),
            fallbacks: define(Counter, "kvmesh_filter_fallbacks_total"),
            model_loads: define(Counter, "kvmesh_filter_model_loads_total"),
            model_load_failures: define(Counter, "kvmesh_filter_model_load_failures_total"),
            state_snapshots: define(Counter, "kvmesh_filter_state_snapshots_applied_total"),
            state_deltas: define(Counter, "kvmesh_filter_state_deltas_applied_total"),
            state_malformed: define(Counter, "kvmesh_filter_state_malformed_total"),
            state_apply_us: define(Histogram, "kvmesh_filter_state_apply_microseconds"),
            state_hash_mismatch: define(Gauge, "kvmesh_filter_state_hash_version_mismatch"),
            warned: AtomicBool::new(false),
            // Last: every definition above borrows it.
            sink,
        }
    }

    /// Where the metrics go.
    #[cfg(test)]
    pub(crate) fn sink(&self) -> &S {
        &self.sink
    }

    /// A request that was routed after `micros` of filter work.
    pub fn routed(&self, micros: u64, routed: &Routed) {
        self.add(self.routed, 1);
        self.decision(micros);
        self.add(self.overlap_blocks_total, u64::from(routed.overlap_blocks));
        self.record(self.overlap_blocks, u64::from(routed.overlap_blocks));
        let index = POLICIES.iter().position(|p| *p == routed.policy);
        self.add(index.and_then(|i| self.by_policy[i]), 1);
        match routed.degraded {
            Some(Degraded::StaleState) => self.add(self.stale_routes, 1),
            Some(Degraded::NoTokenizer) => self.add(self.untokenized_routes, 1),
            None => {}
        }
        match routed.render {
            Some(RenderPath::Native) => self.add(self.renders_native, 1),
            Some(RenderPath::Interpreted) => self.add(self.renders_interpreted, 1),
            None => {}
        }
    }

    /// A request passed through because the filter could not do its work (fail open).
    pub fn fallback(&self) {
        self.add(self.fallbacks, 1);
    }

    /// A model's tokenizer loaded in this VM (or failed to).
    pub fn model_loaded(&self, ok: bool) {
        self.add(if ok { self.model_loads } else { self.model_load_failures }, 1);
    }

    /// `n` models loaded from the static configuration.
    pub fn model_loaded_n(&self, n: usize) {
        self.add(self.model_loads, n as u64);
    }

    /// What one poll of the relayed state applied, and how long the poll took (recorded only when
    /// it applied something: an idle poll is one 48-byte shared-data read).
    /// 1 while the control plane's block hash version differs from this filter's (its index
    /// ignored), else 0.
    pub fn state_hash_version(&self, foreign: Option<u32>) {
        if let Some(id) = self.state_hash_mismatch
            && let Err(e) = self.sink.set(id, u64::from(foreign.is_some()))
        {
            self.warn(&e);
        }
    }

    pub fn state_polled(&self, polled: &Polled, micros: u64) {
        if polled.snapshot || polled.deltas > 0 {
            self.state_apply_time(micros);
        }
        self.state_polled_counts(polled);
    }

    /// The counters of [`Metrics::state_polled`] alone (a host whose histograms may only be
    /// recorded on its own threads records the time later, with [`Metrics::state_apply_time`]).
    pub fn state_polled_counts(&self, polled: &Polled) {
        if polled.snapshot {
            self.add(self.state_snapshots, 1);
        }
        self.add(self.state_deltas, u64::from(polled.deltas));
        self.add(self.state_malformed, u64::from(polled.malformed));
    }

    /// How long applying relayed state took, when it applied something.
    pub fn state_apply_time(&self, micros: u64) {
        self.record(self.state_apply_us, micros);
    }

    /// A request answered by the filter.
    pub fn rejected(&self, kind: RejectKind, micros: u64) {
        let index = REJECT_KINDS.iter().position(|k| *k == kind);
        self.add(index.and_then(|i| self.rejected[i]), 1);
        self.decision(micros);
    }

    /// A request on a path the filter does not route.
    pub fn passthrough(&self) {
        self.add(self.passthrough, 1);
    }

    fn decision(&self, micros: u64) {
        self.add(self.decision_us_total, micros);
        self.record(self.decision_us, micros);
    }

    fn record(&self, id: Option<u32>, value: u64) {
        if let Some(id) = id
            && let Err(e) = self.sink.record(id, value)
        {
            self.warn(&e);
        }
    }

    fn add(&self, id: Option<u32>, by: u64) {
        // Hosts refuse an increment of 0 (proxy-wasm: BadArgument).
        if by == 0 {
            return;
        }
        if let Some(id) = id
            && let Err(e) = self.sink.add(id, by)
        {
            self.warn(&e);
        }
    }

    fn warn(&self, error: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!("kvmesh filter: metric update failed: {error}");
        }
    }
}

/// The control-plane stream's metrics, kept by whatever holds the stream: the Wasm state service,
/// or the native module's connection thread.
pub struct StreamMetrics<S> {
    sink: S,
    connected: Option<u32>,
    opens: Option<u32>,
    updates: Option<u32>,
    snapshots: Option<u32>,
    gaps: Option<u32>,
    errors: Option<u32>,
    assets_fetched: Option<u32>,
    assets_failed: Option<u32>,
}

impl<S: StatsSink> StreamMetrics<S> {
    /// Defines the stream's metrics in `sink`.
    pub fn define(sink: S) -> StreamMetrics<S> {
        use MetricKind::{Counter, Gauge};
        let define = |kind, name: &str| define(&sink, kind, name);
        StreamMetrics {
            connected: define(Gauge, "kvmesh_filter_state_stream_connected"),
            opens: define(Counter, "kvmesh_filter_state_stream_opens_total"),
            updates: define(Counter, "kvmesh_filter_state_updates_relayed_total"),
            snapshots: define(Counter, "kvmesh_filter_state_snapshots_relayed_total"),
            gaps: define(Counter, "kvmesh_filter_state_gaps_total"),
            errors: define(Counter, "kvmesh_filter_state_errors_total"),
            assets_fetched: define(Counter, "kvmesh_filter_assets_fetched_total"),
            assets_failed: define(Counter, "kvmesh_filter_assets_failures_total"),
            sink,
        }
    }

    /// 1 while the stream delivers, 0 once it closed.
    pub fn set_connected(&self, connected: bool) {
        if let Some(id) = self.connected {
            let _ = self.sink.set(id, u64::from(connected));
        }
    }

    /// The stream was (re)opened.
    pub fn opened(&self) {
        self.add(self.opens, 1);
    }

    /// What one stream message was.
    pub fn received(&self, received: &Received) {
        match received {
            Received::Snapshot => self.add(self.snapshots, 1),
            Received::Delta => self.add(self.updates, 1),
            Received::Gap => self.add(self.gaps, 1),
            Received::Heartbeat => {}
        }
    }

    /// A message that could not be relayed.
    pub fn error(&self) {
        self.add(self.errors, 1);
    }

    /// A model's files fetched and relayed, or not.
    pub fn assets(&self, ok: bool) {
        self.add(if ok { self.assets_fetched } else { self.assets_failed }, 1);
    }

    fn add(&self, id: Option<u32>, by: u64) {
        if let Some(id) = id {
            let _ = self.sink.add(id, by);
        }
    }
}
