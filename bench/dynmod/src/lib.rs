//! A benchmark target, not a delivery form: the kvmesh filter's request path built as an Envoy
//! *dynamic module* (a native shared library Envoy 1.40 loads through
//! `envoy.filters.http.dynamic_modules`) instead of a proxy-wasm module, to measure what the Wasm
//! machinery itself costs per request (bench/README.md, proposal 7).
//!
//! It runs the same `kvmesh_filter::router::Router` on the same plugin JSON as the Wasm filter
//! (static workers and models; no control plane), with the same request path: headers held, body
//! buffered, routed, `x-gateway-destination-endpoint` set (a client's own dropped), JSON errors for
//! rejected requests, the failure mode for the filter's own failures, in-flight accounting until
//! the stream ends, and the decision counters and histogram the benchmark reads. What it leaves out: the control
//! plane's state, `usage` sampling, the response header and the other metrics.
//!
//! One router per Envoy worker thread (as one Wasm VM per thread), built on the thread's first
//! request. Nothing here may panic across the C boundary: every hook catches unwinding.

mod abi;

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kvmesh_core::request::{Endpoint, openai_error_body};
use kvmesh_filter::router::{Routed, Router};
use kvmesh_filter::{DESTINATION_HEADER, FailureMode, FilterConfig};

use abi::*;

/// Worker threads with a router of their own; a request on a thread past this passes unrouted.
const MAX_WORKERS: usize = 256;

/// One filter configuration (`filter_config` of the Envoy filter).
struct Config {
    filter: FilterConfig,
    /// One router per Envoy worker thread, by `get_worker_index`, built on first use.
    routers: Box<[OnceLock<Option<Mutex<Router>>>]>,
    /// The benchmark's metrics (ids from Envoy).
    routed_total: usize,
    decision_us_total: usize,
    decision_us: usize,
    fallbacks_total: usize,
}

impl Config {
    /// The router of the worker thread `filter` runs on, built there on first use (`None`: that
    /// worker's router failed to build, or there are too many workers).
    fn router(&self, filter: FilterEnvoyPtr) -> Option<&Mutex<Router>> {
        // SAFETY: `filter` is the pointer Envoy passed to the running hook.
        let worker = unsafe { envoy_dynamic_module_callback_http_filter_get_worker_index(filter) } as usize;
        let slot = self.routers.get(worker)?;
        slot.get_or_init(|| {
            let started = Instant::now();
            match Router::new(&self.filter) {
                Ok(router) => {
                    log(
                        LOG_INFO,
                        &format!(
                            "kvmesh dynamic module: worker {worker} router loaded in {} ms",
                            started.elapsed().as_millis()
                        ),
                    );
                    Some(Mutex::new(router))
                }
                Err(e) => {
                    log(LOG_ERROR, &format!("kvmesh dynamic module: worker {worker} router: {e}"));
                    None
                }
            }
        })
        .as_ref()
    }
}

/// Where a request is.
enum Phase {
    Headers,
    Body { endpoint: Endpoint },
    Routed { routed: Routed },
    Passed,
    Answered,
}

/// One request.
struct Filter {
    config: *const Config,
    phase: Phase,
}

