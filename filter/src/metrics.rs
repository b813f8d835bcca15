//! The filter's metrics through the proxy-wasm metrics API; Envoy shows them in `/stats/prometheus`.
//!
//! Defined once per VM (in `on_configure`); a failed definition or update is logged once and the
//! metric is skipped, never a panic.

use std::cell::Cell;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::router::RejectKind;

/// Ids of the filter's metrics in this VM; `None` where the host refused the definition.
#[derive(Debug, Default)]
pub struct Metrics {
    routed: Option<u32>,
    passthrough: Option<u32>,
    rejected: [Option<u32>; 6],
    decision_us_total: Option<u32>,
    decision_us: Option<u32>,
    overlap_blocks_total: Option<u32>,
    /// Set after the first failed update so a broken host does not flood the log.
    warned: Cell<bool>,
}

/// Every reject kind, in the order of `Metrics::rejected`.
const REJECT_KINDS: [RejectKind; 6] = [
    RejectKind::BadRequest,
    RejectKind::TooLarge,
    RejectKind::UnknownModel,
    RejectKind::NoWorker,
    RejectKind::Shed,
    RejectKind::Internal,
];

/// The metric-name part of a reject kind.
fn reject_name(kind: RejectKind) -> &'static str {
    match kind {
        RejectKind::BadRequest => "bad_request",
        RejectKind::TooLarge => "too_large",
        RejectKind::UnknownModel => "unknown_model",
        RejectKind::NoWorker => "no_worker",
        RejectKind::Shed => "shed",
        RejectKind::Internal => "internal_error",
    }
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("kvmesh filter: cannot define metric {name}: {status:?}");
            None
        }
    }
}

impl Metrics {
    /// Defines every metric in this VM.
    pub fn define() -> Metrics {
        let mut rejected = [None; 6];
        for (slot, kind) in rejected.iter_mut().zip(REJECT_KINDS) {
            let name = format!("kvmesh_filter_decisions_{}_total", reject_name(kind));
            *slot = define(MetricType::Counter, &name);
        }
        Metrics {
            routed: define(MetricType::Counter, "kvmesh_filter_decisions_routed_total"),
            passthrough: define(MetricType::Counter, "kvmesh_filter_passthrough_total"),
            rejected,
            decision_us_total: define(MetricType::Counter, "kvmesh_filter_decision_microseconds_total"),
            decision_us: define(MetricType::Histogram, "kvmesh_filter_decision_microseconds"),
            overlap_blocks_total: define(MetricType::Counter, "kvmesh_filter_overlap_blocks_total"),
            warned: Cell::new(false),
        }
    }

    /// A request that was routed after `micros` of filter work, with `overlap` predicted blocks.
    pub fn routed(&self, micros: u64, overlap: u32) {
        self.add(self.routed, 1);
        self.decision(micros);
        self.add(self.overlap_blocks_total, i64::from(overlap));
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
        self.add(self.decision_us_total, i64::try_from(micros).unwrap_or(i64::MAX));
        if let Some(id) = self.decision_us
            && let Err(status) = hostcalls::record_metric(id, micros)
        {
            self.warn(status);
        }
    }

    fn add(&self, id: Option<u32>, by: i64) {
        if let Some(id) = id
            && let Err(status) = hostcalls::increment_metric(id, by)
        {
            self.warn(status);
        }
    }

    fn warn(&self, status: proxy_wasm::types::Status) {
        if !self.warned.replace(true) {
            log::warn!("kvmesh filter: metric update failed: {status:?}");
        }
    }
}
