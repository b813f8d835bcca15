//! KV cache events on the wire, per engine: vLLM's and SGLang's msgpack `KVEventBatch` over ZMQ
//! ([`msgpack`], [`zmq`]), TensorRT-LLM's JSON event list drained over HTTP ([`trtllm`]).

pub mod msgpack;
pub mod trtllm;
pub mod zmq;

use crate::cache::CacheEvent;

/// The events of one engine step, published together.
#[derive(Clone, Debug, PartialEq)]
pub struct StepEvents {
    /// Wall-clock time the step ended, in seconds since the Unix epoch (vLLM's `time.time()`).
    pub ts: f64,
    /// The step's cache events, in order.
    pub events: Vec<CacheEvent>,
}
