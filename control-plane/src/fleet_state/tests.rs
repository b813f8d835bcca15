use super::*;

fn state() -> FleetState {
    FleetState::new(Settings { max_blocks: 1000, ..Settings::default() }, BTreeMap::new())
}

fn hb(worker: &str, epoch: u64, kv_seq: u64) -> pb::Heartbeat {
    pb::Heartbeat {
        worker_id: worker.into(),
        address: format!("10.0.0.1:{}", 8000 + worker.len()),
        model: "m".into(),
        engine: pb::Engine::Vllm as i32,
        role: pb::Role::Both as i32,
        block_size: 16,
        tokenizer_id: "t".into(),
        ttl_ms: 1000,
        epoch,
        kv_seq,
        lora_adapters: vec![],
    }
}

fn stored(blocks: &[u64]) -> pb::KvEvent {
    pb::KvEvent { kind: Some(Kind::Stored(pb::BlocksStored { blocks: blocks.to_vec() })) }
}

fn removed(blocks: &[u64]) -> pb::KvEvent {
    pb::KvEvent { kind: Some(Kind::Removed(pb::BlocksRemoved { blocks: blocks.to_vec() })) }
}

fn cleared() -> pb::KvEvent {
    pb::KvEvent { kind: Some(Kind::Cleared(pb::AllBlocksCleared {})) }
}

fn batch(worker: &str, epoch: u64, seq: u64, events: Vec<pb::KvEvent>) -> pb::KvEventBatch {
    pb::KvEventBatch { worker_id: worker.into(), epoch, seq, events, dp_rank: 0 }
}

fn chunk(worker: &str, epoch: u64, seq: u64, n: u32, last: bool, blocks: &[u64]) -> pb::ResyncChunk {
    pb::ResyncChunk {
        worker_id: worker.into(),
        epoch,
        seq,
        blocks: blocks.to_vec(),
        copies: vec![],
        chunk: n,
        last,
    }
}

fn worker_blocks(s: &FleetState, worker: &str) -> u64 {
    s.index_stats().workers.get(worker).map_or(0, |w| w.blocks)
}

fn overlap(s: &FleetState, worker: &str, query: &[u64]) -> u32 {
    let slot = s.fleet().slot(&worker.into()).expect("worker registered");
    let q: Vec<BlockHash> = query.iter().map(|&h| BlockHash(h)).collect();
    let mut out = Vec::new();
    s.index().longest_prefix(&q, &mut out);
    out.iter().find(|o| o.worker == slot).map_or(0, |o| o.blocks)
}

#[test]
fn stored_blocks_are_indexed_and_removed_and_cleared() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 7, 0), now).unwrap();
    s.apply_heartbeat(hb("b", 9, 0), now).unwrap();
    assert_eq!(s.apply_kv_batch(batch("a", 7, 1, vec![stored(&[1, 2, 3])]), now).unwrap(), None);
    assert_eq!(overlap(&s, "a", &[1, 2, 3]), 3);
    assert_eq!(overlap(&s, "b", &[1, 2, 3]), 0);
    s.apply_kv_batch(batch("a", 7, 2, vec![removed(&[2])]), now).unwrap();
    assert_eq!(overlap(&s, "a", &[1, 2, 3]), 1);
    assert_eq!(worker_blocks(&s, "a"), 2);
    s.apply_kv_batch(batch("a", 7, 3, vec![cleared()]), now).unwrap();
    assert_eq!(worker_blocks(&s, "a"), 0);
    assert!(s.index().is_empty());
    assert_eq!(s.counters().events_applied, 3);
}

#[test]
fn copies_keep_a_block_until_the_last_is_removed() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    s.apply_kv_batch(batch("a", 1, 1, vec![stored(&[5]), stored(&[5])]), now).unwrap();
    s.apply_kv_batch(batch("a", 1, 2, vec![removed(&[5])]), now).unwrap();
    assert_eq!(worker_blocks(&s, "a"), 1);
    s.apply_kv_batch(batch("a", 1, 3, vec![removed(&[5, 6])]), now).unwrap();
    assert_eq!(worker_blocks(&s, "a"), 0);
    assert_eq!(s.counters().unknown_removals, 1);
}

