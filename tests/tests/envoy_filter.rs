//! The kvmesh filter module loads in real Envoy and requests pass through it to the upstream.

use std::time::Duration;

use kvmesh_tests::envoy::{Envoy, EnvoyConfig};
use kvmesh_tests::http::{self, EchoUpstream};

/// The version the filter stamps on responses (the workspace version; this crate shares it).
const FILTER_VERSION: &str = env!("CARGO_PKG_VERSION");

#[test]
fn post_passes_through_filter_to_upstream_intact() {
    let upstream = EchoUpstream::start();
    let envoy = Envoy::start(EnvoyConfig::new(vec![upstream.port()]));

    let body =
        br#"{"model":"qwen3","messages":[{"role":"user","content":"hello \u00e9 world"}],"max_tokens":8}"#;
    let resp =
        http::post(envoy.port(), "/v1/chat/completions", &[("content-type", "application/json")], body)
            .expect("POST through Envoy");

    assert_eq!(
        resp.status,
        200,
        "body: {}\nenvoy log:\n{}",
        resp.message.body_text(),
        envoy.process.log_text()
    );
    assert_eq!(resp.header("x-kvmesh-filter"), Some(FILTER_VERSION), "headers: {:?}", resp.message.headers);
    assert_eq!(resp.body(), body, "the echo upstream returns what it received");
    let upstream_port = upstream.port().to_string();
    assert_eq!(resp.header("x-upstream-port"), Some(upstream_port.as_str()));

    let received = upstream.received();
    assert_eq!(received.len(), 1, "the upstream saw exactly one request");
    let seen = &received[0];
    assert!(seen.start_line.starts_with("POST /v1/chat/completions "), "{}", seen.start_line);
    assert_eq!(seen.body, body, "the body reached the upstream intact");
    assert_eq!(seen.header("content-length"), Some(body.len().to_string().as_str()));
}

#[test]
fn malformed_plugin_config_fails_envoy_start() {
    let mut config = EnvoyConfig::new(vec![]);
    config.plugin_config = "{not json".to_string();
    let mut envoy = Envoy::spawn(config);

    let status = envoy.process.wait_exit(Duration::from_secs(60));
    let log = envoy.process.log_text();
    assert!(
        matches!(status, Some(s) if !s.success()),
        "Envoy must refuse to start ({status:?}); log:\n{log}"
    );
    assert!(log.contains("invalid kvmesh filter configuration"), "the filter logs why; log:\n{log}");
}
