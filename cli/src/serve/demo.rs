//! `kvmesh demo --serve`: the demo's multi-turn chat workload sent through a live fleet (`kvmesh
//! serve` with simulated workers, Envoy and the filter), once per policy. The policy is switched
//! through the control plane's admin API (`PUT /v1/policy`, streamed to the filters) and the
//! workers' caches are emptied between runs (`POST /reset_prefix_cache`), so both policies meet
//! the same cold fleet. Hit rates come from the engines' own `usage.prompt_tokens_details.
//! cached_tokens`; time to first token is measured at the client, on the first streamed token.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use kvmesh_core::PolicyKind;
use serde::{Deserialize, Serialize};

use super::{Fleet, Progress, ServeArgs, http};
use crate::demo::{DemoArgs, Turn, policy_name, workload};

/// The model the simulated workers serve.
const MODEL: &str = "Qwen/Qwen3-8B";
/// Reply length in serve mode unless `--max-tokens` says otherwise.
const REPLY_TOKENS: u64 = 32;
/// How long one request through Envoy may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What one policy achieved.
#[derive(Serialize)]
struct PolicyRun {
    policy: String,
    requests: u64,
    failed: u64,
    requests_per_worker: Vec<u64>,
    prompt_tokens: u64,
    cached_tokens: u64,
    hit_rate: f64,
    ttft_mean_ms: f64,
    ttft_p50_ms: f64,
    ttft_p90_ms: f64,
    seconds: f64,
}

/// What one request saw.
struct Sample {
    ok: bool,
    prompt_tokens: u64,
    cached_tokens: u64,
    ttft: Duration,
}

/// Runs the demo against a fleet started here.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let serve = serve_args(args)?;
    let progress = if args.json { Progress::quiet() } else { Progress::new(false) };
    let mut fleet = match super::start(&serve, &progress) {
        Ok(fleet) => fleet,
        Err(e) if e.is::<super::Interrupted>() => return Ok(ExitCode::from(130)),
        Err(e) => return Err(e),
    };
    let max_tokens = args.max_tokens.unwrap_or(REPLY_TOKENS);
    let turns = workload(args.seed, args.conversations, args.turns, MODEL, max_tokens);
    let bodies: Vec<String> = turns.iter().map(streaming_body).collect::<anyhow::Result<_>>()?;
    if !args.json {
        progress.note(&format!(
            "\nkvmesh demo --serve: {} conversations x {} turns = {} chat requests, {} in flight, through \
             Envoy at http://127.0.0.1:{}",
            args.conversations,
            args.turns,
            turns.len(),
            args.concurrency,
            fleet.plan.ports.listen
        ));
    }
    let mut runs = Vec::new();
    for policy in [PolicyKind::KvAware, PolicyKind::RoundRobin] {
        if let Some(signal) = super::process::stop_requested() {
            progress.note(&format!("kvmesh demo: {signal}: stopping"));
            return Ok(ExitCode::from(130));
        }
        let run = prepare(&fleet, policy).and_then(|()| {
            if !args.json {
                progress.note(&format!("  running the workload with {} routing ...", policy.name()));
            }
            run_policy(&fleet, policy, &turns, &bodies, args.concurrency)
        });
        match run {
            Ok(run) => runs.push(run),
            Err(e) => {
                fleet.stop();
                eprintln!("kvmesh demo: logs kept in {}", fleet.plan.run_dir.display());
                return Err(e);
            }
        }
    }
    fleet.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else {
        print!("{}", report(&runs));
    }
    Ok(ExitCode::SUCCESS)
}

/// `kvmesh serve --backend sim` for the demo: free ports, the demo's fleet shape and cache size.
fn serve_args(args: &DemoArgs) -> anyhow::Result<ServeArgs> {
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let free = || -> anyhow::Result<u16> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
        Ok(listener.local_addr()?.port())
    };
    let (port, admin_port) = (free()?, free()?);
    let tokenizer = match &args.tokenizer_dir {
        Some(dir) => dir.clone(),
        None => crate::demo::default_tokenizer_dir()?,
    };
    let flags = [
        "serve".to_owned(),
        "--backend=sim".into(),
        format!("--model={MODEL}"),
        format!("--workers={}", args.workers),
        format!("--tokenizer-dir={}", tokenizer.display()),
        format!("--block-size={}", args.block_size),
        format!("--sim-kv-blocks={}", args.kv_blocks),
        format!("--port={port}"),
        format!("--admin-port={admin_port}"),
        format!("--filter={}", args.filter.name()),
    ];
    Ok(Wrapper::try_parse_from(flags)?.serve)
}

/// The workload's body as a streamed request that reports usage.
fn streaming_body(turn: &Turn) -> anyhow::Result<String> {
    let mut body: serde_json::Value = serde_json::from_str(&turn.body).context("a workload body")?;
    body["stream"] = true.into();
    body["stream_options"] = serde_json::json!({ "include_usage": true });
    Ok(body.to_string())
}

