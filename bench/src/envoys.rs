//! The Envoys of the benchmark: an instant upstream (`direct_response` on 4 listener ports once
//! the whole request is read, the filter's 4 "workers"), plain Envoy in front of it (static cluster, round robin, no Wasm), and
//! Envoy with the kvmesh filter in the bootstrap shape of the integration tests
//! (`kvmesh_tests::envoy::EnvoyConfig`). Also what the benchmark reads from them: readiness time,
//! the filter's log lines and stats, and each process's CPU time.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvmesh_tests::envoy::EnvoyConfig;
use kvmesh_tests::{Process, TempDir, envoy_binary, free_port, http, localhost, tokenizer_dir};
use serde::{Deserialize, Serialize};

use kvmesh_core::PolicyKind;

/// The header the filter writes and the override_host policy reads.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// How long an Envoy may take to answer `/ready` (the filter's Envoy loads a tokenizer per VM).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Envoy merges histograms from its worker threads at every stats flush; 1 s (default 5 s) lets the
/// benchmark read a phase's decision-time histogram soon after the phase.
pub const STATS_FLUSH: Duration = Duration::from_secs(1);
/// What the instant upstream answers: a small OpenAI chat completion with `usage`.
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1767225600,"model":"Qwen/Qwen3-8B","choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":4096,"completion_tokens":2,"total_tokens":4098,"prompt_tokens_details":{"cached_tokens":0}}}"#;

/// The Envoys under test.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    /// No Wasm: a static cluster over the upstream ports, round robin.
    Plain,
    /// The kvmesh filter routing with Qwen3's tokenizer over 4 static workers (default policy and
    /// segment cache).
    Filter,
    /// The same with the segment id cache off (`"segment_cache":{"max_bytes":0}`).
    FilterNoSegmentCache,
    /// The module loaded with an empty configuration: it routes nothing, every request passes after
    /// the header callback (no pause, no body): the cost of having the Wasm filter at all.
    FilterPassthrough,
    /// The filter with the kv-aware policy (what it runs with control-plane state): no fleet index
    /// here, so its own recent decisions (optimistic entries) are what it matches, and early exit
    /// stops exact tokenizing at the first block they do not hold.
    FilterKvAware,
    /// The kv-aware filter's request path built natively as an Envoy dynamic module
    /// (`filter-native`, `libkvmesh_filter_native.so`) with the same plugin configuration: what the
    /// decision costs without the Wasm machinery.
    NativeKvAware,
}

impl Target {
    /// Every target, in report order.
    pub const ALL: [Target; 6] = [
        Target::Plain,
        Target::Filter,
        Target::FilterNoSegmentCache,
        Target::FilterPassthrough,
        Target::FilterKvAware,
        Target::NativeKvAware,
    ];

    /// Its name on the command line and in the tables.
    pub fn name(self) -> &'static str {
        match self {
            Target::Plain => "plain",
            Target::Filter => "filter",
            Target::FilterNoSegmentCache => "filter-no-segment-cache",
            Target::FilterPassthrough => "filter-passthrough",
            Target::FilterKvAware => "filter-kv-aware",
            Target::NativeKvAware => "native-kv-aware",
        }
    }

    /// The target called `name`.
    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the filter makes routing decisions here (so its decision metrics count).
    pub fn routes(self) -> bool {
        matches!(
            self,
            Target::Filter | Target::FilterNoSegmentCache | Target::FilterKvAware | Target::NativeKvAware
        )
    }

    /// Whether this target loads the filter's Wasm module.
    pub fn has_module(self) -> bool {
        !matches!(self, Target::Plain | Target::NativeKvAware)
    }

    /// The bootstrap of this target in front of `upstream_ports`, loading `module` instead of the
    /// one `make wasm` builds when given.
    pub fn bootstrap(
        self,
        admin: u16,
        listener: u16,
        upstream_ports: &[u16],
        module: Option<&Path>,
    ) -> Result<String> {
        let filter = |plugin_config| filter_yaml(admin, listener, upstream_ports, plugin_config, module);
        Ok(match self {
            Target::Plain => plain_yaml(admin, listener, upstream_ports),
            Target::Filter => filter(plugin_config(upstream_ports, None, None)?),
            Target::FilterNoSegmentCache => filter(plugin_config(upstream_ports, Some(0), None)?),
            Target::FilterKvAware => filter(plugin_config(upstream_ports, None, Some(PolicyKind::KvAware))?),
            Target::FilterPassthrough => filter("{}".to_owned()),
            Target::NativeKvAware => {
                let plugin = plugin_config(upstream_ports, None, Some(PolicyKind::KvAware))?;
                let mut config = filter_config(admin, listener, upstream_ports, plugin, None);
                config.dynamic_module = Some(dynamic_module()?);
                with_flush(&config)
            }
        })
    }
}

