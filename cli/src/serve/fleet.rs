//! Carrying out a plan: check that programs exist and ports are free, write the generated files,
//! start each process, wait until each part is ready (printing a line as it is), then watch the
//! children until a stop signal. Before `ready` any child's death stops everything; after it, a
//! worker or an agent that dies is reported and the others keep serving, while the control plane,
//! NATS or Envoy dying stops everything. Whatever happens, every child is stopped.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use super::dry_run::{command_line, display_host};
use super::engines::{Backend, Device};
use super::http;
use super::plan::{Component, Plan};
use super::process::{
    Children, ENGINE_STOP_GRACE, Policy, Running, STOP_GRACE, catch_stop_signals, stop_requested,
};
use super::progress::Progress;
use super::{FilterBuild, FilterMode};

/// How long one probe request may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between two rounds of probes.
const POLL: Duration = Duration::from_millis(100);
/// Lines of a failed child's log shown in the error.
const LOG_LINES: usize = 25;
/// How often a line says what start-up still waits for (real engines take minutes).
const WAITING_NOTE: Duration = Duration::from_secs(30);

/// The metric the filter counts model loads with (one per model per VM).
const MODEL_LOADS_METRIC: &str = "kvmesh_filter_model_loads_total";

/// Serve was asked to stop (SIGINT or SIGTERM) before it was ready.
#[derive(Debug)]
pub struct Interrupted(pub &'static str);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by {} during start-up", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Waiting options.
pub struct StartOptions {
    /// How long the whole fleet may take to become ready.
    pub ready_timeout: Duration,
    /// How long to wait for the filter to load the model before going on with a warning.
    pub filter_load_timeout: Duration,
}

/// A running fleet; dropping it stops every child.
pub struct Fleet {
    /// What runs.
    pub plan: Plan,
    children: Children,
}

/// A readiness check still pending.
enum Pending {
    /// The control plane's `/readyz`.
    ControlPlane,
    /// A worker's `/health`.
    Worker { name: String, port: u16 },
    /// Every worker registered with the control plane (through its agent).
    Registered,
    /// Envoy's `/ready`.
    Envoy,
    /// The filter loaded the model in every worker VM (counted from Envoy's readiness).
    Filter,
}

/// What the readiness checks learned so far.
struct Readiness<'a> {
    plan: &'a Plan,
    progress: &'a Progress,
    filter_timeout: Duration,
    /// Workers seen registered.
    registered: Vec<String>,
    /// When Envoy answered `/ready`.
    envoy_ready_at: Option<Instant>,
    /// When every worker was registered.
    registered_at: Option<Instant>,
}

impl Readiness<'_> {
    /// Runs one check; prints its line when it passes.
    fn passed(&mut self, check: &Pending) -> bool {
        let plan = self.plan;
        match check {
            Pending::ControlPlane => {
                let ok = http_ok(plan.ports.admin, "/readyz");
                if ok {
                    self.progress.ready("control plane", &format!("http://127.0.0.1:{}", plan.ports.admin));
                }
                ok
            }
            Pending::Worker { name, port } => {
                let ok = http_ok(*port, "/health");
                if ok {
                    let what = match (plan.backend, plan.device) {
                        (Backend::Sim, _) => format!("sim, {}", plan.engine.name()),
                        (Backend::Vllm, Device::Cpu) => "vllm, cpu".to_owned(),
                        (other, _) => format!("{other:?}").to_lowercase(),
                    };
                    self.progress.ready(name, &format!("http://127.0.0.1:{port} ({what})"));
                }
                ok
            }
            Pending::Registered => {
                for id in registered_workers(plan.ports.admin, &plan.model) {
                    if !self.registered.contains(&id) && plan.workers.iter().any(|w| w.name == id) {
                        self.progress.ready(&format!("agent {id}"), "registered with the control plane");
                        self.registered.push(id);
                    }
                }
                let done = self.registered.len() >= plan.workers.len();
                if done {
                    self.registered_at = Some(Instant::now());
                }
                done
            }
            Pending::Envoy => {
                let ok = http_ok(plan.ports.envoy_admin, "/ready");
                if ok {
                    self.envoy_ready_at = Some(Instant::now());
                    self.progress
                        .ready("envoy", &format!("admin http://127.0.0.1:{}", plan.ports.envoy_admin));
                }
                ok
            }
            Pending::Filter => {
                // The filter fetches the model's files from the control plane once Envoy runs and
                // the model has workers (real engines take minutes to get there: the clock starts
                // when both are done).
                let (Some(envoy), Some(registered)) = (self.envoy_ready_at, self.registered_at) else {
                    return false;
                };
                let since = envoy.max(registered);
                let loads = model_loads(plan.ports.envoy_admin);
                // The Wasm filter loads the tokenizer in each worker thread's VM; the native module
                // once for the process.
                let (want, done) = match plan.filter {
                    FilterBuild::Wasm => {
                        let n = u64::from(plan.envoy_concurrency);
                        (n, format!("{} loaded in {n} worker VM(s)", plan.model))
                    }
                    FilterBuild::Native => {
                        (1, format!("{} loaded (native module, once per Envoy)", plan.model))
                    }
                };
                if loads.is_some_and(|n| n >= want) {
                    self.progress.ready("filter", &done);
                    return true;
                }
                if since.elapsed() < self.filter_timeout {
                    return false;
                }
                let secs = self.filter_timeout.as_secs();
                self.progress.warn(&match loads {
                    None => format!(
                        "the filter reports no {MODEL_LOADS_METRIC} after {secs}s: going on without knowing \
                         whether it routes yet (an older filter module? `make wasm` or `make native`)"
                    ),
                    Some(n) => {
                        format!("the filter loaded the model in {n} of {want} VMs within {secs}s; going on")
                    }
                });
                true
            }
        }
    }
}

