//! Simulated inference engine: an OpenAI-compatible worker whose prefix cache, queues and timing
//! behave like vLLM's, and whose KV events, metrics and P/D fields use the real engines' wire formats
//! (vLLM, SGLang, TensorRT-LLM), so the whole system runs without GPUs.
//!
//! It must stay faithful where routing cares (which blocks are cached, when they are evicted, how
//! loaded the worker is, what the wire says) and cheap everywhere else: no model runs, generated
//! text is filler. [`start`] runs one worker inside the caller's tokio runtime (tests), [`run`] is
//! `kvmesh sim`.

#![warn(missing_docs)]
pub mod cache;
pub mod config;
pub mod engine_hash;
pub mod events;
pub mod metrics;
pub mod pd;
pub mod prompt;
pub mod scheduler;
pub mod server;
pub mod timing;
pub mod worker;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use cache::{CacheEvent, CacheFull, PagedCache, SeqBlocks};
pub use config::{ConfigError, EngineKind, Role, SimArgs, SimConfig};

use crate::events::msgpack::Layout;
use crate::events::trtllm::TrtllmEventQueue;
use crate::events::zmq::{self as zmq_events, ZmqEndpoints};
use crate::metrics::Metrics;
use crate::pd::HoldRegistry;
use crate::prompt::{ModelTokenizer, PromptTokenizer, WordTokenizer, default_tokenizer_dir};
use crate::scheduler::{Limits, Scheduler};
use crate::server::App;
use crate::worker::{Command, EngineShared, EventSink, SimClock};

