//! The kvmesh filter as an Envoy *dynamic module*: a native shared library Envoy (1.40; the PyPI
//! build too) loads through `envoy.filters.http.dynamic_modules`, beside the proxy-wasm module. It
//! runs the Wasm filter's own request path (`kvmesh_filter::flow`: headers held, body buffered,
//! routed, `x-gateway-destination-endpoint` set and a client's own dropped, JSON errors, the failure
//! mode, in-flight and prefill accounting, `usage` sampling, every request metric) on the same
//! plugin JSON, with Envoy's dynamic-module callbacks as its host, and without the Wasm machinery:
//! about half the Wasm filter's added latency (bench/README.md).
//!
//! Tokenizers load once per process: the static ones when Envoy loads the configuration (a bad one
//! is refused there), the control plane's on the module's connection thread ([`state`]). Each Envoy
//! worker thread forks its own router on its first request (its own caches, fleet view and recent
//! decisions, as one Wasm VM per thread has) and follows the relayed state. Metrics are the
//! configuration's, shared by every thread (Envoy's stats are thread-safe). Nothing here may panic
//! across the C boundary: every hook catches unwinding.
//!
//! The module is tied to Envoy's dynamic-module ABI (`abi.rs`, v0.2.0 of Envoy 1.40): build it for
//! the Envoy release it runs in.

mod abi;
mod state;

use std::borrow::Cow;
use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use kvmesh_filter::accuracy::AccuracyMetrics;
use kvmesh_filter::flow::{self, Request, Settings, Stream, Worker};
use kvmesh_filter::metrics::{Metrics, StreamMetrics};
use kvmesh_filter::router::Router;
use kvmesh_filter::stats::{MetricKind, StatsSink};
use kvmesh_filter::{FILTER_VERSION, FilterConfig};

use abi::*;
use state::{Connection, Link, ProcessStore, Routing, Shared, WorkerState};

/// Worker threads with a router of their own; a request on a thread past this passes unrouted.
const MAX_WORKERS: usize = 256;

/// One filter configuration (`filter_config` of the Envoy filter).
struct Config {
    /// The control plane's stream (with `control_plane.address`); first to go on destroy, since
    /// its thread updates this configuration's metrics and routers.
    _connection: Option<Connection>,
    filter: FilterConfig,
    /// The process's router (built when Envoy loads the configuration: the tokenizers loaded once
    /// per process), the worker threads' routers and the relayed state.
    shared: Arc<Shared>,
    metrics: Arc<Metrics<EnvoyStats>>,
    accuracy: AccuracyMetrics<EnvoyStats>,
}

impl Config {
    /// The state of the worker thread `filter` runs on, made there on its first request (a fork
    /// of the loaded router: no tokenizer load) (`None`: more worker threads than [`MAX_WORKERS`]).
    fn worker(&self, filter: FilterEnvoyPtr) -> Option<Thread<'_>> {
        // SAFETY: `filter` is the pointer Envoy passed to the running hook.
        let index = unsafe { envoy_dynamic_module_callback_http_filter_get_worker_index(filter) } as usize;
        let state = self.shared.workers.get(index)?.get_or_init(|| {
            let forked = self
                .shared
                .loaded
                .lock()
                .map_err(|_| "poisoned".to_owned())
                .and_then(|loaded| loaded.fork(&self.filter).map_err(|e| e.to_string()));
            let router = match forked {
                Ok(router) => {
                    let started = Instant::now();
                    let (routing, polled) =
                        Routing::new(router, self.filter.state.is_some(), &self.shared.store);
                    if let Some(polled) = polled {
                        self.metrics.state_polled(&polled, started.elapsed().as_micros() as u64);
                    }
                    Some(Mutex::new(routing))
                }
                Err(e) => {
                    log::error!("kvmesh dynamic module: worker {index} has no router: {e}");
                    None
                }
            };
            WorkerState { router, settings: Settings::new(&self.filter) }
        });
        Some(Thread { config: self, state })
    }
}

/// A worker thread's view: its router and settings, the configuration's metrics.
struct Thread<'a> {
    config: &'a Config,
    state: &'a WorkerState,
}

