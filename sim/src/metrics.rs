//! Prometheus metrics under each engine's own names and labels, so a scraper written for the real
//! engine reads the sim unchanged (names from `vllm/v1/metrics/loggers.py`,
//! `sglang/srt/metrics/collector.py`, `tensorrt_llm/metrics/collector.py`).
//!
//! Latencies are in simulated seconds (real seconds times `--speedup`), as the real engine would
//! have measured them.

use std::borrow::Cow;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::EngineKind;
use crate::scheduler::{FinishReason, Finished, Totals};

type FloatGauge = Gauge<f64, AtomicU64>;

/// vLLM's TTFT buckets (seconds).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets (seconds).
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
/// vLLM's request latency buckets (seconds).
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0,
];

/// What the engine looks like right now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadSnapshot {
    /// Sequences running.
    pub running: usize,
    /// Sequences waiting.
    pub waiting: usize,
    /// Running sequences still in prefill.
    pub prefilling: usize,
    /// Blocks held by requests.
    pub used_blocks: usize,
    /// Blocks in all.
    pub total_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Generated tokens per simulated second over the last step.
    pub gen_throughput: f64,
    /// P/D requests waiting for KV from a prefill worker.
    pub awaiting_transfer: usize,
    /// Prefilled requests whose KV waits for a decode worker.
    pub holding: usize,
}

/// One worker's metrics.
pub struct Metrics {
    registry: Registry,
    running: Gauge,
    waiting: Gauge,
    kv_usage: FloatGauge,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue_time: Histogram,
    prefix_queries: Counter,
    prefix_hits: Counter,
    preemptions: Counter,
    success: Family<Vec<(String, String)>, Counter>,
    hit_rate: FloatGauge,
    used_tokens: Gauge,
    gen_throughput: FloatGauge,
    used_blocks: Gauge,
    free_blocks: Gauge,
    max_blocks: Gauge,
    tokens_per_block: Gauge,
    context_requests: Gauge,
    generation_requests: Gauge,
    paused_requests: Gauge,
    pd_awaiting: Gauge,
    pd_holding: Gauge,
    last: Mutex<Totals>,
}

impl Metrics {
    /// Registers the engine's metrics for `model`.
    pub fn new(engine: EngineKind, model: &str) -> Self {
        let label = |k: &'static str, v: String| (Cow::Borrowed(k), Cow::Owned(v));
        let labels = match engine {
            EngineKind::Vllm => vec![label("model_name", model.to_owned()), label("engine", "0".to_owned())],
            EngineKind::Sglang => vec![
                label("model_name", model.to_owned()),
                label("engine_type", "unified".to_owned()),
                label("tp_rank", "0".to_owned()),
                label("pp_rank", "0".to_owned()),
            ],
            EngineKind::Trtllm => {
                vec![label("model_name", model.to_owned()), label("engine_type", "trtllm".to_owned())]
            }
        };
        let mut m = Metrics {
            registry: Registry::with_labels(labels.into_iter()),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_usage: FloatGauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            ttft: Histogram::new(TTFT_BUCKETS.iter().copied()),
            itl: Histogram::new(ITL_BUCKETS.iter().copied()),
            e2e: Histogram::new(REQUEST_BUCKETS.iter().copied()),
            queue_time: Histogram::new(REQUEST_BUCKETS.iter().copied()),
            prefix_queries: Counter::default(),
            prefix_hits: Counter::default(),
            preemptions: Counter::default(),
            success: Family::default(),
            hit_rate: FloatGauge::default(),
            used_tokens: Gauge::default(),
            gen_throughput: FloatGauge::default(),
            used_blocks: Gauge::default(),
            free_blocks: Gauge::default(),
            max_blocks: Gauge::default(),
            tokens_per_block: Gauge::default(),
            context_requests: Gauge::default(),
            generation_requests: Gauge::default(),
            paused_requests: Gauge::default(),
            pd_awaiting: Gauge::default(),
            pd_holding: Gauge::default(),
            last: Mutex::new(Totals::default()),
        };
        m.register(engine);
        m
    }

