//! vLLM's and SGLang's `KVEventBatch` payload (msgpack, written by msgspec): pure decoding.
//!
//! Layouts (docs: `engine-kv-events.md` section 2, fixtures in `tests/fixtures/engines/`):
//! - batch: array `[ts, events, data_parallel_rank, ...]` (2 or more elements; later releases may
//!   append fields), or a map with `events` and `data_parallel_rank` (one unreleased vLLM commit);
//! - event, vLLM >= 0.24 and SGLang: map whose `type` key names it (`BlockStored`, `BlockRemoved`,
//!   `AllBlocksCleared`); optional fields are omitted when None;
//! - event, vLLM <= 0.23: array `["BlockStored", field, ...]` in declaration order, possibly trimmed.
//!
//! Unknown keys and trailing elements are ignored; an unknown `type` is counted and skipped.

use kvmesh_core::hash::TokenId;
use rmpv::ValueRef;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::events::{EngineBatch, EngineEvent, EngineHash, Skipped, StoredBlocks};

/// Deepest nesting a payload may have (batch, events, event, extra_keys, block, pair, string).
const MAX_DEPTH: usize = 32;

/// Seed of the 64-bit names of multimodal identifiers and prompt-embedding digests.
const EXTRA_SEED: u64 = kvmesh_core::hash::HASH_SEED ^ 0x6d6d;

/// `BlockStored` fields in declaration order: the positions of the array form (vLLM <= 0.23).
const STORED_FIELDS: [&str; 11] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
];

/// `BlockRemoved` fields in declaration order.
const REMOVED_FIELDS: [&str; 3] = ["block_hashes", "medium", "group_idx"];

/// Why a payload could not be read as a batch at all.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PayloadError {
    /// Not msgpack (or truncated, or nested too deeply).
    #[error("payload is not msgpack: {0}")]
    NotMsgpack(String),
    /// msgpack, but not a `KVEventBatch`.
    #[error("payload is not a KVEventBatch: {0}")]
    NotABatch(&'static str),
}

/// Decodes one payload: the usable events, and what was skipped.
pub fn decode_batch(payload: &[u8]) -> Result<(EngineBatch, Skipped), PayloadError> {
    let mut reader = payload;
    let value = rmpv::decode::read_value_ref_with_max_depth(&mut reader, MAX_DEPTH)
        .map_err(|e| PayloadError::NotMsgpack(e.to_string()))?;
    let (events, rank) = match &value {
        ValueRef::Array(items) => {
            if items.len() < 2 {
                return Err(PayloadError::NotABatch("batch array has fewer than 2 elements"));
            }
            (&items[1], items.get(2))
        }
        ValueRef::Map(entries) => {
            let events =
                map_get(entries, "events").ok_or(PayloadError::NotABatch("batch map has no events"))?;
            (events, map_get(entries, "data_parallel_rank"))
        }
        _ => return Err(PayloadError::NotABatch("batch is neither an array nor a map")),
    };
    let ValueRef::Array(events) = events else {
        return Err(PayloadError::NotABatch("events is not an array"));
    };
    let dp_rank = rank.and_then(ValueRef::as_u64).and_then(|r| u32::try_from(r).ok());
    let mut batch = EngineBatch { dp_rank, events: Vec::with_capacity(events.len()) };
    let mut skipped = Skipped::default();
    for event in events {
        match decode_event(event) {
            Ok(Some(event)) => batch.events.push(event),
            Ok(None) => skipped.other_tier += 1,
            Err(EventError::UnknownType) => skipped.unknown_type += 1,
            Err(EventError::Malformed) => skipped.malformed += 1,
        }
    }
    Ok((batch, skipped))
}

/// Why one event was skipped.
enum EventError {
    UnknownType,
    Malformed,
}

/// One event's fields, by name, whichever form it came in.
struct Fields<'v, 'a> {
    map: Option<&'v [(ValueRef<'a>, ValueRef<'a>)]>,
    array: &'v [ValueRef<'a>],
    names: &'static [&'static str],
}

impl<'v, 'a> Fields<'v, 'a> {
    /// The field's value; `None` when absent or nil.
    fn get(&self, name: &str) -> Option<&'v ValueRef<'a>> {
        let value = match self.map {
            Some(entries) => map_get(entries, name),
            None => self.names.iter().position(|n| *n == name).and_then(|i| self.array.get(i)),
        };
        value.filter(|v| !matches!(v, ValueRef::Nil))
    }

