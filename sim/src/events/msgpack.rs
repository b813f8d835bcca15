//! `KVEventBatch` payloads exactly as msgspec 0.22 encodes them for vLLM 0.33 and SGLang 0.5.23.
//!
//! - The batch is an array `[ts, events, data_parallel_rank]`, `ts` always float64 (`0xcb`).
//! - Each event is a map whose first key is `"type"` (the class name), then the fields in
//!   declaration order; optional fields that are None are left out, required ones are written as nil.
//! - msgspec sizes a struct's map header by its number of fields, so vLLM's `BlockStored` (15 fields
//!   plus the tag) is always map16 (`0xde 00 NN`); every other event fits a fixmap.
//! - Ints take the smallest form; vLLM's hashes are u64 (`0xcf` above 2^63), SGLang's are i64.
//!
//! SGLang's recorder also coalesces: consecutive stores continuing the previous tail merge into one
//! `BlockStored`, and consecutive removals merge into one `BlockRemoved` with many hashes.

use std::convert::Infallible;

use rmp::encode::{self, ByteBuf, ValueWriteError};

use crate::cache::CacheEvent;
use kvmesh_core::hash::BlockHash;

/// Which engine's event layout to write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// vLLM ≥ 0.24 (map-form events, u64 hashes, `extra_keys`, `group_idx`, `kv_cache_spec_kind`).
    Vllm,
    /// SGLang 0.5.x (i64 hashes, `cache_salt`, coalesced stores and removals).
    Sglang,
}

/// Writes into a `Vec`-backed buffer, which cannot fail.
struct Writer(ByteBuf);

fn infallible<T>(r: Result<T, ValueWriteError<Infallible>>) -> T {
    match r {
        Ok(v) => v,
        Err(ValueWriteError::InvalidMarkerWrite(e) | ValueWriteError::InvalidDataWrite(e)) => match e {},
    }
}

impl Writer {
    fn array(&mut self, len: usize) {
        infallible(encode::write_array_len(&mut self.0, len as u32));
    }
    fn fixmap(&mut self, len: usize) {
        infallible(encode::write_map_len(&mut self.0, len as u32));
    }
    /// A map16 header whatever the length, as msgspec writes structs with 16 or more fields.
    fn map16(&mut self, len: usize) {
        self.0.as_mut_vec().push(0xde);
        self.0.as_mut_vec().extend_from_slice(&(len as u16).to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        infallible(encode::write_str(&mut self.0, s));
    }
    fn uint(&mut self, v: u64) {
        infallible(encode::write_uint(&mut self.0, v));
    }
    fn sint(&mut self, v: i64) {
        infallible(encode::write_sint(&mut self.0, v));
    }
    fn nil(&mut self) {
        match encode::write_nil(&mut self.0) {
            Ok(()) => {}
            Err(e) => match e {},
        }
    }
    fn f64(&mut self, v: f64) {
        infallible(encode::write_f64(&mut self.0, v));
    }
    fn hash(&mut self, layout: Layout, h: BlockHash) {
        match layout {
            Layout::Vllm => self.uint(h.0),
            Layout::Sglang => self.sint(h.0 as i64),
        }
    }
}

/// One event as it goes on the wire: a removal may carry many hashes (SGLang, TRT-LLM).
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) enum WireEvent {
    /// Stored blocks continuing after `parent`.
    Stored {
        /// Hash of the block before the first one.
        parent: Option<BlockHash>,
        /// The blocks.
        blocks: Vec<BlockHash>,
        /// Their tokens, concatenated.
        token_ids: Vec<u32>,
        /// The request's cache salt.
        cache_salt: Option<std::sync::Arc<str>>,
    },
    /// Evicted blocks.
    Removed(Vec<BlockHash>),
    /// Everything dropped.
    Cleared,
}

/// The events one for one, as vLLM publishes them (one hash per removal).
pub(crate) fn one_for_one(events: &[CacheEvent]) -> Vec<WireEvent> {
    events
        .iter()
        .map(|e| match e {
            CacheEvent::Stored { parent, blocks, token_ids, cache_salt } => WireEvent::Stored {
                parent: *parent,
                blocks: blocks.clone(),
                token_ids: token_ids.clone(),
                cache_salt: cache_salt.clone(),
            },
            CacheEvent::Removed { block } => WireEvent::Removed(vec![*block]),
            CacheEvent::Cleared => WireEvent::Cleared,
        })
        .collect()
}

