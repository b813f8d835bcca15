//! The engine loop: runs scheduler steps in simulated time, sleeping so that a step of `d`
//! simulated seconds takes `d / speedup` real seconds, and publishes what each step produced
//! (tokens to requests, KV events, metrics, TRT-LLM iteration stats).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::EngineKind;
use crate::events::msgpack::{Layout, encode_batch};
use crate::events::trtllm::TrtllmEventQueue;
use crate::events::zmq::PublisherHandle;
use crate::metrics::{LoadSnapshot, Metrics};
use crate::pd::HoldRegistry;
use crate::scheduler::{Scheduler, SeqSpec, StepResult};

/// Iteration stats kept for TRT-LLM's `GET /metrics` until read.
const MAX_ITERATION_STATS: usize = 1000;

/// Simulated time: real time since start, times the speedup.
#[derive(Clone, Copy, Debug)]
pub struct SimClock {
    start: Instant,
    speedup: f64,
}

impl SimClock {
    /// A clock starting now.
    pub fn new(speedup: f64) -> Self {
        SimClock { start: Instant::now(), speedup }
    }

    /// Simulated seconds since start.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * self.speedup
    }

    /// The real instant of simulated time `t`.
    pub fn instant(&self, t: f64) -> Instant {
        self.start + Duration::from_secs_f64((t / self.speedup).max(0.0))
    }

    /// The real duration of `secs` simulated seconds.
    pub fn real(&self, secs: f64) -> Duration {
        Duration::from_secs_f64((secs / self.speedup).max(0.0))
    }
}

/// What the HTTP side asks of the engine.
#[derive(Debug)]
pub enum Command {
    /// Queue sequences.
    Submit(Vec<SeqSpec>),
    /// Abort sequences by id (the client went away).
    Abort(Vec<u64>),
    /// A decode worker pulled the KV held under this key.
    Release(String),
    /// Drop the prefix cache if idle; answers whether it did.
    Reset(oneshot::Sender<bool>),
}

/// State the engine loop publishes for the HTTP side.
pub struct EngineShared {
    /// The latest load.
    pub load: Mutex<LoadSnapshot>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// TRT-LLM's KV event queue (TRT-LLM mode only).
    pub trtllm_events: Option<Mutex<TrtllmEventQueue>>,
    /// TRT-LLM's iteration stats, JSON, until read.
    pub iteration_stats: Mutex<VecDeque<String>>,
    /// KV held for decode workers.
    pub holds: Arc<HoldRegistry>,
    /// Decode requests waiting for KV from a prefill worker.
    pub awaiting_transfer: std::sync::atomic::AtomicUsize,
    /// The simulated clock.
    pub clock: SimClock,
}

/// Where KV events go.
pub enum EventSink {
    /// Nowhere (events off).
    None,
    /// vLLM/SGLang msgpack batches on ZMQ.
    Zmq {
        /// The publisher.
        publisher: PublisherHandle,
        /// The layout.
        layout: Layout,
    },
    /// TRT-LLM's JSON queue in [`EngineShared::trtllm_events`].
    Trtllm,
}