    fn register(&mut self, engine: EngineKind) {
        let r = &mut self.registry;
        match engine {
            EngineKind::Vllm => {
                r.register(
                    "vllm:num_requests_running",
                    "Number of requests in model execution batches.",
                    self.running.clone(),
                );
                r.register(
                    "vllm:num_requests_waiting",
                    "Number of requests waiting to be processed.",
                    self.waiting.clone(),
                );
                r.register(
                    "vllm:kv_cache_usage_perc",
                    "KV-cache usage. 1 means 100 percent usage.",
                    self.kv_usage.clone(),
                );
                r.register(
                    "vllm:prefix_cache_queries",
                    "Prefix cache queries, in terms of number of queried tokens.",
                    self.prefix_queries.clone(),
                );
                r.register(
                    "vllm:prefix_cache_hits",
                    "Prefix cache hits, in terms of number of cached tokens.",
                    self.prefix_hits.clone(),
                );
                r.register(
                    "vllm:num_preemptions",
                    "Cumulative number of preemption from the engine.",
                    self.preemptions.clone(),
                );
                r.register(
                    "vllm:prompt_tokens",
                    "Number of prefill tokens processed.",
                    self.prompt_tokens.clone(),
                );
                r.register(
                    "vllm:generation_tokens",
                    "Number of generation tokens processed.",
                    self.generation_tokens.clone(),
                );
                r.register(
                    "vllm:request_success",
                    "Count of successfully processed requests.",
                    self.success.clone(),
                );
                r.register(
                    "vllm:time_to_first_token_seconds",
                    "Histogram of time to first token in seconds.",
                    self.ttft.clone(),
                );
                r.register(
                    "vllm:inter_token_latency_seconds",
                    "Histogram of inter-token latency in seconds.",
                    self.itl.clone(),
                );
                r.register(
                    "vllm:e2e_request_latency_seconds",
                    "Histogram of e2e request latency in seconds.",
                    self.e2e.clone(),
                );
                r.register(
                    "vllm:request_queue_time_seconds",
                    "Histogram of time spent in WAITING phase for request.",
                    self.queue_time.clone(),
                );
            }
            EngineKind::Sglang => {
                r.register(
                    "sglang:num_running_reqs",
                    "The number of running requests.",
                    self.running.clone(),
                );
                r.register(
                    "sglang:num_queue_reqs",
                    "The number of requests in the waiting queue.",
                    self.waiting.clone(),
                );
                r.register("sglang:token_usage", "The token usage.", self.kv_usage.clone());
                r.register("sglang:num_used_tokens", "The number of used tokens.", self.used_tokens.clone());
                r.register("sglang:cache_hit_rate", "The prefix cache hit rate.", self.hit_rate.clone());
                r.register(
                    "sglang:gen_throughput",
                    "The generation throughput (token/s).",
                    self.gen_throughput.clone(),
                );
                r.register(
                    "sglang:prompt_tokens",
                    "Number of prefill tokens processed.",
                    self.prompt_tokens.clone(),
                );
                r.register(
                    "sglang:generation_tokens",
                    "Number of generation tokens processed.",
                    self.generation_tokens.clone(),
                );
                r.register("sglang:num_requests", "The number of processed requests.", self.success.clone());
                r.register(
                    "sglang:time_to_first_token_seconds",
                    "Histogram of time to first token in seconds.",
                    self.ttft.clone(),
                );
                r.register(
                    "sglang:inter_token_latency_seconds",
                    "Histogram of inter-token latency in seconds.",
                    self.itl.clone(),
                );
                r.register(
                    "sglang:e2e_request_latency_seconds",
                    "Histogram of End-to-end request latency in seconds",
                    self.e2e.clone(),
                );
                r.register(
                    "sglang:num_prefill_inflight_queue_reqs",
                    "Prefilled requests whose KV waits for transfer.",
                    self.pd_holding.clone(),
                );
                r.register(
                    "sglang:num_decode_transfer_queue_reqs",
                    "Decode requests waiting for KV transfer.",
                    self.pd_awaiting.clone(),
                );
            }
            EngineKind::Trtllm => {
                r.register(
                    "trtllm_num_requests_running",
                    "Number of requests running.",
                    self.running.clone(),
                );
                r.register(
                    "trtllm_num_requests_waiting",
                    "Number of requests waiting.",
                    self.waiting.clone(),
                );
                r.register(
                    "trtllm_kv_cache_utilization",
                    "KV cache utilization (0-1).",
                    self.kv_usage.clone(),
                );
                r.register(
                    "trtllm_kv_cache_hit_rate",
                    "KV cache block reuse rate (0-1).",
                    self.hit_rate.clone(),
                );
                r.register(
                    "trtllm_kv_cache_used_blocks",
                    "KV cache blocks in use.",
                    self.used_blocks.clone(),
                );
                r.register("trtllm_kv_cache_free_blocks", "KV cache blocks free.", self.free_blocks.clone());
                r.register("trtllm_kv_cache_max_blocks", "KV cache blocks in all.", self.max_blocks.clone());
                r.register(
                    "trtllm_kv_cache_tokens_per_block",
                    "Tokens per KV cache block.",
                    self.tokens_per_block.clone(),
                );
                r.register(
                    "trtllm_num_context_requests",
                    "Requests in the context phase.",
                    self.context_requests.clone(),
                );
                r.register(
                    "trtllm_num_generation_requests",
                    "Requests in the generation phase.",
                    self.generation_requests.clone(),
                );
                r.register("trtllm_num_paused_requests", "Paused requests.", self.paused_requests.clone());
                r.register(
                    "trtllm_request_success",
                    "Count of successfully processed requests.",
                    self.success.clone(),
                );
                r.register(
                    "trtllm_prompt_tokens",
                    "Number of prefill tokens processed.",
                    self.prompt_tokens.clone(),
                );
                r.register(
                    "trtllm_generation_tokens",
                    "Number of generation tokens processed.",
                    self.generation_tokens.clone(),
                );
                r.register(
                    "trtllm_time_to_first_token_seconds",
                    "Histogram of time to first token in seconds.",
                    self.ttft.clone(),
                );
                r.register(
                    "trtllm_time_per_output_token_seconds",
                    "Histogram of time per output token in seconds.",
                    self.itl.clone(),
                );
                r.register(
                    "trtllm_e2e_request_latency_seconds",
                    "Histogram of end to end request latency in seconds.",
                    self.e2e.clone(),
                );
                r.register(
                    "trtllm_request_queue_time_seconds",
                    "Histogram of time spent in WAITING phase for request.",
                    self.queue_time.clone(),
                );
            }
        }
    }

