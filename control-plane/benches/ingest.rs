//! Control-plane ingest figures:
//! - `ingest/decode_apply`: KV event batches decoded from protobuf and applied to the fleet state
//!   (worker block sets, prefix index, stream coalescing), on one thread: block events per second
//!   per core.
//! - `lag/event_to_stream`: a KV event published on a real nats-server until the delta carrying it
//!   arrives on a gRPC state-stream subscriber, at two batch windows.
//!
//! `cargo bench -p kvmesh-control-plane --bench ingest` (nats-server from `KVMESH_NATS_SERVER` or PATH).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kvmesh_control_plane::fleet_state::{FleetState, Settings};
use kvmesh_control_plane::ingest::apply_message;
use kvmesh_control_plane::wire::SubjectKind;
use kvmesh_control_plane::{Config, ControlPlane};
use kvmesh_proto::v1 as pb;
use kvmesh_proto::v1::state_client::StateClient;
use prost::Message as _;

const WORKERS: u64 = 8;
/// Blocks per stored (and per removed) event: one engine step of a 256-token prefill at block 16.
const BLOCKS_PER_EVENT: u64 = 16;
/// Batches per measured iteration.
const BATCHES: u64 = 64;
/// Blocks each worker keeps cached (a sliding window: every batch stores 16 and evicts 16).
const WINDOW: u64 = 4096;

fn heartbeat(worker: u64) -> Vec<u8> {
    pb::Heartbeat {
        worker_id: format!("w{worker}"),
        address: format!("10.0.0.{worker}:8000"),
        model: "m".into(),
        block_size: 16,
        ttl_ms: 3_600_000,
        epoch: 1,
        ..Default::default()
    }
    .encode_to_vec()
}

