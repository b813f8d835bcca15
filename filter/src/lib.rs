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
//! The routing logic ([`router`], [`relay`], the configuration) and the host-neutral request path
//! ([`flow`], with its [`metrics`] over [`stats`]) also build natively (rlib), for unit tests, the
//! benchmarks and a native host; the proxy-wasm glue (the contexts, the state service) builds only
//! for wasm32, so a native build links no proxy-wasm host call (clippy checks the glue with
//! `--target wasm32-wasip1`, `make lint`).

pub mod accuracy;
mod apply;
mod config;
pub mod flow;
#[cfg(target_arch = "wasm32")]
mod http_context;
pub mod metrics;
pub mod relay;
#[cfg(target_arch = "wasm32")]
mod root_context;
pub mod router;
#[cfg(target_arch = "wasm32")]
mod service;
pub mod stats;

pub use config::{
    ControlPlaneConfig, Error, FailureMode, FilterConfig, ModelConfig, SegmentCache, StateConfig,
};

/// Response header the filter adds to every response when `response_header` is on.
pub const FILTER_HEADER: &str = "x-kvmesh-filter";
/// The value of [`FILTER_HEADER`]: this crate's version.
pub const FILTER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The Gateway API Inference Extension's header naming the chosen endpoint(s), `ip:port[,…]`; the
/// cluster's override_host load-balancing policy reads it.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    // Info keeps the per-request path free of log host calls; per-request detail is at debug, so
    // raise this (and Envoy's `--component-log-level wasm:debug`) when debugging the filter.
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root_context::KvmeshRoot::default())
    });
}}
