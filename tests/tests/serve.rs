//! `kvmesh serve` as a user runs it: a whole simulated fleet (nats-server, control plane, two sims
//! with their agents, Envoy with the filter) comes up on free ports and prints `ready`; requests
//! through Envoy are routed where the control plane's explain API says the prefix is cached, and a
//! repeated prefix is served from cache; a worker killed after `ready` is reported and the rest keep
//! serving; SIGINT stops everything and leaves no process behind.
//! Also: a taken port or a missing program fails before anything starts, with a clear message; and
//! `--dry-run` prints the real engines' command lines with the flags that make them publish KV
//! events and take part in prefill/decode disaggregation.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use kvmesh_tests::fleet::{MODEL, kvmesh_binary};
use kvmesh_tests::{Process, TempDir, free_port, http, tokenizer_dir, wait_until};

/// How long the whole fleet may take to print `ready` on a slow, shared machine.
const SERVE_READY: Duration = Duration::from_secs(110);

/// `kvmesh serve` running in the background, started with `--verbose` so it names its children.
struct Serve {
    process: Process,
    port: u16,
    admin_port: u16,
    envoy_admin_port: u16,
}

impl Serve {
    fn start(run_dir: &TempDir) -> Serve {
        Serve::start_with(run_dir, &[])
    }

    /// Serve with `extra` flags.
    fn start_with(run_dir: &TempDir, extra: &[&std::ffi::OsStr]) -> Serve {
        let (port, admin_port) = (free_port(), free_port());
        let mut cmd = Command::new(kvmesh_binary());
        cmd.args(["serve", "--backend", "sim", "--workers", "2", "--model", MODEL])
            .arg("--tokenizer-dir")
            .arg(tokenizer_dir("qwen3"))
            .args(["--port", &port.to_string(), "--admin-port", &admin_port.to_string()])
            .args(["--envoy-concurrency", "1", "--filter-load-timeout", "20", "--sim-speedup", "20"])
            .args(["--sim-kv-blocks", "512", "--verbose"])
            .arg("--run-dir")
            .arg(run_dir.path())
            .args(extra);
        let mut process = Process::spawn("serve", cmd);
        let log_path = process.dir().join("serve.log");
        process.wait_ready("the `ready` line", SERVE_READY, || {
            std::fs::read_to_string(&log_path).is_ok_and(|log| log.lines().any(|l| l == "ready"))
        });
        let log = process.log_text();
        let envoy_admin_port = log
            .lines()
            .find_map(|l| l.strip_prefix("envoy admin  http://127.0.0.1:"))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no envoy admin line in\n{log}"));
        Serve { process, port, admin_port, envoy_admin_port }
    }

    /// The pids serve printed for its children.
    fn child_pids(&self) -> Vec<u32> {
        pids_in(&self.process.log_text())
    }

    /// The pid serve printed for child `name`.
    fn child_pid(&self, name: &str) -> u32 {
        let log = self.process.log_text();
        log.lines()
            .filter_map(|l| l.trim_start().strip_prefix(&format!("started {name} (pid ")))
            .find_map(|l| l.split(')').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no pid of {name} in\n{log}"))
    }
}

/// Pids in `started NAME (pid N): ...` lines.
fn pids_in(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.trim_start().strip_prefix("started "))
        .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
        .collect()
}

/// Whether `pid` runs (a zombie counts as gone).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Live processes whose process group is one of `groups` (serve starts each child as a group
/// leader, so this also finds anything a child started).
fn members_of(groups: &[u32]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
        // After the command name: state, ppid, pgrp, ...
        let fields: Vec<&str> = rest.split(' ').collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        if let Some(pgrp) = fields.get(2).and_then(|g| g.parse::<u32>().ok())
            && groups.contains(&pgrp)
        {
            found.push(head.to_owned());
        }
    }
    found
}

/// A chat body: a long system prompt (the shared prefix) and a user message.
fn chat(system: &str, user: &str) -> String {
    format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{user}"}}],"max_tokens":8}}"#
    )
}

