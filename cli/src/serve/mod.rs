//! `kvmesh serve`: a whole fleet on one machine. It starts, as its own children, nats-server, the
//! control plane, one worker per `--workers` (simulated, or a real vLLM, SGLang or TensorRT-LLM
//! server) with an agent beside each, and Envoy with the kvmesh filter on a generated bootstrap;
//! waits until every part is ready; prints the endpoint; and stops everything on Ctrl-C.
//!
//! - `plan`: what would run (command lines, generated files, ports), decided up front;
//! - `engines`: each backend's worker and agent command lines; `bootstrap`: the Envoy bootstrap;
//! - `fleet`: starting, readiness, watching and stopping; `process`: the children themselves;
//! - `dry_run`: the plan as a pasteable script; `demo`: `kvmesh demo --serve` on a live fleet.

mod bootstrap;
pub mod demo;
mod dry_run;
mod engines;
mod fleet;
mod http;
mod locate;
mod plan;
mod process;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, ValueEnum};
use kvmesh_core::PolicyKind;

pub use engines::{Backend, Device, SimEngine, TransferBackend};
pub use fleet::{Fleet, Interrupted, StartOptions};
pub use progress::Progress;

/// How the filter learns the fleet and the model's tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FilterMode {
    /// From the control plane's state stream (through a singleton state service in Envoy, or the
    /// native module's own connection); kv-aware routing.
    State,
    /// From its own configuration (workers and tokenizer inline; no control plane connection):
    /// approx-prefix routing, for filter builds without the state service.
    Static,
}

/// Which build of the kvmesh filter Envoy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FilterBuild {
    /// The proxy-wasm module (`make wasm`): loads in any Envoy with V8; one VM, and one tokenizer
    /// load, per Envoy worker thread.
    Wasm,
    /// The native Envoy dynamic module (`make native`): about half the Wasm filter's added latency
    /// and one tokenizer load per Envoy; built for this Envoy release.
    Native,
}

impl FilterBuild {
    /// The flag value that names it.
    pub fn name(self) -> &'static str {
        match self {
            FilterBuild::Wasm => "wasm",
            FilterBuild::Native => "native",
        }
    }
}

