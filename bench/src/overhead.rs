//! The Envoy overhead benchmark: what the kvmesh filter adds to a request in real Envoy, per
//! workload and concurrency, against plain Envoy on the same instant upstream; what it adds to
//! Envoy's start-up; and where its time goes (in-filter decision time from Envoy's stats, the same
//! pipeline natively, stage by stage).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvmesh_core::Tokenizer;
use kvmesh_core::tokenize::SegmentCacheConfig;
use kvmesh_tests::{free_port, tokenizer_dir};
use serde::{Deserialize, Serialize};

use crate::envoys::{
    Histogram, RunningEnvoy, STATS_FLUSH, StartupPhases, Target, load_average, plugin_config, process_cpu,
    upstream_yaml,
};
use crate::load::{self, Connection, LoadConfig, LoadResult};
use crate::native::{NativePipeline, NativeTiming};
use crate::stages::{StagesRun, load_tokenizer};
use crate::workload::{self, Workload, seed};

/// Appended to a target's name for its runs with the baseline module.
pub const BASELINE: &str = "@baseline";

/// Upstream listener ports: the filter's 4 workers.
const UPSTREAMS: usize = 4;
/// Repeats of the same text after its first sight on a fresh VM.
pub const REPEATS: usize = 5;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Recorded time per load run.
    pub duration: Duration,
    /// Unrecorded time before each recorded span.
    pub warmup: Duration,
    /// Interleaved rounds the recorded time is split into.
    pub rounds: usize,
    /// Closed-loop concurrencies.
    pub connections: Vec<usize>,
    /// Workload names (empty: all).
    pub workloads: Vec<String>,
    /// Envoys under load.
    pub targets: Vec<Target>,
    /// Fresh starts of each configuration for start-up times (the filter's also give first-sight
    /// decision times, one text kind each); 0 skips start-up.
    pub startup_runs: usize,
    /// Timed requests per workload for the native pipeline; 0 skips it.
    pub native_iterations: usize,
    /// Worker threads of the upstream Envoy.
    pub upstream_concurrency: usize,
    /// Pin the Envoy under test to the last CPU and this client and the upstream Envoy to the
    /// others, so that they never take turns on one core.
    pub pin: bool,
    /// Another build of the filter module: every target with the module also runs with it,
    /// interleaved in the same rounds, as `<target>@baseline`.
    pub baseline_module: Option<PathBuf>,
    /// The `filter-stages` module built for wasm32-wasip1: when set, the stages are also timed in
    /// node's V8 (`node` on PATH).
    pub v8_stages: Option<PathBuf>,
    /// The command line, for the report.
    pub command: String,
}

/// The machine and the artifacts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs available to this process.
    pub cpus: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// `envoy --version`.
    pub envoy_version: String,
    /// The filter module's size in bytes.
    pub module_bytes: u64,
    /// 1-minute load average at the start and the end.
    pub load_before: f64,
    /// 1-minute load average at the end.
    pub load_after: f64,
    /// Wall time of the whole benchmark, seconds.
    pub elapsed_s: f64,
    /// How processes were placed on CPUs (`None`: wherever the scheduler put them).
    #[serde(default)]
    pub pinning: Option<String>,
    /// The baseline module's path and size in bytes, when one ran beside the module under test.
    #[serde(default)]
    pub baseline_module: Option<(String, u64)>,
}

/// Fresh starts of one configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StartupRow {
    /// The configuration.
    pub config: String,
    /// Spawn to `/ready`, per start, milliseconds.
    pub ready_ms: Vec<f64>,
    /// Log phases per start.
    pub phases: Vec<StartupPhases>,
    /// Per-VM load times the filter logged, per start.
    pub vm_load_ms: Vec<Vec<u64>>,
}

/// A long prompt's first sight in a freshly started filter, then the same text again.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FirstSight {
    /// The text kind (`prose`, `code`, `cjk`).
    pub kind: String,
    /// In-filter decision time of the very first request (a small chat), microseconds.
    pub first_small_us: f64,
    /// Decision time of the long prompt, never seen (segment and word caches cold), microseconds.
    pub cold_us: f64,
    /// End-to-end latency of that request, microseconds.
    pub cold_latency_us: f64,
    /// Median decision time of the same text repeated, microseconds.
    pub repeat_us: f64,
}

