//! A local fleet as processes of the `kvmesh` binary: simulated workers, their agents and the control
//! plane, each on free 127.0.0.1 ports and stopped on drop; plus the request and stats helpers the
//! end-to-end tests share.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use crate::envoy::Envoy;
use crate::{Process, READY_TIMEOUT, free_port, http, http_ok, tokenizer_dir, wait_until};

/// The model the sims serve (their default `--model`).
pub const MODEL: &str = "Qwen/Qwen3-8B";
/// Tokens per KV block on every sim (vLLM's GPU default).
pub const BLOCK_SIZE: u32 = 16;

/// The `kvmesh` binary (`$KVMESH_BIN`, else the debug build in the target dir).
pub fn kvmesh_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("KVMESH_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cache_dir().join("target"));
    let bin = target.join("debug/kvmesh");
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build -p kvmesh-cli` (or set KVMESH_BIN)",
        bin.display()
    );
    bin
}

/// A `kvmesh sim` worker (vLLM mode) on free ports, publishing KV events on ZMQ.
pub struct Sim {
    /// The process.
    pub process: Process,
    /// Its OpenAI port.
    pub port: u16,
    /// Its ZMQ PUB port (KV events).
    pub events_port: u16,
    /// Its ZMQ ROUTER port (replay).
    pub replay_port: u16,
}

impl Sim {
    /// Starts a sim with `kv_blocks` of cache; `seed` varies its timing noise.
    pub fn start(seed: u64, kv_blocks: u32) -> Sim {
        let (port, events_port, replay_port) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(kvmesh_binary());
        cmd.args(["sim", "--engine", "vllm", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .arg("--tokenizer-dir")
            .arg(tokenizer_dir("qwen3"))
            .args(["--block-size", &BLOCK_SIZE.to_string(), "--kv-blocks", &kv_blocks.to_string()])
            .args(["--kv-events-endpoint", &format!("tcp://*:{events_port}")])
            .args(["--kv-replay-endpoint", &format!("tcp://*:{replay_port}")])
            .args(["--speedup", "20", "--seed", &seed.to_string()]);
        let process = Process::spawn(&format!("sim-{port}"), cmd);
        Sim { process, port, events_port, replay_port }
    }

    /// Waits until `GET /health` answers 200.
    pub fn wait_ready(&mut self) {
        let port = self.port;
        self.process.wait_ready("GET /health answers 200", READY_TIMEOUT, || http_ok(port, "/health"));
    }

    /// `ip:port` clients reach it at.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A `kvmesh agent` beside one sim.
pub struct Agent {
    /// The process.
    pub process: Process,
}

impl Agent {
    /// Starts the agent of `sim` as worker `id`, publishing to `nats` under `namespace`.
    pub fn start(id: &str, sim: &Sim, nats_url: &str, namespace: &str) -> Agent {
        let mut cmd = Command::new(kvmesh_binary());
        cmd.args(["agent", "--worker-id", id, "--engine", "vllm", "--model", MODEL])
            .args(["--address", &sim.address()])
            .args(["--kv-events", &format!("tcp://127.0.0.1:{}", sim.events_port)])
            .args(["--kv-replay", &format!("tcp://127.0.0.1:{}", sim.replay_port)])
            .args(["--metrics-url", &format!("http://127.0.0.1:{}/metrics", sim.port)])
            .args(["--block-size", &BLOCK_SIZE.to_string(), "--nats", nats_url, "--namespace", namespace])
            .args(["--ttl", "1500ms", "--load-interval", "200ms", "--gpus", "none"]);
        Agent { process: Process::spawn(&format!("agent-{id}"), cmd) }
    }
}

/// A `kvmesh control-plane` process serving the Qwen3 model's files.
pub struct ControlPlane {
    /// The process.
    pub process: Process,
    /// REST admin port.
    pub admin_port: u16,
    /// gRPC state-stream port.
    pub grpc_port: u16,
}

impl ControlPlane {
    /// Starts it against `nats_url` and waits until `/readyz` answers 200.
    pub fn start(nats_url: &str, namespace: &str) -> ControlPlane {
        let (admin_port, grpc_port) = (free_port(), free_port());
        let mut cmd = Command::new(kvmesh_binary());
        cmd.args(["control-plane", "--nats", nats_url, "--namespace", namespace])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--model", MODEL])
            .arg("--tokenizer-dir")
            .arg(tokenizer_dir("qwen3"));
        let mut process = Process::spawn("control-plane", cmd);
        process.wait_ready("GET /readyz answers 200", READY_TIMEOUT, || http_ok(admin_port, "/readyz"));
        ControlPlane { process, admin_port, grpc_port }
    }

    /// Ids of the registered workers (`GET /v1/workers`).
    pub fn worker_ids(&self) -> Vec<String> {
        let Ok(resp) = http::get(self.admin_port, "/v1/workers") else { return Vec::new() };
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(resp.body()) else { return Vec::new() };
        let list = json.get("workers").unwrap_or(&json);
        list.as_array()
            .map(|a| {
                a.iter().filter_map(|w| w.get("id").and_then(|v| v.as_str()).map(str::to_owned)).collect()
            })
            .unwrap_or_default()
    }

    /// Waits until exactly `ids` are registered.
    pub fn wait_for_workers(&self, ids: &[&str]) {
        let mut want: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        wait_until(&format!("workers {want:?} registered"), READY_TIMEOUT, || {
            let mut have = self.worker_ids();
            have.sort();
            have == want
        });
    }
}

/// A chat body: a system prompt (the shared prefix) and a user message.
pub fn chat(system: &str, user: &str, max_tokens: u32) -> String {
    format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{user}"}}],"max_tokens":{max_tokens}}}"#
    )
}

/// A system prompt of about 600 tokens whose first words are unique to `topic`.
pub fn system_prompt(topic: &str) -> String {
    let mut s = format!("{topic}: you are a careful assistant for {topic}.");
    for i in 0..120 {
        s.push_str(&format!(" Rule {i} about {topic} says to answer briefly."));
    }
    s
}

/// `usage.prompt_tokens_details.cached_tokens` of a response body.
pub fn cached_tokens(body: &str) -> u64 {
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("response is not JSON ({e}): {body}"));
    json.pointer("/usage/prompt_tokens_details/cached_tokens")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no cached_tokens in {body}"))
}

/// POSTs a chat body through Envoy.
pub fn post_chat(port: u16, body: &str) -> http::Response {
    http::post(port, "/v1/chat/completions", &[("content-type", "application/json")], body.as_bytes())
        .expect("POST /v1/chat/completions")
}

/// Requests Envoy sent to each worker port, from the admin `/clusters` stats.
pub fn requests_per_worker(envoy: &Envoy) -> HashMap<u16, u64> {
    requests_per_worker_at(envoy.admin_port())
}

/// [`requests_per_worker`] of the Envoy whose admin listens on `admin_port`.
pub fn requests_per_worker_at(admin_port: u16) -> HashMap<u16, u64> {
    let resp = http::get(admin_port, "/clusters").expect("GET /clusters");
    let text = resp.message.body_text();
    let mut out = HashMap::new();
    for line in text.lines() {
        // workers::127.0.0.1:PORT::rq_total::N
        let parts: Vec<&str> = line.split("::").collect();
        if let ["workers", addr, "rq_total", n] = parts.as_slice()
            && let (Some(port), Ok(n)) = (addr.rsplit(':').next().and_then(|p| p.parse().ok()), n.parse())
        {
            out.insert(port, n);
        }
    }
    out
}

/// A filter plugin configuration with `sims` as static workers and the model's Qwen3 tokenizer
/// files embedded as JSON, bodies limited to `max_body_bytes`.
pub fn static_plugin_config(sims: &[Sim], max_body_bytes: usize) -> String {
    let dir = tokenizer_dir("qwen3");
    let read =
        |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
    let workers: Vec<String> = sims
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                r#"{{"id":"sim-{i}","address":"127.0.0.1:{}","model":"{MODEL}","block_size":{BLOCK_SIZE}}}"#,
                s.port
            )
        })
        .collect();
    format!(
        r#"{{"max_body_bytes":{max_body_bytes},"models":[{{"name":"{MODEL}","tokenizer":{},"tokenizer_config":{}}}],"workers":[{}]}}"#,
        read("tokenizer.json"),
        read("tokenizer_config.json"),
        workers.join(",")
    )
}

/// Envoy's Prometheus stats text.
pub fn prometheus(envoy: &Envoy) -> String {
    http::get(envoy.admin_port(), "/stats/prometheus").expect("GET /stats/prometheus").message.body_text()
}

/// The filter's counters and gauges from Envoy's admin `/stats`, whichever build runs: the Wasm
/// filter's are `wasmcustom.<name>`, the native module's `dynamicmodulescustom.<name>`.
pub fn filter_stats(admin_port: u16) -> String {
    http::get(admin_port, "/stats?filter=kvmesh_filter").expect("GET /stats").message.body_text()
}

/// A counter or gauge in [`filter_stats`] by its name (`None` when absent).
pub fn filter_metric(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .filter_map(|l| l.split_once(": "))
        .find(|(n, _)| n.rsplit_once('.').map_or(*n, |(_, n)| n) == name)
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// A counter or gauge's value in Prometheus text (`None` when absent).
pub fn metric(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find(|l| !l.starts_with('#') && l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}
