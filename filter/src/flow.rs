//! One request through the filter, whatever the host: a small state machine (`Headers -> Body ->
//! Routed`, or `Passed` / `Answered`) over [`Router`], driven by the host's callbacks through
//! [`Stream`] (this request's headers, body and replies) and [`Worker`] (the thread's router, metrics
//! and settings). The proxy-wasm module (`http_context.rs`) and a native host run the same code;
//! the unit tests below run it against a fake host.
//!
//! Request headers are only written while they are held (before [`Request::on_request_headers`] or
//! [`Request::on_request_body`] returns [`Action::Continue`]): a host may fail or trap otherwise.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvmesh_core::request::{Endpoint, openai_error_body};
use kvmesh_core::usage::{Accuracy, MissingDetails, UsageScanner, engine_visible_prediction};

use crate::DESTINATION_HEADER;
use crate::accuracy::AccuracyMetrics;
use crate::config::{FailureMode, FilterConfig};
use crate::metrics::Metrics;
use crate::router::{RejectKind, Rejected, Routed, Router};
use crate::stats::StatsSink;
use crate::{FILTER_HEADER, FILTER_VERSION};

/// What the host does after a callback.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    /// Go on: forward what is held.
    Continue,
    /// Hold: the headers until the body is complete (and the body meanwhile buffered), or for
    /// good after a local reply.
    Stop,
}

/// One request's host operations. Reads may borrow from the host for as long as the callback runs.
pub trait Stream {
    /// A request header's first value (`None`: absent, or not UTF-8).
    fn request_header(&self, name: &str) -> Option<Cow<'_, str>>;
    /// Sets a request header, or removes it (`None`).
    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), String>;
    /// Calls `read` with the whole buffered request body (`size` bytes, as the host counted them).
    fn with_request_body<T>(&mut self, size: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, String>;
    /// Answers the request with `status` and a JSON `body` instead of forwarding it.
    fn send_response(&mut self, status: u16, body: &str) -> Result<(), String>;
    /// A response header's first value.
    fn response_header(&self, name: &str) -> Option<Cow<'_, str>>;
    /// Adds a response header (allowed until the response headers are forwarded).
    fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), String>;
    /// Calls `read` with the response body chunk just received (`size` bytes).
    fn with_response_body<T>(&mut self, size: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, String>;
    /// The host's wall clock.
    fn now() -> SystemTime;
}

/// What one host thread routes with.
pub trait Worker {
    /// Where the metrics go.
    type Stats: StatsSink;
    /// Runs `f` on this thread's router; `None` when it is not available (re-entered, or broken).
    fn with_router<T>(&self, f: impl FnOnce(&mut Router) -> T) -> Option<T>;
    /// The filter's metrics.
    fn metrics(&self) -> &Metrics<Self::Stats>;
    /// The routing-accuracy counters.
    fn accuracy(&self) -> &AccuracyMetrics<Self::Stats>;
    /// What the configuration says about the request path.
    fn settings(&self) -> &Settings;
}

/// The configuration's settings for the request path.
#[derive(Debug)]
pub struct Settings {
    /// What happens to a request the filter cannot route for a reason of its own.
    pub failure_mode: FailureMode,
    /// Whether every response gets [`FILTER_HEADER`].
    pub response_header: bool,
    /// Read `usage` from one routed response in this many (0: never).
    accuracy_sample_every: u32,
    /// Routed responses since the last one read.
    accuracy_skipped: AtomicU32,
}

impl Settings {
    /// The settings of `config`.
    pub fn new(config: &FilterConfig) -> Settings {
        Settings {
            failure_mode: config.failure_mode,
            response_header: config.response_header,
            accuracy_sample_every: config.accuracy_sample_every,
            accuracy_skipped: AtomicU32::new(0),
        }
    }

