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

use std::sync::atomic::{AtomicBool, Ordering};

use kvmesh_core::usage::{Accuracy, Verdict};

use crate::metrics::define;
use crate::stats::{MetricKind, StatsSink};

/// Ids of the routing-accuracy counters in this VM; `None` where the host refused the definition.
pub struct AccuracyMetrics<S> {
    sink: S,
    exact: Option<u32>,
    over: Option<u32>,
    under: Option<u32>,
    unknown: Option<u32>,
    predicted_tokens: Option<u32>,
    reported_tokens: Option<u32>,
    /// Set after the first failed update so a broken host does not flood the log.
    warned: AtomicBool,
}

impl<S: StatsSink> AccuracyMetrics<S> {
    /// Defines the routing-accuracy counters in `sink`.
    pub fn define(sink: S) -> AccuracyMetrics<S> {
        let define_counter = |name: &str| define(&sink, MetricKind::Counter, name);
        AccuracyMetrics {
            exact: define_counter("kvmesh_filter_accuracy_exact_total"),
            over: define_counter("kvmesh_filter_accuracy_over_total"),
            under: define_counter("kvmesh_filter_accuracy_under_total"),
            unknown: define_counter("kvmesh_filter_accuracy_unknown_total"),
            predicted_tokens: define_counter("kvmesh_filter_cached_tokens_predicted_total"),
            reported_tokens: define_counter("kvmesh_filter_cached_tokens_reported_total"),
            warned: AtomicBool::new(false),
            // Last: every definition above borrows it.
            sink,
        }
    }

    /// Where the counters go.
    #[cfg(test)]
    pub(crate) fn sink(&self) -> &S {
        &self.sink
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
        self.add(self.predicted_tokens, accuracy.predicted_cached_tokens);
        self.add(self.reported_tokens, accuracy.reported_cached_tokens);
    }

    fn add(&self, id: Option<u32>, by: u64) {
        // Hosts refuse an increment of 0 (proxy-wasm: BadArgument).
        if by == 0 {
            return;
        }
        if let Some(id) = id
            && let Err(e) = self.sink.add(id, by)
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            log::warn!("kvmesh filter: accuracy metric update failed: {e}");
        }
    }
}
