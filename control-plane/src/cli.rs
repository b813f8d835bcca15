//! `kvmesh control-plane`: flags, the config they make, and the process around a [`ControlPlane`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::config::{Config, ModelConfig};
use crate::error::Error;
use crate::service::ControlPlane;

/// Flags of `kvmesh control-plane`. Flags override the config file; the common case needs no file.
#[derive(clap::Args, Debug, Default)]
pub struct ControlPlaneArgs {
    /// YAML config file (see control-plane/kvmesh.example.yaml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// NATS server URL.
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// Namespace of the NATS subjects (`kvmesh.<namespace>.*`).
    #[arg(long)]
    pub namespace: Option<String>,
    /// REST admin listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub admin_listen: Option<SocketAddr>,
    /// gRPC state-stream listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub grpc_listen: Option<SocketAddr>,
    /// A served model (repeatable); pairs with the `--tokenizer-dir` in the same position.
    #[arg(long = "model", value_name = "NAME")]
    pub models: Vec<String>,
    /// Tokenizer directory of the `--model` in the same position (one per model, or none).
    #[arg(long = "tokenizer-dir", value_name = "DIR")]
    pub tokenizer_dirs: Vec<PathBuf>,
    /// Tokens per KV block of the `--model`s (else what their workers register).
    #[arg(long, value_name = "TOKENS")]
    pub block_size: Option<u32>,
    /// Most distinct blocks in the fleet index.
    #[arg(long, value_name = "BLOCKS")]
    pub index_max_blocks: Option<usize>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info", env = "KVMESH_LOG")]
    pub log: String,
}

impl ControlPlaneArgs {
    /// The configuration: the file's (or the defaults), with the flags on top, validated.
    pub fn to_config(&self) -> Result<Config, Error> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(url) = &self.nats {
            config.nats.url = url.clone();
        }
        if let Some(ns) = &self.namespace {
            config.namespace = ns.clone();
        }
        if let Some(addr) = self.admin_listen {
            config.admin.listen = addr;
        }
        if let Some(addr) = self.grpc_listen {
            config.grpc.listen = addr;
        }
        if let Some(n) = self.index_max_blocks {
            config.index.max_blocks = n;
        }
        let dirs = &self.tokenizer_dirs;
        if !dirs.is_empty() && dirs.len() != self.models.len() {
            return Err(Error::Config {
                field: "--tokenizer-dir".into(),
                reason: format!(
                    "give one per --model ({} models, {} dirs), or none",
                    self.models.len(),
                    dirs.len()
                ),
            });
        }
        if self.block_size.is_some() && self.models.is_empty() {
            return Err(Error::Config {
                field: "--block-size".into(),
                reason: "applies to --model; give one".into(),
            });
        }
        for (i, name) in self.models.iter().enumerate() {
            let dir = dirs.get(i).cloned();
            match config.models.iter_mut().find(|m| &m.name == name) {
                Some(m) => {
                    if dir.is_some() {
                        m.tokenizer_dir = dir;
                    }
                    if self.block_size.is_some() {
                        m.block_size = self.block_size;
                    }
                }
                None => {
                    let mut m = ModelConfig::named(name.clone(), dir);
                    m.block_size = self.block_size;
                    config.models.push(m);
                }
            }
        }
        config.validate()?;
        Ok(config)
    }
}

/// Runs a control plane until SIGINT or SIGTERM.
pub fn run(args: ControlPlaneArgs) -> anyhow::Result<ExitCode> {
    init_tracing(&args.log)?;
    let config = args.to_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(async move {
        let mut cp = ControlPlane::start(config).await?;
        let code = tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                ExitCode::SUCCESS
            }
            task = cp.stopped() => {
                tracing::error!(task, "a task stopped; shutting down");
                ExitCode::from(1)
            }
        };
        cp.shutdown().await;
        Ok(code)
    })
}

/// Logs to stderr at `level`.
fn init_tracing(level: &str) -> anyhow::Result<()> {
    let level: tracing::Level = level.parse().map_err(|_| Error::Config {
        field: "--log".into(),
        reason: format!("must be error, warn, info, debug or trace, got {level:?}"),
    })?;
    // A second init (tests, embedding) keeps the first subscriber.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_alone_make_a_valid_config() {
        let args = ControlPlaneArgs {
            nats: Some("nats://127.0.0.1:4333".into()),
            namespace: Some("prod".into()),
            admin_listen: Some("127.0.0.1:0".parse().unwrap()),
            models: vec!["a".into(), "b".into()],
            block_size: Some(32),
            ..Default::default()
        };
        let config = args.to_config().unwrap();
        assert_eq!(config.nats.url, "nats://127.0.0.1:4333");
        assert_eq!(config.namespace, "prod");
        assert_eq!(config.models.len(), 2);
        assert_eq!(config.models[1].block_size, Some(32));
    }

    #[test]
    fn tokenizer_dirs_must_pair_with_models() {
        let args = ControlPlaneArgs {
            models: vec!["a".into(), "b".into()],
            tokenizer_dirs: vec!["/tmp".into()],
            ..Default::default()
        };
        match args.to_config() {
            Err(Error::Config { field, .. }) => assert_eq!(field, "--tokenizer-dir"),
            other => panic!("expected a --tokenizer-dir error, got {other:?}"),
        }
    }

    #[test]
    fn bad_namespace_flag_is_named() {
        let args = ControlPlaneArgs { namespace: Some("a.b".into()), ..Default::default() };
        match args.to_config() {
            Err(Error::Config { field, .. }) => assert_eq!(field, "namespace"),
            other => panic!("expected a namespace error, got {other:?}"),
        }
    }
}
