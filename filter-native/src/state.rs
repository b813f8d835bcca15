//! The control plane's state in the native module. Envoy's worker threads share the module's
//! memory, so one connection serves the whole process: a thread of the module's own holds the
//! gRPC stream (`kvmesh.v1.State/Subscribe`), fetches models' files (`GetModelAssets`), and
//! relays both into an in-process store with the Wasm filter's relay ([`Publisher`]). Every worker
//! thread's router keeps its own [`Follower`] of that store, as a Wasm VM does of shared data, but
//! the connection thread does the following: after each message it applies what changed to every
//! worker's router (each behind a mutex its worker takes per request), so the request path does no
//! state work at all. A request arriving during an apply waits for it (tens of µs).
//!
//! Tokenizers load once per process: the connection thread keeps the process's router ([`Shared`]
//! `loaded`, from which worker threads fork theirs) following the state too, loads the files of
//! every model it wants there, and worker routers adopt the loaded models ([`Router::adopt_models`])
//! instead of loading their own. Locks are taken in one order: `loaded`, then a worker's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvmesh_filter::flow::Settings;
use kvmesh_filter::metrics::{Metrics, StreamMetrics};
use kvmesh_filter::relay::{Follower, Polled, Publisher, Received, SharedStore, assets_key};
use kvmesh_filter::router::Router;
use kvmesh_filter::stats::StatsSink;
use kvmesh_proto::v1 as pb;
use kvmesh_proto::v1::state_client::StateClient;
use prost::Message;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

/// Longest wait between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A stream silent for this long is presumed dead and reopened (the control plane sends a
/// heartbeat every second by default).
const SILENT_STREAM: Duration = Duration::from_secs(10);
/// Wait before asking again for a model's files after a failed fetch.
const ASSETS_RETRY: Duration = Duration::from_secs(5);
/// Largest message taken from the control plane (a model's files arrive in one).
const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Milliseconds since the Unix epoch: the clock the request path judges staleness by.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The relay's store, in this process's memory (the Wasm filter's is Envoy's shared data).
#[derive(Default)]
pub(crate) struct ProcessStore(RwLock<HashMap<String, Vec<u8>>>);

/// A handle on a [`ProcessStore`] for the relay, which writes through `&mut`.
pub(crate) struct StoreRef<'a>(pub(crate) &'a ProcessStore);

impl SharedStore for StoreRef<'_> {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        // A writer that panicked left whole values behind (one insert): the map is still usable.
        self.0.0.read().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        self.0.0.write().unwrap_or_else(PoisonError::into_inner).insert(key.to_owned(), value.to_vec());
        Ok(())
    }
}

/// What the connection thread and the worker threads share.
pub(crate) struct Shared {
    /// The relayed state and models' files.
    pub(crate) store: ProcessStore,
    /// The process's router: the static models loaded at start, the control plane's loaded by the
    /// connection thread; worker threads fork from it and adopt its models.
    pub(crate) loaded: Mutex<Router>,
    /// One per Envoy worker thread, by its index, made on the thread's first request.
    pub(crate) workers: Box<[OnceLock<WorkerState>]>,
}

/// What one Envoy worker thread routes with.
pub(crate) struct WorkerState {
    /// `None` when it failed to build (logged): that thread's requests then pass unrouted.
    pub(crate) router: Option<Mutex<Routing>>,
    pub(crate) settings: Settings,
}

/// A worker thread's router and its reader of the relayed state (with `state`).
pub(crate) struct Routing {
    pub(crate) router: Router,
    follower: Option<Follower>,
    /// How long the connection thread's applies took, µs, for the worker to record: Envoy's
    /// histograms are per Envoy thread, and recording from another thread crashes Envoy
    /// (counters and gauges are atomic and safe anywhere). Bounded: past it, times are not kept.
    apply_times: Vec<u64>,
}

/// Apply times a worker keeps until its next request records them.
const MAX_APPLY_TIMES: usize = 64;

