//! The KV event publisher of vLLM's `ZmqEventPublisher` (SGLang's is identical on the wire).
//!
//! - Live stream: a PUB socket sends `[topic, seq (8-byte big-endian), payload]` per batch, `seq`
//!   counting from 0 without gaps. The PUB socket binds when its endpoint has `*` or `::` (or is
//!   `ipc://`/`inproc://`), else it connects (the subscriber binds).
//! - Replay: a ROUTER socket (always bound) answers `[identity, "", start_seq]` with every buffered
//!   batch whose seq is at least `start_seq`, as `[identity, "", topic, seq, payload]`, then the end
//!   marker `[identity, "", "", 0xFFFFFFFFFFFFFFFF, ""]`. Requests of another shape are ignored.
//! - The last `buffer_steps` batches are kept for replay.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// The replay end marker's sequence number (-1 as a signed 64-bit integer).
pub const END_SEQ: u64 = u64::MAX;

/// Where the publisher's sockets are, with ports resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZmqEndpoints {
    /// The PUB endpoint as configured, its port resolved when it bound port 0.
    pub endpoint: String,
    /// The replay endpoint, likewise; `None` when replay is off.
    pub replay_endpoint: Option<String>,
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// A socket could not bind or connect.
    #[error("KV events socket {endpoint}: {reason}")]
    Socket {
        /// The endpoint.
        endpoint: String,
        /// What ZeroMQ said.
        reason: String,
    },
}

