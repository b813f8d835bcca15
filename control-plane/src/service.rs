//! Starting and stopping one control plane: listeners, NATS ingest, the delta publisher, the gRPC
//! state service and the admin API, all on the caller's tokio runtime.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvmesh_proto::v1::state_server::StateServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::assets::Models;
use crate::config::Config;
use crate::error::Error;
use crate::fleet_state::{FleetState, Settings};
use crate::plane::{Inner, Plane};
use crate::stream::{StateService, StreamLog};
use crate::{admin, ingest, stream};

/// A running control plane. Dropping it stops its tasks; [`ControlPlane::shutdown`] stops them
/// gracefully.
pub struct ControlPlane {
    plane: Arc<Plane>,
    admin_addr: SocketAddr,
    grpc_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    exited: mpsc::Receiver<&'static str>,
}

impl ControlPlane {
    /// Validates `config`, loads model files, binds both listeners, connects to NATS (retrying in
    /// the background if it is not up yet) and starts every task.
    pub async fn start(config: Config) -> Result<ControlPlane, Error> {
        config.validate()?;
        // Loading and checking tokenizers takes a while (an 11 MB tokenizer.json is converted once).
        let models = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || Models::load(&config)).await.map_err(|e| {
                Error::ModelAssets { model: "*".into(), reason: format!("loader task failed: {e}") }
            })??
        };
        let policies: BTreeMap<_, _> = config.models.iter().map(|m| (m.name.clone(), m.routing)).collect();
        let settings = Settings {
            max_blocks: config.index.max_blocks,
            default_ttl: Duration::from_millis(config.workers.default_ttl_ms),
            resync_timeout: Duration::from_millis(config.resync.timeout_ms),
            resync_max_backoff: Duration::from_millis(config.resync.max_backoff_ms),
            buffer_batches: config.resync.buffer_batches,
        };
        let stream_log = StreamLog::new(config.stream.ring_deltas, config.stream.subscriber_buffer);
        let replica_id = format!("cp-{:016x}", stream_log.epoch());
        let inner = Inner { fleet: FleetState::new(settings, policies), stream: stream_log };
        let admin_listener = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| Error::Listen { addr: config.admin.listen, source })?;
        let grpc_listener = TcpListener::bind(config.grpc.listen)
            .await
            .map_err(|source| Error::Listen { addr: config.grpc.listen, source })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| Error::Listen { addr: config.admin.listen, source })?;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|source| Error::Listen { addr: config.grpc.listen, source })?;
        let token = config.admin_token();
        if token.is_none() {
            tracing::warn!(
                "no admin token (admin.token or KVMESH_ADMIN_TOKEN): mutating admin calls are refused"
            );
        }
        let plane = Arc::new(Plane::new(config, models, inner, replica_id));
        let client = ingest::connect(&plane).await?;
        let (shutdown, rx) = watch::channel(false);
        let (exit_tx, exited) = mpsc::channel(8);
        let mut tasks = Vec::new();
        // Each task reports its name when it ends, so `stopped` can tell which one went.
        let spawn =
            |name: &'static str, task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
                let exit_tx = exit_tx.clone();
                tokio::spawn(async move {
                    task.await;
                    let _ = exit_tx.send(name).await;
                })
            };

        let (p, r) = (plane.clone(), rx.clone());
        tasks.push(spawn(
            "ingest",
            Box::pin(async move {
                if let Err(e) = ingest::run(p, client, r).await {
                    tracing::error!(error = %e, "ingest stopped");
                }
            }),
        ));
        tasks.push(spawn("publisher", Box::pin(stream::run_publisher(plane.clone(), rx.clone()))));

        let router = admin::router(plane.clone(), token);
        let mut r = rx.clone();
        tasks.push(spawn(
            "admin server",
            Box::pin(async move {
                let stop = async move {
                    let _ = r.changed().await;
                };
                if let Err(e) = axum::serve(admin_listener, router).with_graceful_shutdown(stop).await {
                    tracing::error!(error = %e, "admin server stopped");
                }
            }),
        ));

        let service = StateServer::new(StateService::new(plane.clone()))
            // A snapshot of a large fleet is one message; filters raise their receive limit to match.
            .max_encoding_message_size(usize::MAX);
        let mut r = rx.clone();
        tasks.push(spawn(
            "gRPC server",
            Box::pin(async move {
                let stop = async move {
                    let _ = r.changed().await;
                };
                let incoming =
                    tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
                let result = tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(Duration::from_secs(30)))
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, stop)
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "gRPC server stopped");
                }
            }),
        ));
        tracing::info!(admin = %admin_addr, grpc = %grpc_addr, replica = %plane.replica_id, "control plane started");
        Ok(ControlPlane { plane, admin_addr, grpc_addr, shutdown, tasks, exited })
    }

    /// Where the admin API listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where the gRPC state service listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// This replica's id (in resync requests and logs).
    pub fn replica_id(&self) -> &str {
        &self.plane.replica_id
    }

    /// Waits until one of the tasks ends by itself (a server failed, NATS closed for good);
    /// returns its name.
    pub async fn stopped(&mut self) -> &'static str {
        self.exited.recv().await.unwrap_or("all tasks")
    }

    /// Stops every task, waiting up to a few seconds for them to finish.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}
