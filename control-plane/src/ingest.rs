//! NATS ingest: one wildcard subscription over the namespace (so one agent's messages are handled
//! in the order it published them: a heartbeat's `kv_seq` never overtakes the batch it counts),
//! plus one inbox subscription for resync answers.
//!
//! At start, once connected, it publishes `kvmesh.<ns>.resync.all` with a reply subject in its inbox
//! and rebuilds every worker's block set from the answers. Later resyncs go to one worker each
//! (`kvmesh.<ns>.resync.<worker>`), each with its own reply subject, so chunks of two answers
//! never mix. Messages that do not decode are counted (`kvmesh_cp_malformed_messages_total`) and
//! skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State as ConnectionState;
use kvmesh_proto::v1 as pb;
use prost::Message as _;
use tokio_stream::StreamExt as _;

use crate::error::Error;
use crate::fleet_state::{FleetState, Rejected, ResyncNeeded};
use crate::plane::Plane;
use crate::wire::{SubjectKind, Subjects};

/// Why a message was not applied.
#[derive(Debug)]
pub enum Malformed {
    /// Its payload is not the message its subject carries.
    Decode(prost::DecodeError),
    /// It decoded but cannot be applied.
    Rejected(Rejected),
}

/// Decodes and applies one message of a fleet subject. Resync requests (other replicas') are
/// ignored.
pub fn apply_message(
    fleet: &mut FleetState,
    kind: SubjectKind,
    payload: &[u8],
    now: Instant,
) -> Result<Option<ResyncNeeded>, Malformed> {
    match kind {
        SubjectKind::Kv => {
            let batch = pb::KvEventBatch::decode(payload).map_err(Malformed::Decode)?;
            fleet.apply_kv_batch(batch, now).map_err(Malformed::Rejected)
        }
        SubjectKind::Worker => {
            let hb = pb::Heartbeat::decode(payload).map_err(Malformed::Decode)?;
            fleet.apply_heartbeat(hb, now).map_err(Malformed::Rejected)
        }
        SubjectKind::Load => {
            let report = pb::LoadReport::decode(payload).map_err(Malformed::Decode)?;
            fleet.apply_load(report, now).map(|()| None).map_err(Malformed::Rejected)
        }
        SubjectKind::Resync => Ok(None),
    }
}

/// Connects to NATS; retries in the background when the server is not up yet.
pub async fn connect(plane: &Arc<Plane>) -> Result<async_nats::Client, Error> {
    let options = async_nats::ConnectOptions::new()
        .name(format!("kvmesh-control-plane/{}", plane.replica_id))
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                async_nats::Event::SlowConsumer(sid) => {
                    // Dropped messages show up as seq gaps and are resynced.
                    tracing::warn!(sid, "NATS dropped messages for a slow subscription")
                }
                other => tracing::info!(event = %other, "NATS event"),
            }
        });
    async_nats::connect_with_options(plane.config.nats.url.as_str(), options)
        .await
        .map_err(|e| Error::Nats(format!("connect {}: {e}", plane.config.nats.url)))
}

/// Sends resync requests with reply subjects in `inbox`.
struct Resyncer {
    client: async_nats::Client,
    subjects: Subjects,
    inbox: String,
    next_tag: u64,
    request: Vec<u8>,
}

impl Resyncer {
    async fn ask(&mut self, need: ResyncNeeded) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let reply = format!("{}.{tag}", self.inbox);
        tracing::info!(worker = %need.worker, reason = need.reason.label(), tag, "asking for a resync");
        if let Err(e) = self
            .client
            .publish_with_reply(
                self.subjects.resync(need.worker.as_str()),
                reply,
                self.request.clone().into(),
            )
            .await
        {
            // The timeout asks again.
            tracing::warn!(worker = %need.worker, error = %e, "resync request not sent");
        }
    }

    async fn ask_all(&mut self) -> bool {
        let reply = format!("{}.0", self.inbox);
        match self
            .client
            .publish_with_reply(self.subjects.resync_all(), reply, self.request.clone().into())
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "resync.all not sent; trying again");
                false
            }
        }
    }
}

