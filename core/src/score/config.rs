//! Routing configuration of one model: which policy, its weights, load limits, and the defaults.
//!
//! Every default lives in [`defaults`]; the `Default` impls below only read from there.

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The default of every routing setting, in one place.
pub mod defaults {
    /// Policy used when a model names none.
    pub const POLICY: super::PolicyKind = super::PolicyKind::KvAware;
    /// Weight of prefill blocks against decode blocks. 1.0 is Dynamo's default
    /// (`--kv-overlap-score-weight`): one block to prefill costs as much as one block held in decode.
    /// Above 1 favours cache hits (time to first token); below 1 favours balance (inter-token latency).
    pub const OVERLAP_WEIGHT: f64 = 1.0;
    /// Blocks charged per request queued in the engine. Off: this proxy's own queued requests are
    /// already in its pending prefill, and a block figure per foreign queued request is unknown; the
    /// hard queue limit ([`MAX_WAITING`]) is what keeps requests off long queues.
    pub const WAITING_WEIGHT: f64 = 0.0;
    /// Softmax temperature: 0 always takes the cheapest worker.
    pub const TEMPERATURE: f64 = 0.0;
    /// KV usage at which a worker counts as overloaded: vLLM starts preempting running requests
    /// when its cache is full, so stop a little before.
    pub const MAX_KV_USAGE: f32 = 0.95;
    /// Engine queue length at which a worker counts as overloaded.
    pub const MAX_WAITING: u32 = 64;
    /// Next-best workers put in the override-host header after the chosen one.
    pub const FALLBACKS: usize = 2;
    /// How long approx-prefix assumes a routed prompt stays cached: Dynamo's approximate indexer
    /// uses 120 s.
    pub const APPROX_TTL_MS: u64 = 120_000;
    /// Blocks the approx-prefix index remembers (about 5 MB per wasm VM at ~50 bytes a block).
    pub const APPROX_MAX_BLOCKS: usize = 100_000;
    /// How long kv-aware trusts this proxy's own recent decisions beside the fleet index: long
    /// enough to cover the engine-to-control-plane-to-filter event delay (tens of ms measured) with
    /// a wide margin, short enough that a wrong guess (an eviction) is soon forgotten.
    pub const OPTIMISTIC_TTL_MS: u64 = 2_000;
}

/// Most fallback workers a decision carries.
pub const MAX_FALLBACKS: usize = 8;

/// Which scoring policy routes a model's requests.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Cached prefix (from the workers' KV events) against prefill and decode load.
    KvAware,
    /// Prefill and decode load only; the cache is ignored.
    LoadOnly,
    /// Every eligible worker in turn.
    RoundRobin,
    /// Like kv-aware, with the cache predicted from this proxy's own past decisions (no KV events).
    ApproxPrefix,
}

impl PolicyKind {
    /// The policy's name as configured (`kv-aware`, ...).
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::KvAware => "kv-aware",
            PolicyKind::LoadOnly => "load-only",
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::ApproxPrefix => "approx-prefix",
        }
    }

    /// The policy of a name, if it is one.
    pub fn from_name(name: &str) -> Option<PolicyKind> {
        [PolicyKind::KvAware, PolicyKind::LoadOnly, PolicyKind::RoundRobin, PolicyKind::ApproxPrefix]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// Weights of the cost function `overlap_weight * prefill_blocks + decode_blocks + waiting_weight * waiting`.
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostWeights {
    /// Multiplies prefill blocks (uncached request blocks plus the worker's pending prefill).
    pub overlap_weight: f64,
    /// Blocks charged per request waiting in the engine's queue.
    pub waiting_weight: f64,
}

impl Default for CostWeights {
    fn default() -> Self {
        CostWeights { overlap_weight: defaults::OVERLAP_WEIGHT, waiting_weight: defaults::WAITING_WEIGHT }
    }
}

/// When a worker is too loaded to take a request.
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadLimits {
    /// Overloaded at this KV usage (0 to 1), the larger of the engine's figure and this proxy's in-flight blocks.
    pub max_kv_usage: f32,
    /// Overloaded at this many requests in the engine's queue.
    pub max_waiting: u32,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits { max_kv_usage: defaults::MAX_KV_USAGE, max_waiting: defaults::MAX_WAITING }
    }
}

/// Settings of the approx-prefix policy's own index.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApproxConfig {
    /// How long a routed prompt is assumed to stay cached on its worker, milliseconds.
    pub ttl_ms: u64,
    /// Most blocks remembered (40 bytes each, up to 4 workers per block); past it expired blocks
    /// and blocks not routed again recently are dropped first.
    pub max_blocks: usize,
}

