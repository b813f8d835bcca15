//! Prefill/decode decision (placeholder: being written).
