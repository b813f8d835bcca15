//! The state service: the module's second role, as a singleton `envoy.bootstrap.wasm` service with
//! the same `vm_id` as the HTTP filter. Holds the one gRPC `kvmesh.v1.State/Subscribe` stream of
//! this Envoy, fetches models' tokenizer files with `GetModelAssets`, and relays both through
//! shared data ([`crate::relay`]). Thin host glue: the relay logic is pure and tested natively.

use std::collections::HashMap;
use std::time::Duration;

use kvmesh_proto::v1 as pb;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::types::BufferType;

use crate::config::ControlPlaneConfig;
use crate::http_context::ProxyWasmStats;
use crate::metrics::StreamMetrics;
use crate::relay::{Head, Publisher, Received, SharedStore};

/// The gRPC service and its methods.
const SERVICE: &str = "kvmesh.v1.State";
const SUBSCRIBE: &str = "Subscribe";
const GET_MODEL_ASSETS: &str = "GetModelAssets";
/// How often the service checks its stream and pending fetches.
pub(crate) const TICK: Duration = Duration::from_millis(200);
/// Longest wait between reconnects.
const MAX_BACKOFF_MS: u64 = 30_000;
/// A stream silent for this long is presumed dead and reopened (the control plane sends a
/// heartbeat every second by default).
const SILENT_STREAM_MS: u64 = 10_000;
/// Wait before asking again for a model's files after a failed fetch.
const ASSETS_RETRY_MS: u64 = 5_000;

/// Envoy's shared data (namespaced by `vm_id`).
pub(crate) struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        match hostcalls::get_shared_data(key) {
            Ok((value, _cas)) => value,
            Err(status) => {
                log::warn!("kvmesh filter: cannot read shared data {key}: {status:?}");
                None
            }
        }
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        hostcalls::set_shared_data(key, Some(value), None).map_err(|status| format!("{status:?}"))
    }
}

/// The stream and fetches of one Envoy.
pub(crate) struct StateService {
    config: ControlPlaneConfig,
    /// The control plane's Envoy cluster.
    cluster: String,
    publisher: Publisher,
    metrics: StreamMetrics<ProxyWasmStats>,
    /// The open stream's token.
    stream: Option<u32>,
    /// When the open stream last delivered anything, host ms.
    last_message_ms: u64,
    /// Earliest time to reopen a closed stream, and the current backoff.
    reopen_at_ms: u64,
    backoff_ms: u64,
    /// Fetches in flight (token to model) and when a failed model may be asked for again.
    fetches: HashMap<u32, String>,
    retry_assets_at: HashMap<String, u64>,
}

impl StateService {
    /// A service that will subscribe on its first tick.
    pub(crate) fn new(config: ControlPlaneConfig, cluster: String) -> StateService {
        // A reloaded VM continues the previous one's assets generation, so readers notice new files.
        let previous = HostStore.get(crate::relay::HEAD_KEY).as_deref().and_then(Head::decode);
        let backoff_ms = config.retry_ms.max(1);
        StateService {
            config,
            cluster,
            publisher: Publisher::new(previous),
            metrics: StreamMetrics::define(ProxyWasmStats),
            stream: None,
            last_message_ms: 0,
            reopen_at_ms: 0,
            backoff_ms,
            fetches: HashMap::new(),
            retry_assets_at: HashMap::new(),
        }
    }

    /// Periodic work: (re)open the stream when due; retry failed fetches.
    pub(crate) fn on_tick(&mut self, now_ms: u64) {
        if let Some(token) = self.stream
            && now_ms.saturating_sub(self.last_message_ms) > SILENT_STREAM_MS
        {
            log::warn!("kvmesh filter: state stream silent for {SILENT_STREAM_MS} ms; reopening");
            let _ = hostcalls::cancel_grpc_stream(token);
            self.closed(now_ms);
        }
        if self.stream.is_none() && now_ms >= self.reopen_at_ms {
            self.open(now_ms);
        }
        self.fetch_missing_assets(now_ms);
    }

    fn open(&mut self, now_ms: u64) {
        let (epoch, version) = self.publisher.resume_point();
        let request = pb::SubscribeRequest { node: self.config.node.clone(), epoch, version }.encode_to_vec();
        let opened = hostcalls::open_grpc_stream(&self.cluster, SERVICE, SUBSCRIBE, Vec::new())
            // End of the request side with its one message: a server-streaming call's server (tonic)
            // reads the request to its end before it answers.
            .and_then(|token| {
                hostcalls::send_grpc_stream_message(token, Some(&request), true).map(|()| token)
            });
        match opened {
            Ok(token) => {
                log::info!(
                    "kvmesh filter: subscribing to the control plane on cluster {} (epoch {epoch}, version {version})",
                    self.cluster
                );
                self.metrics.opened();
                self.stream = Some(token);
                self.last_message_ms = now_ms;
            }
            Err(status) => {
                log::warn!("kvmesh filter: cannot open the state stream on {}: {status:?}", self.cluster);
                self.closed(now_ms);
            }
        }
    }

