//! The running agent: engine adapters feed one state task, which translates and publishes KV events
//! and answers resync requests (so a snapshot is always consistent with the sequence number it
//! carries); a heartbeat task registers the worker; a load task scrapes the engine and NVML.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use kvmesh_proto::v1::{Heartbeat, LoadReport, ResyncRequest};
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use crate::blocks::WorkerBlocks;
use crate::config::{AgentConfig, EngineKind};
use crate::engines::{self, SourceMsg};
use crate::gpu::Gpus;
use crate::http::{HttpClient, sibling_url};
use crate::load::{EngineFigures, hit_rate, lora_from_models, read_figures};
use crate::publish::{DEFAULT_MAX_PAYLOAD, KvSequencer, Subjects, resync_chunks};
use crate::state::EngineInfo;
use crate::telemetry::{self, AgentMetrics};
use crate::{Error, telemetry::What};

/// Batches waiting between the adapters and the state task (a burst of a few thousand engine steps).
const SOURCE_QUEUE: usize = 4096;

/// How many load ticks between reads of `/v1/models` (LoRA adapters change rarely).
const MODELS_EVERY: u64 = 10;

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    gpus: Gpus,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let args = &config.args;
    let metrics = Arc::new(AgentMetrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let mut tasks = JoinSet::new();
    let stop = Arc::new(Notify::new());

    if let Some(addr) = args.metrics_listen {
        let listener = telemetry::bind(addr).await.map_err(|source| Error::MetricsListen { addr, source })?;
        let stop = Arc::clone(&stop);
        let registry = Arc::clone(&registry);
        tasks.spawn(async move {
            if let Err(e) = telemetry::serve(listener, registry, async move { stop.notified().await }).await {
                warn!(error = %e, "metrics listener stopped");
            }
        });
    }

    let client = async_nats::ConnectOptions::new()
        .name(format!("kvmesh-agent {}", config.worker_id))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(args.nats.as_str())
        .await
        .map_err(|e| Error::Nats { url: args.nats.clone(), reason: e.to_string() })?;
    let subjects = Subjects::new(&args.namespace, &config.worker_id);
    let epoch = new_epoch();
    info!(worker = %config.worker_id, epoch, nats = %args.nats, engine = ?args.engine, "agent starting");

    let info = Arc::new(EngineInfo::new(args.block_size));
    info.set_alive(args.metrics_url.is_none());
    metrics.engine_up.set(i64::from(info.alive()));
    let http = HttpClient::new(args.load_interval.max(Duration::from_secs(1)));

    let (tx, rx) = mpsc::channel(SOURCE_QUEUE);
    for endpoint in &config.zmq {
        tasks.spawn(engines::zmq::run(endpoint.clone(), tx.clone(), Arc::clone(&metrics)));
    }
    if let Some(url) = &config.trtllm_events {
        tasks.spawn(engines::trtllm::run(
            url.clone(),
            args.kv_poll_interval,
            http.clone(),
            tx.clone(),
            Arc::clone(&metrics),
            Arc::clone(&info),
        ));
    }
    drop(tx);

    tasks.spawn(heartbeats(
        client.clone(),
        subjects.clone(),
        config.clone(),
        epoch,
        Arc::clone(&info),
        Arc::clone(&metrics),
    ));
    tasks.spawn(load_reports(
        client.clone(),
        subjects.clone(),
        config.clone(),
        http,
        Arc::new(gpus),
        Arc::clone(&info),
        Arc::clone(&metrics),
    ));

    let state = StateTask {
        client: client.clone(),
        subjects,
        blocks: WorkerBlocks::new(),
        sequencer: KvSequencer::new(config.worker_id.clone(), epoch),
        dp_ranks: HashMap::new(),
        info,
        metrics,
    };
    state.run(rx, shutdown).await;

    info!(worker = %config.worker_id, "agent stopping");
    stop.notify_waiters();
    tasks.shutdown().await;
    if let Err(e) = tokio::time::timeout(Duration::from_secs(2), client.flush()).await.unwrap_or(Ok(())) {
        debug!(error = %e, "NATS flush at shutdown failed");
    }
    Ok(())
}

/// A random, non-zero agent incarnation.
fn new_epoch() -> u64 {
    let random = getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: the clock still tells incarnations apart.
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    random.max(1)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The server's payload limit (known once connected).
fn max_payload(client: &Client) -> usize {
    match client.server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD,
        n => n,
    }
}

/// Owns the worker's blocks: applies engine batches, publishes them, answers resyncs.
struct StateTask {
    client: Client,
    subjects: Subjects,
    blocks: WorkerBlocks,
    sequencer: KvSequencer,
    /// The data-parallel rank each publisher last wrote into its batches (vLLM numbers ranks
    /// globally; the agent numbers its publishers from 0).
    dp_ranks: HashMap<u32, u32>,
    info: Arc<EngineInfo>,
    metrics: Arc<AgentMetrics>,
}

