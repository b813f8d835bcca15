//! Shared by the agent's integration tests: the captured engine fixtures, the block set they imply in
//! kvmesh hashes (computed independently of the agent, from whole token prefixes), and a fake engine
//! (XPUB + replay ROUTER) that serves fixture frames over real ZMQ sockets.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kvmesh_agent::events::EngineHash;
use kvmesh_core::hash::cache_salt_part;
use kvmesh_core::hash::{BlockHash, BlockSalt, hash_prompt};
use serde_json::Value;
use zeromq::{Endpoint, RouterSocket, Socket, SocketRecv, SocketSend, XPubSocket, ZmqMessage};

/// Generous bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(30);

/// A captured fixture (`tests/fixtures/engines/NAME.json`).
pub struct Fixture {
    /// The file's JSON.
    pub json: Value,
}

impl Fixture {
    /// Loads a fixture by file stem.
    pub fn load(name: &str) -> Fixture {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/engines")
            .join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Fixture { json: serde_json::from_str(&text).expect("fixture is JSON") }
    }

    /// Live messages: frames and the decoded batch.
    pub fn live(&self) -> Vec<LiveFrame> {
        self.json["live"]
            .as_array()
            .expect("live is a list")
            .iter()
            .map(|l| LiveFrame {
                frames: frames(&l["frames_hex"]),
                decoded: l["decoded"].clone(),
                index_after: l.get("index_after").filter(|v| !v.is_null()).map(multiset),
            })
            .collect()
    }

    /// Replay replies as recorded (delimiter stripped), END marker last.
    pub fn replay_replies(&self) -> Vec<Vec<Bytes>> {
        self.json["replay"]["replies"]
            .as_array()
            .expect("replies")
            .iter()
            .map(|r| frames(&r["frames_hex"]))
            .collect()
    }

    /// The replay request the fixture's DEALER sent (the start sequence, 8 bytes).
    pub fn replay_request(&self) -> Bytes {
        Bytes::from(unhex(self.json["replay"]["request_hex"].as_str().expect("request_hex")))
    }

    /// The engine's cached blocks after the last batch, copies counted.
    pub fn final_index(&self) -> HashMap<EngineHash, u32> {
        multiset(&self.json["final_index"])
    }

    /// The kvmesh name of every GPU full-attention block the fixture's stores name, from the whole
    /// token prefix of its chain (`hash_prompt`): what the filter computes for the same prompt.
    pub fn expected_kvmesh(&self) -> HashMap<EngineHash, BlockHash> {
        let mut prefix: HashMap<EngineHash, (Vec<u32>, BlockSalt)> = HashMap::new();
        let mut out = HashMap::new();
        for live in self.live() {
            for event in live.decoded[1].as_array().expect("events") {
                let Some(stored) = StoredView::of(event) else { continue };
                let (mut tokens, salt) = match stored.parent {
                    None => {
                        let mut salt = BlockSalt::lora(stored.lora_name.as_deref());
                        if let Some(s) = &stored.cache_salt {
                            salt = salt.with(cache_salt_part(s));
                        }
                        (Vec::new(), salt)
                    }
                    Some(p) => prefix.get(&p).cloned().expect("fixtures store parents first"),
                };
                for (i, block) in stored.blocks.iter().enumerate() {
                    tokens.extend_from_slice(
                        &stored.tokens[i * stored.block_size..(i + 1) * stored.block_size],
                    );
                    let mut hashes = Vec::new();
                    hash_prompt(&tokens, stored.block_size, salt, &mut hashes);
                    out.insert(*block, *hashes.last().expect("at least one block"));
                    prefix.insert(*block, (tokens.clone(), salt));
                }
            }
        }
        out
    }
}

/// One live message of a fixture.
pub struct LiveFrame {
    /// `[topic, seq, payload]`.
    pub frames: Vec<Bytes>,
    /// The batch as Python decoded it.
    pub decoded: Value,
    /// The engine's block multiset after this batch, when recorded.
    pub index_after: Option<HashMap<EngineHash, u32>>,
}

impl LiveFrame {
    /// The sequence number.
    pub fn seq(&self) -> u64 {
        u64::from_be_bytes(self.frames[1][..].try_into().expect("8-byte seq"))
    }
}

/// A `BlockStored` of a decoded fixture batch, map or array form.
pub struct StoredView {
    pub blocks: Vec<EngineHash>,
    pub parent: Option<EngineHash>,
    pub tokens: Vec<u32>,
    pub block_size: usize,
    pub lora_name: Option<String>,
    pub cache_salt: Option<String>,
}

