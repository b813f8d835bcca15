//! `route-loop`: the filter's whole decision (`Router::route` of `kvmesh-filter`, natively) run in
//! a loop on one workload, for profilers. Timings on a shared machine move by tens of percent from
//! run to run; an instruction count does not, so compare two builds with callgrind, counting only
//! inside the router (bench/README.md, "Comparing two builds"):
//!
//! `valgrind --tool=callgrind --toggle-collect='kvmesh_filter::router::Router::route*' \
//!   route-loop --workload chat-4k-warm --policy kv-aware --iterations 1500`

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use clap::Parser;
use kvmesh_bench::{envoys, stages, workload};
use kvmesh_core::PolicyKind;
use kvmesh_filter::FilterConfig;
use kvmesh_filter::router::Router;

/// Runs the filter's decision in a loop and prints its median time.
#[derive(Parser, Debug)]
#[command(name = "route-loop")]
struct Args {
    /// Workload name (as in `envoy-overhead --workload`).
    #[arg(long, default_value = "chat-4k-warm")]
    workload: String,
    /// Routing policy: the `filter` target's default (approx-prefix) unless named.
    #[arg(long, value_parser = parse_policy)]
    policy: Option<PolicyKind>,
    /// Requests to route. The first ones teach the router the shared prefix, one block per
    /// request under kv-aware: use well over the prompt's block count (4k tokens: 256 blocks).
    #[arg(long, default_value_t = 1500)]
    iterations: usize,
    /// Write 48 MiB before every request, so it starts with cold caches (as in Envoy).
    #[arg(long)]
    cold: bool,
}

fn parse_policy(name: &str) -> Result<PolicyKind, String> {
    PolicyKind::from_name(name).ok_or_else(|| format!("unknown policy `{name}`"))
}

fn run(args: &Args) -> Result<f64> {
    let tokenizer = stages::load_tokenizer(&kvmesh_tests::tokenizer_dir("qwen3"))?;
    let load = workload::all(&tokenizer)?
        .into_iter()
        .find(|w| w.name == args.workload)
        .with_context(|| format!("no workload `{}`", args.workload))?;
    let plugin = envoys::plugin_config(&[1, 2, 3, 4], None, args.policy)?;
    let config = FilterConfig::from_bytes(Some(plugin.as_bytes())).map_err(|e| anyhow!("{e}"))?;
    let mut router = Router::new(&config).map_err(|e| anyhow!("{e}"))?;
    let mut sweep = if args.cold { vec![0u8; 48 << 20] } else { Vec::new() };
    let started = Instant::now();
    let mut ns = Vec::with_capacity(args.iterations);
    for i in 0..args.iterations {
        let body = load.body(workload::seed(1, 0, i as u64));
        for (n, byte) in sweep.iter_mut().step_by(64).enumerate() {
            *byte = byte.wrapping_add(n as u8);
        }
        black_box(&sweep);
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
    let args = Args::parse();
    match run(&args) {
        Ok(median) => {
            println!("{} x{}: median {median:.1} us", args.workload, args.iterations);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("route-loop: {e:#}");
            ExitCode::FAILURE
        }
    }
}
