//! The prefill/decode decision (conditional disaggregation, DESIGN.md section 5).
//!
//! After the scorer picked a decode worker, a request is prefilled remotely only when both hold:
//! - the prompt tokens the decode worker does not have cached (`prompt - overlap * block size`) reach
//!   `min_remote_prefill_tokens`: below that, moving the KV costs about what computing it locally does;
//! - some Ready prefill-capable worker of the model (role Prefill; Both too when `allow_both_role`)
//!   has room: its pending prefill, engine queue and KV usage are under the limits.
//!
//! The prefill worker is the one with the least prefill work: uncached blocks on it (its own cached
//! prefix counts there too) plus its pending prefill blocks. Its decode load does not matter.
//! Otherwise the decode worker prefills locally, and the decision says why.
//!
//! The engines' protocols (vLLM, SGLang, TRT-LLM) live beside this file, one adapter each.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::fleet::{Fleet, Role, WorkerSlot, WorkerState};
use crate::index::{Overlap, PrefixIndex};
use crate::load::WorkerLoad;
use crate::score::{Decision, RouteInput, Shape, check_fraction, check_positive};

/// The default of every disaggregation setting, in one place.
pub mod defaults {
    /// Disaggregate when it pays; with no prefill-role workers this is always local anyway.
    pub const ENABLED: bool = true;
    /// Uncached prompt tokens from which a remote prefill pays for the KV transfer.
    pub const MIN_REMOTE_PREFILL_TOKENS: u64 = 1024;
    /// Aggregated (role Both) workers do not serve as remote prefill unless asked.
    pub const ALLOW_BOTH_ROLE: bool = false;
    /// Pending prefill tokens (sent by this proxy, no first byte yet) at which a prefill worker is full:
    /// a few engine steps at vLLM's default 8192 batched tokens.
    pub const MAX_PENDING_PREFILL_TOKENS: u64 = 32_768;
    /// Engine queue length at which a prefill worker is full.
    pub const MAX_WAITING: u32 = 8;
    /// KV usage at which a prefill worker is full.
    pub const MAX_KV_USAGE: f32 = 0.95;
}

/// When and where to prefill remotely, for one model.
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DisaggConfig {
    /// Whether requests may be disaggregated at all.
    pub enabled: bool,
    /// Uncached prompt tokens on the decode worker from which a remote prefill is worth it.
    pub min_remote_prefill_tokens: u64,
    /// Whether role-Both workers may serve as remote prefill.
    pub allow_both_role: bool,
    /// A prefill worker with this many pending prefill tokens has no room.
    pub max_pending_prefill_tokens: u64,
    /// A prefill worker with this many queued requests has no room.
    pub max_waiting: u32,
    /// A prefill worker at this KV usage (0 to 1) has no room.
    pub max_kv_usage: f32,
}

impl Default for DisaggConfig {
    fn default() -> Self {
        DisaggConfig {
            enabled: defaults::ENABLED,
            min_remote_prefill_tokens: defaults::MIN_REMOTE_PREFILL_TOKENS,
            allow_both_role: defaults::ALLOW_BOTH_ROLE,
            max_pending_prefill_tokens: defaults::MAX_PENDING_PREFILL_TOKENS,
            max_waiting: defaults::MAX_WAITING,
            max_kv_usage: defaults::MAX_KV_USAGE,
        }
    }
}

impl DisaggConfig {
    /// Checks every value's range; the error names the first offending field.
    pub fn validate(&self) -> Result<(), Error> {
        // At 0 even a fully cached prompt would be sent away to prefill nothing.
        check_positive("min_remote_prefill_tokens", self.min_remote_prefill_tokens)?;
        check_positive("max_pending_prefill_tokens", self.max_pending_prefill_tokens)?;
        check_positive("max_waiting", u64::from(self.max_waiting))?;
        check_fraction("max_kv_usage", self.max_kv_usage)?;
        Ok(())
    }
}

/// Why a request is prefilled on its decode worker.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalReason {
    /// Disaggregation is off for the model.
    Disabled,
    /// The request was not routed (shed, or no worker), so there is nothing to split.
    NotRouted,
    /// Too few uncached tokens for a transfer to pay.
    ShortPrefill,
    /// No Ready prefill-capable worker serves the model.
    NoPrefillWorker,
    /// Every prefill-capable worker is at a limit.
    PrefillWorkersBusy,
}

