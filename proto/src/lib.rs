//! kvmesh wire schemas, generated from `proto/kvmesh/v1/*.proto`.
//!
//! Generated code stays behind this crate: other crates convert to their domain types (kvmesh-core's
//! `WorkerInfo`, `BlockHash`, ...) at the edge. The `grpc` feature adds tonic client and server stubs.

/// Version 1 of the schemas.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/kvmesh.v1.rs"));
}

pub mod convert;
