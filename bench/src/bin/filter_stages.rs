//! `filter-stages`: the filter's per-request steps (parse, render, tokenize, hash) timed on the
//! benchmark's workloads, printed as one JSON document. Built for wasm32-wasip1 and run by
//! `bench/v8/run-wasi.mjs` in node's V8 with Liftoff off (Envoy's V8 compiles with TurboFan
//! only), it splits the filter's in-Envoy decision time by stage; natively it gives the same split
//! for native code.
//!
//! Usage: `filter-stages TOKENIZER_DIR ITERATIONS [WORKLOAD...]` (no workloads: all).

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kvmesh_bench::stages::{StageRow, Stages, StagesRun, load_tokenizer};
use kvmesh_bench::workload::{self, seed};
use kvmesh_core::tokenize::SegmentCacheConfig;

fn run(args: &[String]) -> Result<StagesRun> {
    let [dir, iterations, names @ ..] = args else {
        bail!("usage: filter-stages TOKENIZER_DIR ITERATIONS [WORKLOAD...]");
    };
    let iterations: usize = iterations.parse().context("ITERATIONS must be a number")?;
    let started = Instant::now();
    let tokenizer = load_tokenizer(Path::new(dir))?;
    let tokenizer_load_ms = started.elapsed().as_secs_f64() * 1_000.0;
    let workloads = workload::all(&tokenizer)?;
    let mut cached = Stages::new(&tokenizer, SegmentCacheConfig::default())?;
    let mut uncached = Stages::new(&tokenizer, SegmentCacheConfig::DISABLED)?;
    let warmup = (iterations / 10).max(5);
    let mut rows = Vec::new();
    for (run, workload) in workloads.iter().enumerate() {
        if !names.is_empty() && !names.iter().any(|n| n == workload.name) {
            continue;
        }
        let mut n = 0;
        let mut next = || {
            n += 1;
            seed(run as u64 + 1, 0, n)
        };
        let with = cached.time(workload, warmup, iterations, &mut next)?;
        let without = uncached.time(workload, warmup, iterations, &mut next)?;
        eprintln!(
            "filter-stages: {:<16} {:>8.1} µs ({:>8.1} µs without segment cache)",
            workload.name, with.total_us, without.total_us
        );
        rows.push(StageRow { workload: workload.name.to_owned(), cached: with, uncached: without });
    }
    Ok(StagesRun { tokenizer_load_ms, rows })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).and_then(|r| serde_json::to_string(&r).context("serialize")) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("filter-stages: {err:#}");
            ExitCode::FAILURE
        }
    }
}