/// Sets `policy` through the control plane, empties every worker's cache, and waits until the
/// fleet index is empty and the filters had time to follow.
fn prepare(fleet: &Fleet, policy: PolicyKind) -> anyhow::Result<()> {
    let plan = &fleet.plan;
    let auth = format!("Bearer {}", plan.admin_token);
    let body = serde_json::json!({ "model": plan.model, "routing": { "policy": policy.name() } }).to_string();
    let headers = [("content-type", "application/json"), ("authorization", auth.as_str())];
    let resp = http::request(
        plan.ports.admin,
        "PUT",
        "/v1/policy",
        &headers,
        Some(body.as_bytes()),
        REQUEST_TIMEOUT,
        |_| {},
    )
    .context("PUT /v1/policy on the control plane")?;
    if resp.status != 200 {
        bail!("the control plane refused the policy change ({}): {}", resp.status, resp.text());
    }
    for worker in &plan.workers {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let resp = http::request(
                worker.port,
                "POST",
                "/reset_prefix_cache",
                &[],
                Some(b""),
                REQUEST_TIMEOUT,
                |_| {},
            )
            .with_context(|| format!("reset the cache of {}", worker.name))?;
            if resp.status == 200 {
                break;
            }
            // 400 while requests are still running there.
            if Instant::now() >= deadline {
                bail!("{} did not empty its cache: {} {}", worker.name, resp.status, resp.text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    #[derive(Deserialize)]
    struct IndexStats {
        blocks: u64,
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = http::get(plan.ports.admin, "/v1/index/stats", REQUEST_TIMEOUT)
            .ok()
            .and_then(|r| serde_json::from_slice::<IndexStats>(&r.body).ok());
        if stats.is_some_and(|s| s.blocks == 0) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("the fleet index did not empty after the caches were reset");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The state stream batches changes for 20 ms and each filter VM polls shared data every 20 ms.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// Sends the workload in waves of `concurrency` (turn-major, so each conversation's next turn comes
/// after its previous one finished) and collects what the engines and Envoy report.
fn run_policy(
    fleet: &Fleet,
    policy: PolicyKind,
    turns: &[Turn],
    bodies: &[String],
    concurrency: usize,
) -> anyhow::Result<PolicyRun> {
    let plan = &fleet.plan;
    let before = requests_per_port(plan.ports.envoy_admin)?;
    let start = Instant::now();
    let mut samples = Vec::with_capacity(turns.len());
    for wave in bodies.chunks(concurrency) {
        let results: Vec<Sample> = std::thread::scope(|scope| {
            let handles: Vec<_> =
                wave.iter().map(|body| scope.spawn(|| send(plan.ports.listen, body))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(Sample::failed())).collect()
        });
        samples.extend(results);
        if super::process::stop_requested().is_some() {
            bail!("stopped by a signal");
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let after = requests_per_port(plan.ports.envoy_admin)?;
    let requests_per_worker = plan
        .workers
        .iter()
        .map(|w| after.get(&w.port).copied().unwrap_or(0) - before.get(&w.port).copied().unwrap_or(0))
        .collect();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let prompt_tokens: u64 = ok.iter().map(|s| s.prompt_tokens).sum();
    let cached_tokens: u64 = ok.iter().map(|s| s.cached_tokens).sum();
    let mut ttfts: Vec<f64> = ok.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect();
    ttfts.sort_by(f64::total_cmp);
    let quantile =
        |q: f64| ttfts.get(((ttfts.len() as f64 * q) as usize).min(ttfts.len().saturating_sub(1))).copied();
    Ok(PolicyRun {
        policy: policy_name(policy),
        requests: ok.len() as u64,
        failed: (samples.len() - ok.len()) as u64,
        requests_per_worker,
        prompt_tokens,
        cached_tokens,
        hit_rate: if prompt_tokens == 0 { 0.0 } else { cached_tokens as f64 / prompt_tokens as f64 },
        ttft_mean_ms: if ttfts.is_empty() { 0.0 } else { ttfts.iter().sum::<f64>() / ttfts.len() as f64 },
        ttft_p50_ms: quantile(0.5).unwrap_or(0.0),
        ttft_p90_ms: quantile(0.9).unwrap_or(0.0),
        seconds,
    })
}

impl Sample {
    fn failed() -> Sample {
        Sample { ok: false, prompt_tokens: 0, cached_tokens: 0, ttft: Duration::ZERO }
    }
}

/// One streamed chunk, as far as the demo reads it.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Option<Delta>,
    text: Option<String>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Deserialize)]
struct PromptTokensDetails {
    cached_tokens: u64,
}

/// Sends one streamed request through Envoy; the first chunk carrying a token (or the end) marks
/// the time to first token (the leading role-only chunk does not count).
fn send(port: u16, body: &str) -> Sample {
    let start = Instant::now();
    let mut first_token: Option<Duration> = None;
    let mut buffer = Vec::new();
    let mut scanned = 0;
    let mut usage = None;
    let mut on_event = |data: &str, first_token: &mut Option<Duration>| {
        let Ok(chunk) = serde_json::from_str::<Chunk>(data) else { return };
        if first_token.is_none()
            && chunk.choices.iter().any(|c| {
                c.finish_reason.is_some()
                    || c.text.as_deref().is_some_and(|t| !t.is_empty())
                    || c.delta.as_ref().and_then(|d| d.content.as_deref()).is_some_and(|t| !t.is_empty())
            })
        {
            *first_token = Some(start.elapsed());
        }
        if let Some(u) = chunk.usage {
            usage = Some(u);
        }
    };
    let headers = [("content-type", "application/json")];
    let resp = http::request(
        port,
        "POST",
        "/v1/chat/completions",
        &headers,
        Some(body.as_bytes()),
        REQUEST_TIMEOUT,
        |piece| {
            buffer.extend_from_slice(piece);
            // Complete SSE events end with a blank line.
            while let Some(end) = find(&buffer[scanned..], b"\n\n") {
                let event = String::from_utf8_lossy(&buffer[scanned..scanned + end]).into_owned();
                scanned += end + 2;
                for line in event.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        on_event(data.trim(), &mut first_token);
                    }
                }
            }
        },
    );
    match (resp, usage) {
        (Ok(r), Some(u)) if r.status == 200 => Sample {
            ok: true,
            prompt_tokens: u.prompt_tokens,
            cached_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            ttft: first_token.unwrap_or_else(|| start.elapsed()),
        },
        _ => Sample::failed(),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Requests Envoy sent to each worker port so far (`/clusters`: `workers::IP:PORT::rq_total::N`).
fn requests_per_port(envoy_admin: u16) -> anyhow::Result<BTreeMap<u16, u64>> {
    let resp =
        http::get(envoy_admin, "/clusters", REQUEST_TIMEOUT).context("GET /clusters on Envoy's admin")?;
    let mut out = BTreeMap::new();
    for line in resp.text().lines() {
        let parts: Vec<&str> = line.split("::").collect();
        if let ["workers", addr, "rq_total", n] = parts.as_slice()
            && let (Some(port), Ok(n)) = (addr.rsplit(':').next().and_then(|p| p.parse().ok()), n.parse())
        {
            out.insert(port, n);
        }
    }
    Ok(out)
}

/// The table.
fn report(runs: &[PolicyRun]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<12} {:<24} {:>9} {:>10} {:>11} {:>10} {:>10} {:>7}",
        "policy",
        "requests per worker",
        "hit rate",
        "prefilled",
        "TTFT mean",
        "TTFT p50",
        "TTFT p90",
        "failed"
    );
    for r in runs {
        let per_worker = r.requests_per_worker.iter().map(u64::to_string).collect::<Vec<_>>().join(" / ");
        let _ = writeln!(
            out,
            "{:<12} {:<24} {:>8.1}% {:>10} {:>8.1} ms {:>7.1} ms {:>7.1} ms {:>7}",
            r.policy,
            per_worker,
            r.hit_rate * 100.0,
            r.prompt_tokens - r.cached_tokens,
            r.ttft_mean_ms,
            r.ttft_p50_ms,
            r.ttft_p90_ms,
            r.failed
        );
    }
    if let [kv, rr] = runs {
        if kv.hit_rate > rr.hit_rate {
            let change = |kv: f64, rr: f64| {
                let pct = (1.0 - kv / rr) * 100.0;
                if pct >= 0.0 { format!("{pct:.0}% lower") } else { format!("{:.0}% higher", -pct) }
            };
            let _ = writeln!(
                out,
                "\nkv-aware routing found {:.1}% of prompt tokens in cache against {:.1}% for round robin \
                 ({:.1}x fewer tokens prefilled); time to first token: mean {}, p90 {}.",
                kv.hit_rate * 100.0,
                rr.hit_rate * 100.0,
                (rr.prompt_tokens - rr.cached_tokens) as f64
                    / (kv.prompt_tokens - kv.cached_tokens).max(1) as f64,
                change(kv.ttft_mean_ms, rr.ttft_mean_ms),
                change(kv.ttft_p90_ms, rr.ttft_p90_ms),
            );
        } else {
            let _ = writeln!(
                out,
                "\nwarning: kv-aware routing found no more of the prompts in cache than round robin. Is the \
                 filter following the control plane? (`make wasm` builds it; Envoy's /stats should show \
                 kvmesh_filter_model_loads_total)"
            );
        }
    }
    out
}
