//! Prefill/decode disaggregation: each engine's request and response fields, and the KV transfer
//! between two sims.
//!
//! Real engines move KV over RDMA (NIXL, Mooncake, UCX) behind a rendezvous that routers never see;
//! what routers see are the fields below. The sim keeps the fields exact and replaces the transfer
//! with a small TCP side channel on the prefill worker: the decode worker connects, names the KV it
//! wants (vLLM's `remote_request_id`, SGLang's `bootstrap_room`, TRT-LLM's `ctx_request_id`), waits
//! until the prefill worker holds it, and the prefill worker frees its blocks (as NIXL's completion
//! notification does). The decode worker then waits `tokens * kv_bytes_per_token / bandwidth` before
//! it admits the request with those tokens already computed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use crate::scheduler::HoldInfo;

/// P/D fields a request may carry, of any engine (unknown fields are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct PdFields {
    /// vLLM NixlConnector parameters.
    #[serde(default)]
    pub kv_transfer_params: Option<VllmKvParams>,
    /// SGLang: host of the prefill worker's bootstrap server.
    #[serde(default)]
    pub bootstrap_host: Option<String>,
    /// SGLang: its bootstrap port (`null`: this worker's own `--disaggregation-bootstrap-port`).
    #[serde(default)]
    pub bootstrap_port: Option<u16>,
    /// SGLang: the rendezvous key, unique per request.
    #[serde(default)]
    pub bootstrap_room: Option<u64>,
    /// TRT-LLM disaggregated parameters.
    #[serde(default)]
    pub disaggregated_params: Option<TrtllmDisaggParams>,
    /// TRT-LLM chat generation leg: the prompt as the context server tokenized it.
    #[serde(default)]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// vLLM's `kv_transfer_params` as NixlConnector reads and writes them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct VllmKvParams {
    /// Set by the proxy on the prefill leg.
    #[serde(default)]
    pub do_remote_decode: bool,
    /// Set (by the prefill worker's answer) on the decode leg.
    #[serde(default)]
    pub do_remote_prefill: bool,
    /// The prefill worker's block ids, one list per KV cache group.
    #[serde(default)]
    pub remote_block_ids: Option<Vec<Vec<u32>>>,
    /// The prefill engine's id.
    #[serde(default)]
    pub remote_engine_id: Option<String>,
    /// The request id on the prefill worker (the key of its held KV).
    #[serde(default)]
    pub remote_request_id: Option<String>,
    /// The prefill worker's side-channel host.
    #[serde(default)]
    pub remote_host: Option<String>,
    /// The prefill worker's side-channel port.
    #[serde(default)]
    pub remote_port: Option<u16>,
    /// The prefill worker's tensor-parallel size.
    #[serde(default)]
    pub tp_size: Option<u32>,
    /// Tokens the prefill worker computed.
    #[serde(default)]
    pub remote_num_tokens: Option<usize>,
}

/// TRT-LLM's `disaggregated_params` (OpenAI layer).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct TrtllmDisaggParams {
    /// `context_only` or `generation_only`.
    pub request_type: String,
    /// The first token(s) the context server generated.
    #[serde(default)]
    pub first_gen_tokens: Option<Vec<u32>>,
    /// The context server's request id (the key of its held KV).
    #[serde(default)]
    pub ctx_request_id: Option<u64>,
    /// Opaque transceiver state; the sim's is base64 JSON `{"host", "port"}` of its side channel.
    #[serde(default)]
    pub encoded_opaque_state: Option<String>,
    /// Speculative draft tokens.
    #[serde(default)]
    pub draft_tokens: Option<Vec<u32>>,
    /// The orchestrator's id for the whole request.
    #[serde(default)]
    pub disagg_request_id: Option<u64>,
    /// Data-parallel rank of the context server.
    #[serde(default)]
    pub ctx_dp_rank: Option<u32>,
    /// Where the context server's info is served.
    #[serde(default)]
    pub ctx_info_endpoint: Option<String>,
    /// 0 context first, 1 generation first.
    #[serde(default)]
    pub schedule_style: Option<u32>,
}

/// The side channel address inside TRT-LLM's `encoded_opaque_state`.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct OpaqueState {
    /// Host of the context server's side channel.
    pub host: String,
    /// Its port.
    pub port: u16,
}