impl Thread<'_> {
    /// Records, on this Envoy thread, how long the connection thread's applies to this thread's
    /// router took (Envoy's histograms take values only on its own threads).
    fn record_apply_times(&self) {
        let Some(Ok(mut routing)) = self.state.router.as_ref().map(Mutex::lock) else { return };
        if let Some(times) = routing.take_apply_times() {
            drop(routing);
            for micros in times {
                self.config.metrics.state_apply_time(micros);
            }
        }
    }
}

impl Worker for Thread<'_> {
    type Stats = EnvoyStats;

    fn with_router<T>(&self, f: impl FnOnce(&mut Router) -> T) -> Option<T> {
        // Only this thread takes it; poisoned only if a hook panicked while routing.
        self.state.router.as_ref()?.lock().ok().map(|mut routing| f(&mut routing.router))
    }

    fn metrics(&self) -> &Metrics<EnvoyStats> {
        &self.config.metrics
    }

    fn accuracy(&self) -> &AccuracyMetrics<EnvoyStats> {
        &self.config.accuracy
    }

    fn settings(&self) -> &Settings {
        &self.state.settings
    }
}

/// The configuration's metrics in Envoy (`dynamicmodulescustom.<name>` in `/stats`).
struct EnvoyStats(ConfigEnvoyPtr);

// SAFETY: the pointer is Envoy's filter configuration, alive until `config_destroy` (after every
// filter made from it), and Envoy's stats are thread-safe.
unsafe impl Send for EnvoyStats {}
unsafe impl Sync for EnvoyStats {}

/// A metrics call's result as the sink's.
fn metrics_result(result: u32) -> Result<(), String> {
    if result == METRICS_SUCCESS { Ok(()) } else { Err(format!("metrics result {result}")) }
}

/// Envoy's counter, gauge and histogram updates share one signature.
type MetricUpdate = unsafe extern "C" fn(ConfigEnvoyPtr, usize, *mut ModuleBuffer, usize, u64) -> u32;

impl EnvoyStats {
    /// Applies `value` to metric `id` without labels through one of Envoy's update callbacks.
    fn update(&self, callback: MetricUpdate, id: u32, value: u64) -> Result<(), String> {
        // SAFETY: the configuration pointer is Envoy's (see the `Send`/`Sync` note); no labels.
        metrics_result(unsafe { callback(self.0, id as usize, std::ptr::null_mut(), 0, value) })
    }
}

impl StatsSink for EnvoyStats {
    fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let mut id = 0usize;
        let name = ModuleBuffer::of(name.as_bytes());
        let none = std::ptr::null_mut();
        // SAFETY: the configuration pointer is Envoy's; the name lives for the call; no labels.
        let result = unsafe {
            match kind {
                MetricKind::Counter => envoy_dynamic_module_callback_http_filter_config_define_counter(
                    self.0, name, none, 0, &mut id,
                ),
                MetricKind::Gauge => envoy_dynamic_module_callback_http_filter_config_define_gauge(
                    self.0, name, none, 0, &mut id,
                ),
                MetricKind::Histogram => envoy_dynamic_module_callback_http_filter_config_define_histogram(
                    self.0, name, none, 0, &mut id,
                ),
            }
        };
        (result == METRICS_SUCCESS).then(|| u32::try_from(id).ok()).flatten()
    }

    fn add(&self, id: u32, by: u64) -> Result<(), String> {
        self.update(envoy_dynamic_module_callback_http_filter_config_increment_counter, id, by)
    }

    fn set(&self, id: u32, value: u64) -> Result<(), String> {
        self.update(envoy_dynamic_module_callback_http_filter_config_set_gauge, id, value)
    }

    fn record(&self, id: u32, value: u64) -> Result<(), String> {
        self.update(envoy_dynamic_module_callback_http_filter_config_record_histogram_value, id, value)
    }
}

/// The current request, through Envoy's callbacks; valid only inside the hook it was made in.
struct EnvoyStream(FilterEnvoyPtr);