impl Default for ApproxConfig {
    fn default() -> Self {
        ApproxConfig { ttl_ms: defaults::APPROX_TTL_MS, max_blocks: defaults::APPROX_MAX_BLOCKS }
    }
}

/// How one model's requests are routed.
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// The scoring policy.
    pub policy: PolicyKind,
    /// Cost weights (kv-aware, load-only, approx-prefix).
    pub weights: CostWeights,
    /// Softmax temperature over normalised costs; 0 takes the cheapest (not used by round-robin).
    pub temperature: f64,
    /// Overload limits; overloaded workers are skipped, and a request is shed when all are.
    pub limits: LoadLimits,
    /// Next-best workers to name after the chosen one, at most [`MAX_FALLBACKS`].
    pub fallbacks: usize,
    /// The approx-prefix policy's index.
    pub approx: ApproxConfig,
    /// kv-aware only: milliseconds a prompt this proxy just routed counts as cached on its worker
    /// before the engine's events confirm it (bursts of one prefix stick to one worker); 0 turns
    /// these optimistic entries off. They share `approx.max_blocks` as their bound.
    pub optimistic_ttl_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: defaults::POLICY,
            weights: CostWeights::default(),
            temperature: defaults::TEMPERATURE,
            limits: LoadLimits::default(),
            fallbacks: defaults::FALLBACKS,
            approx: ApproxConfig::default(),
            optimistic_ttl_ms: defaults::OPTIMISTIC_TTL_MS,
        }
    }
}

/// Error for a field that must be a finite number at least zero.
pub(crate) fn check_non_negative(field: &'static str, value: f64) -> Result<(), Error> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig { field, reason: format!("must be a finite number >= 0, got {value}") })
    }
}

/// Error for a KV usage fraction that must lie in (0, 1].
pub(crate) fn check_fraction(field: &'static str, value: f32) -> Result<(), Error> {
    if value > 0.0 && value <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig { field, reason: format!("must be in (0, 1], got {value}") })
    }
}

/// Error for a count that must be at least one.
pub(crate) fn check_positive(field: &'static str, value: u64) -> Result<(), Error> {
    if value >= 1 {
        Ok(())
    } else {
        Err(Error::InvalidConfig { field, reason: "must be at least 1, got 0".to_owned() })
    }
}

impl RoutingConfig {
    /// Reads a configuration another version may have written (the control plane's stream):
    /// fields this version does not know are left out, and named in the second value, instead of
    /// failing the whole policy as the strict read (an operator's file) does. During a rolling
    /// upgrade a newer control plane's new setting is then ignored by older filters, not every
    /// policy it sends. A known field with a bad value is still an error.
    pub fn from_json_lenient(json: &str) -> Result<(RoutingConfig, Vec<String>), serde_json::Error> {
        let mut value: serde_json::Value = serde_json::from_str(json)?;
        let known = serde_json::to_value(RoutingConfig::default())?;
        let mut ignored = Vec::new();
        drop_unknown(&mut value, &known, "", &mut ignored);
        Ok((serde_json::from_value(value)?, ignored))
    }

    /// Checks every value's range; the error names the first offending field.
    pub fn validate(&self) -> Result<(), Error> {
        check_non_negative("weights.overlap_weight", self.weights.overlap_weight)?;
        check_non_negative("weights.waiting_weight", self.weights.waiting_weight)?;
        check_non_negative("temperature", self.temperature)?;
        check_fraction("limits.max_kv_usage", self.limits.max_kv_usage)?;
        check_positive("limits.max_waiting", u64::from(self.limits.max_waiting))?;
        if self.fallbacks > MAX_FALLBACKS {
            return Err(Error::InvalidConfig {
                field: "fallbacks",
                reason: format!("must be at most {MAX_FALLBACKS}, got {}", self.fallbacks),
            });
        }
        check_positive("approx.ttl_ms", self.approx.ttl_ms)?;
        check_positive("approx.max_blocks", self.approx.max_blocks as u64)?;
        Ok(())
    }
}

