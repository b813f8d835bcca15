//! The filter routes inference requests inside real Envoy: 4 simulated vLLM workers (real Qwen3
//! tokenizer), Envoy with the built filter and the override_host cluster, the fleet and tokenizer in
//! the plugin configuration. Checks, through the engines' own `cached_tokens` and Envoy's per-host
//! stats: a repeated prefix lands where it is cached, distinct prefixes spread, errors are JSON, and
//! other paths pass through.

use kvmesh_tests::envoy::{Envoy, EnvoyConfig};
use kvmesh_tests::fleet::{
    MODEL, Sim, cached_tokens, metric, prometheus, requests_per_worker, static_plugin_config, system_prompt,
};
use kvmesh_tests::http;

/// The filter's body limit here: below Envoy's 1 MiB buffer limit, so the filter answers the 413.
const MAX_BODY_BYTES: usize = 256 * 1024;
/// The header the filter writes and the cluster's override_host policy reads.
const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";

/// A chat body with the short answer this test asks for.
fn chat(system: &str, user: &str) -> String {
    kvmesh_tests::fleet::chat(system, user, 16)
}

fn post_chat(envoy: &Envoy, body: &str) -> http::Response {
    kvmesh_tests::fleet::post_chat(envoy.port(), body)
}

#[test]
fn filter_routes_on_cached_prefix_and_answers_errors() {
    let mut sims: Vec<Sim> = (0..4).map(|i| Sim::start(i, 512)).collect();
    for sim in &mut sims {
        sim.wait_ready();
    }
    let mut config = EnvoyConfig::new(sims.iter().map(|s| s.port).collect());
    config.plugin_config = static_plugin_config(&sims, MAX_BODY_BYTES);
    config.override_host_header = DESTINATION_HEADER.to_string();
    let envoy = Envoy::start(config);
    let log = || envoy.process.log_text();

    // (a) The same long prefix twice: the second request lands where the first left it cached.
    let system = system_prompt("astronomy");
    let first = post_chat(&envoy, &chat(&system, "What is a comet?"));
    assert_eq!(first.status, 200, "{}\n{}", first.message.body_text(), log());
    let second = post_chat(&envoy, &chat(&system, "And an asteroid?"));
    assert_eq!(second.status, 200, "{}", second.message.body_text());
    let cached = cached_tokens(&second.message.body_text());
    assert!(cached >= 512, "second request found {cached} tokens cached; {}", second.message.body_text());

    // (b) Distinct prefixes sent at once spread over the workers (in-flight accounting).
    let topics = ["botany", "geology", "music", "cooking", "sailing", "chess", "poetry", "law"];
    let before = requests_per_worker(&envoy);
    std::thread::scope(|scope| {
        for topic in topics {
            let envoy = &envoy;
            scope.spawn(move || {
                let resp = post_chat(envoy, &chat(&system_prompt(topic), "Hello"));
                assert_eq!(resp.status, 200, "{}", resp.message.body_text());
                assert_eq!(resp.header("x-kvmesh-filter"), None, "only with `response_header` on");
            });
        }
    });
    let after = requests_per_worker(&envoy);
    let used = after.iter().filter(|(port, n)| **n > before.get(port).copied().unwrap_or(0)).count();
    assert!(used >= 3, "8 distinct prefixes went to only {used} workers: {before:?} -> {after:?}");

    // (c) Errors are JSON answers from the filter.
    let malformed = post_chat(&envoy, "{not json");
    assert_eq!(malformed.status, 400, "{}", malformed.message.body_text());
    assert!(malformed.message.body_text().starts_with(r#"{"error":"#), "{}", malformed.message.body_text());
    assert_eq!(malformed.header("content-type"), Some("application/json"));
    let unknown = post_chat(&envoy, &chat("hi", "there").replace(MODEL, "no-such-model"));
    assert_eq!(unknown.status, 404, "{}", unknown.message.body_text());
    assert!(unknown.message.body_text().contains("no-such-model"));

    let oversized = chat(&"x".repeat(MAX_BODY_BYTES), "hi");
    let too_large = post_chat(&envoy, &oversized);
    assert_eq!(too_large.status, 413, "{}", too_large.message.body_text());
    assert!(too_large.message.body_text().starts_with(r#"{"error":"#), "{}", too_large.message.body_text());

    // (d) Other paths pass through untouched (the sim answers them itself).
    let models = http::get(envoy.port(), "/v1/models").expect("GET /v1/models");
    assert_eq!(models.status, 200, "{}", models.message.body_text());
    assert!(models.message.body_text().contains(MODEL));

    // (e) The decisions show in Envoy's Prometheus stats.
    let stats = prometheus(&envoy);
    let metric = |name: &str| -> u64 {
        metric(&stats, name).unwrap_or_else(|| panic!("no {name} in stats:\n{stats}"))
    };
    assert_eq!(metric("kvmesh_filter_decisions_routed_total"), 10);
    assert_eq!(metric("kvmesh_filter_decisions_bad_request_total"), 1);
    assert_eq!(metric("kvmesh_filter_decisions_unknown_model_total"), 1);
    assert_eq!(metric("kvmesh_filter_decisions_too_large_total"), 1);
    assert!(metric("kvmesh_filter_overlap_blocks_total") > 0);
    // Qwen3's own template, plain chats: every routed chat rendered natively, none interpreted.
    assert_eq!(metric("kvmesh_filter_renders_native_total"), 10);
    assert_eq!(
        kvmesh_tests::fleet::metric(&stats, "kvmesh_filter_renders_interpreted_total").unwrap_or(0),
        0
    );

    // Shown with --nocapture: the per-VM tokenizer load time and the Prometheus names.
    for line in log().lines().filter(|l| l.contains("kvmesh filter") && l.contains("configured")) {
        eprintln!("{line}");
    }
    for line in stats.lines().filter(|l| l.contains("kvmesh_filter") && !l.starts_with('#')) {
        eprintln!("{line}");
    }
}
