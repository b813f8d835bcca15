//! The kvmesh filter module loads in real Envoy and requests pass through it to the upstream.

use std::time::Duration;

use kvmesh_tests::envoy::{Envoy, EnvoyConfig};
use kvmesh_tests::fleet::{
    Agent, ControlPlane, Sim, chat, filter_metric, filter_stats, metric, post_chat, requests_per_worker_at,
};
use kvmesh_tests::http::{self, EchoUpstream};
use kvmesh_tests::nats::NatsServer;

/// The version the filter stamps on responses (the workspace version; this crate shares it).
const FILTER_VERSION: &str = env!("CARGO_PKG_VERSION");

#[test]
fn post_passes_through_filter_to_upstream_intact() {
    let upstream = EchoUpstream::start();
    let mut config = EnvoyConfig::new(vec![upstream.port()]);
    config.plugin_config = r#"{"response_header":true}"#.to_owned();
    let envoy = Envoy::start(config);

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

/// Ports a bootstrap template needs filled in.
struct TemplatePorts {
    listen: u16,
    admin: u16,
    control_plane_grpc: u16,
    control_plane_admin: u16,
}

/// The two standalone bootstrap templates: the filter as a Wasm module, or as a native module.
#[derive(Clone, Copy, Debug)]
enum Template {
    /// `envoy/kvmesh.yaml`.
    Wasm,
    /// `envoy/kvmesh-native.yaml`.
    Native,
}

impl Template {
    fn file(self) -> &'static str {
        match self {
            Template::Wasm => "kvmesh.yaml",
            Template::Native => "kvmesh-native.yaml",
        }
    }

    /// The placeholder naming the module, and the module.
    fn module(self) -> (&'static str, std::path::PathBuf) {
        match self {
            Template::Wasm => ("KVMESH_FILTER_WASM", kvmesh_tests::filter_wasm()),
            Template::Native => ("KVMESH_FILTER_NATIVE", kvmesh_tests::filter_dynamic_module()),
        }
    }
}

