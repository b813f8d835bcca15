//! The Envoy bootstrap serve generates: the listener with the kvmesh filter before the router (the
//! Wasm module, or the native dynamic module), the `workers` cluster whose override_host policy
//! follows the filter's choice, and (state mode, Wasm) the singleton state service with the same
//! `vm_id`, holding the one gRPC stream to the control plane over the HTTP/2 `kvmesh_control_plane`
//! cluster; the native module holds that stream itself. Shapes as in `envoy/kvmesh.yaml`,
//! `envoy/kvmesh-native.yaml` and the measured Envoy/proxy-wasm facts (singleton WasmService +
//! shared data).

use std::fmt::Write as _;
use std::path::Path;

/// The cluster the state service streams from.
pub const CONTROL_PLANE_CLUSTER: &str = "kvmesh_control_plane";
/// The request header the filter writes and the `workers` cluster's override_host policy reads
/// (Gateway API Inference Extension), `ip:port[,fallback...]`.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Envoy's listener buffers whole bodies for the filter: at least the filter's 8 MiB body limit
/// (the 1 MiB default answers 413 to long prompts before the filter sees them; measured).
const BUFFER_LIMIT_BYTES: u32 = 8 * 1024 * 1024;

/// What the bootstrap contains.
pub struct Bootstrap<'a> {
    /// Listener address (`127.0.0.1`, or `0.0.0.0` to serve other machines).
    pub listen: &'a str,
    /// Listener port.
    pub port: u16,
    /// Envoy admin port (on 127.0.0.1).
    pub admin_port: u16,
    /// The filter module.
    pub filter: FilterModule<'a>,
    /// The HTTP filter's configuration (JSON).
    pub filter_config: &'a str,
    /// State mode: the control plane's gRPC port and the state service's configuration (JSON).
    pub state_service: Option<(u16, &'a str)>,
    /// Workers, `127.0.0.1` ports.
    pub worker_ports: &'a [u16],
}

/// With the native filter: its metrics appear in `/stats/prometheus` under the Wasm filter's names
/// (`kvmesh_filter_*`, not `envoy_dynamicmodulescustom_kvmesh_filter_*`), so one dashboard serves
/// both builds (Envoy 1.40's runtime guard for dynamic modules' stat prefix).
pub const NATIVE_METRIC_NAMES: &str = "\
# The native filter's metrics under the Wasm filter's Prometheus names (kvmesh_filter_*).
layered_runtime:
  layers:
  - name: kvmesh
    static_layer:
      envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix: true
";

/// Which build of the filter, and its file.
#[derive(Clone, Copy, Debug)]
pub enum FilterModule<'a> {
    /// `kvmesh_filter.wasm`, run by V8.
    Wasm(&'a Path),
    /// `libkvmesh_filter_native.so`, an Envoy dynamic module.
    Native(&'a Path),
}

impl FilterModule<'_> {
    /// The HTTP filter's name in Envoy (also the key that disables it per route).
    fn envoy_name(self) -> &'static str {
        match self {
            FilterModule::Wasm(_) => "envoy.filters.http.wasm",
            FilterModule::Native(_) => "envoy.filters.http.dynamic_modules",
        }
    }

    /// The `http_filters` entry with `config` (JSON) as the filter's configuration.
    fn http_filter(self, config: &str) -> String {
        match self {
            FilterModule::Wasm(wasm) => format!(
                r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: kvmesh
                root_id: ""
{vm}                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {config}
                # REQUIRED for routing on the body: without it a paused request hangs.
                allow_on_headers_stop_iteration: true
                # A crashed filter VM degrades to the cluster's round robin instead of 503s.
                failure_policy: FAIL_OPEN
"#,
                vm = vm_config(wasm, "                "),
                config = yaml_string(config),
            ),
            FilterModule::Native(module) => format!(
                r#"          - name: envoy.filters.http.dynamic_modules
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config:
                module: {{ local: {{ filename: {module} }} }}
                # The module's connection thread lives as long as the process.
                do_not_close: true
              filter_name: kvmesh
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: {config}
"#,
                module = yaml_string(&module.to_string_lossy()),
                config = yaml_string(config),
            ),
        }
    }
}