impl Fleet {
    /// Starts the plan and waits until everything is ready. On any failure (or a stop signal) the
    /// children started so far are stopped before this returns.
    pub fn start(plan: Plan, options: &StartOptions, progress: &Progress) -> anyhow::Result<Fleet> {
        for (what, located) in &plan.required {
            located.require(what)?;
        }
        check_port(&plan.listen, plan.ports.listen, "--port, Envoy's listener")?;
        check_port("127.0.0.1", plan.ports.admin, "--admin-port, the control plane's admin API")?;
        progress.heading(&format!(
            "kvmesh serve: {} on {} {} worker(s); logs in {}",
            plan.model,
            plan.workers.len(),
            match plan.backend {
                Backend::Sim => format!("simulated {}", plan.engine.name()),
                other => format!("{other:?}").to_lowercase(),
            },
            plan.run_dir.display()
        ));
        catch_stop_signals()?;
        for dir in std::iter::once(&plan.run_dir).chain(&plan.dirs) {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        for file in &plan.files {
            std::fs::write(&file.path, &file.contents)
                .with_context(|| format!("write {}", file.path.display()))?;
        }
        let token = plan.run_dir.join("admin-token");
        write_private(&token, &plan.admin_token).with_context(|| format!("write {}", token.display()))?;

        let mut fleet = Fleet { plan, children: Children::default() };
        let deadline = Instant::now() + options.ready_timeout;
        let mut pending = Vec::new();
        for spec in fleet.plan.processes.clone() {
            let running = Running::spawn(&spec, &fleet.plan.run_dir)?;
            let command = command_line(&spec.env, &spec.program.display().to_string(), &spec.args);
            progress.started(&spec.name, running.pid(), &command);
            let stage = match spec.component {
                Component::Nats { .. } => 0,
                Component::ControlPlane { .. } => 1,
                Component::Agent | Component::Worker { .. } | Component::Envoy { .. } => 2,
            };
            let real_engine =
                matches!(spec.component, Component::Worker { .. }) && fleet.plan.backend != Backend::Sim;
            let policy = Policy {
                stage,
                grace: if real_engine { ENGINE_STOP_GRACE } else { STOP_GRACE },
                expendable: matches!(spec.component, Component::Agent | Component::Worker { .. }),
            };
            fleet.children.push(running, policy);
            match spec.component {
                Component::Nats { port } => {
                    fleet.wait(deadline, "nats-server accepting connections", || tcp_accepts(port))?;
                    progress.ready("nats-server", &format!("nats://127.0.0.1:{port}"));
                }
                Component::ControlPlane { admin_port } => {
                    // Its admin API answers before NATS is joined; /readyz says when it is.
                    fleet.wait(deadline, "the control plane's admin API", || {
                        http_ok(admin_port, "/healthz")
                    })?;
                    pending.push(Pending::ControlPlane);
                }
                Component::Agent => {}
                Component::Worker { port } => pending.push(Pending::Worker { name: spec.name.clone(), port }),
                Component::Envoy { .. } => pending.push(Pending::Envoy),
            }
        }
        pending.push(Pending::Registered);
        // A static filter loads the tokenizer from its configuration before Envoy is ready; a
        // filter following the control plane fetches it afterwards, in every VM.
        if fleet.plan.filter_mode == FilterMode::State {
            pending.push(Pending::Filter);
        }
        fleet.wait_pending(pending, deadline, options.filter_load_timeout, progress)?;
        Ok(fleet)
    }

    /// Polls `ready` until it holds; fails when a child dies, a stop signal comes, or time runs out.
    fn wait(&self, deadline: Instant, what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
        loop {
            if ready() {
                return Ok(());
            }
            self.check()?;
            if Instant::now() >= deadline {
                bail!("timed out waiting for {what} (logs in {})", self.plan.run_dir.display());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Fails on a stop signal or a child that exited.
    fn check(&self) -> anyhow::Result<()> {
        if let Some(signal) = stop_requested() {
            return Err(Interrupted(signal).into());
        }
        if let Some((dead, _)) = self.children.first_exited() {
            return Err(died(dead));
        }
        Ok(())
    }

    /// Waits for every pending check, printing a line as each passes.
    fn wait_pending(
        &self,
        mut pending: Vec<Pending>,
        deadline: Instant,
        filter_timeout: Duration,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        let mut readiness = Readiness {
            plan: &self.plan,
            progress,
            filter_timeout,
            registered: Vec::new(),
            envoy_ready_at: None,
            registered_at: None,
        };
        let mut next_note = Instant::now() + WAITING_NOTE;
        loop {
            pending.retain(|check| !readiness.passed(check));
            if pending.is_empty() {
                return Ok(());
            }
            self.check()?;
            if Instant::now() >= next_note {
                next_note += WAITING_NOTE;
                let names: Vec<String> = pending.iter().map(|p| pending_name(p, &self.plan)).collect();
                let left = deadline.saturating_duration_since(Instant::now()).as_secs();
                progress.waiting(&format!("{} ({left}s of --ready-timeout left)", names.join(", ")));
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = pending.iter().map(|p| pending_name(p, &self.plan)).collect();
                bail!(
                    "not ready within --ready-timeout: still waiting for {} (logs in {})",
                    names.join(", "),
                    self.plan.run_dir.display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The lines printed on stdout once ready: the endpoint, the admin URLs, then `ready`.
    pub fn print_ready(&self) {
        let p = &self.plan.ports;
        println!("endpoint     http://{}:{}/v1/chat/completions", display_host(&self.plan.listen), p.listen);
        println!(
            "admin        http://127.0.0.1:{}  (bearer token in {})",
            p.admin,
            self.plan.run_dir.join("admin-token").display()
        );
        println!("envoy admin  http://127.0.0.1:{}", p.envoy_admin);
        println!("ready");
    }

    /// Watches the children until a stop signal (Ok with its name) or the fleet cannot go on (Err):
    /// the control plane, NATS or Envoy died, or the last worker did. A worker or an agent that
    /// dies is reported on stderr, its process group stopped and its shared memory removed; its
    /// worker leaves routing when its heartbeat expires, and Envoy's retries move requests sent to
    /// it meanwhile to the others.
    pub fn watch(&mut self, progress: &Progress) -> anyhow::Result<&'static str> {
        loop {
            if let Some(signal) = stop_requested() {
                return Ok(signal);
            }
            if let Some((dead, expendable)) = self.children.first_exited() {
                if !expendable {
                    return Err(died(dead));
                }
                let (name, log, summary) = (dead.name.clone(), dead.log.clone(), dead.exit_summary());
                let workers_left = self
                    .plan
                    .workers
                    .iter()
                    .filter(|w| w.name != name && self.children.contains(&w.name))
                    .count();
                if workers_left == 0 {
                    bail!("{name} exited ({summary}) and no worker is left; its log: {}", log.display());
                }
                progress.warn(&format!(
                    "{name} exited ({summary}); routing continues on the others (its log: {})",
                    log.display()
                ));
                // What it started (an engine's core and workers) goes too, with its shared memory.
                self.children.remove_exited(&name);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops every child (SIGTERM, then SIGKILL after the grace period).
    pub fn stop(&mut self) {
        self.children.stop_all();
    }

    /// Stops every child and, when serve chose the run directory, removes it (after a clean run;
    /// when something failed, drop the fleet instead and the logs stay).
    pub fn finish(mut self) {
        self.stop();
        if self.plan.run_dir_is_temporary {
            let _ = std::fs::remove_dir_all(&self.plan.run_dir);
        }
    }
}

/// What a pending check waits for, in words.
fn pending_name(p: &Pending, plan: &Plan) -> String {
    match p {
        Pending::ControlPlane => "the control plane's /readyz".into(),
        Pending::Worker { name, .. } => format!("{name}'s /health"),
        Pending::Registered => format!("{} workers to register with the control plane", plan.workers.len()),
        Pending::Envoy => "Envoy's /ready".into(),
        Pending::Filter => "the filter to load the model".into(),
    }
}

/// The error for a child that exited on its own, with the end of its log.
fn died(dead: &Running) -> anyhow::Error {
    let tail = dead.log_tail(LOG_LINES);
    let mut hint = "";
    if dead.name == "envoy"
        && (tail.contains("unknown field `state`") || tail.contains("unknown field `control_plane`"))
    {
        hint = "\nhint: this filter module predates the control plane's state stream: rebuild it with \
                `make wasm`, or run with --filter-mode static";
    }
    anyhow::anyhow!(
        "{} exited unexpectedly; the end of its log ({}):\n{}{hint}",
        dead.name,
        dead.log.display(),
        indent(&tail)
    )
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// Fails with a clear message when `port` is taken on `host`.
fn check_port(host: &str, port: u16, what: &str) -> anyhow::Result<()> {
    match TcpListener::bind((host, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let flag = what.split(',').next().unwrap_or(what);
            bail!(
                "port {port} ({what}) is already in use: stop what listens there, or pick another port with {flag}"
            )
        }
        Err(e) => bail!("cannot listen on {host}:{port} ({what}): {e}"),
    }
}

/// Writes a file only its owner may read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    writeln!(file, "{text}")
}

/// True once something accepts TCP connections on 127.0.0.1:`port`.
fn tcp_accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), PROBE_TIMEOUT).is_ok()
}

/// True once `GET path` answers 200.
fn http_ok(port: u16, path: &str) -> bool {
    matches!(http::get(port, path, PROBE_TIMEOUT), Ok(r) if r.status == 200)
}

/// `GET /v1/workers` of the control plane, as far as serve reads it.
#[derive(Deserialize)]
struct WorkersAnswer {
    workers: Vec<WorkerEntry>,
}

#[derive(Deserialize)]
struct WorkerEntry {
    id: String,
    registered: bool,
    model: Option<String>,
}

/// Ids of the workers registered for `model`.
fn registered_workers(admin_port: u16, model: &str) -> Vec<String> {
    let Ok(resp) = http::get(admin_port, "/v1/workers", PROBE_TIMEOUT) else { return Vec::new() };
    let Ok(answer) = serde_json::from_slice::<WorkersAnswer>(&resp.body) else { return Vec::new() };
    answer
        .workers
        .into_iter()
        .filter(|w| w.registered && w.model.as_deref() == Some(model))
        .map(|w| w.id)
        .collect()
}

/// The filter's model-load count from Envoy's stats; `None` while the metric does not exist.
fn model_loads(envoy_admin: u16) -> Option<u64> {
    let path = format!("/stats?filter={MODEL_LOADS_METRIC}");
    let resp = http::get(envoy_admin, &path, PROBE_TIMEOUT).ok()?;
    let text = resp.text();
    let mut total = None;
    for line in text.lines().filter(|l| l.contains(MODEL_LOADS_METRIC)) {
        if let Some(n) = line.rsplit(':').next().and_then(|v| v.trim().parse::<u64>().ok()) {
            total = Some(total.unwrap_or(0) + n);
        }
    }
    total
}
