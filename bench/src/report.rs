//! The benchmark's report: markdown tables (what the READMEs show) or JSON (every figure).

use std::fmt::Write as _;

use crate::envoys::Target;
use crate::overhead::{Report, Row};

/// The report as JSON.
pub fn json(report: &Report) -> String {
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!(r#"{{"error":"{e}"}}"#))
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
}

fn row<'a>(report: &'a Report, workload: &str, connections: usize, target: Target) -> Option<&'a Row> {
    report
        .rows
        .iter()
        .find(|r| r.workload == workload && r.connections == connections && r.target == target.name())
}

fn tokens(report: &Report, workload: &str) -> String {
    report
        .native
        .iter()
        .find(|n| n.workload == workload)
        .map_or_else(|| "-".to_owned(), |n| n.cached.stages.prompt_tokens.to_string())
}

/// The report as markdown.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let _ = writeln!(out, "Command: `{}`\n", report.command);
    let _ = writeln!(
        out,
        "Machine: {} CPUs ({}), load average {:.1} at the start and {:.1} at the end; Envoy {}; filter module \
         {:.2} MB; each Envoy under test `--concurrency 1`; per workload, concurrency and Envoy {} s \
         recorded in {} interleaved rounds, each after {} s of warm-up; {:.0} s in all{}{}.\n",
        m.cpus,
        m.cpu_model,
        m.load_before,
        m.load_after,
        m.envoy_version,
        m.module_bytes as f64 / 1e6,
        report.duration_s,
        report.rounds,
        report.warmup_s,
        m.elapsed_s,
        m.pinning.as_deref().map(|p| format!("; pinned: {p}")).unwrap_or_default(),
        m.baseline_module
            .as_ref()
            .map(|(path, bytes)| format!(
                "; baseline module `{path}` ({:.2} MB) interleaved as the `@baseline` rows",
                *bytes as f64 / 1e6
            ))
            .unwrap_or_default()
    );
    summary(&mut out, report);
    long_prompts(&mut out, report);
    where_time_goes(&mut out, report);
    startup(&mut out, report);
    all_runs(&mut out, report);
    workloads(&mut out, report);
    out
}

/// Added latency and throughput per workload and concurrency.
fn summary(out: &mut String, report: &Report) {
    if report.rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "Latency in µs, p50 / p99, in brackets the difference to plain Envoy at p50 / p99. Decision: the \
         filter's own time per request (mean, from its counters). CPU per request: the Envoy under test's \
         CPU time divided by the requests it served, µs (a core's worth of requests per second is 10^6 / \
         this; it holds whatever share of this shared machine Envoy got). Req/s: what the closed loop got \
         through the one worker thread.\n"
    );
    let _ = writeln!(
        out,
        "| workload | tokens | C | plain | filter | no segment cache | module only | kv-aware | native kv-aware | \
         decision: filter / no segment cache / kv-aware / native kv-aware | \
         CPU per request: plain / filter / no segment cache / module only / kv-aware / native kv-aware | \
         req/s: plain / filter / no segment cache / module only / kv-aware / native kv-aware |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (workload, _) in &report.workloads {
        let mut concurrencies: Vec<usize> =
            report.rows.iter().filter(|r| &r.workload == workload).map(|r| r.connections).collect();
        concurrencies.dedup();
        for c in concurrencies {
            let plain = row(report, workload, c, Target::Plain);
            let latency = |target: Target| {
                row(report, workload, c, target).map_or_else(
                    || "-".to_owned(),
                    |r| match plain.filter(|_| target != Target::Plain) {
                        Some(p) => format!(
                            "{:.0} / {:.0} ({:+.0} / {:+.0})",
                            r.p50_us,
                            r.p99_us,
                            r.p50_us - p.p50_us,
                            r.p99_us - p.p99_us
                        ),
                        None => format!("{:.0} / {:.0}", r.p50_us, r.p99_us),
                    },
                )
            };
            let each = |f: &dyn Fn(&Row) -> String| {
                Target::ALL.map(|t| row(report, workload, c, t).map_or_else(|| "-".to_owned(), f)).join(" / ")
            };
            let decision =
                [Target::Filter, Target::FilterNoSegmentCache, Target::FilterKvAware, Target::NativeKvAware]
                    .map(|t| opt(row(report, workload, c, t).and_then(|r| r.decision_mean_us)))
                    .join(" / ");
            let _ = writeln!(
                out,
                "| {workload} | {} | {c} | {} | {} | {} | {} | {} | {} | {decision} | {} | {} |",
                tokens(report, workload),
                latency(Target::Plain),
                latency(Target::Filter),
                latency(Target::FilterNoSegmentCache),
                latency(Target::FilterPassthrough),
                latency(Target::FilterKvAware),
                latency(Target::NativeKvAware),
                each(&|r| format!("{:.0}", r.envoy_cpu_per_request_us)),
                each(&|r| format!("{:.0}", r.rps)),
            );
        }
    }
    out.push('\n');
}