    fn str(&self, name: &str) -> Result<Option<&'v str>, EventError> {
        match self.get(name) {
            None => Ok(None),
            Some(ValueRef::String(s)) => s.as_str().map(Some).ok_or(EventError::Malformed),
            Some(_) => Err(EventError::Malformed),
        }
    }

    fn u32(&self, name: &str) -> Result<Option<u32>, EventError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()).map(Some).ok_or(EventError::Malformed),
        }
    }
}

/// Decodes one event; `Ok(None)` for an event about another memory tier.
fn decode_event(event: &ValueRef<'_>) -> Result<Option<EngineEvent>, EventError> {
    let (tag, map, array) = match event {
        ValueRef::Map(entries) => {
            let tag = map_get(entries, "type").and_then(as_str).ok_or(EventError::Malformed)?;
            (tag, Some(entries.as_slice()), &[][..])
        }
        ValueRef::Array(items) => {
            let tag = items.first().and_then(as_str).ok_or(EventError::Malformed)?;
            (tag, None, &items[1..])
        }
        _ => return Err(EventError::Malformed),
    };
    match tag {
        "BlockStored" => {
            let fields = Fields { map, array, names: &STORED_FIELDS };
            let stored = decode_stored(&fields)?;
            Ok(stored.on_gpu.then_some(EngineEvent::Stored(stored)))
        }
        "BlockRemoved" => {
            let fields = Fields { map, array, names: &REMOVED_FIELDS };
            let blocks = hashes(fields.get("block_hashes").ok_or(EventError::Malformed)?)?;
            if !is_gpu(fields.str("medium")?) {
                return Ok(None);
            }
            Ok(Some(EngineEvent::Removed { blocks, group: fields.u32("group_idx")? }))
        }
        "AllBlocksCleared" => Ok(Some(EngineEvent::Cleared)),
        _ => Err(EventError::UnknownType),
    }
}

fn decode_stored(fields: &Fields<'_, '_>) -> Result<StoredBlocks, EventError> {
    let blocks = hashes(fields.get("block_hashes").ok_or(EventError::Malformed)?)?;
    let parent = fields.get("parent_block_hash").map(hash).transpose()?;
    let token_ids = tokens(fields.get("token_ids").ok_or(EventError::Malformed)?)?;
    let block_size = fields.u32("block_size")?.ok_or(EventError::Malformed)? as usize;
    let lora_name = match fields.str("lora_name")? {
        Some(name) => Some(name.to_owned()),
        // Before vLLM 0.14 only the adapter's int id was published: a name of our own keeps adapter
        // chains apart from base-model ones (the filter, knowing only names, will not match them).
        None => fields.u32("lora_id")?.map(|id| format!("lora-id:{id}")),
    };
    let mut stored = StoredBlocks {
        parent,
        blocks,
        token_ids,
        block_size,
        lora_name,
        // SGLang names it; vLLM puts it into the first block's extra keys (below).
        cache_salt: fields.str("cache_salt")?.map(str::to_owned),
        extra_content: Vec::new(),
        group: fields.u32("group_idx")?,
        attention_kind: fields.str("kv_cache_spec_kind")?.map(str::to_owned),
        on_gpu: is_gpu(fields.str("medium")?),
    };
    if let Some(ValueRef::Array(per_block)) = fields.get("extra_keys") {
        read_extra_keys(per_block, &mut stored)?;
    }
    Ok(stored)
}

