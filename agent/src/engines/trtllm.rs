//! TensorRT-LLM's KV cache events: `POST /kv_cache_events` drains the engine's event queue and answers
//! a JSON list (one consumer per worker: reading is destructive). Decoding is pure ([`decode_drain`]);
//! [`run`] polls.
//!
//! Each item: `{"event_id", "window_size", "attention_dp_rank"?, "data": {"type": ...}}` with types
//! `created` (blocks per cache level), `stored` (parent hash, blocks with tokens and cache level),
//! `removed`, `updated` (cache-level change) and `all_cleared` (newer serve code, after a gap).
//! Cache level 0 is GPU memory. Only the largest attention window is indexed (models with variable
//! sliding windows report one event stream per window). `event_id` is monotonic per rank: a jump
//! means lost events and a step back an engine restart; both reset the rank.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use xxhash_rust::xxh3::xxh3_64;

use super::{ResetReason, SourceMsg};
use crate::events::{EngineBatch, EngineEvent, EngineHash, Skipped, StoredBlocks};
use crate::http::HttpClient;
use crate::state::EngineInfo;
use crate::telemetry::{AgentMetrics, RankLabel, What};

/// What one drain produced.
#[derive(Debug, Default)]
pub struct Drain {
    /// Batches and resets, in order per rank.
    pub messages: Vec<SourceMsg>,
    /// Events skipped.
    pub skipped: Skipped,
    /// Events of a smaller attention window than the largest seen.
    pub other_window: u32,
    /// GPU blocks the engine announced in a `created` event.
    pub gpu_blocks: Option<u64>,
}

/// What a decoder remembers between drains.
#[derive(Debug, Default)]
pub struct DrainState {
    last_event_id: HashMap<u32, u64>,
    max_window: Option<u64>,
}

#[derive(Deserialize)]
struct Item<'a> {
    event_id: Option<u64>,
    window_size: Option<u64>,
    attention_dp_rank: Option<u32>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// The event types this decoder knows.
const KNOWN_TYPES: [&str; 5] = ["created", "stored", "removed", "updated", "all_cleared"];

#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Data {
    Created {
        #[serde(default)]
        num_blocks_per_cache_level: Vec<u64>,
    },
    Stored {
        parent_hash: Option<Num>,
        blocks: Vec<Block>,
    },
    Removed {
        block_hashes: Vec<Num>,
    },
    Updated {
        block_hash: Num,
        cache_level: Option<Diff>,
    },
    AllCleared,
}

#[derive(Deserialize)]
struct Block {
    block_hash: Num,
    tokens: Vec<Token>,
    #[serde(default)]
    cache_level: u32,
    lora_id: Option<u64>,
}

#[derive(Deserialize)]
struct Token {
    token_id: u32,
    #[serde(default)]
    token_extra_id: u64,
}

#[derive(Deserialize)]
struct Diff {
    new_value: u32,
}

/// A 64-bit hash written as a JSON number, signed or unsigned.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum Num {
    Unsigned(u64),
    Signed(i64),
}

impl Num {
    fn hash(self) -> EngineHash {
        match self {
            Num::Unsigned(n) => EngineHash(n),
            Num::Signed(n) => EngineHash::from_i64(n),
        }
    }
}

/// Decodes one drain. An answer that is not a JSON list is an error; a bad item is counted.
pub fn decode_drain(body: &[u8], state: &mut DrainState) -> Result<Drain, serde_json::Error> {
    let items: Vec<&RawValue> = serde_json::from_slice(body)?;
    let mut drain = Drain::default();
    let mut open: Vec<(u32, EngineBatch)> = Vec::new();
    for raw in items {
        let Ok(item) = serde_json::from_str::<Item<'_>>(raw.get()) else {
            drain.skipped.malformed += 1;
            continue;
        };
        let rank = item.attention_dp_rank.unwrap_or(0);
        if let Some(id) = item.event_id {
            let reason = match state.last_event_id.insert(rank, id) {
                Some(last) if id <= last => Some(ResetReason::EngineRestart),
                Some(last) if last.checked_add(1).is_some_and(|next| id > next) => {
                    Some(ResetReason::LostEvents)
                }
                _ => None,
            };
            if let Some(reason) = reason {
                if let Some(i) = open.iter().position(|(r, _)| *r == rank) {
                    let (rank, batch) = open.remove(i);
                    drain.messages.push(SourceMsg::Batch { rank, batch });
                }
                drain.messages.push(SourceMsg::Reset { rank, reason });
            }
        }
        if let Some(window) = item.window_size {
            match state.max_window {
                Some(max) if window < max => {
                    drain.other_window += 1;
                    continue;
                }
                _ => state.max_window = Some(window),
            }
        }
        match serde_json::from_str::<Tag<'_>>(item.data.get()) {
            Ok(tag) if KNOWN_TYPES.contains(&tag.kind.as_ref()) => {}
            Ok(_) => {
                drain.skipped.unknown_type += 1;
                continue;
            }
            Err(_) => {
                drain.skipped.malformed += 1;
                continue;
            }
        }
        let Ok(data) = serde_json::from_str::<Data>(item.data.get()) else {
            drain.skipped.malformed += 1;
            continue;
        };
        let mut events = Vec::new();
        match data {
            Data::Created { num_blocks_per_cache_level } => {
                drain.gpu_blocks = num_blocks_per_cache_level.first().copied();
            }
            Data::Stored { parent_hash, blocks } => stored(parent_hash.map(Num::hash), &blocks, &mut events),
            Data::Removed { block_hashes } => events.push(EngineEvent::Removed {
                blocks: block_hashes.into_iter().map(Num::hash).collect(),
                group: None,
            }),
            Data::Updated { block_hash, cache_level: Some(level) } => events
                .push(EngineEvent::TierChanged { block: block_hash.hash(), on_gpu: level.new_value == 0 }),
            Data::Updated { cache_level: None, .. } => {}
            Data::AllCleared => events.push(EngineEvent::Cleared),
        }
        if events.is_empty() {
            continue;
        }
        match open.iter_mut().find(|(r, _)| *r == rank) {
            Some((_, batch)) => batch.events.extend(events),
            None => open.push((rank, EngineBatch { dp_rank: item.attention_dp_rank, events })),
        }
    }
    drain.messages.extend(open.into_iter().map(|(rank, batch)| SourceMsg::Batch { rank, batch }));
    Ok(drain)
}

