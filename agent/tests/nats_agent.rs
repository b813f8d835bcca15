//! The whole agent against a real nats-server: a fake engine (ZMQ publisher with replay, HTTP metrics)
//! feeds it captured vLLM frames; a NATS subscriber in the test decodes what it publishes.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::Subscriber;
use axum::Router;
use axum::routing::get;
use clap::Parser;
use common::{FakeEngine, Fixture, WAIT};
use kvmesh_agent::http::HttpClient;
use kvmesh_agent::{AgentArgs, Gpus};
use kvmesh_core::hash::BlockHash;
use kvmesh_proto::v1::{Heartbeat, KvEventBatch, LoadReport, ResyncChunk, ResyncRequest, kv_event};
use kvmesh_tests::nats::NatsServer;
use prost::Message;
use tokio_stream::StreamExt;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
}

/// A vLLM-like metrics page and model list.
const METRICS: &str = r#"# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.5
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1234"} 1.0
"#;
const MODELS: &str =
    r#"{"object":"list","data":[{"id":"tiny","parent":null},{"id":"sql-lora","parent":"tiny"}]}"#;

/// Serves the fake engine's HTTP side on a free port; returns the port.
async fn serve_engine_http() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let app = Router::new()
        .route("/metrics", get(|| async { METRICS }))
        .route("/v1/models", get(|| async { MODELS }));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, task)
}

/// A worker's kvmesh block multiset, as a control plane rebuilds it from KvEventBatches.
#[derive(Default)]
struct Model {
    blocks: HashMap<BlockHash, i64>,
    epoch: Option<u64>,
    last_seq: u64,
}

impl Model {
    fn apply(&mut self, batch: &KvEventBatch) {
        assert_eq!(*self.epoch.get_or_insert(batch.epoch), batch.epoch, "one epoch");
        assert_eq!(batch.seq, self.last_seq + 1, "batches numbered 1, 2, ... without gaps");
        self.last_seq = batch.seq;
        for event in &batch.events {
            match &event.kind {
                Some(kv_event::Kind::Stored(s)) => {
                    s.blocks.iter().for_each(|b| *self.blocks.entry(BlockHash(*b)).or_insert(0) += 1)
                }
                Some(kv_event::Kind::Removed(r)) => {
                    r.blocks.iter().for_each(|b| *self.blocks.entry(BlockHash(*b)).or_insert(0) -= 1)
                }
                Some(kv_event::Kind::Cleared(_)) => self.blocks.clear(),
                None => panic!("event without a kind"),
            }
        }
        assert!(self.blocks.values().all(|c| *c >= 0), "never more removals than stores");
        self.blocks.retain(|_, c| *c > 0);
    }

    fn sorted(&self) -> Vec<(BlockHash, u32)> {
        let mut v: Vec<_> = self.blocks.iter().map(|(h, c)| (*h, *c as u32)).collect();
        v.sort();
        v
    }
}

/// What the test subscriber saw.
#[derive(Default)]
struct Seen {
    model: Model,
    heartbeats: Vec<Heartbeat>,
    loads: Vec<LoadReport>,
}

async fn receive_until(sub: &mut Subscriber, seen: &mut Seen, mut done: impl FnMut(&Seen) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(seen) {
        let message = tokio::time::timeout_at(deadline, sub.next())
            .await
            .expect("expected messages within WAIT")
            .expect("subscription open");
        let subject = message.subject.as_str();
        if subject.starts_with("kvmesh.test.kv.") {
            seen.model.apply(&KvEventBatch::decode(message.payload).expect("KvEventBatch"));
        } else if subject.starts_with("kvmesh.test.worker.") {
            seen.heartbeats.push(Heartbeat::decode(message.payload).expect("Heartbeat"));
        } else if subject.starts_with("kvmesh.test.load.") {
            seen.loads.push(LoadReport::decode(message.payload).expect("LoadReport"));
        }
    }
}

async fn resync(client: &async_nats::Client, subject: &str) -> Vec<ResyncChunk> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe inbox");
    let request = ResyncRequest { requester: "test".to_owned() }.encode_to_vec();
    client.publish_with_reply(subject.to_owned(), inbox, request.into()).await.expect("request");
    let mut chunks: Vec<ResyncChunk> = Vec::new();
    while chunks.last().is_none_or(|c| !c.last) {
        let message =
            tokio::time::timeout(WAIT, replies.next()).await.expect("chunks within WAIT").expect("open");
        chunks.push(ResyncChunk::decode(message.payload).expect("ResyncChunk"));
    }
    chunks
}