thread_local! {
    /// A body that arrived in several pieces is gathered here (one buffer per worker thread).
    static BODY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn log(level: u32, message: &str) {
    // SAFETY: the message lives for the call.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

/// Runs a hook body; a panic becomes `fallback` instead of unwinding into Envoy.
fn guarded<T>(fallback: T, hook: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(hook)).unwrap_or_else(|_| {
        log(LOG_ERROR, "kvmesh dynamic module: a hook panicked; request passed on");
        fallback
    })
}

fn define(config: ConfigEnvoyPtr, name: &str, histogram: bool) -> usize {
    let mut id = 0usize;
    // SAFETY: `config` is the pointer Envoy passed to `config_new`; the name lives for the call.
    let result = unsafe {
        let name = ModuleBuffer::of(name.as_bytes());
        if histogram {
            envoy_dynamic_module_callback_http_filter_config_define_histogram(
                config,
                name,
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        } else {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                config,
                name,
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        }
    };
    if result != METRICS_SUCCESS {
        log(LOG_ERROR, &format!("kvmesh dynamic module: cannot define metric {name}: {result}"));
    }
    id
}

fn add(filter: FilterEnvoyPtr, id: usize, value: u64) {
    // SAFETY: `filter` is the running hook's; no labels.
    unsafe {
        envoy_dynamic_module_callback_http_filter_increment_counter(
            filter,
            id,
            std::ptr::null_mut(),
            0,
            value,
        )
    };
}

fn record(filter: FilterEnvoyPtr, id: usize, value: u64) {
    // SAFETY: as `add`.
    unsafe {
        envoy_dynamic_module_callback_http_filter_record_histogram_value(
            filter,
            id,
            std::ptr::null_mut(),
            0,
            value,
        )
    };
}

/// A request header's first value (`None`: absent or not UTF-8).
fn request_header<'a>(filter: FilterEnvoyPtr, name: &str) -> Option<&'a str> {
    let mut value = EnvoyBuffer::EMPTY;
    let mut count = 0usize;
    // SAFETY: `filter` is the running hook's; Envoy fills `value` with bytes valid during the hook.
    let found = unsafe {
        envoy_dynamic_module_callback_http_get_header(
            filter,
            REQUEST_HEADER,
            ModuleBuffer::of(name.as_bytes()),
            &mut value,
            0,
            &mut count,
        )
    };
    // SAFETY: read inside the hook only (the callers do not keep it).
    found.then(|| std::str::from_utf8(unsafe { value.as_slice() }).ok()).flatten()
}

/// Calls `read` with the whole request body: the part buffered by the chain, then the part the
/// latest event brought (over HTTP/2 all of it can be in the latter). Zero-copy when one piece.
fn with_request_body<T>(filter: FilterEnvoyPtr, read: impl FnOnce(&[u8]) -> T) -> T {
    let mut chunks: Vec<EnvoyBuffer> = Vec::new();
    // SAFETY: `filter` is the running hook's; each chunk array is sized by Envoy's own count.
    unsafe {
        // When the latest event *is* the buffered body (an earlier filter resumed it), read it once.
        let types: &[u32] = if envoy_dynamic_module_callback_http_received_buffered_request_body(filter) {
            &[RECEIVED_REQUEST_BODY]
        } else {
            &[BUFFERED_REQUEST_BODY, RECEIVED_REQUEST_BODY]
        };
        for &body_type in types {
            let n = envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body_type);
            if n == 0 {
                continue;
            }
            let start = chunks.len();
            chunks.resize(start + n, EnvoyBuffer::EMPTY);
            if !envoy_dynamic_module_callback_http_get_body_chunks(
                filter,
                body_type,
                chunks[start..].as_mut_ptr(),
            ) {
                chunks.truncate(start);
            }
        }
    }
    chunks.retain(|c| c.length > 0);
    match chunks.as_slice() {
        [] => read(&[]),
        // SAFETY: inside the hook.
        [one] => read(unsafe { one.as_slice() }),
        many => BODY.with_borrow_mut(|body| {
            body.clear();
            for chunk in many {
                // SAFETY: inside the hook.
                body.extend_from_slice(unsafe { chunk.as_slice() });
            }
            read(body)
        }),
    }
}

impl Filter {
    fn config(&self) -> &Config {
        // SAFETY: Envoy destroys a configuration only after every filter made from it.
        unsafe { &*self.config }
    }

    /// Answers with `status` and a JSON `body`.
    fn answer(&mut self, filter: FilterEnvoyPtr, status: u16, body: &str) {
        let (key, value) = (b"content-type", b"application/json");
        let mut headers = [ModuleHttpHeader {
            key_ptr: key.as_ptr(),
            key_length: key.len(),
            value_ptr: value.as_ptr(),
            value_length: value.len(),
        }];
        // SAFETY: `filter` is the running hook's; everything passed lives for the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                filter,
                u32::from(status),
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(body.as_bytes()),
                ModuleBuffer::of(b"kvmesh_rejected"),
            )
        };
        self.phase = Phase::Answered;
    }

    /// The filter cannot route for a reason of its own: forwarded unrouted or answered, per the
    /// failure mode.
    fn fail(&mut self, filter: FilterEnvoyPtr, why: &str) {
        match self.config().filter.failure_mode {
            FailureMode::FailOpen => {
                add(filter, self.config().fallbacks_total, 1);
                self.phase = Phase::Passed;
            }
            FailureMode::FailClosed => {
                let body = openai_error_body(why, "InternalServerError", None, 500);
                self.answer(filter, 500, &body);
            }
        }
    }

    fn on_request_headers(&mut self, filter: FilterEnvoyPtr, end_of_stream: bool) -> u32 {
        // A client must not pick the worker itself: only this filter writes the destination header.
        // SAFETY: `filter` is the running hook's; a null value removes the header.
        let removed = unsafe {
            envoy_dynamic_module_callback_http_set_header(
                filter,
                REQUEST_HEADER,
                ModuleBuffer::of(DESTINATION_HEADER.as_bytes()),
                ModuleBuffer::NULL,
            )
        };
        if !removed {
            log(LOG_ERROR, "kvmesh dynamic module: cannot remove the client's destination header");
        }
        let config = self.config();
        let endpoint = request_header(filter, ":path")
            .filter(|_| request_header(filter, ":method") == Some("POST"))
            .and_then(Endpoint::from_path)
            .filter(|_| !config.filter.models.is_empty());
        let Some(endpoint) = endpoint else {
            self.phase = Phase::Passed;
            return HEADERS_CONTINUE;
        };
        self.phase = Phase::Body { endpoint };
        if end_of_stream {
            self.route(filter, endpoint, &[]);
            return if matches!(self.phase, Phase::Answered) {
                HEADERS_STOP_ITERATION
            } else {
                HEADERS_CONTINUE
            };
        }
        HEADERS_STOP_ITERATION
    }

    fn on_request_body(&mut self, filter: FilterEnvoyPtr, end_of_stream: bool) -> u32 {
        let Phase::Body { endpoint } = self.phase else { return BODY_CONTINUE };
        let limit = self.config().filter.max_body_bytes;
        // SAFETY: `filter` is the running hook's.
        let size = unsafe {
            envoy_dynamic_module_callback_http_get_body_size(filter, BUFFERED_REQUEST_BODY)
                + envoy_dynamic_module_callback_http_get_body_size(filter, RECEIVED_REQUEST_BODY)
        };
        if size > limit {
            let message = format!("request body is more than the limit of {limit} bytes");
            self.answer(filter, 413, &openai_error_body(&message, "invalid_request_error", None, 413));
            return BODY_STOP_ITERATION_AND_BUFFER;
        }
        if !end_of_stream {
            return BODY_STOP_ITERATION_AND_BUFFER;
        }
        with_request_body(filter, |body| self.route(filter, endpoint, body));
        if matches!(self.phase, Phase::Answered) { BODY_STOP_ITERATION_AND_BUFFER } else { BODY_CONTINUE }
    }

    /// Routes `body`: sets the destination header (the headers are still held), or answers.
    fn route(&mut self, filter: FilterEnvoyPtr, endpoint: Endpoint, body: &[u8]) {
        // Copied out so the borrow of the configuration does not hold `self`.
        let config: &Config = unsafe { &*self.config };
        let Some(router) = config.router(filter) else {
            return self.fail(filter, "the filter has no router on this worker");
        };
        let started = Instant::now();
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let result = match router.lock() {
            Ok(mut router) => router.route(endpoint, body, wall.as_millis() as u64, wall.as_secs() as i64),
            Err(_) => return self.fail(filter, "the router is unusable after a panic"),
        };
        let micros = started.elapsed().as_micros() as u64;
        match result {
            Ok(routed) => {
                add(filter, config.routed_total, 1);
                add(filter, config.decision_us_total, micros);
                record(filter, config.decision_us, micros);
                // SAFETY: `filter` is the running hook's; the strings live for the call.
                let set = unsafe {
                    envoy_dynamic_module_callback_http_set_header(
                        filter,
                        REQUEST_HEADER,
                        ModuleBuffer::of(DESTINATION_HEADER.as_bytes()),
                        ModuleBuffer::of(routed.destination.as_bytes()),
                    )
                };
                if !set {
                    log(LOG_ERROR, "kvmesh dynamic module: cannot set the destination header");
                }
                self.phase = Phase::Routed { routed };
            }
            Err(rejected)
                if rejected.kind.is_own_failure() && config.filter.failure_mode == FailureMode::FailOpen =>
            {
                add(filter, config.fallbacks_total, 1);
                self.phase = Phase::Passed;
            }
            Err(rejected) => {
                self.answer(filter, rejected.kind.status(), &rejected.body);
            }
        }
    }

    /// The stream ended (completed or reset): the request leaves its worker's in-flight count.
    fn on_stream_complete(&mut self, filter: FilterEnvoyPtr) {
        if let Phase::Routed { routed } = std::mem::replace(&mut self.phase, Phase::Passed)
            && let Some(router) = self.config().router(filter)
            && let Ok(mut router) = router.lock()
        {
            router.finish(&routed);
        }
    }
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
        // SAFETY: valid for this call; copied by the parser.
        let bytes = unsafe { config.as_slice() };
        let filter = match FilterConfig::from_bytes(Some(bytes)) {
            Ok(filter) => filter,
            Err(e) => {
                log(LOG_ERROR, &format!("kvmesh dynamic module: configuration: {e}"));
                return std::ptr::null();
            }
        };
        let config = Config {
            filter,
            routers: (0..MAX_WORKERS).map(|_| OnceLock::new()).collect(),
            routed_total: define(config_envoy, "kvmesh_filter_decisions_routed_total", false),
            decision_us_total: define(config_envoy, "kvmesh_filter_decision_microseconds_total", false),
            decision_us: define(config_envoy, "kvmesh_filter_decision_microseconds", true),
            fallbacks_total: define(config_envoy, "kvmesh_filter_fallbacks_total", false),
        };
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
    let filter = Filter { config: config as *const Config, phase: Phase::Headers };
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

/// The request's state from the module pointer Envoy passes back.
///
/// # Safety
/// `module` is a live pointer from `filter_new`; Envoy runs one hook of a stream at a time.
unsafe fn state<'a>(module: FilterModulePtr) -> &'a mut Filter {
    // SAFETY: per the contract above.
    unsafe { &mut *(module as *mut Filter) }
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
    let filter = unsafe { state(module) };
    guarded(HEADERS_CONTINUE, || filter.on_request_headers(envoy, end_of_stream))
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
    let filter = unsafe { state(module) };
    guarded(BODY_CONTINUE, || filter.on_request_body(envoy, end_of_stream))
}

/// # Safety
/// Envoy's pointers for a live stream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
) {
    // SAFETY: per the hook's contract.
    let filter = unsafe { state(module) };
    guarded((), || filter.on_stream_complete(envoy))
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _end_of_stream: bool,
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
