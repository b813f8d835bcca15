//! Command-line flags and the validated configuration of one simulated worker.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};

use crate::engine_hash::{HashAlgo, MAX_PICKLE_BLOCK_TOKENS};
use crate::prompt::PromptTokenizer;
use crate::timing::TimingModel;

/// Which real engine the worker imitates on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum EngineKind {
    /// vLLM 0.33 (V1 engine): ZMQ KV events, `/load`, `/kv_event_sources`, NixlConnector P/D.
    Vllm,
    /// SGLang 0.5: ZMQ KV events (coalesced), `/server_info`, `/get_load`, bootstrap P/D.
    Sglang,
    /// TensorRT-LLM (trtllm-serve): JSON iteration stats, `POST /kv_cache_events`, disaggregated params.
    Trtllm,
}

impl EngineKind {
    /// The engine's name as it appears in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Trtllm => "trtllm",
        }
    }
}

/// The worker's part in prefill/decode disaggregation.
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum Role {
    /// Computes prompts and hands their KV to a decode worker.
    Prefill,
    /// Receives prompt KV from a prefill worker and generates.
    Decode,
    /// Serves whole requests (and either P/D leg, as vLLM's `kv_both`).
    Both,
}

/// vLLM's `--prefix-caching-hash-algo` values the sim reproduces.
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum VllmHashAlgo {
    /// SHA-256 over pickle (vLLM's default).
    #[value(name = "sha256")]
    Sha256,
    /// SHA-256 over canonical CBOR.
    #[value(name = "sha256_cbor")]
    Sha256Cbor,
}

/// `kvmesh sim` flags.
#[derive(Clone, Debug, Args)]
pub struct SimArgs {
    /// Engine whose wire formats to speak.
    #[arg(long, value_enum, default_value = "vllm")]
    pub engine: EngineKind,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model name.
    #[arg(long, default_value = "Qwen/Qwen3-8B")]
    pub model: String,
    /// Directory with the model's tokenizer.json (+ tokenizer_config.json); default
    /// `$KVMESH_TOKENIZERS/qwen3` if present, else a built-in word tokenizer (ids are then not a real model's).
    #[arg(long)]
    pub tokenizer_dir: Option<PathBuf>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV cache capacity in blocks (default ≈ 400k tokens: Llama-3.1-8B bf16 on an 80 GB H100 at 0.9 memory utilization).
    #[arg(long, default_value_t = 25_000)]
    pub kv_blocks: usize,
    /// Longest prompt plus output accepted, in tokens.
    #[arg(long, default_value_t = 32_768)]
    pub max_model_len: usize,
    /// P/D role.
    #[arg(long, value_enum, default_value = "both")]
    pub role: Role,
    /// ZMQ endpoint of the KV event PUB socket (vLLM semantics: `*` binds, else connects); no events without it.
    #[arg(long)]
    pub kv_events_endpoint: Option<String>,
    /// ZMQ endpoint of the replay ROUTER socket (always binds); no replay without it.
    #[arg(long)]
    pub kv_replay_endpoint: Option<String>,
    /// Topic frame of every KV event message.
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,
    /// Batches kept for replay (vLLM's `buffer_steps`).
    #[arg(long, default_value_t = 10_000)]
    pub kv_events_buffer_steps: usize,
    /// vLLM's block hash algorithm (events carry its values).
    #[arg(long, value_enum, default_value = "sha256")]
    pub prefix_caching_hash_algo: VllmHashAlgo,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Seed of every random choice (generated tokens, output lengths, ids).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (prefill chunks plus decodes).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Output length when a request sets no max_tokens is drawn from 1..=this (finish_reason "stop").
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Fixed cost of one forward pass, in ms (weights read once per step).
    #[arg(long, default_value_t = 6.0)]
    pub step_base_ms: f64,
    /// Prefill cost per prompt token, in µs.
    #[arg(long, default_value_t = 32.0)]
    pub prefill_us_per_token: f64,
    /// Prefill attention cost per (query, key) token pair, in ns.
    #[arg(long, default_value_t = 1.0)]
    pub attention_ns_per_pair: f64,
    /// Decode cost per sequence in the batch, in µs.
    #[arg(long, default_value_t = 30.0)]
    pub decode_us_per_seq: f64,
    /// Decode cost per context token read from the KV cache, in ns.
    #[arg(long, default_value_t = 40.0)]
    pub kv_read_ns_per_token: f64,
    /// KV bytes per token, for transfer time (Llama-3.1-8B bf16: 32 layers × 8 KV heads × 128 × 2 × 2 B).
    #[arg(long, default_value_t = 131_072)]
    pub kv_bytes_per_token: u64,
    /// KV transfer bandwidth between prefill and decode workers, in Gbit/s.
    #[arg(long, default_value_t = 100.0)]
    pub transfer_gbps: f64,
    /// Port of the KV transfer side channel (vLLM NIXL side channel 5600, SGLang bootstrap 8998; 0 picks one).
    #[arg(long)]
    pub kv_transfer_port: Option<u16>,
    /// How long a prefill worker keeps finished prompts' KV for a decode worker, in simulated seconds.
    #[arg(long, default_value_t = 30.0)]
    pub kv_lease_secs: f64,
    /// TRT-LLM: most KV events kept until `POST /kv_cache_events` drains them (`event_buffer_max_size`).
    #[arg(long, default_value_t = 1024)]
    pub trtllm_event_buffer: usize,
}