/// Where a request is prefilled.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PdMode {
    /// On the decode worker.
    Local {
        /// Why not remotely.
        reason: LocalReason,
    },
    /// On a prefill worker, whose KV then moves to the decode worker.
    Remote {
        /// The prefill worker.
        prefill: WorkerSlot,
    },
}

/// The prefill/decode decision with the figures behind it (serialisable as its own explanation).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PdDecision {
    /// Local or remote, and where or why.
    pub mode: PdMode,
    /// Prompt tokens the decode worker does not hold cached.
    pub uncached_tokens: u64,
    /// The threshold in force.
    pub min_remote_prefill_tokens: u64,
    /// Prefill-capable workers of the model that were looked at (0 when the prefill was short).
    pub prefill_candidates: u32,
    /// Of those, how many had no room.
    pub prefill_busy: u32,
    /// Leading request blocks cached on the chosen prefill worker.
    pub prefill_overlap_blocks: u32,
    /// Prompt tokens the chosen prefill worker computes (what its `begin_request` takes).
    pub prefill_tokens: u64,
    /// The chosen prefill worker's cost: uncached blocks there plus its pending prefill blocks.
    pub prefill_cost_blocks: u64,
}

impl PdDecision {
    /// The remote prefill worker, if disaggregated.
    pub fn prefill_worker(&self) -> Option<WorkerSlot> {
        match self.mode {
            PdMode::Remote { prefill } => Some(prefill),
            PdMode::Local { .. } => None,
        }
    }

    fn local(self, reason: LocalReason) -> PdDecision {
        PdDecision { mode: PdMode::Local { reason }, ..self }
    }
}

/// Makes the prefill/decode decision, reusing its buffers from one call to the next.
#[derive(Clone, Debug, Default)]
pub struct Disaggregator {
    config: DisaggConfig,
    overlaps: Vec<Overlap>,
    overlap_by_slot: Vec<u32>,
}

impl Disaggregator {
    /// A disaggregator for a (validated) configuration.
    pub fn new(config: DisaggConfig) -> Result<Disaggregator, Error> {
        config.validate()?;
        Ok(Disaggregator { config, overlaps: Vec::new(), overlap_by_slot: Vec::new() })
    }

    /// Its configuration.
    pub fn config(&self) -> &DisaggConfig {
        &self.config
    }

