//! The ZMQ adapter over real sockets: a fake engine (XPUB + replay ROUTER on 127.0.0.1) publishes
//! captured fixture frames; the test reads what the adapter hands to the state task.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{FakeEngine, Fixture, ReplayMode, WAIT, live_message};
use kvmesh_agent::blocks::WorkerBlocks;
use kvmesh_agent::engines::msgpack::decode_batch;
use kvmesh_agent::engines::zmq::{self, ZmqEndpoint};
use kvmesh_agent::engines::{ResetReason, SourceMsg};
use kvmesh_agent::events::EngineBatch;
use kvmesh_agent::telemetry::{AgentMetrics, What};
use tokio::sync::mpsc;

/// A running adapter and what it sends.
struct Adapter {
    rx: mpsc::Receiver<SourceMsg>,
    metrics: Arc<AgentMetrics>,
    task: tokio::task::JoinHandle<()>,
}

impl Adapter {
    fn start(engine: &FakeEngine, replay: bool) -> Adapter {
        let endpoint = ZmqEndpoint {
            rank: 0,
            events: engine.events.clone(),
            bind: false,
            replay: replay.then(|| engine.replay.clone()),
            topic: "kv-events".to_owned(),
            replay_timeout: Duration::from_secs(10),
        };
        Adapter::with(endpoint)
    }

    fn with(endpoint: ZmqEndpoint) -> Adapter {
        let (tx, rx) = mpsc::channel(1024);
        let metrics = Arc::new(AgentMetrics::default());
        let task = tokio::spawn(zmq::run(endpoint, tx, Arc::clone(&metrics)));
        Adapter { rx, metrics, task }
    }

    async fn next(&mut self) -> SourceMsg {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a message within WAIT")
            .expect("adapter alive")
    }