/// Issue 12's in-V8 figures: long prompts never seen and repeated.
fn long_prompts(out: &mut String, report: &Report) {
    let decision = |workload: &str, target: Target| {
        report
            .rows
            .iter()
            .filter(|r| r.workload == workload && r.target == target.name())
            .min_by_key(|r| r.connections)
            .and_then(|r| r.decision_mean_us)
    };
    let kinds = ["prose", "code", "cjk"];
    if !kinds.iter().any(|k| {
        report.first_sight.iter().any(|f| f.kind == *k)
            || report.rows.iter().any(|r| r.workload.starts_with(&format!("{k}-4k")))
    }) {
        return;
    }
    let _ = writeln!(
        out,
        "Tokenizing ~4k-token completions prompts inside Envoy (V8), the filter's decision time in µs (parse, \
         tokenize, hash, score). Fresh VM: the first long prompt a newly started filter sees (after one small \
         chat), so its word cache is cold too, then the same text again (median of {}). Under load: means over \
         a load run at the lowest concurrency, new text every request (segments new, common words already in \
         the word cache) or the same text every request. Native: the filter's `Router` in this process on the \
         same bodies. V8 outside Envoy: parse + tokenize + hash in node's V8 (no scoring, no host calls).\n",
        crate::overhead::REPEATS
    );
    let _ = writeln!(
        out,
        "| text | tokens | fresh VM: first sight | fresh VM: repeated | load: new text | load: repeated | \
         load: repeated, no segment cache | native: new / repeated / repeated without segment cache | \
         V8 outside Envoy, stages: new / repeated / repeated without segment cache |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for kind in kinds {
        let fresh: Vec<_> = report.first_sight.iter().filter(|f| f.kind == kind).collect();
        let (new, repeat) = (format!("{kind}-4k-new"), format!("{kind}-4k-repeat"));
        let native = |w: &str| report.native.iter().find(|n| n.workload == w);
        let native_cell = match (native(&new), native(&repeat)) {
            (Some(n), Some(r)) => {
                format!("{:.0} / {:.1} / {:.0}", n.cached.route_us, r.cached.route_us, r.uncached.route_us)
            }
            _ => "-".to_owned(),
        };
        let v8 = |w: &str| report.v8.as_ref().and_then(|v| v.rows.iter().find(|r| r.workload == w));
        let v8_cell = match (v8(&new), v8(&repeat)) {
            (Some(n), Some(r)) => {
                format!("{:.0} / {:.1} / {:.0}", n.cached.total_us, r.cached.total_us, r.uncached.total_us)
            }
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {kind} | {} | {} | {} | {} | {} | {} | {native_cell} | {v8_cell} |",
            tokens(report, &new),
            opt(median(&fresh.iter().map(|f| f.cold_us).collect::<Vec<_>>())),
            opt(median(&fresh.iter().map(|f| f.repeat_us).collect::<Vec<_>>())),
            opt(decision(&new, Target::Filter)),
            opt(decision(&repeat, Target::Filter)),
            opt(decision(&repeat, Target::FilterNoSegmentCache)),
        );
    }
    if let Some(first) = median(&report.first_sight.iter().map(|f| f.first_small_us).collect::<Vec<_>>()) {
        let _ = writeln!(
            out,
            "\nThe very first request of a fresh filter VM (a small chat) took {first:.0} µs of decision time."
        );
    }
    out.push('\n');
}

/// The pipeline stage by stage, natively and in V8 outside Envoy, beside the in-Envoy decision
/// and the added latency.
fn where_time_goes(out: &mut String, report: &Report) {
    if report.native.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "Where the filter's time goes, µs (medians, default segment cache). Stages: parse / render / \
         tokenize / hash, timed one by one through kvmesh-core on the same bodies, natively and in V8 \
         outside Envoy (`filter-stages` in node with Liftoff off, as Envoy compiles){}. Native route: the \
         filter's whole `Router::route` natively (adds scoring), hot / with the caches swept (48 MiB written \
         between requests, as Envoy's own work between two requests leaves them). Envoy decision: the filter's own timer \
         in Envoy (mean at the lowest concurrency). Added p50: filter p50 minus plain p50; the rest of \
         it (added minus decision) is host cost: pausing, buffering the body and copying it into the VM, \
         header, metric and clock host calls, reading the response's `usage`.\n",
        report.v8.as_ref().map_or_else(String::new, |v| format!(
            "; the V8 run loaded the tokenizer in {:.0} ms",
            v.tokenizer_load_ms
        ))
    );
    let _ = writeln!(
        out,
        "| workload | tokens | native stages | native route: hot / cold caches | V8 stages | V8 stages sum | Envoy decision | added p50 | added − decision |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    let stages = |t: &crate::stages::StageTiming| {
        format!("{:.1} / {:.1} / {:.1} / {:.1}", t.parse_us, t.render_us, t.tokenize_us, t.hash_us)
    };
    for n in &report.native {
        let filter = report
            .rows
            .iter()
            .filter(|r| r.workload == n.workload && r.target == Target::Filter.name())
            .min_by_key(|r| r.connections);
        let plain = filter.and_then(|f| row(report, &n.workload, f.connections, Target::Plain));
        let decision = filter.and_then(|f| f.decision_mean_us);
        let added = filter.zip(plain).map(|(f, p)| f.p50_us - p.p50_us);
        let v8 = report.v8.as_ref().and_then(|v| v.rows.iter().find(|r| r.workload == n.workload));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} / {:.1} | {} | {} | {} | {} | {} |",
            n.workload,
            n.cached.stages.prompt_tokens,
            stages(&n.cached.stages),
            n.cached.route_us,
            n.cached.route_cold_us,
            v8.map_or_else(|| "-".to_owned(), |r| stages(&r.cached)),
            v8.map_or_else(|| "-".to_owned(), |r| format!("{:.1}", r.cached.total_us)),
            opt(decision),
            opt(added),
            opt(added.zip(decision).map(|(a, d)| a - d)),
        );
    }
    out.push('\n');
}

