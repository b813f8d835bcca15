//! kvmesh's end-to-end benchmarks: real processes under load, measured from outside.
//!
//! `envoy-overhead` (a binary) starts an instant upstream, plain Envoy and Envoy with the kvmesh
//! filter, drives each with a closed-loop HTTP/1.1 client, and reports the latency and throughput the
//! filter adds, its decision time from Envoy's stats, its start-up cost, and the same pipeline run
//! natively and in V8 outside Envoy, stage by stage (`filter-stages`, the one binary that also builds
//! for wasm32-wasip1). bench/README.md has the commands and the figures.
//!
//! What it must never do: hold product logic. It drives the real binaries and calls the filter's
//! public pipeline; timing here decides no test's outcome.

#[cfg(not(target_os = "wasi"))]
pub mod envoys;
#[cfg(not(target_os = "wasi"))]
pub mod load;
#[cfg(not(target_os = "wasi"))]
pub mod native;
#[cfg(not(target_os = "wasi"))]
pub mod overhead;
pub mod plugin;
#[cfg(not(target_os = "wasi"))]
pub mod report;
pub mod stages;
pub mod text;
pub mod workload;