/// Flags of `kvmesh serve`.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Served model: the OpenAI `model` of requests, and what real engines load.
    #[arg(long, value_name = "NAME", default_value = "Qwen/Qwen3-8B")]
    pub model: String,
    /// The workers' engine: `sim` (simulated, no GPU), `vllm`, `sglang` or `trtllm`.
    #[arg(long, value_enum, default_value = "sim")]
    pub backend: Backend,
    /// Workers that both prefill and decode.
    #[arg(long, default_value_t = 2, conflicts_with_all = ["prefill", "decode"])]
    pub workers: usize,
    /// Prefill-only workers of a disaggregated fleet (with --decode).
    #[arg(long, value_name = "N", requires = "decode")]
    pub prefill: Option<usize>,
    /// Decode-only workers of a disaggregated fleet (with --prefill).
    #[arg(long, value_name = "N", requires = "prefill")]
    pub decode: Option<usize>,
    /// The model's tokenizer files (tokenizer.json, tokenizer_config.json). Default: the model
    /// itself when it is a local directory, its HuggingFace cache snapshot, or, for Qwen3 and
    /// Llama 3.1 models, the files `make setup` fetched into $KVMESH_TOKENIZERS.
    #[arg(long, value_name = "DIR")]
    pub tokenizer_dir: Option<PathBuf>,
    /// A control-plane YAML file (see control-plane/kvmesh.example.yaml) to start from: routing
    /// policy and weights of the model, index and stream settings. Serve sets the addresses, NATS
    /// and the served model on top.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Routing policy of the model: kv-aware, load-only, round-robin or approx-prefix.
    #[arg(long, value_name = "NAME", value_parser = parse_policy)]
    pub policy: Option<PolicyKind>,
    /// Envoy's listener port: where clients send OpenAI requests.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The control plane's REST admin port (workers, policy, explain, metrics).
    #[arg(long, default_value_t = 8081)]
    pub admin_port: u16,
    /// Envoy's listener address (0.0.0.0 serves other machines too).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub listen: String,
    /// Tokens per KV block (default: the engine's, 16; TensorRT-LLM's and vLLM's CPU build 32).
    #[arg(long, value_name = "TOKENS")]
    pub block_size: Option<u32>,
    /// Namespace of the NATS subjects.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Envoy worker threads (each runs its own filter VM).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub envoy_concurrency: u32,
    /// Which build of the filter Envoy runs: the proxy-wasm module, or the native dynamic module.
    #[arg(long, value_enum, default_value = "wasm")]
    pub filter: FilterBuild,
    /// The Wasm filter module (default: $KVMESH_FILTER_WASM, else where `make wasm` writes it).
    #[arg(long, value_name = "FILE")]
    pub filter_wasm: Option<PathBuf>,
    /// The native filter module, with `--filter native` (default: $KVMESH_FILTER_NATIVE, else
    /// where `make native` writes it).
    #[arg(long, value_name = "FILE")]
    pub filter_native: Option<PathBuf>,
    /// How the filter learns the fleet: from the control plane (`state`) or inline (`static`).
    #[arg(long, value_enum, default_value = "state")]
    pub filter_mode: FilterMode,
    /// Seconds to wait for the filter to load the model in every VM before going on with a warning.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub filter_load_timeout: u64,
    /// Seconds the whole fleet may take to become ready (default: 120, real engines 1800).
    #[arg(long, value_name = "SECS")]
    pub ready_timeout: Option<u64>,
    /// Sim: the engine whose wire formats the simulated workers speak.
    #[arg(long, value_enum, default_value = "vllm")]
    pub sim_engine: SimEngine,
    /// Sim: KV-cache capacity of each worker, in blocks (default: the sim's, ~400k tokens).
    #[arg(long, value_name = "BLOCKS")]
    pub sim_kv_blocks: Option<usize>,
    /// Sim: simulated time runs this many times faster than real time.
    #[arg(long, value_name = "FACTOR", default_value_t = 1.0)]
    pub sim_speedup: f64,
    /// vLLM: where the engines run. `cpu` runs vLLM's CPU build: float32, eager mode, block size
    /// 32, each engine's OpenMP threads bound to its own core, loopback-only, private temp and cache
    /// directories, no GPUs.
    #[arg(long, value_enum, default_value = "gpu")]
    pub device: Device,
    /// vLLM: run `PYTHON -m vllm.entrypoints.openai.api_server` instead of `vllm serve` (e.g. the
    /// virtualenv `make setup-vllm` builds, whose `vllm serve` fails).
    #[arg(long, value_name = "PYTHON")]
    pub vllm_python: Option<PathBuf>,
    /// vLLM: load the model from this local directory and serve it under --model (also where the
    /// tokenizer files are looked for first; no hub is contacted).
    #[arg(long, value_name = "DIR")]
    pub model_path: Option<PathBuf>,
    /// vLLM: KV-cache size of each engine in bytes (`--kv-cache-memory-bytes`).
    #[arg(long, value_name = "BYTES")]
    pub kv_cache_bytes: Option<u64>,
    /// Real engines: GPUs per worker (worker i gets the next N; more than one means tensor parallel).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub gpus_per_worker: u32,
    /// Real engines, disaggregated: the KV transfer library of SGLang (nixl, mooncake) and
    /// TensorRT-LLM (nixl, ucx, mooncake); vLLM's NixlConnector always uses NIXL.
    #[arg(long, value_name = "LIBRARY", value_enum, default_value = "nixl")]
    pub kv_transfer_backend: TransferBackend,
    /// An extra argument for every worker's command line (repeatable), e.g. --engine-arg=--max-model-len=8192.
    #[arg(long = "engine-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub engine_args: Vec<String>,
    /// Where logs and generated files go (default: a fresh temporary directory, removed after a clean stop).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Print every command line and generated file, and start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also print each child's pid and command line as it starts.
    #[arg(long, short)]
    pub verbose: bool,
}

fn parse_policy(name: &str) -> Result<PolicyKind, String> {
    PolicyKind::from_name(name)
        .ok_or_else(|| format!("`{name}` is not a policy (kv-aware, load-only, round-robin, approx-prefix)"))
}

