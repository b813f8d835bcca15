//! The HTTP context: proxy-wasm's callbacks onto the host-neutral request path ([`Request`]), with
//! proxy-wasm's host calls as its [`Stream`] and the VM's state as its [`Worker`]. Every host
//! call's Result is handled: the SDK's trait methods panic on a host error, so only the
//! Result-returning `hostcalls` are used.

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType, MetricType};

use crate::accuracy::AccuracyMetrics;
use crate::flow::{self, Request, Settings, Stream, Worker};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::stats::{MetricKind, StatsSink};

/// One VM's state, shared by its root context and every HTTP context (a VM is single-threaded).
pub(crate) struct VmState {
    /// The routing state; borrowed only inside one callback, never across host calls that re-enter.
    pub(crate) router: RefCell<Router>,
    /// The filter's metrics.
    pub(crate) metrics: Metrics<ProxyWasmStats>,
    /// Predicted against reported cached tokens.
    pub(crate) accuracy: AccuracyMetrics<ProxyWasmStats>,
    /// The configuration's settings for the request path.
    pub(crate) settings: Settings,
}

impl Worker for VmState {
    type Stats = ProxyWasmStats;

    fn with_router<T>(&self, f: impl FnOnce(&mut Router) -> T) -> Option<T> {
        // Busy only if a callback re-entered, which a single-threaded VM does not do; never trap.
        self.router.try_borrow_mut().ok().map(|mut router| f(&mut router))
    }

    fn metrics(&self) -> &Metrics<ProxyWasmStats> {
        &self.metrics
    }

    fn accuracy(&self) -> &AccuracyMetrics<ProxyWasmStats> {
        &self.accuracy
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }
}

/// The proxy-wasm metrics API.
pub(crate) struct ProxyWasmStats;

impl StatsSink for ProxyWasmStats {
    fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(kind, name).ok()
    }

    fn add(&self, id: u32, by: u64) -> Result<(), String> {
        let by = i64::try_from(by).unwrap_or(i64::MAX);
        hostcalls::increment_metric(id, by).map_err(|status| format!("{status:?}"))
    }

    fn set(&self, id: u32, value: u64) -> Result<(), String> {
        hostcalls::record_metric(id, value).map_err(|status| format!("{status:?}"))
    }

    fn record(&self, id: u32, value: u64) -> Result<(), String> {
        hostcalls::record_metric(id, value).map_err(|status| format!("{status:?}"))
    }
}

/// The current request, through proxy-wasm's host calls.
struct Host;

impl Stream for Host {
    fn request_header(&self, name: &str) -> Option<Cow<'_, str>> {
        match hostcalls::get_map_value(MapType::HttpRequestHeaders, name) {
            Ok(value) => value.map(Cow::Owned),
            Err(status) => {
                log::warn!("kvmesh filter: cannot read {name}: {status:?}");
                None
            }
        }
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> Result<(), String> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value)
            .map_err(|status| format!("{status:?}"))
    }

    fn with_request_body<T>(&mut self, size: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
        let body =
            hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size).map_err(|s| format!("{s:?}"))?;
        Ok(read(body.as_deref().unwrap_or_default()))
    }

    fn send_response(&mut self, status: u16, body: &str) -> Result<(), String> {
        let headers = vec![("content-type", "application/json")];
        hostcalls::send_http_response(u32::from(status), headers, Some(body.as_bytes()))
            .map_err(|status| format!("{status:?}"))
    }

    fn response_header(&self, name: &str) -> Option<Cow<'_, str>> {
        hostcalls::get_map_value(MapType::HttpResponseHeaders, name).ok().flatten().map(Cow::Owned)
    }

    fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), String> {
        hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value)
            .map_err(|status| format!("{status:?}"))
    }

    fn with_response_body<T>(&mut self, size: usize, read: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
        let chunk =
            hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size).map_err(|s| format!("{s:?}"))?;
        Ok(read(chunk.as_deref().unwrap_or_default()))
    }

    fn now() -> SystemTime {
        // The epoch if the host refuses, which only skews metrics.
        hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
    }
}

/// Per-request state of the kvmesh filter.
pub(crate) struct KvmeshHttp {
    state: Rc<VmState>,
    request: Request,
}

impl KvmeshHttp {
    /// A context for request `context_id` over this VM's `state`.
    pub(crate) fn new(context_id: u32, state: Rc<VmState>) -> Self {
        Self { state, request: Request::new(context_id) }
    }
}

fn action(action: flow::Action) -> Action {
    match action {
        flow::Action::Continue => Action::Continue,
        // Requires `allow_on_headers_stop_iteration: true` for headers; without it a held request hangs.
        flow::Action::Stop => Action::Pause,
    }
}

impl Context for KvmeshHttp {}

impl HttpContext for KvmeshHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.request.on_request_headers(&*self.state, &mut Host, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.request.on_request_body(&*self.state, &mut Host, body_size, end_of_stream))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.request.on_response_headers(&*self.state, &mut Host, end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.request.on_response_body(&*self.state, &mut Host, body_size, end_of_stream))
    }

    fn on_log(&mut self) {
        // Called once when the stream ends, completed or reset.
        self.request.on_end(&*self.state);
    }
}
