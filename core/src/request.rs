//! Typed parsing of OpenAI-style request bodies (placeholder: being written).

/// Why a request body cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {}
