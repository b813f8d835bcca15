//! The control plane's configuration: one YAML file, flags on top of it, defaults in [`defaults`],
//! and a [`Config::validate`] whose errors name the offending field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kvmesh_core::RoutingConfig;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Environment variable that holds the admin token when the config file names none.
pub const ADMIN_TOKEN_ENV: &str = "KVMESH_ADMIN_TOKEN";

/// The default of every setting, in one place.
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    /// Namespace of the NATS subjects (`kvmesh.<namespace>.*`).
    pub const NAMESPACE: &str = "default";
    /// NATS server (the nats-server default port on this host).
    pub const NATS_URL: &str = "nats://127.0.0.1:4222";
    /// REST admin listener.
    pub const ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
    /// gRPC state-stream listener.
    pub const GRPC_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9091);
    /// Distinct blocks the fleet index holds before it drops the least recently stored: 16 Mi blocks
    /// is 256 Gi tokens at block size 16, about 500 MB of index.
    pub const INDEX_MAX_BLOCKS: usize = 16 << 20;
    /// Shortest time between two deltas: changes arriving within it are coalesced into one. An
    /// isolated change goes out at once; a busy fleet yields 50 deltas a second at most.
    pub const STREAM_BATCH_MS: u64 = 20;
    /// Deltas kept for resuming subscribers: 30 s of a busy fleet at the default batch window.
    pub const STREAM_RING_DELTAS: usize = 1500;
    /// Updates queued per subscriber before it counts as lagging (it then resumes from the ring or
    /// gets a fresh snapshot).
    pub const STREAM_SUBSCRIBER_BUFFER: usize = 64;
    /// An idle stream still carries a heartbeat this often, so filters can tell "nothing changed"
    /// from "the control plane is gone" (their state TTL is several of these).
    pub const STREAM_HEARTBEAT_MS: u64 = 1_000;
    /// How long after start the control plane waits for `resync.all` answers before it is ready.
    pub const RESYNC_STARTUP_WINDOW_MS: u64 = 2_000;
    /// How long a resync request may go unanswered before it is sent again.
    pub const RESYNC_TIMEOUT_MS: u64 = 5_000;
    /// Longest wait between two resync requests to a silent worker (timeouts double up to this).
    pub const RESYNC_MAX_BACKOFF_MS: u64 = 60_000;
    /// KV event batches held per worker while its resync is under way; past it they are dropped
    /// and the resync answer is trusted alone (another gap then asks again).
    pub const RESYNC_BUFFER_BATCHES: usize = 4_096;
    /// Expiry of a worker whose heartbeat gives no ttl, and of a worker heard of only through its
    /// events or resync answers, never through a heartbeat.
    pub const WORKER_TTL_MS: u64 = 15_000;
    /// How often expiry and resync timeouts are checked.
    pub const HOUSEKEEPING_MS: u64 = 250;
    /// Largest `/v1/explain` body accepted.
    pub const MAX_EXPLAIN_BODY_BYTES: usize = kvmesh_core::request::DEFAULT_MAX_BODY_BYTES;
}

/// The whole configuration file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Namespace of the NATS subjects: `kvmesh.<namespace>.kv.<worker>` and so on. One NATS token:
    /// no dots, spaces, `*` or `>`.
    pub namespace: String,
    /// NATS connection.
    pub nats: NatsConfig,
    /// REST admin API.
    pub admin: AdminConfig,
    /// gRPC state stream to filters.
    pub grpc: GrpcConfig,
    /// The fleet's prefix index.
    pub index: IndexConfig,
    /// State-stream batching and resume buffer.
    pub stream: StreamConfig,
    /// Resyncing workers' block sets.
    pub resync: ResyncConfig,
    /// Worker registry.
    pub workers: WorkersConfig,
    /// Models served by the fleet: tokenizer files, block size and routing policy of each.
    pub models: Vec<ModelConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: defaults::NAMESPACE.to_owned(),
            nats: NatsConfig::default(),
            admin: AdminConfig::default(),
            grpc: GrpcConfig::default(),
            index: IndexConfig::default(),
            stream: StreamConfig::default(),
            resync: ResyncConfig::default(),
            workers: WorkersConfig::default(),
            models: Vec::new(),
        }
    }
}

/// NATS connection settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL (`nats://host:4222`, `tls://host:4222`); several may be given comma-separated.
    pub url: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig { url: defaults::NATS_URL.to_owned() }
    }
}

/// REST admin API settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address, `HOST:PORT` (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Bearer token that mutating calls must present; when absent, `KVMESH_ADMIN_TOKEN` is used,
    /// and with neither every mutating call is refused.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: defaults::ADMIN_LISTEN, token: None }
    }
}