/// One load run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Row {
    /// Workload name.
    pub workload: String,
    /// Target name.
    pub target: String,
    /// Closed-loop concurrency.
    pub connections: usize,
    /// Interleaved rounds the recorded span was split into.
    pub rounds: usize,
    /// Recorded requests.
    pub requests: usize,
    /// Recorded requests per second.
    pub rps: f64,
    /// Latency percentiles and mean, microseconds.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Failed requests (warm-up included) and the first failure.
    pub errors: u64,
    /// The first failure's text.
    pub first_error: Option<String>,
    /// CPU of the Envoy under test, the upstream Envoy and this process (the client), percent of one
    /// core over the measured span.
    pub envoy_cpu: f64,
    /// Upstream Envoy CPU.
    pub upstream_cpu: f64,
    /// CPU time of the Envoy under test per recorded request, microseconds: its cost per request
    /// whatever share of the machine it got (1e6 / this = requests per second one core could do).
    pub envoy_cpu_per_request_us: f64,
    /// Client CPU.
    pub client_cpu: f64,
    /// Filter decisions counted over the measured span, and their mean time (counter deltas).
    pub decisions: u64,
    /// Mean decision time, microseconds.
    pub decision_mean_us: Option<f64>,
    /// Decision-time percentiles from Envoy's histogram (bucket middles), microseconds.
    pub decision_p50_us: Option<f64>,
    /// 99th percentile decision time.
    pub decision_p99_us: Option<f64>,
    /// 1-minute load average after the run.
    pub load_average: f64,
}

/// Native timings of a workload with and without the segment cache.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NativeRow {
    /// Workload name.
    pub workload: String,
    /// With the default segment cache.
    pub cached: NativeTiming,
    /// With the segment cache off.
    pub uncached: NativeTiming,
}

/// Everything measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The command line.
    pub command: String,
    /// Recorded seconds per load run.
    pub duration_s: f64,
    /// Warm-up seconds before each recorded span.
    pub warmup_s: f64,
    /// Interleaved rounds per load run.
    pub rounds: usize,
    /// Machine and artifacts.
    pub machine: Machine,
    /// Start-up per configuration.
    pub startup: Vec<StartupRow>,
    /// First sight per text kind.
    pub first_sight: Vec<FirstSight>,
    /// Native pipeline per workload.
    pub native: Vec<NativeRow>,
    /// The stages in V8 outside Envoy (node, TurboFan only), when run.
    pub v8: Option<StagesRun>,
    /// Load runs.
    pub rows: Vec<Row>,
    /// Workload descriptions (name, description), in run order.
    pub workloads: Vec<(String, String)>,
}

/// Run ids for seeds: every load run and probe gets its own, so no two requests share text.
struct Runs(u64);

