//! Why a request went where it went: the serialisable account of one decision, built only on request
//! (the admin `explain` endpoint, debug logs), never on the hot path.

use serde::{Deserialize, Serialize};

use crate::fleet::{WorkerId, WorkerSlot};

use super::config::{CostWeights, LoadLimits, PolicyKind};

/// Why a worker was not a candidate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipReason {
    /// It serves another model.
    OtherModel,
    /// An operator cordoned it.
    Cordoned,
    /// It is draining before removal.
    Draining,
    /// Its role is prefill only; it does not generate.
    PrefillOnly,
    /// Its KV usage is at or above the limit.
    OverloadedKv,
    /// Its engine queue is at or above the limit.
    OverloadedQueue,
}

impl SkipReason {
    /// Whether the worker serves the model and takes requests, but is too loaded right now.
    pub fn is_overload(self) -> bool {
        matches!(self, SkipReason::OverloadedKv | SkipReason::OverloadedQueue)
    }
}

/// What came of a routing decision, without its data.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    /// A worker was chosen.
    Routed,
    /// Workers serve the model but all are overloaded (answer 429).
    Shed,
    /// No ready, decode-capable worker serves the model (answer 503).
    NoWorker,
}

/// A worker named by identity and address.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WorkerRef {
    /// Stable identity.
    pub id: WorkerId,
    /// `ip:port`.
    pub address: String,
}

/// The request as the scorer saw it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RequestFigures {
    /// Full blocks hashed.
    pub hashed_blocks: u64,
    /// Prompt tokens (at least the hashed blocks' tokens).
    pub prompt_tokens: u64,
    /// Expected output tokens, if the request said.
    pub expected_output_tokens: Option<u64>,
    /// Blocks the request will hold while decoding (prompt plus expected output).
    pub request_blocks: u64,
    /// Tokens per block.
    pub block_size: u32,
}

/// One worker's part in a decision.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct CandidateExplanation {
    /// Stable identity.
    pub worker: WorkerId,
    /// `ip:port`.
    pub address: String,
    /// Dense slot in this process.
    pub slot: WorkerSlot,
    /// Leading request blocks cached there (predicted, under approx-prefix; 0 when the policy ignores it).
    pub overlap_blocks: u32,
    /// Uncached request blocks plus the worker's pending prefill, in blocks.
    pub prefill_blocks: u64,
    /// Blocks in use there plus the request's own.
    pub decode_blocks: u64,
    /// Requests the engine runs.
    pub running: u32,
    /// Requests queued in the engine.
    pub waiting: u32,
    /// KV usage the engine reports, 0 to 1.
    pub kv_usage: f32,
    /// Requests this proxy has in flight there.
    pub inflight_requests: u32,
    /// Prompt tokens this proxy sent there that are not prefilled yet.
    pub inflight_prefill_tokens: u64,
    /// The cost (lower wins); absent when the worker was not scored (another model, not ready, wrong role).
    pub cost: Option<f64>,
    /// Why it was not a candidate, if it was not.
    pub skipped: Option<SkipReason>,
}

/// The account of one routing decision.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Explanation {
    /// Policy that decided.
    pub policy: PolicyKind,
    /// Requested model.
    pub model: String,
    /// What came of it.
    pub outcome: OutcomeKind,
    /// The chosen worker, when routed.
    pub chosen: Option<WorkerRef>,
    /// Next-best workers, in order, for the override-host header.
    pub fallbacks: Vec<WorkerRef>,
    /// The request's figures.
    pub request: RequestFigures,
    /// Weights in force.
    pub weights: CostWeights,
    /// Temperature in force.
    pub temperature: f64,
    /// Load limits in force.
    pub limits: LoadLimits,
    /// Every worker of the fleet, in slot order.
    pub candidates: Vec<CandidateExplanation>,
}
