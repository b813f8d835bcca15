//! What serve will run, decided before anything starts: every process with its command line, every
//! generated file, every port. `--dry-run` prints this plan; a real run checks it (ports free,
//! programs present) and then carries it out.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use kvmesh_control_plane::config::{Config as ControlPlaneConfig, ModelConfig};
use kvmesh_core::{Engine, Role, RoutingConfig, WorkerInfo, WorkerState};

use super::bootstrap::{self, Bootstrap, FilterModule};
use super::engines::{self, Backend, Device, EngineContext, SimEngine, Worker};
use super::locate::{self, Located};
use super::{FilterBuild, FilterMode, ServeArgs};

/// What a process is, for readiness checks and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// nats-server on this client port.
    Nats {
        /// Client port.
        port: u16,
    },
    /// The control plane with its REST admin on this port.
    ControlPlane {
        /// Admin port.
        admin_port: u16,
    },
    /// An agent (ready when its worker is registered with the control plane).
    Agent,
    /// A worker serving HTTP on this port.
    Worker {
        /// HTTP port.
        port: u16,
    },
    /// Envoy with its admin on this port.
    Envoy {
        /// Admin port.
        admin_port: u16,
    },
}

/// One process to start.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    /// Its name in messages and its log file's name.
    pub name: String,
    /// What it is.
    pub component: Component,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// What to do when the program is missing (starts with "; "), for the error message.
    pub missing_hint: String,
}

/// A file serve writes before starting anything.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    /// Where.
    pub path: PathBuf,
    /// What it is, for the dry run's comment.
    pub what: String,
    /// Its contents.
    pub contents: String,
}

/// The ports serve uses (all on 127.0.0.1 except Envoy's listener, on `--listen`).
#[derive(Clone, Debug)]
pub struct Ports {
    /// Envoy's listener (`--port`).
    pub listen: u16,
    /// The control plane's REST admin (`--admin-port`).
    pub admin: u16,
    /// The control plane's gRPC state stream.
    pub grpc: u16,
    /// nats-server's client port.
    pub nats: u16,
    /// Envoy's admin.
    pub envoy_admin: u16,
}

/// Everything a run needs.
pub struct Plan {
    /// Served model.
    pub model: String,
    /// The workers' backend.
    pub backend: Backend,
    /// Where vLLM engines run.
    pub device: Device,
    /// The wire formats the workers speak.
    pub engine: SimEngine,
    /// Listener address of Envoy.
    pub listen: String,
    /// Ports.
    pub ports: Ports,
    /// The workers, in start order.
    pub workers: Vec<Worker>,
    /// Processes in start order: nats-server, control plane, agents, workers, Envoy.
    pub processes: Vec<ProcessSpec>,
    /// Files to write first.
    pub files: Vec<ConfigFile>,
    /// Directories to create first (each vLLM CPU engine's private temp and cache directories).
    pub dirs: Vec<PathBuf>,
    /// Where logs and generated files go.
    pub run_dir: PathBuf,
    /// Whether serve chose the run dir (then it removes it after a clean stop).
    pub run_dir_is_temporary: bool,
    /// Bearer token of the control plane's mutating admin calls.
    pub admin_token: String,
    /// Envoy worker threads (one filter VM each).
    pub envoy_concurrency: u32,
    /// How the filter learns the fleet.
    pub filter_mode: FilterMode,
    /// Which build of the filter Envoy runs.
    pub filter: FilterBuild,
    /// Programs and files that must exist for a real run, with what they are.
    pub required: Vec<(String, Located)>,
}

/// Hands out free 127.0.0.1 ports, never one twice and never one of the user's.
struct PortPicker {
    taken: HashSet<u16>,
}

impl PortPicker {
    fn pick(&mut self) -> anyhow::Result<u16> {
        for _ in 0..200 {
            let listener =
                TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0 to find a free port")?;
            let port = listener.local_addr().context("local address of a bound socket")?.port();
            if self.taken.insert(port) {
                return Ok(port);
            }
        }
        bail!("no free port found in 200 tries")
    }
}