/// Why a configuration cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag's value is out of range.
    #[error("--{flag}: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { flag, reason: reason.into() }
}

/// The validated configuration of one simulated worker.
#[derive(Clone)]
pub struct SimConfig {
    /// The flags as given.
    pub args: SimArgs,
    /// A tokenizer already loaded (tests share one); `None` loads per `args.tokenizer_dir`.
    pub tokenizer: Option<Arc<dyn PromptTokenizer>>,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig").field("args", &self.args).finish_non_exhaustive()
    }
}

impl SimConfig {
    /// Checks the flags; names the offending one.
    pub fn new(args: SimArgs) -> Result<Self, ConfigError> {
        let config = SimConfig { args, tokenizer: None };
        config.validate()?;
        Ok(config)
    }

    /// Checks every flag's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.args;
        if a.block_size == 0 || a.block_size > MAX_PICKLE_BLOCK_TOKENS {
            return Err(invalid("block-size", format!("must be 1..={MAX_PICKLE_BLOCK_TOKENS}")));
        }
        if a.kv_blocks == 0 || a.kv_blocks >= u32::MAX as usize - 1 {
            return Err(invalid("kv-blocks", "must be at least 1 and below 2^32 - 1"));
        }
        if a.max_num_seqs == 0 {
            return Err(invalid("max-num-seqs", "must be at least 1"));
        }
        if a.max_num_batched_tokens == 0 {
            return Err(invalid("max-num-batched-tokens", "must be at least 1"));
        }
        if !(a.speedup.is_finite() && a.speedup > 0.0) {
            return Err(invalid("speedup", "must be a positive number"));
        }
        if a.max_model_len == 0 {
            return Err(invalid("max-model-len", "must be at least 1"));
        }
        if a.default_max_tokens == 0 {
            return Err(invalid("default-max-tokens", "must be at least 1"));
        }
        if !(a.transfer_gbps.is_finite() && a.transfer_gbps > 0.0) {
            return Err(invalid("transfer-gbps", "must be a positive number"));
        }
        if !(a.kv_lease_secs.is_finite() && a.kv_lease_secs > 0.0) {
            return Err(invalid("kv-lease-secs", "must be a positive number"));
        }
        for (flag, v) in [
            ("step-base-ms", a.step_base_ms),
            ("prefill-us-per-token", a.prefill_us_per_token),
            ("attention-ns-per-pair", a.attention_ns_per_pair),
            ("decode-us-per-seq", a.decode_us_per_seq),
            ("kv-read-ns-per-token", a.kv_read_ns_per_token),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(flag, "must be a non-negative number"));
            }
        }
        if a.engine == EngineKind::Trtllm && a.kv_events_endpoint.is_some() {
            return Err(invalid(
                "kv-events-endpoint",
                "TRT-LLM serves KV events over HTTP (POST /kv_cache_events)",
            ));
        }
        if a.kv_replay_endpoint.is_some() && a.kv_events_endpoint.is_none() {
            return Err(invalid("kv-replay-endpoint", "needs --kv-events-endpoint"));
        }
        Ok(())
    }

    /// The block hash the engine publishes.
    pub fn hash_algo(&self) -> HashAlgo {
        match (self.args.engine, self.args.prefix_caching_hash_algo) {
            (EngineKind::Vllm, VllmHashAlgo::Sha256) => HashAlgo::VllmSha256,
            (EngineKind::Vllm, VllmHashAlgo::Sha256Cbor) => HashAlgo::VllmSha256Cbor,
            (EngineKind::Sglang, _) => HashAlgo::Sglang,
            (EngineKind::Trtllm, _) => HashAlgo::Trtllm,
        }
    }

    /// The step-time model from the timing flags.
    pub fn timing(&self) -> TimingModel {
        let a = &self.args;
        TimingModel {
            step_base_s: a.step_base_ms / 1e3,
            prefill_s_per_token: a.prefill_us_per_token / 1e6,
            attention_s_per_pair: a.attention_ns_per_pair / 1e9,
            decode_s_per_seq: a.decode_us_per_seq / 1e6,
            kv_read_s_per_token: a.kv_read_ns_per_token / 1e9,
        }
    }

    /// The KV transfer side-channel port: the flag, else the engine's default.
    pub fn kv_transfer_port(&self) -> u16 {
        self.args.kv_transfer_port.unwrap_or(match self.args.engine {
            EngineKind::Vllm => 5600,
            EngineKind::Sglang => 8998,
            EngineKind::Trtllm => 0,
        })
    }
}

impl SimArgs {
    /// The defaults, as `kvmesh sim` with no flags (handy for tests and embedding).
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: SimArgs,
        }
        <Wrapper as clap::Parser>::parse_from(["kvmesh-sim"]).args
    }
}