impl EnvoyStream {
    fn header(&self, header_type: u32, name: &str) -> Option<Cow<'_, str>> {
        let mut value = EnvoyBuffer::EMPTY;
        let mut count = 0usize;
        // SAFETY: the running hook's pointer; Envoy fills `value` with bytes valid during the hook,
        // which outlives this stream.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.0,
                header_type,
                ModuleBuffer::of(name.as_bytes()),
                &mut value,
                0,
                &mut count,
            )
        };
        // SAFETY: as above.
        found.then(|| std::str::from_utf8(unsafe { value.as_slice() }).ok().map(Cow::Borrowed)).flatten()
    }

    /// Calls `read` with the chunks of `types`, in order, as one slice: zero-copy for one chunk,
    /// else gathered in this thread's buffer (no allocation per request once it has grown).
    fn with_body<T>(&self, types: &[u32], read: impl FnOnce(&[u8]) -> T) -> T {
        SCRATCH.with_borrow_mut(|Scratch { chunks, body }| {
            chunks.clear();
            // SAFETY: the running hook's pointer; each chunk array is sized by Envoy's own count.
            unsafe {
                for &body_type in types {
                    let n = envoy_dynamic_module_callback_http_get_body_chunks_size(self.0, body_type);
                    if n == 0 {
                        continue;
                    }
                    let start = chunks.len();
                    chunks.resize(start + n, EnvoyBuffer::EMPTY);
                    let filled = chunks[start..].as_mut_ptr();
                    if !envoy_dynamic_module_callback_http_get_body_chunks(self.0, body_type, filled) {
                        chunks.truncate(start);
                    }
                }
            }
            chunks.retain(|c| c.length > 0);
            match chunks.as_slice() {
                [] => read(&[]),
                // SAFETY: inside the hook.
                [one] => read(unsafe { one.as_slice() }),
                many => {
                    body.clear();
                    for chunk in many {
                        // SAFETY: inside the hook.
                        body.extend_from_slice(unsafe { chunk.as_slice() });
                    }
                    read(body)
                }
            }
        })
    }

    /// The response body chunk just received, in bytes.
    fn response_body_size(&self) -> usize {
        // SAFETY: the running hook's pointer.
        unsafe { envoy_dynamic_module_callback_http_get_body_size(self.0, RECEIVED_RESPONSE_BODY) }
    }

    /// The request body buffered so far plus what the latest event brought (over HTTP/2 all of it
    /// can be in the latter), in bytes.
    fn request_body_size(&self) -> usize {
        // SAFETY: the running hook's pointer.
        unsafe {
            if envoy_dynamic_module_callback_http_received_buffered_request_body(self.0) {
                envoy_dynamic_module_callback_http_get_body_size(self.0, RECEIVED_REQUEST_BODY)
            } else {
                envoy_dynamic_module_callback_http_get_body_size(self.0, BUFFERED_REQUEST_BODY)
                    + envoy_dynamic_module_callback_http_get_body_size(self.0, RECEIVED_REQUEST_BODY)
            }
        }
    }
}

fn refused(what: &str) -> String {
    format!("Envoy refused to {what}")
}

impl Stream for EnvoyStream {
    fn request_header(&self, name: &str) -> Option<Cow<'_, str>> {
        self.header(REQUEST_HEADER, name)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), String> {
        // A null value removes the header.
        let value = value.map_or(ModuleBuffer::NULL, |v| ModuleBuffer::of(v.as_bytes()));
        // SAFETY: the running hook's pointer; the buffers live for the call.
        let set = unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.0,
                REQUEST_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        };
        set.then_some(()).ok_or_else(|| refused("set a request header"))
    }

    fn with_request_body<T>(&mut self, _size: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
        // SAFETY: the running hook's pointer.
        let resumed = unsafe { envoy_dynamic_module_callback_http_received_buffered_request_body(self.0) };
        // When the latest event *is* the buffered body (an earlier filter resumed it), read it once.
        let types: &[u32] =
            if resumed { &[RECEIVED_REQUEST_BODY] } else { &[BUFFERED_REQUEST_BODY, RECEIVED_REQUEST_BODY] };
        Ok(self.with_body(types, read))
    }

    fn send_response(&mut self, status: u16, body: &str) -> Result<(), String> {
        let (key, value) = (b"content-type", b"application/json");
        let mut headers = [ModuleHttpHeader {
            key_ptr: key.as_ptr(),
            key_length: key.len(),
            value_ptr: value.as_ptr(),
            value_length: value.len(),
        }];
        // SAFETY: the running hook's pointer; everything passed lives for the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.0,
                u32::from(status),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(body.as_bytes()),
                ModuleBuffer::of(b"kvmesh_rejected"),
            )
        };
        Ok(())
    }

    fn response_header(&self, name: &str) -> Option<Cow<'_, str>> {
        self.header(RESPONSE_HEADER, name)
    }

    fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), String> {
        // SAFETY: the running hook's pointer; the buffers live for the call.
        let added = unsafe {
            envoy_dynamic_module_callback_http_add_header(
                self.0,
                RESPONSE_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        };
        added.then_some(()).ok_or_else(|| refused("add a response header"))
    }

    fn with_response_body<T>(&mut self, _size: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
        Ok(self.with_body(&[RECEIVED_RESPONSE_BODY], read))
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }
}