/// Builds the plan from the flags.
pub fn build(args: &ServeArgs) -> anyhow::Result<Plan> {
    args.validate()?;
    let disaggregated = args.prefill.is_some();
    let engine = args.backend.engine(args.sim_engine);
    let block_size =
        args.block_size.unwrap_or_else(|| args.backend.default_block_size(args.sim_engine, args.device));
    let mut picker = PortPicker { taken: HashSet::from([args.port, args.admin_port]) };
    let ports = Ports {
        listen: args.port,
        admin: args.admin_port,
        grpc: picker.pick()?,
        nats: picker.pick()?,
        envoy_admin: picker.pick()?,
    };
    let (run_dir, run_dir_is_temporary) = match &args.run_dir {
        Some(dir) => (dir.clone(), false),
        None if args.dry_run => (std::env::temp_dir().join("kvmesh-serve"), true),
        None => (std::env::temp_dir().join(format!("kvmesh-serve-{}", std::process::id())), true),
    };
    let kvmesh = std::env::current_exe().context("find the kvmesh executable")?;
    // A local model directory holds its tokenizer files too.
    let tokenizer_flag = args.tokenizer_dir.as_deref().or(args.model_path.as_deref());
    let tokenizer = locate::tokenizer_dir(tokenizer_flag, &args.model);
    if !args.dry_run {
        // The control plane's configuration names the directory: say how to get the files first.
        tokenizer.require(&format!("tokenizer files of {}", args.model))?;
    }
    let nats = locate::nats_server();
    let envoy = locate::envoy();
    let (module, module_name) = match args.filter {
        FilterBuild::Wasm => (locate::filter_wasm(args.filter_wasm.as_deref()), "kvmesh_filter.wasm"),
        FilterBuild::Native => {
            (locate::filter_native(args.filter_native.as_deref()), "libkvmesh_filter_native.so")
        }
    };

    // Workers: N that do both, or P prefill then D decode.
    let roles: Vec<(String, Role)> = match (args.prefill, args.decode) {
        (Some(p), Some(d)) => (0..p)
            .map(|i| (format!("prefill-{i}"), Role::Prefill))
            .chain((0..d).map(|i| (format!("decode-{i}"), Role::Decode)))
            .collect(),
        _ => (0..args.workers).map(|i| (format!("worker-{i}"), Role::Both)).collect(),
    };
    let mut workers = Vec::with_capacity(roles.len());
    for (index, (name, role)) in roles.into_iter().enumerate() {
        let gpus = match args.backend {
            Backend::Sim => Vec::new(),
            Backend::Vllm if args.device == Device::Cpu => Vec::new(),
            _ => {
                let n = args.gpus_per_worker;
                (index as u32 * n..(index as u32 + 1) * n).collect()
            }
        };
        workers.push(Worker {
            name,
            index,
            role,
            port: picker.pick()?,
            kv_events_port: picker.pick()?,
            kv_replay_port: picker.pick()?,
            transfer_port: picker.pick()?,
            gpus,
        });
    }

    let nats_url = format!("nats://127.0.0.1:{}", ports.nats);
    let base = match &args.config {
        Some(path) => ControlPlaneConfig::from_file(path)?,
        None => ControlPlaneConfig::default(),
    };
    let admin_token = admin_token(&base)?;
    // The filter gets a routing setting only when the user chose one (else the control plane's
    // policy, streamed to it, is the only one).
    let explicit_routing = args.policy.is_some() || base.model(&args.model).is_some();
    let cp_config = control_plane_config(args, base, &ports, &nats_url, &tokenizer.path, block_size)?;
    let routing = cp_config.model(&args.model).map(|m| m.routing);

    let mut files = Vec::new();
    let mut processes = Vec::new();
    let mut required = vec![("nats-server".to_owned(), nats.clone()), ("Envoy".to_owned(), envoy.clone())];
    required.push((format!("the filter module {module_name}"), module.clone()));
    required.push((format!("tokenizer files of {}", args.model), tokenizer.clone()));
    if let Some(dir) = &args.model_path {
        let found = dir.join("config.json").is_file();
        let hint = "; --model-path must be a model directory with config.json".to_owned();
        required.push(("the model (--model-path)".to_owned(), Located { path: dir.clone(), found, hint }));
    }

    processes.push(ProcessSpec {
        name: "nats-server".into(),
        component: Component::Nats { port: ports.nats },
        program: nats.path.clone(),
        args: vec!["-a".into(), "127.0.0.1".into(), "-p".into(), ports.nats.to_string()],
        env: Vec::new(),
        missing_hint: nats.hint.clone(),
    });

    let cp_path = run_dir.join("control-plane.yaml");
    files.push(ConfigFile {
        path: cp_path.clone(),
        what: "control plane configuration (kvmesh control-plane --config)".into(),
        contents: format!(
            "# kvmesh control plane configuration generated by `kvmesh serve`\n\
             # (fields: control-plane/kvmesh.example.yaml). The admin token is in KVMESH_ADMIN_TOKEN.\n{}",
            serde_norway::to_string(&cp_config).context("write the control plane configuration")?
        ),
    });
    processes.push(ProcessSpec {
        name: "control-plane".into(),
        component: Component::ControlPlane { admin_port: ports.admin },
        program: kvmesh.clone(),
        args: vec!["control-plane".into(), "--config".into(), cp_path.display().to_string()],
        env: vec![(kvmesh_control_plane::config::ADMIN_TOKEN_ENV.to_owned(), admin_token.clone())],
        missing_hint: String::new(),
    });

    let ctx = EngineContext {
        backend: args.backend,
        sim_engine: args.sim_engine,
        model: &args.model,
        tokenizer_dir: &tokenizer.path,
        block_size,
        disaggregated,
        transfer_backend: args.kv_transfer_backend,
        kvmesh: &kvmesh,
        sim_kv_blocks: args.sim_kv_blocks,
        sim_speedup: args.sim_speedup,
        engine_args: &args.engine_args,
        run_dir: &run_dir,
        nats_url: &nats_url,
        namespace: &args.namespace,
        device: args.device,
        vllm_python: args.vllm_python.as_deref(),
        model_path: args.model_path.as_deref(),
        kv_cache_bytes: args.kv_cache_bytes,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut dirs = Vec::new();
    if args.backend == Backend::Vllm && args.device == Device::Cpu {
        for w in &workers {
            dirs.extend(engines::cpu_dirs(&run_dir, w));
        }
    }
    // Agents first: each binds the socket its engine's KV-event publisher connects to.
    for w in &workers {
        processes.push(engines::agent(&ctx, w));
    }
    for w in &workers {
        let (spec, file) = engines::worker(&ctx, w);
        let name = spec.program.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        if args.backend != Backend::Sim && !required.iter().any(|(what, _)| *what == name) {
            required.push((name, program(&spec)));
        }
        processes.push(spec);
        files.extend(file);
    }

    let filter_config = match args.filter_mode {
        FilterMode::State => {
            // A local fleet reads every response's `usage`: accuracy is what one looks at here.
            let mut config = serde_json::json!({ "state": {}, "accuracy_sample_every": 1 });
            if args.filter == FilterBuild::Native {
                // The native module holds the control plane's stream itself.
                config["control_plane"] = serde_json::json!({
                    "address": format!("http://127.0.0.1:{}", ports.grpc),
                    "node": "kvmesh-serve",
                });
            }
            if explicit_routing && let Some(routing) = routing {
                config["routing"] = serde_json::to_value(routing)?;
            }
            config.to_string()
        }
        FilterMode::Static => {
            static_filter_config(&args.model, &tokenizer, &workers, block_size, engine, routing)?
        }
    };
    let service_config = serde_json::json!({
        "control_plane": { "cluster": bootstrap::CONTROL_PLANE_CLUSTER, "node": "kvmesh-serve" }
    })
    .to_string();
    let worker_ports: Vec<u16> = workers.iter().map(|w| w.port).collect();
    let envoy_path = run_dir.join("envoy.yaml");
    files.push(ConfigFile {
        path: envoy_path.clone(),
        what: "Envoy bootstrap".into(),
        contents: Bootstrap {
            listen: &args.listen,
            port: ports.listen,
            admin_port: ports.envoy_admin,
            filter: match args.filter {
                FilterBuild::Wasm => FilterModule::Wasm(&module.path),
                FilterBuild::Native => FilterModule::Native(&module.path),
            },
            filter_config: &filter_config,
            // The Wasm filter's VMs follow a state service; the native module connects itself.
            state_service: (args.filter_mode == FilterMode::State && args.filter == FilterBuild::Wasm)
                .then_some((ports.grpc, service_config.as_str())),
            worker_ports: &worker_ports,
        }
        .to_yaml(),
    });
    processes.push(ProcessSpec {
        name: "envoy".into(),
        component: Component::Envoy { admin_port: ports.envoy_admin },
        program: envoy.path.clone(),
        args: vec![
            "-c".into(),
            envoy_path.display().to_string(),
            "--concurrency".into(),
            args.envoy_concurrency.to_string(),
            // No shared memory: several Envoys (other serves, tests) need no distinct --base-id.
            "--disable-hot-restart".into(),
            "--log-level".into(),
            "info".into(),
        ],
        env: Vec::new(),
        missing_hint: envoy.hint.clone(),
    });

    Ok(Plan {
        model: args.model.clone(),
        backend: args.backend,
        device: args.device,
        engine,
        listen: args.listen.clone(),
        ports,
        workers,
        processes,
        files,
        dirs,
        run_dir,
        run_dir_is_temporary,
        admin_token,
        envoy_concurrency: args.envoy_concurrency,
        filter_mode: args.filter_mode,
        filter: args.filter,
        required,
    })
}

/// Whether a worker's program exists (a bare name is looked up on PATH when the plan is built).
fn program(spec: &ProcessSpec) -> Located {
    Located { path: spec.program.clone(), found: spec.program.is_file(), hint: spec.missing_hint.clone() }
}

/// The admin token: `$KVMESH_ADMIN_TOKEN`, the `--config` file's, else a fresh random one.
fn admin_token(base: &ControlPlaneConfig) -> anyhow::Result<String> {
    if let Ok(token) = std::env::var(kvmesh_control_plane::config::ADMIN_TOKEN_ENV)
        && !token.is_empty()
    {
        return Ok(token);
    }
    if let Some(token) = base.admin.token.clone() {
        return Ok(token);
    }
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("read /dev/urandom for an admin token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The control plane's configuration: `--config` (or defaults) with serve's addresses, NATS and the
/// served model on top.
fn control_plane_config(
    args: &ServeArgs,
    mut config: ControlPlaneConfig,
    ports: &Ports,
    nats_url: &str,
    tokenizer_dir: &Path,
    block_size: u32,
) -> anyhow::Result<ControlPlaneConfig> {
    config.namespace = args.namespace.clone();
    config.nats.url = nats_url.to_owned();
    config.admin.listen = ([127, 0, 0, 1], ports.admin).into();
    // The token travels in the environment, not in a file others may read.
    config.admin.token = None;
    config.grpc.listen = ([127, 0, 0, 1], ports.grpc).into();
    // Nothing registers before the control plane is up, so a short startup resync window suffices.
    if args.config.is_none() {
        config.resync.startup_window_ms = 500;
    }
    let model = match config.models.iter_mut().find(|m| m.name == args.model) {
        Some(m) => m,
        None => {
            config.models.push(ModelConfig::named(args.model.clone(), None));
            config.models.last_mut().expect("a model was just pushed")
        }
    };
    model.tokenizer_dir = Some(tokenizer_dir.to_path_buf());
    model.block_size = Some(block_size);
    if let Some(policy) = args.policy {
        model.routing.policy = policy;
    }
    if !args.dry_run {
        config.validate().context("the control plane configuration")?;
    }
    Ok(config)
}

/// The filter's configuration without the control plane: the model's tokenizer files and the
/// workers inline (approx-prefix routing by default, as the filter has no KV events then).
fn static_filter_config(
    model: &str,
    tokenizer: &Located,
    workers: &[Worker],
    block_size: u32,
    engine: SimEngine,
    routing: Option<RoutingConfig>,
) -> anyhow::Result<String> {
    let read = |name: &str| -> anyhow::Result<Option<Box<serde_json::value::RawValue>>> {
        let path = tokenizer.path.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        Ok(Some(
            serde_json::value::RawValue::from_string(text)
                .with_context(|| format!("{} is not JSON", path.display()))?,
        ))
    };
    let engine = match engine {
        SimEngine::Vllm => Engine::Vllm,
        SimEngine::Sglang => Engine::Sglang,
        SimEngine::Trtllm => Engine::Trtllm,
    };
    let workers: Vec<WorkerInfo> = workers
        .iter()
        .map(|w| WorkerInfo {
            id: w.name.as_str().into(),
            address: w.address(),
            model: model.to_owned(),
            engine,
            role: w.role,
            block_size,
            state: WorkerState::Ready,
        })
        .collect();
    let mut config = serde_json::json!({
        "models": [{ "name": model }],
        "workers": workers,
        "accuracy_sample_every": 1,
    });
    if let Some(tokenizer_json) = read("tokenizer.json")? {
        // Converted here, once, as the control plane converts what it serves: each of Envoy's wasm
        // VMs would otherwise convert the file again while loading it.
        let canonical = kvmesh_core::tokenize::canonicalize(tokenizer_json.get())
            .with_context(|| format!("convert {}", tokenizer.path.join("tokenizer.json").display()))?;
        config["models"][0]["tokenizer"] = serde_json::from_str(&canonical)?;
    }
    if let Some(tokenizer_config) = read("tokenizer_config.json")? {
        config["models"][0]["tokenizer_config"] = serde_json::to_value(tokenizer_config)?;
    }
    if let Some(routing) = routing.filter(|r| r.policy != kvmesh_core::PolicyKind::KvAware) {
        config["routing"] = serde_json::to_value(routing)?;
    }
    Ok(config.to_string())
}
