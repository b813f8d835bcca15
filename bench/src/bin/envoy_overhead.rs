//! `envoy-overhead`: what the kvmesh filter adds to a request in real Envoy (see bench/README.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kvmesh_bench::envoys::Target;
use kvmesh_bench::overhead::{self, Options, Report};
use kvmesh_bench::report;

/// Envoy with and without the kvmesh filter under a closed-loop load: added latency (p50/p90/p99),
/// requests per second per worker thread, the filter's decision time, and start-up cost.
#[derive(Parser, Debug)]
#[command(name = "envoy-overhead")]
struct Args {
    /// Seconds recorded per workload, concurrency and Envoy [default: 12; 1 with --quick].
    #[arg(long)]
    duration: Option<f64>,
    /// Interleaved rounds the recorded seconds are split into: every Envoy of a workload and
    /// concurrency runs once per round, so a change in the machine's load weighs on all alike
    /// [default: 3; 1 with --quick].
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds of unrecorded warm-up before each recorded span [default: 1; 0.3 with --quick].
    #[arg(long)]
    warmup: Option<f64>,
    /// Closed-loop concurrencies, comma-separated [default: 1,8; 1 with --quick].
    #[arg(long, value_delimiter = ',')]
    connections: Vec<usize>,
    /// Workloads, comma-separated [default: all; small-chat,chat-4k-warm with --quick].
    #[arg(long, value_delimiter = ',')]
    workload: Vec<String>,
    /// Envoys under load, comma-separated: plain, filter, filter-no-segment-cache,
    /// filter-passthrough, filter-kv-aware, native-kv-aware (the dynamic module of
    /// `cargo build --release -p kvmesh-filter-native`, or KVMESH_FILTER_NATIVE) [default: all].
    #[arg(long, value_delimiter = ',')]
    target: Vec<String>,
    /// Fresh starts per configuration for start-up times and first-sight decision times; 0 skips
    /// them [default: 3; 1 with --quick].
    #[arg(long)]
    startup_runs: Option<usize>,
    /// Timed requests per workload in the native pipeline; 0 skips it [default: 200; 20 with --quick].
    #[arg(long)]
    native_iterations: Option<usize>,
    /// Worker threads of the upstream Envoy.
    #[arg(long, default_value_t = 1)]
    upstream_concurrency: usize,
    /// Pin each Envoy under test to the last CPU, and this client and the upstream Envoy to the
    /// others (`taskset`), so that on a small machine they never take turns on one core.
    #[arg(long)]
    pin: bool,
    /// Another build of the filter module (a `.wasm` file): every target with the module also runs
    /// with this one, interleaved in the same rounds, reported as `<target>@baseline`. Timings
    /// drift between runs on a shared machine; within a run they can be compared.
    #[arg(long, value_name = "WASM")]
    baseline_module: Option<PathBuf>,
    /// The `filter-stages` binary built for wasm32-wasip1: also time the filter's stages in node's
    /// V8 (what `make bench-envoy` passes).
    #[arg(long, value_name = "WASM")]
    v8_stages: Option<PathBuf>,
    /// A short smoke run: see each option's quick default.
    #[arg(long)]
    quick: bool,
    /// Also write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Run nothing: print the markdown report of a JSON file written by --json.
    #[arg(long, value_name = "FILE")]
    render: Option<PathBuf>,
}

fn options(args: &Args) -> Result<Options, String> {
    let quick = args.quick;
    let secs = |v: Option<f64>, full: f64, fast: f64| {
        let s = v.unwrap_or(if quick { fast } else { full });
        if s.is_finite() && s >= 0.0 {
            Ok(Duration::from_secs_f64(s))
        } else {
            Err(format!("bad seconds: {s}"))
        }
    };
    let targets = if args.target.is_empty() {
        Target::ALL.to_vec()
    } else {
        args.target
            .iter()
            .map(|t| Target::from_name(t).ok_or_else(|| format!("unknown target `{t}`")))
            .collect::<Result<_, _>>()?
    };
    let workloads = match (&args.workload[..], quick) {
        ([], true) => vec!["small-chat".to_owned(), "chat-4k-warm".to_owned()],
        (w, _) => w.to_vec(),
    };
    let connections = match (&args.connections[..], quick) {
        ([], true) => vec![1],
        ([], false) => vec![1, 8],
        (c, _) => c.to_vec(),
    };
    let mut command = String::from("cargo run --release -p kvmesh-bench --bin envoy-overhead --");
    for arg in std::env::args().skip(1) {
        command.push(' ');
        command.push_str(&arg);
    }
    if command.ends_with("--") {
        command.truncate(command.len() - 3);
    }
    Ok(Options {
        duration: secs(args.duration, 12.0, 1.0)?,
        warmup: secs(args.warmup, 1.0, 0.3)?,
        rounds: args.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
        connections,
        workloads,
        targets,
        startup_runs: args.startup_runs.unwrap_or(if quick { 1 } else { 3 }),
        native_iterations: args.native_iterations.unwrap_or(if quick { 20 } else { 200 }),
        upstream_concurrency: args.upstream_concurrency.max(1),
        pin: args.pin,
        baseline_module: args.baseline_module.clone(),
        v8_stages: args.v8_stages.clone(),
        command,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.render {
        let saved = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<Report>(&text).map_err(|e| e.to_string()));
        return match saved {
            Ok(saved) => {
                print!("{}", report::markdown(&saved));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("envoy-overhead: {}: {e}", path.display());
                ExitCode::from(2)
            }
        };
    }
    let options = match options(&args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("envoy-overhead: {message}");
            return ExitCode::from(2);
        }
    };
    match overhead::run(&options) {
        Ok(result) => {
            print!("{}", report::markdown(&result));
            if let Some(path) = &args.json
                && let Err(e) = std::fs::write(path, report::json(&result))
            {
                eprintln!("envoy-overhead: write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("envoy-overhead: {err:#}");
            ExitCode::FAILURE
        }
    }
}