impl ServeArgs {
    /// Checks what clap cannot; the error names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        match (self.prefill, self.decode) {
            (Some(0), _) | (_, Some(0)) => bail!("--prefill and --decode must be at least 1"),
            (None, None) if self.workers == 0 => bail!("--workers must be at least 1"),
            _ => {}
        }
        if self.block_size == Some(0) {
            bail!("--block-size must be at least 1");
        }
        if self.envoy_concurrency == 0 {
            bail!("--envoy-concurrency must be at least 1");
        }
        if self.gpus_per_worker == 0 {
            bail!("--gpus-per-worker must be at least 1");
        }
        if self.port == self.admin_port {
            bail!("--port and --admin-port must differ (both are {})", self.port);
        }
        if !(self.sim_speedup.is_finite() && self.sim_speedup > 0.0) {
            bail!("--sim-speedup must be a positive number");
        }
        if self.backend != Backend::Sim && self.sim_kv_blocks.is_some() {
            bail!("--sim-kv-blocks applies to --backend sim only");
        }
        if self.backend != Backend::Vllm {
            let vllm_only = [
                ("--device cpu", self.device == Device::Cpu),
                ("--vllm-python", self.vllm_python.is_some()),
                ("--model-path", self.model_path.is_some()),
                ("--kv-cache-bytes", self.kv_cache_bytes.is_some()),
            ];
            if let Some((flag, _)) = vllm_only.iter().find(|(_, given)| *given) {
                bail!("{flag} applies to --backend vllm only");
            }
        }
        if self.kv_cache_bytes == Some(0) {
            bail!("--kv-cache-bytes must be at least 1");
        }
        if self.backend == Backend::Sglang && self.kv_transfer_backend == TransferBackend::Ucx {
            bail!("--kv-transfer-backend ucx is TensorRT-LLM's; SGLang transfers KV with nixl or mooncake");
        }
        Ok(())
    }

    /// The readiness timeout in force.
    fn ready_timeout(&self) -> Duration {
        let default = if self.backend == Backend::Sim { 120 } else { 1800 };
        Duration::from_secs(self.ready_timeout.unwrap_or(default))
    }

    /// The start options these flags give.
    pub fn start_options(&self) -> StartOptions {
        StartOptions {
            ready_timeout: self.ready_timeout(),
            filter_load_timeout: Duration::from_secs(self.filter_load_timeout),
        }
    }
}

/// Starts a fleet from the flags (the caller owns it: dropping it stops everything).
pub fn start(args: &ServeArgs, progress: &Progress) -> anyhow::Result<Fleet> {
    let plan = plan::build(args)?;
    let temporary = plan.run_dir_is_temporary;
    let run_dir = plan.run_dir.clone();
    match Fleet::start(plan, &args.start_options(), progress) {
        Ok(fleet) => Ok(fleet),
        Err(e) => {
            // The children are stopped; keep their logs unless nothing was ever written.
            if temporary && std::fs::read_dir(&run_dir).is_ok_and(|mut d| d.next().is_none()) {
                let _ = std::fs::remove_dir(&run_dir);
            }
            Err(e)
        }
    }
}

/// Runs `kvmesh serve` until Ctrl-C (or SIGTERM).
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.dry_run {
        let plan = plan::build(&args)?;
        print!("{}", dry_run::script(&plan));
        return Ok(ExitCode::SUCCESS);
    }
    let progress = Progress::new(args.verbose);
    let mut fleet = match start(&args, &progress) {
        Ok(fleet) => fleet,
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("kvmesh serve: {e}; everything it started is stopped");
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e),
    };
    fleet.print_ready();
    match fleet.watch(&progress) {
        Ok(signal) => {
            progress.note(&format!("kvmesh serve: {signal}: stopping every process"));
            fleet.finish();
            progress.note("kvmesh serve: stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            progress.note("kvmesh serve: a process died: stopping every process");
            fleet.stop();
            eprintln!("kvmesh serve: logs kept in {}", fleet.plan.run_dir.display());
            Err(e)
        }
    }
}
