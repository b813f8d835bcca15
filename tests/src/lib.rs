//! The integration-test harness: starts real Envoy and nats-server (later: the control plane and
//! simulated workers) on free 127.0.0.1 ports, waits until they are ready, and stops every child on
//! drop. Each child's stdout and stderr go to a log file that is shown when readiness fails.
//!
//! Binaries are found through the variables `scripts/env.sh` exports (`KVMESH_ENVOY`,
//! `KVMESH_NATS_SERVER`, `KVMESH_FILTER_WASM`, `KVMESH_TOKENIZERS`), falling back to the default cache
//! paths. A missing binary fails the test with "run `make setup`": tests never skip silently.
//!
//! What it must never do: hold product logic. It drives the real binaries from outside.

pub mod envoy;
pub mod fleet;
pub mod http;
pub mod nats;
pub mod vllm;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a child may take to become ready; generous because CI machines are slow and shared.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a child gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// The hint every "not found" failure ends with.
const SETUP_HINT: &str = "run `make setup` (or `bash scripts/setup.sh`), then run the tests through \
     `make test`, or `. scripts/env.sh` before `cargo test`";

// ---- ports ---------------------------------------------------------------------------------------

/// Ports this process already handed out: tests run in parallel threads, and a probe's port is
/// free again as soon as the probe's socket is closed.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Lowest port [`free_port`] picks.
const LOWEST_PORT: u16 = 10_000;

/// A free TCP port on 127.0.0.1, never the same one twice in this process.
///
/// Picked below the kernel's ephemeral range: the kernel takes the local port of every outgoing
/// connection from that range, so a port handed out from it could be taken by some test's client
/// connection before the server under test binds it (seen once: an agent that could not bind
/// its port for 30 s while a parallel test's connection held it).
pub fn free_port() -> u16 {
    let ephemeral_start = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    if ephemeral_start > LOWEST_PORT + 1_000 {
        let span = u64::from(ephemeral_start - LOWEST_PORT);
        // A different start per process and call: test binaries of other checkouts may run beside.
        let mut state = u64::from(std::process::id()) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        for _ in 0..200 {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let port = LOWEST_PORT + ((state >> 33) % span) as u16;
            if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.insert(port);
                return port;
            }
        }
    }
    // No room below the ephemeral range (or all of it taken): let the kernel pick.
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
        let port = listener.local_addr().expect("local address of a bound listener").port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no free port found in 100 tries");
}

/// The socket address 127.0.0.1:`port`.
pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// ---- where things are ----------------------------------------------------------------------------

/// The kvmesh cache dir: `$KVMESH_CACHE`, else `${XDG_CACHE_HOME:-$HOME/.cache}/kvmesh` (as env.sh).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env_path("KVMESH_CACHE") {
        return dir;
    }
    let base = env_path("XDG_CACHE_HOME")
        .unwrap_or_else(|| env_path("HOME").unwrap_or_else(|| PathBuf::from("/root")).join(".cache"));
    base.join("kvmesh")
}

/// A non-empty environment variable as a path.
fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Resolves a required file: `$var` when set (it must exist), else the first existing fallback;
/// panics with what was tried and how to get it otherwise.
fn locate(var: &str, what: &str, fallbacks: &[PathBuf], hint: &str) -> PathBuf {
    if let Some(path) = env_path(var) {
        if path.exists() {
            return path;
        }
        panic!("{what} not found: {var}={} does not exist; {hint}", path.display());
    }
    if let Some(path) = fallbacks.iter().find(|p| p.exists()) {
        return path.clone();
    }
    let tried: Vec<String> = fallbacks.iter().map(|p| p.display().to_string()).collect();
    panic!("{what} not found: {var} is unset and none of [{}] exists; {hint}", tried.join(", "));
}

/// The Envoy binary (`$KVMESH_ENVOY`, else the one setup.sh links into the cache).
pub fn envoy_binary() -> PathBuf {
    locate("KVMESH_ENVOY", "Envoy", &[cache_dir().join("bin/envoy")], SETUP_HINT)
}

