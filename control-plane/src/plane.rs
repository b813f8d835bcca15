//! What one control-plane process holds, shared by ingest, the state stream and the admin API.
//!
//! One mutex guards the fleet state and the stream log together: publishing a delta and taking a
//! snapshot (with a broadcast receiver) happen under it, so a subscriber never misses or repeats a
//! version. Critical sections are short: one NATS message, one delta, one snapshot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::assets::Models;
use crate::config::Config;
use crate::fleet_state::FleetState;
use crate::metrics::Metrics;
use crate::stream::StreamLog;

/// The state behind the mutex.
pub struct Inner {
    /// Registry, blocks, index, load, policies and pending changes.
    pub fleet: FleetState,
    /// Versions, delta ring and broadcast of the state stream.
    pub stream: StreamLog,
}

/// Everything a control plane shares between its tasks.
pub struct Plane {
    inner: Mutex<Inner>,
    /// The configuration it runs with (validated).
    pub config: Config,
    /// Configured models and their files.
    pub models: Models,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// When it started.
    pub started: Instant,
    /// Name in resync requests and logs.
    pub replica_id: String,
    nats_connected: AtomicBool,
    initial_resync_sent: OnceLock<Instant>,
    changed: tokio::sync::Notify,
}

impl Plane {
    /// A plane over an empty fleet.
    pub fn new(config: Config, models: Models, inner: Inner, replica_id: String) -> Self {
        Plane {
            inner: Mutex::new(inner),
            config,
            models,
            metrics: Metrics::new(),
            started: Instant::now(),
            replica_id,
            nats_connected: AtomicBool::new(false),
            initial_resync_sent: OnceLock::new(),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Locks the shared state. A panic while it was held cannot leave it half-updated in a way that
    /// matters more than stopping would, so a poisoned lock is taken over.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the delta publisher that changes may be pending (call after applying anything).
    pub fn notify_changed(&self) {
        self.changed.notify_one();
    }

    /// Resolves once [`Plane::notify_changed`] was called (a call made while nobody waited counts).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Records the NATS connection state.
    pub fn set_nats_connected(&self, connected: bool) {
        self.nats_connected.store(connected, Ordering::Relaxed);
        self.metrics.nats_connected.set(i64::from(connected));
    }

    /// Whether NATS is connected now.
    pub fn nats_connected(&self) -> bool {
        self.nats_connected.load(Ordering::Relaxed)
    }

    /// Records that `resync.all` went out (now).
    pub fn mark_initial_resync_sent(&self) {
        let _ = self.initial_resync_sent.set(Instant::now());
    }

    /// Why the plane is not ready yet, or `None` when it is: NATS connected, `resync.all` sent and
    /// its answer window passed.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.nats_connected() {
            return Some("not connected to NATS");
        }
        let Some(sent) = self.initial_resync_sent.get() else { return Some("resync.all not sent yet") };
        let window = Duration::from_millis(self.config.resync.startup_window_ms);
        if sent.elapsed() < window {
            return Some("initial resync window still open");
        }
        None
    }
}