/// A YAML double-quoted scalar (its escapes are a superset of JSON's for these characters).
pub fn yaml_string(s: &str) -> String {
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

/// A STATIC cluster's endpoints on 127.0.0.1, indented for `lb_endpoints`.
fn endpoints(ports: &[u16]) -> String {
    let mut out = String::new();
    for port in ports {
        let _ = writeln!(
            out,
            "        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
        );
    }
    out
}

/// `vm_config` shared by the HTTP filter and the state service: the same `vm_id` and code put
/// both in one VM per thread, and shared data is keyed by `vm_id`.
fn vm_config(wasm: &Path, indent: &str) -> String {
    format!(
        "{indent}vm_config:\n\
         {indent}  vm_id: kvmesh\n\
         {indent}  # The PyPI Envoy build has V8 only; other runtimes fail the plugin load.\n\
         {indent}  runtime: envoy.wasm.runtime.v8\n\
         {indent}  code: {{ local: {{ filename: {} }} }}\n",
        yaml_string(&wasm.to_string_lossy())
    )
}

impl Bootstrap<'_> {
    /// The bootstrap as YAML.
    pub fn to_yaml(&self) -> String {
        let mut out = String::from(
            "# Envoy bootstrap generated by `kvmesh serve` (see envoy/kvmesh.yaml for the annotated template).\n",
        );
        let _ = write!(
            out,
            "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }}\n",
            self.admin_port
        );
        if let FilterModule::Native(_) = self.filter {
            out.push_str(NATIVE_METRIC_NAMES);
        }
        if let (Some((_, service_config)), FilterModule::Wasm(wasm)) = (self.state_service, self.filter) {
            let _ = write!(
                out,
                "# The state service: one VM on the main thread holds the control plane's gRPC stream\n\
                 # and shares fleet state and model files with the filter's VMs (same vm_id).\n\
                 bootstrap_extensions:\n\
                 - name: envoy.bootstrap.wasm\n\
                 \x20 typed_config:\n\
                 \x20   \"@type\": type.googleapis.com/envoy.extensions.wasm.v3.WasmService\n\
                 \x20   singleton: true\n\
                 \x20   config:\n\
                 \x20     name: kvmesh_state\n\
                 \x20     root_id: \"\"\n\
                 {vm}\
                 \x20     configuration:\n\
                 \x20       \"@type\": type.googleapis.com/google.protobuf.StringValue\n\
                 \x20       value: {config}\n",
                vm = vm_config(wasm, "      "),
                config = yaml_string(service_config),
            );
        }
        let _ = write!(
            out,
            r#"static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: {listen}, port_value: {port} }} }}
    per_connection_buffer_limit_bytes: {BUFFER_LIMIT_BYTES}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: inference
              domains: ["*"]
              routes:
              - match: {{ path: "/v1/chat/completions" }}
                route:
                  cluster: workers
                  timeout: 300s
                  # A retry goes to the next host of the filter's fallback list.
                  retry_policy:
                    retry_on: connect-failure,refused-stream,reset
                    num_retries: 2
              - match: {{ path: "/v1/completions" }}
                route:
                  cluster: workers
                  timeout: 300s
                  retry_policy:
                    retry_on: connect-failure,refused-stream,reset
                    num_retries: 2
              # Other paths skip the filter (it costs ~35 µs even when it passes); the header
              # only the filter may set is dropped here instead.
              - match: {{ prefix: "/" }}
                route:
                  cluster: workers
                  timeout: 300s
                request_headers_to_remove: ["x-gateway-destination-endpoint"]
                typed_per_filter_config:
                  {filter_name}:
                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                    disabled: true
          http_filters:
{filter}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  # The workers. override_host only picks members of this cluster, so a client cannot aim Envoy
  # elsewhere; with no (or an unknown) header it falls back to round robin.
  - name: workers
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: workers
      endpoints:
      - lb_endpoints:
{workers}    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources: [ {{ header: {DESTINATION_HEADER} }} ]
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin
"#,
            listen = self.listen,
            port = self.port,
            filter_name = self.filter.envoy_name(),
            filter = self.filter.http_filter(self.filter_config),
            workers = endpoints(self.worker_ports),
        );
        if let Some((grpc_port, _)) = self.state_service {
            let _ = write!(
                out,
                r#"  # The control plane's gRPC state stream (HTTP/2).
  - name: {CONTROL_PLANE_CLUSTER}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: {CONTROL_PLANE_CLUSTER}
      endpoints:
      - lb_endpoints:
{endpoints}"#,
                endpoints = endpoints(&[grpc_port]),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap(state: bool) -> String {
        Bootstrap {
            listen: "127.0.0.1",
            port: 8080,
            admin_port: 9901,
            filter: FilterModule::Wasm(Path::new("/w/kvmesh_filter.wasm")),
            filter_config: r#"{"state":{}}"#,
            state_service: state.then_some((9091, r#"{"control_plane":{"cluster":"kvmesh_control_plane"}}"#)),
            worker_ports: &[8001, 8002],
        }
        .to_yaml()
    }

    #[test]
    fn state_mode_has_the_singleton_and_the_http2_cluster() {
        let yaml: serde_norway::Value = serde_norway::from_str(&bootstrap(true)).expect("valid YAML");
        let service = &yaml["bootstrap_extensions"][0]["typed_config"];
        assert_eq!(service["singleton"], true);
        assert_eq!(service["config"]["vm_config"]["vm_id"], "kvmesh");
        let value = service["config"]["configuration"]["value"].as_str().expect("a string");
        let json: serde_json::Value = serde_json::from_str(value).expect("JSON");
        assert_eq!(json["control_plane"]["cluster"], CONTROL_PLANE_CLUSTER);
        let clusters = yaml["static_resources"]["clusters"].as_sequence().expect("clusters");
        assert_eq!(clusters.len(), 2);
        assert_eq!(clusters[1]["name"], CONTROL_PLANE_CLUSTER);
        let workers = clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"].as_sequence();
        assert_eq!(workers.map(Vec::len), Some(2));
        let listener = &yaml["static_resources"]["listeners"][0];
        assert_eq!(listener["per_connection_buffer_limit_bytes"], 8_388_608);
        let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
        let wasm = &hcm["http_filters"][0]["typed_config"]["config"];
        assert_eq!(wasm["allow_on_headers_stop_iteration"], true);
        assert_eq!(wasm["failure_policy"], "FAIL_OPEN");
        assert_eq!(wasm["vm_config"]["vm_id"], "kvmesh");
        assert_eq!(wasm["configuration"]["value"], r#"{"state":{}}"#);
        let routes = &hcm["route_config"]["virtual_hosts"][0]["routes"];
        assert_eq!(routes[0]["match"]["path"], "/v1/chat/completions");
        assert_eq!(routes[0]["route"]["retry_policy"]["num_retries"], 2);
        assert_eq!(routes[1]["match"]["path"], "/v1/completions");
        // Everything else skips the filter.
        assert_eq!(routes[2]["match"]["prefix"], "/");
        assert_eq!(routes[2]["typed_per_filter_config"]["envoy.filters.http.wasm"]["disabled"], true);
    }

    #[test]
    fn static_mode_has_no_state_service() {
        let yaml: serde_norway::Value = serde_norway::from_str(&bootstrap(false)).expect("valid YAML");
        assert!(yaml.get("bootstrap_extensions").is_none());
        assert_eq!(yaml["static_resources"]["clusters"].as_sequence().map(Vec::len), Some(1));
    }

    #[test]
    fn native_filter_has_no_state_service_and_is_disabled_off_inference_paths() {
        let config = r#"{"state":{},"control_plane":{"address":"http://127.0.0.1:9091"}}"#;
        let yaml = Bootstrap {
            listen: "127.0.0.1",
            port: 8080,
            admin_port: 9901,
            filter: FilterModule::Native(Path::new("/w/libkvmesh_filter_native.so")),
            filter_config: config,
            state_service: None,
            worker_ports: &[8001],
        }
        .to_yaml();
        let yaml: serde_norway::Value = serde_norway::from_str(&yaml).expect("valid YAML");
        assert!(yaml.get("bootstrap_extensions").is_none());
        let layer = &yaml["layered_runtime"]["layers"][0]["static_layer"];
        assert_eq!(layer["envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix"], true);
        assert_eq!(yaml["static_resources"]["clusters"].as_sequence().map(Vec::len), Some(1));
        let hcm = &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        let filter = &hcm["http_filters"][0];
        assert_eq!(filter["name"], "envoy.filters.http.dynamic_modules");
        let typed = &filter["typed_config"];
        assert_eq!(
            typed["dynamic_module_config"]["module"]["local"]["filename"],
            "/w/libkvmesh_filter_native.so"
        );
        assert_eq!(typed["filter_name"], "kvmesh");
        assert_eq!(typed["filter_config"]["value"], config);
        let routes = &hcm["route_config"]["virtual_hosts"][0]["routes"];
        let disabled =
            &routes[2]["typed_per_filter_config"]["envoy.filters.http.dynamic_modules"]["disabled"];
        assert_eq!(*disabled, true);
    }

    #[test]
    fn yaml_string_escapes_quotes_and_backslashes() {
        assert_eq!(yaml_string(r#"{"a":"b\c"}"#), r#""{\"a\":\"b\\c\"}""#);
    }
}