    /// Sets the load gauges and advances the counters to the scheduler's totals.
    pub fn update(&self, load: &LoadSnapshot, totals: &Totals) {
        self.running.set(load.running as i64);
        self.waiting.set(load.waiting as i64);
        let usage =
            if load.total_blocks == 0 { 0.0 } else { load.used_blocks as f64 / load.total_blocks as f64 };
        self.kv_usage.set(usage);
        self.used_tokens.set((load.used_blocks * load.block_size) as i64);
        self.gen_throughput.set(load.gen_throughput);
        self.used_blocks.set(load.used_blocks as i64);
        self.free_blocks.set(load.total_blocks.saturating_sub(load.used_blocks) as i64);
        self.max_blocks.set(load.total_blocks as i64);
        self.tokens_per_block.set(load.block_size as i64);
        self.context_requests.set(load.prefilling as i64);
        self.generation_requests.set(load.running.saturating_sub(load.prefilling) as i64);
        self.paused_requests.set(0);
        self.pd_awaiting.set(load.awaiting_transfer as i64);
        self.pd_holding.set(load.holding as i64);
        if totals.prefix_queries > 0 {
            self.hit_rate.set(totals.prefix_hits as f64 / totals.prefix_queries as f64);
        }
        let Ok(mut last) = self.last.lock() else { return };
        self.prefix_queries.inc_by(totals.prefix_queries.saturating_sub(last.prefix_queries));
        self.prefix_hits.inc_by(totals.prefix_hits.saturating_sub(last.prefix_hits));
        self.preemptions.inc_by(totals.preemptions.saturating_sub(last.preemptions));
        *last = *totals;
    }

    /// Records a finished sequence.
    pub fn record_finished(&self, f: &Finished) {
        self.prompt_tokens.inc_by(f.prompt_tokens as u64);
        self.generation_tokens.inc_by(f.completion_tokens as u64);
        if f.reason != FinishReason::Abort {
            self.success
                .get_or_create(&vec![("finished_reason".to_owned(), f.reason.as_str().to_owned())])
                .inc();
        }
        if let Some(t) = f.ttft_seconds {
            self.ttft.observe(t);
        }
        for &t in &f.inter_token_seconds {
            self.itl.observe(t);
        }
        self.e2e.observe(f.e2e_seconds);
        self.queue_time.observe(f.queue_seconds);
    }

    /// The exposition text (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics not encoded");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_names_and_labels() {
        let m = Metrics::new(EngineKind::Vllm, "Qwen/Qwen3-8B");
        let load = LoadSnapshot {
            running: 3,
            waiting: 1,
            used_blocks: 5,
            total_blocks: 10,
            block_size: 16,
            ..Default::default()
        };
        m.update(&load, &Totals { prefix_queries: 100, prefix_hits: 32, ..Default::default() });
        let text = m.encode();
        assert!(
            text.contains(r#"vllm:num_requests_running{model_name="Qwen/Qwen3-8B",engine="0"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vllm:kv_cache_usage_perc{model_name="Qwen/Qwen3-8B",engine="0"} 0.5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vllm:prefix_cache_hits_total{model_name="Qwen/Qwen3-8B",engine="0"} 32"#),
            "{text}"
        );
    }

    #[test]
    fn sglang_and_trtllm_names() {
        let s = Metrics::new(EngineKind::Sglang, "m").encode();
        assert!(s.contains("sglang:num_queue_reqs{") && s.contains("sglang:token_usage{"), "{s}");
        let t = Metrics::new(EngineKind::Trtllm, "m").encode();
        assert!(
            t.contains("trtllm_kv_cache_utilization{") && t.contains("trtllm_num_requests_waiting{"),
            "{t}"
        );
    }
}