#[test]
fn blocks_seen_before_registration_are_indexed_at_registration() {
    let now = Instant::now();
    let mut s = state();
    s.apply_kv_batch(batch("a", 3, 1, vec![stored(&[10, 11])]), now).unwrap();
    assert!(s.fleet().is_empty());
    s.apply_heartbeat(hb("a", 3, 1), now).unwrap();
    assert_eq!(overlap(&s, "a", &[10, 11]), 2);
    let snap = s.snapshot();
    assert_eq!(snap.workers.len(), 1);
    assert_eq!(snap.index[0].stored.len(), 2);
}

#[test]
fn gap_asks_for_resync_and_the_answer_plus_held_batches_rebuild_the_set() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    s.apply_kv_batch(batch("a", 1, 1, vec![stored(&[1])]), now).unwrap();
    // Batch 2 is lost; 3 shows the gap.
    let need = s.apply_kv_batch(batch("a", 1, 3, vec![stored(&[3])]), now).unwrap();
    assert_eq!(need, Some(ResyncNeeded { worker: "a".into(), reason: ResyncReason::Gap }));
    // Held while the resync is under way; no second request.
    assert_eq!(s.apply_kv_batch(batch("a", 1, 4, vec![stored(&[4])]), now).unwrap(), None);
    assert_eq!(worker_blocks(&s, "a"), 1);
    // The agent's set at seq 2 was {1, 2}; batches 3 and 4 replay on top.
    assert_eq!(s.apply_resync_chunk(5, chunk("a", 1, 2, 0, false, &[1]), now).unwrap(), None);
    assert_eq!(s.apply_resync_chunk(5, chunk("a", 1, 2, 1, true, &[2]), now).unwrap(), None);
    assert_eq!(overlap(&s, "a", &[1, 2, 3, 4]), 4);
    assert_eq!(s.index_stats().workers["a"].kv_seq, 4);
    assert_eq!(s.counters().resyncs_completed, 1);
}

#[test]
fn heartbeat_ahead_of_applied_seq_asks_for_resync() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    s.apply_kv_batch(batch("a", 1, 1, vec![stored(&[1])]), now).unwrap();
    assert_eq!(s.apply_heartbeat(hb("a", 1, 1), now).unwrap(), None);
    let need = s.apply_heartbeat(hb("a", 1, 2), now).unwrap();
    assert_eq!(need.map(|n| n.reason), Some(ResyncReason::HeartbeatAhead));
    // Pending: the next heartbeat does not ask again.
    assert_eq!(s.apply_heartbeat(hb("a", 1, 2), now).unwrap(), None);
}

#[test]
fn new_epoch_resets_the_workers_blocks() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    s.apply_kv_batch(batch("a", 1, 1, vec![stored(&[1, 2])]), now).unwrap();
    assert_eq!(s.apply_kv_batch(batch("a", 2, 1, vec![stored(&[7])]), now).unwrap(), None);
    assert_eq!(worker_blocks(&s, "a"), 1);
    assert_eq!(overlap(&s, "a", &[7]), 1);
}

#[test]
fn first_batch_mid_epoch_asks_for_resync() {
    let now = Instant::now();
    let mut s = state();
    let need = s.apply_kv_batch(batch("a", 1, 40, vec![stored(&[1])]), now).unwrap();
    assert_eq!(need.map(|n| n.reason), Some(ResyncReason::Gap));
}

