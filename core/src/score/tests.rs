//! Behaviour of the scorer and its policies on small crafted fleets.

use super::*;
use crate::fleet::{Engine, Role, WorkerInfo};

const MODEL: &str = "llama";
const BS: u32 = 16;

fn info(name: &str, model: &str, role: Role, state: WorkerState) -> WorkerInfo {
    WorkerInfo {
        id: name.into(),
        address: format!("10.0.0.{}:8000", name.trim_start_matches('w')),
        model: model.into(),
        engine: Engine::Vllm,
        role,
        block_size: BS,
        state,
    }
}

/// `n` ready workers `w0..w{n-1}` of MODEL, in slots 0..n.
fn fleet(n: usize) -> Fleet {
    let mut fleet = Fleet::new();
    for i in 0..n {
        fleet.upsert(info(&format!("w{i}"), MODEL, Role::Both, WorkerState::Ready)).unwrap();
    }
    fleet
}

fn load(fleet: &mut Fleet, slot: u16) -> &mut WorkerLoad {
    &mut fleet.get_mut(WorkerSlot(slot)).unwrap().load
}

fn blocks(tag: u64, n: usize) -> Vec<BlockHash> {
    (0..n as u64).map(|i| BlockHash(tag << 32 | i)).collect()
}

fn input(hashes: &[BlockHash]) -> RouteInput<'_> {
    RouteInput {
        model: MODEL,
        hashes,
        prompt_tokens: hashes.len() as u64 * u64::from(BS),
        expected_output_tokens: None,
        block_size: BS,
        now_ms: 0,
    }
}

fn policy(kind: PolicyKind) -> Policy {
    Policy::new(RoutingConfig { policy: kind, ..RoutingConfig::default() }).unwrap()
}

fn routed(d: &Decision) -> u16 {
    match d.outcome {
        Outcome::Routed(w) => w.0,
        other => panic!("expected a routed decision, got {other:?}"),
    }
}

#[test]
fn kv_aware_prefers_the_worker_with_the_cached_prefix() {
    let fleet = fleet(3);
    let prompt = blocks(1, 10);
    let mut index = PrefixIndex::new(1000);
    index.store(WorkerSlot(1), &prompt[..8]);
    index.store(WorkerSlot(2), &prompt[..3]);
    let mut scorer = Scorer::new();
    let d = scorer.route(
        &mut policy(PolicyKind::KvAware),
        &input(&prompt),
        &fleet,
        &index,
        &mut SplitMix64::new(1),
    );
    assert_eq!(routed(&d), 1);
    assert_eq!(d.overlap_blocks, 8);
    assert_eq!(d.prefill_tokens, 2 * 16);
    assert_eq!(d.request_blocks, 10);
    assert_eq!(d.cost, 2.0 + 10.0);
    assert_eq!(d.fallbacks.as_slice(), [WorkerSlot(2), WorkerSlot(0)]);
}