/// Removes from `value` the object keys `known` (the default configuration, serialized) lacks,
/// recursing into nested settings; their dotted paths go to `ignored`.
fn drop_unknown(
    value: &mut serde_json::Value,
    known: &serde_json::Value,
    path: &str,
    ignored: &mut Vec<String>,
) {
    let (serde_json::Value::Object(fields), serde_json::Value::Object(known)) = (value, known) else {
        return;
    };
    fields.retain(|name, _| {
        let keep = known.contains_key(name);
        if !keep {
            ignored.push(format!("{path}{name}"));
        }
        keep
    });
    for (name, field) in fields.iter_mut() {
        if let Some(known) = known.get(name) {
            drop_unknown(field, known, &format!("{path}{name}."), ignored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_writers_fields_are_left_out_of_a_lenient_read() {
        let json = r#"{"policy":"approx-prefix","fallbacks":3,"from_the_future":1,
                       "approx":{"ttl_ms":5000,"shard":"x"}}"#;
        assert!(serde_json::from_str::<RoutingConfig>(json).is_err(), "the strict read refuses them");
        let (config, ignored) = RoutingConfig::from_json_lenient(json).expect("read");
        assert_eq!(ignored, ["from_the_future", "approx.shard"]);
        assert_eq!(
            (config.policy, config.fallbacks, config.approx.ttl_ms),
            (PolicyKind::ApproxPrefix, 3, 5000)
        );
        assert_eq!(config.approx.max_blocks, defaults::APPROX_MAX_BLOCKS);
        // What this version writes reads back whole, with nothing ignored.
        let ours = RoutingConfig { temperature: 0.5, ..RoutingConfig::default() };
        let (back, ignored) =
            RoutingConfig::from_json_lenient(&serde_json::to_string(&ours).expect("writes")).expect("reads");
        assert_eq!((back, ignored.len()), (ours, 0));
        // A known field with a wrong value is still an error.
        assert!(RoutingConfig::from_json_lenient(r#"{"policy":"nope"}"#).is_err());
        assert!(RoutingConfig::from_json_lenient(r#"{"weights":{"overlap_weight":"high"}}"#).is_err());
    }

    fn field_of(result: Result<(), Error>) -> &'static str {
        match result {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        RoutingConfig::default().validate().unwrap();
    }

    #[test]
    fn missing_fields_take_defaults() {
        let c: RoutingConfig =
            serde_json::from_str(r#"{"policy":"approx-prefix","limits":{"max_waiting":8}}"#).unwrap();
        assert_eq!(c.policy, PolicyKind::ApproxPrefix);
        assert_eq!(c.limits.max_waiting, 8);
        assert_eq!(c.limits.max_kv_usage, defaults::MAX_KV_USAGE);
        assert_eq!(c.weights, CostWeights::default());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<RoutingConfig>(r#"{"polcy":"kv-aware"}"#).unwrap_err();
        assert!(err.to_string().contains("polcy"), "{err}");
        let err = serde_json::from_str::<RoutingConfig>(r#"{"weights":{"overlap":2}}"#).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        assert!(serde_json::from_str::<RoutingConfig>(r#"{"policy":"random"}"#).is_err());
    }

    #[test]
    fn validation_errors_name_the_field() {
        let mut c = RoutingConfig::default();
        c.weights.overlap_weight = -1.0;
        assert_eq!(field_of(c.validate()), "weights.overlap_weight");
        let mut c = RoutingConfig { temperature: f64::NAN, ..Default::default() };
        assert_eq!(field_of(c.validate()), "temperature");
        c.temperature = 0.5;
        c.limits.max_kv_usage = 1.5;
        assert_eq!(field_of(c.validate()), "limits.max_kv_usage");
        c.limits.max_kv_usage = 0.9;
        c.limits.max_waiting = 0;
        assert_eq!(field_of(c.validate()), "limits.max_waiting");
        c.limits.max_waiting = 1;
        c.fallbacks = MAX_FALLBACKS + 1;
        assert_eq!(field_of(c.validate()), "fallbacks");
        c.fallbacks = 0;
        c.approx.ttl_ms = 0;
        assert_eq!(field_of(c.validate()), "approx.ttl_ms");
        c.approx.ttl_ms = 1;
        c.approx.max_blocks = 0;
        assert_eq!(field_of(c.validate()), "approx.max_blocks");
        let msg = Error::InvalidConfig { field: "x", reason: "y".into() }.to_string();
        assert!(msg.contains("`x`"), "{msg}");
    }

    #[test]
    fn policy_names_round_trip() {
        for kind in
            [PolicyKind::KvAware, PolicyKind::LoadOnly, PolicyKind::RoundRobin, PolicyKind::ApproxPrefix]
        {
            assert_eq!(PolicyKind::from_name(kind.name()), Some(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.name()));
        }
        assert_eq!(PolicyKind::from_name("random"), None);
    }
}
