//! `kvmesh demo`: a multi-turn chat workload routed over an in-process fleet of simulated workers,
//! once per policy, showing where requests went and how much prefill work the KV cache saved.
//!
//! Everything on the routing side is the real thing: each request is an OpenAI chat body, parsed,
//! rendered with the model's chat template, tokenized with its tokenizer, hashed into blocks and
//! scored against the fleet index. Each worker is a simulated vLLM paged prefix cache whose KV
//! events (stored, removed) feed the index, as an engine's would through the agent.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use kvmesh_core::hash::{BlockSalt, hash_prompt};
use kvmesh_core::request::{Endpoint, InferenceRequest, RequestLimits, parse_request};
use kvmesh_core::template::RenderOptions;
use kvmesh_core::{
    BlockHash, Decision, Engine, Fleet, Outcome, Policy, PolicyKind, PrefixIndex, Role, RouteInput,
    RoutingConfig, Scorer, SplitMix64, TokenId, WorkerInfo, WorkerSlot, WorkerState,
};
use kvmesh_sim::{CacheEvent, PagedCache, SeqBlocks};
use serde::Serialize;

/// Options of `kvmesh demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Run the workload through a live fleet started with `kvmesh serve` (simulated workers behind
    /// Envoy and the filter, policies switched through the control plane) instead of in-process,
    /// and report time to first token too.
    #[arg(long)]
    pub(crate) serve: bool,
    /// With --serve: which build of the filter Envoy runs (`native`: the dynamic module `make
    /// native` builds).
    #[arg(long, value_enum, default_value = "wasm", requires = "serve")]
    pub(crate) filter: crate::serve::FilterBuild,
    /// Model tokenizer directory (tokenizer.json, tokenizer_config.json); defaults to the Qwen3 files
    /// that `make setup` fetches into $KVMESH_TOKENIZERS/qwen3.
    #[arg(long, value_name = "DIR")]
    pub(crate) tokenizer_dir: Option<PathBuf>,
    /// Simulated workers.
    #[arg(long, default_value_t = 4)]
    pub(crate) workers: u16,
    /// Chat conversations in the workload.
    #[arg(long, default_value_t = 32)]
    pub(crate) conversations: usize,
    /// User turns per conversation (each one a request carrying the whole history).
    #[arg(long, default_value_t = 6)]
    pub(crate) turns: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub(crate) concurrency: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub(crate) block_size: u32,
    /// KV-cache capacity of each worker, in blocks.
    #[arg(long, default_value_t = 1024)]
    pub(crate) kv_blocks: usize,
    /// Tokens each reply may have (default: 128 in-process, 32 with --serve, where the simulated
    /// engines really take the time to decode them).
    #[arg(long, value_name = "TOKENS")]
    pub(crate) max_tokens: Option<u64>,
    /// Seed of the workload text and of the routers' tie-breaking.
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    pub(crate) json: bool,
}

/// What one policy achieved on the workload.
#[derive(Serialize)]
struct PolicyResult {
    policy: PolicyKind,
    requests: u64,
    requests_per_worker: Vec<u64>,
    prompt_tokens: u64,
    cached_tokens: u64,
    prefill_tokens: u64,
    hit_rate: f64,
    evicted_blocks: u64,
    unrouted: u64,
    /// Routing of the first conversation, turn by turn.
    sample: Vec<SampleTurn>,
}

/// Where one turn of the sample conversation went and why.
#[derive(Serialize)]
struct SampleTurn {
    turn: usize,
    worker: String,
    prompt_tokens: usize,
    request_blocks: usize,
    predicted_overlap_blocks: u32,
    cached_tokens: usize,
}

/// One request of the workload: the conversation so far as an OpenAI chat body.
pub(crate) struct Turn {
    /// Which conversation (0-based).
    pub(crate) conversation: usize,
    /// Which of its user turns (0-based).
    pub(crate) turn: usize,
    /// The request body.
    pub(crate) body: String,
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.workers == 0 || args.conversations == 0 || args.turns == 0 || args.concurrency == 0 {
        bail!("--workers, --conversations, --turns and --concurrency must be at least 1");
    }
    if args.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    if args.serve {
        return crate::serve::demo::run(&args);
    }
    let dir = match &args.tokenizer_dir {
        Some(dir) => dir.clone(),
        None => default_tokenizer_dir()?,
    };
    let tokenizer = crate::tokenize::load(&dir)?;
    let template = tokenizer.chat_template(None, false).context("the model ships no chat template")?;