impl Routing {
    /// A worker's `router`; one that `follows` the control plane catches up with `store` at once
    /// (the connection thread brings it along from then on), and says what that applied.
    pub(crate) fn new(mut router: Router, follows: bool, store: &ProcessStore) -> (Routing, Option<Polled>) {
        let mut polled = None;
        let follower = follows.then(|| {
            let mut follower = Follower::default();
            polled = Some(follower.poll(&StoreRef(store), &mut router));
            router.set_state_heard_at(follower.heard_at_ms());
            follower
        });
        (Routing { router, follower, apply_times: Vec::new() }, polled)
    }

    /// The apply times noted since the last call (the worker thread records them).
    pub(crate) fn take_apply_times(&mut self) -> Option<Vec<u64>> {
        (!self.apply_times.is_empty()).then(|| std::mem::take(&mut self.apply_times))
    }

    /// Applies what was relayed since the last time and adopts the loaded models this router
    /// still lacks; `None` for a router that does not follow the control plane.
    fn follow(&mut self, store: &ProcessStore, loaded: &Router) -> Option<Polled> {
        let follower = self.follower.as_mut()?;
        let polled = follower.poll(&StoreRef(store), &mut self.router);
        self.router.set_state_heard_at(follower.heard_at_ms());
        if !self.router.models_wanted().is_empty() {
            self.router.adopt_models(loaded);
        }
        Some(polled)
    }
}

impl Shared {
    /// Brings every worker's router up to the relayed state (the connection thread, after each
    /// message), calling `applied` with what each poll applied; how long each took is kept for
    /// the worker to record.
    fn follow_workers(&self, mut applied: impl FnMut(&Polled, &Router)) {
        let loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        for worker in self.workers.iter().filter_map(OnceLock::get) {
            let Some(Ok(mut routing)) = worker.router.as_ref().map(Mutex::lock) else { continue };
            let started = Instant::now();
            if let Some(polled) = routing.follow(&self.store, &loaded) {
                let took = started.elapsed();
                if (polled.snapshot || polled.deltas > 0) && routing.apply_times.len() < MAX_APPLY_TIMES {
                    routing.apply_times.push(took.as_micros() as u64);
                }
                applied(&polled, &routing.router);
            }
        }
    }
}

/// What the connection thread needs beside [`Shared`].
pub(crate) struct Link<S> {
    /// The control plane's gRPC endpoint.
    pub(crate) address: String,
    /// This Envoy's name in the subscription.
    pub(crate) node: String,
    /// First wait before reconnecting (doubles up to [`MAX_BACKOFF`]).
    pub(crate) retry: Duration,
    /// Timeout of a model-files request.
    pub(crate) assets_timeout: Duration,
    /// The stream's metrics.
    pub(crate) metrics: StreamMetrics<S>,
    /// The filter's, for the process's model loads (`kvmesh_filter_model_loads_total`).
    pub(crate) filter_metrics: Arc<Metrics<S>>,
}

/// The running connection thread; dropping it stops the thread and waits for it.
pub(crate) struct Connection {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            // Stops at its next await (a model load in progress finishes first): the metrics it
            // updates belong to the configuration being destroyed.
            let _ = thread.join();
        }
    }
}

/// Starts the connection thread.
pub(crate) fn connect<S: StatsSink + Send + Sync + 'static>(
    link: Link<S>,
    shared: Arc<Shared>,
) -> std::io::Result<Connection> {
    let (stop, stopped) = watch::channel(false);
    let thread = std::thread::Builder::new().name("kvmesh-state".to_owned()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                log::error!("kvmesh dynamic module: no runtime for the control plane's stream: {e}");
                return;
            }
        };
        let mut connection = Follow::new(link, shared);
        runtime.block_on(connection.run(stopped));
    })?;
    Ok(Connection { stop, thread: Some(thread) })
}