#[test]
fn during_the_global_resync_window_gaps_wait_for_its_answer() {
    let now = Instant::now();
    let mut s = state();
    s.begin_global_resync(now + Duration::from_secs(2));
    assert_eq!(s.apply_kv_batch(batch("a", 1, 40, vec![stored(&[1])]), now).unwrap(), None);
    assert_eq!(s.apply_heartbeat(hb("a", 1, 40), now).unwrap(), None);
    // The resync.all answer (tag 0) covers seq 39; batch 40 replays.
    s.apply_resync_chunk(0, chunk("a", 1, 39, 0, true, &[9]), now).unwrap();
    assert_eq!(worker_blocks(&s, "a"), 2);
    // Had it never come, the worker would be asked on its own after the window and a timeout.
    let mut t = state();
    t.begin_global_resync(now + Duration::from_secs(2));
    t.apply_kv_batch(batch("b", 1, 5, vec![]), now).unwrap();
    assert!(t.resync_timeouts(now + Duration::from_secs(1)).is_empty());
    let late = t.resync_timeouts(now + Duration::from_secs(30));
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].reason, ResyncReason::Retry);
}

#[test]
fn resync_timeouts_back_off() {
    let t0 = Instant::now();
    let mut s = FleetState::new(
        Settings {
            resync_timeout: Duration::from_secs(1),
            resync_max_backoff: Duration::from_secs(3),
            default_ttl: Duration::from_secs(3600),
            ..Settings::default()
        },
        BTreeMap::new(),
    );
    s.apply_kv_batch(batch("a", 1, 9, vec![]), t0).unwrap();
    assert!(s.resync_timeouts(t0 + Duration::from_millis(900)).is_empty());
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(s.resync_timeouts(t1).len(), 1);
    // Next wait is 2 s, then capped at 3 s.
    assert!(s.resync_timeouts(t1 + Duration::from_millis(1900)).is_empty());
    let t2 = t1 + Duration::from_secs(2);
    assert_eq!(s.resync_timeouts(t2).len(), 1);
    assert!(s.resync_timeouts(t2 + Duration::from_millis(2900)).is_empty());
    assert_eq!(s.resync_timeouts(t2 + Duration::from_secs(3)).len(), 1);
}

#[test]
fn chunks_out_of_order_ask_again_and_stale_answers_are_ignored() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    s.apply_kv_batch(batch("a", 1, 1, vec![stored(&[1])]), now).unwrap();
    s.apply_kv_batch(batch("a", 1, 3, vec![]), now).unwrap();
    s.apply_resync_chunk(1, chunk("a", 1, 2, 0, false, &[1]), now).unwrap();
    let need = s.apply_resync_chunk(1, chunk("a", 1, 2, 2, true, &[2]), now).unwrap();
    assert_eq!(need.map(|n| n.reason), Some(ResyncReason::BadAnswer));
    s.apply_resync_chunk(2, chunk("a", 1, 2, 0, true, &[1, 2]), now).unwrap();
    assert_eq!(s.index_stats().workers["a"].kv_seq, 3);
    // A late answer at an older seq, or of another epoch, changes nothing.
    s.apply_resync_chunk(3, chunk("a", 1, 1, 0, true, &[]), now).unwrap();
    s.apply_resync_chunk(4, chunk("a", 99, 50, 0, true, &[]), now).unwrap();
    assert_eq!(worker_blocks(&s, "a"), 2);
}

#[test]
fn resync_copies_count_like_stores() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    let mut c = chunk("a", 1, 0, 0, true, &[1, 2]);
    c.copies = vec![2];
    s.apply_resync_chunk(1, c, now).unwrap();
    s.apply_kv_batch(batch("a", 1, 1, vec![removed(&[1, 2])]), now).unwrap();
    assert_eq!(overlap(&s, "a", &[1]), 1);
    assert_eq!(worker_blocks(&s, "a"), 1);
    let mut bad = chunk("a", 1, 0, 0, true, &[1]);
    bad.copies = vec![1, 1];
    assert_eq!(s.apply_resync_chunk(2, bad, now), Err(Rejected::CopiesMismatch));
}