/// Runs ingest until `shutdown` fires or the NATS connection is closed for good.
pub async fn run(
    plane: Arc<Plane>,
    client: async_nats::Client,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Error> {
    let subjects = Subjects::new(&plane.config.namespace);
    let window = Duration::from_millis(plane.config.resync.startup_window_ms);
    // Messages that arrive before resync.all goes out are covered by its answers too: workers first
    // heard of now wait for those rather than being asked one by one.
    plane.lock().fleet.begin_global_resync(Instant::now() + window);
    let mut fleet_sub = client
        .subscribe(subjects.all())
        .await
        .map_err(|e| Error::Nats(format!("subscribe {}: {e}", subjects.all())))?;
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(format!("{inbox}.*"))
        .await
        .map_err(|e| Error::Nats(format!("subscribe {inbox}.*: {e}")))?;
    let mut resyncer = Resyncer {
        client: client.clone(),
        subjects: subjects.clone(),
        inbox: inbox.clone(),
        next_tag: 1,
        request: pb::ResyncRequest { requester: plane.replica_id.clone() }.encode_to_vec(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(plane.config.workers.housekeeping_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync_all_sent = false;
    tracing::info!(subject = %subjects.all(), inbox = %inbox, "ingest subscribed");
    loop {
        let needs: Vec<ResyncNeeded> = tokio::select! {
            msg = fleet_sub.next() => {
                let Some(msg) = msg else { return Err(Error::Nats("fleet subscription closed".into())) };
                let Some(kind) = subjects.kind(msg.subject.as_str()) else { continue };
                let result = {
                    let mut inner = plane.lock();
                    apply_message(&mut inner.fleet, kind, &msg.payload, Instant::now())
                };
                match result {
                    Ok(need) => need.into_iter().collect(),
                    Err(e) => {
                        plane.metrics.malformed(kind.label());
                        tracing::debug!(subject = %msg.subject, error = ?e, "malformed message skipped");
                        Vec::new()
                    }
                }
            }
            msg = answers.next() => {
                let Some(msg) = msg else { return Err(Error::Nats("inbox subscription closed".into())) };
                let tag = msg.subject.as_str().rsplit('.').next().and_then(|t| t.parse::<u64>().ok());
                let chunk = pb::ResyncChunk::decode(msg.payload.as_ref());
                match (tag, chunk) {
                    (Some(tag), Ok(chunk)) => {
                        let result = plane.lock().fleet.apply_resync_chunk(tag, chunk, Instant::now());
                        match result {
                            Ok(need) => need.into_iter().collect(),
                            Err(e) => {
                                plane.metrics.malformed("resync");
                                tracing::debug!(error = ?e, "malformed resync answer skipped");
                                Vec::new()
                            }
                        }
                    }
                    (_, chunk) => {
                        plane.metrics.malformed("resync");
                        tracing::debug!(subject = %msg.subject, error = ?chunk.err(), "malformed resync answer skipped");
                        Vec::new()
                    }
                }
            }
            _ = tick.tick() => {
                let connected = client.connection_state() == ConnectionState::Connected;
                plane.set_nats_connected(connected);
                if connected && !resync_all_sent {
                    // Ask once the subscriptions are live on the server, so no answer is lost.
                    if client.flush().await.is_ok() {
                        plane.lock().fleet.begin_global_resync(Instant::now() + window);
                        resync_all_sent = resyncer.ask_all().await;
                        if resync_all_sent {
                            plane.mark_initial_resync_sent();
                            tracing::info!(subject = %subjects.resync_all(), "asked every agent to resync");
                        }
                    }
                }
                let now = Instant::now();
                let mut inner = plane.lock();
                inner.fleet.expire(now);
                inner.fleet.resync_timeouts(now)
            }
            _ = shutdown.changed() => return Ok(()),
        };
        plane.notify_changed();
        for need in needs {
            resyncer.ask(need).await;
        }
    }
}