/// How one subscription ended.
enum Ended {
    /// The module is being unloaded.
    Stopped,
    /// Subscribe again at once (a gap in the versions).
    Resubscribe,
    /// The stream failed or closed: subscribe again after the backoff.
    Closed(String),
}

/// The connection thread's state.
struct Follow<S> {
    link: Link<S>,
    shared: Arc<Shared>,
    publisher: Publisher,
    /// The process router's reader of the relayed state.
    follower: Follower,
    backoff: Duration,
    /// When a model whose files failed may be asked for again.
    retry_assets_at: HashMap<String, Instant>,
    /// Assets generation at which each wanted model was last tried, so a failing load is not
    /// retried on every message but again when new files arrive.
    tried: HashMap<String, u64>,
    assets_generation: u64,
}

impl<S: StatsSink> Follow<S> {
    fn new(link: Link<S>, shared: Arc<Shared>) -> Follow<S> {
        let backoff = link.retry.max(Duration::from_millis(1));
        Follow {
            link,
            shared,
            publisher: Publisher::new(None),
            follower: Follower::default(),
            backoff,
            retry_assets_at: HashMap::new(),
            tried: HashMap::new(),
            assets_generation: 0,
        }
    }

    /// Subscribes, and again whenever the stream ends, until told to stop.
    async fn run(&mut self, mut stop: watch::Receiver<bool>) {
        loop {
            match self.subscribe(&mut stop).await {
                Ended::Stopped => return,
                Ended::Resubscribe => continue,
                Ended::Closed(why) => {
                    self.link.metrics.set_connected(false);
                    log::warn!(
                        "kvmesh dynamic module: state stream to {} closed ({why}); retrying in {} ms",
                        self.link.address,
                        self.backoff.as_millis()
                    );
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One subscription, from the last relayed version, until it ends.
    async fn subscribe(&mut self, stop: &mut watch::Receiver<bool>) -> Ended {
        let channel = match Endpoint::from_shared(self.link.address.clone()) {
            Ok(endpoint) => endpoint.connect_timeout(CONNECT_TIMEOUT),
            Err(e) => return Ended::Closed(format!("bad address: {e}")),
        };
        let channel = tokio::select! {
            _ = stop.changed() => return Ended::Stopped,
            connected = channel.connect() => match connected {
                Ok(channel) => channel,
                Err(e) => return Ended::Closed(format!("cannot connect: {e}")),
            },
        };
        // A model's files are megabytes (Qwen3's canonical tokenizer is about 5 MB).
        let mut client = StateClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (epoch, version) = self.publisher.resume_point();
        let request = pb::SubscribeRequest { node: self.link.node.clone(), epoch, version };
        let mut stream = tokio::select! {
            _ = stop.changed() => return Ended::Stopped,
            opened = client.subscribe(request) => match opened {
                Ok(response) => response.into_inner(),
                Err(status) => return Ended::Closed(format!("subscribe refused: {status}")),
            },
        };
        log::info!(
            "kvmesh dynamic module: subscribed to the control plane at {} (epoch {epoch}, version {version})",
            self.link.address
        );
        self.link.metrics.opened();
        loop {
            let message = tokio::select! {
                _ = stop.changed() => return Ended::Stopped,
                message = tokio::time::timeout(SILENT_STREAM, stream.message()) => message,
            };
            let update = match message {
                Err(_) => return Ended::Closed(format!("silent for {} s", SILENT_STREAM.as_secs())),
                Ok(Err(status)) => return Ended::Closed(format!("grpc status {status}")),
                Ok(Ok(None)) => return Ended::Closed("ended by the control plane".to_owned()),
                Ok(Ok(Some(update))) => update,
            };
            // The relay takes the update as the wire had it (the Wasm service reads raw bytes).
            let bytes = update.encode_to_vec();
            let received = self.publisher.receive(&bytes, now_ms(), &mut StoreRef(&self.shared.store));
            match received {
                Ok(received) => {
                    self.link.metrics.set_connected(true);
                    self.link.metrics.received(&received);
                    self.backoff = self.link.retry.max(Duration::from_millis(1));
                    if received == Received::Gap {
                        // Resubscribing from the last relayed version gets the missing deltas or a
                        // fresh snapshot.
                        log::warn!("kvmesh dynamic module: state stream skipped a version; resubscribing");
                        return Ended::Resubscribe;
                    }
                    tokio::select! {
                        _ = stop.changed() => return Ended::Stopped,
                        () = self.fetch_missing_assets(&mut client) => {}
                    }
                    self.update_loaded();
                    self.update_workers();
                }
                Err(e) => {
                    self.link.metrics.error();
                    log::warn!("kvmesh dynamic module: state update not relayed: {e}");
                }
            }
        }
    }

    /// Asks for the files of every model that has workers but no relayed files.
    async fn fetch_missing_assets(&mut self, client: &mut StateClient<Channel>) {
        for model in self.publisher.models_missing_assets() {
            if self.retry_assets_at.get(&model).is_some_and(|at| Instant::now() < *at) {
                continue;
            }
            let request = pb::ModelAssetsRequest { model: model.clone() };
            let answer =
                tokio::time::timeout(self.link.assets_timeout, client.get_model_assets(request)).await;
            let assets = match answer {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => {
                    self.assets_failed(&model, &format!("grpc status {status}"));
                    continue;
                }
                Err(_) => {
                    self.assets_failed(&model, "timed out");
                    continue;
                }
            };
            let bytes = assets.encode_to_vec();
            match self.publisher.publish_assets(&bytes, &mut StoreRef(&self.shared.store)) {
                Ok(model) => {
                    self.link.metrics.assets(true);
                    log::info!("kvmesh dynamic module: fetched the files of {model} ({} bytes)", bytes.len());
                }
                Err(e) => self.assets_failed(&model, &e.to_string()),
            }
        }
    }

    fn assets_failed(&mut self, model: &str, why: &str) {
        self.link.metrics.assets(false);
        log::warn!(
            "kvmesh dynamic module: no files for {model} ({why}); retrying in {} s",
            ASSETS_RETRY.as_secs()
        );
        self.retry_assets_at.insert(model.to_owned(), Instant::now() + ASSETS_RETRY);
    }

    /// Brings the process's router up to the relayed state and loads the models it wants whose
    /// files have arrived (seconds of work for a large tokenizer; worker threads meanwhile route
    /// with what they have).
    fn update_loaded(&mut self) {
        let mut loaded = self.shared.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let polled = self.follower.poll(&StoreRef(&self.shared.store), &mut *loaded);
        if polled.assets_changed {
            self.assets_generation += 1;
        }
        for model in loaded.models_wanted() {
            if self.tried.get(&model) == Some(&self.assets_generation) {
                continue;
            }
            let Some(bytes) = StoreRef(&self.shared.store).get(&assets_key(&model)) else { continue };
            self.tried.insert(model.clone(), self.assets_generation);
            let started = Instant::now();
            let result = pb::ModelAssets::decode(bytes.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|assets| loaded.load_assets(&assets).map_err(|e| e.to_string()));
            self.link.filter_metrics.model_loaded(result.is_ok());
            match result {
                Ok(()) => log::info!(
                    "kvmesh dynamic module: model {model} loaded in {} ms",
                    started.elapsed().as_millis()
                ),
                Err(e) => log::error!("kvmesh dynamic module: model {model} not loaded: {e}"),
            }
        }
    }
}

impl<S: StatsSink> Follow<S> {
    /// Applies the relayed state to every worker's router, with the Wasm filter's metrics.
    fn update_workers(&self) {
        let metrics = &self.link.filter_metrics;
        self.shared.follow_workers(|polled, router| {
            // Counters only: this is not an Envoy thread (see `Routing::apply_times`).
            metrics.state_polled_counts(polled);
            if polled.snapshot {
                metrics.state_hash_version(router.foreign_hash_version());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use kvmesh_filter::FilterConfig;
    use pb::state_update::Body;

    use super::*;

    fn config() -> FilterConfig {
        FilterConfig::from_bytes(Some(br#"{"state":{"ttl_ms":5000,"poll_ms":10}}"#)).expect("valid")
    }

    fn shared() -> Shared {
        Shared {
            store: ProcessStore::default(),
            loaded: Mutex::new(Router::new(&config()).expect("router")),
            workers: (0..2).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Worker `index`'s router, made as a worker thread makes it on its first request.
    fn start_worker(shared: &Shared, index: usize) {
        let router = shared.loaded.lock().expect("loaded").fork(&config()).expect("fork");
        let (routing, polled) = Routing::new(router, true, &shared.store);
        assert!(polled.is_some());
        let state = WorkerState { router: Some(Mutex::new(routing)), settings: Settings::new(&config()) };
        assert!(shared.workers[index].set(state).is_ok());
    }

    fn workers_of(shared: &Shared, index: usize) -> usize {
        let worker = shared.workers[index].get().expect("started");
        worker.router.as_ref().expect("a router").lock().expect("lock").router.worker_count()
    }

    fn snapshot(workers: u32) -> Vec<u8> {
        let workers = (1..=workers)
            .map(|handle| pb::WorkerEntry {
                handle,
                worker_id: format!("w{handle}"),
                address: format!("127.0.0.1:{}", 9000 + handle),
                model: "m".into(),
                block_size: 4,
                ..pb::WorkerEntry::default()
            })
            .collect();
        let body = Body::Snapshot(pb::Snapshot { workers, ..pb::Snapshot::default() });
        pb::StateUpdate { epoch: 1, version: 1, sent_at_ms: 1, body: Some(body) }.encode_to_vec()
    }

    #[test]
    fn workers_catch_up_when_made_and_are_brought_along_after_each_message() {
        let shared = shared();
        let mut publisher = Publisher::new(None);
        let received = publisher.receive(&snapshot(2), 1_000, &mut StoreRef(&shared.store)).expect("relayed");
        assert_eq!(received, Received::Snapshot);

        // A worker made after the snapshot was relayed starts from it.
        start_worker(&shared, 0);
        assert_eq!(workers_of(&shared, 0), 2);

        // A new snapshot (another epoch: a restarted control plane) reaches it only when the
        // connection thread brings the workers along; worker 1 was never made and is skipped.
        let three = {
            let update = pb::StateUpdate::decode(snapshot(3).as_slice()).expect("decode");
            pb::StateUpdate { epoch: 2, ..update }.encode_to_vec()
        };
        publisher.receive(&three, 2_000, &mut StoreRef(&shared.store)).expect("relayed");
        assert_eq!(workers_of(&shared, 0), 2, "nothing is applied on the request path");
        let mut polls = 0;
        shared.follow_workers(|polled, router| {
            polls += 1;
            assert!(polled.snapshot);
            assert!(!router.state_is_stale(2_000), "heard from at the relay's time");
            assert!(router.state_is_stale(2_000 + 5_001), "stale past the TTL");
        });
        assert_eq!(polls, 1);
        assert_eq!(workers_of(&shared, 0), 3);
        let worker = shared.workers[0].get().expect("started");
        let mut routing = worker.router.as_ref().expect("a router").lock().expect("lock");
        assert_eq!(routing.take_apply_times().map(|t| t.len()), Some(1), "one apply to record");
        assert_eq!(routing.take_apply_times(), None);
    }

    #[test]
    fn the_store_hands_back_what_was_set() {
        let store = ProcessStore::default();
        assert_eq!(StoreRef(&store).get("k"), None);
        StoreRef(&store).set("k", b"v1").expect("set");
        StoreRef(&store).set("k", b"v2").expect("set");
        assert_eq!(StoreRef(&store).get("k").as_deref(), Some(&b"v2"[..]));
    }
}