/// SGLang's recorder (and TRT-LLM's event manager): stores that continue the previous store's tail
/// under the same salt merge into one, and consecutive removals merge into one.
pub(crate) fn coalesce(events: &[CacheEvent]) -> Vec<WireEvent> {
    let mut out: Vec<WireEvent> = Vec::with_capacity(events.len());
    for event in one_for_one(events) {
        match (out.last_mut(), event) {
            (Some(WireEvent::Removed(prev)), WireEvent::Removed(more)) => prev.extend(more),
            (
                Some(WireEvent::Stored { blocks: pb, token_ids: pt, cache_salt: ps, .. }),
                WireEvent::Stored { parent: Some(parent), blocks, token_ids, cache_salt },
            ) if pb.last() == Some(&parent) && *ps == cache_salt => {
                pb.extend(blocks);
                pt.extend(token_ids);
            }
            (_, event) => out.push(event),
        }
    }
    out
}

/// Encodes one step's events as a `KVEventBatch` payload.
pub fn encode_batch(
    layout: Layout,
    ts: f64,
    events: &[CacheEvent],
    block_size: usize,
    dp_rank: u32,
) -> Vec<u8> {
    let events = match layout {
        Layout::Vllm => one_for_one(events),
        Layout::Sglang => coalesce(events),
    };
    let mut w = Writer(ByteBuf::with_capacity(64 + events.len() * 64));
    w.array(3);
    w.f64(ts);
    w.array(events.len());
    for event in &events {
        match (layout, event) {
            (Layout::Vllm, WireEvent::Stored { parent, blocks, token_ids, cache_salt }) => {
                w.map16(11);
                w.str("type");
                w.str("BlockStored");
                write_common_stored(&mut w, layout, *parent, blocks, token_ids, block_size);
                w.str("lora_name");
                w.nil();
                // One entry per block: the untagged extra keys; a salt marks only the first block.
                w.str("extra_keys");
                w.array(blocks.len());
                for i in 0..blocks.len() {
                    match cache_salt {
                        Some(salt) if i == 0 && parent.is_none() => {
                            w.array(1);
                            w.str(salt);
                        }
                        _ => w.nil(),
                    }
                }
                w.str("group_idx");
                w.uint(0);
                w.str("kv_cache_spec_kind");
                w.str("full_attention");
            }
            (Layout::Sglang, WireEvent::Stored { parent, blocks, token_ids, cache_salt }) => {
                w.fixmap(7 + usize::from(cache_salt.is_some()));
                w.str("type");
                w.str("BlockStored");
                write_common_stored(&mut w, layout, *parent, blocks, token_ids, block_size);
                if let Some(salt) = cache_salt {
                    w.str("cache_salt");
                    w.str(salt);
                }
            }
            (_, WireEvent::Removed(hashes)) => {
                w.fixmap(if layout == Layout::Vllm { 4 } else { 3 });
                w.str("type");
                w.str("BlockRemoved");
                w.str("block_hashes");
                w.array(hashes.len());
                for &h in hashes {
                    w.hash(layout, h);
                }
                w.str("medium");
                w.str("GPU");
                if layout == Layout::Vllm {
                    w.str("group_idx");
                    w.uint(0);
                }
            }
            (_, WireEvent::Cleared) => {
                w.fixmap(1);
                w.str("type");
                w.str("AllBlocksCleared");
            }
        }
    }
    w.uint(u64::from(dp_rank));
    w.0.into_vec()
}

