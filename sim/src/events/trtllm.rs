//! TensorRT-LLM's KV cache events as `trtllm-serve` returns them from `POST /kv_cache_events`
//! (`KVCacheEventSerializer` in `tensorrt_llm/_utils.py`): a JSON list drained on read, each event
//! `{"event_id", "window_size", "data": {...}}` with `data.type` one of `created`, `stored`,
//! `removed`. Event ids count from 0 per worker; when the buffer (`event_buffer_max_size`) is full
//! the oldest event is dropped, which a consumer sees as an `event_id` gap.

use std::collections::VecDeque;

use serde::Serialize;

use crate::cache::CacheEvent;
use crate::events::msgpack::{WireEvent, coalesce};
use kvmesh_core::hash::BlockHash;

/// TRT-LLM's default retention priority of a block (`KvCacheRetentionConfig`).
const DEFAULT_PRIORITY: u32 = 35;

#[derive(Serialize)]
struct Event<'a> {
    event_id: u64,
    window_size: usize,
    data: Data<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Data<'a> {
    Created { num_blocks_per_cache_level: [usize; 2] },
    Stored { parent_hash: Option<u64>, blocks: Vec<StoredBlock> },
    Removed { block_hashes: &'a [u64] },
}

#[derive(Serialize)]
struct StoredBlock {
    #[serde(rename = "type")]
    kind: &'static str,
    block_hash: u64,
    tokens: Vec<UniqueToken>,
    cache_level: u32,
    priority: u32,
}

#[derive(Serialize)]
struct UniqueToken {
    #[serde(rename = "type")]
    kind: &'static str,
    token_id: u32,
    token_extra_id: u32,
}

/// The worker's queue of serialized events.
#[derive(Debug)]
pub struct TrtllmEventQueue {
    next_id: u64,
    window_size: usize,
    block_size: usize,
    capacity: usize,
    queue: VecDeque<String>,
    dropped: u64,
}

impl TrtllmEventQueue {
    /// A queue holding at most `capacity` events, starting with the `created` event.
    pub fn new(capacity: usize, window_size: usize, block_size: usize, gpu_blocks: usize) -> Self {
        let mut q = TrtllmEventQueue {
            next_id: 0,
            window_size,
            block_size: block_size.max(1),
            capacity: capacity.max(1),
            queue: VecDeque::new(),
            dropped: 0,
        };
        q.push(Data::Created { num_blocks_per_cache_level: [gpu_blocks, 0] });
        q
    }

    /// Appends one step's cache events (stored runs and merged removals).
    pub fn extend(&mut self, events: &[CacheEvent]) {
        for event in coalesce(events) {
            match event {
                WireEvent::Stored { parent, blocks, token_ids, .. } => {
                    let blocks = blocks
                        .iter()
                        .zip(token_ids.chunks(self.block_size))
                        .map(|(h, tokens)| StoredBlock {
                            kind: "stored_block",
                            block_hash: h.0,
                            tokens: tokens
                                .iter()
                                .map(|&t| UniqueToken {
                                    kind: "unique_token",
                                    token_id: t,
                                    token_extra_id: 0,
                                })
                                .collect(),
                            cache_level: 0,
                            priority: DEFAULT_PRIORITY,
                        })
                        .collect();
                    self.push(Data::Stored { parent_hash: parent.map(|p: BlockHash| p.0), blocks });
                }
                WireEvent::Removed(hashes) => {
                    let hashes: Vec<u64> = hashes.iter().map(|h| h.0).collect();
                    self.push(Data::Removed { block_hashes: &hashes });
                }
                // TRT-LLM has no "cleared" event; the sim offers no cache reset in this mode.
                WireEvent::Cleared => {}
            }
        }
    }

    fn push(&mut self, data: Data<'_>) {
        let event = Event { event_id: self.next_id, window_size: self.window_size, data };
        self.next_id += 1;
        match serde_json::to_string(&event) {
            Ok(json) => {
                if self.queue.len() == self.capacity {
                    self.queue.pop_front();
                    self.dropped += 1;
                }
                self.queue.push_back(json);
            }
            Err(e) => tracing::warn!(error = %e, "TRT-LLM KV event not serialized"),
        }
    }

    /// Takes every queued event as one JSON array (consumption is destructive, as in trtllm-serve).
    pub fn drain_json(&mut self) -> String {
        let mut out = String::from("[");
        for (i, e) in self.queue.drain(..).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&e);
        }
        out.push(']');
        out
    }

    /// Events dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_follow_trtllm_serializer_and_drain() {
        let mut q = TrtllmEventQueue::new(8, 4096, 2, 100);
        q.extend(&[
            CacheEvent::Stored {
                parent: None,
                blocks: vec![BlockHash(5)],
                token_ids: vec![1, 2],
                cache_salt: None,
            },
            CacheEvent::Removed { block: BlockHash(3) },
            CacheEvent::Removed { block: BlockHash(4) },
        ]);
        let v: serde_json::Value = serde_json::from_str(&q.drain_json()).unwrap();
        assert_eq!(v[0]["data"]["type"], "created");
        assert_eq!(v[0]["data"]["num_blocks_per_cache_level"], serde_json::json!([100, 0]));
        assert_eq!(v[1]["event_id"], 1);
        assert_eq!(v[1]["window_size"], 4096);
        let block = &v[1]["data"]["blocks"][0];
        assert_eq!(v[1]["data"]["parent_hash"], serde_json::Value::Null);
        assert_eq!(block["type"], "stored_block");
        assert_eq!(block["block_hash"], 5);
        assert_eq!(
            block["tokens"][1],
            serde_json::json!({"type":"unique_token","token_id":2,"token_extra_id":0})
        );
        assert_eq!((block["cache_level"].as_u64(), block["priority"].as_u64()), (Some(0), Some(35)));
        assert_eq!(v[2]["data"], serde_json::json!({"type":"removed","block_hashes":[3,4]}));
        assert_eq!(q.drain_json(), "[]");
    }

    #[test]
    fn full_buffer_drops_the_oldest() {
        let mut q = TrtllmEventQueue::new(2, 16, 1, 4);
        for b in 0..3 {
            q.extend(&[CacheEvent::Removed { block: BlockHash(b) }]);
            q.extend(&[CacheEvent::Cleared]);
            q.extend(&[CacheEvent::Stored {
                parent: None,
                blocks: vec![BlockHash(b)],
                token_ids: vec![1],
                cache_salt: None,
            }]);
        }
        let v: serde_json::Value = serde_json::from_str(&q.drain_json()).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(v[0]["event_id"], 5);
        assert!(q.dropped() > 0);
    }
}