#[test]
fn loaded_worker_with_the_cache_loses_to_an_idle_one_unless_weights_favour_the_cache() {
    let mut fleet = fleet(2);
    *load(&mut fleet, 0) =
        WorkerLoad { kv_usage: 0.5, kv_capacity_blocks: 1000, running: 40, ..Default::default() };
    let prompt = blocks(1, 10);
    let mut index = PrefixIndex::new(1000);
    index.store(WorkerSlot(0), &prompt);
    let mut scorer = Scorer::new();
    let mut rng = SplitMix64::new(1);
    // w0: 1 * 0 + (500 + 10) = 510; w1: 1 * 10 + (0 + 10) = 20.
    let d = scorer.decide(&policy(PolicyKind::KvAware), &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(routed(&d), 1);
    assert_eq!(d.cost, 20.0);
    // At overlap_weight 100 a block of prefill is worth 100 of decode: w1 costs 1010, w0 still 510.
    let mut config = RoutingConfig::default();
    config.weights.overlap_weight = 100.0;
    let d = scorer.decide(&Policy::new(config).unwrap(), &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(routed(&d), 0);
    assert_eq!(d.cost, 510.0);
}

#[test]
fn pending_prefill_counts_against_a_worker() {
    let mut fleet = fleet(2);
    load(&mut fleet, 0).inflight_prefill_tokens = 4096; // 256 blocks queued for prefill
    let prompt = blocks(1, 10);
    let mut index = PrefixIndex::new(1000);
    index.store(WorkerSlot(0), &prompt);
    let d = Scorer::new().decide(
        &policy(PolicyKind::KvAware),
        &input(&prompt),
        &fleet,
        &index,
        &mut SplitMix64::new(1),
    );
    assert_eq!(routed(&d), 1);
}

#[test]
fn load_only_ignores_the_cache() {
    let mut fleet = fleet(2);
    load(&mut fleet, 0).inflight_blocks = 3;
    let prompt = blocks(1, 10);
    let mut index = PrefixIndex::new(1000);
    index.store(WorkerSlot(0), &prompt);
    let mut scorer = Scorer::new();
    let mut rng = SplitMix64::new(1);
    assert_eq!(
        routed(&scorer.decide(&policy(PolicyKind::KvAware), &input(&prompt), &fleet, &index, &mut rng)),
        0
    );
    let d = scorer.decide(&policy(PolicyKind::LoadOnly), &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(routed(&d), 1);
    assert_eq!(d.overlap_blocks, 0);
    let explained = scorer.explain(&fleet).unwrap();
    assert!(explained.candidates.iter().all(|c| c.overlap_blocks == 0));
}

#[test]
fn round_robin_cycles_through_available_workers() {
    let mut fleet = fleet(4);
    fleet.set_state(&"w2".into(), WorkerState::Cordoned);
    let index = PrefixIndex::new(10);
    let prompt = blocks(1, 4);
    let mut policy = policy(PolicyKind::RoundRobin);
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(1));
    let mut order = Vec::new();
    for _ in 0..6 {
        let d = scorer.route(&mut policy, &input(&prompt), &fleet, &index, &mut rng);
        order.push(routed(&d));
    }
    assert_eq!(order, [0, 1, 3, 0, 1, 3]);
    // The fallbacks are the next in turn; an overloaded worker's turn is skipped.
    load(&mut fleet, 1).waiting = 1000;
    let d = scorer.route(&mut policy, &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(routed(&d), 0);
    assert_eq!(d.fallbacks.as_slice(), [WorkerSlot(3)]);
    assert_eq!(routed(&scorer.route(&mut policy, &input(&prompt), &fleet, &index, &mut rng)), 3);
}

#[test]
fn approx_prefix_sticks_a_repeated_prompt_to_its_first_worker() {
    let fleet = fleet(4);
    let prompt = blocks(7, 20);
    // The fleet's index is ignored: approx-prefix is for fleets without KV events.
    let mut index = PrefixIndex::new(1000);
    index.store(WorkerSlot(3), &prompt);
    let mut policy = policy(PolicyKind::ApproxPrefix);
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(11));
    let first = scorer.route(&mut policy, &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(first.overlap_blocks, 0);
    let home = routed(&first);
    for _ in 0..10 {
        let d = scorer.route(&mut policy, &input(&prompt), &fleet, &index, &mut rng);
        assert_eq!(routed(&d), home);
        assert_eq!(d.overlap_blocks, 20);
    }
    // A prompt sharing the first half follows it too.
    let mut sibling = prompt[..10].to_vec();
    sibling.extend(blocks(8, 10));
    let d = scorer.route(&mut policy, &input(&sibling), &fleet, &index, &mut rng);
    assert_eq!((routed(&d), d.overlap_blocks), (home, 10));
}

#[test]
fn approx_prefix_forgets_after_its_ttl() {
    let fleet = fleet(4);
    let prompt = blocks(7, 20);
    let index = PrefixIndex::new(10);
    let mut config = RoutingConfig { policy: PolicyKind::ApproxPrefix, ..RoutingConfig::default() };
    config.approx.ttl_ms = 1_000;
    let mut policy = Policy::new(config).unwrap();
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(5));
    let at = |now_ms| RouteInput { now_ms, ..input(&prompt) };
    scorer.route(&mut policy, &at(0), &fleet, &index, &mut rng);
    assert_eq!(scorer.route(&mut policy, &at(500), &fleet, &index, &mut rng).overlap_blocks, 20);
    // The second record (at 500) keeps it until 1500.
    assert_eq!(scorer.route(&mut policy, &at(1_400), &fleet, &index, &mut rng).overlap_blocks, 20);
    // One prediction per (block, worker): the second record moved the expiry on.
    assert_eq!(policy.approx().unwrap().recorded_blocks(), 20);
    assert_eq!(scorer.route(&mut policy, &at(3_000), &fleet, &index, &mut rng).overlap_blocks, 0);
}

#[test]
fn approx_prefix_forgets_the_oldest_past_its_capacity() {
    let fleet = fleet(2);
    let (p, q) = (blocks(1, 10), blocks(2, 10));
    let index = PrefixIndex::new(10);
    let mut config = RoutingConfig { policy: PolicyKind::ApproxPrefix, ..RoutingConfig::default() };
    config.approx.max_blocks = 15;
    let mut policy = Policy::new(config).unwrap();
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(5));
    scorer.route(&mut policy, &input(&p), &fleet, &index, &mut rng);
    assert_eq!(scorer.decide(&policy, &input(&p), &fleet, &index, &mut rng).overlap_blocks, 10);
    scorer.route(&mut policy, &input(&q), &fleet, &index, &mut rng);
    assert_eq!(scorer.decide(&policy, &input(&p), &fleet, &index, &mut rng).overlap_blocks, 0);
    assert_eq!(scorer.decide(&policy, &input(&q), &fleet, &index, &mut rng).overlap_blocks, 10);
}

#[test]
fn kv_aware_trusts_its_own_recent_decisions_until_events_arrive() {
    let fleet = fleet(4);
    let prompt = blocks(9, 12);
    let mut index = PrefixIndex::new(1000);
    let mut config = RoutingConfig { policy: PolicyKind::KvAware, ..RoutingConfig::default() };
    config.optimistic_ttl_ms = 1_000;
    let mut policy = Policy::new(config).unwrap();
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(3));
    let at = |now_ms| RouteInput { now_ms, ..input(&prompt) };
    let first = scorer.route(&mut policy, &at(0), &fleet, &index, &mut rng);
    let home = routed(&first);
    // Before any KV event: the burst sticks to where the first request went.
    let second = scorer.route(&mut policy, &at(100), &fleet, &index, &mut rng);
    assert_eq!((routed(&second), second.overlap_blocks), (home, 12));
    // The fleet index and the local entries merge: the longer of the two counts.
    let other = (home + 1) % 4;
    index.store(WorkerSlot(other), &prompt[..4]);
    let d = scorer.decide(&policy, &at(200), &fleet, &index, &mut rng);
    assert_eq!((routed(&d), d.overlap_blocks), (home, 12));
    // Once expired, only the engines' events count.
    let d = scorer.decide(&policy, &at(5_000), &fleet, &index, &mut rng);
    policy.expire(5_000);
    let d_after = scorer.decide(&policy, &at(5_000), &fleet, &index, &mut rng);
    assert!(d.overlap_blocks >= d_after.overlap_blocks);
    assert_eq!((routed(&d_after), d_after.overlap_blocks), (other, 4));
}

