//! The HTTP context: one per request, a small state machine (`Headers -> Body -> Routed`, or
//! `Passed` / `Answered`) over [`Router`]. Thin host glue: every host call's Result is handled,
//! and request headers are only written while they are paused (the SDK's trait methods panic on
//! a host error, so only the Result-returning `hostcalls` are used here).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvmesh_core::request::{Endpoint, openai_error_body};
use kvmesh_core::usage::{Accuracy, MissingDetails, UsageScanner, engine_visible_prediction};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};

use crate::accuracy::AccuracyMetrics;
use crate::config::FailureMode;
use crate::metrics::Metrics;
use crate::router::{RejectKind, Rejected, Routed, Router};
use crate::{DESTINATION_HEADER, FILTER_HEADER, FILTER_VERSION};

/// One VM's state, shared by its root context and every HTTP context (a VM is single-threaded).
pub(crate) struct VmState {
    /// The routing state; borrowed only inside one callback, never across host calls that re-enter.
    pub(crate) router: RefCell<Router>,
    /// The filter's metrics.
    pub(crate) metrics: Metrics,
    /// Predicted against reported cached tokens.
    pub(crate) accuracy: AccuracyMetrics,
    /// Read `usage` from one routed response in this many (0: never).
    pub(crate) accuracy_sample_every: u32,
    /// Routed responses since the last one read.
    pub(crate) accuracy_skipped: Cell<u32>,
    /// Whether every response gets [`FILTER_HEADER`].
    pub(crate) response_header: bool,
    /// What happens to a request the filter cannot route for a reason of its own.
    pub(crate) failure_mode: FailureMode,
}

impl VmState {
    /// Whether this routed response's `usage` is read: the first of every `accuracy_sample_every`.
    fn sample_accuracy(&self) -> bool {
        let every = self.accuracy_sample_every;
        if every == 0 {
            return false;
        }
        let skipped = self.accuracy_skipped.get();
        self.accuracy_skipped.set(if skipped + 1 >= every { 0 } else { skipped + 1 });
        skipped == 0
    }
}

/// Where a request is in the filter.
enum Phase {
    /// Waiting for the request headers.
    Headers,
    /// An inference request whose body is being buffered (headers paused).
    Body { endpoint: Endpoint },
    /// Routed: headers forwarded, counted in flight on a worker until the stream ends.
    Routed(Routed),
    /// Not ours (or the filter failed open): headers forwarded untouched.
    Passed,
    /// Answered by the filter with a local reply.
    Answered,
}

/// Per-request state of the kvmesh filter.
pub(crate) struct KvmeshHttp {
    context_id: u32,
    state: Rc<VmState>,
    phase: Phase,
    /// Reads the engine's `usage` from a routed request's response as it passes.
    usage: Option<UsageScanner>,
}

impl KvmeshHttp {
    /// A context for request `context_id` over this VM's `state`.
    pub(crate) fn new(context_id: u32, state: Rc<VmState>) -> Self {
        Self { context_id, state, phase: Phase::Headers, usage: None }
    }