/// Runs the engine until every command sender is dropped.
pub async fn run_engine(
    mut sched: Scheduler,
    mut rx: mpsc::UnboundedReceiver<Command>,
    shared: Arc<EngineShared>,
    sink: EventSink,
    engine: EngineKind,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
) {
    let clock = shared.clock;
    let mut busy_until = 0.0_f64;
    let mut iteration = 0u64;
    publish_load(&sched, &shared, 0.0);
    loop {
        loop {
            match rx.try_recv() {
                Ok(cmd) => handle(&mut sched, &shared, &sink, cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        let now = clock.now().max(busy_until);
        for key in sched.expire(now) {
            shared.holds.remove(&key);
        }
        if let Some(result) = sched.step(now) {
            busy_until = now + result.duration;
            tokio::time::sleep_until(clock.instant(busy_until).into()).await;
            iteration += 1;
            deliver(&sched, &shared, &sink, result, iteration, engine, max_num_seqs, max_num_batched_tokens);
            continue;
        }
        publish_load(&sched, &shared, 0.0);
        let expiry = sched.next_expiry().map(|t| clock.instant(t));
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => handle(&mut sched, &shared, &sink, cmd),
                None => return,
            },
            _ = sleep_opt(expiry) => {}
        }
    }
}

async fn sleep_opt(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn handle(sched: &mut Scheduler, shared: &EngineShared, sink: &EventSink, cmd: Command) {
    match cmd {
        Command::Submit(specs) => {
            for spec in specs {
                sched.submit(spec);
            }
        }
        Command::Abort(ids) => {
            for id in ids {
                sched.abort(id);
            }
        }
        Command::Release(key) => {
            sched.release(&key);
        }
        Command::Reset(reply) => {
            let done = sched.reset_cache();
            publish_events(shared, sink, &sched.take_events(), sched.cache().block_size());
            let _ = reply.send(done);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn deliver(
    sched: &Scheduler,
    shared: &EngineShared,
    sink: &EventSink,
    mut result: StepResult,
    iteration: u64,
    engine: EngineKind,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
) {
    for (tx, update) in std::mem::take(&mut result.updates) {
        // A closed receiver means the client left; its abort command is on the way.
        let _ = tx.send(update);
    }
    publish_events(shared, sink, &result.events, sched.cache().block_size());
    for (key, info) in std::mem::take(&mut result.holds) {
        shared.holds.insert(key, info);
    }
    for f in &result.finished {
        shared.metrics.record_finished(f);
    }
    let generated = result.shape.decode_seqs + result.prefill_seqs;
    let throughput = if result.duration > 0.0 { generated as f64 / result.duration } else { 0.0 };
    publish_load(sched, shared, throughput);
    if engine == EngineKind::Trtllm {
        push_iteration_stats(sched, shared, &result, iteration, max_num_seqs, max_num_batched_tokens);
    }
}

fn publish_events(
    shared: &EngineShared,
    sink: &EventSink,
    events: &[crate::cache::CacheEvent],
    block_size: usize,
) {
    if events.is_empty() {
        return;
    }
    match sink {
        EventSink::None => {}
        EventSink::Zmq { publisher, layout } => {
            let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            publisher.publish(encode_batch(*layout, ts, events, block_size, 0));
        }
        EventSink::Trtllm => {
            if let Some(q) = &shared.trtllm_events
                && let Ok(mut q) = q.lock()
            {
                q.extend(events);
            }
        }
    }
}

fn publish_load(sched: &Scheduler, shared: &EngineShared, gen_throughput: f64) {
    let cache = sched.cache();
    let load = LoadSnapshot {
        running: sched.running(),
        waiting: sched.waiting(),
        prefilling: sched.running_prefills(),
        used_blocks: cache.used_blocks(),
        total_blocks: cache.capacity(),
        block_size: cache.block_size(),
        gen_throughput,
        awaiting_transfer: shared.awaiting_transfer.load(std::sync::atomic::Ordering::Relaxed),
        holding: shared.holds.len(),
    };
    shared.metrics.update(&load, &sched.totals());
    if let Ok(mut l) = shared.load.lock() {
        *l = load;
    }
}

/// One entry of TRT-LLM's iteration stats (`llm.get_stats_async`), with the fields routers read.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IterationStats {
    iter: u64,
    iter_latency_m_s: f64,
    timestamp: String,
    num_active_requests: usize,
    num_queued_requests: usize,
    num_completed_requests: usize,
    max_num_active_requests: usize,
    max_batch_size_static: usize,
    max_batch_size_runtime: usize,
    max_num_tokens_static: usize,
    max_num_tokens_runtime: usize,
    gpu_mem_usage: u64,
    cpu_mem_usage: u64,
    pinned_mem_usage: u64,
    kv_cache_stats: KvCacheStats,
    inflight_batching_stats: InflightBatchingStats,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KvCacheStats {
    max_num_blocks: usize,
    free_num_blocks: usize,
    used_num_blocks: usize,
    tokens_per_block: usize,
    alloc_total_blocks: usize,
    alloc_new_blocks: u64,
    reused_blocks: u64,
    missed_blocks: u64,
    cache_hit_rate: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InflightBatchingStats {
    num_scheduled_requests: usize,
    num_context_requests: usize,
    num_gen_requests: usize,
    num_paused_requests: usize,
    num_ctx_tokens: usize,
    micro_batch_id: u32,
    avg_num_decoded_tokens_per_iter: f64,
}

fn push_iteration_stats(
    sched: &Scheduler,
    shared: &EngineShared,
    result: &StepResult,
    iteration: u64,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
) {
    let cache = sched.cache();
    let totals = sched.totals();
    let missed = totals.blocks_queried.saturating_sub(totals.blocks_reused);
    let stats = IterationStats {
        iter: iteration,
        // camelCase turns `iter_latency_m_s` into TRT-LLM's "iterLatencyMS".
        iter_latency_m_s: result.duration * 1e3,
        timestamp: format!("{:.6}", shared.clock.now()),
        num_active_requests: sched.running(),
        num_queued_requests: sched.waiting(),
        num_completed_requests: result.finished.len(),
        max_num_active_requests: max_num_seqs,
        max_batch_size_static: max_num_seqs,
        max_batch_size_runtime: max_num_seqs,
        max_num_tokens_static: max_num_batched_tokens,
        max_num_tokens_runtime: max_num_batched_tokens,
        gpu_mem_usage: 0,
        cpu_mem_usage: 0,
        pinned_mem_usage: 0,
        kv_cache_stats: KvCacheStats {
            max_num_blocks: cache.capacity(),
            free_num_blocks: cache.free_blocks(),
            used_num_blocks: cache.used_blocks(),
            tokens_per_block: cache.block_size(),
            alloc_total_blocks: cache.used_blocks(),
            alloc_new_blocks: totals.blocks_allocated,
            reused_blocks: totals.blocks_reused,
            missed_blocks: missed,
            cache_hit_rate: if totals.blocks_queried == 0 {
                0.0
            } else {
                totals.blocks_reused as f64 / totals.blocks_queried as f64
            },
        },
        inflight_batching_stats: InflightBatchingStats {
            num_scheduled_requests: result.prefill_seqs + result.shape.decode_seqs,
            num_context_requests: result.prefill_seqs,
            num_gen_requests: result.shape.decode_seqs,
            num_paused_requests: 0,
            num_ctx_tokens: result.shape.prefill_tokens,
            micro_batch_id: 0,
            avg_num_decoded_tokens_per_iter: 1.0,
        },
    };
    let Ok(json) = serde_json::to_string(&stats) else { return };
    if let Ok(mut q) = shared.iteration_stats.lock() {
        if q.len() == MAX_ITERATION_STATS {
            q.pop_front();
        }
        q.push_back(json);
    }
}