#[test]
fn kv_aware_without_optimistic_entries_reads_only_the_fleet_index() {
    let fleet = fleet(4);
    let prompt = blocks(9, 12);
    let index = PrefixIndex::new(1000);
    let config =
        RoutingConfig { policy: PolicyKind::KvAware, optimistic_ttl_ms: 0, ..RoutingConfig::default() };
    let mut policy = Policy::new(config).unwrap();
    assert!(policy.approx().is_none());
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(3));
    scorer.route(&mut policy, &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(scorer.route(&mut policy, &input(&prompt), &fleet, &index, &mut rng).overlap_blocks, 0);
}

#[test]
fn decide_changes_no_policy_state() {
    let fleet = fleet(3);
    let prompt = blocks(1, 4);
    let index = PrefixIndex::new(10);
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(1));
    let rr = policy(PolicyKind::RoundRobin);
    let a = scorer.decide(&rr, &input(&prompt), &fleet, &index, &mut rng);
    let b = scorer.decide(&rr, &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(routed(&a), routed(&b));
    let approx = policy(PolicyKind::ApproxPrefix);
    scorer.decide(&approx, &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(approx.approx().unwrap().recorded_blocks(), 0);
}

/// Six workers whose costs differ (w0 cheapest, w5 dearest).
fn graded_fleet() -> Fleet {
    let mut fleet = fleet(6);
    for i in 0..6u16 {
        load(&mut fleet, i).inflight_blocks = u64::from(i) * 10;
    }
    fleet
}

fn sampled(config: RoutingConfig, seed: u64, draws: usize) -> Vec<u16> {
    let fleet = graded_fleet();
    let prompt = blocks(1, 8);
    let index = PrefixIndex::new(10);
    let policy = Policy::new(config).unwrap();
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(seed));
    (0..draws).map(|_| routed(&scorer.decide(&policy, &input(&prompt), &fleet, &index, &mut rng))).collect()
}

