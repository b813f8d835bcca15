//! The children of `kvmesh serve`: each in its own process group with its output in a log file,
//! told to stop when serve dies, and stopped as a whole group (SIGTERM, then SIGKILL after a grace
//! period) so nothing an engine started survives it, nor the POSIX shared memory it left in
//! `/dev/shm`. Also the SIGINT/SIGTERM flag serve polls.

use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::plan::ProcessSpec;

/// How long children get between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a real engine gets: vLLM's API server stops its engine core and workers (2.6 s measured
/// on an idle 2-core machine, much more on a loaded one), and Python's resource tracker then
/// unlinks their shared memory.
pub const ENGINE_STOP_GRACE: Duration = Duration::from_secs(30);

// ---- signals ------------------------------------------------------------------------------------

/// The last SIGINT or SIGTERM received (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    // Only an atomic store: the one thing a signal handler may safely do here.
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag ([`stop_requested`]) instead of killing serve, so it can
/// stop its children first.
pub fn catch_stop_signals() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is a valid value; the fields set below make it a plain
        // handler with an empty mask. The handler only stores to an atomic (async-signal-safe).
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("install the SIGINT/SIGTERM handler");
        }
    }
    Ok(())
}

/// The stop signal received, if any (`SIGINT` or `SIGTERM`).
pub fn stop_requested() -> Option<&'static str> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        _ => Some("SIGTERM"),
    }
}

// ---- children -----------------------------------------------------------------------------------

/// One running child.
pub struct Running {
    /// Its name (`nats-server`, `worker-0`, ...).
    pub name: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    child: Child,
    /// Set once reaped: from then on its pid (and group id) may belong to someone else.
    status: Option<ExitStatus>,
}

impl Running {
    /// Starts `spec` in its own process group, output to `<log_dir>/<name>.log`.
    pub fn spawn(spec: &ProcessSpec, log_dir: &Path) -> anyhow::Result<Running> {
        let log = log_dir.join(format!("{}.log", spec.name));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("open {} twice", log.display()))?;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args).envs(spec.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        // SAFETY: getpid before the fork; the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (prctl, getppid).
        let parent = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                // If serve dies without stopping its children (SIGKILL, a crash), the kernel sends
                // them SIGTERM. Set from the main thread: PDEATHSIG follows the thread that forked.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::other("kvmesh serve exited while starting this process"));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| spawn_error(spec, e))?;
        Ok(Running { name: spec.name.clone(), log, child, status: None })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True once the child has exited, without reaping it: while it is an unreaped zombie its pid,
    /// and so its process group id, cannot be reused, so signalling the group stays safe.
    pub fn has_exited(&self) -> bool {
        if self.status.is_some() {
            return true;
        }
        let pid: libc::id_t = self.child.id();
        // SAFETY: an all-zero siginfo_t is valid; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with WNOWAIT leaves it waitable for Child::wait.
        let rc = unsafe {
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
        };
        // SAFETY: si_pid is valid to read after a successful waitid (0 when nothing exited).
        rc != 0 || unsafe { info.si_pid() } != 0
    }

    /// How the child ended, in words (`exit status: 1`, `signal: 9`), without reaping it.
    pub fn exit_summary(&self) -> String {
        if let Some(status) = self.status {
            return status.to_string();
        }
        let pid: libc::id_t = self.child.id();
        // SAFETY: an all-zero siginfo_t is valid; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with WNOWAIT leaves it waitable for Child::wait.
        let rc = unsafe {
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
        };
        // SAFETY: si_pid and si_status are valid to read after a successful waitid.
        let (exited, status) = unsafe { (info.si_pid(), info.si_status()) };
        match info.si_code {
            _ if rc != 0 || exited == 0 => "status unknown".to_owned(),
            libc::CLD_EXITED => format!("exit status: {status}"),
            _ => format!("signal: {status}"),
        }
    }

    /// Sends `signal` to the child's whole process group, unless the child was reaped already.
    fn signal_group(&self, signal: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else { return };
        // SAFETY: kill(2) on the group the child leads (spawned with process_group(0)); the child
        // is unreaped, so the group id is still ours.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }

    /// Live processes of the child's process group, the child included while it runs. Empty once
    /// reaped (its group id may then belong to someone else).
    fn group_members(&self) -> Vec<u32> {
        if self.status.is_some() {
            return Vec::new();
        }
        group_members(self.child.id())
    }

    /// Files under `/dev/shm` its group has mapped now (POSIX shared memory and semaphores).
    fn shared_memory(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> =
            self.group_members().into_iter().flat_map(shared_memory_files).collect();
        files.sort();
        files.dedup();
        files
    }

    /// Reaps the child (after it exited) and returns its status.
    fn reap(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
        self.status
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

/// A clear message for a program that could not be started.
fn spawn_error(spec: &ProcessSpec, e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "cannot start {}: `{}` not found{}",
            spec.name,
            spec.program.display(),
            spec.missing_hint
        )
    } else {
        anyhow::anyhow!("cannot start {} (`{}`): {e}", spec.name, spec.program.display())
    }
}

/// The last `lines` lines of a log file (at most its last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map_or(0, |m| m.len());
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Live (not zombie) processes whose process group is `pgid`, the leader included.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
            // After the parenthesised command name: state, ppid, pgrp, ...
            let Some((_, rest)) = stat.rsplit_once(") ") else { return false };
            let fields: Vec<&str> = rest.split(' ').collect();
            fields.first() != Some(&"Z") && fields.get(2).and_then(|g| g.parse().ok()) == Some(pgid)
        })
        .collect()
}

