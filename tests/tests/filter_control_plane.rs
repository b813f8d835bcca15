//! The filter on the control plane's state, as deployed: nats-server, `kvmesh control-plane`, four
//! `kvmesh sim` workers each with its `kvmesh agent`, and Envoy (two worker threads) with the filter,
//! as the Wasm module with its singleton state service and as the native module (which holds the
//! stream itself). No worker or tokenizer is in the filter's configuration, and no worker in
//! Envoy's: the fleet, the KV index and the model's files come from the control plane, and the
//! worker cluster's members from its EDS (xDS over REST).
//!
//! Checks: (d) malformed and oversized bodies get JSON errors; (a) a prefix cached on one worker
//! (sent to it directly, so only the engine's events can tell) is routed there, and the predicted
//! overlap equals the engine's `cached_tokens`; (b) a hot prefix under concurrent load spreads
//! instead of piling onto its worker; (e) a worker that dies stops receiving traffic, with no
//! request failing meanwhile, and leaves Envoy's cluster; (c) with the control plane stopped Envoy
//! keeps serving, on load alone once the state is older than its TTL, and says so in its metrics.

use std::time::{Duration, Instant};

use kvmesh_tests::envoy::{Envoy, EnvoyConfig};
use kvmesh_tests::filter_dynamic_module;
use kvmesh_tests::fleet::{
    Agent, ControlPlane, MODEL, Sim, cached_tokens, chat, filter_metric as metric, filter_stats, post_chat,
    requests_per_worker, system_prompt,
};
use kvmesh_tests::nats::NatsServer;
use kvmesh_tests::{READY_TIMEOUT, http, wait_until};

/// The filter's state TTL here (short, so the stopped control plane shows within the test).
const STATE_TTL_MS: u64 = 2_000;
/// The filter's body limit: below Envoy's 1 MiB buffer limit, so the filter answers the 413.
const MAX_BODY_BYTES: usize = 256 * 1024;
/// Envoy worker threads: each follows the relayed state (the Wasm filter with a VM of its own).
const CONCURRENCY: u32 = 2;

/// Which build of the filter Envoy runs.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Host {
    /// The proxy-wasm module, with its state service.
    Wasm,
    /// The Envoy dynamic module.
    Native,
}

#[test]
fn wasm_filter_routes_on_control_plane_state_and_survives_its_loss() {
    routes_on_control_plane_state_and_survives_its_loss(Host::Wasm);
}

#[test]
fn native_filter_routes_on_control_plane_state_and_survives_its_loss() {
    routes_on_control_plane_state_and_survives_its_loss(Host::Native);
}

