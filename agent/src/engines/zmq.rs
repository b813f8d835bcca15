//! vLLM's and SGLang's KV events over ZeroMQ: a SUB socket per data-parallel rank, replay through a
//! DEALER on gaps, and the decisions that keep the agent's view equal to the engine's cache.
//!
//! Recovery, per rank (see `sequence.rs` for the classification):
//! - gap: replay from the last batch applied (not the one after): its payload, compared with what was
//!   applied, proves that the engine did not restart meanwhile; then apply what is missing;
//! - replay unavailable, failed, or the engine's buffer no longer reaches back: reset the rank (the
//!   control plane drops its blocks) and rebuild from the batches that follow;
//! - sequence went back, or the replayed history differs: engine restart, reset and replay from 0;
//! - the SUB socket reconnected (the engine may have restarted without a visible sequence jump): the
//!   next live batch is verified the same way.
//!
//! The pure parts (framing, msgpack) live in `frames.rs` and `msgpack.rs`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};
use xxhash_rust::xxh3::xxh3_64;
use zeromq::{
    DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage,
};

use super::frames::{LiveMessage, ReplayReply, parse_live, parse_replay_reply, replay_request};
use super::msgpack::decode_batch;
use super::{ResetReason, SourceMsg};
use crate::sequence::{Live, Replayed, SeqTracker};
use crate::telemetry::{AgentMetrics, RankLabel};

/// Where one rank's publisher is and how to reach it.
#[derive(Clone, Debug)]
pub struct ZmqEndpoint {
    /// Data-parallel rank (index among this worker's publishers).
    pub rank: u32,
    /// `tcp://HOST:PORT` of the engine's PUB socket, or of our SUB socket when `bind`.
    pub events: String,
    /// Bind the SUB socket (the engine's publisher connects to us) instead of connecting.
    pub bind: bool,
    /// `tcp://HOST:PORT` of the engine's replay ROUTER socket, if it has one.
    pub replay: Option<String>,
    /// Topic prefix to subscribe to (`""`: everything).
    pub topic: String,
    /// How long to wait for the replay socket and for each of its replies.
    pub replay_timeout: Duration,
}

/// The receiver went away: the agent is stopping.
struct Closed;

/// Why a replay did not finish.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("zmq: {0}")]
    Zmq(#[from] zeromq::ZmqError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("empty replay request")]
    EmptyRequest,
}

/// How a replay pass ended.
enum PassEnd {
    /// Every missing batch was applied.
    Complete,
    /// The engine's buffer did not reach back far enough; the rank was reset.
    Incomplete,
    /// The batch the agent applied last differs from the engine's: it restarted.
    Restarted,
}