    // Tokenize the workload once: both policies see identical requests.
    let reply_tokens = args.max_tokens.unwrap_or(REPLY_TOKENS);
    let workload = workload(args.seed, args.conversations, args.turns, MODEL, reply_tokens);
    let mut requests = Vec::with_capacity(workload.len());
    for turn in &workload {
        let InferenceRequest::Chat(chat) =
            parse_request(Endpoint::ChatCompletions, turn.body.as_bytes(), &RequestLimits::default())?
        else {
            bail!("the workload builds chat requests only");
        };
        let options = RenderOptions { now_unix_seconds: Some(1_767_225_600), default_kwargs: None };
        let tokens = tokenizer.encode_chat(&template, &chat, &options)?;
        let mut hashes = Vec::new();
        hash_prompt(&tokens, args.block_size as usize, BlockSalt::NONE, &mut hashes);
        requests.push((turn, tokens, hashes));
    }

    let results: Vec<PolicyResult> = [PolicyKind::KvAware, PolicyKind::RoundRobin]
        .into_iter()
        .map(|policy| simulate(&args, policy, &requests))
        .collect::<anyhow::Result<_>>()?;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", report(&args, &dir, &results));
    }
    Ok(ExitCode::SUCCESS)
}

/// The Qwen3 tokenizer directory the set-up script fills.
pub(crate) fn default_tokenizer_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("KVMESH_TOKENIZERS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = std::env::var_os("KVMESH_CACHE").map(PathBuf::from).or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(|d| PathBuf::from(d).join("kvmesh"))
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kvmesh")))
            });
            cache
                .context("cannot find the tokenizer files: set --tokenizer-dir or KVMESH_TOKENIZERS")?
                .join("tokenizers")
        }
    };
    let dir = base.join("qwen3");
    if !dir.join("tokenizer.json").is_file() {
        bail!("no tokenizer at {}: run `make setup` or pass --tokenizer-dir", dir.display());
    }
    Ok(dir)
}

