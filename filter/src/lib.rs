//! kvmesh's Envoy filter: a proxy-wasm module (V8) that routes OpenAI inference requests to the
//! worker that holds their prompt's KV cache, as thin host glue over `kvmesh-core`.
//!
//! Request path (DESIGN.md section 2): pause on the headers of `POST /v1/completions` and
//! `/v1/chat/completions` (every other request passes untouched), buffer the body, then parse,
//! render, tokenize, hash and score in [`router`], and set `x-gateway-destination-endpoint:
//! ip:port[,fallback…]` for the cluster's override_host policy; errors are OpenAI-style JSON
//! answers (400, 404, 413, 429, 503).
//!
//! State: a singleton state service (the same module, configured with `control_plane`) holds the
//! one gRPC stream to the control plane and relays fleet state and models' tokenizer files through
//! shared data ([`relay`]); every HTTP filter VM follows it on a timer. Static workers and models in
//! the plugin configuration work without a control plane.
//!
//! What it must never do: panic (a panic kills the VM), or touch a header after it was forwarded
//! (proxy-wasm 0.2.5's trait methods panic on the host's error; only `hostcalls` are used).
//!
//! The same code builds natively (rlib) so clippy and unit tests cover it; only the wasm32 build is
//! loaded by Envoy.

mod accuracy;
mod apply;
mod config;
mod http_context;
mod metrics;
pub mod relay;
mod root_context;
pub mod router;
mod service;

pub use config::{ControlPlaneConfig, Error, FilterConfig, ModelConfig, SegmentCache, StateConfig};
pub use http_context::{DESTINATION_HEADER, FILTER_HEADER, FILTER_VERSION};

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    // Info keeps the per-request path free of log host calls; per-request detail is at debug, so
    // raise this (and Envoy's `--component-log-level wasm:debug`) when debugging the filter.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(root_context::KvmeshRoot::default())
    });
}}