fn startup(out: &mut String, report: &Report) {
    if report.startup.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "Envoy start-up, ms (`--concurrency 1`: the filter runs 3 VMs, 2 on the main thread and 1 on the \
         worker; V8 compiles the module eagerly). Ready: spawn to the first 200 from `/ready`, median and \
         range of the starts. Phases from Envoy's log: bootstrap (reading the YAML, which holds the \
         tokenizer inline), listeners (module compiled, main-thread VMs configured), workers (the worker's \
         VM configured). VM loads: what the filter logs (`loaded in N ms`) per VM (the native module: once per \
         configuration, its worker threads sharing the load).\n"
    );
    let _ = writeln!(out, "| configuration | starts | ready | bootstrap | listeners | workers | VM loads |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for s in &report.startup {
        let (lo, hi) =
            s.ready_ms.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let phase = |f: fn(&crate::envoys::StartupPhases) -> Option<f64>| {
            opt(median(&s.phases.iter().filter_map(f).collect::<Vec<_>>()))
        };
        let loads: Vec<String> = s
            .vm_load_ms
            .iter()
            .map(|run| run.iter().map(u64::to_string).collect::<Vec<_>>().join(" / "))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} ({lo:.0}–{hi:.0}) | {} | {} | {} | {} |",
            s.config,
            s.ready_ms.len(),
            opt(median(&s.ready_ms)),
            phase(|p| p.bootstrap_ms),
            phase(|p| p.listeners_ms),
            phase(|p| p.workers_ms),
            if loads.is_empty() { "-".to_owned() } else { loads.join("; ") },
        );
    }
    out.push('\n');
}

fn all_runs(out: &mut String, report: &Report) {
    if report.rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "<details><summary>Every run</summary>\n\nLatency in µs; decision p50 / p99 from Envoy's histogram \
         (bucket middles); CPU in % of one core over the recorded span (Envoy under test / upstream Envoy / \
         this client); load: 1-minute load average after the run.\n"
    );
    let _ = writeln!(
        out,
        "| workload | C | target | requests | req/s | p50 | p90 | p99 | mean | decision mean | decision p50 / p99 | CPU | CPU per request | load | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &report.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} / {} | {:.0} / {:.0} / {:.0} | {:.0} | {:.1} | {}{} |",
            r.workload,
            r.connections,
            r.target,
            r.requests,
            r.rps,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.mean_us,
            opt(r.decision_mean_us),
            opt(r.decision_p50_us),
            opt(r.decision_p99_us),
            r.envoy_cpu,
            r.upstream_cpu,
            r.client_cpu,
            r.envoy_cpu_per_request_us,
            r.load_average,
            r.errors,
            r.first_error.as_deref().map_or_else(String::new, |e| format!(" ({e})")),
        );
    }
    out.push_str("\n</details>\n\n");
}

fn workloads(out: &mut String, report: &Report) {
    let _ = writeln!(out, "Workloads:\n");
    for (name, description) in &report.workloads {
        let _ = writeln!(out, "- `{name}`: {description}");
    }
    let _ = writeln!(
        out,
        "\nTargets: `plain` (no Wasm, round robin), `filter` (kvmesh, Qwen3 tokenizer inline, 4 static \
         workers of block size 16, default policy and segment cache), `filter-no-segment-cache` (`\"segment_cache\":{{\"max_bytes\":0}}`), \
         `filter-passthrough` (\"module only\": the module with an empty configuration, so it routes \
         nothing and every request passes after the header callback), `filter-kv-aware` (the `filter` \
         configuration with the kv-aware policy: no fleet index here, so it matches its own recent \
         decisions, and early exit stops exact tokenizing at the first block they do not hold), \
         `native-kv-aware` (the kv-aware filter's request path built natively as an Envoy dynamic \
         module, `filter-native`: the same router and configuration without the Wasm machinery)."
    );
}