fn routes_on_control_plane_state_and_survives_its_loss(host: Host) {
    let nats = NatsServer::start();
    let namespace = "filtercp";
    let mut sims: Vec<Sim> = (0..4).map(|i| Sim::start(i, 512)).collect();
    for sim in &mut sims {
        sim.wait_ready();
    }
    let mut cp = ControlPlane::start(&nats.url(), namespace);
    let ids = ["sim-0", "sim-1", "sim-2", "sim-3"];
    let mut agents: Vec<Option<Agent>> =
        sims.iter().zip(ids).map(|(sim, id)| Some(Agent::start(id, sim, &nats.url(), namespace))).collect();
    cp.wait_for_workers(&ids);

    // No static members: the cluster learns the workers from the control plane's EDS.
    let mut config = EnvoyConfig::new(Vec::new());
    config.workers_from_eds = Some(cp.admin_port);
    let connection = match host {
        // The Wasm filter's VMs follow the state service, which streams through an Envoy cluster.
        Host::Wasm => {
            config.control_plane_grpc_port = Some(cp.grpc_port);
            String::new()
        }
        Host::Native => {
            config.dynamic_module = Some(filter_dynamic_module());
            format!(r#","control_plane":{{"address":"http://127.0.0.1:{}"}}"#, cp.grpc_port)
        }
    };
    config.plugin_config = format!(
        r#"{{"state":{{"ttl_ms":{STATE_TTL_MS}}},"max_body_bytes":{MAX_BODY_BYTES},"accuracy_sample_every":1{connection}}}"#
    );
    config.override_host_header = "x-gateway-destination-endpoint".to_string();
    config.concurrency = CONCURRENCY;
    let envoy = Envoy::start(config);
    let log = || envoy.process.log_text();
    // Every Wasm VM loads the model's tokenizer from the relayed files; the native module loads it
    // once for the process.
    let loads = if host == Host::Wasm { u64::from(CONCURRENCY) } else { 1 };
    wait_until("the model's tokenizer loaded from the relayed files", READY_TIMEOUT, || {
        metric(&filter_stats(envoy.admin_port()), "kvmesh_filter_model_loads_total").unwrap_or(0) >= loads
    });
    let stats = filter_stats(envoy.admin_port());
    assert_eq!(metric(&stats, "kvmesh_filter_state_stream_connected"), Some(1), "{stats}");
    assert!(metric(&stats, "kvmesh_filter_assets_fetched_total") >= Some(1), "{stats}");

    // (d) Errors are JSON answers from the filter.
    let malformed = post_chat(envoy.port(), "{not json");
    assert_eq!(malformed.status, 400, "{}", malformed.message.body_text());
    assert!(malformed.message.body_text().starts_with(r#"{"error":"#));
    let too_large = post_chat(envoy.port(), &chat(&"x".repeat(MAX_BODY_BYTES), "hi", 4));
    assert_eq!(too_large.status, 413, "{}", too_large.message.body_text());
    assert!(too_large.message.body_text().starts_with(r#"{"error":"#));
    let unknown = post_chat(envoy.port(), &chat("hi", "there", 4).replace(MODEL, "no-such-model"));
    assert_eq!(unknown.status, 404, "{}", unknown.message.body_text());

    // (a) A prefix cached on sim-2 behind the filter's back: only the engine's KV events, through
    // the agent, the control plane and the state service, can tell the filter where it is.
    let system = system_prompt("astronomy");
    let direct = http::post(
        sims[2].port,
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        chat(&system, "What is a comet?", 8).as_bytes(),
    )
    .expect("POST to sim-2");
    assert_eq!(direct.status, 200, "{}", direct.message.body_text());
    wait_until("sim-2's blocks indexed", READY_TIMEOUT, || {
        worker_blocks(&cp, "sim-2") >= 30 // ~600 tokens / 16
    });
    // The delta reaches every VM within a poll or two.
    std::thread::sleep(Duration::from_millis(300));
    let before = requests_per_worker(&envoy);
    for question in ["And an asteroid?", "And a meteor?", "And a planet?"] {
        let resp = post_chat(envoy.port(), &chat(&system, question, 8));
        assert_eq!(resp.status, 200, "{}\n{}", resp.message.body_text(), log());
        assert!(cached_tokens(&resp.message.body_text()) >= 480, "{}", resp.message.body_text());
    }
    let after = requests_per_worker(&envoy);
    let to_sim2 =
        after.get(&sims[2].port).copied().unwrap_or(0) - before.get(&sims[2].port).copied().unwrap_or(0);
    assert_eq!(to_sim2, 3, "all three went to sim-2 where the prefix is cached: {before:?} -> {after:?}");
    let stats = filter_stats(envoy.admin_port());
    let exact = metric(&stats, "kvmesh_filter_accuracy_exact_total").unwrap_or(0);
    let over = metric(&stats, "kvmesh_filter_accuracy_over_total").unwrap_or(0);
    let under = metric(&stats, "kvmesh_filter_accuracy_under_total").unwrap_or(0);
    assert!(
        exact >= 3,
        "predicted overlap equals the engine's cached tokens: exact {exact}, over {over}, under {under}"
    );
    assert!(metric(&stats, "kvmesh_filter_routed_by_kv_aware_total") >= Some(3), "{stats}");

    // (b) A hot prefix under concurrent load spreads over the workers instead of piling onto its home.
    let hot = system_prompt("cooking");
    let before = requests_per_worker(&envoy);
    std::thread::scope(|scope| {
        for i in 0..16 {
            let (envoy, hot) = (&envoy, &hot);
            scope.spawn(move || {
                let resp = post_chat(envoy.port(), &chat(hot, &format!("Recipe {i}?"), 400));
                assert_eq!(resp.status, 200, "{}", resp.message.body_text());
            });
        }
    });
    let after = requests_per_worker(&envoy);
    let used = after.iter().filter(|(port, n)| **n > before.get(port).copied().unwrap_or(0)).count();
    assert!(
        used >= 2,
        "16 concurrent requests of one prefix all went to one worker: {before:?} -> {after:?}"
    );

    // (e) sim-1 dies with its agent: requests keep succeeding (the override list's fallbacks and the
    // retry cover the gap), and once its registration expires it gets nothing more.
    let dead_port = sims[1].port;
    drop(agents[1].take());
    sims[1].process.kill();
    for i in 0..8 {
        let resp = post_chat(envoy.port(), &chat(&system_prompt("geology"), &format!("Rock {i}?"), 4));
        assert_eq!(resp.status, 200, "request during the failover: {}", resp.message.body_text());
    }
    cp.wait_for_workers(&["sim-0", "sim-2", "sim-3"]);
    // The next EDS poll (every second) takes it out of Envoy's cluster.
    wait_until("the dead worker left Envoy's cluster", Duration::from_secs(10), || {
        !requests_per_worker(&envoy).contains_key(&dead_port)
    });
    let before = requests_per_worker(&envoy);
    assert_eq!(before.len(), 3, "the live workers stay members: {before:?}");
    for i in 0..12 {
        let resp = post_chat(envoy.port(), &chat(&system_prompt(&format!("topic{i}")), "Hi", 4));
        assert_eq!(resp.status, 200, "{}", resp.message.body_text());
    }
    let after = requests_per_worker(&envoy);
    assert_eq!(
        after.get(&dead_port),
        before.get(&dead_port),
        "the dead worker still got requests: {before:?} -> {after:?}"
    );

    // (c) The control plane stops: Envoy keeps serving; past the TTL on load alone, counted.
    cp.process.kill();
    let stopped = Instant::now();
    let resp = post_chat(envoy.port(), &chat(&system, "Still there?", 4));
    assert_eq!(resp.status, 200, "{}", resp.message.body_text());
    while stopped.elapsed() < Duration::from_millis(STATE_TTL_MS + 1_500) {
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..6 {
        let resp = post_chat(envoy.port(), &chat(&system, &format!("Question {i}"), 4));
        assert_eq!(resp.status, 200, "with the control plane gone: {}", resp.message.body_text());
    }
    let stats = filter_stats(envoy.admin_port());
    assert!(metric(&stats, "kvmesh_filter_stale_state_routes_total") >= Some(6), "{stats}");
    assert_eq!(metric(&stats, "kvmesh_filter_state_stream_connected"), Some(0), "{stats}");

    for line in stats.lines().filter(|l| l.contains("kvmesh_filter") && !l.starts_with('#')) {
        eprintln!("{line}");
    }
}

/// Blocks the control plane indexes for a worker.
fn worker_blocks(cp: &ControlPlane, id: &str) -> u64 {
    let Ok(resp) = http::get(cp.admin_port, "/v1/workers") else { return 0 };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(resp.body()) else { return 0 };
    json["workers"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["id"] == id))
        .and_then(|w| w["blocks"].as_u64())
        .unwrap_or(0)
}