/// Sends batches to the publisher task; dropping it stops the task.
#[derive(Clone, Debug)]
pub struct PublisherHandle {
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl PublisherHandle {
    /// Publishes one encoded batch (the next sequence number is assigned by the publisher).
    pub fn publish(&self, payload: Vec<u8>) {
        // The task only ends when the worker shuts down; a batch published then has no subscriber.
        let _ = self.tx.send(payload);
    }
}

/// Whether vLLM's publisher binds this endpoint (`ZmqEventPublisher._is_bind_endpoint`).
pub fn binds(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
}

/// The address to hand the socket library: `*` (any interface) as `0.0.0.0`.
fn bind_address(endpoint: &str) -> String {
    endpoint.replacen("://*:", "://0.0.0.0:", 1)
}

/// `endpoint` with its port replaced by `port` (the port a bind to 0 got).
fn with_port(endpoint: &str, port: u16) -> String {
    match endpoint.rfind(':') {
        Some(i) => format!("{}:{port}", &endpoint[..i]),
        None => endpoint.to_owned(),
    }
}

fn port_of(endpoint: &zeromq::Endpoint) -> Option<u16> {
    match endpoint {
        zeromq::Endpoint::Tcp(_, port) => Some(*port),
        _ => None,
    }
}

/// Starts the publisher: binds or connects its sockets, then serves until `shutdown` fires or the
/// last handle is dropped.
pub async fn start(
    endpoint: &str,
    replay_endpoint: Option<&str>,
    topic: &str,
    buffer_steps: usize,
    shutdown: oneshot::Receiver<()>,
) -> Result<(PublisherHandle, ZmqEndpoints), PublisherError> {
    let err = |endpoint: &str, e: zeromq::ZmqError| PublisherError::Socket {
        endpoint: endpoint.to_owned(),
        reason: e.to_string(),
    };
    let mut publisher = PubSocket::new();
    let resolved = if binds(endpoint) {
        let bound = publisher.bind(&bind_address(endpoint)).await.map_err(|e| err(endpoint, e))?;
        port_of(&bound).map_or_else(|| endpoint.to_owned(), |p| with_port(endpoint, p))
    } else {
        publisher.connect(endpoint).await.map_err(|e| err(endpoint, e))?;
        endpoint.to_owned()
    };
    let (router, replay_resolved) = match replay_endpoint {
        Some(ep) => {
            let mut router = RouterSocket::new();
            let bound = router.bind(&bind_address(ep)).await.map_err(|e| err(ep, e))?;
            let resolved = port_of(&bound).map_or_else(|| ep.to_owned(), |p| with_port(ep, p));
            (Some(router), Some(resolved))
        }
        None => (None, None),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let task = PublisherTask {
        publisher,
        router,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        buffer: VecDeque::new(),
        buffer_steps: buffer_steps.max(1),
        next_seq: 0,
    };
    tokio::spawn(task.run(rx, shutdown));
    Ok((PublisherHandle { tx }, ZmqEndpoints { endpoint: resolved, replay_endpoint: replay_resolved }))
}

struct PublisherTask {
    publisher: PubSocket,
    router: Option<RouterSocket>,
    topic: Bytes,
    buffer: VecDeque<(u64, Bytes)>,
    buffer_steps: usize,
    next_seq: u64,
}

impl PublisherTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Vec<u8>>, mut shutdown: oneshot::Receiver<()>) {
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                payload = rx.recv() => match payload {
                    Some(payload) => self.publish(payload).await,
                    None => break,
                },
                request = recv_opt(&mut self.router) => match request {
                    Some(Ok(message)) => self.replay(message).await,
                    Some(Err(e)) => tracing::debug!(error = %e, "replay socket receive failed"),
                    None => {}
                },
            }
        }
        if let Some(router) = self.router.take() {
            router.close().await;
        }
        self.publisher.close().await;
    }

    async fn publish(&mut self, payload: Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let payload = Bytes::from(payload);
        if self.buffer.len() == self.buffer_steps {
            self.buffer.pop_front();
        }
        self.buffer.push_back((seq, payload.clone()));
        let frames = vec![self.topic.clone(), Bytes::copy_from_slice(&seq.to_be_bytes()), payload];
        match ZmqMessage::try_from(frames) {
            Ok(message) => {
                if let Err(e) = self.publisher.send(message).await {
                    tracing::debug!(error = %e, seq, "KV event batch not sent");
                }
            }
            Err(e) => tracing::debug!(error = %e, "KV event message not built"),
        }
    }

    /// Answers one replay request `[identity, "", start_seq]`.
    async fn replay(&mut self, message: ZmqMessage) {
        let frames = message.into_vec();
        let [identity, delimiter, start] = frames.as_slice() else {
            tracing::warn!(frames = frames.len(), "replay request of unexpected shape ignored");
            return;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else {
            tracing::warn!("replay request without an 8-byte sequence number ignored");
            return;
        };
        if !delimiter.is_empty() {
            tracing::warn!("replay request without an empty delimiter frame ignored");
            return;
        }
        let start = u64::from_be_bytes(start);
        let Some(router) = self.router.as_mut() else { return };
        let replies: Vec<Vec<Bytes>> = self
            .buffer
            .iter()
            .filter(|(seq, _)| *seq >= start)
            .map(|(seq, payload)| {
                vec![
                    identity.clone(),
                    Bytes::new(),
                    self.topic.clone(),
                    Bytes::copy_from_slice(&seq.to_be_bytes()),
                    payload.clone(),
                ]
            })
            .chain(std::iter::once(vec![
                identity.clone(),
                Bytes::new(),
                Bytes::new(),
                Bytes::copy_from_slice(&END_SEQ.to_be_bytes()),
                Bytes::new(),
            ]))
            .collect();
        for frames in replies {
            let Ok(message) = ZmqMessage::try_from(frames) else { continue };
            if let Err(e) = router.send(message).await {
                tracing::debug!(error = %e, "replay reply not sent");
                return;
            }
        }
    }
}

/// Receives from the replay socket, or never resolves when replay is off.
async fn recv_opt(router: &mut Option<RouterSocket>) -> Option<zeromq::ZmqResult<ZmqMessage>> {
    match router {
        Some(r) => Some(r.recv().await),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_or_connect_follows_vllm() {
        assert!(binds("tcp://*:5557"));
        assert!(binds("tcp://[::]:5557"));
        assert!(binds("ipc:///tmp/kv"));
        assert!(!binds("tcp://127.0.0.1:5557"));
        assert_eq!(bind_address("tcp://*:0"), "tcp://0.0.0.0:0");
        assert_eq!(with_port("tcp://*:0", 41234), "tcp://*:41234");
    }
}