/// The nats-server binary (`$KVMESH_NATS_SERVER`, else PATH, else Debian's /usr/sbin).
pub fn nats_server_binary() -> PathBuf {
    let mut fallbacks: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nats-server")).collect())
        .unwrap_or_default();
    fallbacks.push(PathBuf::from("/usr/sbin/nats-server"));
    locate("KVMESH_NATS_SERVER", "nats-server", &fallbacks, SETUP_HINT)
}

/// The filter module built by `make wasm` (`$KVMESH_FILTER_WASM`, else the default target dir).
pub fn filter_wasm() -> PathBuf {
    let target = env_path("CARGO_TARGET_DIR").unwrap_or_else(|| cache_dir().join("target"));
    locate(
        "KVMESH_FILTER_WASM",
        "the filter module kvmesh_filter.wasm",
        &[target.join("wasm32-wasip1/wasm/kvmesh_filter.wasm")],
        "run `make wasm` (`make test` does it first)",
    )
}

/// The filter's request path as an Envoy dynamic module (`filter-native`), as `make test` builds it
/// (`$KVMESH_FILTER_NATIVE`, else the default target dir's debug build).
pub fn filter_dynamic_module() -> PathBuf {
    let target = env_path("CARGO_TARGET_DIR").unwrap_or_else(|| cache_dir().join("target"));
    locate(
        "KVMESH_FILTER_NATIVE",
        "the dynamic module libkvmesh_filter_native.so",
        &[target.join("debug/libkvmesh_filter_native.so")],
        "run `cargo build -p kvmesh-filter-native` (`make test` does it first)",
    )
}

/// The tokenizer directory of `model` (`qwen3`, `llama3_1`) with its `tokenizer.json`.
pub fn tokenizer_dir(model: &str) -> PathBuf {
    let root = env_path("KVMESH_TOKENIZERS").unwrap_or_else(|| cache_dir().join("tokenizers"));
    let dir = root.join(model);
    if !dir.join("tokenizer.json").is_file() {
        panic!("tokenizer {model} not found: {} has no tokenizer.json; {SETUP_HINT}", dir.display());
    }
    dir
}

// ---- temporary directories -----------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop unless the test is failing (then
/// its path is printed so the logs can be read).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `kvmesh-<label>-<pid>-<n>` under the system temp dir.
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("kvmesh-{label}-{}-{n}", std::process::id()));
        // A leftover from an earlier run with a recycled pid is stale.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection (test failed)", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---- child processes -----------------------------------------------------------------------------

/// A child process in its own process group, with stdout and stderr in `<dir>/<name>.log`.
/// Dropping it stops the whole group: SIGTERM, then SIGKILL after a grace period.
pub struct Process {
    name: String,
    child: Child,
    /// Set once the child has been reaped; from then on its pid may be reused, so no more signals.
    status: Option<ExitStatus>,
    log: PathBuf,
    // Dropped after the child has been stopped (fields drop after Drop::drop runs).
    dir: TempDir,
}

impl Process {
    /// Spawns `cmd` with a fresh temp dir for its log.
    pub fn spawn(name: &str, cmd: Command) -> Process {
        Process::spawn_in(TempDir::new(name), name, cmd)
    }

