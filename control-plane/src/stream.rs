//! The state stream to filters (gRPC `kvmesh.v1.State`): a snapshot, then ordered deltas.
//!
//! - Changes are coalesced for up to `stream.batch_ms` (an isolated change goes out at once, a busy
//!   fleet's changes once per window) and published as one delta with the next version
//!   (versions grow by 1 within a stream epoch; the epoch is random per process, so a filter that
//!   reconnects to another replica, or to a restarted one, gets a snapshot).
//! - The last `stream.ring_deltas` deltas are kept: a subscriber that gives the epoch and the last
//!   version it applied gets the missing deltas and no snapshot, when they are still in the ring.
//! - A subscriber that falls behind (its queue full for longer than the broadcast buffer) catches
//!   up the same way: from the ring, else with a fresh snapshot.
//!
//! - An idle stream carries a heartbeat every `stream.heartbeat_ms`: an update with the current
//!   epoch and version, a fresh `sent_at_ms` and no body, so a filter can tell a quiet fleet from
//!   a lost control plane.
//!
//! Worker handles are assigned at registration and never reused within an epoch.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvmesh_proto::v1 as pb;
use kvmesh_proto::v1::state_server::State;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::changes::Changes;
use crate::plane::Plane;

/// One published update, shared by every subscriber.
pub type Update = Arc<pb::StateUpdate>;

/// Versions, the delta ring and the broadcast to subscribers.
pub struct StreamLog {
    epoch: u64,
    version: u64,
    ring: VecDeque<Update>,
    ring_capacity: usize,
    tx: broadcast::Sender<Update>,
}

/// What a subscriber gets first.
pub enum Start {
    /// The deltas after its version (possibly none): it resumes.
    Resume(Vec<Update>),
    /// It needs the full state.
    Snapshot,
}

impl StreamLog {
    /// A fresh log with a random epoch at version 0.
    pub fn new(ring_capacity: usize, broadcast_capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(broadcast_capacity.max(1));
        StreamLog {
            epoch: random_epoch(),
            version: 0,
            ring: VecDeque::new(),
            ring_capacity: ring_capacity.max(1),
            tx,
        }
    }

    /// The stream epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The latest version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// A receiver of every update published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.tx.subscribe()
    }

    /// Whether a subscriber at (`epoch`, `version`) can resume from the ring, and with what.
    pub fn start(&self, epoch: u64, version: u64) -> Start {
        if epoch != self.epoch || version > self.version {
            return Start::Snapshot;
        }
        if version == self.version {
            return Start::Resume(Vec::new());
        }
        match self.ring.front() {
            // The ring holds every version from its front's to the latest.
            Some(front) if front.version <= version + 1 => {
                Start::Resume(self.ring.iter().filter(|u| u.version > version).cloned().collect())
            }
            _ => Start::Snapshot,
        }
    }

    /// The full state at the current version.
    pub fn snapshot_update(&self, snapshot: pb::Snapshot) -> pb::StateUpdate {
        pb::StateUpdate {
            epoch: self.epoch,
            version: self.version,
            sent_at_ms: unix_ms(),
            body: Some(pb::state_update::Body::Snapshot(snapshot)),
        }
    }

    /// Publishes what `changes` holds as the next version; returns it and the age of its oldest
    /// change, or `None` when nothing was pending.
    pub fn publish(&mut self, changes: &mut Changes, now: Instant) -> Option<(Update, Duration)> {
        let first = changes.first_at()?;
        let delta = changes.take_delta();
        self.version += 1;
        let update = Arc::new(pb::StateUpdate {
            epoch: self.epoch,
            version: self.version,
            sent_at_ms: unix_ms(),
            body: Some(pb::state_update::Body::Delta(delta)),
        });
        if self.ring.len() >= self.ring_capacity {
            self.ring.pop_front();
        }
        self.ring.push_back(update.clone());
        // No receiver is fine: nobody subscribed yet.
        let _ = self.tx.send(update.clone());
        Some((update, now.saturating_duration_since(first)))
    }
}

/// A random non-zero epoch (0 means "none" to subscribers).
fn random_epoch() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// Wall-clock now, Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Publishes pending changes until `shutdown` fires: at once when the last delta went out at
/// least `batch_ms` ago (an isolated change reaches filters without waiting), else when `batch_ms`
/// has passed since it (a busy fleet yields one delta per window).
pub async fn run_publisher(plane: Arc<Plane>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let window = Duration::from_millis(plane.config.stream.batch_ms);
    let mut last: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = plane.changed() => {}
            _ = shutdown.changed() => return,
        }
        let wait = last.map_or(Duration::ZERO, |t| window.saturating_sub(t.elapsed()));
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
        let published = {
            let mut inner = plane.lock();
            let inner = &mut *inner;
            inner.stream.publish(inner.fleet.changes_mut(), Instant::now())
        };
        if let Some((update, lag)) = published {
            last = Some(Instant::now());
            plane.metrics.deltas.inc();
            plane.metrics.stream_version.set(i64::try_from(update.version).unwrap_or(i64::MAX));
            plane.metrics.lag.observe(lag.as_secs_f64());
        }
    }
}

/// The gRPC `State` service.
pub struct StateService {
    plane: Arc<Plane>,
}

impl StateService {
    /// The service over a plane.
    pub fn new(plane: Arc<Plane>) -> Self {
        StateService { plane }
    }
}

