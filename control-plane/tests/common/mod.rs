//! Shared pieces of the control plane's integration tests: a real nats-server (from the kvmesh-tests
//! harness), control planes started in-process on free 127.0.0.1 ports, a fake agent that publishes
//! hand-made protobufs and answers resync requests like the real one, and small REST/gRPC clients.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_control_plane::{Config, ControlPlane};
use kvmesh_proto::v1 as pb;
use kvmesh_proto::v1::state_client::StateClient;
use kvmesh_tests::nats::NatsServer;
use prost::Message as _;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_stream::StreamExt as _;

/// How long a test waits for the control plane to catch up: generous, never a pass/fail timing.
pub const WAIT: Duration = Duration::from_secs(30);

/// The admin token every test control plane uses.
pub const TOKEN: &str = "test-token";

/// Starts nats-server (blocking the current worker thread while it comes up).
pub fn nats() -> NatsServer {
    tokio::task::block_in_place(NatsServer::start)
}

/// A NATS client of the test itself.
pub async fn client(nats: &NatsServer) -> async_nats::Client {
    async_nats::connect(nats.url()).await.expect("connect the test's NATS client")
}

/// A test config: free ports, short windows, a token.
pub fn config(nats: &NatsServer, namespace: &str) -> Config {
    let mut c = Config { namespace: namespace.into(), ..Config::default() };
    c.nats.url = nats.url();
    c.admin.listen = "127.0.0.1:0".parse().expect("literal address");
    c.admin.token = Some(TOKEN.into());
    c.grpc.listen = "127.0.0.1:0".parse().expect("literal address");
    c.stream.batch_ms = 10;
    c.resync.startup_window_ms = 300;
    c.resync.timeout_ms = 1_000;
    c.resync.max_backoff_ms = 2_000;
    c.workers.housekeeping_ms = 50;
    c
}

/// Starts a control plane and waits until `/readyz` says ready.
pub async fn start(config: Config) -> ControlPlane {
    let cp = ControlPlane::start(config).await.expect("start the control plane");
    let port = cp.admin_addr().port();
    wait_until("control plane ready", || async move { get(port, "/readyz").await.0 == 200 }).await;
    cp
}