/// Routes every request with `policy` over a fresh fleet of simulated caches.
fn simulate(
    args: &DemoArgs,
    kind: PolicyKind,
    requests: &[(&Turn, Vec<TokenId>, Vec<BlockHash>)],
) -> anyhow::Result<PolicyResult> {
    let bs = args.block_size as usize;
    let mut fleet = Fleet::new();
    let mut caches = Vec::new();
    for w in 0..args.workers {
        fleet.upsert(WorkerInfo {
            id: format!("worker-{w}").as_str().into(),
            address: format!("10.0.0.{}:8000", w + 1),
            model: MODEL.into(),
            engine: Engine::Vllm,
            role: Role::Both,
            block_size: args.block_size,
            state: WorkerState::Ready,
        })?;
        caches.push(PagedCache::new(bs, args.kv_blocks, true));
    }
    let config = RoutingConfig { policy: kind, ..RoutingConfig::default() };
    let mut policy = Policy::new(config)?;
    let mut index = PrefixIndex::new(args.kv_blocks * usize::from(args.workers) * 2);
    let mut scorer = Scorer::new();
    let mut rng = SplitMix64::new(args.seed);

    let mut result = PolicyResult {
        policy: kind,
        requests: 0,
        requests_per_worker: vec![0; usize::from(args.workers)],
        prompt_tokens: 0,
        cached_tokens: 0,
        prefill_tokens: 0,
        hit_rate: 0.0,
        evicted_blocks: 0,
        unrouted: 0,
        sample: Vec::new(),
    };
    // Requests are issued in waves of `concurrency`, in workload order (turn-major), so a
    // conversation's next turn always comes after its previous one finished.
    for (wave_no, wave) in requests.chunks(args.concurrency).enumerate() {
        let mut running: Vec<(WorkerSlot, SeqBlocks, Decision)> = Vec::with_capacity(wave.len());
        for (turn, tokens, hashes) in wave {
            let input = RouteInput {
                model: MODEL,
                hashes,
                prompt_tokens: tokens.len() as u64,
                expected_output_tokens: Some(args.max_tokens.unwrap_or(REPLY_TOKENS)),
                block_size: args.block_size,
                now_ms: wave_no as u64 * 1_000,
            };
            let decision = scorer.route(&mut policy, &input, &fleet, &index, &mut rng);
            let Outcome::Routed(slot) = decision.outcome else {
                result.unrouted += 1;
                continue;
            };
            let cache = &mut caches[slot.index()];
            let hit = cache.prefix_hit(hashes, tokens.len());
            let mut seq = SeqBlocks::default();
            if cache.allocate(&mut seq, hit, hashes, tokens, tokens.len(), None).is_err() {
                result.unrouted += 1;
                continue;
            }
            for event in cache.take_events() {
                match event {
                    CacheEvent::Stored { blocks, .. } => index.store(slot, &blocks),
                    CacheEvent::Removed { block } => {
                        index.remove(slot, &[block]);
                        result.evicted_blocks += 1;
                    }
                    CacheEvent::Cleared => index.clear_worker(slot),
                }
            }
            if let Some(entry) = fleet.get_mut(slot) {
                entry.load.begin_request(decision.prefill_tokens, decision.request_blocks);
            }
            let cached = hit * bs;
            result.requests += 1;
            result.requests_per_worker[slot.index()] += 1;
            result.prompt_tokens += tokens.len() as u64;
            result.cached_tokens += cached as u64;
            result.prefill_tokens += (tokens.len() - cached) as u64;
            if turn.conversation == 0 {
                result.sample.push(SampleTurn {
                    turn: turn.turn + 1,
                    worker: fleet.get(slot).map_or_else(String::new, |e| e.info.id.to_string()),
                    prompt_tokens: tokens.len(),
                    request_blocks: hashes.len(),
                    predicted_overlap_blocks: decision.overlap_blocks,
                    cached_tokens: cached,
                });
            }
            running.push((slot, seq, decision));
        }
        // The wave finishes: blocks stay cached, load drains, engines report their usage.
        for (slot, seq, decision) in running {
            caches[slot.index()].free(seq);
            if let Some(entry) = fleet.get_mut(slot) {
                entry.load.end_request(decision.prefill_tokens, decision.request_blocks);
            }
        }
        for (w, cache) in caches.iter().enumerate() {
            if let Some(entry) = fleet.get_mut(WorkerSlot(w as u16)) {
                entry.load.kv_usage = cache.usage() as f32;
                entry.load.kv_capacity_blocks = cache.capacity() as u32;
            }
        }
    }
    result.hit_rate = if result.prompt_tokens == 0 {
        0.0
    } else {
        result.cached_tokens as f64 / result.prompt_tokens as f64
    };
    Ok(result)
}

const MODEL: &str = "demo-model";
/// Output tokens each request is expected to generate (what the scorer budgets for).
const REPLY_TOKENS: u64 = 128;

/// A vocabulary for readable filler text.
const WORDS: &[&str] = &[
    "the",
    "router",
    "sends",
    "each",
    "request",
    "to",
    "a",
    "worker",
    "that",
    "already",
    "holds",
    "its",
    "prefix",
    "cache",
    "blocks",
    "tokens",
    "model",
    "prompt",
    "system",
    "user",
    "answer",
    "question",
    "about",
    "latency",
    "throughput",
    "memory",
    "GPU",
    "queue",
    "load",
    "balance",
    "decode",
    "prefill",
    "batch",
    "engine",
    "fleet",
    "proxy",
    "Envoy",
    "filter",
    "index",
    "hash",
    "chain",
    "block",
    "size",
    "sixteen",
    "reuse",
    "evict",
    "least",
    "recently",
    "used",
    "policy",
    "cost",
    "weight",
    "overlap",
    "schedule",
    "stream",
    "response",
    "first",
    "byte",
    "time",
    "and",
    "of",
    "in",
    "for",
    "with",
    "on",
    "is",
    "are",
    "when",
    "how",
    "why",
    "which",
    "more",
    "less",
    "than",
    "every",
    "turn",
    "history",
    "conversation",
    "assistant",
    "context",
    "window",
    "long",
    "short",
    "fast",
    "slow",
    "busy",
    "idle",
    "warm",
    "cold",
    "hit",
    "miss",
    "rate",
    "percent",
    "measure",
    "report",
];

