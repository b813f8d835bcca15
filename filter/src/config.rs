//! The plugin configuration: JSON in the Wasm filter's `configuration` (a `StringValue`).
//!
//! One module, two roles, chosen by the configuration:
//! - the HTTP filter (one VM per Envoy worker thread) routes requests. Its fleet and models come
//!   from `state` (the control plane's stream, relayed through shared data), from the static
//!   `workers` / `models` lists here, or both;
//! - the state service (a singleton `envoy.bootstrap.wasm` service with the same `vm_id`) has
//!   `control_plane.cluster`: it holds the one gRPC stream per Envoy, fetches the models' tokenizer
//!   files, and writes both to shared data for the HTTP filter's VMs.
//!
//! The native module (`filter-native`) takes the same JSON; there one configuration does both:
//! `state` with `control_plane.address`, and the module holds the stream itself.

use kvmesh_core::request::DEFAULT_MAX_BODY_BYTES;
use kvmesh_core::tokenize::SegmentCacheConfig;
use kvmesh_core::{PolicyKind, RoutingConfig, WorkerInfo};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Errors of the filter crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plugin configuration is not the JSON this filter understands.
    #[error("invalid kvmesh filter configuration: {source}")]
    Config {
        /// What serde_json rejected, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The configuration parses but a value is unusable.
    #[error("invalid kvmesh filter configuration: `{field}` {reason}")]
    Invalid {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A model's tokenizer or chat template could not be loaded.
    #[error("invalid kvmesh filter configuration: model `{model}`: {source}")]
    Model {
        /// The model's name.
        model: String,
        /// What kvmesh-core rejected.
        #[source]
        source: kvmesh_core::Error,
    },
}

/// The filter's settings. Unknown fields are rejected so a typo never silently does nothing.
/// Neither `models` nor `state` means the filter routes nothing: every request passes untouched.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Static workers requests may go to, beside those the control plane streams.
    #[serde(default)]
    pub workers: Vec<WorkerInfo>,
    /// Static models, each with its tokenizer files (models the control plane serves need none).
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Follow the control plane's fleet state and model files, as the state service relays them.
    #[serde(default)]
    pub state: Option<StateConfig>,
    /// The control plane's connection. In the Wasm module, with `cluster`, it makes this instance
    /// the state service (the bootstrap singleton), not an HTTP filter; in the native module, with
    /// `address`, the module holds the stream itself beside `state`.
    #[serde(default)]
    pub control_plane: Option<ControlPlaneConfig>,
    /// How requests are scored (a model's policy from the control plane overrides it). Default:
    /// kv-aware with `state`; approx-prefix without, since this proxy's own past decisions are then
    /// the only cache knowledge it has.
    #[serde(default)]
    pub routing: Option<RoutingConfig>,
    /// The per-VM cache of token ids per text segment (system prompts, earlier chat turns).
    #[serde(default)]
    pub segment_cache: SegmentCache,
    /// kv-aware: tokenize exactly only as far as some worker (or this proxy's recent decisions)
    /// holds the prompt's blocks, and estimate the rest of its length from its bytes.
    #[serde(default = "defaults::early_exit")]
    pub early_exit: bool,
    /// Longest request body routed, in bytes; longer ones get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Reads the engine's `usage` from one routed response in this many (per VM) and compares its
    /// cached tokens with the filter's prediction (`kvmesh_filter_accuracy_*_total`); 1 reads every
    /// response, 0 none. Reading a response costs about 15 µs in Envoy (measured in `bench/`).
    #[serde(default = "defaults::accuracy_sample_every")]
    pub accuracy_sample_every: u32,
    /// Adds `x-kvmesh-filter: <version>` to every response, to see from outside that the module ran.
    /// Off by default: it costs a host call per response and tells clients what the proxy runs.
    #[serde(default)]
    pub response_header: bool,
    /// What happens to a request the filter cannot route for a reason of its own, not the
    /// request's: no fleet state yet, a prompt its tokenizer fails on, a body it cannot read.
    #[serde(default)]
    pub failure_mode: FailureMode,
}

/// The filter's own failure policy (Envoy's `failure_policy` covers a VM that crashed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Forward the request without a destination: the cluster's `override_host` policy falls back
    /// to its own (round robin). Counted in `kvmesh_filter_fallbacks_total`.
    #[default]
    FailOpen,
    /// Answer it with a JSON error: 503 before the fleet is known, 500 otherwise.
    FailClosed,
}

