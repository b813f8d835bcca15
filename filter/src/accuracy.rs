//! Routing-accuracy metrics: the cached prompt tokens the filter predicted on the chosen worker
//! against those the engine reported in `usage.prompt_tokens_details.cached_tokens` (read and
//! compared by `kvmesh_core::usage`), so drift between the proxy's tokenization or hashing and the
//! engine's shows at once.
//!
//! Envoy sums a metric over every VM of the plugin, so only counters are exported and ratios are
//! taken when querying: the routing-accuracy ratio is
//! `kvmesh_filter_accuracy_exact_total / (exact_total + over_total + under_total)`, and
//! `kvmesh_filter_cached_tokens_reported_total / kvmesh_filter_cached_tokens_predicted_total` is the
//! share of the predicted cache the engines really had. Defined once per VM; a failed definition
//! or update is logged once and the metric skipped, never a panic.

use std::cell::Cell;

use kvmesh_core::usage::{Accuracy, Verdict};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};

/// Ids of the routing-accuracy counters in this VM; `None` where the host refused the definition.
#[derive(Debug, Default)]
pub struct AccuracyMetrics {
    exact: Option<u32>,
    over: Option<u32>,
    under: Option<u32>,
    unknown: Option<u32>,
    predicted_tokens: Option<u32>,
    reported_tokens: Option<u32>,
    /// Set after the first failed update so a broken host does not flood the log.
    warned: Cell<bool>,
}

fn define_counter(name: &str) -> Option<u32> {
    match hostcalls::define_metric(MetricType::Counter, name) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("kvmesh filter: cannot define metric {name}: {status:?}");
            None
        }
    }
}

impl AccuracyMetrics {
    /// Defines the routing-accuracy counters in this VM.
    pub fn define() -> AccuracyMetrics {
        AccuracyMetrics {
            exact: define_counter("kvmesh_filter_accuracy_exact_total"),
            over: define_counter("kvmesh_filter_accuracy_over_total"),
            under: define_counter("kvmesh_filter_accuracy_under_total"),
            unknown: define_counter("kvmesh_filter_accuracy_unknown_total"),
            predicted_tokens: define_counter("kvmesh_filter_cached_tokens_predicted_total"),
            reported_tokens: define_counter("kvmesh_filter_cached_tokens_reported_total"),
            warned: Cell::new(false),
        }
    }

    /// One routed response: `Some` with its comparison when the engine reported cached tokens,
    /// `None` when it did not (counted as unknown; its tokens are left out of both token totals so
    /// they stay comparable).
    pub fn record(&self, outcome: Option<Accuracy>) {
        let Some(accuracy) = outcome else {
            self.add(self.unknown, 1);
            return;
        };
        let verdict = match accuracy.verdict {
            Verdict::Exact => self.exact,
            Verdict::Over => self.over,
            Verdict::Under => self.under,
        };
        self.add(verdict, 1);
        self.add(self.predicted_tokens, saturate(accuracy.predicted_cached_tokens));
        self.add(self.reported_tokens, saturate(accuracy.reported_cached_tokens));
    }

    fn add(&self, id: Option<u32>, by: i64) {
        // The host refuses an increment of 0 (BadArgument).
        if by == 0 {
            return;
        }
        if let Some(id) = id
            && let Err(status) = hostcalls::increment_metric(id, by)
        {
            self.warn(status);
        }
    }

    fn warn(&self, status: Status) {
        if !self.warned.replace(true) {
            log::warn!("kvmesh filter: accuracy metric update failed: {status:?}");
        }
    }
}

/// A token count as a counter increment (the host takes `i64`).
fn saturate(tokens: u64) -> i64 {
    i64::try_from(tokens).unwrap_or(i64::MAX)
}
