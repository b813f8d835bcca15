//! kvmesh agent: runs beside one inference worker and turns what its engine says (KV-cache events,
//! metrics) and what NVML says about its GPUs into NATS messages for the control plane
//! (`proto/kvmesh/v1/fleet.proto`): KV events with engine block hashes renamed to kvmesh block
//! hashes, periodic load reports, heartbeats that register the worker, and full block sets on resync.
//!
//! It must never publish a block under a wrong name: an event it cannot translate is counted and
//! skipped. Nothing an engine sends may stop it: malformed input is counted, logged and skipped.
//! Decoding is pure (`engines::{frames, msgpack, trtllm}`, `promtext`, `load`), tested on frames
//! captured from the real engines; I/O lives in `engines::zmq`, `engines::trtllm::run` and `run`.

pub mod blocks;
pub mod config;
pub mod engines;
pub mod error;
pub mod events;
pub mod gpu;
pub mod http;
pub mod load;
pub mod promtext;
pub mod publish;
pub mod run;
pub mod sequence;
pub mod state;
pub mod telemetry;

use std::process::ExitCode;

pub use config::{AgentArgs, AgentConfig, EngineKind, RoleArg};
pub use error::Error;
pub use gpu::Gpus;
pub use run::run;

/// `kvmesh agent`: sets up logging and a runtime, then runs until SIGINT or SIGTERM.
pub fn main(args: AgentArgs) -> Result<ExitCode, Error> {
    // Another command may have set a subscriber already; keep it then.
    let _ = tracing_subscriber::fmt().with_max_level(args.log_level).with_writer(std::io::stderr).try_init();
    let selection = || {
        if args.gpus.as_deref() == Some("none") {
            return None;
        }
        let cuda = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        Some(gpu::selection(args.gpus.as_deref(), cuda.as_deref()))
    };
    let open_gpus = || match selection() {
        Some(selection) => Gpus::open(selection),
        None => Gpus::none(),
    };
    if args.gpu_probe {
        // The probe's output is the command's result, for people and scripts: stdout, one line.
        println!("{}", open_gpus().probe_json());
        return Ok(ExitCode::SUCCESS);
    }
    let config = args.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(async {
        let gpus = open_gpus();
        run(config, gpus, shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