#[test]
fn temperature_sampling_is_deterministic_for_a_seed() {
    let config = RoutingConfig { temperature: 1.0, ..RoutingConfig::default() };
    let a = sampled(config, 42, 50);
    assert_eq!(a, sampled(config, 42, 50));
    assert_ne!(a, sampled(config, 43, 50));
}

#[test]
fn high_temperature_spreads_choices_and_low_temperature_does_not() {
    let hot = sampled(RoutingConfig { temperature: 100.0, ..RoutingConfig::default() }, 7, 600);
    for w in 0..6u16 {
        let n = hot.iter().filter(|&&x| x == w).count();
        assert!(n >= 60, "worker {w} chosen {n} of 600 times at temperature 100");
    }
    let cold = sampled(RoutingConfig { temperature: 0.01, ..RoutingConfig::default() }, 7, 600);
    assert!(cold.iter().filter(|&&x| x == 0).count() >= 590);
    let zero = sampled(RoutingConfig::default(), 7, 50);
    assert!(zero.iter().all(|&x| x == 0));
}

#[test]
fn exact_ties_go_to_fewer_in_flight_then_a_seeded_choice() {
    let mut fleet = fleet(3);
    load(&mut fleet, 0).inflight_requests = 2;
    let prompt = blocks(1, 4);
    let index = PrefixIndex::new(10);
    let policy = policy(PolicyKind::KvAware);
    let mut scorer = Scorer::new();
    let mut seen = [0usize; 3];
    for seed in 0..64 {
        let d = scorer.decide(&policy, &input(&prompt), &fleet, &index, &mut SplitMix64::new(seed));
        seen[usize::from(routed(&d))] += 1;
    }
    assert_eq!(seen[0], 0);
    assert!(seen[1] > 10 && seen[2] > 10, "{seen:?}");
    let again: Vec<u16> = (0..8)
        .map(|seed| {
            routed(&scorer.decide(&policy, &input(&prompt), &fleet, &index, &mut SplitMix64::new(seed)))
        })
        .collect();
    let twice: Vec<u16> = (0..8)
        .map(|seed| {
            routed(&scorer.decide(&policy, &input(&prompt), &fleet, &index, &mut SplitMix64::new(seed)))
        })
        .collect();
    assert_eq!(again, twice);
}

#[test]
fn all_overloaded_sheds_but_none_eligible_is_no_worker() {
    let prompt = blocks(1, 4);
    let index = PrefixIndex::new(10);
    let policy = policy(PolicyKind::KvAware);
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(1));

    let mut fleet = fleet(3);
    load(&mut fleet, 0).kv_usage = 0.99;
    load(&mut fleet, 1).waiting = 64;
    *load(&mut fleet, 2) = WorkerLoad { kv_capacity_blocks: 100, inflight_blocks: 95, ..Default::default() };
    let d = scorer.decide(&policy, &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(d.outcome, Outcome::Shed);
    assert_eq!(d.outcome.kind(), OutcomeKind::Shed);
    let mut header = String::new();
    assert!(!d.write_override_host(&fleet, &mut header));
    assert!(header.is_empty());

    load(&mut fleet, 1).waiting = 63;
    assert_eq!(routed(&scorer.decide(&policy, &input(&prompt), &fleet, &index, &mut rng)), 1);

    let mut other = Fleet::new();
    other.upsert(info("w0", "other-model", Role::Both, WorkerState::Ready)).unwrap();
    other.upsert(info("w1", MODEL, Role::Both, WorkerState::Cordoned)).unwrap();
    other.upsert(info("w2", MODEL, Role::Prefill, WorkerState::Ready)).unwrap();
    let d = scorer.decide(&policy, &input(&prompt), &other, &index, &mut rng);
    assert_eq!(d.outcome, Outcome::NoWorker);
    let d = scorer.decide(&policy, &input(&prompt), &Fleet::new(), &index, &mut rng);
    assert_eq!(d.outcome.kind(), OutcomeKind::NoWorker);
}