/// gRPC state-stream settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Listen address, `HOST:PORT` (port 0 picks a free one).
    pub listen: SocketAddr,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig { listen: defaults::GRPC_LISTEN }
    }
}

/// Prefix-index settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IndexConfig {
    /// Most distinct blocks indexed; past it the least recently stored are dropped.
    pub max_blocks: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig { max_blocks: defaults::INDEX_MAX_BLOCKS }
    }
}

/// State-stream settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Shortest time between two deltas, milliseconds; changes within it are coalesced into one
    /// (an isolated change goes out at once).
    pub batch_ms: u64,
    /// Deltas kept so that a reconnecting filter resumes without a snapshot.
    pub ring_deltas: usize,
    /// Updates queued per subscriber before it is treated as lagging.
    pub subscriber_buffer: usize,
    /// Milliseconds between heartbeats (updates without a body) on an idle stream.
    pub heartbeat_ms: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            batch_ms: defaults::STREAM_BATCH_MS,
            ring_deltas: defaults::STREAM_RING_DELTAS,
            subscriber_buffer: defaults::STREAM_SUBSCRIBER_BUFFER,
            heartbeat_ms: defaults::STREAM_HEARTBEAT_MS,
        }
    }
}

/// Resync settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ResyncConfig {
    /// Milliseconds after start before `/readyz` turns ready, so `resync.all` answers are in.
    pub startup_window_ms: u64,
    /// Milliseconds a resync request may go unanswered before it is repeated.
    pub timeout_ms: u64,
    /// Longest wait between repeated requests, milliseconds (the wait doubles up to this).
    pub max_backoff_ms: u64,
    /// KV event batches buffered per worker while its resync is under way.
    pub buffer_batches: usize,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig {
            startup_window_ms: defaults::RESYNC_STARTUP_WINDOW_MS,
            timeout_ms: defaults::RESYNC_TIMEOUT_MS,
            max_backoff_ms: defaults::RESYNC_MAX_BACKOFF_MS,
            buffer_batches: defaults::RESYNC_BUFFER_BATCHES,
        }
    }
}

/// Worker-registry settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersConfig {
    /// Expiry, milliseconds, of a worker whose heartbeat has `ttl_ms` 0, and of a worker known only
    /// from its events or resync answers.
    pub default_ttl_ms: u64,
    /// How often expiry and resync timeouts are checked, milliseconds.
    pub housekeeping_ms: u64,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig { default_ttl_ms: defaults::WORKER_TTL_MS, housekeeping_ms: defaults::HOUSEKEEPING_MS }
    }
}

/// One served model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model name as requests give it (the OpenAI `model` field) and workers register it.
    pub name: String,
    /// Directory with `tokenizer.json`, and optionally `tokenizer_config.json` and
    /// `chat_template.jinja`; served to filters and used by `/v1/explain`.
    #[serde(default)]
    pub tokenizer_dir: Option<PathBuf>,
    /// Tokens per KV block; when absent, the block size the model's workers register.
    #[serde(default)]
    pub block_size: Option<u32>,
    /// Routing policy and weights (core's routing config; every field optional).
    #[serde(default)]
    pub routing: RoutingConfig,
}

impl ModelConfig {
    /// A model with only a name (and maybe tokenizer files); everything else default.
    pub fn named(name: impl Into<String>, tokenizer_dir: Option<PathBuf>) -> Self {
        ModelConfig { name: name.into(), tokenizer_dir, block_size: None, routing: RoutingConfig::default() }
    }
}