/// The HTTP filter's view of the control plane's state (relayed by the state service).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// State not refreshed for this long is stale: requests are then routed on load alone (in
    /// flight from this proxy plus the last known engine load) and counted, milliseconds.
    #[serde(default = "defaults::state_ttl_ms")]
    pub ttl_ms: u64,
    /// How often each VM checks shared data for new state, milliseconds (the Wasm filter; the
    /// native module applies each update as it arrives).
    #[serde(default = "defaults::state_poll_ms")]
    pub poll_ms: u64,
}

/// The connection to the control plane: one gRPC stream per Envoy process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Wasm state service: the Envoy cluster (HTTP/2) of the control plane's gRPC listener.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Native module: the control plane's gRPC endpoint, `http://host:port` (plaintext HTTP/2, as
    /// the control plane serves it), which the module connects to itself (not through Envoy).
    #[serde(default)]
    pub address: Option<String>,
    /// The name this Envoy gives itself in the subscription (logs and metrics only).
    #[serde(default = "defaults::node")]
    pub node: String,
    /// Wait before re-subscribing after the stream closed, milliseconds (doubles up to 30 s).
    #[serde(default = "defaults::retry_ms")]
    pub retry_ms: u64,
    /// Timeout of a model-files request, milliseconds.
    #[serde(default = "defaults::assets_timeout_ms")]
    pub assets_timeout_ms: u64,
}

/// The segment id cache's size per VM.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentCache {
    /// Most bytes held (0 turns the cache off).
    pub max_bytes: usize,
    /// Most segments held.
    pub max_entries: usize,
}

impl Default for SegmentCache {
    fn default() -> Self {
        let d = SegmentCacheConfig::default();
        SegmentCache { max_bytes: d.max_bytes, max_entries: d.max_entries }
    }
}

impl SegmentCache {
    /// The core's form.
    pub fn to_core(self) -> SegmentCacheConfig {
        if self.max_bytes == 0 || self.max_entries == 0 {
            return SegmentCacheConfig::DISABLED;
        }
        SegmentCacheConfig { max_bytes: self.max_bytes, max_entries: self.max_entries }
    }
}

/// Defaults in one place.
mod defaults {
    pub fn state_ttl_ms() -> u64 {
        5_000
    }
    pub fn state_poll_ms() -> u64 {
        20
    }
    pub fn node() -> String {
        "envoy".to_owned()
    }
    pub fn retry_ms() -> u64 {
        500
    }
    pub fn assets_timeout_ms() -> u64 {
        30_000
    }
    pub fn early_exit() -> bool {
        true
    }
    pub fn accuracy_sample_every() -> u32 {
        10
    }
}

/// One served model and its tokenizer, as the model ships the files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model's name (the OpenAI `model` field).
    pub name: String,
    /// The model's `tokenizer.json`, embedded as a JSON object (kept raw: it is only handed to the
    /// tokenizer loader, and embedding it unescaped keeps a 10 MB file 10 MB). Either form loads;
    /// the canonical one (`kvmesh_core::tokenize::canonicalize`, what the control plane serves) is
    /// half the size and spares every VM converting it.
    pub tokenizer: Box<RawValue>,
    /// The model's `tokenizer_config.json`, embedded as a JSON object, if it ships one.
    #[serde(default)]
    pub tokenizer_config: Option<Box<RawValue>>,
    /// `chat_template.jinja`, if the model ships its template as a separate file.
    #[serde(default)]
    pub chat_template: Option<String>,
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

impl FilterConfig {
    /// Parses the plugin configuration; no configuration (or only whitespace) means the defaults.
    pub fn from_bytes(bytes: Option<&[u8]>) -> Result<Self, Error> {
        let config: FilterConfig = match bytes {
            Some(b) if !b.iter().all(u8::is_ascii_whitespace) => {
                serde_json::from_slice(b).map_err(|source| Error::Config { source })?
            }
            _ => return Ok(Self::default_routing_off()),
        };
        config.validate()?;
        Ok(config)
    }