/// vLLM's untagged extra keys, one entry per block: the LoRA name (a string on every block),
/// `[mm_identifier, offset]` pairs, the cache salt (a string, first block of a request only) and a
/// prompt-embeddings digest (bytes). The LoRA name is already known from `lora_name`.
fn read_extra_keys(per_block: &[ValueRef<'_>], stored: &mut StoredBlocks) -> Result<(), EventError> {
    let chain_start = stored.parent.is_none();
    for (i, keys) in per_block.iter().enumerate() {
        let keys = match keys {
            ValueRef::Nil => continue,
            ValueRef::Array(keys) => keys,
            _ => return Err(EventError::Malformed),
        };
        let mut lora_seen = stored.lora_name.is_none();
        for key in keys {
            match key {
                ValueRef::String(s) => {
                    let s = s.as_str().ok_or(EventError::Malformed)?;
                    if !lora_seen && Some(s) == stored.lora_name.as_deref() {
                        lora_seen = true;
                    } else if i == 0 && chain_start && stored.cache_salt.is_none() {
                        stored.cache_salt = Some(s.to_owned());
                    }
                }
                ValueRef::Array(pair) => {
                    let id = pair.first().ok_or(EventError::Malformed)?;
                    let id: &[u8] = match id {
                        ValueRef::String(s) => s.as_str().ok_or(EventError::Malformed)?.as_bytes(),
                        ValueRef::Binary(b) => b,
                        _ => return Err(EventError::Malformed),
                    };
                    push_extra(stored, i, xxh3_64_with_seed(id, EXTRA_SEED));
                }
                ValueRef::Binary(digest) => push_extra(stored, i, xxh3_64_with_seed(digest, EXTRA_SEED)),
                _ => return Err(EventError::Malformed),
            }
        }
    }
    Ok(())
}

fn push_extra(stored: &mut StoredBlocks, block: usize, part: u64) {
    if stored.extra_content.len() <= block {
        stored.extra_content.resize_with(block + 1, Vec::new);
    }
    stored.extra_content[block].push(part);
}

/// vLLM writes `GPU`; SGLang `GPU` too (others: `CPU`, `CPU_PINNED`, `DISK`, `STORAGE`, `EXTERNAL`).
/// Events from before the field existed are GPU events.
fn is_gpu(medium: Option<&str>) -> bool {
    medium.is_none_or(|m| m.eq_ignore_ascii_case("GPU"))
}

fn hashes(value: &ValueRef<'_>) -> Result<Vec<EngineHash>, EventError> {
    match value {
        ValueRef::Array(items) => items.iter().map(hash).collect(),
        _ => Err(EventError::Malformed),
    }
}

/// A block hash: vLLM's u64 (int mode), SGLang's i64, or vLLM's raw digest (bytes mode).
fn hash(value: &ValueRef<'_>) -> Result<EngineHash, EventError> {
    match value {
        ValueRef::Integer(n) => n
            .as_u64()
            .map(EngineHash)
            .or_else(|| n.as_i64().map(EngineHash::from_i64))
            .ok_or(EventError::Malformed),
        ValueRef::Binary(bytes) => Ok(EngineHash::from_digest(bytes)),
        _ => Err(EventError::Malformed),
    }
}

/// Token ids; SGLang's EAGLE bigram keys (`[a, b]` pairs) count as their first token.
fn tokens(value: &ValueRef<'_>) -> Result<Vec<TokenId>, EventError> {
    let ValueRef::Array(items) = value else {
        return Err(EventError::Malformed);
    };
    items
        .iter()
        .map(|item| {
            let item = match item {
                ValueRef::Array(pair) => pair.first().ok_or(EventError::Malformed)?,
                other => other,
            };
            item.as_u64().and_then(|t| TokenId::try_from(t).ok()).ok_or(EventError::Malformed)
        })
        .collect()
}

/// A msgpack string as `&str` (`None` for anything else, invalid UTF-8 included).
fn as_str<'v>(value: &'v ValueRef<'_>) -> Option<&'v str> {
    match value {
        ValueRef::String(s) => s.as_str(),
        _ => None,
    }
}

fn map_get<'v, 'a>(entries: &'v [(ValueRef<'a>, ValueRef<'a>)], key: &str) -> Option<&'v ValueRef<'a>> {
    entries.iter().find(|(k, _)| as_str(k) == Some(key)).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(value: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).expect("writing to a Vec cannot fail");
        out
    }

    fn s(text: &str) -> rmpv::Value {
        rmpv::Value::from(text)
    }

    #[test]
    fn map_batch_and_extra_batch_elements_are_accepted() {
        use rmpv::Value as V;
        let stored = V::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), V::Array(vec![V::from(7u64)])),
            (s("parent_block_hash"), V::Nil),
            (s("token_ids"), V::Array(vec![V::from(1), V::from(2)])),
            (s("block_size"), V::from(2)),
            (s("future_field"), V::from(true)),
        ]);
        let map_batch = V::Map(vec![
            (s("ts"), V::F64(1.0)),
            (s("events"), V::Array(vec![stored.clone()])),
            (s("data_parallel_rank"), V::from(3)),
        ]);
        let (batch, skipped) = decode_batch(&encode(&map_batch)).expect("map batch decodes");
        assert_eq!((batch.dp_rank, batch.events.len(), skipped), (Some(3), 1, Skipped::default()));
        // Upstream main adds a 16-byte publisher id as a 4th element: ignored.
        let long = V::Array(vec![V::F64(1.0), V::Array(vec![stored]), V::Nil, V::Binary(vec![0; 16])]);
        let (batch, _) = decode_batch(&encode(&long)).expect("4-element batch decodes");
        assert_eq!((batch.dp_rank, batch.events.len()), (None, 1));
    }

    #[test]
    fn unknown_and_malformed_events_are_counted_and_skipped() {
        use rmpv::Value as V;
        let events = V::Array(vec![
            V::Map(vec![(s("type"), s("BlockPinned"))]),
            V::Map(vec![(s("type"), s("BlockRemoved")), (s("block_hashes"), s("nope"))]),
            V::Array(vec![s("BlockRemoved"), V::Array(vec![V::from(-5)]), s("GPU")]),
            V::Array(vec![s("BlockRemoved"), V::Array(vec![V::from(9)]), s("CPU")]),
            V::from(42),
            V::Array(vec![s("AllBlocksCleared")]),
        ]);
        let payload = encode(&V::Array(vec![V::F64(0.0), events]));
        let (batch, skipped) = decode_batch(&payload).expect("batch decodes");
        assert_eq!(skipped, Skipped { unknown_type: 1, malformed: 2, other_tier: 1 });
        assert_eq!(
            batch.events,
            vec![
                EngineEvent::Removed { blocks: vec![EngineHash::from_i64(-5)], group: None },
                EngineEvent::Cleared
            ]
        );
    }

    #[test]
    fn payloads_that_are_not_batches_are_errors() {
        use rmpv::Value as V;
        assert!(decode_batch(&[0xc1]).is_err());
        assert!(matches!(decode_batch(&[]), Err(PayloadError::NotMsgpack(_))));
        assert!(matches!(
            decode_batch(&encode(&V::Array(vec![V::F64(0.0)]))),
            Err(PayloadError::NotABatch(_))
        ));
        assert!(matches!(decode_batch(&encode(&V::from(5))), Err(PayloadError::NotABatch(_))));
        // A claimed 4-billion-element array with nothing behind it must fail fast, not allocate.
        assert!(decode_batch(&[0x92, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        let deep = vec![0x91; 10_000];
        assert!(decode_batch(&deep).is_err());
    }

    #[test]
    fn extra_keys_give_cache_salt_and_content_hashes() {
        use rmpv::Value as V;
        let stored = V::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), V::Array(vec![V::from(1), V::from(2)])),
            (s("parent_block_hash"), V::Nil),
            (s("token_ids"), V::Array((0..4).map(V::from).collect())),
            (s("block_size"), V::from(2)),
            (s("lora_name"), s("sql")),
            (
                s("extra_keys"),
                V::Array(vec![
                    V::Array(vec![s("sql"), V::Array(vec![s("img-1"), V::from(0)]), s("tenant")]),
                    V::Array(vec![s("sql"), V::Binary(vec![1, 2, 3])]),
                ]),
            ),
        ]);
        let payload = encode(&V::Array(vec![V::F64(0.0), V::Array(vec![stored]), V::from(0)]));
        let (batch, _) = decode_batch(&payload).expect("batch decodes");
        let EngineEvent::Stored(stored) = &batch.events[0] else { panic!("expected a store") };
        assert_eq!(stored.cache_salt.as_deref(), Some("tenant"));
        assert_eq!(stored.lora_name.as_deref(), Some("sql"));
        assert_eq!(stored.extra_content.len(), 2);
        assert_eq!(stored.extra_content[0], vec![xxh3_64_with_seed(b"img-1", EXTRA_SEED)]);
        assert_eq!(stored.extra_content[1], vec![xxh3_64_with_seed(&[1, 2, 3], EXTRA_SEED)]);
    }
}