impl Runs {
    fn next(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// Runs the benchmark.
pub fn run(options: &Options) -> Result<Report> {
    let began = Instant::now();
    let mut report = Report {
        command: options.command.clone(),
        duration_s: options.duration.as_secs_f64(),
        warmup_s: options.warmup.as_secs_f64(),
        rounds: options.rounds.max(1),
        machine: machine()?,
        ..Report::default()
    };
    eprintln!("loading the Qwen3 tokenizer natively to size the prompts");
    let tokenizer = load_tokenizer(&tokenizer_dir("qwen3"))?;
    let all = workload::all(&tokenizer)?;
    let workloads: Vec<&Workload> = if options.workloads.is_empty() {
        all.iter().collect()
    } else {
        let mut picked = Vec::new();
        for name in &options.workloads {
            let Some(w) = all.iter().find(|w| w.name == name) else {
                let names: Vec<&str> = all.iter().map(|w| w.name).collect();
                bail!("unknown workload `{name}`; known: {}", names.join(", "));
            };
            picked.push(w);
        }
        picked
    };
    report.workloads = workloads.iter().map(|w| (w.name.to_owned(), w.description.to_owned())).collect();
    let mut runs = Runs(0);

    if let Some(module) = &options.baseline_module {
        let bytes = std::fs::metadata(module).with_context(|| format!("stat {}", module.display()))?.len();
        report.machine.baseline_module = Some((module.display().to_string(), bytes));
    }
    // Before the upstream starts: it inherits this process's CPUs.
    let target_cpu = if options.pin { Some(pin_self(&mut report.machine)?) } else { None };
    let upstream_ports: Vec<u16> = (0..UPSTREAMS).map(|_| free_port()).collect();
    let upstream_admin = free_port();
    let upstream = RunningEnvoy::start(
        "upstream",
        &upstream_yaml(upstream_admin, &upstream_ports),
        upstream_admin,
        upstream_ports[0],
        options.upstream_concurrency,
        None,
    )?;

    if options.startup_runs > 0 {
        startup(options, &upstream_ports, target_cpu, &all, &mut runs, &mut report)?;
    }
    if options.native_iterations > 0 {
        native(options, &upstream_ports, &tokenizer, &workloads, &mut runs, &mut report)?;
        if let Some(module) = &options.v8_stages {
            // An extra: without node the rest still runs.
            match v8_stages(module, options.native_iterations, &workloads) {
                Ok(run) => report.v8 = Some(run),
                Err(err) => eprintln!("V8 stages skipped: {err:#}"),
            }
        }
    }

    // Each Envoy under load: its target, whether it runs the baseline module, and the process.
    let mut envoys = Vec::new();
    for &target in &options.targets {
        eprintln!("starting {}", target.name());
        envoys.push((target, false, RunningEnvoy::start_target(target, &upstream_ports, target_cpu, None)?));
        if let Some(module) = options.baseline_module.as_deref().filter(|_| target.has_module()) {
            eprintln!("starting {}{BASELINE}", target.name());
            let envoy = RunningEnvoy::start_target(target, &upstream_ports, target_cpu, Some(module))?;
            envoys.push((target, true, envoy));
        }
    }
    // Each (workload, concurrency) block runs its targets in interleaved rounds, each round in a
    // rotated order, so a change in the machine's load over time weighs on every target alike.
    let rounds = options.rounds.max(1);
    let round_duration = options.duration / rounds as u32;
    for workload in &workloads {
        for &connections in &options.connections {
            let mut tallies: Vec<Tally> = envoys.iter().map(|_| Tally::default()).collect();
            for round in 0..rounds {
                for k in 0..envoys.len() {
                    let i = (k + round) % envoys.len();
                    let (target, _, envoy) = &envoys[i];
                    let span = measure(
                        options,
                        workload,
                        connections,
                        *target,
                        envoy,
                        &upstream,
                        &mut runs,
                        round_duration,
                    )?;
                    tallies[i].add(span);
                }
            }
            for ((target, baseline, _), tally) in envoys.iter().zip(tallies) {
                let mut row = tally.row(workload, connections, *target, rounds);
                if *baseline {
                    row.target.push_str(BASELINE);
                }
                eprintln!(
                    "{:<16} c={connections} {:<24} p50 {:>8.0} µs  p99 {:>8.0} µs  {:>7.0} req/s  decision {}  errors {}",
                    row.workload,
                    row.target,
                    row.p50_us,
                    row.p99_us,
                    row.rps,
                    row.decision_mean_us.map_or("-".to_owned(), |d| format!("{d:.0} µs")),
                    row.errors
                );
                report.rows.push(row);
            }
        }
    }
    report.machine.load_after = load_average();
    report.machine.elapsed_s = began.elapsed().as_secs_f64();
    Ok(report)
}

/// Pins this process (the load client's threads, and the upstream Envoy started after) to every
/// CPU but the last, which it returns for the Envoys under test.
fn pin_self(machine: &mut Machine) -> Result<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        bail!("--pin needs at least 2 CPUs, this process has {cpus}");
    }
    let last = cpus - 1;
    let (others, named) = if last == 1 {
        ("0".to_owned(), "CPU 0".to_owned())
    } else {
        (format!("0-{}", last - 1), format!("CPUs 0-{}", last - 1))
    };
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &others, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("run taskset (util-linux) to pin the client")?;
    if !status.success() {
        bail!("taskset could not pin this process to CPUs {others}: {status}");
    }
    machine.pinning = Some(format!("Envoy under test on CPU {last}, client and upstream Envoy on {named}"));
    Ok(last)
}

