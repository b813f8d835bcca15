//! The crate's error type.

/// What can go wrong in the control plane outside a single request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing or out of range.
    #[error("invalid configuration `{field}`: {reason}")]
    Config {
        /// The offending field (`models[1].tokenizer_dir`), or the flag.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A model's tokenizer or template files cannot be loaded.
    #[error("model {model:?}: {reason}")]
    ModelAssets {
        /// The model.
        model: String,
        /// What failed.
        reason: String,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// NATS could not be reached or subscribed to.
    #[error("NATS: {0}")]
    Nats(String),
}
