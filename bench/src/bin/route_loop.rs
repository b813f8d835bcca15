//! `route-loop`: the filter's whole decision (`Router::route` of `kvmesh-filter`) run in a loop on
//! one workload, for profilers, natively or in node's V8 (built for wasm32-wasip1, run by
//! `bench/v8/run-wasi.mjs`). Timings on a shared machine move by tens of percent from run to run;
//! an instruction count does not, so compare two builds with callgrind, counting only inside the
//! router (bench/README.md, "Comparing two builds"):
//!
//! `valgrind --tool=callgrind --toggle-collect='kvmesh_filter::router::Router::route*' \
//!   route-loop --workload chat-4k-warm --policy kv-aware --iterations 1500`

use std::hint::black_box;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use kvmesh_bench::{plugin, stages, workload};
use kvmesh_core::PolicyKind;
use kvmesh_filter::FilterConfig;
use kvmesh_filter::router::Router;

const USAGE: &str = "\
usage: route-loop [--workload NAME] [--policy NAME] [--iterations N] [--cold | --sweep KIB]
                  [--idle-us N] [--tokenizer DIR]

Runs the filter's decision in a loop and prints its median time.

  --workload NAME   workload, as in `envoy-overhead --workload` (default: chat-4k-warm)
  --policy NAME     routing policy (default: the `filter` target's, approx-prefix)
  --iterations N    requests to route (default: 1500). The first ones teach the router the shared
                    prefix, one block per request under kv-aware: use well over the prompt's block
                    count (4k tokens: 256 blocks)
  --cold            write 48 MiB before every request, so it starts with every cache level cold
  --sweep KIB       write KIB KiB before every request instead (1024: about what Envoy's own work
                    between two requests evicts on a 2-core machine, the L2 but not the L3)
  --idle-us N       sleep N microseconds before every request, as a proxy's thread waits between
                    requests at low load
  --tokenizer DIR   Qwen3's tokenizer.json and tokenizer_config.json (default: where `make setup`
                    puts them; required in wasm)";

/// What to run.
struct Args {
    workload: String,
    policy: Option<PolicyKind>,
    iterations: usize,
    /// Bytes written before every request (0: none).
    sweep: usize,
    /// Sleep before every request, µs (0: none).
    idle_us: u64,
    tokenizer: Option<PathBuf>,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args> {
        let mut parsed = Args {
            workload: "chat-4k-warm".to_owned(),
            policy: None,
            iterations: 1500,
            sweep: 0,
            idle_us: 0,
            tokenizer: None,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--workload" => parsed.workload = value()?,
                "--policy" => {
                    let name = value()?;
                    parsed.policy = Some(
                        PolicyKind::from_name(&name).with_context(|| format!("unknown policy `{name}`"))?,
                    );
                }
                "--iterations" => {
                    parsed.iterations = value()?.parse().context("--iterations takes a number")?
                }
                "--cold" => parsed.sweep = 48 << 20,
                "--sweep" => parsed.sweep = value()?.parse::<usize>().context("--sweep takes KiB")? << 10,
                "--idle-us" => parsed.idle_us = value()?.parse().context("--idle-us takes a number")?,
                "--tokenizer" => parsed.tokenizer = Some(value()?.into()),
                other => bail!("unknown argument `{other}`\n\n{USAGE}"),
            }
        }
        Ok(parsed)
    }
}

#[cfg(not(target_os = "wasi"))]
fn default_tokenizer_dir() -> Result<PathBuf> {
    Ok(kvmesh_tests::tokenizer_dir("qwen3"))
}

#[cfg(target_os = "wasi")]
fn default_tokenizer_dir() -> Result<PathBuf> {
    bail!("--tokenizer DIR is required in wasm (a directory the runtime mounted)")
}

fn run(args: &Args) -> Result<f64> {
    let dir = match &args.tokenizer {
        Some(dir) => dir.clone(),
        None => default_tokenizer_dir()?,
    };
    let tokenizer = stages::load_tokenizer(&dir)?;
    let load = workload::all(&tokenizer)?
        .into_iter()
        .find(|w| w.name == args.workload)
        .with_context(|| format!("no workload `{}`", args.workload))?;
    let plugin = plugin::plugin_config(&dir, &[1, 2, 3, 4], None, args.policy)?;
    let config = FilterConfig::from_bytes(Some(plugin.as_bytes())).map_err(|e| anyhow!("{e}"))?;
    let mut router = Router::new(&config).map_err(|e| anyhow!("{e}"))?;
    let mut sweep = vec![0u8; args.sweep];
    let started = Instant::now();
    let mut ns = Vec::with_capacity(args.iterations);
    for i in 0..args.iterations {
        let body = load.body(workload::seed(1, 0, i as u64));
        for (n, byte) in sweep.iter_mut().step_by(64).enumerate() {
            *byte = byte.wrapping_add(n as u8);
        }
        black_box(&sweep);
        if args.idle_us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(args.idle_us));
        }
        let now_ms = started.elapsed().as_millis() as u64;
        let t0 = Instant::now();
        let routed = router
            .route(load.endpoint(), black_box(&body), now_ms, 1_767_225_600)
            .map_err(|r| anyhow!("the router rejected the body: {}", r.body))?;
        ns.push(t0.elapsed().as_nanos() as u64);
        router.finish(&routed);
    }
    ns.sort_unstable();
    Ok(ns.get(ns.len() / 2).copied().unwrap_or(0) as f64 / 1_000.0)
}

fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result = Args::parse(std::env::args().skip(1)).and_then(|args| Ok((run(&args)?, args)));
    match result {
        Ok((median, args)) => {
            println!("{} x{}: median {median:.1} us", args.workload, args.iterations);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("route-loop: {e:#}");
            ExitCode::FAILURE
        }
    }
}
