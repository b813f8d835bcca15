//! The crate's error type.

use thiserror::Error;

/// What went wrong in routing logic. Request-body problems are [`crate::request::RequestError`],
/// wrapped here so callers can map each to its HTTP status.
#[derive(Debug, Error)]
pub enum Error {
    /// The request body could not be used.
    #[error(transparent)]
    Request(#[from] crate::request::RequestError),
    /// A tokenizer could not be loaded or a prompt not tokenized.
    #[cfg(feature = "tokenizer")]
    #[error(transparent)]
    Tokenize(#[from] crate::tokenize::TokenizeError),
    /// A chat template could not be loaded or rendered.
    #[cfg(feature = "tokenizer")]
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    /// The fleet table is full.
    #[error("too many workers: at most {limit} fit in one fleet table")]
    TooManyWorkers {
        /// The limit.
        limit: usize,
    },
    /// A configuration value is out of its allowed range.
    #[error("invalid configuration: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field, as a dotted path inside its config struct (`weights.overlap_weight`).
        field: &'static str,
        /// What is wrong with it, with the allowed range.
        reason: String,
    },
}