/// Why the sim could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A flag is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The tokenizer could not be loaded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The KV event sockets could not be set up.
    #[error(transparent)]
    Events(#[from] zmq_events::PublisherError),
    /// A listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The async runtime could not be built.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// A worker running inside the current tokio runtime.
pub struct RunningSim {
    /// The HTTP address it serves on.
    pub addr: SocketAddr,
    /// Its KV event sockets, with ports resolved, when events are on.
    pub kv_endpoints: Option<ZmqEndpoints>,
    /// The KV transfer side channel's port (SGLang's bootstrap port), when it serves one.
    pub transfer_port: Option<u16>,
    shutdown: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningSim {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the worker and waits for its tasks.
    pub async fn shutdown(mut self) {
        for tx in self.shutdown.drain(..) {
            let _ = tx.send(());
        }
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn load_tokenizer(config: &SimConfig) -> Result<Arc<dyn PromptTokenizer>, SimError> {
    if let Some(t) = &config.tokenizer {
        return Ok(t.clone());
    }
    let dir = config.args.tokenizer_dir.clone().or_else(default_tokenizer_dir);
    match dir {
        Some(dir) => Ok(Arc::new(ModelTokenizer::load(&dir).map_err(SimError::Tokenizer)?)),
        None => {
            tracing::warn!(
                "no tokenizer files: token ids come from a built-in word tokenizer, not a real model's"
            );
            Ok(Arc::new(WordTokenizer::default()))
        }
    }
}

/// Starts one worker in the current tokio runtime.
pub async fn start(config: SimConfig) -> Result<RunningSim, SimError> {
    config.validate()?;
    let a = config.args.clone();
    let tokenizer = load_tokenizer(&config)?;
    let filler: Arc<[u32]> = tokenizer.filler().iter().map(|(id, _)| *id).collect();
    let filler_text: HashMap<u32, String> = tokenizer.filler().iter().cloned().collect();
    let mut shutdown = Vec::new();
    let mut tasks = Vec::new();

    // Every listening socket is bound before any task starts, so a failed start leaves nothing running.
    let addr = format!("{}:{}", a.host, a.port);
    let listener =
        TcpListener::bind(&addr).await.map_err(|source| SimError::Bind { addr: addr.clone(), source })?;
    let local = listener.local_addr().map_err(|source| SimError::Bind { addr, source })?;
    let transfer_addr = format!("{}:{}", a.host, config.kv_transfer_port());
    let transfer_listener = if a.role == Role::Prefill || a.kv_transfer_port.is_some() {
        let bound = TcpListener::bind(&transfer_addr).await;
        Some(bound.map_err(|source| SimError::Bind { addr: transfer_addr.clone(), source })?)
    } else {
        None
    };

    let (sink, kv_endpoints, trtllm_events) = match (a.engine, &a.kv_events_endpoint) {
        (EngineKind::Trtllm, _) => {
            let q = TrtllmEventQueue::new(a.trtllm_event_buffer, a.max_model_len, a.block_size, a.kv_blocks);
            (EventSink::Trtllm, None, Some(Mutex::new(q)))
        }
        (engine, Some(endpoint)) => {
            let (tx, rx) = oneshot::channel();
            shutdown.push(tx);
            let (publisher, endpoints) = zmq_events::start(
                endpoint,
                a.kv_replay_endpoint.as_deref(),
                &a.kv_events_topic,
                a.kv_events_buffer_steps,
                rx,
            )
            .await?;
            let layout = if engine == EngineKind::Sglang { Layout::Sglang } else { Layout::Vllm };
            (EventSink::Zmq { publisher, layout }, Some(endpoints), None)
        }
        (_, None) => (EventSink::None, None, None),
    };

    let clock = SimClock::new(a.speedup);
    let shared = Arc::new(EngineShared {
        load: Mutex::new(Default::default()),
        metrics: Metrics::new(a.engine, &a.model),
        trtllm_events,
        iteration_stats: Mutex::new(VecDeque::new()),
        holds: Arc::new(HoldRegistry::default()),
        awaiting_transfer: AtomicUsize::new(0),
        clock,
    });
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();

    // The KV transfer side channel: prefill workers serve it (or any worker given the flag).
    let transfer_port = if let Some(listener) = transfer_listener {
        let port =
            listener.local_addr().map_err(|source| SimError::Bind { addr: transfer_addr, source })?.port();
        let (release_tx, mut release_rx) = mpsc::unbounded_channel::<String>();
        let cmd = cmd_tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(key) = release_rx.recv().await {
                if cmd.send(Command::Release(key)).is_err() {
                    break;
                }
            }
        }));
        let wait = clock.real(a.kv_lease_secs);
        tasks.push(tokio::spawn(pd::serve_transfers(listener, shared.holds.clone(), release_tx, wait)));
        Some(port)
    } else {
        None
    };

    let duplicates = a.engine == EngineKind::Vllm;
    let sched = Scheduler::new(
        PagedCache::new(a.block_size, a.kv_blocks, duplicates),
        config.hash_algo(),
        config.timing(),
        Limits {
            max_num_seqs: a.max_num_seqs,
            max_num_batched_tokens: a.max_num_batched_tokens,
            lease_seconds: a.kv_lease_secs,
        },
        filler,
    );
    tasks.push(tokio::spawn(worker::run_engine(
        sched,
        cmd_rx,
        shared.clone(),
        sink,
        a.engine,
        a.max_num_seqs,
        a.max_num_batched_tokens,
    )));

    let advertise_host =
        if local.ip().is_unspecified() { "127.0.0.1".to_owned() } else { local.ip().to_string() };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let app = Arc::new(App {
        tokenizer: tokenizer.clone(),
        filler_text,
        cmd: cmd_tx,
        shared,
        next_id: AtomicU64::new(0),
        inflight: AtomicUsize::new(0),
        kv_endpoints: kv_endpoints.clone(),
        transfer_port,
        advertise_host,
        engine_id: format!("sim-{}-{:x}-{}", a.engine.name(), a.seed, local.port()),
        created,
        args: a.clone(),
    });
    let (http_tx, http_rx) = oneshot::channel::<()>();
    shutdown.push(http_tx);
    let router = server::router(app);
    tasks.push(tokio::spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(async {
            let _ = http_rx.await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    }));
    tracing::info!(
        engine = a.engine.name(),
        role = ?a.role,
        addr = %local,
        tokenizer = %tokenizer.source(),
        kv_events = ?kv_endpoints,
        transfer_port = ?transfer_port,
        "simulated worker ready"
    );
    Ok(RunningSim { addr: local, kv_endpoints, transfer_port, shutdown, tasks })
}

/// `kvmesh sim`: runs one worker until Ctrl-C.
pub fn run(args: SimArgs) -> Result<(), SimError> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .try_init();
    let config = SimConfig::new(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(SimError::Runtime)?;
    runtime.block_on(async {
        let sim = start(config).await?;
        shutdown_signal().await;
        sim.shutdown().await;
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM (what `kvmesh serve` and process managers send).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot wait for SIGTERM; only Ctrl-C stops the sim");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        result = tokio::signal::ctrl_c() => {
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot wait for Ctrl-C; stopping");
            }
        }
        () = terminate => {}
    }
}