    /// Routes the buffered body and either sets the destination header and continues, or answers.
    fn route(&mut self, endpoint: Endpoint, body: &[u8]) -> Action {
        let started = now();
        let unix_seconds = started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let now_ms = started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let result = match self.state.router.try_borrow_mut() {
            Ok(mut router) => Some(router.route(endpoint, body, now_ms, unix_seconds)),
            Err(_) => None,
        };
        let Some(result) = result else {
            // Cannot happen in a single-threaded VM; never trap over it.
            log::error!("kvmesh filter: router busy (re-entered) at request {}", self.context_id);
            return self.fail("the router is busy");
        };
        let micros = elapsed_micros(started);
        match result {
            Ok(routed) => {
                self.state.metrics.routed(micros, &routed);
                // The headers are still paused here, so writing them is allowed.
                let set = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    DESTINATION_HEADER,
                    Some(&routed.destination),
                );
                if let Err(status) = set {
                    // Without the header the cluster falls back to round robin: degraded, not down.
                    log::warn!("kvmesh filter: cannot set {DESTINATION_HEADER}: {status:?}");
                }
                log::debug!(
                    "kvmesh filter: request {} -> {} ({} tokens, {} blocks predicted cached, {micros} us)",
                    self.context_id,
                    routed.destination,
                    routed.prompt_tokens,
                    routed.overlap_blocks
                );
                self.phase = Phase::Routed(routed);
                Action::Continue
            }
            Err(rejected)
                if rejected.kind.is_own_failure() && self.state.failure_mode == FailureMode::FailOpen =>
            {
                log::debug!(
                    "kvmesh filter: request {} not routed ({}); forwarded unrouted (fail open)",
                    self.context_id,
                    rejected.kind.status()
                );
                self.pass_unrouted()
            }
            Err(rejected) => {
                self.state.metrics.rejected(rejected.kind, micros);
                self.answer(&rejected)
            }
        }
    }

    /// Forwards the request without a destination (the cluster's own policy picks), counted as a
    /// fallback.
    fn pass_unrouted(&mut self) -> Action {
        self.state.metrics.fallback();
        self.phase = Phase::Passed;
        Action::Continue
    }

    /// The filter cannot do its work on this request (`why`, for the answer): per the failure
    /// mode, forwarded without a destination (the cluster's own policy picks), or answered 500.
    fn fail(&mut self, why: &str) -> Action {
        match self.state.failure_mode {
            FailureMode::FailOpen => self.pass_unrouted(),
            FailureMode::FailClosed => {
                let body = openai_error_body(why, "InternalServerError", None, 500);
                self.state.metrics.rejected(RejectKind::Internal, 0);
                self.answer(&Rejected { kind: RejectKind::Internal, body })
            }
        }
    }

    /// Answers the request with a JSON error instead of forwarding it.
    fn answer(&mut self, rejected: &Rejected) -> Action {
        log::debug!("kvmesh filter: request {} answered {}", self.context_id, rejected.kind.status());
        let headers = vec![("content-type", "application/json")];
        let sent = hostcalls::send_http_response(
            u32::from(rejected.kind.status()),
            headers,
            Some(rejected.body.as_bytes()),
        );
        match sent {
            Ok(()) => {
                self.phase = Phase::Answered;
                Action::Pause
            }
            Err(status) => {
                log::error!("kvmesh filter: cannot send local reply: {status:?}; passing through");
                self.state.metrics.fallback();
                self.phase = Phase::Passed;
                Action::Continue
            }
        }
    }
}

/// The host's clock (Envoy's wall clock); the epoch if the host refuses, which only skews metrics.
fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
}

fn elapsed_micros(since: SystemTime) -> u64 {
    now().duration_since(since).unwrap_or(Duration::ZERO).as_micros() as u64
}

impl Context for KvmeshHttp {}

