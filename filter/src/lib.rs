//! Envoy filter glue (placeholder until the filter issue lands).
