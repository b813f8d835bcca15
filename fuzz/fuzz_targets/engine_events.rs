//! What an engine sends the agent: vLLM / SGLang ZMQ frames and msgpack `KVEventBatch`es, TRT-LLM's
//! KV-event JSON, and Prometheus metrics text.
#![no_main]

use bytes::Bytes;
use kvmesh_agent::engines::trtllm::{DrainState, decode_drain};
use kvmesh_agent::engines::{frames, msgpack};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = msgpack::decode_batch(data);
    // Frames: split at 0xff bytes, as a multipart message.
    let parts: Vec<Bytes> = data.split(|&b| b == 0xff).map(Bytes::copy_from_slice).collect();
    let _ = frames::parse_live(&parts);
    let _ = frames::parse_replay_reply(&parts);
    let mut state = DrainState::default();
    let _ = decode_drain(data, &mut state);
    let _ = decode_drain(data, &mut state);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kvmesh_agent::promtext::parse(text);
    }
});