/// Polls `check` every 20 ms until it holds; panics naming `what` after [`WAIT`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(start.elapsed() < WAIT, "timed out after {WAIT:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP request to the admin API; (status, JSON body or Null).
pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let (method, path, token) = (method.to_owned(), path.to_owned(), token.map(|t| format!("Bearer {t}")));
    tokio::task::spawn_blocking(move || {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(t) = &token {
            headers.push(("authorization", t.as_str()));
        }
        let response = kvmesh_tests::http::request(port, &method, &path, &headers, body.as_deref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let text = String::from_utf8_lossy(response.body()).into_owned();
        (response.status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    })
    .await
    .expect("HTTP request task")
}

/// `GET path`.
pub async fn get(port: u16, path: &str) -> (u16, Value) {
    request(port, "GET", path, None, None).await
}

/// `GET /metrics` as text.
pub async fn metrics(port: u16) -> String {
    match get(port, "/metrics").await {
        (200, Value::String(text)) => text,
        other => panic!("metrics: {other:?}"),
    }
}

/// The value of one sample line of `/metrics` (exact name with labels), or 0.
pub fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `/v1/index/stats`.
pub async fn stats(port: u16) -> Value {
    let (status, body) = get(port, "/v1/index/stats").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// A worker's block count in `/v1/index/stats` (0 when absent).
pub async fn worker_blocks(port: u16, worker: &str) -> u64 {
    stats(port).await["workers"][worker]["blocks"].as_u64().unwrap_or(0)
}

/// The first message of a fresh subscription: every registered worker's block set, by worker id.
pub async fn snapshot_sets(grpc: SocketAddr) -> BTreeMap<String, BTreeSet<u64>> {
    let mut client = StateClient::connect(format!("http://{grpc}")).await.expect("connect the state service");
    let mut stream = client
        .subscribe(pb::SubscribeRequest { node: "test".into(), epoch: 0, version: 0 })
        .await
        .expect("subscribe")
        .into_inner();
    let first = stream.message().await.expect("first update").expect("stream open");
    let Some(pb::state_update::Body::Snapshot(s)) = first.body else {
        panic!("first update is not a snapshot")
    };
    let names: BTreeMap<u32, String> = s.workers.iter().map(|w| (w.handle, w.worker_id.clone())).collect();
    let mut out: BTreeMap<String, BTreeSet<u64>> =
        names.values().map(|n| (n.clone(), BTreeSet::new())).collect();
    for update in s.index {
        let name = names.get(&update.handle).expect("index update of a listed worker").clone();
        out.entry(name).or_default().extend(update.stored);
    }
    out
}

/// What a fake agent holds: its epoch, last published seq and block copies.
#[derive(Debug, Default)]
pub struct AgentState {
    /// Agent incarnation.
    pub epoch: u64,
    /// Last seq published (or skipped).
    pub seq: u64,
    /// Block copies held.
    pub blocks: BTreeMap<u64, u32>,
    /// Resync requests answered.
    pub resyncs_answered: u32,
}

/// A fake agent: publishes batches and heartbeats for one worker and answers resync requests with
/// its block set in chunks of `chunk_blocks`, as the real agent does.
#[derive(Clone)]
pub struct FakeAgent {
    /// Worker id.
    pub worker: String,
    namespace: String,
    client: async_nats::Client,
    /// Shared with the answering task.
    pub state: Arc<Mutex<AgentState>>,
    chunk_blocks: usize,
    model: String,
    block_size: u32,
}

impl FakeAgent {
    /// An agent for `worker` (model `m`, block size 4) that answers resyncs from now on.
    pub async fn start(client: &async_nats::Client, namespace: &str, worker: &str, epoch: u64) -> FakeAgent {
        FakeAgent::start_for(client, namespace, worker, epoch, "m", 4).await
    }

    /// An agent for `worker` serving `model` at `block_size`.
    pub async fn start_for(
        client: &async_nats::Client,
        namespace: &str,
        worker: &str,
        epoch: u64,
        model: &str,
        block_size: u32,
    ) -> FakeAgent {
        let agent = FakeAgent {
            model: model.into(),
            block_size,
            worker: worker.into(),
            namespace: namespace.into(),
            client: client.clone(),
            state: Arc::new(Mutex::new(AgentState { epoch, ..AgentState::default() })),
            chunk_blocks: 2,
        };
        let mut own =
            client.subscribe(format!("kvmesh.{namespace}.resync.{worker}")).await.expect("subscribe resync");
        let mut all =
            client.subscribe(format!("kvmesh.{namespace}.resync.all")).await.expect("subscribe resync.all");
        client.flush().await.expect("flush subscriptions");
        let answering = agent.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = own.next() => m,
                    m = all.next() => m,
                };
                let Some(msg) = msg else { return };
                if let Some(reply) = msg.reply {
                    answering.answer(reply.to_string()).await;
                }
            }
        });
        agent
    }

    async fn answer(&self, reply: String) {
        let mut state = self.state.lock().await;
        state.resyncs_answered += 1;
        let entries: Vec<(u64, u32)> = state.blocks.iter().map(|(&h, &c)| (h, c)).collect();
        let pieces: Vec<&[(u64, u32)]> =
            if entries.is_empty() { vec![&[]] } else { entries.chunks(self.chunk_blocks).collect() };
        let n = pieces.len();
        for (i, piece) in pieces.into_iter().enumerate() {
            let chunk = pb::ResyncChunk {
                worker_id: self.worker.clone(),
                epoch: state.epoch,
                seq: state.seq,
                blocks: piece.iter().map(|e| e.0).collect(),
                copies: piece.iter().map(|e| e.1).collect(),
                chunk: i as u32,
                last: i + 1 == n,
            };
            self.client
                .publish(reply.clone(), chunk.encode_to_vec().into())
                .await
                .expect("publish a resync chunk");
        }
        self.client.flush().await.expect("flush resync chunks");
    }

    /// Publishes a heartbeat with this ttl.
    pub async fn heartbeat(&self, ttl_ms: u32) {
        let state = self.state.lock().await;
        let hb = pb::Heartbeat {
            worker_id: self.worker.clone(),
            address: format!("127.0.0.1:{}", 20000 + self.worker.len()),
            model: self.model.clone(),
            engine: pb::Engine::Vllm as i32,
            role: pb::Role::Both as i32,
            block_size: self.block_size,
            tokenizer_id: String::new(),
            ttl_ms,
            epoch: state.epoch,
            kv_seq: state.seq,
            lora_adapters: vec![],
        };
        self.publish("worker", hb.encode_to_vec()).await;
    }

    /// Heartbeats every 100 ms from a background task (until the test's runtime ends).
    pub fn keep_alive(&self, ttl_ms: u32) -> tokio::task::JoinHandle<()> {
        let agent = self.clone();
        tokio::spawn(async move {
            loop {
                agent.heartbeat(ttl_ms).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    async fn publish(&self, kind: &str, payload: Vec<u8>) {
        let subject = format!("kvmesh.{}.{kind}.{}", self.namespace, self.worker);
        self.client.publish(subject, payload.into()).await.expect("publish");
        self.client.flush().await.expect("flush");
    }

    /// Applies events locally and publishes them as the next batch (unless `lose`, which plays a
    /// batch lost on the way: seq moves on, nothing is published).
    async fn batch(&self, events: Vec<pb::KvEvent>, lose: bool) {
        let batch = {
            let mut state = self.state.lock().await;
            for event in &events {
                match &event.kind {
                    Some(pb::kv_event::Kind::Stored(s)) => {
                        for &h in &s.blocks {
                            *state.blocks.entry(h).or_default() += 1;
                        }
                    }
                    Some(pb::kv_event::Kind::Removed(r)) => {
                        for h in &r.blocks {
                            if let Some(c) = state.blocks.get_mut(h) {
                                *c -= 1;
                                if *c == 0 {
                                    state.blocks.remove(h);
                                }
                            }
                        }
                    }
                    Some(pb::kv_event::Kind::Cleared(_)) => state.blocks.clear(),
                    None => {}
                }
            }
            state.seq += 1;
            pb::KvEventBatch {
                worker_id: self.worker.clone(),
                epoch: state.epoch,
                seq: state.seq,
                events,
                dp_rank: 0,
            }
        };
        if !lose {
            self.publish("kv", batch.encode_to_vec()).await;
        }
    }

    /// Stores blocks (one batch).
    pub async fn store(&self, blocks: &[u64]) {
        self.batch(vec![stored(blocks)], false).await;
    }

    /// Removes one copy of each block (one batch).
    pub async fn remove(&self, blocks: &[u64]) {
        let event = pb::KvEvent {
            kind: Some(pb::kv_event::Kind::Removed(pb::BlocksRemoved { blocks: blocks.to_vec() })),
        };
        self.batch(vec![event], false).await;
    }

    /// Drops every block (one batch).
    pub async fn clear(&self) {
        let event = pb::KvEvent { kind: Some(pb::kv_event::Kind::Cleared(pb::AllBlocksCleared {})) };
        self.batch(vec![event], false).await;
    }

    /// Stores blocks in a batch that never arrives.
    pub async fn store_lost(&self, blocks: &[u64]) {
        self.batch(vec![stored(blocks)], true).await;
    }

    /// The blocks the agent holds.
    pub async fn blocks(&self) -> BTreeSet<u64> {
        self.state.lock().await.blocks.keys().copied().collect()
    }
}

/// A stored event.
pub fn stored(blocks: &[u64]) -> pb::KvEvent {
    pb::KvEvent { kind: Some(pb::kv_event::Kind::Stored(pb::BlocksStored { blocks: blocks.to_vec() })) }
}