    /// The stream is gone: reopen after the backoff, which doubles up to its cap.
    fn closed(&mut self, now_ms: u64) {
        self.stream = None;
        self.metrics.set_connected(false);
        self.reopen_at_ms = now_ms + self.backoff_ms;
        self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
    }

    /// One message on the stream.
    pub(crate) fn on_stream_message(&mut self, token: u32, size: usize, now_ms: u64) {
        if self.stream != Some(token) {
            return;
        }
        self.last_message_ms = now_ms;
        let bytes = match hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log::warn!("kvmesh filter: cannot read a state update: {status:?}");
                return;
            }
        };
        match self.publisher.receive(&bytes, now_ms, &mut HostStore) {
            Ok(received) => {
                self.metrics.set_connected(true);
                self.backoff_ms = self.config.retry_ms.max(1);
                self.metrics.received(&received);
                match received {
                    Received::Snapshot | Received::Delta | Received::Heartbeat => {}
                    Received::Gap => {
                        // Resubscribing from the last relayed version gets the missing deltas or a
                        // fresh snapshot.
                        log::warn!("kvmesh filter: state stream skipped a version; resubscribing");
                        let _ = hostcalls::cancel_grpc_stream(token);
                        self.stream = None;
                        self.open(now_ms);
                        return;
                    }
                }
                self.fetch_missing_assets(now_ms);
            }
            Err(err) => {
                self.metrics.error();
                log::warn!("kvmesh filter: state update not relayed: {err}");
            }
        }
    }

    /// The stream closed (the control plane went away, or the connection failed).
    pub(crate) fn on_stream_close(&mut self, token: u32, status: u32, now_ms: u64) {
        if self.stream == Some(token) {
            log::warn!(
                "kvmesh filter: state stream closed (grpc status {status}); retrying in {} ms",
                self.backoff_ms
            );
            self.closed(now_ms);
        }
    }

    /// Asks for the files of every model that has workers but no relayed files.
    fn fetch_missing_assets(&mut self, now_ms: u64) {
        for model in self.publisher.models_missing_assets() {
            if self.fetches.values().any(|m| *m == model)
                || self.retry_assets_at.get(&model).is_some_and(|&at| now_ms < at)
            {
                continue;
            }
            let request = pb::ModelAssetsRequest { model: model.clone() }.encode_to_vec();
            let timeout = Duration::from_millis(self.config.assets_timeout_ms);
            match hostcalls::dispatch_grpc_call(
                &self.cluster,
                SERVICE,
                GET_MODEL_ASSETS,
                Vec::new(),
                Some(&request),
                timeout,
            ) {
                Ok(token) => {
                    self.fetches.insert(token, model);
                }
                Err(status) => {
                    log::warn!("kvmesh filter: cannot ask for the files of {model}: {status:?}");
                    self.retry_assets_at.insert(model, now_ms + ASSETS_RETRY_MS);
                }
            }
        }
    }

    /// A `GetModelAssets` answer.
    pub(crate) fn on_call_response(&mut self, token: u32, status: u32, size: usize, now_ms: u64) {
        let Some(model) = self.fetches.remove(&token) else { return };
        let bytes = match hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size) {
            Ok(bytes) if status == 0 => bytes.unwrap_or_default(),
            Ok(_) | Err(_) => {
                self.metrics.assets(false);
                log::warn!(
                    "kvmesh filter: the control plane has no files for {model} (grpc status {status}); \
                     retrying in {ASSETS_RETRY_MS} ms"
                );
                self.retry_assets_at.insert(model, now_ms + ASSETS_RETRY_MS);
                return;
            }
        };
        match self.publisher.publish_assets(&bytes, &mut HostStore) {
            Ok(model) => {
                self.metrics.assets(true);
                log::info!("kvmesh filter: relayed the files of {model} ({} bytes)", bytes.len());
            }
            Err(err) => {
                self.metrics.assets(false);
                log::warn!("kvmesh filter: files of {model} not relayed: {err}");
                self.retry_assets_at.insert(model, now_ms + ASSETS_RETRY_MS);
            }
        }
    }
}
