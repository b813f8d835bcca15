//! The load view of one worker: what its engine reports (through the agent) and what this proxy
//! itself has sent it and not yet seen finish.

use serde::{Deserialize, Serialize};

/// Telemetry of one GPU a worker uses (NVML figures, as the agent reads them).
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize)]
pub struct GpuStats {
    /// GPU index on its host.
    pub index: u32,
    /// Busy fraction of the last sample period, 0 to 1.
    pub utilization: f32,
    /// Device memory in use, bytes.
    pub memory_used_bytes: u64,
    /// Device memory in all, bytes.
    pub memory_total_bytes: u64,
    /// Power draw, watts.
    pub power_watts: f32,
    /// Core temperature, degrees Celsius.
    pub temperature_celsius: f32,
}

/// How loaded a worker is.
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize)]
pub struct WorkerLoad {
    /// Requests the engine is running (in the decode batch or prefilling).
    pub running: u32,
    /// Requests queued in the engine, not yet scheduled.
    pub waiting: u32,
    /// Fraction of KV-cache blocks in use, 0 to 1.
    pub kv_usage: f32,
    /// KV-cache capacity in blocks (0 when unknown).
    pub kv_capacity_blocks: u32,
    /// Requests this proxy sent and has not seen complete.
    pub inflight_requests: u32,
    /// Prompt tokens this proxy sent that the engine has not prefilled yet (no first byte back).
    pub inflight_prefill_tokens: u64,
    /// KV blocks the requests this proxy has in flight occupy (prompt plus expected output).
    pub inflight_blocks: u64,
    /// GPUs the worker uses; empty when there is no GPU telemetry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuStats>,
}

impl WorkerLoad {
    /// KV blocks the engine reports in use (0 when its capacity is unknown).
    pub fn engine_active_blocks(&self) -> u64 {
        (f64::from(self.kv_usage.clamp(0.0, 1.0)) * f64::from(self.kv_capacity_blocks)).round() as u64
    }

    /// Best estimate of KV blocks in use on the worker: the engine's figure, or what this proxy has in
    /// flight there if that is larger (the engine's report lags this proxy's own sends).
    pub fn active_blocks(&self) -> u64 {
        self.engine_active_blocks().max(self.inflight_blocks)
    }

    /// Records a request this proxy just sent.
    pub fn begin_request(&mut self, prefill_tokens: u64, blocks: u64) {
        self.inflight_requests += 1;
        self.inflight_prefill_tokens += prefill_tokens;
        self.inflight_blocks += blocks;
    }

    /// Records that a request's prefill finished (its first byte came back).
    pub fn prefill_done(&mut self, prefill_tokens: u64) {
        self.inflight_prefill_tokens = self.inflight_prefill_tokens.saturating_sub(prefill_tokens);
    }

    /// Records that a request completed (or failed); `prefill_tokens` is what is still counted of it.
    pub fn end_request(&mut self, prefill_tokens: u64, blocks: u64) {
        self.inflight_requests = self.inflight_requests.saturating_sub(1);
        self.inflight_prefill_tokens = self.inflight_prefill_tokens.saturating_sub(prefill_tokens);
        self.inflight_blocks = self.inflight_blocks.saturating_sub(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_blocks_prefers_the_larger_view() {
        let mut load = WorkerLoad { kv_usage: 0.5, kv_capacity_blocks: 1000, ..Default::default() };
        assert_eq!(load.active_blocks(), 500);
        load.begin_request(4096, 700);
        assert_eq!(load.active_blocks(), 700);
        load.end_request(4096, 700);
        assert_eq!(load.active_blocks(), 500);
        assert_eq!(load.inflight_requests, 0);
    }

    #[test]
    fn inflight_counts_never_underflow() {
        let mut load = WorkerLoad::default();
        load.end_request(10, 10);
        load.prefill_done(5);
        assert_eq!((load.inflight_requests, load.inflight_prefill_tokens, load.inflight_blocks), (0, 0, 0));
    }

    #[test]
    fn prefill_done_keeps_the_request_in_flight() {
        let mut load = WorkerLoad::default();
        load.begin_request(1000, 80);
        load.prefill_done(1000);
        assert_eq!(load.inflight_prefill_tokens, 0);
        assert_eq!(load.inflight_requests, 1);
        load.end_request(0, 80);
        assert_eq!(load.inflight_blocks, 0);
    }
}
