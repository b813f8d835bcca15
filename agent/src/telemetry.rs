//! The agent's own metrics (Prometheus, `--metrics-listen`): what it read, skipped, recovered and
//! published. Names follow `kvmesh_agent_<what>`; counters get `_total` from the encoder.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::blocks::TranslateStats;
use crate::events::Skipped;

/// A label naming what kind of thing a counter counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct What {
    /// The kind.
    pub what: &'static str,
}

/// A label naming a data-parallel rank.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabel {
    /// The rank.
    pub rank: u32,
}

/// Every metric of the agent; shared by its tasks.
#[derive(Default)]
pub struct AgentMetrics {
    /// Engine batches applied, per rank.
    pub engine_batches: Family<RankLabel, Counter>,
    /// Inputs that could not be read: `frame`, `payload`, `event`, `replay_reply`, `trtllm_event`.
    pub malformed: Family<What, Counter>,
    /// Engine events of a type the agent does not know.
    pub unknown_event_types: Counter,
    /// Events skipped on purpose: `other_tier`, `other_group`, `bad_tokens`, `unknown_parent`.
    pub skipped_events: Family<What, Counter>,
    /// Blocks in stores whose parent was unknown (not published).
    pub unknown_parent_blocks: Counter,
    /// Removals of blocks the agent did not hold.
    pub unknown_removed_blocks: Counter,
    /// Sequence gaps in an engine's stream.
    pub gaps: Counter,
    /// Replays, by result: `complete`, `incomplete` (the engine's buffer did not reach back), `failed`.
    pub replays: Family<What, Counter>,
    /// Engine restarts seen (sequence went back, or history differs from what was applied).
    pub engine_restarts: Counter,
    /// Resets of a rank's blocks, by reason: `engine_restart`, `lost_events`.
    pub resets: Family<What, Counter>,
    /// Live batches skipped because a replay had delivered them.
    pub duplicate_batches: Counter,
    /// KvEventBatch messages published.
    pub published_batches: Counter,
    /// Publications that failed, by message: `kv`, `load`, `heartbeat`, `resync`.
    pub publish_errors: Family<What, Counter>,
    /// Resync requests answered.
    pub resync_requests: Counter,
    /// Distinct kvmesh blocks the worker holds.
    pub blocks: Gauge,
    /// Sequence number of the last KvEventBatch published.
    pub kv_seq: Gauge,
    /// Failed reads of the engine's metrics or events endpoint, or of NVML: `metrics`, `events`, `gpu`.
    pub scrape_errors: Family<What, Counter>,
    /// 1 while the engine's metrics endpoint answers (or none is configured), else 0.
    pub engine_up: Gauge,
}

impl AgentMetrics {
    /// Registers every metric in `registry`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kvmesh_agent");
        r.register("engine_batches", "Engine KV-event batches applied", self.engine_batches.clone());
        r.register("malformed", "Inputs that could not be read, by kind", self.malformed.clone());
        r.register(
            "unknown_event_types",
            "Engine events of an unknown type",
            self.unknown_event_types.clone(),
        );
        r.register("skipped_events", "Engine events skipped, by reason", self.skipped_events.clone());
        r.register(
            "unknown_parent_blocks",
            "Blocks of stores whose parent block is unknown, not published",
            self.unknown_parent_blocks.clone(),
        );
        r.register(
            "unknown_removed_blocks",
            "Removals of blocks the agent did not hold",
            self.unknown_removed_blocks.clone(),
        );
        r.register("gaps", "Sequence gaps in an engine's event stream", self.gaps.clone());
        r.register("replays", "Replays from the engine's buffer, by result", self.replays.clone());
        r.register(
            "engine_restarts",
            "Engine restarts seen in the event stream",
            self.engine_restarts.clone(),
        );
        r.register("resets", "Resets of a rank's blocks, by reason", self.resets.clone());
        r.register(
            "duplicate_batches",
            "Live batches skipped because a replay delivered them",
            self.duplicate_batches.clone(),
        );
        r.register("published_batches", "KvEventBatch messages published", self.published_batches.clone());
        r.register(
            "publish_errors",
            "NATS publications that failed, by message",
            self.publish_errors.clone(),
        );
        r.register("resync_requests", "Resync requests answered", self.resync_requests.clone());
        r.register("blocks", "Distinct kvmesh blocks the worker holds", self.blocks.clone());
        r.register("kv_seq", "Sequence number of the last KvEventBatch published", self.kv_seq.clone());
        r.register(
            "scrape_errors",
            "Failed reads of engine endpoints or NVML, by source",
            self.scrape_errors.clone(),
        );
        r.register("engine_up", "1 while the engine's metrics endpoint answers", self.engine_up.clone());
    }

    /// Counts one kind of malformed input.
    pub fn malformed(&self, what: &'static str) {
        self.malformed.get_or_create(&What { what }).inc();
    }

    /// Counts what a decoder skipped.
    pub fn decoder_skipped(&self, skipped: Skipped) {
        self.unknown_event_types.inc_by(u64::from(skipped.unknown_type));
        self.malformed.get_or_create(&What { what: "event" }).inc_by(u64::from(skipped.malformed));
        self.skipped_events.get_or_create(&What { what: "other_tier" }).inc_by(u64::from(skipped.other_tier));
    }

    /// Counts what a translation skipped.
    pub fn translate_skipped(&self, stats: TranslateStats) {
        let skip = |what, n: u32| self.skipped_events.get_or_create(&What { what }).inc_by(u64::from(n));
        skip("unknown_parent", stats.unknown_parent);
        skip("other_group", stats.other_group);
        skip("bad_tokens", stats.bad_tokens);
        self.unknown_parent_blocks.inc_by(u64::from(stats.unknown_parent_blocks));
        self.unknown_removed_blocks.inc_by(u64::from(stats.unknown_removed));
    }

    /// Counts one occurrence of a labelled counter.
    pub fn count(family: &Family<What, Counter>, what: &'static str) {
        family.get_or_create(&What { what }).inc();
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move { render(&registry) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Binds the metrics listener (fails fast at start rather than later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

fn render(registry: &Registry) -> axum::response::Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => {
            ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                .into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        let metrics = Arc::new(AgentMetrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.malformed("payload");
        metrics.gaps.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoding to a String");
        assert!(text.contains("kvmesh_agent_malformed_total{what=\"payload\"} 1"), "{text}");
        assert!(text.contains("kvmesh_agent_gaps_total 1"), "{text}");
        assert!(text.contains("kvmesh_agent_blocks 0"), "{text}");
    }
}