    async fn batch(&mut self) -> EngineBatch {
        match self.next().await {
            SourceMsg::Batch { rank: 0, batch } => batch,
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    async fn reset(&mut self) -> ResetReason {
        match self.next().await {
            SourceMsg::Reset { rank: 0, reason } => reason,
            other => panic!("expected a reset, got {other:?}"),
        }
    }

    fn count(
        &self,
        family: &prometheus_client::metrics::family::Family<
            What,
            prometheus_client::metrics::counter::Counter,
        >,
        what: &'static str,
    ) -> u64 {
        family.get_or_create(&What { what }).get()
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn decoded(frames: &[Bytes]) -> EngineBatch {
    decode_batch(&frames[2]).expect("fixture payload decodes").0
}

#[tokio::test]
async fn consecutive_batches_are_forwarded_in_order() {
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let mut engine = FakeEngine::start().await;
    let mut adapter = Adapter::start(&engine, true);
    engine.wait_subscriber().await;
    let mut blocks = WorkerBlocks::new();
    for live in fixture.live() {
        engine.publish(live.seq(), &live.frames[2]).await;
        let batch = adapter.batch().await;
        assert_eq!(batch, decoded(&live.frames));
        blocks.apply(0, &batch);
    }
    assert_eq!(blocks.engine_copies(0), fixture.final_index());
    assert!(engine.requests.lock().expect("requests").is_empty(), "no replay without a gap");
}

#[tokio::test]
async fn gap_is_filled_from_the_replay_socket() {
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    let mut engine = FakeEngine::start().await;
    let mut adapter = Adapter::start(&engine, true);
    engine.wait_subscriber().await;
    engine.publish(0, &live[0].frames[2]).await;
    assert_eq!(adapter.batch().await, decoded(&live[0].frames));
    // The PUB socket drops 1 and 2; 3 arrives live.
    engine.publish_lost(1, &live[1].frames[2]);
    engine.publish_lost(2, &live[2].frames[2]);
    engine.publish(3, &live[3].frames[2]).await;
    for l in &live[1..=3] {
        assert_eq!(adapter.batch().await, decoded(&l.frames), "batch {}", l.seq());
    }
    // Replay asked from the last batch applied (0), to prove the engine did not restart meanwhile.
    assert_eq!(*engine.requests.lock().expect("requests"), vec![0]);
    engine.publish(4, &live[4].frames[2]).await;
    assert_eq!(adapter.batch().await, decoded(&live[4].frames));
    assert_eq!(adapter.metrics.gaps.get(), 1);
    assert_eq!(adapter.count(&adapter.metrics.replays, "complete"), 1);
}

#[tokio::test]
async fn agent_started_late_replays_history_from_the_fixture_router() {
    // The fixture's recorded replay (vLLM 0.23: no topic frame, 2-frame END marker), served verbatim.
    for name in ["vllm-0.23.0-bind_int_sha256", "vllm-0.33.0-bind_int_sha256", "sglang-0.5.23-bind_int64"] {
        let fixture = Fixture::load(name);
        let live = fixture.live();
        let mut engine = FakeEngine::start().await;
        engine.set_mode(ReplayMode::Verbatim(fixture.replay_replies()));
        let mut adapter = Adapter::start(&engine, true);
        engine.wait_subscriber().await;
        // The first live message the agent sees is the last one: everything before comes by replay.
        let last = live.last().expect("live");
        engine.publish(last.seq(), &last.frames[2]).await;
        let mut blocks = WorkerBlocks::new();
        for l in &live {
            let batch = adapter.batch().await;
            assert_eq!(batch, decoded(&l.frames), "{name} seq {}", l.seq());
            blocks.apply(0, &batch);
        }
        assert_eq!(blocks.engine_copies(0), fixture.final_index(), "{name}");
        assert_eq!(*engine.requests.lock().expect("requests"), vec![0], "{name}");
        assert_eq!(adapter.count(&adapter.metrics.replays, "complete"), 1, "{name}");
        // The live stream goes on after the replayed history.
        engine.send_raw(live_message("kv-events", last.seq() + 1, &live[0].frames[2])).await;
        assert_eq!(adapter.batch().await, decoded(&live[0].frames), "{name}");
        assert_eq!(adapter.metrics.gaps.get(), 0, "{name}");
    }
}

#[tokio::test]
async fn sequence_going_back_is_an_engine_restart() {
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    let mut engine = FakeEngine::start().await;
    let mut adapter = Adapter::start(&engine, true);
    engine.wait_subscriber().await;
    for l in &live[..3] {
        engine.publish(l.seq(), &l.frames[2]).await;
        adapter.batch().await;
    }
    engine.clear_buffer();
    engine.publish(0, &live[5].frames[2]).await;
    assert_eq!(adapter.reset().await, ResetReason::EngineRestart);
    assert_eq!(adapter.batch().await, decoded(&live[5].frames));
    assert_eq!(adapter.metrics.engine_restarts.get(), 1);
}

#[tokio::test]
async fn restart_hidden_behind_a_gap_is_found_by_the_replayed_history() {
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    let mut engine = FakeEngine::start().await;
    let mut adapter = Adapter::start(&engine, true);
    engine.wait_subscriber().await;
    for l in &live[..3] {
        engine.publish(l.seq(), &l.frames[2]).await;
        adapter.batch().await;
    }
    // The engine restarts and publishes 0..=4 with other content; the agent only sees 4 live.
    engine.clear_buffer();
    for seq in 0..4u64 {
        engine.publish_lost(seq, &live[seq as usize + 5].frames[2]);
    }
    engine.publish(4, &live[9].frames[2]).await;
    assert_eq!(adapter.reset().await, ResetReason::EngineRestart);
    for seq in 0..4usize {
        assert_eq!(adapter.batch().await, decoded(&live[seq + 5].frames), "new engine's batch {seq}");
    }
    assert_eq!(adapter.batch().await, decoded(&live[9].frames));
    assert_eq!(*engine.requests.lock().expect("requests"), vec![2, 0]);
}

#[tokio::test]
async fn gap_without_replay_resets_the_rank() {
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    let mut engine = FakeEngine::start().await;
    let mut adapter = Adapter::start(&engine, false);
    engine.wait_subscriber().await;
    engine.publish(0, &live[0].frames[2]).await;
    adapter.batch().await;
    engine.publish(5, &live[5].frames[2]).await;
    assert_eq!(adapter.reset().await, ResetReason::LostEvents);
    assert_eq!(adapter.batch().await, decoded(&live[5].frames));
    engine.publish(6, &live[6].frames[2]).await;
    assert_eq!(adapter.batch().await, decoded(&live[6].frames));
    assert_eq!(adapter.count(&adapter.metrics.resets, "lost_events"), 1);
}

#[tokio::test]
async fn replay_buffer_that_does_not_reach_back_resets_then_rebuilds() {
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    let mut engine = FakeEngine::start().await;
    let mut adapter = Adapter::start(&engine, true);
    engine.wait_subscriber().await;
    engine.publish(0, &live[0].frames[2]).await;
    adapter.batch().await;
    // The engine's buffer forgot 0..=3: a replay from 0 starts at 4.
    engine.clear_buffer();
    for seq in 4..6u64 {
        engine.publish_lost(seq, &live[seq as usize].frames[2]);
    }
    engine.publish(6, &live[6].frames[2]).await;
    assert_eq!(adapter.reset().await, ResetReason::LostEvents);
    for l in &live[4..=6] {
        assert_eq!(adapter.batch().await, decoded(&l.frames));
    }
    assert_eq!(adapter.count(&adapter.metrics.replays, "incomplete"), 1);
}

#[tokio::test]
async fn malformed_input_is_counted_and_the_next_batch_applied() {
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    let mut engine = FakeEngine::start().await;
    let mut adapter = Adapter::start(&engine, true);
    engine.wait_subscriber().await;
    engine.publish(0, &live[0].frames[2]).await;
    adapter.batch().await;
    // A payload that is not msgpack, a message with two frames, a seq of 4 bytes.
    engine.publish(1, b"\xc1\xff garbage").await;
    engine.send_raw(vec![Bytes::from_static(b"kv-events"), Bytes::from_static(b"x")]).await;
    engine
        .send_raw(vec![Bytes::from_static(b"kv-events"), Bytes::from_static(b"\0\0\0\x02"), Bytes::new()])
        .await;
    engine.publish(2, &live[1].frames[2]).await;
    assert_eq!(adapter.batch().await, decoded(&live[1].frames));
    assert_eq!(adapter.count(&adapter.metrics.malformed, "payload"), 1);
    assert_eq!(adapter.count(&adapter.metrics.malformed, "frame"), 2);
    // The malformed batch consumed its sequence number: no gap, no replay.
    assert_eq!(adapter.metrics.gaps.get(), 0);
    assert!(engine.requests.lock().expect("requests").is_empty());
}

#[tokio::test]
async fn reconnected_publisher_is_verified_through_a_replay() {
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    // The agent binds; the engine connects to it (vLLM with a non-`*` endpoint).
    let port = kvmesh_tests::free_port();
    let (tx, mut rx) = mpsc::channel(64);
    let metrics = Arc::new(AgentMetrics::default());
    let replay_engine = FakeEngine::start().await;
    let endpoint = ZmqEndpoint {
        rank: 0,
        events: format!("tcp://127.0.0.1:{port}"),
        bind: true,
        replay: Some(replay_engine.replay.clone()),
        topic: String::new(),
        replay_timeout: Duration::from_secs(10),
    };
    let task = tokio::spawn(zmq::run(endpoint, tx, Arc::clone(&metrics)));
    let recv = async |rx: &mut mpsc::Receiver<SourceMsg>| {
        tokio::time::timeout(WAIT, rx.recv()).await.expect("within WAIT").expect("alive")
    };
    let connect_and_send = async |frames: Vec<Bytes>| {
        let mut publisher = zeromq::XPubSocket::new();
        use zeromq::{Socket, SocketRecv, SocketSend};
        // The SUB binds a moment after the task starts: retry the connection.
        let deadline = tokio::time::Instant::now() + WAIT;
        while publisher.connect(&format!("tcp://127.0.0.1:{port}")).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "agent never bound");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::timeout(WAIT, publisher.recv()).await.expect("subscription").expect("recv");
        publisher.send(zeromq::ZmqMessage::try_from(frames).expect("frames")).await.expect("send");
        publisher
    };
    let first = connect_and_send(live[0].frames.clone()).await;
    assert!(matches!(recv(&mut rx).await, SourceMsg::Batch { .. }));
    drop(first);
    // Same engine, reconnecting: its replay buffer holds 0 and 1; 1 is sent live after reconnecting.
    let mut replay_engine = replay_engine;
    replay_engine.publish_lost(0, &live[0].frames[2]);
    replay_engine.publish_lost(1, &live[1].frames[2]);
    let _second = connect_and_send(live[1].frames.clone()).await;
    let SourceMsg::Batch { batch, .. } = recv(&mut rx).await else { panic!("a batch") };
    assert_eq!(batch, decoded(&live[1].frames));
    assert_eq!(*replay_engine.requests.lock().expect("requests"), vec![0], "history verified from batch 0");
    assert_eq!(metrics.engine_restarts.get(), 0);
    task.abort();
}

#[tokio::test]
async fn sub_socket_reconnects_to_a_restarted_engine() {
    use zeromq::{Socket, SocketRecv, SocketSend};
    let fixture = Fixture::load("vllm-0.33.0-bind_int_sha256");
    let live = fixture.live();
    let port = kvmesh_tests::free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let start_engine = async || {
        let mut xpub = zeromq::XPubSocket::new();
        xpub.bind(&endpoint).await.expect("bind the engine's port");
        xpub
    };
    let publish = async |xpub: &mut zeromq::XPubSocket, seq: u64, payload: &[u8]| {
        let frames = live_message("kv-events", seq, payload);
        xpub.send(zeromq::ZmqMessage::try_from(frames).expect("frames")).await.expect("send");
    };
    let mut engine = start_engine().await;
    let mut adapter = Adapter::with(ZmqEndpoint {
        rank: 0,
        events: endpoint.clone(),
        bind: false,
        replay: None,
        topic: "kv-events".to_owned(),
        replay_timeout: Duration::from_secs(10),
    });
    tokio::time::timeout(WAIT, engine.recv()).await.expect("subscription").expect("recv");
    publish(&mut engine, 0, &live[0].frames[2]).await;
    publish(&mut engine, 1, &live[1].frames[2]).await;
    adapter.batch().await;
    adapter.batch().await;
    // The engine process goes away and a new one binds the same port, numbering from 0 again.
    engine.close().await;
    let mut engine = start_engine().await;
    tokio::time::timeout(WAIT, engine.recv()).await.expect("the agent resubscribes").expect("recv");
    publish(&mut engine, 0, &live[4].frames[2]).await;
    assert_eq!(adapter.reset().await, ResetReason::EngineRestart);
    assert_eq!(adapter.batch().await, decoded(&live[4].frames));
}