    /// Spawns `cmd` with its log in `dir` (which may already hold its config files).
    pub fn spawn_in(dir: TempDir, name: &str, mut cmd: Command) -> Process {
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("dup log file {}: {e}", log.display()));
        // Own process group: a signal to the group reaches anything the child starts, and a Ctrl-C
        // in the terminal goes to cargo, not straight to the children (Drop stops them).
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Process { name: name.to_string(), child, status: None, log, dir }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's temp dir (its log and any files written for it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the child wrote to stdout and stderr so far.
    pub fn log_text(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The exit status if the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `ready` until it returns true; panics with the child's log if the child exits first or
    /// `timeout` passes.
    pub fn wait_ready(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if ready() {
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before {what}\n--- {} ---\n{}",
                    self.name,
                    self.log.display(),
                    self.log_text()
                );
            }
            if start.elapsed() >= timeout {
                panic!(
                    "{} not ready after {timeout:?}: {what}\n--- {} ---\n{}",
                    self.name,
                    self.log.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Kills the child's whole process group at once (SIGKILL, as a crash would) and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.signal_group(libc::SIGKILL);
        self.status = self.child.wait().ok();
    }

    /// True once the child has exited, without reaping it: while it is an unreaped zombie its pid
    /// (and so its process group id) cannot be reused, so signalling the group stays safe.
    fn exited_unreaped(&self) -> bool {
        // id_t is u32 on Linux, like Child::id.
        let pid: libc::id_t = self.child.id();
        // SAFETY: an all-zero siginfo_t is a valid value; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with WNOWAIT leaves it waitable for Child::wait.
        let rc = unsafe {
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
        };
        // SAFETY: si_pid is valid to read after a successful waitid (0 when nothing has exited).
        rc != 0 || unsafe { info.si_pid() } != 0
    }

    /// Sends `signal` to the child's process group; only called while the child is unreaped.
    fn signal_group(&self, signal: libc::c_int) {
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else { return };
        // SAFETY: kill(2) with a negative pid signals the process group the child leads (it was
        // spawned with process_group(0)); it touches no memory of ours.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_some() {
            // Already reaped (it exited on its own); its pid may belong to someone else by now.
            return;
        }
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while !self.exited_unreaped() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The leader is alive or a zombie, so the group id is still ours: clear out the whole group,
        // including anything the child started, then reap.
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

// ---- readiness probes ----------------------------------------------------------------------------

/// True once something accepts TCP connections on 127.0.0.1:`port`.
pub fn tcp_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&localhost(port), Duration::from_millis(200)).is_ok()
}

/// True once `GET path` on 127.0.0.1:`port` answers 200.
pub fn http_ok(port: u16, path: &str) -> bool {
    matches!(http::get(port, path), Ok(resp) if resp.status == 200)
}

/// Waits up to `timeout` for `probe` (no child to watch, e.g. an in-process server); panics naming
/// `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) {
    let start = Instant::now();
    while !probe() {
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Wraps an io result's error with `context`.
pub(crate) fn io_context<T>(result: io::Result<T>, context: impl FnOnce() -> String) -> io::Result<T> {
    result.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", context())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `pid` still runs (a zombie waiting for its reaper counts as gone).
    fn running(pid: u32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state is the field after the parenthesised command name.
            Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    #[test]
    fn drop_stops_the_child_and_its_children() {
        let dir = TempDir::new("harness");
        let pid_file = dir.path().join("grandchild.pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("sleep 60 & echo $! > {}; exec sleep 60", pid_file.display()));
        let mut process = Process::spawn_in(dir, "sleeper", cmd);
        let child = process.pid();
        process.wait_ready("the grandchild's pid file", READY_TIMEOUT, || {
            fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))
        });
        let grandchild: u32 =
            fs::read_to_string(&pid_file).expect("pid file").trim().parse().expect("pid in the pid file");
        assert!(running(child) && running(grandchild));

        drop(process);
        assert!(!running(child), "the child survived drop");
        wait_until("the grandchild to die", Duration::from_secs(5), || !running(grandchild));
    }

    #[test]
    fn readiness_failure_shows_the_childs_log() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo something went wrong >&2; exit 3");
        let mut process = Process::spawn("failing", cmd);
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            process.wait_ready("never", READY_TIMEOUT, || false)
        }))
        .expect_err("wait_ready must panic when the child exits");
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("exited") && message.contains("something went wrong"), "{message}");
    }

    #[test]
    fn free_ports_are_not_handed_out_twice() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
    }
}
