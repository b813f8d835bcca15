//! The gRPC state stream: snapshot, ordered deltas, resume without a snapshot, model assets.

mod common;

use std::collections::BTreeSet;

use common::*;
use kvmesh_proto::v1 as pb;
use kvmesh_proto::v1::state_client::StateClient;
use pb::state_update::Body;

type Stream = tonic::Streaming<pb::StateUpdate>;

async fn subscribe(grpc: std::net::SocketAddr, epoch: u64, version: u64) -> Stream {
    let mut client = StateClient::connect(format!("http://{grpc}")).await.expect("connect the state service");
    client
        .subscribe(pb::SubscribeRequest { node: "envoy-1".into(), epoch, version })
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next update that is not a heartbeat.
async fn next(stream: &mut Stream) -> pb::StateUpdate {
    loop {
        let update = next_or_heartbeat(stream).await;
        if update.body.is_some() {
            return update;
        }
    }
}

async fn next_or_heartbeat(stream: &mut Stream) -> pb::StateUpdate {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an update in time")
        .expect("stream ok")
        .expect("stream open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_carries_heartbeats_at_the_current_version() {
    let nats = nats();
    let mut config = config(&nats, "beat");
    config.stream.heartbeat_ms = 100;
    let cp = start(config).await;
    let mut stream = subscribe(cp.grpc_addr(), 0, 0).await;
    let snapshot = next_or_heartbeat(&mut stream).await;
    assert!(matches!(snapshot.body, Some(Body::Snapshot(_))), "{snapshot:?}");
    for _ in 0..3 {
        let beat = next_or_heartbeat(&mut stream).await;
        assert!(beat.body.is_none(), "an idle stream carries only heartbeats: {beat:?}");
        assert_eq!((beat.epoch, beat.version), (snapshot.epoch, snapshot.version));
        assert!(beat.sent_at_ms >= snapshot.sent_at_ms);
    }
}

/// Reads deltas, checking versions follow one another, until `worker`'s stored blocks seen so far
/// include `want`; returns the last update.
async fn read_until_stored(
    stream: &mut Stream,
    mut version: u64,
    handle: &mut Option<u32>,
    worker: &str,
    want: &BTreeSet<u64>,
) -> pb::StateUpdate {
    let mut seen = BTreeSet::new();
    loop {
        let u = next(stream).await;
        assert_eq!(u.version, version + 1, "versions go up by one");
        version = u.version;
        let Some(Body::Delta(d)) = &u.body else { panic!("expected a delta, got {u:?}") };
        for w in &d.upserted {
            if w.worker_id == worker {
                *handle = Some(w.handle);
            }
        }
        for i in &d.index {
            if Some(i.handle) == *handle {
                seen.extend(i.stored.iter().copied());
            }
        }
        if want.is_subset(&seen) {
            return u;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_then_deltas_and_resume_without_snapshot() {
    let nats = nats();
    let client = client(&nats).await;
    let cp = start(config(&nats, "str1")).await;
    let a = FakeAgent::start(&client, "str1", "a", 1).await;
    a.heartbeat(60_000).await;
    a.store(&[1, 2]).await;
    wait_until("a indexed", || async { worker_blocks(cp.admin_addr().port(), "a").await == 2 }).await;

    let mut stream = subscribe(cp.grpc_addr(), 0, 0).await;
    let first = next(&mut stream).await;
    let Some(Body::Snapshot(snap)) = &first.body else {
        panic!("first update must be a snapshot: {first:?}")
    };
    assert_ne!(first.epoch, 0);
    assert!(first.sent_at_ms > 0);
    // Filters ignore an index hashed with another version than theirs.
    assert_eq!(snap.block_hash_version, kvmesh_core::hash::BLOCK_HASH_VERSION);
    assert_eq!(snap.workers.len(), 1);
    let mut handle = Some(snap.workers[0].handle);
    assert_eq!(snap.workers[0].worker_id, "a");
    assert_eq!(snap.index[0].stored.iter().copied().collect::<BTreeSet<_>>(), [1, 2].into());

    // Changes arrive as deltas with consecutive versions.
    a.store(&[3]).await;
    let b = FakeAgent::start(&client, "str1", "b", 2).await;
    b.heartbeat(60_000).await;
    b.store(&[1]).await;
    let last = read_until_stored(&mut stream, first.version, &mut handle, "a", &[3].into()).await;
    let mut last = last;
    let mut b_handle = None;
    // b's registration and block may be in the same or a later delta.
    if !matches!(&last.body, Some(Body::Delta(d)) if d.upserted.iter().any(|w| w.worker_id == "b")) {
        last = read_until_stored(&mut stream, last.version, &mut b_handle, "b", &[1].into()).await;
    }
    drop(stream);

    // Gone for a while; the fleet moves on; resuming from the last version gets deltas, no snapshot.
    a.remove(&[1]).await;
    a.store(&[4]).await;
    wait_until("a changed", || async { worker_blocks(cp.admin_addr().port(), "a").await == 3 }).await;
    let mut resumed = subscribe(cp.grpc_addr(), last.epoch, last.version).await;
    let u = next(&mut resumed).await;
    assert_eq!(u.version, last.version + 1);
    assert!(matches!(u.body, Some(Body::Delta(_))), "resume must not snapshot: {u:?}");
    let mut stored = BTreeSet::new();
    let mut removed = BTreeSet::new();
    let mut u = u;
    loop {
        if let Some(Body::Delta(d)) = &u.body {
            for i in d.index.iter().filter(|i| Some(i.handle) == handle) {
                stored.extend(i.stored.iter().copied());
                removed.extend(i.removed.iter().copied());
            }
        }
        if stored.contains(&4) && removed.contains(&1) {
            break;
        }
        let v = u.version;
        u = next(&mut resumed).await;
        assert_eq!(u.version, v + 1);
    }
    let m = metrics(cp.admin_addr().port()).await;
    assert_eq!(sample(&m, "kvmesh_cp_stream_resumes_total"), 1.0, "{m}");
    assert!(sample(&m, "kvmesh_cp_stream_snapshots_total") >= 1.0, "{m}");
    assert_eq!(sample(&m, "kvmesh_cp_stream_subscribers"), 1.0, "{m}");

    // Another epoch (a different replica's) cannot resume: snapshot.
    let mut other = subscribe(cp.grpc_addr(), last.epoch ^ 1, last.version).await;
    assert!(matches!(next(&mut other).await.body, Some(Body::Snapshot(_))));
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_worker_leaves_the_stream_and_cordon_reaches_it() {
    let nats = nats();
    let client = client(&nats).await;
    let cp = start(config(&nats, "str2")).await;
    let port = cp.admin_addr().port();
    let a = FakeAgent::start(&client, "str2", "a", 1).await;
    // Alive until the cordon is seen, however slow the machine; then its heartbeats stop.
    let alive = a.keep_alive(500);
    wait_until("a registered", || async { stats(port).await["workers"].get("a").is_some() }).await;
    let mut stream = subscribe(cp.grpc_addr(), 0, 0).await;
    let snap = next(&mut stream).await;
    let Some(Body::Snapshot(s)) = &snap.body else { panic!("snapshot first") };
    let handle = s.workers[0].handle;
    let (status, _) = request(port, "POST", "/v1/workers/a/cordon", Some(TOKEN), None).await;
    assert_eq!(status, 200);
    let u = next(&mut stream).await;
    let Some(Body::Delta(d)) = &u.body else { panic!("delta") };
    assert_eq!(d.upserted[0].state, pb::WorkerState::Cordoned as i32);
    alive.abort();
    // No more heartbeats: the worker expires and the stream says so.
    loop {
        let u = next(&mut stream).await;
        if let Some(Body::Delta(d)) = &u.body
            && d.removed_workers.contains(&handle)
        {
            break;
        }
    }
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_assets_are_served() {
    let nats = nats();
    let dir = kvmesh_tests::tokenizer_dir("qwen3");
    let mut config = config(&nats, "str3");
    let mut model = kvmesh_control_plane::config::ModelConfig::named("qwen", Some(dir.clone()));
    model.block_size = Some(16);
    config.models.push(model);
    let cp = start(config).await;
    // The canonical Qwen3 tokenizer.json is over gRPC's 4 MiB default: clients raise their limit.
    let mut client = StateClient::connect(format!("http://{}", cp.grpc_addr()))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let assets = client
        .get_model_assets(pb::ModelAssetsRequest { model: "qwen".into() })
        .await
        .expect("assets of a configured model")
        .into_inner();
    assert_eq!(assets.block_size, 16);
    assert_eq!(assets.tokenizer_id.len(), 16);
    assert!(assets.tokenizer.len() > 1_000_000, "tokenizer.json is large");
    assert!(!assets.tokenizer_config.is_empty());
    assert!(assets.chat_template.contains("im_start"), "Qwen's template");
    // What filters get loads as a tokenizer.
    let text = String::from_utf8(assets.tokenizer).unwrap();
    let tokenizer = kvmesh_core::Tokenizer::from_files(kvmesh_core::TokenizerFiles {
        tokenizer_json: &text,
        tokenizer_config_json: None,
        chat_template_jinja: None,
    })
    .expect("served tokenizer loads");
    assert!(!tokenizer.encode("hello world").unwrap().is_empty());
    let missing = client.get_model_assets(pb::ModelAssetsRequest { model: "nope".into() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    cp.shutdown().await;
}
