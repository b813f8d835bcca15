//! What the agent's tasks learn about the engine and share: block size and capacity (from metrics,
//! events or flags), LoRA adapters, liveness, and the KV stream's sequence number.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use tokio::sync::Notify;

/// Facts about the engine, written by the adapters and scrapers, read by the publishers.
#[derive(Debug, Default)]
pub struct EngineInfo {
    block_size_flag: u32,
    block_size_metrics: AtomicU32,
    block_size_events: AtomicU32,
    capacity_metrics: AtomicU64,
    capacity_events: AtomicU64,
    lora_adapters: Mutex<Option<Vec<String>>>,
    alive: AtomicBool,
    became_alive: Notify,
    kv_seq: AtomicU64,
}

impl EngineInfo {
    /// Info with the block size given on the command line (0: none), the engine presumed alive.
    pub fn new(block_size_flag: Option<u32>) -> EngineInfo {
        EngineInfo {
            block_size_flag: block_size_flag.unwrap_or(0),
            alive: AtomicBool::new(true),
            ..Default::default()
        }
    }

    /// Tokens per block: the engine's metrics (vLLM's `cache_config_info`, TRT-LLM's stats) win over
    /// its events, which win over `--block-size`; 0 while nothing says.
    pub fn block_size(&self) -> u32 {
        [&self.block_size_metrics, &self.block_size_events]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .find(|size| *size != 0)
            .unwrap_or(self.block_size_flag)
    }

    /// Records the block size the engine's metrics report.
    pub fn set_block_size_from_metrics(&self, size: u32) {
        self.block_size_metrics.store(size, Ordering::Relaxed);
    }

    /// Records the block size the engine's events state.
    pub fn set_block_size_from_events(&self, size: u32) {
        self.block_size_events.store(size, Ordering::Relaxed);
    }

    /// GPU KV blocks the engine has: from its metrics, else from its events; 0 while unknown.
    pub fn capacity_blocks(&self) -> u64 {
        match self.capacity_metrics.load(Ordering::Relaxed) {
            0 => self.capacity_events.load(Ordering::Relaxed),
            n => n,
        }
    }

    /// Records the capacity the engine's metrics report.
    pub fn set_capacity_from_metrics(&self, blocks: u64) {
        self.capacity_metrics.store(blocks, Ordering::Relaxed);
    }

    /// Records the capacity the engine's events announce (TRT-LLM's `created`).
    pub fn set_capacity_from_events(&self, blocks: u64) {
        self.capacity_events.store(blocks, Ordering::Relaxed);
    }

    /// LoRA adapters the engine has loaded (empty while unknown).
    pub fn lora_adapters(&self) -> Vec<String> {
        self.lora_adapters.lock().map(|l| l.clone().unwrap_or_default()).unwrap_or_default()
    }

    /// Records the loaded LoRA adapters.
    pub fn set_lora_adapters(&self, adapters: Vec<String>) {
        if let Ok(mut l) = self.lora_adapters.lock() {
            *l = Some(adapters);
        }
    }

    /// Whether the engine answered its last metrics scrape (always true without a metrics URL).
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Records whether the engine answers.
    pub fn set_alive(&self, alive: bool) {
        if !self.alive.swap(alive, Ordering::Relaxed) && alive {
            self.became_alive.notify_waiters();
        }
    }

    /// Resolves when the engine next starts answering (to register the worker at once).
    pub async fn became_alive(&self) {
        self.became_alive.notified().await;
    }

    /// Sequence number of the last KvEventBatch published in this epoch.
    pub fn kv_seq(&self) -> u64 {
        self.kv_seq.load(Ordering::Relaxed)
    }

    /// Records the last KvEventBatch sequence number published.
    pub fn set_kv_seq(&self, seq: u64) {
        self.kv_seq.store(seq, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_reported_block_size_wins() {
        let info = EngineInfo::new(Some(32));
        assert_eq!(info.block_size(), 32);
        info.set_block_size_from_events(16);
        assert_eq!(info.block_size(), 16);
        info.set_block_size_from_metrics(64);
        assert_eq!(info.block_size(), 64);
        assert_eq!(EngineInfo::new(None).block_size(), 0);
    }
}