impl Config {
    /// Reads and parses a YAML file (not yet validated).
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            field: "--config".into(),
            reason: format!("{}: {e}", path.display()),
        })?;
        Config::from_yaml(&text)
    }

    /// Parses YAML text (not yet validated).
    pub fn from_yaml(text: &str) -> Result<Config, Error> {
        serde_norway::from_str(text)
            .map_err(|e| Error::Config { field: "config".into(), reason: e.to_string() })
    }

    /// The admin token in force: the file's, else `KVMESH_ADMIN_TOKEN`'s; `None` when neither is set.
    pub fn admin_token(&self) -> Option<String> {
        self.admin
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .or_else(|| std::env::var(ADMIN_TOKEN_ENV).ok().filter(|t| !t.is_empty()))
    }

    /// The configuration of a model, if configured.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Checks every value; the error names the first offending field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &str, reason: String| Err(Error::Config { field: field.to_owned(), reason });
        if !is_subject_token(&self.namespace) {
            return bad(
                "namespace",
                format!(
                    "must be one NATS subject token (no dots, spaces, `*` or `>`), got {:?}",
                    self.namespace
                ),
            );
        }
        if self.nats.url.trim().is_empty() {
            return bad("nats.url", "must not be empty".into());
        }
        if self.admin.token.as_deref() == Some("") {
            return bad("admin.token", "must not be empty (leave it out to use KVMESH_ADMIN_TOKEN)".into());
        }
        if self.index.max_blocks == 0 {
            return bad("index.max_blocks", "must be at least 1".into());
        }
        if self.stream.batch_ms == 0 || self.stream.batch_ms > 10_000 {
            return bad("stream.batch_ms", format!("must be in 1..=10000, got {}", self.stream.batch_ms));
        }
        if self.stream.ring_deltas == 0 {
            return bad("stream.ring_deltas", "must be at least 1".into());
        }
        if self.stream.heartbeat_ms == 0 || self.stream.heartbeat_ms > 60_000 {
            return bad(
                "stream.heartbeat_ms",
                format!("must be in 1..=60000, got {}", self.stream.heartbeat_ms),
            );
        }
        if self.stream.subscriber_buffer == 0 {
            return bad("stream.subscriber_buffer", "must be at least 1".into());
        }
        if self.resync.timeout_ms == 0 {
            return bad("resync.timeout_ms", "must be at least 1".into());
        }
        if self.resync.max_backoff_ms < self.resync.timeout_ms {
            return bad(
                "resync.max_backoff_ms",
                format!(
                    "must be at least resync.timeout_ms ({}), got {}",
                    self.resync.timeout_ms, self.resync.max_backoff_ms
                ),
            );
        }
        if self.workers.default_ttl_ms == 0 {
            return bad("workers.default_ttl_ms", "must be at least 1".into());
        }
        if self.workers.housekeeping_ms == 0 {
            return bad("workers.housekeeping_ms", "must be at least 1".into());
        }
        for (i, model) in self.models.iter().enumerate() {
            if model.name.is_empty() {
                return bad(&format!("models[{i}].name"), "must not be empty".into());
            }
            if self.models[..i].iter().any(|m| m.name == model.name) {
                return bad(&format!("models[{i}].name"), format!("{:?} is configured twice", model.name));
            }
            if model.block_size == Some(0) {
                return bad(&format!("models[{i}].block_size"), "must be at least 1".into());
            }
            if let Some(dir) = &model.tokenizer_dir
                && !dir.join("tokenizer.json").is_file()
            {
                return bad(
                    &format!("models[{i}].tokenizer_dir"),
                    format!("{} has no tokenizer.json", dir.display()),
                );
            }
            if let Err(e) = model.routing.validate() {
                return bad(&format!("models[{i}].routing"), e.to_string());
            }
        }
        Ok(())
    }
}

/// Whether `s` can stand as one token of a NATS subject.
pub fn is_subject_token(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<(), Error>) -> String {
        match result {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn empty_file_takes_defaults() {
        let config = Config::from_yaml("{}").unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = Config::from_yaml("namespace: a\nnats:\n  uri: nats://x\n").unwrap_err();
        assert!(err.to_string().contains("uri"), "{err}");
        let err = Config::from_yaml("models:\n- name: m\n  routing:\n    polcy: kv-aware\n").unwrap_err();
        assert!(err.to_string().contains("polcy"), "{err}");
    }

    #[test]
    fn validation_errors_name_the_field() {
        let mut c = Config { namespace: "a.b".into(), ..Config::default() };
        assert_eq!(field_of(c.validate()), "namespace");
        c.namespace = "prod".into();
        c.index.max_blocks = 0;
        assert_eq!(field_of(c.validate()), "index.max_blocks");
        c.index.max_blocks = 10;
        c.stream.batch_ms = 0;
        assert_eq!(field_of(c.validate()), "stream.batch_ms");
        c.stream.batch_ms = 10;
        c.models = vec![ModelConfig::named("m", None), ModelConfig::named("m", None)];
        assert_eq!(field_of(c.validate()), "models[1].name");
        c.models.pop();
        c.models[0].routing.weights.overlap_weight = -1.0;
        assert_eq!(field_of(c.validate()), "models[0].routing");
        c.models[0].routing = RoutingConfig::default();
        c.models[0].tokenizer_dir = Some(PathBuf::from("/nonexistent/kvmesh"));
        assert_eq!(field_of(c.validate()), "models[0].tokenizer_dir");
    }

    #[test]
    fn subject_tokens() {
        assert!(is_subject_token("prod-1"));
        for bad in ["", "a.b", "a b", "*", ">"] {
            assert!(!is_subject_token(bad), "{bad:?}");
        }
    }
}