fn block(worker: u64, n: u64) -> u64 {
    // Distinct, well-spread hashes per worker (real ones are xxh3 outputs).
    (worker << 48 | n).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The next batch of a worker: stores 16 new blocks, evicts the 16 stored WINDOW blocks ago.
fn batch(worker: u64, seq: u64) -> Vec<u8> {
    let first = (seq - 1) * BLOCKS_PER_EVENT;
    let stored: Vec<u64> = (first..first + BLOCKS_PER_EVENT).map(|n| block(worker, n)).collect();
    let mut events =
        vec![pb::KvEvent { kind: Some(pb::kv_event::Kind::Stored(pb::BlocksStored { blocks: stored })) }];
    if first >= WINDOW {
        let old = first - WINDOW;
        let removed = (old..old + BLOCKS_PER_EVENT).map(|n| block(worker, n)).collect();
        events.push(pb::KvEvent {
            kind: Some(pb::kv_event::Kind::Removed(pb::BlocksRemoved { blocks: removed })),
        });
    }
    pb::KvEventBatch { worker_id: format!("w{worker}"), epoch: 1, seq, events, dp_rank: 0 }.encode_to_vec()
}

fn decode_apply(c: &mut Criterion) {
    let mut state = FleetState::new(Settings { max_blocks: 1 << 22, ..Settings::default() }, BTreeMap::new());
    let now = Instant::now();
    for w in 0..WORKERS {
        apply_message(&mut state, SubjectKind::Worker, &heartbeat(w), now).expect("heartbeat applies");
    }
    let mut seq = vec![0u64; WORKERS as usize];
    // Fill the window first, so the measured batches both store and evict.
    for _ in 0..WINDOW / BLOCKS_PER_EVENT {
        for w in 0..WORKERS {
            seq[w as usize] += 1;
            apply_message(&mut state, SubjectKind::Kv, &batch(w, seq[w as usize]), now)
                .expect("batch applies");
        }
    }
    state.changes_mut().take_delta();
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(BATCHES * BLOCKS_PER_EVENT * 2));
    group.bench_function("decode_apply", |b| {
        b.iter_batched(
            || {
                (0..BATCHES)
                    .map(|i| {
                        let w = i % WORKERS;
                        seq[w as usize] += 1;
                        batch(w, seq[w as usize])
                    })
                    .collect::<Vec<_>>()
            },
            |payloads| {
                for p in &payloads {
                    let need = apply_message(&mut state, SubjectKind::Kv, p, now).expect("batch applies");
                    assert!(need.is_none(), "no gap in the benchmark's stream");
                }
                // The publisher's share: coalescing the window into a delta.
                state.changes_mut().take_delta()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    let stats = state.index_stats();
    eprintln!(
        "index after the run: {} blocks, {} bytes ({:.1} bytes/block)",
        stats.blocks, stats.bytes, stats.bytes_per_block
    );
}

fn lag(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let nats = kvmesh_tests::nats::NatsServer::start();
    let mut group = c.benchmark_group("lag");
    group.sample_size(30).measurement_time(Duration::from_secs(10));
    for batch_ms in [20u64, 2] {
        let (cp, client, mut stream) = runtime.block_on(async {
            let mut config = Config { namespace: format!("bench{batch_ms}"), ..Config::default() };
            config.nats.url = nats.url();
            config.admin.listen = "127.0.0.1:0".parse().expect("literal");
            config.grpc.listen = "127.0.0.1:0".parse().expect("literal");
            config.stream.batch_ms = batch_ms;
            config.resync.startup_window_ms = 0;
            let cp = ControlPlane::start(config).await.expect("control plane starts");
            let client = async_nats::connect(nats.url()).await.expect("NATS client");
            let subject = format!("kvmesh.bench{batch_ms}.worker.w");
            let mut grpc =
                StateClient::connect(format!("http://{}", cp.grpc_addr())).await.expect("gRPC connect");
            let mut stream = grpc
                .subscribe(pb::SubscribeRequest { node: "bench".into(), epoch: 0, version: 0 })
                .await
                .expect("subscribe")
                .into_inner();
            // Heartbeat until the worker is in (the control plane subscribes to NATS in the background).
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                assert!(Instant::now() < deadline, "the benchmark worker never registered");
                client.publish(subject.clone(), heartbeat(0).into()).await.expect("publish heartbeat");
                client.flush().await.expect("flush");
                let Ok(u) = tokio::time::timeout(Duration::from_millis(200), stream.message()).await else {
                    continue;
                };
                let u = u.expect("stream").expect("open");
                let registered = match &u.body {
                    Some(pb::state_update::Body::Snapshot(s)) => !s.workers.is_empty(),
                    Some(pb::state_update::Body::Delta(d)) => !d.upserted.is_empty(),
                    None => false,
                };
                if registered {
                    break;
                }
            }
            (cp, client, stream)
        });
        let subject = format!("kvmesh.bench{batch_ms}.kv.w0");
        let mut seq = 0u64;
        // `isolated`: each event comes after a quiet spell longer than the window (it goes out at
        // once); `back_to_back`: each event right after the previous delta (it waits out the window).
        for (case, quiet) in
            [("isolated", Duration::from_millis(batch_ms + 5)), ("back_to_back", Duration::ZERO)]
        {
            group.bench_function(format!("event_to_stream/batch_{batch_ms}ms/{case}"), |b| {
                b.iter_custom(|iters| {
                    runtime.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            if !quiet.is_zero() {
                                tokio::time::sleep(quiet).await;
                            }
                            seq += 1;
                            let stored = pb::BlocksStored { blocks: vec![block(0, seq)] };
                            let payload = pb::KvEventBatch {
                                worker_id: "w0".into(),
                                epoch: 1,
                                seq,
                                events: vec![pb::KvEvent { kind: Some(pb::kv_event::Kind::Stored(stored)) }],
                                dp_rank: 0,
                            }
                            .encode_to_vec();
                            let start = Instant::now();
                            client.publish(subject.clone(), payload.into()).await.expect("publish");
                            client.flush().await.expect("flush");
                            loop {
                                let u = stream.message().await.expect("stream").expect("open");
                                let arrived = matches!(&u.body, Some(pb::state_update::Body::Delta(d))
                                    if d.index.iter().any(|i| i.stored.contains(&block(0, seq))));
                                if arrived {
                                    break;
                                }
                            }
                            total += start.elapsed();
                        }
                        total
                    })
                })
            });
        }
        runtime.block_on(cp.shutdown());
    }
    group.finish();
}

criterion_group!(benches, decode_apply, lag);
criterion_main!(benches);