/// A system prompt of about 600 tokens whose first words are unique to `topic`.
fn system_prompt(topic: &str) -> String {
    let mut s = format!("{topic}: you are a careful assistant for {topic}.");
    for i in 0..120 {
        s.push_str(&format!(" Rule {i} about {topic} says to answer briefly."));
    }
    s
}

/// The number after `"key":` in a JSON text (the tests crate has no JSON parser).
fn number_after(body: &str, key: &str) -> Option<u64> {
    let at = body.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = body[at..].trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The `overlaps` map of an explain answer: worker id -> blocks.
fn overlaps(explain: &str) -> HashMap<String, u64> {
    let Some(start) = explain.find("\"overlaps\":{") else { return HashMap::new() };
    let rest = &explain[start + 12..];
    let body = &rest[..rest.find('}').unwrap_or(0)];
    body.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once(':')?;
            Some((k.trim().trim_matches('"').to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The chosen worker's id in an explain answer.
fn chosen(explain: &str) -> Option<String> {
    let at = explain.find("\"chosen\":{\"id\":\"")? + 16;
    Some(explain[at..].split('"').next()?.to_owned())
}

/// Requests Envoy sent to each worker port so far.
fn requests_per_port(envoy_admin: u16) -> HashMap<u16, u64> {
    let text = http::get(envoy_admin, "/clusters").expect("GET /clusters").message.body_text();
    let mut out = HashMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split("::").collect();
        if let ["workers", addr, "rq_total", n] = parts.as_slice()
            && let (Some(port), Ok(n)) = (addr.rsplit(':').next().and_then(|p| p.parse().ok()), n.parse())
        {
            out.insert(port, n);
        }
    }
    out
}

/// The HTTP port of worker `id`, from the control plane's `/v1/workers`.
fn worker_port(admin: u16, id: &str) -> u16 {
    let text = http::get(admin, "/v1/workers").expect("GET /v1/workers").message.body_text();
    // One object per worker, each starting with its address (keys are sorted).
    text.split("{\"address\":\"127.0.0.1:")
        .skip(1)
        .find(|worker| worker.contains(&format!("\"id\":\"{id}\"")))
        .and_then(|worker| worker.split('"').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no address of {id} in {text}"))
}

#[test]
fn serve_routes_through_envoy_and_stops_cleanly_on_sigint() {
    let run_dir = TempDir::new("serve-run");
    let mut serve = Serve::start(&run_dir);
    let log = serve.process.log_text();
    assert!(log.contains("endpoint     http://127.0.0.1:"), "{log}");
    let children = serve.child_pids();
    // nats-server, control plane, 2 agents, 2 sims, Envoy.
    assert_eq!(children.len(), 7, "{log}");

    // A first request through Envoy lands somewhere and fills that worker's cache.
    let body = chat(&system_prompt("astronomy"), "Which planet is largest?");
    let post = |body: &str| {
        http::post(
            serve.port,
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .expect("POST through Envoy")
    };
    let first = post(&body);
    assert_eq!(first.status, 200, "{}", first.message.body_text());

    // The engine's KV events reach the control plane: explain sees the prefix on one worker and
    // would route the same request there.
    let mut explain = String::new();
    wait_until("explain to see the cached prefix", Duration::from_secs(20), || {
        let resp = http::post(
            serve.admin_port,
            "/v1/explain",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .expect("POST /v1/explain");
        explain = resp.message.body_text();
        resp.status == 200 && overlaps(&explain).values().any(|&n| n > 0)
    });
    let holder = overlaps(&explain).into_iter().max_by_key(|(_, n)| *n).map(|(id, _)| id).expect("a holder");
    assert_eq!(chosen(&explain).as_deref(), Some(holder.as_str()), "explain: {explain}");
    let holder_port = worker_port(serve.admin_port, &holder);

    // The same prefix again goes to that worker and is served from its cache.
    let before = requests_per_port(serve.envoy_admin_port);
    let again = post(&chat(&system_prompt("astronomy"), "And which one is smallest?"));
    assert_eq!(again.status, 200, "{}", again.message.body_text());
    let text = again.message.body_text();
    assert!(number_after(&text, "cached_tokens").is_some_and(|n| n >= 512), "no cache hit: {text}");
    let after = requests_per_port(serve.envoy_admin_port);
    let went_to: Vec<u16> = after
        .iter()
        .filter(|(port, n)| before.get(port).copied().unwrap_or(0) < **n)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(
        went_to,
        vec![holder_port],
        "explain chose {holder} ({holder_port}); Envoy sent it to {went_to:?}"
    );

    // The worker holding the prefix dies after `ready`: serve says so and keeps running, and
    // requests with that prefix (routed to it until its heartbeat expires) still answer 200.
    let dead = serve.child_pid(&holder);
    // SAFETY: kill(2) on a child of our child, which serve has not reaped (it waits for the exit).
    unsafe {
        libc::kill(libc::pid_t::try_from(dead).expect("pid fits"), libc::SIGKILL);
    }
    let log_path = serve.process.dir().join("serve.log");
    wait_until("serve to report the dead worker", Duration::from_secs(10), || {
        std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains(&format!("{holder} exited (")))
    });
    for i in 0..5 {
        let resp = post(&chat(&system_prompt("astronomy"), &format!("Still there? {i}")));
        assert_eq!(resp.status, 200, "{}", resp.message.body_text());
    }
    let log = serve.process.log_text();
    assert!(serve.process.exited().is_none(), "serve stopped after a worker died:\n{log}");
    assert!(log.contains("routing continues on the others"), "{log}");
    assert!(!running(dead), "the killed worker runs");

    // Ctrl-C: serve stops every child and exits cleanly.
    let pid = libc::pid_t::try_from(serve.process.pid()).expect("pid fits");
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = serve.process.wait_exit(Duration::from_secs(20)).expect("serve exits after SIGINT");
    let log = serve.process.log_text();
    assert!(status.success(), "serve exited with {status}:\n{log}");
    assert!(log.contains("kvmesh serve: stopped"), "{log}");
    for child in &children {
        assert!(!running(*child), "child {child} survived serve:\n{log}");
    }
    let left = members_of(&children);
    assert!(left.is_empty(), "processes left in serve's children's groups: {left:?}");
}

/// `--filter native`: Envoy runs the native module, which follows the control plane itself (no
/// state service): it loads the model once, and a prefix the engine's events placed is routed back
/// to its worker and served from its cache.
#[test]
fn serve_with_the_native_filter_routes_on_the_control_plane() {
    let run_dir = TempDir::new("serve-native");
    let module = kvmesh_tests::filter_dynamic_module();
    let mut serve = Serve::start_with(
        &run_dir,
        &["--filter".as_ref(), "native".as_ref(), "--filter-native".as_ref(), module.as_os_str()],
    );
    let log = serve.process.log_text();
    assert!(log.contains("loaded (native module, once per Envoy)"), "{log}");
    let envoy_yaml = std::fs::read_to_string(run_dir.path().join("envoy.yaml")).expect("read envoy.yaml");
    assert!(envoy_yaml.contains("envoy.filters.http.dynamic_modules"), "{envoy_yaml}");
    assert!(!envoy_yaml.contains("envoy.bootstrap.wasm"), "no state service with the native filter");

    let post = |body: &str| kvmesh_tests::fleet::post_chat(serve.port, body);
    let first = post(&chat(&system_prompt("geology"), "What is basalt?"));
    assert_eq!(first.status, 200, "{}", first.message.body_text());
    // Once the engine's KV events reached the control plane and its stream the module, the same
    // prefix goes back to that worker and hits its cache.
    let mut text = String::new();
    wait_until("a request with the prefix served from cache", Duration::from_secs(20), || {
        let again = post(&chat(&system_prompt("geology"), "And granite?"));
        text = again.message.body_text();
        again.status == 200 && number_after(&text, "cached_tokens").is_some_and(|n| n >= 512)
    });
    let stats = kvmesh_tests::fleet::filter_stats(serve.envoy_admin_port);
    let routed = kvmesh_tests::fleet::filter_metric(&stats, "kvmesh_filter_routed_by_kv_aware_total");
    assert!(routed >= Some(2), "{stats}");
    let fallbacks = kvmesh_tests::fleet::filter_metric(&stats, "kvmesh_filter_fallbacks_total");
    assert_eq!(fallbacks.unwrap_or(0), 0, "every request routed on the control plane's state: {stats}");
    assert_eq!(
        kvmesh_tests::fleet::filter_metric(&stats, "kvmesh_filter_state_stream_connected"),
        Some(1),
        "{stats}"
    );

    let pid = libc::pid_t::try_from(serve.process.pid()).expect("pid fits");
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = serve.process.wait_exit(Duration::from_secs(20)).expect("serve exits after SIGINT");
    assert!(status.success(), "serve exited with {status}:\n{}", serve.process.log_text());
}

#[test]
fn a_taken_port_fails_before_anything_starts() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().expect("its address").port();
    let mut cmd = Command::new(kvmesh_binary());
    cmd.args(["serve", "--backend", "sim", "--workers", "1", "--verbose"])
        .arg("--tokenizer-dir")
        .arg(tokenizer_dir("qwen3"))
        .args(["--port", &port.to_string(), "--admin-port", &free_port().to_string()]);
    let mut serve = Process::spawn("serve-port-clash", cmd);
    let status = serve.wait_exit(Duration::from_secs(30)).expect("serve gives up");
    let log = serve.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains(&format!("port {port} (--port, Envoy's listener) is already in use")), "{log}");
    assert!(pids_in(&log).is_empty(), "serve started processes before checking its ports:\n{log}");
}

#[test]
fn a_missing_program_fails_with_a_clear_message() {
    let mut cmd = Command::new(kvmesh_binary());
    cmd.args(["serve", "--backend", "sim", "--workers", "1", "--verbose"])
        .arg("--tokenizer-dir")
        .arg(tokenizer_dir("qwen3"))
        .args(["--port", &free_port().to_string(), "--admin-port", &free_port().to_string()])
        .env("KVMESH_NATS_SERVER", "/nonexistent/kvmesh/nats-server");
    let mut serve = Process::spawn("serve-no-nats", cmd);
    let status = serve.wait_exit(Duration::from_secs(30)).expect("serve gives up");
    let log = serve.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("nats-server not found (/nonexistent/kvmesh/nats-server)"), "{log}");
    assert!(pids_in(&log).is_empty(), "{log}");
}

/// `kvmesh serve` with one simulated worker, in its own process, told to name its children.
fn serve_one_worker(name: &str, run_dir: &TempDir, extra: &[&str]) -> Process {
    let mut cmd = Command::new(kvmesh_binary());
    cmd.args(["serve", "--backend", "sim", "--workers", "1", "--verbose", "--envoy-concurrency", "1"])
        .arg("--tokenizer-dir")
        .arg(tokenizer_dir("qwen3"))
        .args(["--port", &free_port().to_string(), "--admin-port", &free_port().to_string()])
        .arg("--run-dir")
        .arg(run_dir.path())
        .args(extra);
    Process::spawn(name, cmd)
}

/// Asserts that no child serve named is left, nor anything in their process groups.
fn assert_nothing_left(log: &str) {
    let children = pids_in(log);
    assert!(!children.is_empty(), "serve named no children:\n{log}");
    for child in &children {
        assert!(!running(*child), "child {child} survived serve:\n{log}");
    }
    let left = members_of(&children);
    assert!(left.is_empty(), "processes left in serve's children's groups: {left:?}\n{log}");
}

#[test]
fn sigint_during_start_up_stops_what_was_started() {
    let run_dir = TempDir::new("serve-interrupted");
    let mut serve = serve_one_worker("serve-interrupted", &run_dir, &[]);
    let log_path = serve.dir().join("serve-interrupted.log");
    // The control plane is up; the worker and Envoy are still starting.
    serve.wait_ready("the control plane to be ready", SERVE_READY, || {
        std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("ready  control plane"))
    });
    let pid = libc::pid_t::try_from(serve.pid()).expect("pid fits");
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = serve.wait_exit(Duration::from_secs(20)).expect("serve exits after SIGINT");
    let log = serve.log_text();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("stopped by SIGINT during start-up"), "{log}");
    assert_nothing_left(&log);
}