/// `block_hashes`, `parent_block_hash`, `token_ids`, `block_size`, `lora_id`, `medium`: the fields
/// both engines write first, in this order.
fn write_common_stored(
    w: &mut Writer,
    layout: Layout,
    parent: Option<BlockHash>,
    blocks: &[BlockHash],
    token_ids: &[u32],
    block_size: usize,
) {
    w.str("block_hashes");
    w.array(blocks.len());
    for &h in blocks {
        w.hash(layout, h);
    }
    w.str("parent_block_hash");
    match parent {
        Some(p) => w.hash(layout, p),
        None => w.nil(),
    }
    w.str("token_ids");
    w.array(token_ids.len());
    for &t in token_ids {
        w.uint(u64::from(t));
    }
    w.str("block_size");
    w.uint(block_size as u64);
    w.str("lora_id");
    w.nil();
    w.str("medium");
    w.str("GPU");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;
    use std::sync::Arc;

    const VLLM: &str = include_str!("../../../tests/fixtures/engines/vllm-0.33.0-bind_int_sha256.json");
    const SGLANG: &str = include_str!("../../../tests/fixtures/engines/sglang-0.5.23-bind_int64.json");

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn field<'a>(event: &'a Value, key: &str) -> Option<&'a Value> {
        event.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    fn hash(v: &Value) -> BlockHash {
        BlockHash(v.as_u64().unwrap_or_else(|| v.as_i64().unwrap() as u64))
    }

    /// The fixture's events as cache events, or None when they use a field the sim never emits
    /// (LoRA, session ids).
    fn to_cache_events(events: &[Value]) -> Option<Vec<CacheEvent>> {
        let mut out = Vec::new();
        for e in events {
            match field(e, "type")?.as_str()? {
                "BlockStored" => {
                    if field(e, "lora_name").is_some_and(|v| !v.is_nil()) || field(e, "session_id").is_some()
                    {
                        return None;
                    }
                    let parent = field(e, "parent_block_hash").filter(|v| !v.is_nil()).map(hash);
                    let salt = field(e, "cache_salt").and_then(Value::as_str).map(Arc::from).or_else(|| {
                        let first =
                            field(e, "extra_keys")?.as_array()?.first()?.as_array()?.first()?.as_str()?;
                        Some(Arc::from(first))
                    });
                    out.push(CacheEvent::Stored {
                        parent,
                        blocks: field(e, "block_hashes")?.as_array()?.iter().map(hash).collect(),
                        token_ids: field(e, "token_ids")?
                            .as_array()?
                            .iter()
                            .map(|t| t.as_u64().unwrap() as u32)
                            .collect(),
                        cache_salt: salt,
                    });
                }
                "BlockRemoved" => {
                    for h in field(e, "block_hashes")?.as_array()? {
                        out.push(CacheEvent::Removed { block: hash(h) });
                    }
                }
                "AllBlocksCleared" => out.push(CacheEvent::Cleared),
                _ => return None,
            }
        }
        Some(out)
    }

    /// Re-encodes every fixture batch the sim can express and compares the bytes.
    fn check(fixture: &str, layout: Layout) -> usize {
        let v: serde_json::Value = serde_json::from_str(fixture).unwrap();
        let mut same = 0;
        for batch in v["live"].as_array().unwrap() {
            let payload = unhex(batch["frames_hex"][2].as_str().unwrap());
            let decoded = rmpv::decode::read_value(&mut payload.as_slice()).unwrap();
            let items = decoded.as_array().unwrap();
            let ts = items[0].as_f64().unwrap();
            let Some(events) = to_cache_events(items[1].as_array().unwrap()) else { continue };
            let ours = encode_batch(layout, ts, &events, 16, 0);
            assert_eq!(ours, payload, "batch seq {}", batch["seq"]);
            same += 1;
        }
        same
    }

    #[test]
    fn vllm_batches_match_captured_frames_byte_for_byte() {
        // 11 batches; the LoRA one and the session-id one use fields the sim never sets.
        assert_eq!(check(VLLM, Layout::Vllm), 9);
    }

    #[test]
    fn sglang_batches_match_captured_frames_byte_for_byte() {
        assert_eq!(check(SGLANG, Layout::Sglang), 6);
    }

    #[test]
    fn vllm_block_stored_is_always_map16() {
        let events = [CacheEvent::Stored {
            parent: None,
            blocks: vec![BlockHash(u64::MAX)],
            token_ids: vec![1; 4],
            cache_salt: None,
        }];
        let bytes = encode_batch(Layout::Vllm, 1.5, &events, 4, 0);
        assert_eq!(&bytes[..10], &[0x93, 0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[10..14], &[0x91, 0xde, 0x00, 0x0b]);
    }

    #[test]
    fn sglang_coalesces_chains_and_removals() {
        let stored = |parent: Option<u64>, b: u64| CacheEvent::Stored {
            parent: parent.map(BlockHash),
            blocks: vec![BlockHash(b)],
            token_ids: vec![7; 2],
            cache_salt: None,
        };
        let events = [
            CacheEvent::Removed { block: BlockHash(9) },
            CacheEvent::Removed { block: BlockHash(8) },
            stored(None, 1),
            stored(Some(1), 2),
            stored(Some(5), 6),
        ];
        let wire = coalesce(&events);
        assert_eq!(wire.len(), 3);
        assert_eq!(wire[0], WireEvent::Removed(vec![BlockHash(9), BlockHash(8)]));
        assert!(matches!(&wire[1], WireEvent::Stored { blocks, .. } if blocks.len() == 2));
    }
}