    /// Decides where the request `decode` routed is prefilled. `index` is the fleet's index from KV
    /// events (prefill workers' caches count too).
    pub fn decide(
        &mut self,
        input: &RouteInput<'_>,
        decode: &Decision,
        fleet: &Fleet,
        index: &PrefixIndex,
    ) -> PdDecision {
        let config = self.config;
        let shape = Shape::new(
            input.hashes.len(),
            input.prompt_tokens,
            input.expected_output_tokens,
            input.block_size,
        );
        let uncached_tokens = shape.uncached_tokens(decode.overlap_blocks);
        let base = PdDecision {
            mode: PdMode::Local { reason: LocalReason::Disabled },
            uncached_tokens,
            min_remote_prefill_tokens: config.min_remote_prefill_tokens,
            prefill_candidates: 0,
            prefill_busy: 0,
            prefill_overlap_blocks: 0,
            prefill_tokens: 0,
            prefill_cost_blocks: 0,
        };
        if !config.enabled {
            return base.local(LocalReason::Disabled);
        }
        let Some(decode_worker) = decode.worker() else { return base.local(LocalReason::NotRouted) };
        if uncached_tokens < config.min_remote_prefill_tokens {
            return base.local(LocalReason::ShortPrefill);
        }

        index.longest_prefix(input.hashes, &mut self.overlaps);
        self.overlap_by_slot.clear();
        self.overlap_by_slot.resize(fleet.slot_bound(), 0);
        for o in &self.overlaps {
            if let Some(blocks) = self.overlap_by_slot.get_mut(o.worker.index()) {
                *blocks = o.blocks;
            }
        }
        let mut decision = base;
        // (cost, waiting, in flight, slot): the first is what matters, the rest make ties deterministic.
        let mut best: Option<(u64, u32, u32, WorkerSlot, u32)> = None;
        for (slot, entry) in fleet.iter() {
            let (info, load) = (&entry.info, &entry.load);
            let capable = info.role == Role::Prefill || (config.allow_both_role && info.role == Role::Both);
            // The decode worker itself is not a remote prefill: that is the local case.
            if info.model != input.model
                || info.state != WorkerState::Ready
                || !capable
                || slot == decode_worker
            {
                continue;
            }
            decision.prefill_candidates += 1;
            if !has_room(load, &config) {
                decision.prefill_busy += 1;
                continue;
            }
            let overlap = self.overlap_by_slot.get(slot.index()).copied().unwrap_or(0);
            let cost = shape
                .uncached_tokens(overlap)
                .div_ceil(shape.block_size)
                .saturating_add(load.inflight_prefill_tokens.div_ceil(shape.block_size));
            let key = (cost, load.waiting, load.inflight_requests, slot, overlap);
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        match best {
            Some((cost, _, _, prefill, overlap)) => PdDecision {
                mode: PdMode::Remote { prefill },
                prefill_overlap_blocks: overlap,
                prefill_tokens: shape.uncached_tokens(overlap),
                prefill_cost_blocks: cost,
                ..decision
            },
            None if decision.prefill_candidates == 0 => decision.local(LocalReason::NoPrefillWorker),
            None => decision.local(LocalReason::PrefillWorkersBusy),
        }
    }
}

/// Whether a prefill worker can take one more prefill.
fn has_room(load: &WorkerLoad, config: &DisaggConfig) -> bool {
    load.inflight_prefill_tokens < config.max_pending_prefill_tokens
        && load.waiting < config.max_waiting
        // An engine that reports no figure (NaN) is taken as empty rather than full.
        && (load.kv_usage.is_nan() || load.kv_usage < config.max_kv_usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Engine, WorkerInfo};
    use crate::hash::BlockHash;
    use crate::score::{Fallbacks, Outcome};

    const MODEL: &str = "llama";
    const BS: u32 = 16;

    fn add(fleet: &mut Fleet, name: &str, model: &str, role: Role) -> WorkerSlot {
        fleet
            .upsert(WorkerInfo {
                id: name.into(),
                address: format!("{name}:8000"),
                model: model.into(),
                engine: Engine::Vllm,
                role,
                block_size: BS,
                state: WorkerState::Ready,
            })
            .unwrap()
    }

    fn hashes(n: usize) -> Vec<BlockHash> {
        (0..n as u64).map(BlockHash).collect()
    }

    fn input(hashes: &[BlockHash]) -> RouteInput<'_> {
        RouteInput {
            model: MODEL,
            hashes,
            prompt_tokens: hashes.len() as u64 * u64::from(BS),
            expected_output_tokens: None,
            block_size: BS,
            now_ms: 0,
        }
    }

    fn routed_to(worker: WorkerSlot, overlap_blocks: u32) -> Decision {
        Decision {
            outcome: Outcome::Routed(worker),
            overlap_blocks,
            prefill_tokens: 0,
            request_blocks: 0,
            cost: 0.0,
            fallbacks: Fallbacks::default(),
        }
    }

    /// A decode worker in slot 0 and two prefill workers in slots 1 and 2.
    fn pd_fleet() -> Fleet {
        let mut fleet = Fleet::new();
        add(&mut fleet, "d0", MODEL, Role::Decode);
        add(&mut fleet, "p1", MODEL, Role::Prefill);
        add(&mut fleet, "p2", MODEL, Role::Prefill);
        fleet
    }

    fn disagg() -> Disaggregator {
        Disaggregator::new(DisaggConfig::default()).unwrap()
    }

    #[test]
    fn short_uncached_prefill_stays_local() {
        let fleet = pd_fleet();
        let prompt = hashes(100); // 1600 tokens
        let index = PrefixIndex::new(10);
        // 60 blocks cached on the decode worker: 640 uncached tokens, under 1024.
        let d = disagg().decide(&input(&prompt), &routed_to(WorkerSlot(0), 60), &fleet, &index);
        assert_eq!(d.mode, PdMode::Local { reason: LocalReason::ShortPrefill });
        assert_eq!(d.uncached_tokens, 640);
        assert_eq!(d.prefill_worker(), None);
    }