    /// The configuration with nothing to route (what an empty plugin configuration means).
    fn default_routing_off() -> Self {
        FilterConfig {
            max_body_bytes: default_max_body_bytes(),
            early_exit: defaults::early_exit(),
            accuracy_sample_every: defaults::accuracy_sample_every(),
            ..FilterConfig::default()
        }
    }

    /// The routing settings in force: the configured ones, else the default for this set-up.
    pub fn routing(&self) -> RoutingConfig {
        self.routing.unwrap_or_else(|| {
            let policy = if self.state.is_some() { PolicyKind::KvAware } else { PolicyKind::ApproxPrefix };
            RoutingConfig { policy, ..RoutingConfig::default() }
        })
    }

    /// Whether this instance is the Wasm state service rather than an HTTP filter.
    pub fn is_state_service(&self) -> bool {
        self.control_plane.as_ref().is_some_and(|cp| cp.cluster.is_some())
    }

    /// Checks what serde cannot: ranges and cross-references; the error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |field: String, reason: String| Error::Invalid { field, reason };
        self.routing().validate().map_err(|e| invalid("routing".to_owned(), e.to_string()))?;
        if let Some(cp) = &self.control_plane {
            match (&cp.cluster, &cp.address) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(
                        "control_plane".to_owned(),
                        "needs exactly one of `cluster` (the Wasm state service) and `address` (the \
                         native module)"
                            .to_owned(),
                    ));
                }
                (Some(cluster), None) if cluster.is_empty() => {
                    return Err(invalid(
                        "control_plane.cluster".to_owned(),
                        "must name a cluster".to_owned(),
                    ));
                }
                (None, Some(address)) => {
                    // The module's gRPC client is built without TLS (the control plane's listener
                    // is plaintext HTTP/2 too).
                    if !address.starts_with("http://") {
                        return Err(invalid(
                            "control_plane.address".to_owned(),
                            format!("`{address}` is not an http:// URI (TLS is not supported yet)"),
                        ));
                    }
                    if self.state.is_none() {
                        return Err(invalid(
                            "state".to_owned(),
                            "is needed beside `control_plane.address`: it says how the stream's state \
                             is used"
                                .to_owned(),
                        ));
                    }
                }
                (Some(_), None) => {}
            }
            if self.is_state_service()
                && (self.state.is_some() || !self.models.is_empty() || !self.workers.is_empty())
            {
                return Err(invalid(
                    "control_plane".to_owned(),
                    "is the state service's setting; it cannot be combined with `state`, `models` or \
                     `workers` (those are the HTTP filter's)"
                        .to_owned(),
                ));
            }
        }
        if let Some(state) = &self.state {
            if state.ttl_ms == 0 {
                return Err(invalid("state.ttl_ms".to_owned(), "must be at least 1".to_owned()));
            }
            if state.poll_ms == 0 || state.poll_ms > state.ttl_ms {
                return Err(invalid("state.poll_ms".to_owned(), "must be in 1..=state.ttl_ms".to_owned()));
            }
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes".to_owned(), "must be at least 1".to_owned()));
        }
        for (i, w) in self.workers.iter().enumerate() {
            if w.block_size == 0 {
                return Err(invalid(format!("workers[{i}].block_size"), "must be at least 1".to_owned()));
            }
            if !self.models.iter().any(|m| m.name == w.model) {
                return Err(invalid(
                    format!("workers[{i}].model"),
                    format!("`{}` is not in `models`", w.model),
                ));
            }
            let same_model = self.workers.iter().filter(|o| o.model == w.model);
            // One block size per model: the prompt is hashed once per request.
            if same_model.clone().any(|o| o.block_size != w.block_size) {
                return Err(invalid(
                    format!("workers[{i}].block_size"),
                    format!("workers of model `{}` disagree on block size", w.model),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENIZER: &str = r#"{"version":"1.0","model":{"type":"BPE","vocab":{},"merges":[]}}"#;

    fn with_worker(worker_model: &str, block_size: u32) -> String {
        format!(
            r#"{{"models":[{{"name":"m","tokenizer":{TOKENIZER}}}],
               "workers":[{{"id":"w0","address":"127.0.0.1:1","model":"{worker_model}","block_size":{block_size}}}]}}"#
        )
    }

    #[test]
    fn missing_or_blank_configuration_means_no_routing() {
        for raw in [None, Some(&b"  \n"[..]), Some(&b"{}"[..])] {
            let config = FilterConfig::from_bytes(raw).expect("accepted");
            assert!(config.models.is_empty() && config.workers.is_empty());
            assert_eq!(config.routing().policy, PolicyKind::ApproxPrefix);
        }
    }

    #[test]
    fn malformed_json_is_rejected() {
        let err = FilterConfig::from_bytes(Some(b"{not json")).expect_err("malformed JSON must fail");
        assert!(err.to_string().contains("invalid kvmesh filter configuration"), "{err}");
    }

    #[test]
    fn failure_mode_defaults_to_fail_open_and_names_a_bad_value() {
        let config = FilterConfig::from_bytes(Some(b"{}")).expect("accepted");
        assert_eq!(config.failure_mode, FailureMode::FailOpen);
        let config = FilterConfig::from_bytes(Some(br#"{"failure_mode":"fail_closed"}"#)).expect("accepted");
        assert_eq!(config.failure_mode, FailureMode::FailClosed);
        let err = FilterConfig::from_bytes(Some(br#"{"failure_mode":"closed"}"#)).expect_err("unknown mode");
        assert!(err.to_string().contains("fail_open"), "{err}");
    }

    #[test]
    fn unknown_field_is_rejected() {
        assert!(FilterConfig::from_bytes(Some(br#"{"upstreams": []}"#)).is_err());
    }

    #[test]
    fn worker_and_model_are_accepted() {
        let config = FilterConfig::from_bytes(Some(with_worker("m", 16).as_bytes())).expect("valid");
        assert_eq!(config.workers.len(), 1);
        assert_eq!(config.models[0].tokenizer.get(), TOKENIZER);
    }

    #[test]
    fn worker_of_unknown_model_is_rejected() {
        let err = FilterConfig::from_bytes(Some(with_worker("other", 16).as_bytes())).expect_err("invalid");
        assert!(err.to_string().contains("workers[0].model"), "{err}");
    }

    #[test]
    fn state_makes_kv_aware_the_default_policy() {
        let config = FilterConfig::from_bytes(Some(br#"{"state":{}}"#)).expect("valid");
        assert_eq!(config.routing().policy, PolicyKind::KvAware);
        let state = config.state.expect("state");
        assert_eq!((state.ttl_ms, state.poll_ms), (5_000, 20));
    }

    #[test]
    fn state_service_takes_no_routing_settings() {
        let ok = br#"{"control_plane":{"cluster":"kvmesh_control_plane"}}"#;
        assert!(FilterConfig::from_bytes(Some(ok)).expect("valid").is_state_service());
        let mixed = br#"{"control_plane":{"cluster":"cp"},"state":{}}"#;
        let err = FilterConfig::from_bytes(Some(mixed)).expect_err("invalid");
        assert!(err.to_string().contains("`control_plane`"), "{err}");
    }

    #[test]
    fn native_connection_needs_an_address_and_state() {
        let ok = br#"{"control_plane":{"address":"http://127.0.0.1:7001"},"state":{}}"#;
        let config = FilterConfig::from_bytes(Some(ok)).expect("valid");
        assert!(!config.is_state_service());
        for (bad, field) in [
            (&br#"{"control_plane":{"address":"http://127.0.0.1:7001"}}"#[..], "`state`"),
            (br#"{"control_plane":{"address":"127.0.0.1:7001"},"state":{}}"#, "control_plane.address"),
            (br#"{"control_plane":{"cluster":"cp","address":"http://a:1"}}"#, "exactly one"),
            (br#"{"control_plane":{}}"#, "exactly one"),
        ] {
            let err = FilterConfig::from_bytes(Some(bad)).expect_err("invalid");
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn poll_longer_than_ttl_is_rejected() {
        let err =
            FilterConfig::from_bytes(Some(br#"{"state":{"ttl_ms":10,"poll_ms":20}}"#)).expect_err("bad");
        assert!(err.to_string().contains("state.poll_ms"), "{err}");
    }

    #[test]
    fn zero_block_size_is_rejected() {
        let err = FilterConfig::from_bytes(Some(with_worker("m", 0).as_bytes())).expect_err("invalid");
        assert!(err.to_string().contains("workers[0].block_size"), "{err}");
    }
}