#[test]
fn ineligible_workers_are_skipped_with_reasons() {
    let mut fleet = Fleet::new();
    fleet.upsert(info("w0", MODEL, Role::Both, WorkerState::Cordoned)).unwrap();
    fleet.upsert(info("w1", MODEL, Role::Both, WorkerState::Draining)).unwrap();
    fleet.upsert(info("w2", "other", Role::Both, WorkerState::Ready)).unwrap();
    fleet.upsert(info("w3", MODEL, Role::Prefill, WorkerState::Ready)).unwrap();
    fleet.upsert(info("w4", MODEL, Role::Both, WorkerState::Ready)).unwrap();
    fleet.upsert(info("w5", MODEL, Role::Decode, WorkerState::Ready)).unwrap();
    fleet.upsert(info("w6", MODEL, Role::Decode, WorkerState::Ready)).unwrap();
    load(&mut fleet, 4).kv_usage = 0.97;
    load(&mut fleet, 5).waiting = 70;
    let prompt = blocks(1, 4);
    let mut index = PrefixIndex::new(100);
    for w in 0..6 {
        index.store(WorkerSlot(w), &prompt); // every skipped worker holds the whole prompt
    }
    let mut scorer = Scorer::new();
    let d =
        scorer.decide(&policy(PolicyKind::KvAware), &input(&prompt), &fleet, &index, &mut SplitMix64::new(1));
    assert_eq!(routed(&d), 6);
    assert!(d.fallbacks.is_empty());
    let e = scorer.explain(&fleet).unwrap();
    let reasons: Vec<Option<SkipReason>> = e.candidates.iter().map(|c| c.skipped).collect();
    use SkipReason::*;
    assert_eq!(
        reasons,
        [
            Some(Cordoned),
            Some(Draining),
            Some(OtherModel),
            Some(PrefillOnly),
            Some(OverloadedKv),
            Some(OverloadedQueue),
            None
        ]
    );
    // Ineligible workers are not scored; overloaded ones are, so an operator sees what they would cost.
    let costs: Vec<bool> = e.candidates.iter().map(|c| c.cost.is_some()).collect();
    assert_eq!(costs, [false, false, false, false, true, true, true]);
    assert_eq!(e.candidates[4].overlap_blocks, 4);
    assert!(OverloadedKv.is_overload() && !PrefillOnly.is_overload());
}