    /// Whether this routed response's `usage` is read: the first of every `accuracy_sample_every`.
    fn sample_accuracy(&self) -> bool {
        let every = self.accuracy_sample_every;
        if every == 0 {
            return false;
        }
        // One thread per counter in practice (a VM, or a host worker thread); relaxed is enough.
        let skipped = self.accuracy_skipped.load(Ordering::Relaxed);
        self.accuracy_skipped.store(if skipped + 1 >= every { 0 } else { skipped + 1 }, Ordering::Relaxed);
        skipped == 0
    }
}

/// Where a request is in the filter.
enum Phase {
    /// Waiting for the request headers.
    Headers,
    /// An inference request whose body is being buffered (headers held).
    Body { endpoint: Endpoint },
    /// Routed: headers forwarded, counted in flight on a worker until the stream ends.
    Routed(Routed),
    /// Not ours (or the filter failed open): headers forwarded untouched.
    Passed,
    /// Answered by the filter with a local reply.
    Answered,
}

/// One request's state.
pub struct Request {
    /// The host's id of the request, for logs.
    id: u32,
    phase: Phase,
    /// Reads the engine's `usage` from a routed request's response as it passes.
    usage: Option<UsageScanner>,
}

impl Request {
    /// A request the host calls `id`.
    pub fn new(id: u32) -> Request {
        Request { id, phase: Phase::Headers, usage: None }
    }

    /// The request headers arrived: inference requests are held for their body, others pass.
    pub fn on_request_headers(
        &mut self,
        w: &impl Worker,
        s: &mut impl Stream,
        end_of_stream: bool,
    ) -> Action {
        if !matches!(self.phase, Phase::Headers) {
            return Action::Continue;
        }
        let routes = w.with_router(|r| r.routes_anything()).unwrap_or(false);
        // A client must not pick the worker itself: only this filter writes the destination header.
        if let Err(e) = s.set_request_header(DESTINATION_HEADER, None) {
            log::warn!("kvmesh filter: cannot remove {DESTINATION_HEADER}: {e}");
        }
        let post = s.request_header(":method").is_some_and(|m| m == "POST");
        let endpoint =
            s.request_header(":path").filter(|_| routes && post).and_then(|p| Endpoint::from_path(&p));
        let Some(endpoint) = endpoint else {
            w.metrics().passthrough();
            self.phase = Phase::Passed;
            return Action::Continue;
        };
        if end_of_stream {
            // No body at all: the parser answers 400 for it.
            return self.route(w, s, endpoint, None);
        }
        self.phase = Phase::Body { endpoint };
        Action::Stop
    }

    /// Request body data arrived; `body_size` is all of it buffered so far.
    pub fn on_request_body(
        &mut self,
        w: &impl Worker,
        s: &mut impl Stream,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let Phase::Body { endpoint } = self.phase else { return Action::Continue };
        let limit = w.with_router(|r| r.max_body_bytes()).unwrap_or(usize::MAX);
        if body_size > limit {
            // Refuse as soon as the buffered body is over the limit: no need to wait for the rest.
            w.metrics().rejected(RejectKind::TooLarge, 0);
            let message = format!("request body is more than the limit of {limit} bytes");
            let body = openai_error_body(&message, "invalid_request_error", None, 413);
            return self.answer(w, s, &Rejected { kind: RejectKind::TooLarge, body });
        }
        if !end_of_stream {
            return Action::Stop;
        }
        self.route(w, s, endpoint, Some(body_size))
    }

    /// The response headers arrived (still ours to change).
    pub fn on_response_headers(
        &mut self,
        w: &impl Worker,
        s: &mut impl Stream,
        end_of_stream: bool,
    ) -> Action {
        let settings = w.settings();
        if settings.response_header
            && let Err(e) = s.add_response_header(FILTER_HEADER, FILTER_VERSION)
        {
            log::debug!("kvmesh filter: cannot add {FILTER_HEADER}: {e}");
        }
        if matches!(self.phase, Phase::Routed(_)) && !end_of_stream && settings.sample_accuracy() {
            let ok = s.response_header(":status").is_some_and(|v| v == "200");
            // Only successful JSON or event-stream answers carry `usage`; compressed ones are not read.
            self.usage = s.response_header("content-type").filter(|_| ok).and_then(|ct| {
                UsageScanner::for_response(&ct, s.response_header("content-encoding").as_deref())
            });
        }
        Action::Continue
    }