fn chunk_set(chunks: &[ResyncChunk]) -> Vec<(BlockHash, u32)> {
    let mut set: Vec<_> = chunks
        .iter()
        .flat_map(|c| {
            c.blocks.iter().enumerate().map(|(i, b)| (BlockHash(*b), c.copies.get(i).copied().unwrap_or(1)))
        })
        .collect();
    set.sort();
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_publishes_translated_events_load_heartbeats_and_answers_resync() {
    let nats = tokio::task::spawn_blocking(NatsServer::start).await.expect("nats-server started");
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    let mut engine = FakeEngine::start().await;
    let (http_port, http_task) = serve_engine_http().await;
    let metrics_port = kvmesh_tests::free_port();
    let cli = Cli::try_parse_from([
        "agent",
        "--worker-id=w1",
        "--namespace=test",
        "--model=tiny",
        "--address=127.0.0.1:8000",
        "--role=decode",
        "--tokenizer-id=tok-1",
        &format!("--kv-events={}", engine.events),
        &format!("--kv-replay={}", engine.replay),
        "--kv-topic=kv-events",
        &format!("--metrics-url=http://127.0.0.1:{http_port}/metrics"),
        &format!("--nats={}", nats.url()),
        &format!("--metrics-listen=127.0.0.1:{metrics_port}"),
        "--load-interval=200ms",
        "--ttl=600ms",
    ])
    .expect("flags parse");
    let config = cli.args.validate().expect("valid flags");
    let client = async_nats::connect(nats.url()).await.expect("test client connects");
    let mut sub = client.subscribe("kvmesh.test.>").await.expect("subscribe");
    client.flush().await.expect("subscription registered");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(kvmesh_agent::run(config, Gpus::none(), async move {
        let _ = stopped.await;
    }));

    engine.wait_subscriber().await;
    for l in &live {
        engine.publish(l.seq(), &l.frames[2]).await;
    }
    // The block set the fixture's engine ends with, named the way the filter names prompts.
    let expected_names = fixture.expected_kvmesh();
    let mut expected: Vec<(BlockHash, u32)> =
        fixture.final_index().iter().map(|(e, c)| (expected_names[e], *c)).collect();
    expected.sort();

    let mut seen = Seen::default();
    receive_until(&mut sub, &mut seen, |s| {
        s.model.sorted() == expected
            && s.heartbeats
                .iter()
                .any(|h| h.kv_seq == s.model.last_seq && h.block_size == 16 && !h.lora_adapters.is_empty())
            && s.loads.iter().any(|l| l.kv_capacity_blocks == 1234)
    })
    .await;

    let heartbeat = seen.heartbeats.last().expect("a heartbeat");
    assert_eq!((heartbeat.worker_id.as_str(), heartbeat.address.as_str()), ("w1", "127.0.0.1:8000"));
    assert_eq!((heartbeat.model.as_str(), heartbeat.tokenizer_id.as_str()), ("tiny", "tok-1"));
    assert_eq!(heartbeat.engine, kvmesh_proto::v1::Engine::Vllm as i32);
    assert_eq!(heartbeat.role, kvmesh_proto::v1::Role::Decode as i32);
    assert_eq!((heartbeat.ttl_ms, heartbeat.block_size), (600, 16));
    assert_eq!(Some(heartbeat.epoch), seen.model.epoch);
    assert!(heartbeat.lora_adapters.contains(&"sql-lora".to_owned()));
    let load = seen.loads.iter().rev().find(|l| l.kv_capacity_blocks == 1234).expect("a load report");
    assert_eq!((load.worker_id.as_str(), load.running, load.waiting, load.kv_usage), ("w1", 2, 1, 0.5));
    assert!(load.gpus.is_empty() && load.observed_at_ms > 0);

    // Resync, by name and for everyone: the current set, at the last sequence number.
    for subject in ["kvmesh.test.resync.w1", "kvmesh.test.resync.all"] {
        let chunks = resync(&client, subject).await;
        assert_eq!(chunk_set(&chunks), expected, "{subject}");
        assert!(chunks.iter().all(|c| c.worker_id == "w1"
            && c.seq == seen.model.last_seq
            && Some(c.epoch) == seen.model.epoch));
    }

    // A malformed batch is counted and skipped; the next one is published.
    let seq = live.len() as u64;
    engine.publish(seq, b"\x93\xcb not msgpack").await;
    engine.publish(seq + 1, &live[0].frames[2]).await;
    let before = seen.model.last_seq;
    receive_until(&mut sub, &mut seen, |s| s.model.last_seq > before).await;
    let text = HttpClient::new(Duration::from_secs(5))
        .get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("agent metrics");
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("kvmesh_agent_malformed_total{what=\"payload\"} 1"), "{text}");
    assert!(text.contains("kvmesh_agent_engine_up 1"), "{text}");

    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent).await.expect("agent stops").expect("agent task").expect("agent ran");
    http_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_engine_stops_heartbeats() {
    let nats = tokio::task::spawn_blocking(NatsServer::start).await.expect("nats-server started");
    let engine = FakeEngine::start().await;
    // Metrics on a port nothing listens on: the engine is down.
    let dead_port = kvmesh_tests::free_port();
    let cli = Cli::try_parse_from([
        "agent",
        "--worker-id=w2",
        "--namespace=test",
        "--address=127.0.0.1:8000",
        &format!("--kv-events={}", engine.events),
        &format!("--metrics-url=http://127.0.0.1:{dead_port}/metrics"),
        &format!("--nats={}", nats.url()),
        "--load-interval=100ms",
        "--ttl=300ms",
    ])
    .expect("flags parse");
    let client = async_nats::connect(nats.url()).await.expect("test client connects");
    let mut sub = client.subscribe("kvmesh.test.>").await.expect("subscribe");
    client.flush().await.expect("subscription registered");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent =
        tokio::spawn(kvmesh_agent::run(cli.args.validate().expect("valid"), Gpus::none(), async move {
            let _ = stopped.await;
        }));
    // Ten load periods, three TTLs: nothing may be published for a worker whose engine is down.
    let quiet = tokio::time::timeout(Duration::from_secs(1), sub.next()).await;
    assert!(
        quiet.is_err(),
        "no heartbeat or load report for a dead engine: {:?}",
        quiet.ok().flatten().map(|m| m.subject)
    );
    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent).await.expect("agent stops").expect("agent task").expect("agent ran");
}