/// A worker thread's reusable buffers for reading bodies.
#[derive(Default)]
struct Scratch {
    /// The chunk list Envoy fills.
    chunks: Vec<EnvoyBuffer>,
    /// A body that came in several chunks, gathered.
    body: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One request: its configuration and its state in the request path.
struct Filter {
    config: *const Config,
    request: Request,
}

/// The `log` crate's records (the request path's) into Envoy's log; debug is compiled in but off.
struct EnvoyLog;

impl log::Log for EnvoyLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => LOG_ERROR,
            log::Level::Warn => LOG_WARN,
            log::Level::Info => LOG_INFO,
            log::Level::Debug | log::Level::Trace => LOG_DEBUG,
        };
        let message = record.args().to_string();
        // SAFETY: the message lives for the call.
        unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
    }

    fn flush(&self) {}
}

static LOGGER: EnvoyLog = EnvoyLog;

/// Runs a hook body; a panic becomes `fallback` instead of unwinding into Envoy.
fn guarded<T>(fallback: T, hook: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(hook)).unwrap_or_else(|_| {
        log::error!("kvmesh dynamic module: a hook panicked; request passed on");
        fallback
    })
}

/// Runs `f` with the request path's pieces for this hook; `fallback` without a worker state.
///
/// # Safety
/// `module` is a live pointer from `filter_new`; Envoy runs one hook of a stream at a time.
unsafe fn with_request<T: Copy>(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    fallback: T,
    f: impl FnOnce(&mut Request, &Thread<'_>, &mut EnvoyStream) -> T,
) -> T {
    // SAFETY: per the contract above.
    let filter = unsafe { &mut *(module as *mut Filter) };
    guarded(fallback, || {
        // SAFETY: Envoy destroys a configuration only after every filter made from it.
        let config: &Config = unsafe { &*filter.config };
        match config.worker(envoy) {
            Some(thread) => f(&mut filter.request, &thread, &mut EnvoyStream(envoy)),
            None => fallback,
        }
    })
}

// ---- the hooks Envoy 1.40 resolves (all 21 are required, used or not) ----

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    ABI_VERSION.as_ptr()
}

/// # Safety
/// Called by Envoy with a configuration pointer and two buffers valid for the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ConfigModulePtr {
    guarded(std::ptr::null(), || {
        // Info: the per-request detail is at debug, off unless this is raised.
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
        // SAFETY: valid for this call; copied by the parser.
        let bytes = unsafe { config.as_slice() };
        let filter = match FilterConfig::from_bytes(Some(bytes)) {
            Ok(filter) => filter,
            Err(e) => {
                log::error!("kvmesh dynamic module: {e}");
                return std::ptr::null();
            }
        };
        if filter.is_state_service() {
            log::error!(
                "kvmesh dynamic module: `control_plane.cluster` is the Wasm state service's; the native \
                 module connects to the control plane itself (`control_plane.address`)"
            );
            return std::ptr::null();
        }
        let started = Instant::now();
        let loaded = match Router::new(&filter) {
            Ok(router) => router,
            Err(e) => {
                log::error!("kvmesh dynamic module: {e}");
                return std::ptr::null();
            }
        };
        // The Wasm filter's line, so the benchmark reads both alike.
        log::info!(
            "kvmesh filter {FILTER_VERSION} configured (dynamic module): {} static models, {} static workers, loaded in {} ms",
            loaded.model_count(),
            loaded.worker_count(),
            started.elapsed().as_millis()
        );
        let shared = Arc::new(Shared {
            store: ProcessStore::default(),
            loaded: Mutex::new(loaded),
            workers: (0..MAX_WORKERS).map(|_| OnceLock::new()).collect(),
        });
        // Every metric is defined before the connection thread starts: Envoy appends a definition
        // to the lists that updates from that thread read.
        let metrics = Arc::new(Metrics::define(EnvoyStats(config_envoy)));
        let accuracy = AccuracyMetrics::define(EnvoyStats(config_envoy));
        metrics.model_loaded_n(shared.loaded.lock().map_or(0, |r| r.model_count()));
        let connection = match filter.control_plane.as_ref().and_then(|cp| Some((cp, cp.address.clone()?))) {
            None => None,
            Some((cp, address)) => {
                let link = Link {
                    address,
                    node: cp.node.clone(),
                    retry: Duration::from_millis(cp.retry_ms),
                    assets_timeout: Duration::from_millis(cp.assets_timeout_ms),
                    metrics: StreamMetrics::define(EnvoyStats(config_envoy)),
                    filter_metrics: Arc::clone(&metrics),
                };
                match state::connect(link, Arc::clone(&shared)) {
                    Ok(connection) => Some(connection),
                    Err(e) => {
                        log::error!("kvmesh dynamic module: cannot start the control plane's thread: {e}");
                        return std::ptr::null();
                    }
                }
            }
        };
        let config = Config { _connection: connection, filter, shared, metrics, accuracy };
        Box::into_raw(Box::new(config)) as ConfigModulePtr
    })
}