#[test]
fn silent_workers_expire_with_their_blocks() {
    let t0 = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), t0).unwrap();
    s.apply_heartbeat(hb("b", 1, 0), t0).unwrap();
    s.apply_kv_batch(batch("a", 1, 1, vec![stored(&[1, 2])]), t0).unwrap();
    s.apply_kv_batch(batch("b", 1, 1, vec![stored(&[1])]), t0).unwrap();
    let t1 = t0 + Duration::from_millis(800);
    s.apply_heartbeat(hb("b", 1, 1), t1).unwrap();
    assert!(s.expire(t1).is_empty());
    let gone = s.expire(t0 + Duration::from_millis(1500));
    assert_eq!(gone, vec![WorkerId::from("a")]);
    assert_eq!(s.fleet().len(), 1);
    assert_eq!(s.index().len(), 1);
    assert_eq!(s.counters().workers_expired, 1);
    assert!(!s.index_stats().workers.contains_key("a"));
}

#[test]
fn stream_changes_follow_presence_and_handles_are_not_reused() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    s.apply_kv_batch(batch("a", 1, 1, vec![stored(&[1, 1, 2])]), now).unwrap();
    let d = s.changes_mut().take_delta();
    assert_eq!(d.upserted.len(), 1);
    let handle = d.upserted[0].handle;
    assert_eq!(
        d.index,
        vec![pb::IndexUpdate { handle, cleared: false, removed: vec![], stored: vec![1, 2] }]
    );
    // One copy of 1 goes: still present, so nothing to send.
    s.apply_kv_batch(batch("a", 1, 2, vec![removed(&[1])]), now).unwrap();
    assert!(s.changes_mut().take_delta().index.is_empty());
    s.expire(now + Duration::from_secs(5));
    assert_eq!(s.changes_mut().take_delta().removed_workers, vec![handle]);
    s.apply_heartbeat(hb("a", 1, 0), now + Duration::from_secs(5)).unwrap();
    let d = s.changes_mut().take_delta();
    assert_ne!(d.upserted[0].handle, handle);
}

#[test]
fn operator_state_and_role_survive_heartbeats() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    assert!(s.set_state(&"a".into(), WorkerState::Cordoned, now));
    assert!(s.set_role(&"a".into(), Some(Role::Prefill), now));
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    let slot = s.fleet().slot(&"a".into()).unwrap();
    let info = &s.fleet().get(slot).unwrap().info;
    assert_eq!((info.state, info.role), (WorkerState::Cordoned, Role::Prefill));
    assert!(!s.set_state(&"nobody".into(), WorkerState::Draining, now));
}

#[test]
fn equal_sets_give_equal_digests_whatever_the_order() {
    let now = Instant::now();
    let (mut x, mut y) = (state(), state());
    for s in [&mut x, &mut y] {
        s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    }
    x.apply_kv_batch(batch("a", 1, 1, vec![stored(&[1, 2, 3]), removed(&[2])]), now).unwrap();
    y.apply_resync_chunk(1, chunk("a", 1, 1, 0, true, &[3, 1]), now).unwrap();
    assert_eq!(x.index_stats().workers["a"], y.index_stats().workers["a"]);
    assert_ne!(x.index_stats().workers["a"].digest, format!("{:016x}", 0));
}

#[test]
fn empty_worker_id_is_rejected() {
    let now = Instant::now();
    let mut s = state();
    assert_eq!(s.apply_heartbeat(pb::Heartbeat::default(), now), Err(Rejected::NoWorkerId));
    assert_eq!(s.apply_kv_batch(pb::KvEventBatch::default(), now), Err(Rejected::NoWorkerId));
    assert_eq!(s.apply_load(pb::LoadReport::default(), now), Err(Rejected::NoWorkerId));
}

#[test]
fn load_reports_reach_the_fleet_and_the_stream() {
    let now = Instant::now();
    let mut s = state();
    s.apply_heartbeat(hb("a", 1, 0), now).unwrap();
    s.changes_mut().take_delta();
    let report = pb::LoadReport {
        worker_id: "a".into(),
        running: 3,
        waiting: 1,
        kv_usage: 0.5,
        kv_capacity_blocks: 100,
        ..Default::default()
    };
    s.apply_load(report, now).unwrap();
    let slot = s.fleet().slot(&"a".into()).unwrap();
    assert_eq!(s.fleet().get(slot).unwrap().load.running, 3);
    assert_eq!(s.changes_mut().take_delta().loads[0].waiting, 1);
}
