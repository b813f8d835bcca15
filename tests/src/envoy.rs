//! Envoy as a test child: a generated bootstrap with the kvmesh Wasm filter (or its request path as
//! a native dynamic module) in front of a cluster (static, or fed by the control plane's EDS) that
//! uses the override_host load-balancing policy (round robin when the host is unknown).
//! The config shapes are the measured ones in the Envoy/proxy-wasm facts page.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use crate::{Process, READY_TIMEOUT, TempDir, envoy_binary, filter_wasm, free_port, http_ok};

/// What the generated bootstrap contains.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    /// The listener port clients talk to.
    pub listener_port: u16,
    /// The admin port (`/ready`, `/stats`).
    pub admin_port: u16,
    /// The filter module.
    pub wasm: PathBuf,
    /// The plugin configuration, passed to the filter verbatim as a JSON string.
    pub plugin_config: String,
    /// Ports of the upstream workers on 127.0.0.1 (the `workers` cluster's members).
    pub upstream_ports: Vec<u16>,
    /// The request header the override_host policy reads (`ip:port`, or a comma-separated list).
    pub override_host_header: String,
    /// The control plane's gRPC port: adds the state service (a singleton bootstrap Wasm service
    /// with the filter's `vm_id`) and an HTTP/2 cluster `kvmesh_control_plane` to it.
    pub control_plane_grpc_port: Option<u16>,
    /// Envoy worker threads (each runs its own filter VM).
    pub concurrency: u32,
    /// The control plane's admin port: the `workers` cluster is then fed by EDS (xDS over REST,
    /// polled every second) from there, and `upstream_ports` is not used.
    pub workers_from_eds: Option<u16>,
    /// The filter as a native Envoy dynamic module (this `.so`, `filter-native`) in place of the
    /// Wasm module; it reaches the control plane itself (`control_plane.address` in its
    /// configuration), so leave `control_plane_grpc_port` unset with it.
    pub dynamic_module: Option<PathBuf>,
}

impl EnvoyConfig {
    /// Free ports, the filter from `make wasm`, an empty plugin config, and the given upstreams.
    pub fn new(upstream_ports: Vec<u16>) -> EnvoyConfig {
        EnvoyConfig {
            listener_port: free_port(),
            admin_port: free_port(),
            wasm: filter_wasm(),
            plugin_config: "{}".to_string(),
            upstream_ports,
            override_host_header: "x-kvmesh-worker".to_string(),
            control_plane_grpc_port: None,
            concurrency: 1,
            workers_from_eds: None,
            dynamic_module: None,
        }
    }