fn machine() -> Result<Machine> {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let envoy = kvmesh_tests::envoy_binary();
    let version = std::process::Command::new(&envoy).arg("--version").output().context("envoy --version")?;
    let envoy_version = String::from_utf8_lossy(&version.stdout)
        .split("version:")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned();
    let wasm = kvmesh_tests::filter_wasm();
    let module_bytes = std::fs::metadata(&wasm).with_context(|| format!("stat {}", wasm.display()))?.len();
    Ok(Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        envoy_version,
        module_bytes,
        load_before: load_average(),
        ..Machine::default()
    })
}

/// Fresh starts: plain Envoy, the module with an empty configuration, the module with Qwen3 (each
/// start also sends a small chat, then a long prompt never seen, then it again), and the native
/// module with Qwen3.
fn startup(
    options: &Options,
    upstream_ports: &[u16],
    target_cpu: Option<usize>,
    workloads: &[Workload],
    runs: &mut Runs,
    report: &mut Report,
) -> Result<()> {
    let configs = [
        ("plain (no Wasm)", Target::Plain),
        ("filter module, empty configuration", Target::FilterPassthrough),
        ("filter module + Qwen3 tokenizer, 4 workers", Target::Filter),
        ("native module + Qwen3 tokenizer, 4 workers", Target::NativeKvAware),
    ];
    let small = workloads.iter().find(|w| w.name == "small-chat").context("small-chat workload")?;
    for (label, target) in configs {
        let mut row = StartupRow { config: label.to_owned(), ..StartupRow::default() };
        for i in 0..options.startup_runs {
            eprintln!("start-up: {label}, run {}", i + 1);
            let envoy = RunningEnvoy::start_target(target, upstream_ports, target_cpu, None)?;
            row.ready_ms.push(envoy.ready_after.as_secs_f64() * 1_000.0);
            row.phases.push(envoy.startup_phases());
            if target == Target::NativeKvAware {
                // The native module loads its tokenizer with the configuration, before `ready`.
                row.vm_load_ms.push(envoy.filter_load_ms());
            } else if target.routes() {
                // The worker VM logs its load line just before the dispatch loop; give it a moment.
                std::thread::sleep(Duration::from_millis(200));
                row.vm_load_ms.push(envoy.filter_load_ms());
                let kind = ["prose", "code", "cjk"][i % 3];
                let long = workloads
                    .iter()
                    .find(|w| w.name == format!("{kind}-4k-new"))
                    .with_context(|| format!("{kind}-4k-new workload"))?;
                report.first_sight.push(first_sight(&envoy, kind, small, long, runs)?);
            }
        }
        report.startup.push(row);
    }
    Ok(())
}

/// Sends one request on `connection` and returns (decision µs, latency µs) from the filter's counters.
fn probe(envoy: &RunningEnvoy, connection: &mut Connection, request: &[u8]) -> Result<(f64, f64)> {
    let before = envoy.filter_counters()?;
    let t0 = Instant::now();
    let status = connection.exchange(request).with_context(|| format!("{}: probe request", envoy.name))?;
    let latency = t0.elapsed().as_secs_f64() * 1e6;
    if status != 200 {
        bail!("{}: probe answered {status}", envoy.name);
    }
    let after = envoy.filter_counters()?;
    let delta = |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    if delta("kvmesh_filter_decisions_routed_total") != 1 {
        bail!("{}: the probe was not routed by the filter", envoy.name);
    }
    Ok((delta("kvmesh_filter_decision_microseconds_total") as f64, latency))
}