fn endpoints(ports: &[u16]) -> String {
    let mut out = String::new();
    for port in ports {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
        );
    }
    out
}

/// The instant upstream: one listener per port, each answering every request with [`COMPLETION`]
/// once it has read the whole request, as an engine does.
pub fn upstream_yaml(admin: u16, ports: &[u16]) -> String {
    let mut listeners = String::new();
    for port in ports {
        let _ = write!(
            listeners,
            r#"  - name: worker_{port}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: worker_{port}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              response_headers_to_add:
              - header: {{ key: content-type, value: application/json }}
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: '{COMPLETION}' }} }}
          http_filters:
          # An engine reads the whole request before it answers; without this the upstream would
          # answer at the headers, before a plain Envoy had forwarded the body, which favours
          # every proxy that streams the body over one that must read it first.
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 67108864
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
        );
    }
    format!(
        "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\n\
         static_resources:\n  listeners:\n{listeners}"
    )
}

/// Plain Envoy: the integration tests' listener and cluster without the Wasm filter, round robin.
pub fn plain_yaml(admin: u16, listener: u16, upstream_ports: &[u16]) -> String {
    format!(
        r#"stats_flush_interval: {flush}s
admin:
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
                  # As the filter's bootstrap: a refused connection moves on to the next host.
                  retry_policy: {{ retry_on: "connect-failure,refused-stream,reset", num_retries: 2 }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: workers
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: workers
      endpoints:
      - lb_endpoints:
{endpoints}"#,
        flush = STATS_FLUSH.as_secs(),
        endpoints = endpoints(upstream_ports),
    )
}

/// Where `cargo build --release -p kvmesh-filter-native` puts the dynamic module (or `KVMESH_FILTER_NATIVE`).
pub fn dynamic_module() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KVMESH_FILTER_NATIVE") {
        return Ok(PathBuf::from(path));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| kvmesh_tests::cache_dir().join("target"));
    let path = target.join("release/libkvmesh_filter_native.so");
    if !path.is_file() {
        bail!("{} not found: run `cargo build --release -p kvmesh-filter-native`", path.display());
    }
    Ok(path)
}

/// Envoy with the filter: the integration tests' bootstrap (`EnvoyConfig::to_yaml`), plus a shorter
/// stats flush interval so the decision-time histogram can be read per phase.
pub fn filter_yaml(
    admin: u16,
    listener: u16,
    upstream_ports: &[u16],
    plugin_config: String,
    module: Option<&Path>,
) -> String {
    with_flush(&filter_config(admin, listener, upstream_ports, plugin_config, module))
}

/// The integration tests' bootstrap for the benchmark's ports, header and module.
fn filter_config(
    admin: u16,
    listener: u16,
    upstream_ports: &[u16],
    plugin_config: String,
    module: Option<&Path>,
) -> EnvoyConfig {
    // `new` fills what the benchmark does not set (the module from `make wasm`, one worker thread).
    let mut config = EnvoyConfig::new(upstream_ports.to_vec());
    if let Some(module) = module {
        config.wasm = module.to_path_buf();
    }
    config.listener_port = listener;
    config.admin_port = admin;
    config.plugin_config = plugin_config;
    config.override_host_header = DESTINATION_HEADER.to_owned();
    config
}

/// `config`'s bootstrap with [`STATS_FLUSH`].
fn with_flush(config: &EnvoyConfig) -> String {
    format!("stats_flush_interval: {}s\n{}", STATS_FLUSH.as_secs(), config.to_yaml())
}