impl StateTask {
    async fn run(mut self, mut rx: mpsc::Receiver<SourceMsg>, shutdown: impl Future<Output = ()> + Send) {
        let resync = match self.client.subscribe(self.subjects.resync.clone()).await {
            Ok(one) => match self.client.subscribe(self.subjects.resync_all.clone()).await {
                Ok(all) => Some(one.merge(all)),
                Err(e) => {
                    warn!(error = %e, "cannot subscribe to resync requests");
                    None
                }
            },
            Err(e) => {
                warn!(error = %e, "cannot subscribe to resync requests");
                None
            }
        };
        let mut resync = resync;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                Some(message) = rx.recv() => self.on_source(message).await,
                Some(request) = next_request(&mut resync) => self.on_resync(request).await,
            }
        }
    }

    async fn on_source(&mut self, message: SourceMsg) {
        let (dp_rank, changes) = match message {
            SourceMsg::Batch { rank, batch } => {
                let (changes, stats) = self.blocks.apply(rank, &batch);
                self.metrics.translate_skipped(stats);
                let dp_rank = *self.dp_ranks.entry(rank).or_insert(rank);
                let dp_rank = batch.dp_rank.unwrap_or(dp_rank);
                self.dp_ranks.insert(rank, dp_rank);
                (dp_rank, changes)
            }
            SourceMsg::Reset { rank, reason } => {
                info!(rank, reason = reason.label(), "dropping the rank's blocks");
                (
                    self.dp_ranks.get(&rank).copied().unwrap_or(rank),
                    self.blocks.reset_rank(rank).into_iter().collect(),
                )
            }
        };
        if let Some(size) = self.blocks.block_size() {
            self.info.set_block_size_from_events(size);
        }
        for batch in self.sequencer.batches(dp_rank, changes, max_payload(&self.client)) {
            match self.client.publish(self.subjects.kv.clone(), batch.encode_to_vec().into()).await {
                Ok(()) => {
                    self.metrics.published_batches.inc();
                }
                Err(e) => {
                    AgentMetrics::count(&self.metrics.publish_errors, "kv");
                    warn!(seq = batch.seq, error = %e, "cannot publish a KV event batch");
                }
            }
        }
        self.info.set_kv_seq(self.sequencer.last());
        self.metrics.kv_seq.set(self.sequencer.last() as i64);
        self.metrics.blocks.set(self.blocks.distinct_blocks() as i64);
    }

    async fn on_resync(&mut self, request: async_nats::Message) {
        let Some(reply) = request.reply else {
            debug!(subject = %request.subject, "resync request without a reply subject ignored");
            return;
        };
        let requester = ResyncRequest::decode(request.payload).map(|r| r.requester).unwrap_or_default();
        let snapshot = self.blocks.snapshot();
        let blocks = snapshot.len();
        let chunks = resync_chunks(
            self.sequencer.worker_id(),
            self.sequencer.epoch(),
            self.sequencer.last(),
            snapshot,
            max_payload(&self.client),
        );
        let count = chunks.len();
        for chunk in chunks {
            if let Err(e) = self.client.publish(reply.clone(), chunk.encode_to_vec().into()).await {
                AgentMetrics::count(&self.metrics.publish_errors, "resync");
                warn!(error = %e, "cannot answer a resync request");
                return;
            }
        }
        self.metrics.resync_requests.inc();
        info!(requester = %requester, blocks, chunks = count, seq = self.sequencer.last(), "answered a resync request");
    }
}