/// One `stored` event as runs of blocks that share a cache level and a size, each chained to the
/// block before it.
fn stored(mut parent: Option<EngineHash>, blocks: &[Block], events: &mut Vec<EngineEvent>) {
    let mut run: Option<StoredBlocks> = None;
    for block in blocks {
        let on_gpu = block.cache_level == 0;
        let size = block.tokens.len();
        let lora_name = block.lora_id.filter(|id| *id != 0).map(|id| format!("lora-id:{id}"));
        let continues = run
            .as_ref()
            .is_some_and(|r| r.on_gpu == on_gpu && r.block_size == size && r.lora_name == lora_name);
        if !continues {
            events.extend(run.take().map(EngineEvent::Stored));
            run =
                Some(StoredBlocks { parent, block_size: size, on_gpu, lora_name, ..StoredBlocks::default() });
        }
        let Some(current) = run.as_mut() else { continue };
        let index = current.blocks.len();
        current.blocks.push(block.block_hash.hash());
        current.token_ids.extend(block.tokens.iter().map(|t| t.token_id));
        // Extra ids mark multimodal or prompt-tuning content: they change the KV from here on.
        let extra: Vec<u8> = block.tokens.iter().flat_map(|t| t.token_extra_id.to_le_bytes()).collect();
        if block.tokens.iter().any(|t| t.token_extra_id != 0) {
            current.extra_content.resize_with(index + 1, Vec::new);
            current.extra_content[index].push(xxh3_64(&extra));
        }
        parent = Some(block.block_hash.hash());
    }
    events.extend(run.map(EngineEvent::Stored));
}

