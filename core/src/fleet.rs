//! The fleet: which workers exist, what they serve, and a dense slot for each so that the index and
//! the scorer work on small integers instead of strings.

use std::fmt;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::error::Error;
use crate::load::WorkerLoad;

/// Stable identity of a worker, as its agent registers it (`vllm-0`, a pod name).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub String);

impl WorkerId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for WorkerId {
    fn from(s: &str) -> Self {
        WorkerId(s.to_owned())
    }
}

/// Dense handle of a worker inside one process (index into the fleet table). Slots of removed
/// workers are reused, so a slot never outlives its worker in any structure keyed by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerSlot(pub u16);

impl WorkerSlot {
    /// The slot as an index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Most workers one fleet table holds (slots are u16; one value is kept as a sentinel).
pub const MAX_WORKERS: usize = u16::MAX as usize;

/// Which inference engine a worker runs; decides its wire formats.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// vLLM (ZMQ KV events, NixlConnector P/D).
    #[default]
    Vllm,
    /// SGLang (ZMQ KV events, bootstrap P/D).
    Sglang,
    /// TensorRT-LLM (HTTP KV events, disaggregated_params P/D).
    Trtllm,
}

/// What part of a request a worker takes in disaggregated serving.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Prefill only: computes the prompt's KV and hands it to a decode worker.
    Prefill,
    /// Decode only: receives transferred KV and generates.
    Decode,
    /// Prefill and decode on the same worker (aggregated serving).
    #[default]
    Both,
}

impl Role {
    /// Whether requests may be sent here to generate tokens.
    pub fn decodes(self) -> bool {
        matches!(self, Role::Decode | Role::Both)
    }

    /// Whether this worker may serve as the remote prefill of a disaggregated request.
    pub fn prefills(self) -> bool {
        matches!(self, Role::Prefill | Role::Both)
    }
}

/// Whether a worker takes new requests.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Takes new requests.
    #[default]
    Ready,
    /// Takes no new requests; in-flight ones finish (an operator's cordon).
    Cordoned,
    /// Takes no new requests and is on its way out (drain before removal).
    Draining,
}

/// What a worker is, as registered.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Stable identity.
    pub id: WorkerId,
    /// Where clients reach it, `ip:port` (what the override-host header carries).
    pub address: String,
    /// Served model name (as in the OpenAI `model` field).
    pub model: String,
    /// Engine kind.
    #[serde(default)]
    pub engine: Engine,
    /// Prefill/decode role.
    #[serde(default)]
    pub role: Role,
    /// Tokens per KV block, as the engine reports it.
    pub block_size: u32,
    /// Whether it takes new requests.
    #[serde(default)]
    pub state: WorkerState,
}

/// One worker's entry: what it is and how loaded it is.
#[derive(Clone, Debug)]
pub struct WorkerEntry {
    /// Registration.
    pub info: WorkerInfo,
    /// Latest load view.
    pub load: WorkerLoad,
}

/// The table of known workers, addressed by slot.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    slots: Vec<Option<WorkerEntry>>,
    by_id: HashMap<WorkerId, WorkerSlot>,
    free: Vec<WorkerSlot>,
}

impl Fleet {
    /// An empty fleet.
    pub fn new() -> Self {
        Fleet::default()
    }

    /// Adds a worker, or updates its registration when the id is known; returns its slot.
    /// The load view of a known worker is kept.
    pub fn upsert(&mut self, info: WorkerInfo) -> Result<WorkerSlot, Error> {
        if let Some(&slot) = self.by_id.get(&info.id) {
            let entry = self.slots[slot.index()].as_mut().expect("by_id points only at occupied slots");
            entry.info = info;
            return Ok(slot);
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.slots.len() < MAX_WORKERS => {
                self.slots.push(None);
                WorkerSlot((self.slots.len() - 1) as u16)
            }
            None => return Err(Error::TooManyWorkers { limit: MAX_WORKERS }),
        };
        self.by_id.insert(info.id.clone(), slot);
        self.slots[slot.index()] = Some(WorkerEntry { info, load: WorkerLoad::default() });
        Ok(slot)
    }

    /// Removes a worker; returns its slot, which the caller must clear from every index.
    pub fn remove(&mut self, id: &WorkerId) -> Option<WorkerSlot> {
        let slot = self.by_id.remove(id)?;
        self.slots[slot.index()] = None;
        self.free.push(slot);
        Some(slot)
    }

    /// Slot of a worker by id.
    pub fn slot(&self, id: &WorkerId) -> Option<WorkerSlot> {
        self.by_id.get(id).copied()
    }

    /// Entry at a slot.
    pub fn get(&self, slot: WorkerSlot) -> Option<&WorkerEntry> {
        self.slots.get(slot.index()).and_then(Option::as_ref)
    }

    /// Mutable entry at a slot.
    pub fn get_mut(&mut self, slot: WorkerSlot) -> Option<&mut WorkerEntry> {
        self.slots.get_mut(slot.index()).and_then(Option::as_mut)
    }

    /// Sets a worker's state; false when the id is unknown.
    pub fn set_state(&mut self, id: &WorkerId, state: WorkerState) -> bool {
        match self.slot(id).and_then(|s| self.slots[s.index()].as_mut()) {
            Some(entry) => {
                entry.info.state = state;
                true
            }
            None => false,
        }
    }

    /// Every worker with its slot, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (WorkerSlot, &WorkerEntry)> {
        self.slots.iter().enumerate().filter_map(|(i, e)| e.as_ref().map(|e| (WorkerSlot(i as u16), e)))
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no worker is known.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// One past the highest slot in use: the length a per-slot array needs.
    pub fn slot_bound(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            address: format!("127.0.0.1:{}", 9000 + id.len()),
            model: "m".into(),
            engine: Engine::Vllm,
            role: Role::Both,
            block_size: 16,
            state: WorkerState::Ready,
        }
    }

    #[test]
    fn upsert_keeps_slot_and_load() {
        let mut fleet = Fleet::new();
        let a = fleet.upsert(info("a")).unwrap();
        fleet.get_mut(a).unwrap().load.running = 3;
        let mut changed = info("a");
        changed.role = Role::Prefill;
        assert_eq!(fleet.upsert(changed).unwrap(), a);
        let entry = fleet.get(a).unwrap();
        assert_eq!(entry.info.role, Role::Prefill);
        assert_eq!(entry.load.running, 3);
    }

    #[test]
    fn removed_slot_is_reused() {
        let mut fleet = Fleet::new();
        let a = fleet.upsert(info("a")).unwrap();
        let b = fleet.upsert(info("b")).unwrap();
        assert_ne!(a, b);
        assert_eq!(fleet.remove(&"a".into()), Some(a));
        assert!(fleet.get(a).is_none());
        assert_eq!(fleet.upsert(info("c")).unwrap(), a);
        assert_eq!(fleet.len(), 2);
        assert_eq!(fleet.iter().map(|(_, e)| e.info.id.as_str()).collect::<Vec<_>>(), ["c", "b"]);
    }

    #[test]
    fn set_state_on_unknown_worker_is_false() {
        let mut fleet = Fleet::new();
        assert!(!fleet.set_state(&"nope".into(), WorkerState::Cordoned));
        fleet.upsert(info("a")).unwrap();
        assert!(fleet.set_state(&"a".into(), WorkerState::Draining));
        assert_eq!(fleet.get(WorkerSlot(0)).unwrap().info.state, WorkerState::Draining);
    }
}