#[test]
fn fallbacks_are_the_next_best_in_cost_order() {
    let mut fleet = fleet(6);
    // Costs by slot: w0 40, w1 10, w2 30, w3 20, w4 overloaded, w5 50.
    for (slot, extra) in [(0u16, 36), (1, 6), (2, 26), (3, 16), (5, 46)] {
        load(&mut fleet, slot).inflight_blocks = extra;
    }
    load(&mut fleet, 4).waiting = 1000;
    let prompt = blocks(1, 4);
    let index = PrefixIndex::new(10);
    let mut config = RoutingConfig { fallbacks: 3, ..RoutingConfig::default() };
    let mut scorer = Scorer::new();
    let mut rng = SplitMix64::new(1);
    let d = scorer.decide(&Policy::new(config).unwrap(), &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(routed(&d), 1);
    assert_eq!(d.fallbacks.as_slice(), [WorkerSlot(3), WorkerSlot(2), WorkerSlot(0)]);
    let mut header = String::from("x=");
    assert!(d.write_override_host(&fleet, &mut header));
    assert_eq!(header, "x=10.0.0.1:8000,10.0.0.3:8000,10.0.0.2:8000,10.0.0.0:8000");

    config.fallbacks = MAX_FALLBACKS;
    let d = scorer.decide(&Policy::new(config).unwrap(), &input(&prompt), &fleet, &index, &mut rng);
    assert_eq!(d.fallbacks.as_slice(), [WorkerSlot(3), WorkerSlot(2), WorkerSlot(0), WorkerSlot(5)]);
    config.fallbacks = 0;
    let d = scorer.decide(&Policy::new(config).unwrap(), &input(&prompt), &fleet, &index, &mut rng);
    assert!(d.fallbacks.is_empty());
}

#[test]
fn equal_cost_fallbacks_keep_slot_order() {
    let fleet = fleet(5);
    let prompt = blocks(1, 4);
    let index = PrefixIndex::new(10);
    let config = RoutingConfig { fallbacks: 4, ..RoutingConfig::default() };
    let d = Scorer::new().decide(
        &Policy::new(config).unwrap(),
        &input(&prompt),
        &fleet,
        &index,
        &mut SplitMix64::new(3),
    );
    let chosen = routed(&d);
    let want: Vec<WorkerSlot> = (0..5).filter(|&s| s != chosen).map(WorkerSlot).collect();
    assert_eq!(d.fallbacks.as_slice(), want);
}

#[test]
fn explanation_serialises_the_per_worker_numbers() {
    let mut fleet = fleet(2);
    *load(&mut fleet, 0) = WorkerLoad {
        running: 3,
        waiting: 1,
        kv_usage: 0.25,
        kv_capacity_blocks: 400,
        inflight_requests: 2,
        inflight_prefill_tokens: 64,
        ..Default::default()
    };
    let prompt = blocks(1, 10);
    let mut index = PrefixIndex::new(100);
    index.store(WorkerSlot(0), &prompt[..6]);
    let mut scorer = Scorer::new();
    assert!(scorer.explain(&fleet).is_none());
    let request = RouteInput { prompt_tokens: 170, expected_output_tokens: Some(30), ..input(&prompt) };
    scorer.decide(&policy(PolicyKind::KvAware), &request, &fleet, &index, &mut SplitMix64::new(1));
    let json = serde_json::to_value(scorer.explain(&fleet).unwrap()).unwrap();
    assert_eq!(json["policy"], "kv-aware");
    assert_eq!(json["model"], MODEL);
    assert_eq!(json["outcome"], "routed");
    assert_eq!(json["chosen"]["id"], "w1");
    assert_eq!(json["chosen"]["address"], "10.0.0.1:8000");
    assert_eq!(json["fallbacks"][0]["id"], "w0");
    assert_eq!(json["request"]["prompt_tokens"], 170);
    assert_eq!(json["request"]["request_blocks"], 13); // ceil(200 / 16)
    assert_eq!(json["weights"]["overlap_weight"], 1.0);
    let w0 = &json["candidates"][0];
    assert_eq!(w0["worker"], "w0");
    assert_eq!(w0["overlap_blocks"], 6);
    assert_eq!(w0["prefill_blocks"], 5 + 4); // ceil(74 / 16) uncached + 64 / 16 pending
    assert_eq!(w0["decode_blocks"], 100 + 13);
    assert_eq!(w0["cost"], 122.0);
    assert_eq!((w0["running"].clone(), w0["waiting"].clone()), (3.into(), 1.into()));
    assert_eq!(w0["kv_usage"], 0.25);
    assert_eq!(w0["inflight_requests"], 2);
    assert_eq!(w0["inflight_prefill_tokens"], 64);
    assert!(w0["skipped"].is_null());
    let w1 = &json["candidates"][1];
    assert_eq!((w1["overlap_blocks"].clone(), w1["cost"].clone()), (0.into(), (11.0 + 13.0).into()));
    // It reads back, for clients of the admin API.
    let back: Explanation = serde_json::from_value(json).unwrap();
    assert_eq!(back.candidates.len(), 2);
}

#[test]
fn shed_explanation_names_no_worker_and_reasons() {
    let mut fleet = fleet(1);
    load(&mut fleet, 0).kv_usage = 1.0;
    let prompt = blocks(1, 2);
    let mut scorer = Scorer::new();
    scorer.decide(
        &policy(PolicyKind::LoadOnly),
        &input(&prompt),
        &fleet,
        &PrefixIndex::new(1),
        &mut SplitMix64::new(1),
    );
    let json = serde_json::to_value(scorer.explain(&fleet).unwrap()).unwrap();
    assert_eq!(json["outcome"], "shed");
    assert!(json["chosen"].is_null());
    assert_eq!(json["candidates"][0]["skipped"], "overloaded-kv");
}

#[test]
fn degenerate_requests_do_not_panic() {
    let fleet = fleet(3);
    let index = PrefixIndex::new(10);
    let mut scorer = Scorer::new();
    let mut rng = SplitMix64::new(1);
    for kind in [PolicyKind::KvAware, PolicyKind::LoadOnly, PolicyKind::RoundRobin, PolicyKind::ApproxPrefix]
    {
        let mut policy = policy(kind);
        let empty = RouteInput { prompt_tokens: 0, block_size: 0, ..input(&[]) };
        assert!(scorer.route(&mut policy, &empty, &fleet, &index, &mut rng).worker().is_some());
        let hashes = blocks(1, 3);
        let huge = RouteInput {
            prompt_tokens: u64::MAX,
            expected_output_tokens: Some(u64::MAX),
            now_ms: u64::MAX,
            ..input(&hashes)
        };
        assert!(scorer.route(&mut policy, &huge, &fleet, &index, &mut rng).worker().is_some());
        let unknown = RouteInput { model: "", ..input(&hashes) };
        assert_eq!(scorer.route(&mut policy, &unknown, &fleet, &index, &mut rng).outcome, Outcome::NoWorker);
    }
}

#[test]
fn removed_worker_does_not_break_explain_or_header() {
    let mut fleet = fleet(3);
    let prompt = blocks(1, 2);
    let mut scorer = Scorer::new();
    let d = scorer.decide(
        &policy(PolicyKind::KvAware),
        &input(&prompt),
        &fleet,
        &PrefixIndex::new(1),
        &mut SplitMix64::new(9),
    );
    let chosen = routed(&d);
    fleet.remove(&format!("w{chosen}").as_str().into());
    let mut header = String::new();
    assert!(!d.write_override_host(&fleet, &mut header));
    let e = scorer.explain(&fleet).unwrap();
    assert!(e.chosen.is_none());
    assert_eq!(e.candidates.len(), 2);
}

#[test]
fn policies_are_selected_by_name() {
    assert_eq!(Policy::by_name("approx-prefix").unwrap().kind(), PolicyKind::ApproxPrefix);
    assert!(Policy::by_name("approx-prefix").unwrap().approx().is_some());
    assert!(Policy::by_name("kv-aware").unwrap().approx().is_some(), "optimistic entries by default");
    assert!(Policy::by_name("load-only").unwrap().approx().is_none());
    assert!(Policy::by_name("nope").is_none());
    let bad = RoutingConfig { temperature: -1.0, ..RoutingConfig::default() };
    assert!(matches!(Policy::new(bad), Err(Error::InvalidConfig { field: "temperature", .. })));
}

#[test]
fn walked_overlaps_decide_as_index_lookups_do() {
    let mut fleet = fleet(4);
    load(&mut fleet, 1).running = 3;
    let prompt = blocks(4, 12);
    let mut index = PrefixIndex::new(1000);
    index.store(WorkerSlot(2), &prompt[..5]);
    index.store(WorkerSlot(3), &prompt[..2]);
    let mut policy = policy(PolicyKind::KvAware);
    let (mut scorer, mut rng) = (Scorer::new(), SplitMix64::new(9));
    // A first request leaves an optimistic entry for where it went.
    let first = scorer.route(&mut policy, &input(&prompt[..8]), &fleet, &index, &mut rng);
    for n in [1, 4, 8, 12] {
        let request = RouteInput { now_ms: 10, ..input(&prompt[..n]) };
        let mut runs = vec![0; fleet.slot_bound()];
        for (depth, &hash) in request.hashes.iter().enumerate() {
            if !policy.extend_runs(&index, hash, depth as u32, &mut runs, 10) {
                break;
            }
        }
        let (mut p1, mut p2) = (policy.clone(), policy.clone());
        let (mut s1, mut s2) = (scorer.clone(), scorer.clone());
        let (mut r1, mut r2) = (rng.clone(), rng.clone());
        let looked_up = s1.route(&mut p1, &request, &fleet, &index, &mut r1);
        let walked = s2.route_walked(&mut p2, &request, &runs, &fleet, &mut r2);
        assert_eq!(looked_up, walked, "{n} blocks");
        if n >= 8 {
            assert_eq!((routed(&walked), walked.overlap_blocks), (routed(&first), 8), "{n} blocks");
        }
    }
}