fn first_sight(
    envoy: &RunningEnvoy,
    kind: &str,
    small: &Workload,
    long: &Workload,
    runs: &mut Runs,
) -> Result<FirstSight> {
    let mut connection = Connection::open(envoy.addr())?;
    let (first_small_us, _) = probe(envoy, &mut connection, &small.request(0))?;
    let request = long.request(seed(runs.next(), 0, 0)).into_owned();
    let (cold_us, cold_latency_us) = probe(envoy, &mut connection, &request)?;
    let mut repeats = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        repeats.push(probe(envoy, &mut connection, &request)?.0);
    }
    repeats.sort_by(f64::total_cmp);
    Ok(FirstSight {
        kind: kind.to_owned(),
        first_small_us,
        cold_us,
        cold_latency_us,
        repeat_us: repeats[repeats.len() / 2],
    })
}

/// The filter's pipeline natively on the same workloads, with and without the segment cache.
fn native(
    options: &Options,
    upstream_ports: &[u16],
    tokenizer: &Tokenizer,
    workloads: &[&Workload],
    runs: &mut Runs,
    report: &mut Report,
) -> Result<()> {
    eprintln!("native pipeline: loading the filter's router twice");
    let config = plugin_config(upstream_ports, None, None)?;
    let mut cached = NativePipeline::new(&config, SegmentCacheConfig::default(), tokenizer)?;
    let config = plugin_config(upstream_ports, Some(0), None)?;
    let mut uncached = NativePipeline::new(&config, SegmentCacheConfig::DISABLED, tokenizer)?;
    let warmup = (options.native_iterations / 10).max(5);
    for workload in workloads {
        let run = runs.next();
        let mut n = 0;
        let mut next = || {
            n += 1;
            seed(run, 0, n)
        };
        let with = cached.time(workload, warmup, options.native_iterations, &mut next)?;
        let without = uncached.time(workload, warmup, options.native_iterations, &mut next)?;
        eprintln!(
            "native {:<16} {:>5} tokens  route {:>7.1} µs, caches cold {:>7.1} µs (segment cache off {:>7.1} µs)",
            workload.name, with.stages.prompt_tokens, with.route_us, with.route_cold_us, without.route_us
        );
        report.native.push(NativeRow { workload: workload.name.to_owned(), cached: with, uncached: without });
    }
    Ok(())
}

