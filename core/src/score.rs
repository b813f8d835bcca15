//! Scoring policies (placeholder: being written).
