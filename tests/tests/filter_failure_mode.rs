//! The filter's own failure policy in real Envoy. A filter told to follow the control plane whose
//! state never arrives (the control plane's port has nothing listening) cannot route: with
//! `failure_mode` `fail_open` (the default) it forwards requests without a destination, so the
//! cluster's override_host policy falls back to round robin and a worker answers; with
//! `fail_closed` it answers 503 with a JSON error. Each way is counted in the filter's metrics.

use kvmesh_tests::envoy::{Envoy, EnvoyConfig};
use kvmesh_tests::fleet::{Sim, chat, metric, post_chat, prometheus};
use kvmesh_tests::free_port;

/// Envoy with the filter following a control plane at `dead_port`, in `failure_mode`.
fn envoy(sims: &[Sim], dead_port: u16, failure_mode: Option<&str>) -> Envoy {
    let mut config = EnvoyConfig::new(sims.iter().map(|s| s.port).collect());
    let mode = failure_mode.map(|m| format!(r#","failure_mode":"{m}""#)).unwrap_or_default();
    config.plugin_config = format!(r#"{{"state":{{}}{mode}}}"#);
    config.override_host_header = "x-gateway-destination-endpoint".to_string();
    config.control_plane_grpc_port = Some(dead_port);
    Envoy::start(config)
}

#[test]
fn without_fleet_state_fail_open_forwards_and_fail_closed_answers_503() {
    let mut sims: Vec<Sim> = (0..2).map(|i| Sim::start(i, 512)).collect();
    for sim in &mut sims {
        sim.wait_ready();
    }
    // Nothing listens there: the state service keeps retrying and no state ever arrives.
    let dead_port = free_port();
    let body = chat("You are terse.", "Say hi.", 4);

    let open = envoy(&sims, dead_port, None);
    for _ in 0..2 {
        let resp = post_chat(open.port(), &body);
        assert_eq!(resp.status, 200, "{}\n{}", resp.message.body_text(), open.process.log_text());
        assert!(resp.message.body_text().contains("chat.completion"), "{}", resp.message.body_text());
    }
    let stats = prometheus(&open);
    assert_eq!(metric(&stats, "kvmesh_filter_fallbacks_total"), Some(2), "{stats}");
    assert_eq!(metric(&stats, "kvmesh_filter_decisions_routed_total").unwrap_or(0), 0, "{stats}");
    assert_eq!(metric(&stats, "kvmesh_filter_decisions_not_ready_total").unwrap_or(0), 0, "{stats}");
    drop(open);

    let closed = envoy(&sims, dead_port, Some("fail_closed"));
    let resp = post_chat(closed.port(), &body);
    assert_eq!(resp.status, 503, "{}", resp.message.body_text());
    assert!(resp.message.body_text().starts_with(r#"{"error":"#), "{}", resp.message.body_text());
    assert!(resp.message.body_text().contains("not known yet"), "{}", resp.message.body_text());
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let stats = prometheus(&closed);
    assert_eq!(metric(&stats, "kvmesh_filter_decisions_not_ready_total"), Some(1), "{stats}");
    assert_eq!(metric(&stats, "kvmesh_filter_fallbacks_total").unwrap_or(0), 0, "{stats}");
}