    #[test]
    fn long_uncached_prefill_goes_remote() {
        let fleet = pd_fleet();
        let prompt = hashes(100);
        let index = PrefixIndex::new(10);
        let d = disagg().decide(&input(&prompt), &routed_to(WorkerSlot(0), 0), &fleet, &index);
        assert_eq!(d.uncached_tokens, 1600);
        assert!(matches!(d.mode, PdMode::Remote { .. }));
        assert_eq!(d.prefill_candidates, 2);
        assert_eq!(d.prefill_tokens, 1600);
        assert_eq!(d.prefill_cost_blocks, 100);
        // The threshold is inclusive.
        let exact = RouteInput { prompt_tokens: 1024, ..input(&prompt[..64]) };
        let d = disagg().decide(&exact, &routed_to(WorkerSlot(0), 0), &fleet, &index);
        assert!(d.prefill_worker().is_some());
    }

    #[test]
    fn prefill_worker_is_chosen_by_its_cache_and_pending_prefill() {
        let mut fleet = pd_fleet();
        let prompt = hashes(100);
        let mut index = PrefixIndex::new(1000);
        index.store(WorkerSlot(2), &prompt[..40]);
        let mut pd = disagg();
        let d = pd.decide(&input(&prompt), &routed_to(WorkerSlot(0), 0), &fleet, &index);
        assert_eq!(d.prefill_worker(), Some(WorkerSlot(2)));
        assert_eq!((d.prefill_overlap_blocks, d.prefill_tokens, d.prefill_cost_blocks), (40, 960, 60));
        // Pending prefill outweighs the cache: 60 + 50 blocks against 100.
        fleet.get_mut(WorkerSlot(2)).unwrap().load.inflight_prefill_tokens = 800;
        let d = pd.decide(&input(&prompt), &routed_to(WorkerSlot(0), 0), &fleet, &index);
        assert_eq!(d.prefill_worker(), Some(WorkerSlot(1)));
        // Decode load does not matter on a prefill worker.
        fleet.get_mut(WorkerSlot(2)).unwrap().load =
            WorkerLoad { running: 200, inflight_blocks: 10_000, kv_usage: 0.9, ..Default::default() };
        let d = pd.decide(&input(&prompt), &routed_to(WorkerSlot(0), 0), &fleet, &index);
        assert_eq!(d.prefill_worker(), Some(WorkerSlot(2)));
    }

    #[test]
    fn no_prefill_worker_with_room_stays_local() {
        let mut fleet = pd_fleet();
        let prompt = hashes(100);
        let index = PrefixIndex::new(10);
        fleet.get_mut(WorkerSlot(1)).unwrap().load.inflight_prefill_tokens = 32_768;
        fleet.get_mut(WorkerSlot(2)).unwrap().load.waiting = 8;
        let d = disagg().decide(&input(&prompt), &routed_to(WorkerSlot(0), 0), &fleet, &index);
        assert_eq!(d.mode, PdMode::Local { reason: LocalReason::PrefillWorkersBusy });
        assert_eq!((d.prefill_candidates, d.prefill_busy), (2, 2));
        fleet.get_mut(WorkerSlot(2)).unwrap().load = WorkerLoad { kv_usage: 0.99, ..Default::default() };
        let d = disagg().decide(&input(&prompt), &routed_to(WorkerSlot(0), 0), &fleet, &index);
        assert_eq!(d.mode, PdMode::Local { reason: LocalReason::PrefillWorkersBusy });
    }

