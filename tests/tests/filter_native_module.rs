//! The native filter (`filter-native`, an Envoy dynamic module; also the benchmark's
//! `native-kv-aware` target) routes in real Envoy as the Wasm filter does: 4 simulated vLLM
//! workers, the same plugin configuration (a static fleet here; `filter_control_plane.rs` runs it
//! on the control plane's state), the same override_host cluster, the same request path
//! (`kvmesh_filter::flow`) and metrics.

use kvmesh_tests::envoy::{Envoy, EnvoyConfig};
use kvmesh_tests::filter_dynamic_module;
use kvmesh_tests::fleet::{
    MODEL, Sim, cached_tokens, filter_metric, filter_stats, post_chat, static_plugin_config, system_prompt,
};
use kvmesh_tests::http::{self, EchoUpstream};

/// The module's body limit here (below Envoy's 1 MiB buffer limit, so the module answers the 413).
const MAX_BODY_BYTES: usize = 256 * 1024;
/// The header the module writes and the cluster's override_host policy reads.
const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Envoy's router adds this to what an upstream answered; a filter's own answer lacks it.
const UPSTREAM_TIME: &str = "x-envoy-upstream-service-time";

fn chat(system: &str, user: &str) -> String {
    kvmesh_tests::fleet::chat(system, user, 16)
}

/// A counter of the module's (`dynamicmodulescustom.<name>` in `/stats`).
fn counter(envoy: &Envoy, name: &str) -> u64 {
    let stats = filter_stats(envoy.admin_port());
    filter_metric(&stats, name).unwrap_or_else(|| panic!("no {name} in /stats:\n{stats}"))
}

/// 4 sims, and Envoy with `concurrency` worker threads running the native module over them.
fn native_fleet(concurrency: u32) -> (Vec<Sim>, Envoy) {
    let mut sims: Vec<Sim> = (0..4).map(|i| Sim::start(i, 512)).collect();
    for sim in &mut sims {
        sim.wait_ready();
    }
    let mut config = EnvoyConfig::new(sims.iter().map(|s| s.port).collect());
    config.plugin_config = static_plugin_config(&sims, MAX_BODY_BYTES);
    config.override_host_header = DESTINATION_HEADER.to_owned();
    config.dynamic_module = Some(filter_dynamic_module());
    config.concurrency = concurrency;
    (sims, Envoy::start(config))
}

#[test]
fn native_module_routes_on_cached_prefix_and_answers_errors() {
    let (_sims, envoy) = native_fleet(1);
    let log = || envoy.process.log_text();

    // The same long prefix twice: the second request lands where the first left it cached.
    let system = system_prompt("astronomy");
    let first = post_chat(envoy.port(), &chat(&system, "What is a comet?"));
    assert_eq!(first.status, 200, "{}\n{}", first.message.body_text(), log());
    let second = post_chat(envoy.port(), &chat(&system, "And an asteroid?"));
    assert_eq!(second.status, 200, "{}", second.message.body_text());
    let cached = cached_tokens(&second.message.body_text());
    assert!(cached >= 512, "second request found {cached} tokens cached; {}", second.message.body_text());
    assert_eq!(counter(&envoy, "kvmesh_filter_decisions_routed_total"), 2);
    assert!(second.header(UPSTREAM_TIME).is_some(), "a routed request is answered by the worker");

    // Errors are the router's JSON answers, from the module (Envoy's router never saw them).
    let malformed = post_chat(envoy.port(), "{not json");
    assert_eq!(malformed.status, 400, "{}", malformed.message.body_text());
    assert!(malformed.message.body_text().starts_with(r#"{"error":"#), "{}", malformed.message.body_text());
    assert_eq!(malformed.header("content-type"), Some("application/json"));
    let unknown = post_chat(envoy.port(), &chat("hi", "there").replace(MODEL, "no-such-model"));
    assert_eq!(unknown.status, 404, "{}", unknown.message.body_text());
    let too_large = post_chat(envoy.port(), &chat(&"x".repeat(MAX_BODY_BYTES), "hi"));
    assert_eq!(too_large.status, 413, "{}", too_large.message.body_text());
    assert!(too_large.message.body_text().starts_with(r#"{"error":"#), "{}", too_large.message.body_text());
    for answer in [&malformed, &unknown, &too_large] {
        assert_eq!(
            answer.header(UPSTREAM_TIME),
            None,
            "answered by the module: {:?}",
            answer.message.headers
        );
    }

    // Other paths pass through (the sim answers them itself), and nothing was routed for them.
    let models = http::get(envoy.port(), "/v1/models").expect("GET /v1/models");
    assert_eq!(models.status, 200, "{}", models.message.body_text());
    assert!(models.message.body_text().contains(MODEL));
    // The Wasm filter's own metrics, through Envoy's dynamic-module stats.
    for (name, expected) in [
        ("kvmesh_filter_decisions_routed_total", 2),
        ("kvmesh_filter_decisions_bad_request_total", 1),
        ("kvmesh_filter_decisions_unknown_model_total", 1),
        ("kvmesh_filter_decisions_too_large_total", 1),
        ("kvmesh_filter_renders_native_total", 2),
        ("kvmesh_filter_passthrough_total", 1),
        ("kvmesh_filter_fallbacks_total", 0),
    ] {
        assert_eq!(counter(&envoy, name), expected, "{name}");
    }
    // In Prometheus under the Wasm filter's names, so one dashboard serves both builds.
    let prometheus = kvmesh_tests::fleet::prometheus(&envoy);
    assert_eq!(
        kvmesh_tests::fleet::metric(&prometheus, "kvmesh_filter_decisions_routed_total"),
        Some(2),
        "{prometheus}"
    );
}

#[test]
fn native_module_drops_a_client_chosen_destination() {
    let upstream = EchoUpstream::start();
    let mut config = EnvoyConfig::new(vec![upstream.port()]);
    config.override_host_header = DESTINATION_HEADER.to_owned();
    config.dynamic_module = Some(filter_dynamic_module());
    let envoy = Envoy::start(config);

    // A path the module does not route, with a destination the client picked.
    let resp = http::request(envoy.port(), "GET", "/v1/models", &[(DESTINATION_HEADER, "127.0.0.1:1")], None)
        .expect("GET through Envoy");
    assert_eq!(resp.status, 200, "{}\n{}", resp.message.body_text(), envoy.process.log_text());
    let received = upstream.received();
    assert_eq!(received.len(), 1, "the upstream saw the request");
    assert_eq!(received[0].header(DESTINATION_HEADER), None, "the client's header was forwarded");
}

#[test]
fn native_module_loads_once_and_serves_every_worker_thread() {
    let (_sims, envoy) = native_fleet(2);

    // Concurrent requests on fresh connections: both worker threads fork a router and count into
    // the configuration's metrics.
    std::thread::scope(|scope| {
        for i in 0..8 {
            let envoy = &envoy;
            scope.spawn(move || {
                let resp =
                    post_chat(envoy.port(), &chat(&system_prompt("geology"), &format!("question {i}")));
                assert_eq!(resp.status, 200, "{}", resp.message.body_text());
            });
        }
    });
    assert_eq!(counter(&envoy, "kvmesh_filter_decisions_routed_total"), 8);
    let log = envoy.process.log_text();
    let loads = log.lines().filter(|l| l.contains("configured (dynamic module)")).count();
    assert_eq!(loads, 1, "one tokenizer load for the whole process; log:\n{log}");
    assert!(!log.contains("has no router"), "every worker forked its router; log:\n{log}");
}