    /// A response body chunk arrived (`body_size` bytes; each is passed on as it comes).
    pub fn on_response_body(
        &mut self,
        w: &impl Worker,
        s: &mut impl Stream,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        if let Phase::Routed(routed) = &mut self.phase
            && !routed.prefill_done
            && body_size > 0
        {
            // The first response byte: the worker has prefilled the prompt.
            w.with_router(|router| router.prefill_done(routed));
        }
        let Some(scanner) = &mut self.usage else { return Action::Continue };
        if body_size > 0
            && let Err(e) = s.with_response_body(body_size, |chunk| scanner.feed(chunk))
        {
            log::debug!("kvmesh filter: cannot read the response body: {e}");
            self.usage = None;
            return Action::Continue;
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
                        self.id,
                        a.predicted_cached_tokens,
                        a.reported_cached_tokens
                    );
                }
                w.accuracy().record(outcome);
            }
        }
        Action::Continue
    }

    /// The stream ended, completed or reset: the request leaves its worker's in-flight count.
    pub fn on_end(&mut self, w: &impl Worker) {
        if let Phase::Routed(routed) = std::mem::replace(&mut self.phase, Phase::Passed)
            && w.with_router(|router| router.finish(&routed)).is_none()
        {
            log::error!("kvmesh filter: router busy at stream end; in-flight count leaks");
        }
    }

    /// Routes the buffered body (`body_size` bytes; `None`: there is none) and either sets the
    /// destination header and continues, or answers. The decision time counts from the body in
    /// hand to the decision (reading the body is the host's).
    fn route<S: Stream>(
        &mut self,
        w: &impl Worker,
        s: &mut S,
        endpoint: Endpoint,
        body_size: Option<usize>,
    ) -> Action {
        let decide = |body: &[u8]| {
            let started = S::now();
            let since_epoch = started.duration_since(UNIX_EPOCH).unwrap_or_default();
            let (now_ms, unix_seconds) = (since_epoch.as_millis() as u64, since_epoch.as_secs() as i64);
            (w.with_router(|r| r.route(endpoint, body, now_ms, unix_seconds)), started)
        };
        let (result, started) = match body_size {
            None => decide(&[]),
            Some(size) => match s.with_request_body(size, decide) {
                Ok(decided) => decided,
                Err(e) => {
                    log::error!("kvmesh filter: cannot read the request body: {e}");
                    return self.fail(w, s, "the request body could not be read");
                }
            },
        };
        let Some(result) = result else {
            log::error!("kvmesh filter: router unavailable at request {}", self.id);
            return self.fail(w, s, "the router is busy");
        };
        let micros = S::now().duration_since(started).unwrap_or(Duration::ZERO).as_micros() as u64;
        match result {
            Ok(routed) => {
                w.metrics().routed(micros, &routed);
                // The headers are still held here, so writing them is allowed.
                if let Err(e) = s.set_request_header(DESTINATION_HEADER, Some(&routed.destination)) {
                    // Without the header the cluster falls back to round robin: degraded, not down.
                    log::warn!("kvmesh filter: cannot set {DESTINATION_HEADER}: {e}");
                }
                log::debug!(
                    "kvmesh filter: request {} -> {} ({} tokens, {} blocks predicted cached, {micros} us)",
                    self.id,
                    routed.destination,
                    routed.prompt_tokens,
                    routed.overlap_blocks
                );
                self.phase = Phase::Routed(routed);
                Action::Continue
            }
            Err(rejected)
                if rejected.kind.is_own_failure() && w.settings().failure_mode == FailureMode::FailOpen =>
            {
                log::debug!(
                    "kvmesh filter: request {} not routed ({}); forwarded unrouted (fail open)",
                    self.id,
                    rejected.kind.status()
                );
                self.pass_unrouted(w)
            }
            Err(rejected) => {
                w.metrics().rejected(rejected.kind, micros);
                self.answer(w, s, &rejected)
            }
        }
    }

    /// Forwards the request without a destination (the cluster's own policy picks), counted as a
    /// fallback.
    fn pass_unrouted(&mut self, w: &impl Worker) -> Action {
        w.metrics().fallback();
        self.phase = Phase::Passed;
        Action::Continue
    }

    /// The filter cannot do its work on this request (`why`, for the answer): per the failure
    /// mode, forwarded without a destination, or answered 500.
    fn fail(&mut self, w: &impl Worker, s: &mut impl Stream, why: &str) -> Action {
        match w.settings().failure_mode {
            FailureMode::FailOpen => self.pass_unrouted(w),
            FailureMode::FailClosed => {
                let body = openai_error_body(why, "InternalServerError", None, 500);
                w.metrics().rejected(RejectKind::Internal, 0);
                self.answer(w, s, &Rejected { kind: RejectKind::Internal, body })
            }
        }
    }

    /// Answers the request with a JSON error instead of forwarding it.
    fn answer(&mut self, w: &impl Worker, s: &mut impl Stream, rejected: &Rejected) -> Action {
        log::debug!("kvmesh filter: request {} answered {}", self.id, rejected.kind.status());
        match s.send_response(rejected.kind.status(), &rejected.body) {
            Ok(()) => {
                self.phase = Phase::Answered;
                Action::Stop
            }
            Err(e) => {
                log::error!("kvmesh filter: cannot send local reply: {e}; passing through");
                self.pass_unrouted(w)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::router::tests::{chat, config};
    use crate::stats::fake::FakeStats;

    /// A request as a host holds it.
    #[derive(Default)]
    struct FakeStream {
        request_headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// The request body cannot be read.
        body_unreadable: bool,
        response_headers: Vec<(String, String)>,
        response_chunk: Vec<u8>,
        /// The local reply sent, if any.
        sent: Option<(u16, String)>,
    }

    impl FakeStream {
        fn request(method: &str, path: &str) -> FakeStream {
            let headers = [(":method", method), (":path", path)];
            FakeStream {
                request_headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..FakeStream::default()
            }
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.request_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
        }
    }

    impl Stream for FakeStream {
        fn request_header(&self, name: &str) -> Option<Cow<'_, str>> {
            self.header(name).map(Cow::Borrowed)
        }

        fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), String> {
            self.request_headers.retain(|(k, _)| k != name);
            if let Some(value) = value {
                self.request_headers.push((name.to_owned(), value.to_owned()));
            }
            Ok(())
        }

        fn with_request_body<T>(&mut self, size: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
            if self.body_unreadable {
                return Err("unreadable".to_owned());
            }
            Ok(read(&self.body[..size]))
        }

        fn send_response(&mut self, status: u16, body: &str) -> Result<(), String> {
            self.sent = Some((status, body.to_owned()));
            Ok(())
        }

        fn response_header(&self, name: &str) -> Option<Cow<'_, str>> {
            self.response_headers.iter().find(|(k, _)| k == name).map(|(_, v)| Cow::Borrowed(v.as_str()))
        }

        fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), String> {
            self.response_headers.push((name.to_owned(), value.to_owned()));
            Ok(())
        }

        fn with_response_body<T>(&mut self, size: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
            Ok(read(&self.response_chunk[..size]))
        }

        fn now() -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(1_767_225_600)
        }
    }

    struct FakeWorker {
        router: RefCell<Router>,
        metrics: Metrics<FakeStats>,
        accuracy: AccuracyMetrics<FakeStats>,
        settings: Settings,
    }

    impl FakeWorker {
        fn new(config: &FilterConfig) -> FakeWorker {
            FakeWorker {
                router: RefCell::new(Router::new(config).expect("router")),
                metrics: Metrics::define(FakeStats::default()),
                accuracy: AccuracyMetrics::define(FakeStats::default()),
                settings: Settings::new(config),
            }
        }

        fn counter(&self, name: &str) -> u64 {
            self.metrics.sink().value(name)
        }
    }

    impl Worker for FakeWorker {
        type Stats = FakeStats;

        fn with_router<T>(&self, f: impl FnOnce(&mut Router) -> T) -> Option<T> {
            self.router.try_borrow_mut().ok().map(|mut r| f(&mut r))
        }

        fn metrics(&self) -> &Metrics<FakeStats> {
            &self.metrics
        }

        fn accuracy(&self) -> &AccuracyMetrics<FakeStats> {
            &self.accuracy
        }

        fn settings(&self) -> &Settings {
            &self.settings
        }
    }

    /// A chat request through headers and body, as a host delivers it; the last action.
    fn send_chat(w: &FakeWorker, s: &mut FakeStream, request: &mut Request, body: &[u8]) -> Action {
        s.body = body.to_vec();
        assert_eq!(request.on_request_headers(w, s, false), Action::Stop, "an inference request is held");
        assert_eq!(request.on_request_body(w, s, body.len() / 2, false), Action::Stop, "buffering");
        request.on_request_body(w, s, body.len(), true)
    }

    #[test]
    fn other_paths_pass_without_the_clients_destination() {
        let w = FakeWorker::new(&config(2));
        let mut s = FakeStream::request("GET", "/v1/models");
        s.request_headers.push((DESTINATION_HEADER.to_owned(), "10.0.0.1:80".to_owned()));
        let mut request = Request::new(1);
        assert_eq!(request.on_request_headers(&w, &mut s, true), Action::Continue);
        assert_eq!(s.header(DESTINATION_HEADER), None, "only the filter names the destination");
        assert_eq!(w.counter("kvmesh_filter_passthrough_total"), 1);
        assert_eq!(w.counter("kvmesh_filter_decisions_routed_total"), 0);
    }

    #[test]
    fn a_chat_is_held_for_its_body_then_routed_and_released_at_the_end() {
        let w = FakeWorker::new(&config(2));
        let mut s = FakeStream::request("POST", "/v1/chat/completions");
        let mut request = Request::new(1);
        let action = send_chat(&w, &mut s, &mut request, &chat("a system prompt of some length", "hi"));
        assert_eq!(action, Action::Continue);
        assert_eq!(s.sent, None);
        let destination = s.header(DESTINATION_HEADER).expect("destination set");
        assert!(destination.starts_with("127.0.0.1:900"), "{destination}");
        assert_eq!(w.counter("kvmesh_filter_decisions_routed_total"), 1);
        assert_eq!(w.metrics.sink().recorded("kvmesh_filter_decision_microseconds").len(), 1);
        let in_flight = |w: &FakeWorker| {
            w.router.borrow().fleet.iter().map(|(_, e)| e.load.inflight_requests).sum::<u32>()
        };
        assert_eq!(in_flight(&w), 1, "counted in flight while the stream lives");
        request.on_end(&w);
        assert_eq!(in_flight(&w), 0, "released when it ends");
    }

    #[test]
    fn an_oversized_body_is_answered_before_it_ends() {
        let mut config = config(2);
        config.max_body_bytes = 64;
        let w = FakeWorker::new(&config);
        let mut s = FakeStream::request("POST", "/v1/chat/completions");
        let mut request = Request::new(1);
        assert_eq!(request.on_request_headers(&w, &mut s, false), Action::Stop);
        assert_eq!(request.on_request_body(&w, &mut s, 65, false), Action::Stop);
        let (status, body) = s.sent.as_ref().expect("answered");
        assert_eq!(*status, 413);
        assert!(body.starts_with(r#"{"error":"#), "{body}");
        assert_eq!(w.counter("kvmesh_filter_decisions_too_large_total"), 1);
        // Whatever the host delivers afterwards changes nothing.
        assert_eq!(request.on_request_body(&w, &mut s, 80, true), Action::Continue);
        assert_eq!(s.header(DESTINATION_HEADER), None);
    }

    #[test]
    fn a_malformed_body_is_answered_400() {
        let w = FakeWorker::new(&config(2));
        let mut s = FakeStream::request("POST", "/v1/chat/completions");
        let action = send_chat(&w, &mut s, &mut Request::new(1), b"{not json");
        assert_eq!(action, Action::Stop);
        assert_eq!(s.sent.as_ref().map(|(status, _)| *status), Some(400));
        assert_eq!(w.counter("kvmesh_filter_decisions_bad_request_total"), 1);
    }

    #[test]
    fn an_unreadable_body_fails_open_or_closed_per_the_failure_mode() {
        for (mode, expected) in
            [(FailureMode::FailOpen, Action::Continue), (FailureMode::FailClosed, Action::Stop)]
        {
            let mut config = config(2);
            config.failure_mode = mode;
            let w = FakeWorker::new(&config);
            let mut s = FakeStream::request("POST", "/v1/chat/completions");
            s.body_unreadable = true;
            let action = send_chat(&w, &mut s, &mut Request::new(1), &chat("system", "hi"));
            assert_eq!(action, expected, "{mode:?}");
            assert_eq!(s.header(DESTINATION_HEADER), None, "{mode:?}: never a destination");
            match mode {
                FailureMode::FailOpen => {
                    assert_eq!(s.sent, None);
                    assert_eq!(w.counter("kvmesh_filter_fallbacks_total"), 1);
                }
                FailureMode::FailClosed => {
                    assert_eq!(s.sent.as_ref().map(|(status, _)| *status), Some(500));
                    assert_eq!(w.counter("kvmesh_filter_decisions_internal_error_total"), 1);
                }
            }
        }
    }

    #[test]
    fn a_sampled_response_is_compared_with_the_prediction_and_ends_the_prefill() {
        let mut config = config(2);
        config.accuracy_sample_every = 1;
        config.response_header = true;
        let w = FakeWorker::new(&config);
        let mut s = FakeStream::request("POST", "/v1/chat/completions");
        let mut request = Request::new(1);
        assert_eq!(send_chat(&w, &mut s, &mut request, &chat("system", "hi")), Action::Continue);
        let pending = |w: &FakeWorker| {
            w.router.borrow().fleet.iter().map(|(_, e)| e.load.inflight_prefill_tokens).sum::<u64>()
        };
        assert!(pending(&w) > 0, "the prompt waits for its prefill");

        s.response_headers = vec![
            (":status".to_owned(), "200".to_owned()),
            ("content-type".to_owned(), "application/json".to_owned()),
        ];
        assert_eq!(request.on_response_headers(&w, &mut s, false), Action::Continue);
        assert_eq!(s.response_header(FILTER_HEADER).as_deref(), Some(FILTER_VERSION));
        s.response_chunk =
            br#"{"choices":[],"usage":{"prompt_tokens":12,"prompt_tokens_details":{"cached_tokens":0}}}"#
                .to_vec();
        let size = s.response_chunk.len();
        assert_eq!(request.on_response_body(&w, &mut s, size, true), Action::Continue);
        assert_eq!(pending(&w), 0, "the first response byte ends the prefill");
        let counted: u64 = ["exact", "over", "under"]
            .iter()
            .map(|v| w.accuracy.sink().value(&format!("kvmesh_filter_accuracy_{v}_total")))
            .sum();
        assert_eq!(counted, 1, "one response compared");
    }
}