/// The workload: every conversation's turns, round by round (turn 1 of all in random order, then
/// turn 2 of all, ...), as chat bodies for `model` with `max_tokens` each.
pub(crate) fn workload(
    seed: u64,
    conversations: usize,
    turns: usize,
    model: &str,
    max_tokens: u64,
) -> Vec<Turn> {
    let mut rng = SplitMix64::new(seed ^ 0x5eed);
    let text = |rng: &mut SplitMix64, words: u64| -> String {
        let mut s = String::new();
        for i in 0..words {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        }
        s.push('.');
        s
    };
    // A few long system prompts shared across conversations, as agents and products have.
    let systems: Vec<String> = (0..4).map(|_| text(&mut rng, 320)).collect();
    let mut histories: Vec<Vec<(String, String)>> =
        (0..conversations).map(|c| vec![("system".to_owned(), systems[c % systems.len()].clone())]).collect();
    let mut out = Vec::with_capacity(conversations * turns);
    let mut order: Vec<usize> = (0..conversations).collect();
    for turn in 0..turns {
        // Users do not take turns in a fixed order: shuffle arrivals within each round of turns.
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for &conversation in &order {
            let history = &mut histories[conversation];
            let words = 40 + rng.below(80);
            history.push(("user".to_owned(), text(&mut rng, words)));
            out.push(Turn { conversation, turn, body: chat_body(history, model, max_tokens) });
            let words = 60 + rng.below(90);
            history.push(("assistant".to_owned(), text(&mut rng, words)));
        }
    }
    out
}

/// An OpenAI chat request body for a conversation so far.
fn chat_body(history: &[(String, String)], model: &str, max_tokens: u64) -> String {
    let messages: Vec<serde_json::Value> = history
        .iter()
        .map(|(role, content)| serde_json::json!({ "role": role, "content": content }))
        .collect();
    serde_json::json!({ "model": model, "messages": messages, "max_tokens": max_tokens }).to_string()
}

/// The human-readable report.
fn report(args: &DemoArgs, dir: &std::path::Path, results: &[PolicyResult]) -> String {
    let mut out = String::new();
    let requests = results.first().map_or(0, |r| r.requests + r.unrouted);
    let _ = writeln!(
        out,
        "kvmesh demo: {} conversations x {} turns = {requests} chat requests over {} simulated workers",
        args.conversations, args.turns, args.workers
    );
    let _ = writeln!(
        out,
        "  tokenizer {} | block size {} | {} KV blocks per worker | {} in flight\n",
        dir.display(),
        args.block_size,
        args.kv_blocks,
        args.concurrency
    );
    let _ = writeln!(
        out,
        "{:<12} {:<24} {:>9} {:>15} {:>15} {:>9}",
        "policy", "requests per worker", "hit rate", "prompt tokens", "prefilled", "evicted"
    );
    for r in results {
        let per_worker = r.requests_per_worker.iter().map(u64::to_string).collect::<Vec<_>>().join(" / ");
        let _ = writeln!(
            out,
            "{:<12} {:<24} {:>8.1}% {:>15} {:>15} {:>9}",
            policy_name(r.policy),
            per_worker,
            r.hit_rate * 100.0,
            r.prompt_tokens,
            r.prefill_tokens,
            r.evicted_blocks
        );
    }
    if let [kv, rr] = results {
        if kv.prefill_tokens > 0 {
            let _ = writeln!(
                out,
                "\nkv-aware routing prefilled {:.1}x fewer tokens than round robin ({:.1}% vs {:.1}% of prompt tokens found in cache).",
                rr.prefill_tokens as f64 / kv.prefill_tokens as f64,
                kv.hit_rate * 100.0,
                rr.hit_rate * 100.0
            );
        }
        let _ = writeln!(out, "\nConversation 1 under kv-aware routing:");
        for t in &kv.sample {
            let _ = writeln!(
                out,
                "  turn {}: {:>5} prompt tokens ({:>3} blocks) -> {}, predicted overlap {:>3} blocks, engine found {:>5} tokens cached",
                t.turn,
                t.prompt_tokens,
                t.request_blocks,
                t.worker,
                t.predicted_overlap_blocks,
                t.cached_tokens
            );
        }
    }
    out
}

pub(crate) fn policy_name(kind: PolicyKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{kind:?}"))
}
