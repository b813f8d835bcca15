//! Test harness: starts sims in-process on free 127.0.0.1 ports, speaks HTTP/1.1 to them with a
//! tiny client, and subscribes to their KV events with a ZMQ SUB socket. Every sim is stopped by
//! the test that started it (`RunningSim::shutdown`, or its drop).

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rmpv::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use kvmesh_sim::prompt::{ModelTokenizer, PromptTokenizer, WordTokenizer, default_tokenizer_dir};
use kvmesh_sim::{RunningSim, SimArgs, SimConfig};

/// Generous bound on anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(20);

/// The built-in word tokenizer (fast to build).
pub fn words() -> Arc<dyn PromptTokenizer> {
    Arc::new(WordTokenizer::default())
}

/// Qwen3's real tokenizer, loaded once per test binary, if its files are on this machine.
pub fn qwen3() -> Option<Arc<dyn PromptTokenizer>> {
    static TOKENIZER: OnceLock<Option<Arc<ModelTokenizer>>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| default_tokenizer_dir().and_then(|dir| ModelTokenizer::load(&dir).ok()).map(Arc::new))
        .clone()
        .map(|t| t as Arc<dyn PromptTokenizer>)
}

/// Default test flags: free port, fast simulated time, small cache.
pub fn args() -> SimArgs {
    let mut a = SimArgs::defaults();
    a.port = 0;
    a.speedup = 1000.0;
    a.kv_blocks = 256;
    a.max_model_len = 4096;
    a
}

/// Starts a sim with `args` and the given tokenizer.
pub async fn start(args: SimArgs, tokenizer: Arc<dyn PromptTokenizer>) -> RunningSim {
    let mut config = SimConfig::new(args).expect("test flags are valid");
    config.tokenizer = Some(tokenizer);
    kvmesh_sim::start(config).await.expect("the sim starts")
}

/// An HTTP response: status and body.
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_owned)
            .collect()
    }
}

/// One HTTP/1.1 request with `Connection: close`; chunked bodies are decoded.
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    let work = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(WAIT, work).await.expect("HTTP request timed out");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a header block");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(rest) } else { rest.to_owned() };
    Reply { status, body }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// POST a JSON body.
pub async fn post(addr: std::net::SocketAddr, path: &str, body: &serde_json::Value) -> Reply {
    http(addr, "POST", path, Some(&body.to_string())).await
}

/// GET a path.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> Reply {
    http(addr, "GET", path, None).await
}

/// `tcp://127.0.0.1:port` for an endpoint the sim bound on `*`.
pub fn local(endpoint: &str) -> String {
    endpoint.replace("://*:", "://127.0.0.1:")
}

/// One decoded KV event.
#[derive(Clone, Debug, PartialEq)]
pub enum Ev {
    Stored { hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, block_size: u64, keys: Vec<String> },
    Removed(Vec<u64>),
    Cleared,
}

/// One received batch.
#[derive(Clone, Debug)]
pub struct Batch {
    pub topic: Vec<u8>,
    pub seq: u64,
    pub payload: Vec<u8>,
    pub events: Vec<Ev>,
}

fn field<'a>(event: &'a Value, key: &str) -> Option<&'a Value> {
    event.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

fn int(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| v.as_i64().expect("an integer") as u64)
}

/// Decodes a `KVEventBatch` payload (map-form events).
pub fn decode(payload: &[u8]) -> Vec<Ev> {
    let v = rmpv::decode::read_value(&mut &payload[..]).expect("msgpack");
    let items = v.as_array().expect("a batch array");
    assert!(items[0].is_f64(), "ts is a float64");
    items[1]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| match field(e, "type").and_then(Value::as_str) {
            Some("BlockStored") => Ev::Stored {
                hashes: field(e, "block_hashes")
                    .and_then(Value::as_array)
                    .expect("hashes")
                    .iter()
                    .map(int)
                    .collect(),
                parent: field(e, "parent_block_hash").filter(|p| !p.is_nil()).map(int),
                tokens: field(e, "token_ids")
                    .and_then(Value::as_array)
                    .expect("tokens")
                    .iter()
                    .map(|t| int(t) as u32)
                    .collect(),
                block_size: field(e, "block_size").map(int).expect("block_size"),
                keys: e
                    .as_map()
                    .expect("a map")
                    .iter()
                    .filter_map(|(k, _)| k.as_str().map(str::to_owned))
                    .collect(),
            },
            Some("BlockRemoved") => Ev::Removed(
                field(e, "block_hashes").and_then(Value::as_array).expect("hashes").iter().map(int).collect(),
            ),
            Some("AllBlocksCleared") => Ev::Cleared,
            other => panic!("unknown event type {other:?}"),
        })
        .collect()
}

/// A ZMQ subscriber to a sim's live events.
pub struct Sub(SubSocket);

impl Sub {
    /// Connects and subscribes to everything.
    pub async fn connect(endpoint: &str) -> Sub {
        let mut s = SubSocket::new();
        s.connect(&local(endpoint)).await.expect("SUB connects");
        s.subscribe("").await.expect("subscribe");
        // A subscription reaches the publisher asynchronously; give it a moment before traffic.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Sub(s)
    }

    /// The next batch, or None after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Batch> {
        let msg = tokio::time::timeout(wait, self.0.recv()).await.ok()?.ok()?;
        let frames = msg.into_vec();
        assert_eq!(frames.len(), 3, "topic, seq, payload");
        let seq = u64::from_be_bytes(frames[1].as_ref().try_into().expect("an 8-byte seq"));
        Some(Batch {
            topic: frames[0].to_vec(),
            seq,
            payload: frames[2].to_vec(),
            events: decode(&frames[2]),
        })
    }

    /// Every batch that arrives until the stream is quiet for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Batch> {
        let mut out = Vec::new();
        while let Some(b) = self.next(quiet).await {
            out.push(b);
        }
        out
    }
}

/// Asks a replay ROUTER for every batch from `start`, returning `(seq, payload)` up to (and
/// including) the END marker, whose seq is `u64::MAX`.
pub async fn replay(endpoint: &str, start: u64) -> Vec<(Vec<u8>, u64, Vec<u8>)> {
    let mut d = DealerSocket::new();
    d.connect(&local(endpoint)).await.expect("DEALER connects");
    let req = ZmqMessage::try_from(vec![Bytes::new(), Bytes::copy_from_slice(&start.to_be_bytes())])
        .expect("frames");
    d.send(req).await.expect("send replay request");
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(WAIT, d.recv()).await.expect("replay reply in time").expect("recv");
        let f = msg.into_vec();
        assert_eq!(f.len(), 4, "delimiter, topic, seq, payload");
        assert!(f[0].is_empty(), "empty delimiter");
        let seq = u64::from_be_bytes(f[2].as_ref().try_into().expect("an 8-byte seq"));
        out.push((f[1].to_vec(), seq, f[3].to_vec()));
        if seq == u64::MAX {
            return out;
        }
    }
}

/// Polls `cond` until it holds (or `WAIT` passes).
pub async fn eventually<F, Fut>(mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The value of a Prometheus sample line starting with `prefix` (name and labels).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