/// The stages in node's V8 with Liftoff off (Envoy's V8 compiles with TurboFan only).
fn v8_stages(module: &Path, iterations: usize, workloads: &[&Workload]) -> Result<StagesRun> {
    eprintln!("V8 stages: node --no-liftoff {}", module.display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("v8/run-wasi.mjs");
    let output = Command::new("node")
        .args(["--no-liftoff", "--single-threaded-gc"])
        .arg(&script)
        .arg("--mount")
        .arg(format!("{}:/tokenizer", tokenizer_dir("qwen3").display()))
        .arg(module)
        .arg("/tokenizer")
        .arg(iterations.to_string())
        .args(workloads.iter().map(|w| w.name))
        .stderr(Stdio::inherit())
        .output()
        .context("run node (the V8 stages need node 20 or newer on PATH)")?;
    // node 20 has been seen to crash on exit after the module printed its result: the result counts.
    match serde_json::from_slice(&output.stdout) {
        Ok(run) => {
            if !output.status.success() {
                eprintln!("V8 stages: node exited with {} after printing its result", output.status);
            }
            Ok(run)
        }
        Err(_) if !output.status.success() => bail!("filter-stages in node failed ({})", output.status),
        Err(e) => Err(e).context("parse filter-stages output"),
    }
}

/// Counters, histogram and CPU times at the start of the measured span.
struct Snapshot {
    counters: HashMap<String, u64>,
    histogram: Histogram,
    envoy_cpu: Duration,
    upstream_cpu: Duration,
    client_cpu: Duration,
}

fn snapshot(envoy: &RunningEnvoy, upstream: &RunningEnvoy, routes: bool) -> Result<Snapshot> {
    Ok(Snapshot {
        counters: if routes { envoy.filter_counters()? } else { HashMap::new() },
        histogram: if routes { envoy.decision_histogram()? } else { Histogram::default() },
        envoy_cpu: envoy.cpu(),
        upstream_cpu: upstream.cpu(),
        client_cpu: process_cpu("/proc/self/stat").unwrap_or_default(),
    })
}

/// What one target recorded in one (workload, concurrency) block, summed over its rounds.
#[derive(Default)]
struct Tally {
    load: LoadResult,
    envoy_cpu: Duration,
    upstream_cpu: Duration,
    client_cpu: Duration,
    decisions: u64,
    decision_us: u64,
    histogram: Histogram,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.load.merge(other.load);
        self.envoy_cpu += other.envoy_cpu;
        self.upstream_cpu += other.upstream_cpu;
        self.client_cpu += other.client_cpu;
        self.decisions += other.decisions;
        self.decision_us += other.decision_us;
        self.histogram.merge(&other.histogram);
    }

    fn row(self, workload: &Workload, connections: usize, target: Target, rounds: usize) -> Row {
        let span = self.load.measured.as_secs_f64().max(f64::MIN_POSITIVE);
        let pct = |d: Duration| d.as_secs_f64() / span * 100.0;
        let load = &self.load;
        Row {
            workload: workload.name.to_owned(),
            target: target.name().to_owned(),
            connections,
            rounds,
            requests: load.requests(),
            rps: load.rps(),
            p50_us: load.percentile_us(50.0),
            p90_us: load.percentile_us(90.0),
            p99_us: load.percentile_us(99.0),
            mean_us: load.mean_us(),
            errors: load.errors,
            first_error: load.first_error.clone(),
            envoy_cpu: pct(self.envoy_cpu),
            upstream_cpu: pct(self.upstream_cpu),
            envoy_cpu_per_request_us: self.envoy_cpu.as_secs_f64() * 1e6 / load.requests().max(1) as f64,
            client_cpu: pct(self.client_cpu),
            decisions: self.decisions,
            decision_mean_us: (target.routes() && self.decisions > 0)
                .then(|| self.decision_us as f64 / self.decisions as f64),
            decision_p50_us: self.histogram.percentile(50.0),
            decision_p99_us: self.histogram.percentile(99.0),
            load_average: load_average(),
        }
    }
}

/// One recorded span of `duration` (after the warm-up) of `workload` on `envoy`.
#[allow(clippy::too_many_arguments)]
fn measure(
    options: &Options,
    workload: &Workload,
    connections: usize,
    target: Target,
    envoy: &RunningEnvoy,
    upstream: &RunningEnvoy,
    runs: &mut Runs,
    duration: Duration,
) -> Result<Tally> {
    let run = runs.next();
    let config = LoadConfig { addr: envoy.addr(), connections, warmup: options.warmup, duration };
    let routes = target.routes();
    let start = RefCell::new(None);
    let load = load::run(&config, &|conn, n| workload.request(seed(run, conn, n)), || {
        *start.borrow_mut() = Some(snapshot(envoy, upstream, routes));
    })
    .with_context(|| format!("{}: load on {}", workload.name, envoy.name))?;
    let before = start.into_inner().context("the measured span never started")??;
    let mut after = snapshot(envoy, upstream, routes)?;
    if routes {
        // The histogram is merged from the worker at each stats flush: wait for one.
        std::thread::sleep(STATS_FLUSH + Duration::from_millis(200));
        after.histogram = envoy.decision_histogram()?;
    }
    let delta = |name: &str| {
        after
            .counters
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.counters.get(name).copied().unwrap_or(0))
    };
    Ok(Tally {
        load,
        envoy_cpu: after.envoy_cpu.saturating_sub(before.envoy_cpu),
        upstream_cpu: after.upstream_cpu.saturating_sub(before.upstream_cpu),
        client_cpu: after.client_cpu.saturating_sub(before.client_cpu),
        decisions: delta("kvmesh_filter_decisions_routed_total"),
        decision_us: delta("kvmesh_filter_decision_microseconds_total"),
        histogram: after.histogram.since(&before.histogram),
    })
}