/// nats-server on a given port (to restart it on the same one); stopped on drop.
fn nats_on(port: u16) -> kvmesh_tests::Process {
    let mut cmd = std::process::Command::new(kvmesh_tests::nats_server_binary());
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    let mut process = kvmesh_tests::Process::spawn("nats-server", cmd);
    process.wait_ready(&format!("nats-server on {port}"), kvmesh_tests::READY_TIMEOUT, || {
        kvmesh_tests::tcp_accepts(port)
    });
    process
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_to_a_restarted_nats_server() {
    let port = kvmesh_tests::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let server = tokio::task::spawn_blocking(move || nats_on(port)).await.expect("nats-server started");
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    let mut engine = FakeEngine::start().await;
    let cli = Cli::try_parse_from([
        "agent",
        "--worker-id=w3",
        "--namespace=test",
        "--address=127.0.0.1:8000",
        &format!("--kv-events={}", engine.events),
        "--kv-topic=kv-events",
        &format!("--nats={url}"),
        "--load-interval=100ms",
        "--ttl=300ms",
    ])
    .expect("flags parse");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent =
        tokio::spawn(kvmesh_agent::run(cli.args.validate().expect("valid"), Gpus::none(), async move {
            let _ = stopped.await;
        }));
    let client = async_nats::connect(url.as_str()).await.expect("test client connects");
    let mut sub = client.subscribe("kvmesh.test.>").await.expect("subscribe");
    let mut seen = Seen::default();
    receive_until(&mut sub, &mut seen, |s| !s.heartbeats.is_empty()).await;
    engine.wait_subscriber().await;
    engine.publish(0, &live[0].frames[2]).await;
    receive_until(&mut sub, &mut seen, |s| s.model.last_seq == 1).await;

    // NATS goes down; the engine goes on; NATS comes back on the same port.
    tokio::task::spawn_blocking(move || drop(server)).await.expect("nats-server stopped");
    engine.publish(1, &live[1].frames[2]).await;
    let _server = tokio::task::spawn_blocking(move || nats_on(port)).await.expect("nats-server restarted");

    // The agent resubscribed (it answers a resync) and still holds every block, batch 1 included.
    let deadline = tokio::time::Instant::now() + WAIT;
    let chunks = loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(2), resync(&client, "kvmesh.test.resync.w3")).await;
        match attempt {
            Ok(chunks) => break chunks,
            Err(_) => {
                assert!(tokio::time::Instant::now() < deadline, "no resync answer after NATS came back")
            }
        }
    };
    let mut blocks = kvmesh_agent::blocks::WorkerBlocks::new();
    for l in &live[..2] {
        blocks.apply(0, &kvmesh_agent::engines::msgpack::decode_batch(&l.frames[2]).expect("batch").0);
    }
    let mut expected = blocks.snapshot();
    expected.sort();
    assert_eq!(chunk_set(&chunks), expected);
    // And heartbeats flow again.
    let count = seen.heartbeats.len();
    let mut sub = client.subscribe("kvmesh.test.worker.w3").await.expect("subscribe");
    let message =
        tokio::time::timeout(WAIT, sub.next()).await.expect("heartbeat after reconnect").expect("open");
    Heartbeat::decode(message.payload).expect("Heartbeat");
    assert!(count >= 1);
    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent).await.expect("agent stops").expect("agent task").expect("agent ran");
}
