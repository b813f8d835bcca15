//! Command-line configuration of `kvmesh agent` and its validation.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::Error;
use crate::engines::zmq::{ZmqEndpoint, offset_port};

/// Which engine the worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// vLLM: KV events over ZMQ, Prometheus metrics.
    Vllm,
    /// SGLang: KV events over ZMQ, Prometheus metrics.
    Sglang,
    /// TensorRT-LLM: KV events polled over HTTP, JSON iteration stats.
    Trtllm,
}

impl EngineKind {
    /// The wire enum.
    pub fn to_proto(self) -> kvmesh_proto::v1::Engine {
        match self {
            EngineKind::Vllm => kvmesh_proto::v1::Engine::Vllm,
            EngineKind::Sglang => kvmesh_proto::v1::Engine::Sglang,
            EngineKind::Trtllm => kvmesh_proto::v1::Engine::Trtllm,
        }
    }
}

/// The worker's part in disaggregated serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Prefill only.
    Prefill,
    /// Decode only.
    Decode,
    /// Both (no disaggregation).
    Both,
}

impl RoleArg {
    /// The wire enum.
    pub fn to_proto(self) -> kvmesh_proto::v1::Role {
        match self {
            RoleArg::Prefill => kvmesh_proto::v1::Role::Prefill,
            RoleArg::Decode => kvmesh_proto::v1::Role::Decode,
            RoleArg::Both => kvmesh_proto::v1::Role::Both,
        }
    }
}

/// `kvmesh agent`: one per worker; turns its engine's KV events, metrics and GPU telemetry into NATS
/// messages for the control plane.
#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// This worker's id: unique in the namespace; no `.`, `*`, `>` or whitespace (it is a NATS subject token).
    #[arg(long, env = "KVMESH_WORKER_ID", required_unless_present = "gpu_probe")]
    pub worker_id: Option<String>,
    /// The engine the worker runs.
    #[arg(long, value_enum, default_value = "vllm")]
    pub engine: EngineKind,
    /// Served model name.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Where clients reach the worker, HOST:PORT.
    #[arg(long, required_unless_present = "gpu_probe")]
    pub address: Option<String>,
    /// The worker's part in disaggregated serving.
    #[arg(long, value_enum, default_value = "both")]
    pub role: RoleArg,
    /// The engine's KV-event publisher to connect to, tcp://HOST:PORT (vLLM/SGLang with a `*` endpoint,
    /// which binds). For TensorRT-LLM: its HTTP base URL (default: http://ADDRESS).
    #[arg(long, conflicts_with = "kv_events_bind")]
    pub kv_events: Option<String>,
    /// Bind here and let the engine's publisher connect, tcp://*:PORT (an engine endpoint without `*`
    /// connects out).
    #[arg(long)]
    pub kv_events_bind: Option<String>,
    /// The engine's replay socket, tcp://HOST:PORT (vLLM's `replay_endpoint`); without it a gap resets
    /// the worker's blocks.
    #[arg(long)]
    pub kv_replay: Option<String>,
    /// KV-event topic prefix (vLLM's `topic`; empty: every message).
    #[arg(long, default_value = "")]
    pub kv_topic: String,
    /// Data-parallel ranks: rank r publishes on port+r (and replays on replay port+r).
    #[arg(long, default_value_t = 1)]
    pub dp_size: u32,
    /// The engine's metrics endpoint, e.g. http://127.0.0.1:8000/metrics. Without it no load is
    /// reported beyond GPUs, and the worker is always considered alive.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Tokens per KV block until the engine reports its own.
    #[arg(long)]
    pub block_size: Option<u32>,
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// kvmesh namespace (the `<ns>` of every subject).
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Identifies the tokenizer files the engine uses (content hash).
    #[arg(long, default_value = "")]
    pub tokenizer_id: String,
    /// How often to publish a LoadReport.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub load_interval: Duration,
    /// Heartbeat TTL: the worker expires when none arrives for this long; heartbeats go every ttl/3.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Serve the agent's own Prometheus metrics (and /healthz) here, HOST:PORT.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// GPUs the worker uses: NVML indices or UUIDs, comma-separated; `none` for no GPU telemetry
    /// (default: CUDA_VISIBLE_DEVICES, else every GPU).
    #[arg(long)]
    pub gpus: Option<String>,
    /// Print one JSON reading of the GPUs (NVML) and exit.
    #[arg(long)]
    pub gpu_probe: bool,
    /// How long to wait for the replay socket and for each of its replies.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub replay_timeout: Duration,
    /// How often to poll TensorRT-LLM's KV events.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub kv_poll_interval: Duration,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    pub log_level: tracing::Level,
}