/// KV held on this (prefill) worker, ready to be pulled, by key.
#[derive(Default)]
pub struct HoldRegistry {
    ready: Mutex<HashMap<String, HoldInfo>>,
    changed: Notify,
}

impl HoldRegistry {
    /// Announces KV held under `key`.
    pub fn insert(&self, key: String, info: HoldInfo) {
        if let Ok(mut ready) = self.ready.lock() {
            ready.insert(key, info);
        }
        self.changed.notify_waiters();
    }

    /// Forgets `key` (its lease ran out).
    pub fn remove(&self, key: &str) {
        if let Ok(mut ready) = self.ready.lock() {
            ready.remove(key);
        }
    }

    /// Prefilled requests whose KV waits for a decode worker.
    pub fn len(&self) -> usize {
        self.ready.lock().map_or(0, |r| r.len())
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until `key` is held, then takes it.
    async fn take(&self, key: &str) -> HoldInfo {
        loop {
            let notified = self.changed.notified();
            if let Some(info) = self.ready.lock().ok().and_then(|mut r| r.remove(key)) {
                return info;
            }
            notified.await;
        }
    }
}

#[derive(Serialize, Deserialize)]
struct PullRequest {
    key: String,
}

#[derive(Serialize, Deserialize)]
struct PullReply {
    #[serde(default)]
    tokens: usize,
    #[serde(default)]
    first_token: Option<u32>,
    #[serde(default)]
    error: Option<String>,
}

/// Serves pulls of held KV on `listener`: each connection sends one `{"key"}` line and gets one
/// reply line once the KV is held (or after `wait`); the key is then handed to `release`.
pub async fn serve_transfers(
    listener: TcpListener,
    registry: std::sync::Arc<HoldRegistry>,
    release: mpsc::UnboundedSender<String>,
    wait: Duration,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "KV transfer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let release = release.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_pull(stream, &registry, &release, wait).await {
                tracing::debug!(%peer, error = %e, "KV pull failed");
            }
        });
    }
}

async fn serve_pull(
    stream: TcpStream,
    registry: &HoldRegistry,
    release: &mpsc::UnboundedSender<String>,
    wait: Duration,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).take(4096).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<PullRequest>(&line) {
        Ok(req) => match tokio::time::timeout(wait, registry.take(&req.key)).await {
            Ok(info) => {
                let _ = release.send(req.key);
                PullReply { tokens: info.tokens, first_token: info.first_token, error: None }
            }
            Err(_) => {
                PullReply { tokens: 0, first_token: None, error: Some(format!("no KV held for {}", req.key)) }
            }
        },
        Err(e) => PullReply { tokens: 0, first_token: None, error: Some(format!("bad pull request: {e}")) },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
}

/// Pulls the KV held under `key` from the prefill worker at `host:port`.
pub async fn pull(host: &str, port: u16, key: &str, wait: Duration) -> Result<HoldInfo, String> {
    let work = async {
        let mut stream =
            TcpStream::connect((host, port)).await.map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let mut req = serde_json::to_vec(&PullRequest { key: key.to_owned() }).map_err(|e| e.to_string())?;
        req.push(b'\n');
        stream.write_all(&req).await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(stream).take(4096).read_line(&mut line).await.map_err(|e| e.to_string())?;
        let reply: PullReply = serde_json::from_str(&line).map_err(|e| format!("bad pull reply: {e}"))?;
        match reply.error {
            Some(e) => Err(e),
            None => Ok(HoldInfo { tokens: reply.tokens, first_token: reply.first_token }),
        }
    };
    tokio::time::timeout(wait + Duration::from_secs(1), work)
        .await
        .map_err(|_| format!("pull from {host}:{port} timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn pull_waits_for_the_prefill_then_releases() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let registry = Arc::new(HoldRegistry::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let server = tokio::spawn(serve_transfers(listener, registry.clone(), tx, Duration::from_secs(5)));
        let puller =
            tokio::spawn(async move { pull("127.0.0.1", port, "room-7", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        registry.insert("room-7".into(), HoldInfo { tokens: 42, first_token: Some(9) });
        let info = puller.await.unwrap().unwrap();
        assert_eq!(info, HoldInfo { tokens: 42, first_token: Some(9) });
        assert_eq!(rx.recv().await.as_deref(), Some("room-7"));
        let missing = pull("127.0.0.1", port, "nope", Duration::from_millis(10)).await;
        assert!(missing.is_err());
        server.abort();
    }
}