/// [`crate::plugin::plugin_config`] with the Qwen3 tokenizer files `make setup` installs.
pub fn plugin_config(
    upstream_ports: &[u16],
    segment_cache_bytes: Option<usize>,
    policy: Option<PolicyKind>,
) -> Result<String> {
    crate::plugin::plugin_config(&tokenizer_dir("qwen3"), upstream_ports, segment_cache_bytes, policy)
}

/// A running Envoy; stopped on drop.
pub struct RunningEnvoy {
    /// What it is, for messages.
    pub name: String,
    /// The child process (its log is read for the filter's load times).
    pub process: Process,
    /// Its admin port.
    pub admin: u16,
    /// Its first listener port.
    pub port: u16,
    /// From spawn to the first 200 from `/ready`.
    pub ready_after: Duration,
}

impl RunningEnvoy {
    /// Writes `yaml`, starts Envoy with `--concurrency concurrency` (on CPU `cpu` alone when
    /// given, through `taskset`), and waits for `/ready`.
    pub fn start(
        name: &str,
        yaml: &str,
        admin: u16,
        port: u16,
        concurrency: usize,
        cpu: Option<usize>,
    ) -> Result<RunningEnvoy> {
        let dir = TempDir::new(&format!("bench-{name}"));
        let bootstrap = dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap, yaml).with_context(|| format!("write {}", bootstrap.display()))?;
        let mut cmd = match cpu {
            None => Command::new(envoy_binary()),
            Some(cpu) => {
                // taskset execs Envoy: the child's pid, log and CPU time are Envoy's.
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", &cpu.to_string()]).arg(envoy_binary());
                cmd
            }
        };
        cmd.arg("-c").arg(&bootstrap).args(["--concurrency", &concurrency.to_string()]);
        // No shared memory (no --base-id needed beside other Envoys); info shows the filter's
        // load-time line and nothing per request.
        cmd.args(["--disable-hot-restart", "--log-level", "info"]);
        let started = Instant::now();
        let mut process = Process::spawn_in(dir, name, cmd);
        loop {
            if kvmesh_tests::http_ok(admin, "/ready") {
                break;
            }
            if let Some(status) = process.exited() {
                bail!("{name}: Envoy exited ({status}) before /ready\n{}", tail(&process.log_text(), 40));
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("{name}: Envoy not ready after {READY_TIMEOUT:?}\n{}", tail(&process.log_text(), 40));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let ready_after = started.elapsed();
        Ok(RunningEnvoy { name: name.to_owned(), process, admin, port, ready_after })
    }

    /// Starts `target` in front of `upstream_ports` on fresh ports (on CPU `cpu` alone when given),
    /// with `module` instead of the filter module `make wasm` builds when given.
    pub fn start_target(
        target: Target,
        upstream_ports: &[u16],
        cpu: Option<usize>,
        module: Option<&Path>,
    ) -> Result<RunningEnvoy> {
        let (admin, port) = (free_port(), free_port());
        let yaml = target.bootstrap(admin, port, upstream_ports, module)?;
        RunningEnvoy::start(target.name(), &yaml, admin, port, 1, cpu)
    }

    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        localhost(self.port)
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu(&self) -> Duration {
        process_cpu(&format!("/proc/{}/stat", self.process.pid())).unwrap_or_default()
    }

    /// The filter's counters from `/stats` (names without their namespace prefix).
    pub fn filter_counters(&self) -> Result<HashMap<String, u64>> {
        let resp = http::get(self.admin, "/stats?filter=kvmesh_filter")
            .with_context(|| format!("{}: GET /stats", self.name))?;
        let mut out = HashMap::new();
        for line in resp.message.body_text().lines() {
            if let Some((name, value)) = line.split_once(": ")
                && let Ok(value) = value.trim().parse::<u64>()
            {
                // `wasmcustom.` (Wasm) or `dynamicmodulescustom.` (the dynamic module) before the name.
                let name = name.rsplit_once('.').map_or(name, |(_, name)| name);
                out.insert(name.to_owned(), value);
            }
        }
        Ok(out)
    }

    /// The filter's decision-time histogram as merged at the last stats flush: its buckets.
    pub fn decision_histogram(&self) -> Result<Histogram> {
        let path =
            "/stats?filter=kvmesh_filter_decision_microseconds$&format=json&histogram_buckets=detailed";
        let resp = http::get(self.admin, path).with_context(|| format!("{}: GET {path}", self.name))?;
        Histogram::from_envoy_json(&resp.message.body_text())
    }

    /// Per-VM tokenizer load times the filter logged (`kvmesh filter ... loaded in N ms`; the native
    /// module logs the same line once per configuration), in order.
    pub fn filter_load_ms(&self) -> Vec<u64> {
        filter_load_ms(&self.process.log_text())
    }

    /// Phases of start-up read from the log's timestamps.
    pub fn startup_phases(&self) -> StartupPhases {
        StartupPhases::from_log(&self.process.log_text())
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// User plus system CPU time from a `/proc/<pid>/stat` file.
pub fn process_cpu(stat_path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux for every architecture's /proc ABI.
    Some(Duration::from_millis(ticks * 10))
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The `loaded in N ms` figures of the filter's log lines.
pub fn filter_load_ms(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("kvmesh filter") && l.contains("configured"))
        .filter_map(|l| l.rsplit_once("loaded in ")?.1.trim_end().strip_suffix(" ms")?.parse().ok())
        .collect()
}

/// Start-up phases from Envoy's log timestamps (milliseconds; `None` when a line is missing).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct StartupPhases {
    /// First log line to the header-map dump that follows loading the bootstrap (YAML to proto).
    pub bootstrap_ms: Option<f64>,
    /// "loading N listener(s)" to "loading stats configuration": the filter's module compiled by V8
    /// and the main thread's VMs configured.
    pub listeners_ms: Option<f64>,
    /// "starting workers" to "starting main dispatch loop": the worker threads' VMs configured.
    pub workers_ms: Option<f64>,
}

impl StartupPhases {
    /// Reads the phases from an Envoy log.
    pub fn from_log(log: &str) -> StartupPhases {
        let at = |needle: &str| log.lines().find(|l| l.contains(needle)).and_then(log_time_ms);
        let first = log.lines().next().and_then(log_time_ms);
        let span = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        StartupPhases {
            bootstrap_ms: span(first, at("HTTP header map info")),
            listeners_ms: span(at("listener(s)"), at("loading stats configuration")),
            workers_ms: span(at("starting workers"), at("starting main dispatch loop")),
        }
    }
}

/// Milliseconds since midnight of an Envoy log line's `[YYYY-MM-DD HH:MM:SS.mmm]` timestamp.
fn log_time_ms(line: &str) -> Option<f64> {
    let stamp = line.strip_prefix('[')?.get(11..23)?;
    let (hms, millis) = stamp.split_once('.')?;
    let mut parts = hms.split(':').map(|p| p.parse::<f64>());
    let (h, m, s) = (parts.next()?.ok()?, parts.next()?.ok()?, parts.next()?.ok()?);
    Some(((h * 60.0 + m) * 60.0 + s) * 1_000.0 + millis.parse::<f64>().ok()?)
}

/// An Envoy histogram's cumulative buckets (`histogram_buckets=detailed`): (lower bound, width, count).
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    buckets: Vec<(f64, f64, u64)>,
}

impl Histogram {
    /// Parses the admin's JSON (`totals` of the first histogram); empty when it has none yet.
    pub fn from_envoy_json(text: &str) -> Result<Histogram> {
        let doc: serde_json::Value = serde_json::from_str(text).context("parse /stats JSON")?;
        let totals = doc["stats"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|s| s["histograms"]["details"].get(0))
            .and_then(|d| d["totals"].as_array());
        let buckets = totals
            .into_iter()
            .flatten()
            .filter_map(|b| Some((b["lower_bound"].as_f64()?, b["width"].as_f64()?, b["count"].as_u64()?)))
            .collect();
        Ok(Histogram { buckets })
    }