impl HttpContext for KvmeshHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if !matches!(self.phase, Phase::Headers) {
            return Action::Continue;
        }
        let routes = self.state.router.try_borrow().is_ok_and(|r| r.routes_anything());
        // A client must not pick the worker itself: only this filter writes the destination header.
        if let Err(status) = hostcalls::set_map_value(MapType::HttpRequestHeaders, DESTINATION_HEADER, None) {
            log::warn!("kvmesh filter: cannot remove {DESTINATION_HEADER}: {status:?}");
        }
        let path = match hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path") {
            Ok(path) => path,
            Err(status) => {
                log::warn!("kvmesh filter: cannot read :path: {status:?}");
                None
            }
        };
        let method = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":method").ok().flatten();
        let endpoint = path
            .as_deref()
            .filter(|_| routes && method.as_deref() == Some("POST"))
            .and_then(Endpoint::from_path);
        let Some(endpoint) = endpoint else {
            self.state.metrics.passthrough();
            self.phase = Phase::Passed;
            return Action::Continue;
        };
        if end_of_stream {
            // No body at all: the parser answers 400 for it.
            return self.route(endpoint, &[]);
        }
        self.phase = Phase::Body { endpoint };
        // Requires `allow_on_headers_stop_iteration: true`; without it the request hangs here.
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Phase::Body { endpoint } = self.phase else { return Action::Continue };
        let limit = self.state.router.try_borrow().map_or(usize::MAX, |r| r.max_body_bytes());
        if body_size > limit {
            // Refuse as soon as the buffered body is over the limit: no need to wait for the rest.
            self.state.metrics.rejected(RejectKind::TooLarge, 0);
            let message = format!("request body is more than the limit of {limit} bytes");
            let body = openai_error_body(&message, "invalid_request_error", None, 413);
            return self.answer(&Rejected { kind: RejectKind::TooLarge, body });
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(body) => body.unwrap_or_default(),
            Err(status) => {
                log::error!("kvmesh filter: cannot read the request body: {status:?}");
                return self.fail("the request body could not be read");
            }
        };
        self.route(endpoint, &body)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Response headers are still ours to change in this callback (they have not been forwarded).
        if self.state.response_header
            && let Err(status) =
                hostcalls::add_map_value(MapType::HttpResponseHeaders, FILTER_HEADER, FILTER_VERSION)
        {
            log::debug!("kvmesh filter: cannot add {FILTER_HEADER}: {status:?}");
        }
        if matches!(self.phase, Phase::Routed(_)) && !end_of_stream && self.state.sample_accuracy() {
            let header = |name| hostcalls::get_map_value(MapType::HttpResponseHeaders, name).ok().flatten();
            let ok = header(":status").is_some_and(|s| s == "200");
            // Only successful JSON or event-stream answers carry `usage`; compressed ones are not read.
            self.usage = header("content-type")
                .filter(|_| ok)
                .and_then(|ct| UsageScanner::for_response(&ct, header("content-encoding").as_deref()));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Phase::Routed(routed) = &mut self.phase
            && !routed.prefill_done
            && body_size > 0
            && let Ok(mut router) = self.state.router.try_borrow_mut()
        {
            router.prefill_done(routed);
        }
        let Some(scanner) = &mut self.usage else { return Action::Continue };
        // Each chunk is passed on as it comes (Continue), so the buffer holds just this chunk.
        if body_size > 0 {
            match hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
                Ok(Some(chunk)) => scanner.feed(&chunk),
                Ok(None) => {}
                Err(status) => {
                    log::debug!("kvmesh filter: cannot read the response body: {status:?}");
                    self.usage = None;
                    return Action::Continue;
                }
            }
        }
        if end_of_stream || scanner.is_complete() {
            let usage = scanner.finish();
            self.usage = None;
            if let Phase::Routed(routed) = &self.phase {
                // The engine reports whole cached blocks and never the prompt's last token; a
                // response without details (vLLM and SGLang leave them out at 0) counts as 0.
                let outcome = usage.and_then(|u| u.cached_tokens_or(MissingDetails::Zero)).map(|reported| {
                    let predicted = engine_visible_prediction(
                        routed.overlap_blocks,
                        routed.prompt_tokens,
                        routed.block_size,
                    );
                    Accuracy::compare(predicted, reported)
                });
                if let Some(a) = &outcome {
                    log::debug!(
                        "kvmesh filter: request {} predicted {} cached tokens, engine reported {}",
                        self.context_id,
                        a.predicted_cached_tokens,
                        a.reported_cached_tokens
                    );
                }
                self.state.accuracy.record(outcome);
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // Called once when the stream ends, completed or reset: the request leaves the worker's
        // in-flight count.
        if let Phase::Routed(routed) = std::mem::replace(&mut self.phase, Phase::Passed) {
            match self.state.router.try_borrow_mut() {
                Ok(mut router) => router.finish(&routed),
                Err(_) => log::error!("kvmesh filter: router busy at stream end; in-flight count leaks"),
            }
        }
    }
}
