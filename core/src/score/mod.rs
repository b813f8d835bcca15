//! Scoring: which worker a request goes to, and why.
//!
//! A worker is eligible when it serves the request's model, is Ready, and decodes (role Decode or
//! Both). An eligible worker is overloaded when its KV usage or engine queue reaches the configured
//! limit; overloaded workers are skipped. The outcome is one of three:
//! - routed to the cheapest remaining worker (or one sampled by temperature), with fallbacks;
//! - shed: workers serve the model but every one is overloaded (the filter answers 429);
//! - no worker: nothing eligible serves the model (the filter answers 503).
//!
//! Policies ([`PolicyKind`]): kv-aware, load-only and approx-prefix share one block cost
//! (`kv.rs`); round-robin takes turns (`round_robin.rs`). Costs are in blocks of the request's block
//! size; all workers of a model are expected to share it.
//!
//! The hot path allocates nothing once warm: [`Scorer`] keeps its buffers across calls, a
//! [`Decision`] is a small `Copy` value, and an [`Explanation`] is built only when asked for, from
//! what the last decision left in the scorer.

mod approx;
mod config;
mod explain;
mod kv;
mod round_robin;
mod sample;

use std::cmp::Ordering;

pub use approx::ApproxIndex;
pub use config::{ApproxConfig, CostWeights, LoadLimits, MAX_FALLBACKS, PolicyKind, RoutingConfig, defaults};
pub use explain::{CandidateExplanation, Explanation, OutcomeKind, RequestFigures, SkipReason, WorkerRef};
pub use sample::SplitMix64;

pub(crate) use config::{check_fraction, check_positive};
pub(crate) use kv::Shape;

use crate::error::Error;
use crate::fleet::{Fleet, WorkerSlot, WorkerState};
use crate::hash::BlockHash;
use crate::index::PrefixIndex;
use crate::load::WorkerLoad;

use kv::block_cost;
use round_robin::RoundRobin;
use sample::softmax_weight;

/// What the scorer needs to know about one request.
#[derive(Clone, Copy, Debug)]
pub struct RouteInput<'a> {
    /// Requested model (the OpenAI `model` field).
    pub model: &'a str,
    /// Hashes of the prompt's full blocks, in order (may stop early: the rest counts as uncached).
    pub hashes: &'a [BlockHash],
    /// Prompt tokens in all; may exceed `hashes.len() * block_size`.
    pub prompt_tokens: u64,
    /// Output tokens the request expects (`max_tokens`), if known.
    pub expected_output_tokens: Option<u64>,
    /// Tokens per block the hashes were cut with.
    pub block_size: u32,
    /// Current time, milliseconds on the caller's clock (used by approx-prefix's expiry).
    pub now_ms: u64,
}

/// What came of a routing decision.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// Send the request to this worker.
    Routed(WorkerSlot),
    /// Every eligible worker is overloaded: answer 429.
    Shed,
    /// No eligible worker serves the model: answer 503.
    NoWorker,
}

impl Outcome {
    /// The outcome without its data.
    pub fn kind(self) -> OutcomeKind {
        match self {
            Outcome::Routed(_) => OutcomeKind::Routed,
            Outcome::Shed => OutcomeKind::Shed,
            Outcome::NoWorker => OutcomeKind::NoWorker,
        }
    }

    /// The chosen worker, when routed.
    pub fn worker(self) -> Option<WorkerSlot> {
        match self {
            Outcome::Routed(w) => Some(w),
            _ => None,
        }
    }
}

/// Next-best workers after the chosen one, best first, held inline (no allocation).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Fallbacks {
    slots: [WorkerSlot; MAX_FALLBACKS],
    len: u8,
}

impl Default for Fallbacks {
    fn default() -> Self {
        Fallbacks { slots: [WorkerSlot(0); MAX_FALLBACKS], len: 0 }
    }
}

