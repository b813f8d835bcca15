//! The engine's load as its metrics tell it: requests running and waiting, KV-cache usage, prefix-cache
//! hit rate, block size and capacity, LoRA adapters. Names per engine (facts: engine-protocols.md
//! section 2.4); every one is feature-detected: a metric that is absent leaves its field absent.
//!
//! vLLM and SGLang serve Prometheus text at `/metrics`; TensorRT-LLM serves a JSON list of iteration
//! stats there (and Prometheus text at `/prometheus/metrics` in newer builds). The body tells which.

use serde::Deserialize;

use crate::promtext::{self, Sample};

/// Requests in the running batch.
const RUNNING: [&str; 3] =
    ["vllm:num_requests_running", "sglang:num_running_reqs", "trtllm_num_requests_running"];
/// Requests queued.
const WAITING: [&str; 3] =
    ["vllm:num_requests_waiting", "sglang:num_queue_reqs", "trtllm_num_requests_waiting"];
/// Further queues counted as waiting where the engine has them (grammar compilation, paused).
const WAITING_EXTRA: [&str; 2] = ["sglang:num_grammar_queue_reqs", "trtllm_num_paused_requests"];
/// KV-cache usage, 0 to 1 (`vllm:gpu_cache_usage_perc` is the pre-0.12 name).
const KV_USAGE: [&str; 4] = [
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "trtllm_kv_cache_utilization",
];
/// Prefix-cache hits and queries (counters, in tokens); older vLLM used the `gpu_` names.
const PREFIX_HITS: [&str; 2] = ["vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"];
const PREFIX_QUERIES: [&str; 2] = ["vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"];
/// Hit rate the engine computes itself.
const HIT_RATE: [&str; 2] = ["sglang:cache_hit_rate", "trtllm_kv_cache_hit_rate"];

/// What one scrape found; `None` where the engine does not say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineFigures {
    /// Requests running.
    pub running: Option<f64>,
    /// Requests waiting.
    pub waiting: Option<f64>,
    /// KV-cache usage, 0 to 1.
    pub kv_usage: Option<f64>,
    /// Tokens per block.
    pub block_size: Option<u32>,
    /// GPU KV blocks.
    pub capacity_blocks: Option<u64>,
    /// Prefix-cache hit counter.
    pub prefix_hits: Option<f64>,
    /// Prefix-cache query counter.
    pub prefix_queries: Option<f64>,
    /// Hit rate the engine computed, 0 to 1.
    pub hit_rate: Option<f64>,
    /// LoRA adapters in use (vLLM's `lora_requests_info`).
    pub lora_adapters: Option<Vec<String>>,
}

/// Why a metrics body was not usable.
#[derive(Debug, thiserror::Error)]
pub enum FiguresError {
    /// JSON that is not TensorRT-LLM's list of stats.
    #[error("metrics JSON is not a list of iteration stats: {0}")]
    Json(#[from] serde_json::Error),
    /// Not UTF-8 text.
    #[error("metrics page is not UTF-8")]
    NotText,
}

/// Reads a metrics body of any engine. `Ok(None)`: TensorRT-LLM had no new iteration stats (the
/// JSON list is drained on every read; an idle engine answers `[]`).
pub fn read_figures(body: &[u8]) -> Result<Option<EngineFigures>, FiguresError> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(body.len());
    if body.get(start) == Some(&b'[') {
        return from_trtllm_stats(body);
    }
    let text = std::str::from_utf8(body).map_err(|_| FiguresError::NotText)?;
    Ok(Some(from_prometheus(text)))
}

/// Figures from a Prometheus page (vLLM, SGLang, TensorRT-LLM's `/prometheus/metrics`).
pub fn from_prometheus(text: &str) -> EngineFigures {
    let (samples, _bad) = promtext::parse(text);
    // SGLang labels each tensor-parallel rank; the scheduler figures are rank 0's.
    let samples: Vec<&Sample<'_>> =
        samples.iter().filter(|s| s.label("tp_rank").is_none_or(|r| r == "0")).collect();
    let waiting = first(&samples, &WAITING, Agg::Sum)
        .map(|w| w + WAITING_EXTRA.iter().filter_map(|n| first(&samples, &[n], Agg::Sum)).sum::<f64>());
    let config = samples.iter().find(|s| s.name == "vllm:cache_config_info");
    EngineFigures {
        running: first(&samples, &RUNNING, Agg::Sum),
        waiting,
        kv_usage: first(&samples, &KV_USAGE, Agg::Mean),
        block_size: config
            .and_then(|s| s.label("block_size"))
            .and_then(|b| b.parse().ok())
            .or_else(|| first(&samples, &["trtllm_kv_cache_tokens_per_block"], Agg::Max).and_then(as_u32)),
        capacity_blocks: config
            .and_then(|s| s.label("num_gpu_blocks"))
            .and_then(|b| b.parse().ok())
            .or_else(|| first(&samples, &["trtllm_kv_cache_max_blocks"], Agg::Sum).and_then(as_u64)),
        prefix_hits: first(&samples, &PREFIX_HITS, Agg::Sum),
        prefix_queries: first(&samples, &PREFIX_QUERIES, Agg::Sum),
        hit_rate: first(&samples, &HIT_RATE, Agg::Mean),
        lora_adapters: lora_in_use(&samples),
    }
}