    /// The bootstrap as YAML.
    pub fn to_yaml(&self) -> String {
        let mut endpoints = String::new();
        for port in &self.upstream_ports {
            // Writing to a String cannot fail.
            let _ = writeln!(
                endpoints,
                "        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
            );
        }
        let (workers_source, eds_cluster) = match self.workers_from_eds {
            None => (
                format!(
                    "    type: STATIC\n    load_assignment:\n      cluster_name: workers\n      endpoints:\n      - lb_endpoints:\n{endpoints}"
                ),
                String::new(),
            ),
            Some(admin_port) => (
                r#"    type: EDS
    eds_cluster_config:
      eds_config:
        resource_api_version: V3
        api_config_source:
          api_type: REST
          transport_api_version: V3
          cluster_names: [kvmesh_control_plane_admin]
          refresh_delay: 1s
          request_timeout: 1s
"#
                .to_string(),
                format!(
                    r#"  - name: kvmesh_control_plane_admin
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: kvmesh_control_plane_admin
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }} }}
"#
                ),
            ),
        };
        let (service, cp_cluster) = match self.control_plane_grpc_port {
            None => (String::new(), String::new()),
            Some(port) => (
                format!(
                    r#"bootstrap_extensions:
- name: envoy.bootstrap.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.wasm.v3.WasmService
    singleton: true
    config:
      name: kvmesh_state
      root_id: ""
      vm_config:
        vm_id: kvmesh
        runtime: envoy.wasm.runtime.v8
        code: {{ local: {{ filename: {wasm} }} }}
      configuration:
        "@type": type.googleapis.com/google.protobuf.StringValue
        value: '{{"control_plane":{{"cluster":"kvmesh_control_plane","node":"test"}}}}'
"#,
                    wasm = yaml_string(&self.wasm.to_string_lossy()),
                ),
                format!(
                    r#"  - name: kvmesh_control_plane
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: kvmesh_control_plane
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
"#
                ),
            ),
        };
        let filter = match &self.dynamic_module {
            None => format!(
                r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: kvmesh
                root_id: ""
                vm_config:
                  vm_id: kvmesh
                  # The PyPI Envoy build has V8 only; other runtimes fail the plugin load.
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {wasm} }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {plugin_config}
                # Required for routing on the body: without it a paused request hangs.
                allow_on_headers_stop_iteration: true
"#,
                wasm = yaml_string(&self.wasm.to_string_lossy()),
                plugin_config = yaml_string(&self.plugin_config),
            ),
            Some(module) => format!(
                r#"          - name: envoy.filters.http.dynamic_modules
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config:
                module: {{ local: {{ filename: {module} }} }}
                do_not_close: true
              filter_name: kvmesh
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: {plugin_config}
"#,
                module = yaml_string(&module.to_string_lossy()),
                plugin_config = yaml_string(&self.plugin_config),
            ),
        };
        // xDS subscriptions need the node's id and cluster.
        let node =
            if self.workers_from_eds.is_some() { "node: { id: kvmesh-test, cluster: kvmesh }\n" } else { "" };
        // The native filter's metrics under the Wasm filter's Prometheus names, as deployed.
        let runtime = if self.dynamic_module.is_some() {
            "layered_runtime:\n  layers:\n  - name: kvmesh\n    static_layer:\n      \
             envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix: true\n"
        } else {
            ""
        };
        format!(
            r#"{node}{runtime}{service}admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: workers
                  timeout: 30s
                  # A refused connection moves on to the next host of the override list.
                  retry_policy: {{ retry_on: "connect-failure,refused-stream,reset", num_retries: 2 }}
          http_filters:
{filter}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: workers
    connect_timeout: 1s
{workers_source}    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources: [ {{ header: {header} }} ]
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin
{cp_cluster}{eds_cluster}"#,
            admin = self.admin_port,
            listener = self.listener_port,
            header = yaml_string(&self.override_host_header),
        )
    }
}

/// A YAML double-quoted scalar (its escapes are a superset of JSON's for these characters).
fn yaml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A running Envoy; stopped on drop.
pub struct Envoy {
    /// The process; public so tests can read its log or wait for it to exit.
    pub process: Process,
    /// The bootstrap it was started with.
    pub config: EnvoyConfig,
}

impl Envoy {
    /// Starts Envoy and waits until its admin `/ready` answers 200.
    pub fn start(config: EnvoyConfig) -> Envoy {
        let mut envoy = Envoy::spawn(config);
        let admin = envoy.config.admin_port;
        envoy.process.wait_ready("admin /ready answers 200", READY_TIMEOUT, || http_ok(admin, "/ready"));
        envoy
    }

    /// Starts Envoy without waiting (for tests that expect it to fail).
    pub fn spawn(config: EnvoyConfig) -> Envoy {
        let dir = TempDir::new("envoy");
        let bootstrap = dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap, config.to_yaml())
            .unwrap_or_else(|e| panic!("write {}: {e}", bootstrap.display()));
        let mut cmd = Command::new(envoy_binary());
        let concurrency = config.concurrency.to_string();
        cmd.arg("-c").arg(&bootstrap).args([
            "--concurrency",
            &concurrency,
            // No shared memory, so parallel tests need no distinct --base-id and a killed Envoy
            // leaves nothing behind in /dev/shm.
            "--disable-hot-restart",
            "--log-level",
            "info",
            "--component-log-level",
            "wasm:debug",
        ]);
        let process = Process::spawn_in(dir, "envoy", cmd);
        Envoy { process, config }
    }

    /// The listener port.
    pub fn port(&self) -> u16 {
        self.config.listener_port
    }

    /// The admin port.
    pub fn admin_port(&self) -> u16 {
        self.config.admin_port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_string_escapes_quotes_and_backslashes() {
        assert_eq!(yaml_string(r#"{"a":"b\c"}"#), r#""{\"a\":\"b\\c\"}""#);
    }
}
