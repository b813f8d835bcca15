//! Ingest against a real nats-server: events, expiry, gaps, restarts, malformed input, replicas.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_blocks_show_in_stats_and_removal_and_clear_work() {
    let nats = nats();
    let client = client(&nats).await;
    let cp = start(config(&nats, "ing1")).await;
    let port = cp.admin_addr().port();
    let a = FakeAgent::start(&client, "ing1", "a", 11).await;
    let b = FakeAgent::start(&client, "ing1", "b", 12).await;
    a.heartbeat(60_000).await;
    b.heartbeat(60_000).await;
    a.store(&[101, 102, 103]).await;
    a.store(&[104]).await;
    wait_until("a has 4 blocks", || async { worker_blocks(port, "a").await == 4 }).await;
    let s = stats(port).await;
    assert_eq!(s["blocks"], 4);
    assert_eq!(s["workers"]["b"]["blocks"], 0);
    assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");

    a.remove(&[104, 103]).await;
    wait_until("a has 2 blocks", || async { worker_blocks(port, "a").await == 2 }).await;
    let sets = snapshot_sets(cp.grpc_addr()).await;
    assert_eq!(sets["a"], [101, 102].into());
    assert!(sets["b"].is_empty());

    a.clear().await;
    wait_until("a has no blocks", || async { worker_blocks(port, "a").await == 0 }).await;
    assert_eq!(stats(port).await["blocks"], 0);
    let m = metrics(port).await;
    assert!(sample(&m, "kvmesh_cp_kv_events_applied_total") >= 4.0, "{m}");
    assert_eq!(sample(&m, "kvmesh_cp_workers"), 2.0, "{m}");
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_worker_expires_and_its_blocks_leave_the_index() {
    let nats = nats();
    let client = client(&nats).await;
    let cp = start(config(&nats, "ing2")).await;
    let port = cp.admin_addr().port();
    let gone = FakeAgent::start(&client, "ing2", "gone", 1).await;
    let stays = FakeAgent::start(&client, "ing2", "stays", 2).await;
    let alive = stays.keep_alive(60_000);
    // Alive until its blocks are seen indexed, however slow the machine; then its heartbeats stop.
    let gone_alive = gone.keep_alive(500);
    gone.store(&[1, 2, 3]).await;
    stays.store(&[1]).await;
    wait_until("gone indexed", || async { worker_blocks(port, "gone").await == 3 }).await;
    gone_alive.abort();
    // No more heartbeats from `gone`: after its 500 ms ttl it leaves.
    wait_until("gone expired", || async { stats(port).await["workers"].get("gone").is_none() }).await;
    let s = stats(port).await;
    assert_eq!(s["blocks"], 1, "{s}");
    assert_eq!(s["workers"]["stays"]["blocks"], 1);
    let (_, workers) = get(port, "/v1/workers").await;
    assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");
    // At least once: on a loaded machine a heartbeat of `gone` can come late before it was
    // indexed, so it may have expired and come back once already.
    let expired = sample(&metrics(port).await, "kvmesh_cp_workers_expired_total");
    assert!(expired >= 1.0, "expired {expired}");
    alive.abort();
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seq_gap_triggers_a_resync_and_the_index_ends_equal() {
    let nats = nats();
    let client = client(&nats).await;
    let cp = start(config(&nats, "ing3")).await;
    let port = cp.admin_addr().port();
    let a = FakeAgent::start(&client, "ing3", "a", 5).await;
    a.heartbeat(60_000).await;
    a.store(&[1, 2]).await;
    a.store_lost(&[3, 4]).await;
    a.store(&[5]).await;
    wait_until("resync applied", || async {
        let s = stats(port).await;
        s["workers"]["a"]["blocks"] == 5 && s["workers"]["a"]["kv_seq"] == 3
    })
    .await;
    assert!(a.state.lock().await.resyncs_answered >= 1);
    assert_eq!(snapshot_sets(cp.grpc_addr()).await["a"], a.blocks().await);
    // Ingest goes on after the resync.
    a.remove(&[1]).await;
    wait_until("removal after resync", || async { worker_blocks(port, "a").await == 4 }).await;
    let m = metrics(port).await;
    assert!(sample(&m, "kvmesh_cp_resyncs_requested_total{reason=\"gap\"}") >= 1.0, "{m}");
    assert!(sample(&m, "kvmesh_cp_resyncs_completed_total") >= 1.0, "{m}");
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeat_ahead_of_the_applied_seq_triggers_a_resync() {
    let nats = nats();
    let client = client(&nats).await;
    let cp = start(config(&nats, "ing4")).await;
    let port = cp.admin_addr().port();
    let a = FakeAgent::start(&client, "ing4", "a", 5).await;
    a.heartbeat(60_000).await;
    a.store(&[1]).await;
    // The last batch is lost and nothing follows it but heartbeats.
    a.store_lost(&[2, 3]).await;
    a.heartbeat(60_000).await;
    wait_until("tail recovered", || async { worker_blocks(port, "a").await == 3 }).await;
    let m = metrics(port).await;
    assert!(sample(&m, "kvmesh_cp_resyncs_requested_total{reason=\"heartbeat_ahead\"}") >= 1.0, "{m}");
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_control_plane_rebuilds_the_same_index_through_resync_all() {
    let nats = nats();
    let client = client(&nats).await;
    let first = start(config(&nats, "ing5")).await;
    let port = first.admin_addr().port();
    let a = FakeAgent::start(&client, "ing5", "a", 21).await;
    let b = FakeAgent::start(&client, "ing5", "b", 22).await;
    let keep = [a.keep_alive(60_000), b.keep_alive(60_000)];
    a.store(&[1, 2, 3, 4, 5]).await;
    a.store(&[1]).await;
    b.store(&[1, 2, 9]).await;
    a.remove(&[2]).await;
    wait_until("first control plane indexed", || async {
        let s = stats(port).await;
        s["workers"]["a"]["blocks"] == 4 && s["workers"]["b"]["blocks"] == 3
    })
    .await;
    let before = stats(port).await;
    let sets_before = snapshot_sets(first.grpc_addr()).await;
    first.shutdown().await;

    let second = start(config(&nats, "ing5")).await;
    let port = second.admin_addr().port();
    wait_until("second control plane rebuilt", || async {
        let s = stats(port).await;
        s["workers"]["a"]["blocks"] == 4 && s["workers"]["b"]["blocks"] == 3
    })
    .await;
    let after = stats(port).await;
    for w in ["a", "b"] {
        assert_eq!(before["workers"][w], after["workers"][w], "{w}: {before} vs {after}");
    }
    assert_eq!(before["blocks"], after["blocks"]);
    assert_eq!(snapshot_sets(second.grpc_addr()).await, sets_before);
    assert!(a.state.lock().await.resyncs_answered >= 1, "rebuilt from resync answers");
    // The copy of block 1 came back through the resync too: one removal leaves it held.
    a.remove(&[1]).await;
    a.store(&[6]).await;
    wait_until("copies survived the resync", || async {
        snapshot_sets(second.grpc_addr()).await["a"] == [1, 3, 4, 5, 6].into()
    })
    .await;
    keep.iter().for_each(|k| k.abort());
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_message_is_counted_and_ingest_continues() {
    let nats = nats();
    let client = client(&nats).await;
    let cp = start(config(&nats, "ing6")).await;
    let port = cp.admin_addr().port();
    let a = FakeAgent::start(&client, "ing6", "a", 1).await;
    a.heartbeat(60_000).await;
    client.publish("kvmesh.ing6.kv.a", b"\xff\xff\xff not a protobuf".as_slice().into()).await.unwrap();
    client.publish("kvmesh.ing6.worker.x", b"\x0a\xff".as_slice().into()).await.unwrap();
    // Decodes, but names no worker.
    client.publish("kvmesh.ing6.load.a", Vec::new().into()).await.unwrap();
    client.flush().await.unwrap();
    a.store(&[7, 8]).await;
    wait_until("ingest continued", || async { worker_blocks(port, "a").await == 2 }).await;
    let m = metrics(port).await;
    assert_eq!(sample(&m, "kvmesh_cp_malformed_messages_total{subject=\"kv\"}"), 1.0, "{m}");
    assert_eq!(sample(&m, "kvmesh_cp_malformed_messages_total{subject=\"worker\"}"), 1.0, "{m}");
    assert_eq!(sample(&m, "kvmesh_cp_malformed_messages_total{subject=\"load\"}"), 1.0, "{m}");
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_agree() {
    let nats = nats();
    let client = client(&nats).await;
    let one = start(config(&nats, "ing7")).await;
    let a = FakeAgent::start(&client, "ing7", "a", 31).await;
    let b = FakeAgent::start(&client, "ing7", "b", 32).await;
    let keep = [a.keep_alive(60_000), b.keep_alive(60_000)];
    a.store(&[1, 2, 3]).await;
    b.store(&[1, 4]).await;
    // The second replica joins mid-stream: it learns the past through resync.all.
    let two = start(config(&nats, "ing7")).await;
    a.store(&[5]).await;
    a.store_lost(&[6]).await;
    a.store(&[7]).await;
    b.remove(&[4]).await;
    b.store(&[8, 9]).await;
    let want_a = a.blocks().await;
    let want_b = b.blocks().await;
    for cp in [&one, &two] {
        let port = cp.admin_addr().port();
        wait_until("replica caught up", || async {
            let s = stats(port).await;
            s["workers"]["a"]["blocks"] == want_a.len() && s["workers"]["b"]["blocks"] == want_b.len()
        })
        .await;
    }
    let (s1, s2) = (stats(one.admin_addr().port()).await, stats(two.admin_addr().port()).await);
    assert_eq!(s1["workers"], s2["workers"], "replicas disagree");
    assert_eq!(s1["blocks"], s2["blocks"]);
    let (x, y) = (snapshot_sets(one.grpc_addr()).await, snapshot_sets(two.grpc_addr()).await);
    assert_eq!(x, y);
    assert_eq!(x["a"], want_a);
    assert_eq!(x["b"], want_b);
    keep.iter().for_each(|k| k.abort());
    one.shutdown().await;
    two.shutdown().await;
}