    /// What was recorded since `earlier` (bucket counts subtracted).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|&(lower, width, count)| {
                let before = earlier.buckets.iter().find(|b| b.0 == lower && b.1 == width).map_or(0, |b| b.2);
                (lower, width, count.saturating_sub(before))
            })
            .filter(|b| b.2 > 0)
            .collect();
        Histogram { buckets }
    }

    /// Adds `other`'s counts (another span of the same histogram) to these.
    pub fn merge(&mut self, other: &Histogram) {
        for &(lower, width, count) in &other.buckets {
            match self.buckets.iter_mut().find(|b| b.0 == lower && b.1 == width) {
                Some(b) => b.2 += count,
                None => self.buckets.push((lower, width, count)),
            }
        }
    }

    /// Samples in the histogram.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.2).sum()
    }

    /// The `p`th percentile: the middle of the bucket holding it; `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut sorted = self.buckets.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut seen = 0;
        for (lower, width, count) in sorted {
            seen += count;
            if seen >= rank {
                return Some(lower + width / 2.0);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_times_and_phases_are_read_from_the_log() {
        let log = "\
[2026-11-25 03:41:13.514][1][info][main] [server.cc:1] initializing epoch 0
[2026-11-25 03:41:17.945][1][info][main] [server.cc:2] HTTP header map info:
[2026-11-25 03:41:17.970][1][info][config] [configuration_impl.cc:148] loading 1 listener(s)
[2026-11-25 03:41:26.973][1][info][wasm] [context.cc:1151] wasm log kvmesh: kvmesh filter 0.1.0 configured: 1 models, 4 workers, loaded in 1269 ms
[2026-11-25 03:41:28.069][1][info][config] [server.cc:3] loading stats configuration
[2026-11-25 03:41:28.069][1][info][config] [server.cc:4] all dependencies initialized. starting workers
[2026-11-25 03:41:29.100][2][info][wasm] [context.cc:1151] wasm log kvmesh: kvmesh filter 0.1.0 configured: 1 models, 4 workers, loaded in 1024 ms
[2026-11-25 03:41:29.101][1][info][main] [server.cc:1098] starting main dispatch loop
";
        assert_eq!(filter_load_ms(log), vec![1269, 1024]);
        let native = "[2026-12-07 19:40:00.000][1][info][dynamic_modules] [:] kvmesh filter 0.1.0 configured (dynamic module): 1 static models, 4 static workers, loaded in 812 ms";
        assert_eq!(filter_load_ms(native), vec![812]);
        let phases = StartupPhases::from_log(log);
        assert_eq!(phases.bootstrap_ms.map(f64::round), Some(4431.0));
        assert_eq!(phases.listeners_ms.map(f64::round), Some(10099.0));
        assert_eq!(phases.workers_ms.map(f64::round), Some(1032.0));
    }

    #[test]
    fn histogram_difference_and_percentiles() {
        let json = |counts: [u64; 3]| {
            format!(
                r#"{{"stats":[{{"histograms":{{"details":[{{"name":"h","totals":[
                {{"lower_bound":100,"width":10,"count":{}}},{{"lower_bound":110,"width":10,"count":{}}},
                {{"lower_bound":200,"width":10,"count":{}}}]}}]}}}}]}}"#,
                counts[0], counts[1], counts[2]
            )
        };
        let before = Histogram::from_envoy_json(&json([5, 0, 0])).expect("parses");
        let after = Histogram::from_envoy_json(&json([6, 8, 1])).expect("parses");
        let phase = after.since(&before);
        assert_eq!(phase.count(), 10);
        assert_eq!(phase.percentile(50.0), Some(115.0));
        assert_eq!(phase.percentile(100.0), Some(205.0));
        assert_eq!(Histogram::default().percentile(50.0), None);
        let mut two = phase.clone();
        two.merge(&phase);
        assert_eq!((two.count(), two.percentile(50.0)), (20, Some(115.0)));
    }

    #[test]
    fn cpu_time_of_this_process_is_readable() {
        assert!(process_cpu("/proc/self/stat").is_some());
    }

    #[test]
    fn plain_and_upstream_bootstraps_name_every_port() {
        let up = upstream_yaml(9000, &[9001, 9002]);
        assert!(up.contains("port_value: 9001") && up.contains("port_value: 9002"));
        assert!(up.contains("direct_response"));
        // The upstream answers only once it has read the whole body: the buffer filter runs first.
        let (buffer, router) = (up.find("filters.http.buffer"), up.find("filters.http.router"));
        assert!(buffer.is_some_and(|b| router.is_some_and(|r| b < r)), "{up}");
        let plain = plain_yaml(9100, 9101, &[9001, 9002]);
        assert!(plain.contains("port_value: 9101") && plain.contains("port_value: 9002"));
        assert!(!plain.contains("wasm"));
    }
}