#[tonic::async_trait]
impl State for StateService {
    type SubscribeStream = ReceiverStream<Result<pb::StateUpdate, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel(self.plane.config.stream.subscriber_buffer);
        tokio::spawn(serve_subscriber(self.plane.clone(), req, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_model_assets(
        &self,
        request: Request<pb::ModelAssetsRequest>,
    ) -> Result<Response<pb::ModelAssets>, Status> {
        let name = request.into_inner().model;
        let model = self
            .plane
            .models
            .get(&name)
            .ok_or_else(|| Status::not_found(format!("unknown model {name:?}")))?;
        let files = model.files.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!("model {name:?} has no tokenizer_dir configured"))
        })?;
        let block_size =
            model.config.block_size.or_else(|| self.plane.lock().fleet.registered_block_size(&name));
        Ok(Response::new(pb::ModelAssets {
            model: name,
            tokenizer_id: files.tokenizer_id.clone(),
            block_size: block_size.unwrap_or(0),
            tokenizer: files.tokenizer_json.as_ref().clone(),
            tokenizer_config: files.tokenizer_config.as_ref().clone(),
            chat_template: files.chat_template.clone(),
        }))
    }
}

/// Decrements the subscriber gauge when a subscriber's task ends, however it ends.
struct SubscriberGuard(Arc<Plane>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.metrics.subscribers.dec();
    }
}

/// Under the lock: a broadcast receiver plus what must be sent before its first update.
fn begin(plane: &Plane, epoch: u64, version: u64) -> (broadcast::Receiver<Update>, Vec<Update>) {
    let inner = plane.lock();
    let rx = inner.stream.subscribe();
    match inner.stream.start(epoch, version) {
        Start::Resume(deltas) => {
            plane.metrics.resumes.inc();
            (rx, deltas)
        }
        Start::Snapshot => {
            plane.metrics.snapshots.inc();
            let update = inner.stream.snapshot_update(inner.fleet.snapshot());
            (rx, vec![Arc::new(update)])
        }
    }
}

/// Feeds one subscriber until it goes away.
async fn serve_subscriber(
    plane: Arc<Plane>,
    req: pb::SubscribeRequest,
    tx: mpsc::Sender<Result<pb::StateUpdate, Status>>,
) {
    plane.metrics.subscribers.inc();
    let _guard = SubscriberGuard(plane.clone());
    let (mut epoch, mut version) = (req.epoch, req.version);
    let (mut rx, mut backlog) = begin(&plane, epoch, version);
    let heartbeat_every = Duration::from_millis(plane.config.stream.heartbeat_ms);
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + heartbeat_every, heartbeat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(node = %req.node, epoch, version, snapshot = backlog.first().is_some_and(|u| matches!(u.body, Some(pb::state_update::Body::Snapshot(_)))), "subscriber joined");
    loop {
        for update in backlog.drain(..) {
            if tx.send(Ok(update.as_ref().clone())).await.is_err() {
                tracing::info!(node = %req.node, "subscriber left");
                return;
            }
            (epoch, version) = (update.epoch, update.version);
            heartbeat.reset();
        }
        tokio::select! {
            _ = heartbeat.tick() => {
                let beat = pb::StateUpdate { epoch, version, sent_at_ms: unix_ms(), body: None };
                if tx.send(Ok(beat)).await.is_err() {
                    tracing::info!(node = %req.node, "subscriber left");
                    return;
                }
            }
            received = rx.recv() => match received {
                Ok(update) => {
                    // Updates published between `begin` and now may already be in the backlog sent.
                    if update.epoch == epoch && update.version > version {
                        backlog.push(update);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(node = %req.node, missed, "subscriber lagged; catching up");
                    (rx, backlog) = begin(&plane, epoch, version);
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tx.closed() => {
                tracing::info!(node = %req.node, "subscriber left");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(n: u64, ring: usize) -> StreamLog {
        let mut log = StreamLog::new(ring, 16);
        let now = Instant::now();
        for i in 0..n {
            let mut c = Changes::default();
            c.block(1, i, true, now);
            log.publish(&mut c, now);
        }
        log
    }

    #[test]
    fn nothing_pending_publishes_nothing() {
        let mut log = StreamLog::new(4, 4);
        assert!(log.publish(&mut Changes::default(), Instant::now()).is_none());
        assert_eq!(log.version(), 0);
    }

    #[test]
    fn resume_within_the_ring_gets_the_missing_deltas() {
        let log = log_with(5, 10);
        let Start::Resume(d) = log.start(log.epoch(), 3) else { panic!("expected a resume") };
        assert_eq!(d.iter().map(|u| u.version).collect::<Vec<_>>(), [4, 5]);
        let Start::Resume(d) = log.start(log.epoch(), 5) else { panic!("expected a resume") };
        assert!(d.is_empty());
        let Start::Resume(d) = log.start(log.epoch(), 0) else { panic!("expected a resume from 0") };
        assert_eq!(d.len(), 5);
    }

    #[test]
    fn too_old_or_foreign_versions_get_a_snapshot() {
        let log = log_with(10, 4);
        assert!(matches!(log.start(log.epoch(), 5), Start::Snapshot));
        assert!(matches!(log.start(log.epoch(), 6), Start::Resume(_)));
        assert!(matches!(log.start(log.epoch() ^ 1, 9), Start::Snapshot));
        assert!(matches!(log.start(log.epoch(), 11), Start::Snapshot));
        assert!(matches!(log.start(0, 0), Start::Snapshot));
    }
}
