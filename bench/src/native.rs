//! The filter's request pipeline natively, in this process, on the same bodies the load sends:
//! `kvmesh_filter::router::Router` (the code the filter runs in V8, minus host calls) for the whole
//! decision, and [`Stages`] for its steps one by one.

use std::hint::black_box;
use std::time::Instant;

use anyhow::{Result, anyhow};
use kvmesh_core::Tokenizer;
use kvmesh_core::tokenize::SegmentCacheConfig;
use kvmesh_filter::FilterConfig;
use kvmesh_filter::router::Router;
use serde::{Deserialize, Serialize};

use crate::stages::{StageTiming, Stages};
use crate::workload::Workload;

/// Bytes swept through the CPU caches between the requests of the cold-cache run: more than this
/// machine's 32 MiB L3, so the router's code and data start every request cold, which is how the
/// filter finds them inside Envoy between two requests (its decision there is 2-3x the hot figure).
const SWEEP_BYTES: usize = 48 << 20;

/// Native timings of one workload, microseconds (medians over the timed requests).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct NativeTiming {
    /// `Router::route`: the filter's whole decision (parse, render, tokenize, hash, score).
    pub route_us: f64,
    /// The same with [`SWEEP_BYTES`] written between requests (caches cold, body included).
    #[serde(default)]
    pub route_cold_us: f64,
    /// The steps one by one.
    pub stages: StageTiming,
}

/// The pipeline natively for one segment-cache setting; caches stay warm across workloads, like a
/// filter VM's.
pub struct NativePipeline {
    router: Router,
    stages: Stages,
    started: Instant,
}

impl NativePipeline {
    /// The filter's router for `plugin_config` (it loads its own tokenizer) and the stages over
    /// `tokenizer` with `segment_cache` (the same setting).
    pub fn new(
        plugin_config: &str,
        segment_cache: SegmentCacheConfig,
        tokenizer: &Tokenizer,
    ) -> Result<Self> {
        let config = FilterConfig::from_bytes(Some(plugin_config.as_bytes()))
            .map_err(|e| anyhow!("filter configuration: {e}"))?;
        let router = Router::new(&config).map_err(|e| anyhow!("filter router: {e}"))?;
        Ok(NativePipeline { router, stages: Stages::new(tokenizer, segment_cache)?, started: Instant::now() })
    }

    /// Times `iterations` requests of `workload` (after `warmup` untimed ones) through the router,
    /// then through the stages; fresh workloads get a new seed per request from `next_seed`.
    pub fn time(
        &mut self,
        workload: &Workload,
        warmup: usize,
        iterations: usize,
        next_seed: &mut dyn FnMut() -> u64,
    ) -> Result<NativeTiming> {
        let route_us = self.route(workload, warmup, iterations, next_seed, None)?;
        let mut sweep = vec![0u8; SWEEP_BYTES];
        let route_cold_us = self.route(workload, warmup, iterations, next_seed, Some(&mut sweep))?;
        let stages = self.stages.time(workload, warmup, iterations, next_seed)?;
        Ok(NativeTiming { route_us, route_cold_us, stages })
    }

    /// Median `Router::route` time, µs; with `sweep`, written through before every request.
    fn route(
        &mut self,
        workload: &Workload,
        warmup: usize,
        iterations: usize,
        next_seed: &mut dyn FnMut() -> u64,
        mut sweep: Option<&mut [u8]>,
    ) -> Result<f64> {
        let mut route_ns = Vec::with_capacity(iterations);
        for i in 0..warmup + iterations {
            let body = workload.body(next_seed());
            if let Some(sweep) = sweep.as_deref_mut() {
                // One write per cache line evicts what the router left in the caches.
                for (n, byte) in sweep.iter_mut().step_by(64).enumerate() {
                    *byte = byte.wrapping_add(n as u8);
                }
                black_box(&sweep);
            }
            let now_ms = self.started.elapsed().as_millis() as u64;
            let t0 = Instant::now();
            let routed =
                self.router.route(workload.endpoint(), black_box(&body), now_ms, 1_767_225_600).map_err(
                    |r| anyhow!("{}: the filter's router rejected the body: {}", workload.name, r.body),
                )?;
            let elapsed = t0.elapsed().as_nanos() as u64;
            self.router.finish(&routed);
            if i >= warmup {
                route_ns.push(elapsed);
            }
        }
        route_ns.sort_unstable();
        Ok(route_ns.get(route_ns.len() / 2).copied().unwrap_or(0) as f64 / 1_000.0)
    }
}