impl Fallbacks {
    /// The workers, best first.
    pub fn as_slice(&self) -> &[WorkerSlot] {
        &self.slots[..usize::from(self.len)]
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, slot: WorkerSlot) {
        if let Some(place) = self.slots.get_mut(usize::from(self.len)) {
            *place = slot;
            self.len += 1;
        }
    }
}

/// A routing decision: small and `Copy`, borrowing nothing.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Decision {
    /// Where the request goes, or why nowhere.
    pub outcome: Outcome,
    /// Leading request blocks cached on the chosen worker (predicted under approx-prefix).
    pub overlap_blocks: u32,
    /// Prompt tokens the chosen worker must prefill (what [`WorkerLoad::begin_request`] takes).
    pub prefill_tokens: u64,
    /// Blocks the request will hold (prompt plus expected output; what `begin_request` takes).
    pub request_blocks: u64,
    /// The chosen worker's cost (0 when not routed).
    pub cost: f64,
    /// Next-best workers, for the override-host header.
    pub fallbacks: Fallbacks,
}

impl Decision {
    fn unrouted(outcome: Outcome, shape: &Shape) -> Decision {
        Decision {
            outcome,
            overlap_blocks: 0,
            prefill_tokens: 0,
            request_blocks: shape.request_blocks,
            cost: 0.0,
            fallbacks: Fallbacks::default(),
        }
    }

    /// The chosen worker, when routed.
    pub fn worker(&self) -> Option<WorkerSlot> {
        self.outcome.worker()
    }

    /// Appends the override-host header value, `ip:port,ip:port` (chosen first, then fallbacks);
    /// false, with nothing written, when not routed or the chosen worker left the fleet.
    pub fn write_override_host(&self, fleet: &Fleet, out: &mut String) -> bool {
        let Some(chosen) = self.worker().and_then(|w| fleet.get(w)) else { return false };
        out.push_str(&chosen.info.address);
        for entry in self.fallbacks.as_slice().iter().filter_map(|&w| fleet.get(w)) {
            out.push(',');
            out.push_str(&entry.info.address);
        }
        true
    }
}

/// A routing policy with its configuration and whatever it learns between decisions.
#[derive(Clone, Debug)]
pub struct Policy {
    config: RoutingConfig,
    round_robin: RoundRobin,
    approx: Option<ApproxIndex>,
}

impl Policy {
    /// The policy a (validated) configuration names.
    pub fn new(config: RoutingConfig) -> Result<Policy, Error> {
        config.validate()?;
        let approx = match config.policy {
            PolicyKind::ApproxPrefix => Some(ApproxIndex::new(config.approx)),
            PolicyKind::KvAware if config.optimistic_ttl_ms > 0 => Some(ApproxIndex::new(ApproxConfig {
                ttl_ms: config.optimistic_ttl_ms,
                max_blocks: config.approx.max_blocks,
            })),
            _ => None,
        };
        Ok(Policy { config, round_robin: RoundRobin::default(), approx })
    }

    /// The policy of a name with default settings; `None` for an unknown name.
    pub fn by_name(name: &str) -> Option<Policy> {
        let policy = PolicyKind::from_name(name)?;
        Policy::new(RoutingConfig { policy, ..RoutingConfig::default() }).ok()
    }

    /// Which policy this is.
    pub fn kind(&self) -> PolicyKind {
        self.config.policy
    }

    /// Its configuration.
    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// What this proxy predicts from its own decisions: approx-prefix's whole index, kv-aware's
    /// optimistic entries (`None` for other policies, or kv-aware with them off).
    pub fn approx(&self) -> Option<&ApproxIndex> {
        self.approx.as_ref()
    }

    /// Frees predictions that expired at or before `now_ms`, a few slots per call (expired ones
    /// are ignored on reading anyway; this gives their memory back).
    pub fn expire(&mut self, now_ms: u64) {
        if let Some(approx) = &mut self.approx {
            approx.expire(now_ms, EXPIRE_SLOTS_PER_CALL);
        }
    }

