//! kvmesh control plane: ingests the fleet's KV events, load reports and heartbeats from NATS,
//! keeps the fleet prefix index, worker registry and load view, streams that state to Envoy filters
//! over gRPC (snapshot, then versioned deltas), serves the models' tokenizer files to them, and
//! answers the REST admin API (workers, policies, index stats, explain, metrics).
//!
//! Routing logic lives in `kvmesh-core`; this crate is its I/O around it. It must never route a
//! request itself (explain is a dry run of core's scorer) and never trust a NATS payload: a message
//! that does not decode is counted and skipped.
//!
//! Map: [`config`] (YAML and defaults), [`ingest`] (NATS) into [`fleet_state`] (the rules), out
//! through [`stream`] (gRPC) and [`admin`] (REST), started together by [`service`].

pub mod admin;
pub mod assets;
pub mod block_map;
pub mod changes;
pub mod cli;
pub mod config;
pub mod eds;
pub mod error;
pub mod explain;
pub mod fleet_state;
pub mod ingest;
pub mod metrics;
pub mod plane;
pub mod service;
pub mod stream;
pub mod wire;

pub use cli::{ControlPlaneArgs, run};
pub use config::Config;
pub use error::Error;
pub use service::ControlPlane;