/// `template` filled in as `envsubst` would; written to `dir`.
fn filled_template(
    dir: &kvmesh_tests::TempDir,
    ports: &TemplatePorts,
    template: Template,
) -> std::path::PathBuf {
    let template_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy").join(template.file());
    let text = std::fs::read_to_string(&template_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", template_path.display()));
    let (module_name, module) = template.module();
    let values = [
        ("KVMESH_LISTEN_PORT", ports.listen.to_string()),
        ("KVMESH_ADMIN_PORT", ports.admin.to_string()),
        (module_name, module.display().to_string()),
        ("KVMESH_CONTROL_PLANE_IP", "127.0.0.1".to_string()),
        ("KVMESH_CONTROL_PLANE_GRPC_PORT", ports.control_plane_grpc.to_string()),
        ("KVMESH_CONTROL_PLANE_ADMIN_PORT", ports.control_plane_admin.to_string()),
    ];
    let mut filled = text;
    for (name, value) in &values {
        filled = filled.replace(&format!("${{{name}}}"), value);
    }
    // Only the header comment may still mention a placeholder.
    let body: String =
        filled.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    assert!(!body.contains("${"), "a placeholder is left unfilled in {}:\n{body}", template.file());
    let path = dir.path().join(template.file());
    std::fs::write(&path, &filled).expect("write the filled-in template");
    path
}

/// `envoy/kvmesh.yaml` and `envoy/kvmesh-native.yaml`, filled in, are configurations Envoy accepts.
#[test]
fn standalone_bootstrap_templates_are_valid() {
    for template in [Template::Wasm, Template::Native] {
        let dir = kvmesh_tests::TempDir::new("envoy-validate");
        let free = kvmesh_tests::free_port;
        let ports = TemplatePorts {
            listen: free(),
            admin: free(),
            control_plane_grpc: free(),
            control_plane_admin: free(),
        };
        let path = filled_template(&dir, &ports, template);
        let out = std::process::Command::new(kvmesh_tests::envoy_binary())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&path)
            .output()
            .expect("run envoy --mode validate");
        assert!(
            out.status.success(),
            "envoy rejects envoy/{}:\n{}{}",
            template.file(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn wasm_bootstrap_finds_its_workers_and_skips_the_filter_off_inference_paths() {
    standalone_bootstrap_finds_its_workers_and_skips_the_filter_off_inference_paths(Template::Wasm);
}

#[test]
fn native_bootstrap_finds_its_workers_and_skips_the_filter_off_inference_paths() {
    standalone_bootstrap_finds_its_workers_and_skips_the_filter_off_inference_paths(Template::Native);
}

/// The template as deployed, with the control plane and two workers with their agents: the worker
/// cluster learns its members from the control plane (EDS); the filter runs on the two inference
/// paths only, and every other path goes round robin without it, a client's own destination
/// header dropped there.
fn standalone_bootstrap_finds_its_workers_and_skips_the_filter_off_inference_paths(template: Template) {
    let nats = NatsServer::start();
    let namespace = "template";
    let mut sims: Vec<Sim> = (0..2).map(|i| Sim::start(i, 512)).collect();
    for sim in &mut sims {
        sim.wait_ready();
    }
    let cp = ControlPlane::start(&nats.url(), namespace);
    let ids = ["sim-0", "sim-1"];
    let _agents: Vec<Agent> =
        sims.iter().zip(ids).map(|(sim, id)| Agent::start(id, sim, &nats.url(), namespace)).collect();
    cp.wait_for_workers(&ids);

    let free = kvmesh_tests::free_port;
    let ports = TemplatePorts {
        listen: free(),
        admin: free(),
        control_plane_grpc: cp.grpc_port,
        control_plane_admin: cp.admin_port,
    };
    let dir = kvmesh_tests::TempDir::new("envoy-template");
    let path = filled_template(&dir, &ports, template);
    let (listen, admin) = (ports.listen, ports.admin);
    let mut cmd = std::process::Command::new(kvmesh_tests::envoy_binary());
    cmd.arg("-c").arg(&path).args(["--concurrency", "1", "--disable-hot-restart", "--log-level", "info"]);
    let mut envoy = kvmesh_tests::Process::spawn_in(dir, "envoy", cmd);
    envoy.wait_ready("admin /ready answers 200", Duration::from_secs(60), || {
        kvmesh_tests::http_ok(admin, "/ready")
    });
    // Nothing in the file names a worker: both came from the control plane.
    let members = requests_per_worker_at(admin);
    assert!(sims.iter().all(|s| members.contains_key(&s.port)), "cluster members: {members:?}");

    // A client naming worker 1 itself on a non-inference path: ignored (round robin, header gone:
    // override_host would follow it if it reached the cluster).
    let chosen = format!("127.0.0.1:{}", sims[1].port);
    for _ in 0..4 {
        let resp =
            http::request(listen, "GET", "/v1/models", &[("x-gateway-destination-endpoint", &chosen)], None)
                .expect("GET through Envoy");
        assert_eq!(resp.status, 200, "{}\n{}", resp.message.body_text(), envoy.log_text());
    }
    let after = requests_per_worker_at(admin);
    let seen: Vec<u64> = sims.iter().map(|s| after.get(&s.port).copied().unwrap_or(0)).collect();
    assert_eq!(seen, [2, 2], "round robin over both workers, not the client's pick");
    let passed = filter_metric(&filter_stats(admin), "kvmesh_filter_passthrough_total").unwrap_or(0);
    assert_eq!(passed, 0, "the filter ran on GET /v1/models");

    // An inference request is routed by the filter once it has the model from the control plane.
    kvmesh_tests::wait_until("the filter loaded the model", Duration::from_secs(60), || {
        filter_metric(&filter_stats(admin), "kvmesh_filter_model_loads_total").unwrap_or(0) >= 1
    });
    let resp = post_chat(listen, &chat("You are terse.", "Say hi.", 4));
    assert_eq!(resp.status, 200, "{}\n{}", resp.message.body_text(), envoy.log_text());
    let stats = filter_stats(admin);
    assert_eq!(filter_metric(&stats, "kvmesh_filter_decisions_routed_total"), Some(1), "{stats}");
    // Both builds under the same Prometheus names (the native template sets the runtime key).
    let prometheus = http::get(admin, "/stats/prometheus").expect("admin stats").message.body_text();
    assert_eq!(metric(&prometheus, "kvmesh_filter_decisions_routed_total"), Some(1), "{prometheus}");
    envoy.kill();
}