#[test]
fn a_worker_failing_at_start_up_stops_the_rest_and_shows_its_log() {
    let run_dir = TempDir::new("serve-failing");
    let mut serve = serve_one_worker("serve-failing", &run_dir, &["--engine-arg=--no-such-sim-flag"]);
    let status = serve.wait_exit(SERVE_READY).expect("serve gives up");
    let log = serve.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("worker-0 exited unexpectedly"), "{log}");
    assert!(log.contains("--no-such-sim-flag"), "the worker's own error is not shown:\n{log}");
    assert_nothing_left(&log);
}

// ---- --dry-run -----------------------------------------------------------------------------------

/// The script `kvmesh serve --dry-run` prints for `flags`.
fn dry_run(flags: &[&str]) -> String {
    let out = Command::new(kvmesh_binary())
        .args(["serve", "--dry-run", "--model", MODEL])
        .arg("--tokenizer-dir")
        .arg(tokenizer_dir("qwen3"))
        .args(flags)
        .output()
        .expect("run kvmesh serve --dry-run");
    let script = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(script.trim_end().ends_with("wait"), "{script}");
    script
}

/// The command line printed under `# name`.
fn command<'a>(script: &'a str, name: &str) -> &'a str {
    let marker = format!("\n# {name}\n");
    let at = script.find(&marker).unwrap_or_else(|| panic!("no {name} in\n{script}")) + marker.len();
    script[at..].lines().next().expect("a command line")
}