#[derive(Clone, Copy)]
enum Agg {
    Sum,
    Mean,
    Max,
}

/// The first of `names` present, aggregated over its series (data-parallel engines each have one).
fn first(samples: &[&Sample<'_>], names: &[&str], agg: Agg) -> Option<f64> {
    names.iter().find_map(|name| {
        let values: Vec<f64> =
            samples.iter().filter(|s| s.name == *name && s.value.is_finite()).map(|s| s.value).collect();
        if values.is_empty() {
            return None;
        }
        let sum: f64 = values.iter().sum();
        Some(match agg {
            Agg::Sum => sum,
            Agg::Mean => sum / values.len() as f64,
            Agg::Max => values.iter().copied().fold(f64::MIN, f64::max),
        })
    })
}

/// vLLM's `lora_requests_info`: one series per change, valued with its time; the latest counts.
fn lora_in_use(samples: &[&Sample<'_>]) -> Option<Vec<String>> {
    let latest = samples
        .iter()
        .filter(|s| s.name == "vllm:lora_requests_info")
        .max_by(|a, b| a.value.partial_cmp(&b.value).unwrap_or(std::cmp::Ordering::Equal))?;
    let mut adapters: Vec<String> = ["running_lora_adapters", "waiting_lora_adapters"]
        .iter()
        .filter_map(|label| latest.label(label))
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    adapters.sort();
    adapters.dedup();
    Some(adapters)
}

fn as_u32(value: f64) -> Option<u32> {
    (1.0..=f64::from(u32::MAX)).contains(&value).then_some(value as u32)
}

fn as_u64(value: f64) -> Option<u64> {
    (1.0..1.8e19).contains(&value).then_some(value as u64)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IterationStats {
    num_active_requests: Option<f64>,
    num_queued_requests: Option<f64>,
    kv_cache_stats: Option<KvCacheStats>,
    inflight_batching_stats: Option<InflightStats>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KvCacheStats {
    max_num_blocks: Option<f64>,
    used_num_blocks: Option<f64>,
    tokens_per_block: Option<f64>,
    cache_hit_rate: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InflightStats {
    num_paused_requests: Option<f64>,
}

/// Figures from TensorRT-LLM's JSON iteration stats: the newest item counts.
pub fn from_trtllm_stats(body: &[u8]) -> Result<Option<EngineFigures>, FiguresError> {
    let items: Vec<IterationStats> = serde_json::from_slice(body)?;
    let Some(last) = items.last() else {
        return Ok(None);
    };
    let kv = last.kv_cache_stats.as_ref();
    let paused = last.inflight_batching_stats.as_ref().and_then(|s| s.num_paused_requests).unwrap_or(0.0);
    let max_blocks = kv.and_then(|k| k.max_num_blocks);
    Ok(Some(EngineFigures {
        running: last.num_active_requests,
        waiting: last.num_queued_requests.map(|q| q + paused),
        kv_usage: kv
            .and_then(|k| Some((k.used_num_blocks?, max_blocks?)))
            .filter(|(_, max)| *max > 0.0)
            .map(|(used, max)| used / max),
        block_size: kv.and_then(|k| k.tokens_per_block).and_then(as_u32),
        capacity_blocks: max_blocks.and_then(as_u64),
        hit_rate: kv.and_then(|k| k.cache_hit_rate),
        ..EngineFigures::default()
    }))
}

/// LoRA adapters an OpenAI-compatible `/v1/models` lists: entries with a `parent` model.
pub fn lora_from_models(body: &[u8]) -> Option<Vec<String>> {
    #[derive(Deserialize)]
    struct Models {
        data: Vec<Model>,
    }
    #[derive(Deserialize)]
    struct Model {
        id: String,
        parent: Option<String>,
    }
    let models: Models = serde_json::from_slice(body).ok()?;
    let mut adapters: Vec<String> =
        models.data.into_iter().filter(|m| m.parent.is_some()).map(|m| m.id).collect();
    adapters.sort();
    Some(adapters)
}

/// Prefix-cache hit rate between two scrapes, from cumulative counters; the engine's own rate when it
/// has no counters. `None` when nothing was looked up meanwhile or a counter went back (restart).
pub fn hit_rate(previous: Option<&EngineFigures>, now: &EngineFigures) -> Option<f64> {
    if let (Some(hits), Some(queries)) = (now.prefix_hits, now.prefix_queries) {
        let before = previous.and_then(|p| Some((p.prefix_hits?, p.prefix_queries?)));
        let (d_hits, d_queries) = match before {
            Some((h0, q0)) => (hits - h0, queries - q0),
            None => return None,
        };
        return (d_queries > 0.0 && d_hits >= 0.0).then(|| (d_hits / d_queries).clamp(0.0, 1.0));
    }
    now.hit_rate.filter(|r| r.is_finite()).map(|r| r.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 40.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="9000"} 1.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.700000001e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql,chat",waiting_lora_adapters="sql"} 1.700000002e+09
"#;

    #[test]
    fn vllm_figures_sum_running_and_average_usage_over_engines() {
        let f = from_prometheus(VLLM);
        assert_eq!((f.running, f.waiting), (Some(5.0), Some(1.0)));
        assert!((f.kv_usage.unwrap_or(0.0) - 0.3).abs() < 1e-9);
        assert_eq!((f.block_size, f.capacity_blocks), (Some(16), Some(9000)));
        assert_eq!(f.lora_adapters, Some(vec!["chat".to_owned(), "sql".to_owned()]));
        assert_eq!((f.prefix_hits, f.prefix_queries), (Some(40.0), Some(100.0)));
    }

    #[test]
    fn sglang_figures_use_rank_zero() {
        let text = "sglang:num_running_reqs{tp_rank=\"0\",model_name=\"m\"} 4\n\
                    sglang:num_running_reqs{tp_rank=\"1\",model_name=\"m\"} 4\n\
                    sglang:num_queue_reqs{tp_rank=\"0\"} 2\nsglang:num_grammar_queue_reqs{tp_rank=\"0\"} 1\n\
                    sglang:token_usage{tp_rank=\"0\"} 0.5\nsglang:cache_hit_rate{tp_rank=\"0\"} 0.75\n";
        let f = from_prometheus(text);
        assert_eq!(
            (f.running, f.waiting, f.kv_usage, f.hit_rate),
            (Some(4.0), Some(3.0), Some(0.5), Some(0.75))
        );
        assert_eq!(f.block_size, None);
        assert_eq!(hit_rate(None, &f), Some(0.75));
    }

    #[test]
    fn trtllm_prometheus_and_json() {
        let text = "trtllm_num_requests_running 2\ntrtllm_num_requests_waiting 1\ntrtllm_num_paused_requests 1\n\
                    trtllm_kv_cache_utilization 0.1\ntrtllm_kv_cache_tokens_per_block 32\ntrtllm_kv_cache_max_blocks 4096\n";
        let f = read_figures(text.as_bytes()).expect("text").expect("figures");
        assert_eq!(
            (f.running, f.waiting, f.block_size, f.capacity_blocks),
            (Some(2.0), Some(2.0), Some(32), Some(4096))
        );
        let json = br#" [{"iter": 1, "numActiveRequests": 1}, {"iter": 2, "numActiveRequests": 3, "numQueuedRequests": 2,
            "kvCacheStats": {"maxNumBlocks": 1000, "freeNumBlocks": 750, "usedNumBlocks": 250, "tokensPerBlock": 32,
                             "cacheHitRate": 0.5},
            "inflightBatchingStats": {"numPausedRequests": 1, "numContextRequests": 1}}]"#;
        let f = read_figures(json).expect("json").expect("figures");
        assert_eq!((f.running, f.waiting, f.kv_usage), (Some(3.0), Some(3.0), Some(0.25)));
        assert_eq!((f.block_size, f.capacity_blocks, f.hit_rate), (Some(32), Some(1000), Some(0.5)));
        assert_eq!(read_figures(b"[]").expect("empty list"), None);
        assert!(read_figures(b"[1, 2]").is_err());
        assert!(read_figures(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn absent_metrics_mean_absent_figures() {
        assert_eq!(
            from_prometheus("# nothing here\nprocess_cpu_seconds_total 12\n"),
            EngineFigures::default()
        );
    }

    #[test]
    fn hit_rate_from_counter_deltas() {
        let a = from_prometheus(VLLM);
        let mut b = a.clone();
        b.prefix_queries = Some(200.0);
        b.prefix_hits = Some(90.0);
        assert_eq!(hit_rate(None, &a), None);
        assert_eq!(hit_rate(Some(&a), &b), Some(0.5));
        assert_eq!(hit_rate(Some(&b), &b), None);
        // A restart resets the counters: no rate for that period.
        assert_eq!(hit_rate(Some(&b), &a), None);
    }

    #[test]
    fn lora_adapters_from_models() {
        let body = br#"{"object":"list","data":[{"id":"base","parent":null},{"id":"sql","root":"/a","parent":"base"}]}"#;
        assert_eq!(lora_from_models(body), Some(vec!["sql".to_owned()]));
        assert_eq!(lora_from_models(b"nope"), None);
    }
}
