//! The children of `kvmesh serve`: each in its own process group with its output in a log file,
//! told to stop when serve dies, and stopped as a whole group (SIGTERM, then SIGKILL after a grace
//! period) so nothing an engine started survives it. Also the SIGINT/SIGTERM flag serve polls.

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

/// Every child serve started, in start order; stopping them all on drop.
#[derive(Default)]
pub struct Children {
    /// Each child with its stop stage: higher stages stop first.
    running: Vec<(Running, u8)>,
}

impl Children {
    /// Adds a started child; children of a higher `stage` are stopped before those of a lower one
    /// (Envoy and the workers before the control plane, the control plane before NATS).
    pub fn push(&mut self, child: Running, stage: u8) {
        self.running.push((child, stage));
    }

    /// The first child that exited on its own, if any.
    pub fn first_exited(&self) -> Option<&Running> {
        self.running.iter().map(|(c, _)| c).find(|c| c.has_exited())
    }

    /// Stops every child, stage by stage: SIGTERM to each group of the stage, up to [`STOP_GRACE`]
    /// for them to exit, then SIGKILL to those groups (which also clears out anything they
    /// started). Then reaps them all. Returns each child's name and exit status.
    pub fn stop_all(&mut self) -> Vec<(String, Option<ExitStatus>)> {
        let mut stages: Vec<u8> = self.running.iter().map(|(_, s)| *s).collect();
        stages.sort_unstable_by(|a, b| b.cmp(a));
        stages.dedup();
        for stage in stages {
            let group: Vec<&Running> =
                self.running.iter().filter(|(_, s)| *s == stage).map(|(c, _)| c).collect();
            for child in group.iter().rev() {
                child.signal_group(libc::SIGTERM);
            }
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline && !group.iter().all(|c| c.has_exited()) {
                std::thread::sleep(Duration::from_millis(20));
            }
            for child in &group {
                child.signal_group(libc::SIGKILL);
            }
        }
        let statuses = self.running.iter_mut().map(|(c, _)| (c.name.clone(), c.reap())).collect();
        self.running.clear();
        statuses
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        if !self.running.is_empty() {
            self.stop_all();
        }
    }
}
