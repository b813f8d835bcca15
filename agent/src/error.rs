//! The crate's error type: what stops the agent from starting. Once running, the agent counts and
//! logs what goes wrong and carries on.

/// Why the agent could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line flag is missing or invalid.
    #[error("invalid flag {flag}: {reason}")]
    InvalidFlag {
        /// The flag, as typed (`--worker-id`).
        flag: &'static str,
        /// What is wrong, with what is allowed.
        reason: String,
    },
    /// The metrics listener could not be bound.
    #[error("cannot listen on {addr} (--metrics-listen): {source}")]
    MetricsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The NATS URL or options were rejected.
    #[error("cannot use NATS at {url}: {reason}")]
    Nats {
        /// The URL.
        url: String,
        /// The client's error.
        reason: String,
    },
    /// The async runtime could not be built.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}