    /// Learns from a decision that was acted on: round-robin moves on, approx-prefix (and kv-aware,
    /// for `optimistic_ttl_ms`) remembers the prompt as cached on the chosen worker. Unrouted
    /// decisions teach nothing.
    pub fn record(&mut self, input: &RouteInput<'_>, decision: &Decision) {
        let Some(worker) = decision.worker() else { return };
        self.round_robin.advance(worker);
        if let Some(approx) = &mut self.approx {
            approx.record(worker, input.hashes, input.now_ms);
        }
    }

    /// One block of a prefix walk over what this policy reads, as
    /// [`PrefixIndex::extend_runs`]: kv-aware reads the fleet's `index` and its optimistic
    /// entries (a prompt just sent may not be in the engine's events yet; a block in either
    /// counts), approx-prefix its own predictions, other policies nothing. Returns whether any
    /// worker's run grew: a walk stops at the first block for which none does.
    pub fn extend_runs(
        &self,
        index: &PrefixIndex,
        hash: BlockHash,
        depth: u32,
        runs: &mut [u32],
        now_ms: u64,
    ) -> bool {
        let held = self.config.policy == PolicyKind::KvAware && index.extend_runs(hash, depth, runs);
        let predicted = self.approx.as_ref().is_some_and(|a| a.extend_runs(hash, depth, runs, now_ms));
        held || predicted
    }

    /// Forgets what was learnt about a worker (call when it leaves the fleet: its slot is reused).
    pub fn forget_worker(&mut self, worker: WorkerSlot) {
        if let Some(approx) = &mut self.approx {
            approx.forget_worker(worker);
        }
    }
}

/// Prediction slots [`Policy::expire`] visits per call: at thousands of decisions a second, a
/// full 100,000-block index is swept every few seconds.
const EXPIRE_SLOTS_PER_CALL: usize = 32;