/// Files under `/dev/shm` that process `pid` has mapped.
fn shared_memory_files(pid: u32) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.starts_with("/dev/shm/"))
        .map(PathBuf::from)
        .collect()
}

/// How serve treats one child.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Stop stage: children of a higher stage are stopped before those of a lower one (Envoy and
    /// the workers before the control plane, the control plane before NATS).
    pub stage: u8,
    /// Time between SIGTERM and SIGKILL to its group.
    pub grace: Duration,
    /// Whether the fleet goes on without it once ready (a worker or an agent).
    pub expendable: bool,
}

/// Every child serve started, in start order; stopping them all on drop.
#[derive(Default)]
pub struct Children {
    /// Each child with how it is treated.
    running: Vec<(Running, Policy)>,
}

impl Children {
    /// Adds a started child.
    pub fn push(&mut self, child: Running, policy: Policy) {
        self.running.push((child, policy));
    }

    /// The first child that exited on its own, if any, and whether the fleet may go on without it.
    pub fn first_exited(&self) -> Option<(&Running, bool)> {
        self.running.iter().find(|(c, _)| c.has_exited()).map(|(c, p)| (c, p.expendable))
    }

    /// Whether a child named `name` is still watched (it has not exited and been removed).
    pub fn contains(&self, name: &str) -> bool {
        self.running.iter().any(|(c, _)| c.name == name)
    }

    /// Removes the child `name`, which exited on its own: stops what is left of its process group
    /// (an engine's own helpers), removes the shared memory they held, reaps it and returns its
    /// exit status.
    pub fn remove_exited(&mut self, name: &str) -> Option<ExitStatus> {
        let at = self.running.iter().position(|(c, _)| c.name == name)?;
        stop_groups(&[&self.running[at].0], self.running[at].1.grace);
        let (mut child, _) = self.running.remove(at);
        child.reap()
    }

    /// Stops every child, stage by stage (see [`stop_groups`]), then reaps them all. Returns each
    /// child's name and exit status.
    pub fn stop_all(&mut self) -> Vec<(String, Option<ExitStatus>)> {
        let mut stages: Vec<u8> = self.running.iter().map(|(_, p)| p.stage).collect();
        stages.sort_unstable_by(|a, b| b.cmp(a));
        stages.dedup();
        for stage in stages {
            let group: Vec<&Running> =
                self.running.iter().filter(|(_, p)| p.stage == stage).map(|(c, _)| c).collect();
            let grace = self.running.iter().filter(|(_, p)| p.stage == stage).map(|(_, p)| p.grace).max();
            stop_groups(&group, grace.unwrap_or(STOP_GRACE));
        }
        let statuses = self.running.iter_mut().map(|(c, _)| (c.name.clone(), c.reap())).collect();
        self.running.clear();
        statuses
    }
}

/// Stops the process groups of `children` (not yet reaped): SIGTERM to each, up to `grace` for
/// every process in them to exit, then SIGKILL to the groups (which also clears out anything they
/// started). Shared memory in `/dev/shm` they had mapped and left behind is removed: Python's
/// resource tracker unlinks it after a clean exit, but a SIGKILL or a crash leaves it taken until
/// the machine restarts.
fn stop_groups(children: &[&Running], grace: Duration) {
    let shared: Vec<PathBuf> = children.iter().flat_map(|c| c.shared_memory()).collect();
    for child in children.iter().rev() {
        child.signal_group(libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !children.iter().all(|c| c.group_members().is_empty()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for child in children {
        child.signal_group(libc::SIGKILL);
    }
    // The killed need a moment to be gone before their files are removed from under them.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !children.iter().all(|c| c.group_members().is_empty()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for path in shared {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        if !self.running.is_empty() {
            self.stop_all();
        }
    }
}