/// The next resync request, or never when there is no subscription.
async fn next_request(
    resync: &mut Option<impl tokio_stream::Stream<Item = async_nats::Message> + Unpin>,
) -> Option<async_nats::Message> {
    match resync {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// Publishes the worker's Heartbeat every ttl/3 while its engine answers.
async fn heartbeats(
    client: Client,
    subjects: Subjects,
    config: AgentConfig,
    epoch: u64,
    info: Arc<EngineInfo>,
    metrics: Arc<AgentMetrics>,
) {
    let args = &config.args;
    let mut tick = tokio::time::interval((args.ttl / 3).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sending = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = info.became_alive() => {}
        }
        if !info.alive() {
            if std::mem::replace(&mut sending, false) {
                warn!(
                    "engine does not answer its metrics endpoint: heartbeats paused, the worker will expire"
                );
            }
            continue;
        }
        if !std::mem::replace(&mut sending, true) {
            info!(subject = %subjects.worker, "registering the worker (heartbeats every ttl/3)");
        }
        let heartbeat = Heartbeat {
            worker_id: config.worker_id.clone(),
            address: args.address.clone().unwrap_or_default(),
            model: args.model.clone(),
            engine: args.engine.to_proto() as i32,
            role: args.role.to_proto() as i32,
            block_size: info.block_size(),
            tokenizer_id: args.tokenizer_id.clone(),
            ttl_ms: u32::try_from(args.ttl.as_millis()).unwrap_or(u32::MAX),
            epoch,
            kv_seq: info.kv_seq(),
            lora_adapters: info.lora_adapters(),
        };
        if let Err(e) = client.publish(subjects.worker.clone(), heartbeat.encode_to_vec().into()).await {
            AgentMetrics::count(&metrics.publish_errors, "heartbeat");
            debug!(error = %e, "cannot publish a heartbeat");
        }
    }
}

/// Scrapes the engine and the GPUs every `--load-interval` and publishes a LoadReport.
async fn load_reports(
    client: Client,
    subjects: Subjects,
    config: AgentConfig,
    http: HttpClient,
    gpus: Arc<Gpus>,
    info: Arc<EngineInfo>,
    metrics: Arc<AgentMetrics>,
) {
    let args = &config.args;
    let mut tick = tokio::time::interval(args.load_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let models_url = match args.engine {
        EngineKind::Vllm | EngineKind::Sglang => {
            args.metrics_url.as_deref().and_then(|u| sibling_url(u, "/v1/models"))
        }
        EngineKind::Trtllm => None,
    };
    let mut previous: Option<EngineFigures> = None;
    let mut failing = false;
    for round in 0u64.. {
        tick.tick().await;
        let figures = match &args.metrics_url {
            None => EngineFigures::default(),
            Some(url) => match scrape(&http, url, previous.as_ref()).await {
                Ok(figures) => {
                    if std::mem::replace(&mut failing, false) {
                        info!(url = %url, "engine metrics answer again");
                    }
                    info.set_alive(true);
                    metrics.engine_up.set(1);
                    figures
                }
                Err(e) => {
                    AgentMetrics::count(&metrics.scrape_errors, "metrics");
                    if !std::mem::replace(&mut failing, true) {
                        warn!(url = %url, error = %e, "cannot read the engine's metrics");
                    }
                    info.set_alive(false);
                    metrics.engine_up.set(0);
                    continue;
                }
            },
        };
        if let Some(size) = figures.block_size {
            info.set_block_size_from_metrics(size);
        }
        if let Some(blocks) = figures.capacity_blocks {
            info.set_capacity_from_metrics(blocks);
        }
        let mut adapters = figures.lora_adapters.clone();
        if let Some(url) = models_url.as_deref().filter(|_| round % MODELS_EVERY == 0)
            && let Ok(body) = http.get(url).await
            && let Some(loaded) = lora_from_models(&body)
        {
            let mut all = adapters.unwrap_or_default();
            all.extend(loaded);
            all.sort();
            all.dedup();
            adapters = Some(all);
        }
        if let Some(adapters) = adapters {
            info.set_lora_adapters(adapters);
        }
        let gpu_stats = {
            let gpus = Arc::clone(&gpus);
            match tokio::task::spawn_blocking(move || gpus.read()).await {
                Ok(readings) => readings.iter().map(|r| r.to_proto()).collect(),
                Err(_) => {
                    AgentMetrics::count(&metrics.scrape_errors, "gpu");
                    Vec::new()
                }
            }
        };
        let report = LoadReport {
            worker_id: config.worker_id.clone(),
            running: count(figures.running),
            waiting: count(figures.waiting),
            kv_usage: figures.kv_usage.map_or(0.0, |u| u.clamp(0.0, 1.0) as f32),
            kv_capacity_blocks: u32::try_from(info.capacity_blocks()).unwrap_or(u32::MAX),
            gpus: gpu_stats,
            prefix_cache_hit_rate: hit_rate(previous.as_ref(), &figures).map(|r| r as f32),
            observed_at_ms: now_ms(),
        };
        if let Err(e) = client.publish(subjects.load.clone(), report.encode_to_vec().into()).await {
            metrics.publish_errors.get_or_create(&What { what: "load" }).inc();
            debug!(error = %e, "cannot publish a load report");
        }
        previous = Some(figures);
    }
}

/// One scrape. TensorRT-LLM's drained stats may be empty (an idle engine): then the previous figures
/// stand, with nothing running or waiting.
async fn scrape(
    http: &HttpClient,
    url: &str,
    previous: Option<&EngineFigures>,
) -> Result<EngineFigures, String> {
    let body = http.get(url).await.map_err(|e| e.to_string())?;
    match read_figures(&body).map_err(|e| e.to_string())? {
        Some(figures) => Ok(figures),
        None => Ok(EngineFigures {
            running: Some(0.0),
            waiting: Some(0.0),
            ..previous.cloned().unwrap_or_default()
        }),
    }
}

fn count(value: Option<f64>) -> u32 {
    value.filter(|v| v.is_finite() && *v > 0.0).map_or(0, |v| v.round().min(f64::from(u32::MAX)) as u32)
}