/// Where a decision's per-worker overlaps come from.
#[derive(Clone, Copy)]
enum Overlaps<'a> {
    /// Looked up from the request's hashes in the fleet's index and the policy's predictions.
    Lookup(&'a PrefixIndex),
    /// Counted by the caller's walk, by worker slot.
    Walked(&'a [u32]),
}

/// One worker's figures in the last decision.
#[derive(Clone, Copy, PartialEq, Debug)]
struct CandidateScore {
    slot: WorkerSlot,
    overlap_blocks: u32,
    prefill_blocks: u64,
    decode_blocks: u64,
    /// Meaningful only when `scored`.
    cost: f64,
    running: u32,
    waiting: u32,
    kv_usage: f32,
    inflight_requests: u32,
    inflight_prefill_tokens: u64,
    /// Whether it was eligible and so got figures (it may still be skipped as overloaded).
    scored: bool,
    skip: Option<SkipReason>,
}

impl CandidateScore {
    fn available(&self) -> bool {
        self.skip.is_none()
    }

    /// Order of preference: cost, then fewer requests in flight from this proxy.
    fn order(&self, other: &CandidateScore) -> Ordering {
        self.cost.total_cmp(&other.cost).then(self.inflight_requests.cmp(&other.inflight_requests))
    }
}

/// What the last decision used, kept for [`Scorer::explain`].
#[derive(Clone, Copy, Debug)]
struct LastDecision {
    decision: Decision,
    config: RoutingConfig,
    shape: Shape,
}

/// Scores requests against a fleet, reusing its buffers from one call to the next.
#[derive(Clone, Debug, Default)]
pub struct Scorer {
    overlap_by_slot: Vec<u32>,
    candidates: Vec<CandidateScore>,
    weights: Vec<f64>,
    model: String,
    last: Option<LastDecision>,
}

impl Scorer {
    /// A scorer with empty buffers.
    pub fn new() -> Scorer {
        Scorer::default()
    }

    /// Decides where a request goes and lets the policy learn from it: expires approx-prefix
    /// predictions at `input.now_ms`, [`decide`](Self::decide)s, then [`Policy::record`]s.
    pub fn route(
        &mut self,
        policy: &mut Policy,
        input: &RouteInput<'_>,
        fleet: &Fleet,
        index: &PrefixIndex,
        rng: &mut SplitMix64,
    ) -> Decision {
        policy.expire(input.now_ms);
        let decision = self.decide_from(policy, input, fleet, Overlaps::Lookup(index), rng);
        policy.record(input, &decision);
        decision
    }

    /// [`route`](Self::route) for a request whose overlaps the caller already counted while it
    /// walked the blocks (early exit: [`PrefixIndex::extend_runs`] over the fleet's index and
    /// [`Policy::approx`]'s, in that order, as the walk produced each block): `runs[slot]` is the
    /// worker's cached prefix in blocks. Saves reading the indexes a second time.
    pub fn route_walked(
        &mut self,
        policy: &mut Policy,
        input: &RouteInput<'_>,
        runs: &[u32],
        fleet: &Fleet,
        rng: &mut SplitMix64,
    ) -> Decision {
        policy.expire(input.now_ms);
        let decision = self.decide_from(policy, input, fleet, Overlaps::Walked(runs), rng);
        policy.record(input, &decision);
        decision
    }

    /// Decides where a request would go, changing no policy state (a dry run, as `explain` wants).
    /// `index` is the fleet's index from KV events; approx-prefix reads its own instead.
    pub fn decide(
        &mut self,
        policy: &Policy,
        input: &RouteInput<'_>,
        fleet: &Fleet,
        index: &PrefixIndex,
        rng: &mut SplitMix64,
    ) -> Decision {
        self.decide_from(policy, input, fleet, Overlaps::Lookup(index), rng)
    }

    fn decide_from(
        &mut self,
        policy: &Policy,
        input: &RouteInput<'_>,
        fleet: &Fleet,
        overlaps: Overlaps<'_>,
        rng: &mut SplitMix64,
    ) -> Decision {
        let config = policy.config;
        let shape = Shape::new(
            input.hashes.len(),
            input.prompt_tokens,
            input.expected_output_tokens,
            input.block_size,
        );
        self.model.clear();
        self.model.push_str(input.model);
        match overlaps {
            Overlaps::Lookup(index) => self.lookup_overlaps(policy, input, fleet, index),
            Overlaps::Walked(runs) => {
                self.overlap_by_slot.clear();
                self.overlap_by_slot.extend_from_slice(&runs[..runs.len().min(fleet.slot_bound())]);
                self.overlap_by_slot.resize(fleet.slot_bound(), 0);
            }
        }
        let eligible = self.score_fleet(policy, input.model, &shape, fleet);

        let chosen = if eligible == 0 {
            None
        } else if config.temperature > 0.0 && config.policy != PolicyKind::RoundRobin {
            self.sample(config.temperature, rng)
        } else {
            self.cheapest(rng)
        };
        let decision = match chosen {
            None if eligible == 0 => Decision::unrouted(Outcome::NoWorker, &shape),
            None => Decision::unrouted(Outcome::Shed, &shape),
            Some(i) => {
                let c = self.candidates[i];
                Decision {
                    outcome: Outcome::Routed(c.slot),
                    overlap_blocks: c.overlap_blocks,
                    prefill_tokens: shape.uncached_tokens(c.overlap_blocks),
                    request_blocks: shape.request_blocks,
                    cost: c.cost,
                    fallbacks: self.fallbacks(i, config.fallbacks),
                }
            }
        };
        self.last = Some(LastDecision { decision, config, shape });
        decision
    }

    /// The account of the last decision, naming workers as `fleet` has them now (call it before
    /// the fleet changes); `None` before the first decision.
    pub fn explain(&self, fleet: &Fleet) -> Option<Explanation> {
        let last = self.last.as_ref()?;
        let worker_ref = |slot: WorkerSlot| {
            fleet.get(slot).map(|e| WorkerRef { id: e.info.id.clone(), address: e.info.address.clone() })
        };
        let candidates = self
            .candidates
            .iter()
            .filter_map(|c| {
                let entry = fleet.get(c.slot)?;
                Some(CandidateExplanation {
                    worker: entry.info.id.clone(),
                    address: entry.info.address.clone(),
                    slot: c.slot,
                    overlap_blocks: c.overlap_blocks,
                    prefill_blocks: c.prefill_blocks,
                    decode_blocks: c.decode_blocks,
                    running: c.running,
                    waiting: c.waiting,
                    kv_usage: c.kv_usage,
                    inflight_requests: c.inflight_requests,
                    inflight_prefill_tokens: c.inflight_prefill_tokens,
                    cost: c.scored.then_some(c.cost),
                    skipped: c.skip,
                })
            })
            .collect();
        let decision = &last.decision;
        Some(Explanation {
            policy: last.config.policy,
            model: self.model.clone(),
            outcome: decision.outcome.kind(),
            chosen: decision.worker().and_then(worker_ref),
            fallbacks: decision.fallbacks.as_slice().iter().filter_map(|&w| worker_ref(w)).collect(),
            request: RequestFigures {
                hashed_blocks: last.shape.hashed_blocks,
                prompt_tokens: last.shape.prompt_tokens,
                expected_output_tokens: last.shape.expected_output_tokens,
                request_blocks: last.shape.request_blocks,
                block_size: last.shape.block_size as u32,
            },
            weights: last.config.weights,
            temperature: last.config.temperature,
            limits: last.config.limits,
            candidates,
        })
    }

    /// Fills `overlap_by_slot` with each worker's cached prefix, as the policy reads it
    /// ([`Policy::extend_runs`]): one walk over the blocks while anyone extends.
    fn lookup_overlaps(
        &mut self,
        policy: &Policy,
        input: &RouteInput<'_>,
        fleet: &Fleet,
        index: &PrefixIndex,
    ) {
        self.overlap_by_slot.clear();
        self.overlap_by_slot.resize(fleet.slot_bound(), 0);
        for (depth, &hash) in input.hashes.iter().enumerate() {
            if !policy.extend_runs(index, hash, depth as u32, &mut self.overlap_by_slot, input.now_ms) {
                break;
            }
        }
    }

    /// Scores every worker of the fleet into `candidates`; returns how many are eligible.
    fn score_fleet(&mut self, policy: &Policy, model: &str, shape: &Shape, fleet: &Fleet) -> usize {
        let config = &policy.config;
        let slot_bound = fleet.slot_bound();
        let mut eligible = 0;
        self.candidates.clear();
        for (slot, entry) in fleet.iter() {
            let (info, load) = (&entry.info, &entry.load);
            let ineligible = if info.model != model {
                Some(SkipReason::OtherModel)
            } else if info.state == WorkerState::Cordoned {
                Some(SkipReason::Cordoned)
            } else if info.state == WorkerState::Draining {
                Some(SkipReason::Draining)
            } else if !info.role.decodes() {
                Some(SkipReason::PrefillOnly)
            } else {
                None
            };
            let mut c = CandidateScore {
                slot,
                overlap_blocks: 0,
                prefill_blocks: 0,
                decode_blocks: 0,
                cost: 0.0,
                running: load.running,
                waiting: load.waiting,
                kv_usage: load.kv_usage,
                inflight_requests: load.inflight_requests,
                inflight_prefill_tokens: load.inflight_prefill_tokens,
                scored: ineligible.is_none(),
                skip: ineligible,
            };
            if c.scored {
                eligible += 1;
                c.skip = overload(load, &config.limits);
                c.overlap_blocks = self.overlap_by_slot.get(slot.index()).copied().unwrap_or(0);
                let figures = block_cost(shape, c.overlap_blocks, load, &config.weights);
                c.prefill_blocks = figures.prefill_blocks;
                c.decode_blocks = figures.decode_blocks;
                c.cost = match config.policy {
                    PolicyKind::RoundRobin => policy.round_robin.distance(slot, slot_bound) as f64,
                    _ => figures.cost,
                };
            }
            self.candidates.push(c);
        }
        eligible
    }

    /// The cheapest available candidate; exact ties go to a seeded uniform choice, so that proxies
    /// seeded differently do not all pile onto the lowest slot.
    fn cheapest(&self, rng: &mut SplitMix64) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut ties = 0u64;
        for (i, c) in self.candidates.iter().enumerate().filter(|(_, c)| c.available()) {
            let Some(b) = best else {
                best = Some(i);
                ties = 1;
                continue;
            };
            match c.order(&self.candidates[b]) {
                Ordering::Less => {
                    best = Some(i);
                    ties = 1;
                }
                Ordering::Equal => {
                    ties += 1;
                    if rng.below(ties) == 0 {
                        best = Some(i);
                    }
                }
                Ordering::Greater => {}
            }
        }
        best
    }

    /// A candidate drawn with probability proportional to `exp(-normalised cost / temperature)`.
    fn sample(&mut self, temperature: f64, rng: &mut SplitMix64) -> Option<usize> {
        let (min, max) = self
            .candidates
            .iter()
            .filter(|c| c.available())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), c| (lo.min(c.cost), hi.max(c.cost)));
        if min > max {
            return None;
        }
        self.weights.clear();
        let mut total = 0.0;
        for c in &self.candidates {
            let w = if c.available() { softmax_weight(c.cost, min, max, temperature) } else { 0.0 };
            total += w;
            self.weights.push(w);
        }
        let mut target = rng.next_f64() * total;
        let mut last = None;
        for (i, &w) in self.weights.iter().enumerate() {
            if w > 0.0 {
                if target < w {
                    return Some(i);
                }
                target -= w;
                last = Some(i);
            }
        }
        // Rounding left the target just past the end.
        last
    }

    /// The next-best available candidates after `chosen`, best first (ties: lower slot).
    fn fallbacks(&self, chosen: usize, n: usize) -> Fallbacks {
        let mut out = Fallbacks::default();
        let mut prev: Option<usize> = None;
        for _ in 0..n.min(MAX_FALLBACKS) {
            // Strictly after the previous pick in (cost, inflight, position) order: n small passes,
            // no sort buffer.
            let after_prev = |i: usize| match prev {
                None => true,
                Some(p) => {
                    let (c, pc) = (&self.candidates[i], &self.candidates[p]);
                    c.order(pc).then(i.cmp(&p)) == Ordering::Greater
                }
            };
            let next = self
                .candidates
                .iter()
                .enumerate()
                .filter(|&(i, c)| i != chosen && c.available() && after_prev(i))
                .min_by(|(i, a), (j, b)| a.order(b).then(i.cmp(j)))
                .map(|(i, _)| i);
            let Some(next) = next else { break };
            out.push(self.candidates[next].slot);
            prev = Some(next);
        }
        out
    }
}

/// Why a worker that could take the request should not right now, if so.
fn overload(load: &WorkerLoad, limits: &LoadLimits) -> Option<SkipReason> {
    // This proxy's in-flight blocks count too: the engine's figure lags what was just sent.
    let ours = if load.kv_capacity_blocks > 0 {
        load.inflight_blocks as f64 / f64::from(load.kv_capacity_blocks)
    } else {
        0.0
    };
    let usage = f64::from(load.kv_usage).max(ours);
    if usage >= f64::from(limits.max_kv_usage) {
        Some(SkipReason::OverloadedKv)
    } else if load.waiting >= limits.max_waiting {
        Some(SkipReason::OverloadedQueue)
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