/// The generated file written to a path ending in `suffix`.
fn file<'a>(script: &'a str, suffix: &str) -> &'a str {
    let at = script
        .find(&format!("{suffix} <<'KVMESH_EOF'\n"))
        .unwrap_or_else(|| panic!("no {suffix} in\n{script}"));
    let rest = &script[at..];
    let start = rest.find('\n').expect("a heredoc") + 1;
    &rest[start..rest.find("\nKVMESH_EOF").expect("heredoc end")]
}

/// The single-quoted argument after `flag` in a command line.
fn quoted_arg<'a>(line: &'a str, flag: &str) -> &'a str {
    let at =
        line.find(&format!("{flag} '")).unwrap_or_else(|| panic!("no {flag} in {line}")) + flag.len() + 2;
    &line[at..at + line[at..].find('\'').expect("closing quote")]
}

#[test]
fn dry_run_vllm_publishes_kv_events_and_splits_with_nixl() {
    let script = dry_run(&["--backend", "vllm", "--workers", "2"]);
    let worker = command(&script, "worker-0");
    assert!(worker.contains("vllm serve Qwen/Qwen3-8B --host 127.0.0.1 --port "), "{worker}");
    for flag in ["--enable-prefix-caching", "--enable-prompt-tokens-details", "--block-size 16"] {
        assert!(worker.contains(flag), "{flag} missing: {worker}");
    }
    let events = quoted_arg(worker, "--kv-events-config");
    for part in [r#""enable_kv_cache_events":true"#, r#""publisher":"zmq""#, r#""topic":"kv-events""#] {
        assert!(events.contains(part), "{part} missing: {events}");
    }
    assert!(events.contains(r#""replay_endpoint":"tcp://127.0.0.1:"#), "{events}");
    // The engine's publisher connects to the socket its agent binds.
    let endpoint =
        events.split(r#""endpoint":""#).nth(1).and_then(|e| e.split('"').next()).expect("an endpoint");
    let agent = command(&script, "agent-worker-0");
    assert!(agent.contains(&format!("--kv-events-bind {endpoint}")), "{agent}");
    assert!(agent.contains("--engine vllm") && agent.contains("--role both"), "{agent}");
    assert!(!worker.contains("--kv-transfer-config"), "{worker}");
    assert!(worker.starts_with("CUDA_VISIBLE_DEVICES=0 "), "{worker}");
    assert!(command(&script, "worker-1").starts_with("CUDA_VISIBLE_DEVICES=1 "), "{script}");

    let split = dry_run(&["--backend", "vllm", "--prefill", "1", "--decode", "1"]);
    for name in ["prefill-0", "decode-0"] {
        let line = command(&split, name);
        assert_eq!(
            quoted_arg(line, "--kv-transfer-config"),
            r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#,
            "{line}"
        );
        assert!(line.contains("VLLM_NIXL_SIDE_CHANNEL_PORT="), "{line}");
    }
    assert!(command(&split, "agent-prefill-0").contains("--role prefill"), "{split}");
    assert!(command(&split, "agent-decode-0").contains("--role decode"), "{split}");
}

#[test]
fn dry_run_vllm_on_cpus_runs_the_module_of_a_local_model() {
    let model_dir = tokenizer_dir("qwen3");
    let model_dir = model_dir.to_str().expect("a UTF-8 path");
    let script = dry_run(&[
        "--backend",
        "vllm",
        "--device",
        "cpu",
        "--workers",
        "2",
        "--vllm-python",
        "/opt/vllm-venv/bin/python",
        "--model-path",
        model_dir,
        "--kv-cache-bytes",
        "5242880",
    ]);
    let worker = command(&script, "worker-0");
    let module = format!(
        "/opt/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server --model {model_dir} \
         --served-model-name {MODEL} --host 127.0.0.1 --port "
    );
    assert!(worker.contains(&module), "{worker}");
    for flag in [
        "--block-size 32",
        "--dtype float32",
        "--enforce-eager",
        "--kv-cache-memory-bytes 5242880",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
    ] {
        assert!(worker.contains(flag), "{flag} missing: {worker}");
    }
    for var in ["VLLM_HOST_IP=127.0.0.1 ", "VLLM_CPU_OMP_THREADS_BIND=0 ", "HF_HUB_OFFLINE=1 "] {
        assert!(worker.starts_with(var) || worker.contains(&format!(" {var}")), "{var} missing: {worker}");
    }
    assert!(worker.contains("TMPDIR=") && worker.contains("VLLM_CACHE_ROOT="), "{worker}");
    assert!(!worker.contains("CUDA_VISIBLE_DEVICES"), "{worker}");
    if std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2) {
        assert!(command(&script, "worker-1").contains("VLLM_CPU_OMP_THREADS_BIND=1 "), "{script}");
    }
    let agent = command(&script, "agent-worker-0");
    assert!(agent.contains("--block-size 32") && agent.contains("--gpus none"), "{agent}");
    assert!(script.contains("mkdir -p ") && script.contains("/worker-1/tmp"), "{script}");
}

#[test]
fn cpu_flags_need_the_vllm_backend() {
    let out = Command::new(kvmesh_binary())
        .args(["serve", "--dry-run", "--backend", "sglang", "--device", "cpu"])
        .output()
        .expect("run kvmesh serve --dry-run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--device cpu applies to --backend vllm only"), "{stderr}");
}

#[test]
fn dry_run_sglang_publishes_kv_events_and_names_its_disaggregation_mode() {
    let script = dry_run(&["--backend", "sglang", "--workers", "1"]);
    let worker = command(&script, "worker-0");
    assert!(worker.contains("-m sglang.launch_server --model-path Qwen/Qwen3-8B"), "{worker}");
    for flag in ["--page-size 16", "--enable-metrics", "--enable-cache-report"] {
        assert!(worker.contains(flag), "{flag} missing: {worker}");
    }
    let events = quoted_arg(worker, "--kv-events-config");
    assert!(
        events.contains(r#""publisher":"zmq""#) && events.contains(r#""endpoint":"tcp://127.0.0.1:"#),
        "{events}"
    );
    assert!(!worker.contains("--disaggregation-mode"), "{worker}");
    assert!(command(&script, "agent-worker-0").contains("--engine sglang"), "{script}");

    let split = dry_run(&["--backend", "sglang", "--prefill", "1", "--decode", "1"]);
    let prefill = command(&split, "prefill-0");
    assert!(prefill.contains("--disaggregation-mode prefill"), "{prefill}");
    assert!(prefill.contains("--disaggregation-bootstrap-port "), "{prefill}");
    assert!(prefill.contains("--disaggregation-transfer-backend nixl"), "{prefill}");
    let decode = command(&split, "decode-0");
    assert!(decode.contains("--disaggregation-mode decode"), "{decode}");
    assert!(decode.contains("--kv-events-config"), "{decode}");
}

#[test]
fn dry_run_trtllm_enables_kv_events_and_iteration_stats() {
    let script = dry_run(&["--backend", "trtllm", "--workers", "1"]);
    let worker = command(&script, "worker-0");
    assert!(worker.contains("trtllm-serve Qwen/Qwen3-8B --host 127.0.0.1 --port "), "{worker}");
    assert!(worker.contains("--backend pytorch"), "{worker}");
    assert!(
        worker.contains("--extra_llm_api_options ") && worker.contains("trtllm-worker-0.yaml"),
        "{worker}"
    );
    let options = file(&script, "trtllm-worker-0.yaml");
    for line in [
        "enable_iter_perf_stats: true",
        "  enable_block_reuse: true",
        "  event_buffer_max_size: 1024",
        "  tokens_per_block: 32",
    ] {
        assert!(options.lines().any(|l| l == line), "{line:?} missing:\n{options}");
    }
    assert!(!options.contains("cache_transceiver_config"), "{options}");
    let agent = command(&script, "agent-worker-0");
    assert!(agent.contains("--engine trtllm") && agent.contains("--kv-events http://127.0.0.1:"), "{agent}");

    let split = dry_run(&["--backend", "trtllm", "--prefill", "1", "--decode", "1"]);
    let prefill = file(&split, "trtllm-prefill-0.yaml");
    assert!(prefill.contains("cache_transceiver_config:\n  backend: NIXL"), "{prefill}");
    assert!(prefill.lines().any(|l| l == "disable_overlap_scheduler: true"), "{prefill}");
    let decode = file(&split, "trtllm-decode-0.yaml");
    assert!(
        decode.contains("cache_transceiver_config:") && !decode.contains("disable_overlap_scheduler"),
        "{decode}"
    );
}

#[test]
fn dry_run_sim_prints_the_envoy_bootstrap_and_starts_nothing() {
    let run_dir = TempDir::new("serve-dry-run");
    let dir = run_dir.path().join("never-created");
    let script = dry_run(&["--workers", "2", "--run-dir", dir.to_str().expect("a UTF-8 temp path")]);
    assert!(!dir.exists(), "a dry run created {}", dir.display());
    let bootstrap = file(&script, "envoy.yaml");
    for part in [
        "per_connection_buffer_limit_bytes: 8388608",
        "allow_on_headers_stop_iteration: true",
        "failure_policy: FAIL_OPEN",
        "singleton: true",
        "name: kvmesh_control_plane",
        "http2_protocol_options: {}",
        "override_host_sources: [ { header: x-gateway-destination-endpoint } ]",
        "retry_on: connect-failure,refused-stream,reset",
        r#"value: "{\"accuracy_sample_every\":1,\"state\":{}}""#,
    ] {
        assert!(bootstrap.contains(part), "{part} missing:\n{bootstrap}");
    }
    assert!(command(&script, "worker-1").contains(" sim --engine vllm "), "{script}");
    assert!(command(&script, "control-plane").contains("KVMESH_ADMIN_TOKEN="), "{script}");
}

#[test]
fn dry_run_carries_the_routing_policy_to_the_control_plane_and_the_filter() {
    let dir = TempDir::new("serve-config");
    let config = dir.path().join("cp.yaml");
    std::fs::write(
        &config,
        format!("models:\n- name: {MODEL}\n  routing:\n    policy: round-robin\n    fallbacks: 1\n"),
    )
    .expect("write the config");
    let script = dry_run(&["--config", config.to_str().expect("a UTF-8 temp path")]);
    let cp = file(&script, "control-plane.yaml");
    assert!(cp.contains("policy: round-robin") && cp.contains("fallbacks: 1"), "{cp}");
    let bootstrap = file(&script, "envoy.yaml");
    assert!(bootstrap.contains(r#"\"policy\":\"round-robin\""#), "{bootstrap}");

    let script = dry_run(&["--policy", "load-only"]);
    assert!(file(&script, "control-plane.yaml").contains("policy: load-only"), "{script}");
    // Without a policy given, the filter follows the control plane's.
    let script = dry_run(&[]);
    assert!(
        file(&script, "envoy.yaml").contains(r#"value: "{\"accuracy_sample_every\":1,\"state\":{}}""#),
        "{script}"
    );
}