impl StoredView {
    /// The store, if `event` is one (and about GPU memory).
    pub fn of(event: &Value) -> Option<StoredView> {
        let get = |key: &str, pos: usize| -> Value {
            match event {
                Value::Object(m) => m.get(key).cloned().unwrap_or(Value::Null),
                Value::Array(a) => a.get(pos).cloned().unwrap_or(Value::Null),
                _ => Value::Null,
            }
        };
        let tag = match event {
            Value::Object(m) => m.get("type")?.as_str()?.to_owned(),
            Value::Array(a) => a.first()?.as_str()?.to_owned(),
            _ => return None,
        };
        if tag != "BlockStored" || get("medium", 6).as_str().is_some_and(|m| m != "GPU") {
            return None;
        }
        let extra = get("extra_keys", 8);
        let lora_name = get("lora_name", 7).as_str().map(str::to_owned);
        // vLLM: a string in the first block's extra keys that is not the LoRA name is the cache salt.
        let salt_from_extra = extra.get(0).and_then(Value::as_array).and_then(|keys| {
            keys.iter()
                .filter_map(Value::as_str)
                .find(|s| Some(*s) != lora_name.as_deref())
                .map(str::to_owned)
        });
        let parent = match get("parent_block_hash", 2) {
            Value::Null => None,
            v => Some(engine_hash(&v)),
        };
        Some(StoredView {
            blocks: get("block_hashes", 1).as_array()?.iter().map(engine_hash).collect(),
            parent,
            tokens: get("token_ids", 3)
                .as_array()?
                .iter()
                .map(|t| t.as_u64().expect("token") as u32)
                .collect(),
            block_size: get("block_size", 4).as_u64()? as usize,
            lora_name,
            cache_salt: get("cache_salt", usize::MAX).as_str().map(str::to_owned).or(if parent.is_none() {
                salt_from_extra
            } else {
                None
            }),
        })
    }
}

/// A fixture hash: int (signed or not) or `{"$hex": digest}`.
pub fn engine_hash(v: &Value) -> EngineHash {
    if let Some(n) = v.as_u64() {
        EngineHash(n)
    } else if let Some(n) = v.as_i64() {
        EngineHash::from_i64(n)
    } else {
        EngineHash::from_digest(&unhex(v["$hex"].as_str().expect("hash is an int or {$hex}")))
    }
}

/// A recorded block multiset.
pub fn multiset(v: &Value) -> HashMap<EngineHash, u32> {
    let mut out = HashMap::new();
    for h in v.as_array().expect("multiset is a list") {
        *out.entry(engine_hash(h)).or_insert(0) += 1;
    }
    out
}

pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
}

fn frames(v: &Value) -> Vec<Bytes> {
    v.as_array().expect("frames").iter().map(|f| Bytes::from(unhex(f.as_str().expect("hex frame")))).collect()
}

/// A live message `[topic, seq, payload]`.
pub fn live_message(topic: &str, seq: u64, payload: &[u8]) -> Vec<Bytes> {
    vec![
        Bytes::copy_from_slice(topic.as_bytes()),
        Bytes::copy_from_slice(&seq.to_be_bytes()),
        Bytes::copy_from_slice(payload),
    ]
}

/// The fake engine's replay buffer: sequence number and frames of each batch published.
type Buffer = Arc<Mutex<Vec<(u64, Vec<Bytes>)>>>;

/// What the fake engine's ROUTER answers a replay request with.
#[derive(Clone)]
pub enum ReplayMode {
    /// Every buffered message from the requested sequence on, then the END marker (vLLM >= 0.26).
    Buffer,
    /// Exactly these replies (delimiter stripped), whatever was asked.
    Verbatim(Vec<Vec<Bytes>>),
}

/// An engine's publisher side: an XPUB socket (a PUB whose subscriptions the test can wait for) and
/// a replay ROUTER serving what was "published", including messages the live socket never sent.
pub struct FakeEngine {
    xpub: XPubSocket,
    /// `tcp://127.0.0.1:PORT` of the live socket.
    pub events: String,
    /// `tcp://127.0.0.1:PORT` of the replay socket.
    pub replay: String,
    buffer: Buffer,
    /// Replay requests received (start sequence numbers).
    pub requests: Arc<Mutex<Vec<u64>>>,
    mode: Arc<Mutex<ReplayMode>>,
    router: tokio::task::JoinHandle<()>,
}

