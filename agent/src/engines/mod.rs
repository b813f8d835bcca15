//! Engine adapters: each turns one engine's KV-event transport into [`SourceMsg`]s.
//!
//! - vLLM and SGLang: ZMQ PUB/SUB with msgpack batches and a replay socket ([`zmq`], decoding in
//!   [`frames`] and [`msgpack`]);
//! - TensorRT-LLM: `POST /kv_cache_events` polled over HTTP ([`trtllm`]).

pub mod frames;
pub mod msgpack;
pub mod trtllm;
pub mod zmq;

use crate::events::EngineBatch;

/// What an adapter tells the worker's state task.
#[derive(Debug)]
pub enum SourceMsg {
    /// One engine batch of data-parallel rank `rank`, in order.
    Batch {
        /// The rank (index of the publisher among this worker's).
        rank: u32,
        /// The decoded events.
        batch: EngineBatch,
    },
    /// The rank's blocks are unknown from here on: drop them and rebuild from what follows.
    Reset {
        /// The rank.
        rank: u32,
        /// Why.
        reason: ResetReason,
    },
}

/// Why a rank's blocks were dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// The engine restarted: its cache is empty.
    EngineRestart,
    /// Events were lost and could not be replayed.
    LostEvents,
}

impl ResetReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ResetReason::EngineRestart => "engine_restart",
            ResetReason::LostEvents => "lost_events",
        }
    }
}