/// # Safety
/// `config` is a pointer `config_new` returned, destroyed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ConfigModulePtr) {
    if !config.is_null() {
        // SAFETY: made by `Box::into_raw` in `config_new`.
        drop(unsafe { Box::from_raw(config as *mut Config) });
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ConfigModulePtr,
    _filter_envoy: FilterEnvoyPtr,
) -> FilterModulePtr {
    let filter = Filter { config: config as *const Config, request: Request::new(0) };
    Box::into_raw(Box::new(filter)) as FilterModulePtr
}

/// # Safety
/// `filter` is a pointer `filter_new` returned, destroyed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: FilterModulePtr) {
    if !filter.is_null() {
        // SAFETY: made by `Box::into_raw` in `filter_new`.
        drop(unsafe { Box::from_raw(filter as *mut Filter) });
    }
}

/// Maps the request path's answer to a status: `Stop` holds the headers, or buffers the body.
fn status(action: flow::Action, stop: u32) -> u32 {
    match action {
        flow::Action::Continue => CONTINUE,
        flow::Action::Stop => stop,
    }
}

/// # Safety
/// Envoy's pointers for a live stream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: per the hook's contract.
    unsafe {
        with_request(envoy, module, HEADERS_CONTINUE, |request, thread, stream| {
            thread.record_apply_times();
            status(request.on_request_headers(thread, stream, end_of_stream), HEADERS_STOP_ITERATION)
        })
    }
}

/// # Safety
/// Envoy's pointers for a live stream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: per the hook's contract.
    unsafe {
        with_request(envoy, module, BODY_CONTINUE, |request, thread, stream| {
            let size = stream.request_body_size();
            status(
                request.on_request_body(thread, stream, size, end_of_stream),
                BODY_STOP_ITERATION_AND_BUFFER,
            )
        })
    }
}

/// # Safety
/// Envoy's pointers for a live stream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: per the hook's contract.
    unsafe {
        with_request(envoy, module, CONTINUE, |request, thread, stream| {
            status(request.on_response_headers(thread, stream, end_of_stream), CONTINUE)
        })
    }
}

/// # Safety
/// Envoy's pointers for a live stream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: per the hook's contract.
    unsafe {
        with_request(envoy, module, CONTINUE, |request, thread, stream| {
            let size = stream.response_body_size();
            status(request.on_response_body(thread, stream, size, end_of_stream), CONTINUE)
        })
    }
}

/// # Safety
/// Envoy's pointers for a live stream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
) {
    // SAFETY: per the hook's contract.
    unsafe { with_request(envoy, module, (), |request, thread, _| request.on_end(thread)) }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _callout_id: u64,
    _result: u32,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *mut EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _event_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) {
}

// Envoy's worker threads each build and use their own router, and the main thread drops them with
// the configuration: a router must be `Send` (checked when this compiles).
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Router>();
};