/// Receives one rank's KV events until the agent stops (the receiver of `tx` is dropped).
pub async fn run(endpoint: ZmqEndpoint, tx: mpsc::Sender<SourceMsg>, metrics: Arc<AgentMetrics>) {
    let mut stream = RankStream {
        endpoint,
        tx,
        metrics,
        tracker: SeqTracker::new(),
        last_fingerprint: 0,
        dirty: false,
        verify_next: false,
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let (mut sub, mut monitor) = match open_sub(&stream.endpoint).await {
            Ok(opened) => opened,
            Err(e) => {
                warn!(rank = stream.endpoint.rank, endpoint = %stream.endpoint.events, error = %e,
                    "cannot open the KV-event socket; retrying");
                if stream.tx.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        info!(rank = stream.endpoint.rank, endpoint = %stream.endpoint.events, bind = stream.endpoint.bind,
            "listening for KV events");
        let mut connections = 0u32;
        let mut monitor_open = true;
        loop {
            tokio::select! {
                // Connection events first: a reconnection must be noted before the batch it brings.
                biased;
                () = stream.tx.closed() => return,
                event = monitor.next(), if monitor_open => match event {
                    Some(SocketEvent::Connected(..) | SocketEvent::Accepted(..)) => {
                        connections += 1;
                        if connections > 1 {
                            info!(rank = stream.endpoint.rank, "KV-event publisher reconnected; verifying its history");
                            stream.verify_next = true;
                        }
                    }
                    Some(_) => {}
                    None => monitor_open = false,
                },
                received = sub.recv() => match received {
                    Ok(message) => {
                        if stream.on_frames(message.into_vec()).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // A peer went away; the socket reconnects (connect) or accepts (bind) by itself.
                        debug!(rank = stream.endpoint.rank, error = %e, "KV-event receive failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }
}

/// A SUB socket subscribed to the topic, bound or connected, with its monitor.
async fn open_sub(
    endpoint: &ZmqEndpoint,
) -> Result<(SubSocket, impl tokio_stream::Stream<Item = SocketEvent> + Unpin + use<>), zeromq::ZmqError> {
    let mut sub = SubSocket::new();
    let monitor = sub.monitor();
    sub.subscribe(&endpoint.topic).await?;
    if endpoint.bind {
        sub.bind(&bindable(&endpoint.events)).await?;
    } else {
        sub.connect(&endpoint.events).await?;
    }
    Ok((sub, monitor))
}

/// `tcp://*:PORT` as the zeromq crate can bind it (it resolves the host name literally).
pub fn bindable(endpoint: &str) -> String {
    endpoint.replacen("tcp://*:", "tcp://0.0.0.0:", 1)
}

/// One rank's stream state.
struct RankStream {
    endpoint: ZmqEndpoint,
    tx: mpsc::Sender<SourceMsg>,
    metrics: Arc<AgentMetrics>,
    tracker: SeqTracker,
    /// xxh3 of the payload of the last batch applied: what a replay's first reply must match.
    last_fingerprint: u64,
    /// Batches were applied since the last reset (a reset of nothing publishes nothing).
    dirty: bool,
    /// The publisher reconnected: verify the next live batch's history through a replay.
    verify_next: bool,
}

impl RankStream {
    async fn on_frames(&mut self, frames: Vec<Bytes>) -> Result<(), Closed> {
        match parse_live(&frames) {
            Ok(message) => self.on_live(message).await,
            Err(e) => {
                self.metrics.malformed("frame");
                debug!(rank = self.endpoint.rank, error = %e, "malformed KV-event message skipped");
                Ok(())
            }
        }
    }

    async fn on_live(&mut self, message: LiveMessage) -> Result<(), Closed> {
        let verify = std::mem::take(&mut self.verify_next) && self.endpoint.replay.is_some();
        match self.tracker.live(message.seq) {
            Live::Next if !verify || self.tracker.last().is_none() => {
                self.apply(message.seq, &message.payload).await
            }
            Live::Next => {
                self.recover(message.seq).await?;
                self.after_recovery(message).await
            }
            Live::Duplicate => {
                self.metrics.duplicate_batches.inc();
                Ok(())
            }
            Live::Restart => {
                self.metrics.engine_restarts.inc();
                warn!(rank = self.endpoint.rank, seq = message.seq, last = ?self.tracker.last(),
                    "KV-event sequence went back: the engine restarted");
                self.reset(ResetReason::EngineRestart).await?;
                if message.seq == 0 {
                    return self.apply(message.seq, &message.payload).await;
                }
                self.recover(message.seq).await?;
                self.after_recovery(message).await
            }
            Live::Gap { from } => {
                match self.tracker.last() {
                    Some(_) => {
                        self.metrics.gaps.inc();
                        warn!(rank = self.endpoint.rank, from, to = message.seq, "KV-event sequence gap");
                    }
                    None => info!(
                        rank = self.endpoint.rank,
                        seq = message.seq,
                        "engine published batches before the agent listened; asking for its history"
                    ),
                }
                self.recover(message.seq).await?;
                self.after_recovery(message).await
            }
        }
    }

    /// Handles the live message that started a recovery, once the recovery is over.
    async fn after_recovery(&mut self, message: LiveMessage) -> Result<(), Closed> {
        match self.tracker.live(message.seq) {
            Live::Next => self.apply(message.seq, &message.payload).await,
            Live::Duplicate => Ok(()),
            Live::Gap { .. } | Live::Restart => {
                // Nothing filled the gap: what the agent holds may be stale. Start over from here.
                self.reset(ResetReason::LostEvents).await?;
                self.apply(message.seq, &message.payload).await
            }
        }
    }

    /// Replays what is missing before live message `trigger`, when the engine has a replay socket.
    async fn recover(&mut self, trigger: u64) -> Result<(), Closed> {
        let Some(replay) = self.endpoint.replay.clone() else {
            return Ok(());
        };
        let from = self.tracker.last().unwrap_or(0);
        let verify = self.tracker.last().map(|last| (last, self.last_fingerprint));
        let mut result = self.replay_pass(&replay, from, verify).await;
        if matches!(result, Ok(PassEnd::Restarted)) {
            self.metrics.engine_restarts.inc();
            warn!(
                rank = self.endpoint.rank,
                "replayed history differs from what was applied: the engine restarted"
            );
            self.reset(ResetReason::EngineRestart).await?;
            result = self.replay_pass(&replay, 0, None).await;
        }
        let outcome = match result {
            Ok(PassEnd::Complete) => "complete",
            Ok(PassEnd::Incomplete) => "incomplete",
            Ok(PassEnd::Restarted) => "failed",
            Err(Some(e)) => {
                warn!(rank = self.endpoint.rank, replay = %replay, error = %e, "KV-event replay failed");
                "failed"
            }
            Err(None) => return Err(Closed),
        };
        AgentMetrics::count(&self.metrics.replays, outcome);
        self.tracker.replay_done(trigger);
        Ok(())
    }

    /// Asks the replay socket for batches from `from` on and applies what is missing. `verify`: the
    /// last batch applied and its fingerprint, which the first reply must repeat.
    /// `Err(None)`: the agent is stopping.
    async fn replay_pass(
        &mut self,
        replay: &str,
        from: u64,
        mut verify: Option<(u64, u64)>,
    ) -> Result<PassEnd, Option<ReplayError>> {
        let timeout = self.endpoint.replay_timeout;
        let mut options = SocketOptions::default();
        options.connect_timeout(timeout);
        let mut dealer = DealerSocket::with_options(options);
        within(timeout, dealer.connect(replay)).await?;
        let request =
            ZmqMessage::try_from(replay_request(from)).map_err(|_| Some(ReplayError::EmptyRequest))?;
        within(timeout, dealer.send(request)).await?;
        let mut incomplete = false;
        loop {
            let frames = within(timeout, dealer.recv()).await?.into_vec();
            let batch = match parse_replay_reply(&frames) {
                Ok(ReplayReply::End) => break,
                Ok(ReplayReply::Batch(batch)) => batch,
                Err(e) => {
                    self.metrics.malformed("replay_reply");
                    debug!(rank = self.endpoint.rank, error = %e, "malformed replay reply skipped");
                    continue;
                }
            };
            if let Some((seq, fingerprint)) = verify.take()
                && batch.seq == seq
            {
                if xxh3_64(&batch.payload) == fingerprint {
                    continue;
                }
                return Ok(PassEnd::Restarted);
            }
            match self.tracker.replayed(batch.seq, from) {
                Replayed::Duplicate => {}
                Replayed::Next => self.apply(batch.seq, &batch.payload).await.map_err(|Closed| None)?,
                Replayed::Hole => {
                    incomplete = true;
                    warn!(
                        rank = self.endpoint.rank,
                        wanted = from,
                        first = batch.seq,
                        "engine's replay buffer does not reach back; rebuilding from here"
                    );
                    self.reset(ResetReason::LostEvents).await.map_err(|Closed| None)?;
                    self.apply(batch.seq, &batch.payload).await.map_err(|Closed| None)?;
                }
            }
        }
        Ok(if incomplete { PassEnd::Incomplete } else { PassEnd::Complete })
    }

    /// Decodes and forwards batch `seq`. A payload that cannot be decoded is counted and consumed:
    /// the stream goes on with the next batch.
    async fn apply(&mut self, seq: u64, payload: &[u8]) -> Result<(), Closed> {
        self.tracker.applied(seq);
        self.last_fingerprint = xxh3_64(payload);
        match decode_batch(payload) {
            Ok((batch, skipped)) => {
                self.metrics.decoder_skipped(skipped);
                self.metrics.engine_batches.get_or_create(&RankLabel { rank: self.endpoint.rank }).inc();
                self.dirty = true;
                self.tx.send(SourceMsg::Batch { rank: self.endpoint.rank, batch }).await.map_err(|_| Closed)
            }
            Err(e) => {
                self.metrics.malformed("payload");
                warn!(rank = self.endpoint.rank, seq, error = %e, "malformed KV-event batch skipped");
                Ok(())
            }
        }
    }

    /// Drops the rank's blocks and sequence state.
    async fn reset(&mut self, reason: ResetReason) -> Result<(), Closed> {
        self.tracker.reset();
        if !std::mem::take(&mut self.dirty) {
            return Ok(());
        }
        AgentMetrics::count(&self.metrics.resets, reason.label());
        self.tx.send(SourceMsg::Reset { rank: self.endpoint.rank, reason }).await.map_err(|_| Closed)
    }
}

/// Runs a zeromq operation with a deadline. `Err(Some)`: it failed or timed out.
async fn within<T>(
    timeout: Duration,
    operation: impl Future<Output = Result<T, zeromq::ZmqError>>,
) -> Result<T, Option<ReplayError>> {
    match tokio::time::timeout(timeout, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Some(ReplayError::Zmq(e))),
        Err(_) => Err(Some(ReplayError::Timeout(timeout))),
    }
}

/// The endpoint of rank `rank`: vLLM and SGLang add the rank to the TCP port (port 0 stays 0).
pub fn offset_port(endpoint: &str, rank: u32) -> Option<String> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if port == 0 {
        return Some(endpoint.to_owned());
    }
    let port = port.checked_add(u16::try_from(rank).ok()?)?;
    Some(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_use_consecutive_ports() {
        assert_eq!(offset_port("tcp://10.0.0.1:5557", 2).as_deref(), Some("tcp://10.0.0.1:5559"));
        assert_eq!(offset_port("tcp://*:0", 3).as_deref(), Some("tcp://*:0"));
        assert_eq!(offset_port("tcp://[::1]:5557", 1).as_deref(), Some("tcp://[::1]:5558"));
        assert_eq!(offset_port("tcp://h:65535", 1), None);
        assert_eq!(offset_port("tcp://h", 1), None);
    }

    #[test]
    fn wildcard_binds_every_interface() {
        assert_eq!(bindable("tcp://*:5557"), "tcp://0.0.0.0:5557");
        assert_eq!(bindable("tcp://127.0.0.1:5557"), "tcp://127.0.0.1:5557");
    }
}