/// A duration: `500ms`, `2s`, `1m`, or plain seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 =
        number.trim().parse().map_err(|_| format!("`{text}` is not a duration (e.g. 500ms, 2s, 1m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (use ms, s or m)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 86_400.0 {
        return Err(format!("`{text}` must be between 0 and 24 hours"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Everything the agent runs with, validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Worker id.
    pub worker_id: String,
    /// The arguments as given.
    pub args: AgentArgs,
    /// One ZMQ endpoint per data-parallel rank (vLLM, SGLang).
    pub zmq: Vec<ZmqEndpoint>,
    /// TensorRT-LLM's event URL.
    pub trtllm_events: Option<String>,
}

impl AgentArgs {
    /// Checks the arguments and derives the endpoints; errors name the flag.
    pub fn validate(&self) -> Result<AgentConfig, Error> {
        let invalid = |flag: &'static str, reason: String| Error::InvalidFlag { flag, reason };
        let worker_id =
            self.worker_id.clone().ok_or_else(|| invalid("--worker-id", "is required".to_owned()))?;
        check_token("--worker-id", &worker_id)?;
        check_token("--namespace", &self.namespace)?;
        let address =
            self.address.as_deref().ok_or_else(|| invalid("--address", "is required".to_owned()))?;
        if address.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(invalid("--address", format!("`{address}` is not HOST:PORT")));
        }
        if self.dp_size == 0 || self.dp_size > 1024 {
            return Err(invalid("--dp-size", "must be between 1 and 1024".to_owned()));
        }
        if self.block_size == Some(0) {
            return Err(invalid("--block-size", "must be at least 1".to_owned()));
        }
        if let Some(url) = &self.metrics_url
            && !url.starts_with("http://")
        {
            return Err(invalid("--metrics-url", format!("`{url}` is not an http:// URL")));
        }
        let mut config = AgentConfig { worker_id, args: self.clone(), zmq: Vec::new(), trtllm_events: None };
        match self.engine {
            EngineKind::Trtllm => {
                if self.kv_events_bind.is_some() {
                    return Err(invalid("--kv-events-bind", "is for ZMQ engines (vllm, sglang)".to_owned()));
                }
                let base = self.kv_events.clone().unwrap_or_else(|| format!("http://{address}"));
                if !base.starts_with("http://") {
                    return Err(invalid(
                        "--kv-events",
                        format!("`{base}` is not an http:// URL (TensorRT-LLM)"),
                    ));
                }
                let base = base.trim_end_matches('/');
                config.trtllm_events = Some(if base.ends_with("/kv_cache_events") {
                    base.to_owned()
                } else {
                    format!("{base}/kv_cache_events")
                });
            }
            EngineKind::Vllm | EngineKind::Sglang => {
                let (events, bind, flag) = match (&self.kv_events, &self.kv_events_bind) {
                    (Some(e), None) => (e, false, "--kv-events"),
                    (None, Some(e)) => (e, true, "--kv-events-bind"),
                    _ => return Err(invalid("--kv-events", "or --kv-events-bind is required".to_owned())),
                };
                check_tcp(flag, events)?;
                if let Some(replay) = &self.kv_replay {
                    check_tcp("--kv-replay", replay)?;
                }
                for rank in 0..self.dp_size {
                    let offset = |ep: &str, flag| {
                        offset_port(ep, rank)
                            .ok_or_else(|| invalid(flag, format!("`{ep}` has no room for rank {rank}")))
                    };
                    config.zmq.push(ZmqEndpoint {
                        rank,
                        events: offset(events, flag)?,
                        bind,
                        replay: self.kv_replay.as_deref().map(|r| offset(r, "--kv-replay")).transpose()?,
                        topic: self.kv_topic.clone(),
                        replay_timeout: self.replay_timeout,
                    });
                }
            }
        }
        Ok(config)
    }
}

/// A NATS subject token: non-empty, no separators or wildcards.
fn check_token(flag: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.chars().any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace()) {
        return Err(Error::InvalidFlag {
            flag,
            reason: format!("`{value}` must be non-empty without `.`, `*`, `>` or whitespace"),
        });
    }
    Ok(())
}

fn check_tcp(flag: &'static str, endpoint: &str) -> Result<(), Error> {
    let ok = endpoint
        .strip_prefix("tcp://")
        .and_then(|rest| rest.rsplit_once(':'))
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !ok {
        return Err(Error::InvalidFlag { flag, reason: format!("`{endpoint}` is not tcp://HOST:PORT") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn parse(flags: &[&str]) -> Result<AgentConfig, Error> {
        let cli = Cli::try_parse_from(std::iter::once("agent").chain(flags.iter().copied()))
            .map_err(|e| Error::InvalidFlag { flag: "clap", reason: e.to_string() })?;
        cli.args.validate()
    }

    #[test]
    fn dp_ranks_get_consecutive_ports() {
        let config = parse(&[
            "--worker-id=w1",
            "--address=10.0.0.1:8000",
            "--kv-events=tcp://10.0.0.1:5557",
            "--kv-replay=tcp://10.0.0.1:6557",
            "--dp-size=2",
        ])
        .expect("valid flags");
        let ports: Vec<_> = config.zmq.iter().map(|e| (e.events.as_str(), e.replay.as_deref())).collect();
        assert_eq!(
            ports,
            vec![
                ("tcp://10.0.0.1:5557", Some("tcp://10.0.0.1:6557")),
                ("tcp://10.0.0.1:5558", Some("tcp://10.0.0.1:6558"))
            ]
        );
        assert!(!config.zmq[0].bind);
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let err = |flags: &[&str]| parse(flags).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&["--worker-id=a.b", "--address=h:1", "--kv-events=tcp://h:1"]).contains("--worker-id"));
        assert!(err(&["--worker-id=a", "--address=h", "--kv-events=tcp://h:1"]).contains("--address"));
        assert!(err(&["--worker-id=a", "--address=h:1"]).contains("--kv-events"));
        assert!(err(&["--worker-id=a", "--address=h:1", "--kv-events=h:1"]).contains("--kv-events"));
        assert!(
            err(&["--worker-id=a", "--address=h:1", "--kv-events-bind=tcp://*:x"])
                .contains("--kv-events-bind")
        );
        assert!(
            err(&["--worker-id=a", "--address=h:1", "--kv-events=tcp://h:1", "--ttl=0s"]).contains("ttl")
        );
    }

    #[test]
    fn trtllm_events_default_to_the_worker_address() {
        let config = parse(&["--worker-id=t", "--engine=trtllm", "--address=h:8000"]).expect("valid");
        assert_eq!(config.trtllm_events.as_deref(), Some("http://h:8000/kv_cache_events"));
        let config =
            parse(&["--worker-id=t", "--engine=trtllm", "--address=h:8000", "--kv-events=http://e:9/"])
                .expect("valid");
        assert_eq!(config.trtllm_events.as_deref(), Some("http://e:9/kv_cache_events"));
    }

    #[test]
    fn gpu_probe_needs_nothing_else() {
        let cli = Cli::try_parse_from(["agent", "--gpu-probe"]).expect("probe alone parses");
        assert!(cli.args.gpu_probe);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