    #[test]
    fn only_ready_prefill_workers_of_the_model_count() {
        let mut fleet = Fleet::new();
        let d0 = add(&mut fleet, "d0", MODEL, Role::Both);
        add(&mut fleet, "b1", MODEL, Role::Both);
        add(&mut fleet, "x2", "other", Role::Prefill);
        add(&mut fleet, "d3", MODEL, Role::Decode);
        let p4 = add(&mut fleet, "p4", MODEL, Role::Prefill);
        fleet.set_state(&"p4".into(), WorkerState::Cordoned);
        let prompt = hashes(100);
        let index = PrefixIndex::new(10);
        let d = disagg().decide(&input(&prompt), &routed_to(d0, 0), &fleet, &index);
        assert_eq!(d.mode, PdMode::Local { reason: LocalReason::NoPrefillWorker });
        assert_eq!(d.prefill_candidates, 0);
        // With Both allowed, b1 qualifies, but never the decode worker itself.
        let mut both =
            Disaggregator::new(DisaggConfig { allow_both_role: true, ..Default::default() }).unwrap();
        let d = both.decide(&input(&prompt), &routed_to(d0, 0), &fleet, &index);
        assert_eq!(d.prefill_worker(), Some(WorkerSlot(1)));
        assert_eq!(d.prefill_candidates, 1);
        fleet.set_state(&"p4".into(), WorkerState::Ready);
        let d = disagg().decide(&input(&prompt), &routed_to(d0, 0), &fleet, &index);
        assert_eq!(d.prefill_worker(), Some(p4));
    }

    #[test]
    fn disabled_or_unrouted_stays_local() {
        let fleet = pd_fleet();
        let prompt = hashes(100);
        let index = PrefixIndex::new(10);
        let mut off = Disaggregator::new(DisaggConfig { enabled: false, ..Default::default() }).unwrap();
        let d = off.decide(&input(&prompt), &routed_to(WorkerSlot(0), 0), &fleet, &index);
        assert_eq!(d.mode, PdMode::Local { reason: LocalReason::Disabled });
        let mut shed = routed_to(WorkerSlot(0), 0);
        shed.outcome = Outcome::Shed;
        let d = disagg().decide(&input(&prompt), &shed, &fleet, &index);
        assert_eq!(d.mode, PdMode::Local { reason: LocalReason::NotRouted });
    }

    #[test]
    fn decision_serialises_with_its_figures() {
        let fleet = pd_fleet();
        let prompt = hashes(100);
        let d = disagg().decide(&input(&prompt), &routed_to(WorkerSlot(0), 0), &fleet, &PrefixIndex::new(10));
        let json = serde_json::to_value(d).unwrap();
        assert_eq!(json["mode"]["kind"], "remote");
        assert_eq!(json["mode"]["prefill"], 1);
        assert_eq!(json["uncached_tokens"], 1600);
        assert_eq!(json["min_remote_prefill_tokens"], 1024);
        let short =
            disagg().decide(&input(&prompt), &routed_to(WorkerSlot(0), 99), &fleet, &PrefixIndex::new(10));
        let json = serde_json::to_value(short).unwrap();
        assert_eq!(json["mode"], serde_json::json!({"kind": "local", "reason": "short-prefill"}));
    }

    #[test]
    fn config_validation_names_the_field() {
        let field = |c: DisaggConfig| match c.validate() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected an invalid-config error, got {other:?}"),
        };
        DisaggConfig::default().validate().unwrap();
        assert_eq!(
            field(DisaggConfig { min_remote_prefill_tokens: 0, ..Default::default() }),
            "min_remote_prefill_tokens"
        );
        assert_eq!(
            field(DisaggConfig { max_pending_prefill_tokens: 0, ..Default::default() }),
            "max_pending_prefill_tokens"
        );
        assert_eq!(field(DisaggConfig { max_waiting: 0, ..Default::default() }), "max_waiting");
        assert_eq!(field(DisaggConfig { max_kv_usage: f32::NAN, ..Default::default() }), "max_kv_usage");
        assert!(Disaggregator::new(DisaggConfig { max_waiting: 0, ..Default::default() }).is_err());
        let err = serde_json::from_str::<DisaggConfig>(r#"{"min_remote_prefill":5}"#).unwrap_err();
        assert!(err.to_string().contains("min_remote_prefill"), "{err}");
        let c: DisaggConfig = serde_json::from_str(r#"{"allow_both_role":true}"#).unwrap();
        assert_eq!(c, DisaggConfig { allow_both_role: true, ..Default::default() });
    }
}