impl FakeEngine {
    /// Binds both sockets on 127.0.0.1 ephemeral ports.
    pub async fn start() -> FakeEngine {
        let mut xpub = XPubSocket::new();
        let events = endpoint_string(xpub.bind("tcp://127.0.0.1:0").await.expect("bind XPUB"));
        let mut router = RouterSocket::new();
        let replay = endpoint_string(router.bind("tcp://127.0.0.1:0").await.expect("bind ROUTER"));
        let buffer: Buffer = Arc::default();
        let requests: Arc<Mutex<Vec<u64>>> = Arc::default();
        let mode = Arc::new(Mutex::new(ReplayMode::Buffer));
        let router =
            tokio::spawn(serve_replay(router, Arc::clone(&buffer), Arc::clone(&requests), Arc::clone(&mode)));
        FakeEngine { xpub, events, replay, buffer, requests, mode, router }
    }

    /// Waits until a subscriber subscribed (so nothing published from now on is lost).
    pub async fn wait_subscriber(&mut self) {
        let message = tokio::time::timeout(WAIT, self.xpub.recv())
            .await
            .expect("a subscriber within WAIT")
            .expect("recv");
        assert_eq!(message.get(0).and_then(|f| f.first()), Some(&1u8), "first message is a subscription");
    }

    /// Publishes batch `seq` (topic `kv-events`) live and keeps it for replay.
    pub async fn publish(&mut self, seq: u64, payload: &[u8]) {
        let frames = live_message("kv-events", seq, payload);
        self.buffer.lock().expect("buffer").push((seq, frames.clone()));
        self.xpub.send(ZmqMessage::try_from(frames).expect("non-empty")).await.expect("send");
    }

    /// Keeps batch `seq` for replay without sending it live (a message the PUB socket dropped).
    pub fn publish_lost(&mut self, seq: u64, payload: &[u8]) {
        self.buffer.lock().expect("buffer").push((seq, live_message("kv-events", seq, payload)));
    }

    /// Sends a message live only (not replayable: malformed frames).
    pub async fn send_raw(&mut self, frames: Vec<Bytes>) {
        self.xpub.send(ZmqMessage::try_from(frames).expect("non-empty")).await.expect("send");
    }

    /// Forgets the replay buffer (an engine restart).
    pub fn clear_buffer(&mut self) {
        self.buffer.lock().expect("buffer").clear();
    }

    /// Changes what replays answer.
    pub fn set_mode(&self, mode: ReplayMode) {
        *self.mode.lock().expect("mode") = mode;
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.router.abort();
    }
}

async fn serve_replay(
    mut router: RouterSocket,
    buffer: Buffer,
    requests: Arc<Mutex<Vec<u64>>>,
    mode: Arc<Mutex<ReplayMode>>,
) {
    while let Ok(request) = router.recv().await {
        let frames = request.into_vec();
        // vLLM's ROUTER accepts exactly [identity, b"", start seq]; anything else is ignored.
        let [identity, delimiter, start] = &frames[..] else { continue };
        let Ok(start) = <[u8; 8]>::try_from(&start[..]) else { continue };
        if !delimiter.is_empty() {
            continue;
        }
        let start = u64::from_be_bytes(start);
        requests.lock().expect("requests").push(start);
        let replies: Vec<Vec<Bytes>> = match mode.lock().expect("mode").clone() {
            ReplayMode::Buffer => {
                let mut replies: Vec<Vec<Bytes>> = buffer
                    .lock()
                    .expect("buffer")
                    .iter()
                    .filter(|(seq, _)| *seq >= start)
                    .map(|(_, frames)| frames.clone())
                    .collect();
                replies.push(vec![
                    Bytes::new(),
                    Bytes::copy_from_slice(&u64::MAX.to_be_bytes()),
                    Bytes::new(),
                ]);
                replies
            }
            ReplayMode::Verbatim(replies) => replies,
        };
        for reply in replies {
            let mut message = vec![identity.clone(), Bytes::new()];
            message.extend(reply);
            if router.send(ZmqMessage::try_from(message).expect("non-empty")).await.is_err() {
                break;
            }
        }
    }
}

fn endpoint_string(endpoint: Endpoint) -> String {
    match endpoint {
        Endpoint::Tcp(host, port) => format!("tcp://{host}:{port}"),
        other => panic!("unexpected endpoint {other:?}"),
    }
}