/// Polls `url` (`http://HOST:PORT/kv_cache_events`) every `interval` until the agent stops.
pub async fn run(
    url: String,
    interval: Duration,
    http: HttpClient,
    tx: mpsc::Sender<SourceMsg>,
    metrics: Arc<AgentMetrics>,
    info: Arc<EngineInfo>,
) {
    let mut state = DrainState::default();
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = tx.closed() => return,
        }
        let body = match http.post_json(&url, Bytes::new()).await {
            Ok(body) => body,
            Err(e) => {
                AgentMetrics::count(&metrics.scrape_errors, "events");
                if !std::mem::replace(&mut failing, true) {
                    warn!(url = %url, error = %e, "cannot read TensorRT-LLM KV events; retrying");
                }
                continue;
            }
        };
        failing = false;
        let drain = match decode_drain(&body, &mut state) {
            Ok(drain) => drain,
            Err(e) => {
                metrics.malformed("trtllm_response");
                debug!(url = %url, error = %e, "TensorRT-LLM event answer is not a JSON list");
                continue;
            }
        };
        metrics.decoder_skipped(drain.skipped);
        metrics
            .skipped_events
            .get_or_create(&What { what: "other_window" })
            .inc_by(u64::from(drain.other_window));
        if let Some(blocks) = drain.gpu_blocks {
            info.set_capacity_from_events(blocks);
        }
        for message in drain.messages {
            if let SourceMsg::Batch { rank, .. } = &message {
                metrics.engine_batches.get_or_create(&RankLabel { rank: *rank }).inc();
            }
            if tx.send(message).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(body: &str, state: &mut DrainState) -> Drain {
        decode_drain(body.as_bytes(), state).expect("valid drain")
    }

    fn batches(drain: &Drain) -> Vec<&EngineBatch> {
        drain
            .messages
            .iter()
            .filter_map(|m| match m {
                SourceMsg::Batch { batch, .. } => Some(batch),
                SourceMsg::Reset { .. } => None,
            })
            .collect()
    }

    #[test]
    fn every_event_type_decodes() {
        let body = r#"[
          {"event_id": 0, "window_size": 64, "data": {"type": "created", "num_blocks_per_cache_level": [512, 1024]}},
          {"event_id": 1, "window_size": 64, "data": {"type": "stored", "parent_hash": null, "blocks": [
            {"type": "stored_block", "block_hash": 11, "cache_level": 0, "priority": 35,
             "tokens": [{"type": "unique_token", "token_id": 1, "token_extra_id": 0},
                        {"type": "unique_token", "token_id": 2, "token_extra_id": 0}]},
            {"type": "stored_block", "block_hash": 18446744073709551615, "cache_level": 0, "priority": 35,
             "tokens": [{"type": "unique_token", "token_id": 3, "token_extra_id": 0},
                        {"type": "unique_token", "token_id": 4, "token_extra_id": 7}]}]}},
          {"event_id": 2, "window_size": 64, "data": {"type": "removed", "block_hashes": [11]}},
          {"event_id": 3, "window_size": 64, "data": {"type": "updated", "block_hash": 11,
             "cache_level": {"type": "event_diff", "new_value": 1, "old_value": 0}, "priority": null}},
          {"event_id": 4, "window_size": 64, "data": {"type": "all_cleared"}},
          {"event_id": 5, "window_size": 64, "data": {"type": "pinned"}},
          {"event_id": 6, "window_size": 64, "data": {"type": "stored", "blocks": "nope"}},
          17
        ]"#;
        let mut state = DrainState::default();
        let d = drain(body, &mut state);
        assert_eq!(d.gpu_blocks, Some(512));
        assert_eq!(d.skipped, Skipped { unknown_type: 1, malformed: 2, other_tier: 0 });
        let b = batches(&d);
        assert_eq!(b.len(), 1);
        let EngineEvent::Stored(s) = &b[0].events[0] else { panic!("first event is a store") };
        assert_eq!((s.parent, s.block_size, s.token_ids.clone()), (None, 2, vec![1, 2, 3, 4]));
        assert_eq!(s.blocks, vec![EngineHash(11), EngineHash(u64::MAX)]);
        assert_eq!(s.extra_content.len(), 2);
        assert!(s.extra_content[0].is_empty() && s.extra_content[1].len() == 1);
        assert_eq!(b[0].events[1], EngineEvent::Removed { blocks: vec![EngineHash(11)], group: None });
        assert_eq!(b[0].events[2], EngineEvent::TierChanged { block: EngineHash(11), on_gpu: false });
        assert_eq!(b[0].events[3], EngineEvent::Cleared);
    }

    #[test]
    fn event_id_jumps_and_steps_back_reset_the_rank() {
        let mut state = DrainState::default();
        drain(r#"[{"event_id": 4, "data": {"type": "all_cleared"}}]"#, &mut state);
        let d = drain(r#"[{"event_id": 9, "data": {"type": "all_cleared"}}]"#, &mut state);
        assert!(matches!(d.messages[0], SourceMsg::Reset { rank: 0, reason: ResetReason::LostEvents }));
        let d = drain(
            r#"[{"event_id": 0, "attention_dp_rank": 0, "data": {"type": "all_cleared"}}]"#,
            &mut state,
        );
        assert!(matches!(d.messages[0], SourceMsg::Reset { rank: 0, reason: ResetReason::EngineRestart }));
        // Another rank has its own numbering.
        let d = drain(
            r#"[{"event_id": 50, "attention_dp_rank": 1, "data": {"type": "all_cleared"}}]"#,
            &mut state,
        );
        assert!(matches!(d.messages[..], [SourceMsg::Batch { rank: 1, .. }]));
    }

    #[test]
    fn smaller_windows_are_skipped() {
        let mut state = DrainState::default();
        let d = drain(
            r#"[{"window_size": 4096, "data": {"type": "all_cleared"}},
                {"window_size": 128, "data": {"type": "all_cleared"}}]"#,
            &mut state,
        );
        assert_eq!(d.other_window, 1);
        assert_eq!(batches(&d)[0].events.len(), 1);
    }

    #[test]
    fn host_tier_blocks_form_their_own_run() {
        let mut state = DrainState::default();
        let d = drain(
            r#"[{"data": {"type": "stored", "parent_hash": 5, "blocks": [
                {"block_hash": 1, "cache_level": 0, "tokens": [{"token_id": 1}]},
                {"block_hash": 2, "cache_level": 1, "tokens": [{"token_id": 2}]}]}}]"#,
            &mut state,
        );
        let events = &batches(&d)[0].events;
        assert_eq!(events.len(), 2);
        let (EngineEvent::Stored(a), EngineEvent::Stored(b)) = (&events[0], &events[1]) else {
            panic!("two stores")
        };
        assert_eq!((a.parent, a.on_gpu), (Some(EngineHash(5)), true));
        assert_eq!((b.parent, b.on_gpu), (Some(EngineHash(1)), false));
    }

    #[test]
    fn not_a_list_is_an_error() {
        assert!(decode_drain(b"{\"events\": []}", &mut DrainState::default()).is_err());
        assert!(decode_drain(b"", &mut DrainState::default()).is_err());
    }
}
